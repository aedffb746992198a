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

/// Counts, per thread, the bytes allocated and not yet freed, and their peak: the fuzz tests
/// assert with it that no input makes a reader allocate beyond a bound. Test builds only.
struct CountingAllocator;

thread_local! {
    static LIVE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
    static PEAK: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
}

fn note_allocation(delta: isize) {
    // `try_with`: no panic while a thread's locals are torn down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; only sizes are counted.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            note_allocation(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            note_allocation(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        note_allocation(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        let p = unsafe { std::alloc::System.realloc(ptr, layout, size) };
        if !p.is_null() {
            note_allocation(size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Run `f`; returns its result and the most bytes it held allocated at once on this thread.
pub fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(std::cell::Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(std::cell::Cell::get) - base;
    (out, peak.max(0) as usize)
}
