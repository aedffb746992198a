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
pub fn parity_folder(name: &str, tag: &str) -> crate::sd::source::ModelSource {
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
    crate::sd::source::ModelSource::dir(dir)
}

/// The largest |a − b| over two equally long slices; NaN if any difference is NaN (a fold with
/// `f32::max` would skip NaN and let an all-NaN result pass).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| {
            if d.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        })
}

#[test]
fn max_abs_diff_does_not_hide_nan() {
    assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 2.0]), 0.5);
    assert!(max_abs_diff(&[f32::NAN, 2.0], &[1.0, 2.0]).is_nan());
    assert!(max_abs_diff(&[1.0, f32::NAN], &[1.0, f32::NAN]).is_nan());
}
