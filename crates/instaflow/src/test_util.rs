//! Helpers shared by the unit tests.

use burn::tensor::{Tensor, backend::Backend};

/// The backend unit tests run on.
pub type TB = burn::backend::Flex;

/// Its device.
pub fn device() -> burn::backend::flex::FlexDevice {
    Default::default()
}

/// A tensor's values as `f32`.
pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 data")
}

/// A path in the repository.
pub fn repo_path(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// A parity fixture (`tests/fixtures/parity/NAME`) with the shared CLIP tokenizer, assembled in a
/// fresh temporary folder of its own (tests run in parallel).
pub fn parity_folder(name: &str, tag: &str) -> crate::source::ModelSource {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "instaflow-unit-{name}-{tag}-{}-{n}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let fixture = repo_path("tests/fixtures/parity").join(name);
    for part in ["unet", "vae", "text_encoder"] {
        std::fs::create_dir_all(dir.join(part)).unwrap();
        for entry in std::fs::read_dir(fixture.join(part)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(part).join(entry.file_name())).unwrap();
        }
    }
    std::fs::create_dir_all(dir.join("tokenizer")).unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(
            repo_path("assets/clip-tokenizer").join(f),
            dir.join("tokenizer").join(f),
        )
        .unwrap();
    }
    crate::source::ModelSource::dir(dir)
}
