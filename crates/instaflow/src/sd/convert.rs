//! Re-encode the weights of a diffusers folder (f32 ↔ f16, bf16 → either) without loading the
//! models: what the browser downloads best is the f16 copy (half the bytes; the loader widens it to
//! f32 on the device). Tensor names, shapes, shard layout, configs and tokenizer are kept as they are.

use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::training::data::write_atomic;

/// Floating-point type of the converted weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    /// IEEE half precision (2 bytes).
    F16,
    /// IEEE single precision (4 bytes).
    F32,
}

/// What [`convert_folder`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Converted {
    /// Safetensors files rewritten.
    pub weight_files: usize,
    /// Other files copied (configs, tokenizer, shard indexes, notices).
    pub copied: usize,
    /// Files left out: weights in other formats (`.bin`, `.ckpt`, …), which the loader never reads.
    pub skipped: Vec<PathBuf>,
    /// Bytes of safetensors read and written.
    pub bytes_in: u64,
    /// Bytes of safetensors written.
    pub bytes_out: u64,
}

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The input is not a diffusers folder, or the output would overwrite something.
    #[error("{0}")]
    Invalid(String),
    /// A value does not fit the target type (e.g. |x| > 65504 for f16).
    #[error("{path}: tensor `{tensor}` has value {value}, which {dtype:?} cannot hold")]
    OutOfRange {
        /// The file.
        path: String,
        /// The tensor.
        tensor: String,
        /// The offending value.
        value: f32,
        /// The target type.
        dtype: WeightDtype,
    },
}

