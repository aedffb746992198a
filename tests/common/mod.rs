#![allow(dead_code)] // each test binary uses a different subset of these helpers
//! Helpers shared by the end-to-end tests.

use std::path::{Path, PathBuf};

/// A path inside the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// Shape and values of the f32 golden `key` of parity config `config`.
pub fn golden(config: &str, key: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(
        repo("tests/fixtures/parity")
            .join(config)
            .join("goldens.safetensors"),
    )
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap_or_else(|_| panic!("golden {key}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "golden {key}");
    let values = t
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), values)
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