fn io(path: &Path, e: impl std::fmt::Display) -> ConvertError {
    ConvertError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Files under `dir`, relative to it, sorted.
fn walk(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), ConvertError> {
    let mut entries: Vec<_> = fs::read_dir(dir.join(rel))
        .map_err(|e| io(&dir.join(rel), e))?
        .collect::<Result<_, _>>()
        .map_err(|e| io(&dir.join(rel), e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let r = rel.join(entry.file_name());
        if entry.path().is_dir() {
            walk(dir, &r, out)?;
        } else {
            out.push(r);
        }
    }
    Ok(())
}

/// Values of a float tensor as f32.
pub(crate) fn floats(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// One safetensors file re-encoded to `dtype`; integer tensors are kept.
pub fn convert_safetensors(
    bytes: &[u8],
    dtype: WeightDtype,
    name: &str,
) -> Result<Vec<u8>, ConvertError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| ConvertError::Io {
        path: name.into(),
        message: format!("not a valid safetensors file ({e})"),
    })?;
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| ConvertError::Io {
        path: name.into(),
        message: e.to_string(),
    })?;
    let mut converted: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut names = st.names();
    names.sort();
    for tensor in names {
        let view = st.tensor(tensor).map_err(|e| ConvertError::Io {
            path: name.into(),
            message: e.to_string(),
        })?;
        let out = match floats(view.dtype(), view.data()) {
            None => (view.dtype(), view.data().to_vec()),
            Some(values) => match dtype {
                WeightDtype::F32 => (
                    Dtype::F32,
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
                WeightDtype::F16 => {
                    if let Some(&bad) = values
                        .iter()
                        .find(|v| v.is_finite() && v.abs() > f32::from(half::f16::MAX))
                    {
                        return Err(ConvertError::OutOfRange {
                            path: name.into(),
                            tensor: tensor.to_string(),
                            value: bad,
                            dtype,
                        });
                    }
                    (
                        Dtype::F16,
                        values
                            .iter()
                            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                            .collect(),
                    )
                }
            },
        };
        converted.push((tensor.to_string(), out.0, view.shape().to_vec(), out.1));
    }
    let views = converted
        .iter()
        .map(|(n, dt, shape, data)| {
            TensorView::new(*dt, shape.clone(), data)
                .map(|v| (n.as_str(), v))
                .map_err(|e| ConvertError::Io {
                    path: name.into(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, metadata.metadata().clone()).map_err(|e| ConvertError::Io {
        path: name.into(),
        message: e.to_string(),
    })
}

/// Copy the diffusers folder `src` to `dst` (which must not exist or be empty) with every
/// safetensors file re-encoded to `dtype`.
pub fn convert_folder(
    src: &Path,
    dst: &Path,
    dtype: WeightDtype,
) -> Result<Converted, ConvertError> {
    if !src.join("model_index.json").is_file() && !src.join("unet/config.json").is_file() {
        return Err(ConvertError::Invalid(format!(
            "{}: not a diffusers folder (no model_index.json or unet/config.json)",
            src.display()
        )));
    }
    if dst.exists() && fs::read_dir(dst).map_err(|e| io(dst, e))?.next().is_some() {
        return Err(ConvertError::Invalid(format!(
            "{}: exists and is not empty (choose a new folder)",
            dst.display()
        )));
    }
    let mut files = Vec::new();
    walk(src, Path::new(""), &mut files)?;
    let mut report = Converted::default();
    for rel in files {
        let (from, to) = (src.join(&rel), dst.join(&rel));
        let ext = rel.extension().and_then(|e| e.to_str()).unwrap_or("");
        if matches!(
            ext,
            "bin" | "ckpt" | "pt" | "pth" | "msgpack" | "onnx" | "h5"
        ) {
            report.skipped.push(rel.clone());
            continue;
        }
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        let bytes = fs::read(&from).map_err(|e| io(&from, e))?;
        if ext == "safetensors" {
            let out = convert_safetensors(&bytes, dtype, &from.display().to_string())?;
            report.weight_files += 1;
            report.bytes_in += bytes.len() as u64;
            report.bytes_out += out.len() as u64;
            write_atomic(&to, &out).map_err(|e| io(&to, e))?;
        } else {
            write_atomic(&to, &bytes).map_err(|e| io(&to, e))?;
            report.copied += 1;
        }
    }
    if report.weight_files == 0 {
        return Err(ConvertError::Invalid(format!(
            "{}: no .safetensors weights found",
            src.display()
        )));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(tensors: &[(&str, Dtype, Vec<u8>, Vec<usize>)]) -> Vec<u8> {
        let views: Vec<_> = tensors
            .iter()
            .map(|(n, dt, data, shape)| (*n, TensorView::new(*dt, shape.clone(), data).unwrap()))
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    #[test]
    fn f32_to_f16_and_back_keeps_values_names_and_integers() {
        let values = [0.5f32, -1.25, 3.0e-3, 1000.0];
        let f32s: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let ints: Vec<u8> = [7i64, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        let src = file(&[
            ("w", Dtype::F32, f32s, vec![2, 2]),
            ("position_ids", Dtype::I64, ints.clone(), vec![2]),
        ]);
        let half = convert_safetensors(&src, WeightDtype::F16, "x").unwrap();
        let st = SafeTensors::deserialize(&half).unwrap();
        assert_eq!(st.tensor("w").unwrap().dtype(), Dtype::F16);
        assert_eq!(st.tensor("w").unwrap().shape(), &[2, 2]);
        assert_eq!(st.tensor("position_ids").unwrap().data(), ints.as_slice());
        let back = convert_safetensors(&half, WeightDtype::F32, "x").unwrap();
        let st = SafeTensors::deserialize(&back).unwrap();
        let got = floats(Dtype::F32, st.tensor("w").unwrap().data()).unwrap();
        for (g, v) in got.iter().zip(values) {
            assert!((g - v).abs() <= v.abs() * 1e-3, "{g} vs {v}");
        }
        assert!(half.len() < src.len());
    }

    #[test]
    fn values_f16_cannot_hold_are_an_error_naming_the_tensor() {
        let big: Vec<u8> = [1.0e6f32].iter().flat_map(|v| v.to_le_bytes()).collect();
        let src = file(&[("scale", Dtype::F32, big, vec![1])]);
        let err = convert_safetensors(&src, WeightDtype::F16, "unet/x.safetensors").unwrap_err();
        assert!(err.to_string().contains("`scale`"), "{err}");
        assert!(convert_safetensors(b"garbage", WeightDtype::F16, "y").is_err());
    }
}
