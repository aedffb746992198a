//! Loading diffusers/transformers safetensors weights (f32, f16 or bf16; one file or shards with
//! an index) into the models of [`crate::sd::models`].
//!
//! Files on disk are memory-mapped and every tensor whose dtype already is the device's float type
//! is used in place on the CPU backend (no copy: a 3.4 GB UNet loads in the time it takes to map
//! it); other tensors are converted one at a time. Names and shapes are checked against the
//! module before a weight is touched, and every problem is reported with the tensor names
//! involved.

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{AllocationProperty, Bytes, DType, Tensor, TensorData};
use regex::Regex;

mod layout;
pub mod stream;

use crate::sd::source::ModelSource;
use layout::{ParamLister, ParamSetter};
use stream::{HeaderTensor, header_length, not_a_weight_dtype, parse_header};

/// What can go wrong when loading weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// No weights file in the folder.
    #[error("no weights in {dir}: expected {expected}")]
    NotFound {
        /// The folder searched.
        dir: String,
        /// The file names tried.
        expected: String,
    },
    /// The file cannot be read or is not valid safetensors.
    #[error("{path}: {message}")]
    Unreadable {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
    /// The file does not fit the model.
    #[error("{path} does not match the model:{details}")]
    Mismatch {
        /// The file (or index).
        path: String,
        /// Missing, unexpected and mis-shaped tensors, one per line.
        details: String,
    },
}

/// Checkpoint names that differ from the module paths: (regex on the file's names, replacement).
const KEY_REMAPS: &[(&str, &str)] = &[
    // GEGLU feed-forward: `ff.net.0.proj` / `ff.net.2` are stored in a PyTorch Sequential.
    (r"\.ff\.net\.0\.proj\.", ".ff.proj_in."),
    (r"\.ff\.net\.2\.", ".ff.proj_out."),
    // VAE attention in checkpoints written before diffusers 0.14.
    (r"(attentions\.\d+)\.query\.", "$1.to_q."),
    (r"(attentions\.\d+)\.key\.", "$1.to_k."),
    (r"(attentions\.\d+)\.value\.", "$1.to_v."),
    (r"(attentions\.\d+)\.proj_attn\.", "$1.to_out.0."),
];

/// Extra names for CLIP text encoders: transformers ≥ 5 saves `CLIPTextModel` without the
/// `text_model.` prefix.
pub const CLIP_REMAPS: &[(&str, &str)] = &[(
    r"^(embeddings|encoder|final_layer_norm)\.",
    "text_model.$1.",
)];

/// A file's tensor name as the module sees it, after [`KEY_REMAPS`] and `extra`.
fn canonical(name: &str, extra: &[(&str, &str)]) -> String {
    static BUILT_IN: OnceLock<Vec<(Regex, &str)>> = OnceLock::new();
    let built_in = BUILT_IN.get_or_init(|| {
        KEY_REMAPS
            .iter()
            .map(|(from, to)| (Regex::new(from).expect("valid remap pattern"), *to))
            .collect()
    });
    let name = built_in.iter().fold(name.to_string(), |n, (from, to)| {
        from.replace(&n, *to).into_owned()
    });
    extra.iter().fold(name, |n, (from, to)| {
        Regex::new(from)
            .expect("valid remap pattern")
            .replace(&n, *to)
            .into_owned()
    })
}

/// Tensors some checkpoints carry that are not weights.
fn ignorable(name: &str) -> bool {
    name.ends_with("position_ids")
}

/// The weight-bearing component folders of a diffusers pipeline and the file stems each may use,
/// in the order they are tried (diffusers' name, then transformers').
pub const COMPONENTS: [(&str, &[&str]); 3] = [
    ("text_encoder", &["model", "pytorch_model"]),
    ("unet", &["diffusion_pytorch_model", "model"]),
    ("vae", &["diffusion_pytorch_model", "model"]),
];

/// One safetensors file of a component, by its path relative to the model source.
#[derive(Debug, Clone)]
pub struct WeightFile(pub String);

/// The weight files of component `dir` (e.g. `unet`): `<stem>.safetensors`, or the shards listed in
/// `<stem>.safetensors.index.json`. `stems` are tried in order (e.g. diffusers' and transformers').
pub fn weight_files(
    source: &ModelSource,
    dir: &str,
    stems: &[&str],
) -> Result<Vec<WeightFile>, WeightsError> {
    for stem in stems {
        let single = format!("{dir}/{stem}.safetensors");
        if source.exists(&single) {
            return Ok(vec![WeightFile(single)]);
        }
        let index = format!("{dir}/{stem}.safetensors.index.json");
        if source.exists(&index) {
            let unreadable = |message: String| WeightsError::Unreadable {
                path: source.display(&index),
                message,
            };
            let text = source
                .read_string(&index)
                .map_err(|e| unreadable(e.message))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| unreadable(format!("invalid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| unreadable("no `weight_map` object".into()))?;
            let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            if shards.is_empty() {
                return Err(unreadable("`weight_map` lists no files".into()));
            }
            return Ok(shards
                .into_iter()
                .map(|s| WeightFile(format!("{dir}/{s}")))
                .collect());
        }
    }
    Err(WeightsError::NotFound {
        dir: source.display(dir),
        expected: stems
            .iter()
            .map(|s| format!("{s}.safetensors or {s}.safetensors.index.json"))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

fn list(title: &str, names: &[String], details: &mut String) {
    if names.is_empty() {
        return;
    }
    const SHOWN: usize = 50;
    details.push_str(&format!("\n  {} {title}:", names.len()));
    for n in names.iter().take(SHOWN) {
        details.push_str(&format!("\n    {n}"));
    }
    if names.len() > SHOWN {
        details.push_str(&format!("\n    … and {} more", names.len() - SHOWN));
    }
}

/// A whole weight file: memory-mapped when it is on disk (native builds), else its bytes.
fn file_bytes(source: &ModelSource, rel: &str) -> Result<bytes::Bytes, WeightsError> {
    let unreadable = |message: String| WeightsError::Unreadable {
        path: source.display(rel),
        message,
    };
    #[cfg(not(target_arch = "wasm32"))]
    if let Some(path) = source.path(rel) {
        let file = std::fs::File::open(&path).map_err(|e| unreadable(e.to_string()))?;
        let len = file
            .metadata()
            .map_err(|e| unreadable(e.to_string()))?
            .len();
        if len < stream::PREFIX_BYTES {
            return Err(unreadable(format!("not a safetensors file ({len} bytes)")));
        }
        // SAFETY: the map is read-only; like every memory-mapped loader this assumes the file
        // is not truncated or rewritten in place while the model is in use (this project
        // replaces files by renaming, which leaves an existing map intact).
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
            .map_err(|e| unreadable(e.to_string()))?;
        return Ok(bytes::Bytes::from_owner(map));
    }
    source
        .read(rel)
        .map(bytes::Bytes::from)
        .map_err(|e| unreadable(e.message))
}

/// The values of `t` (stored in `file`) as a `[rows, rest]` tensor in the float type `float`.
/// Tensors whose dtype matches are the file's own bytes (no copy); the others are converted into
/// a new buffer.
fn tensor_data(file: &bytes::Bytes, t: &HeaderTensor, float: DType) -> TensorData {
    let rows = t.shape.first().copied().unwrap_or(1);
    let cols = t.shape.iter().skip(1).product::<usize>();
    let raw = file.slice(t.start as usize..t.end as usize);
    let aligned = (raw.as_ptr() as usize).is_multiple_of(t.dtype.size());
    if t.dtype == float && aligned {
        let bytes = Bytes::from_shared(raw, AllocationProperty::File);
        return TensorData::from_bytes(bytes, [rows, cols], float);
    }
    let values = match t.dtype {
        DType::F32 if aligned => bytemuck::cast_slice::<u8, f32>(&raw).to_vec(),
        DType::F16 => crate::sd::convert::floats(safetensors::Dtype::F16, &raw).expect("float"),
        DType::BF16 => crate::sd::convert::floats(safetensors::Dtype::BF16, &raw).expect("float"),
        _ => crate::sd::convert::floats(safetensors::Dtype::F32, &raw).expect("float"),
    };
    TensorData::new(values, [rows, cols]).convert_dtype(float)
}

/// The `[cols, rows]` transpose of a `[rows, cols]` tensor, any element type.
fn transposed(data: TensorData) -> TensorData {
    let [rows, cols] = [data.shape[0], data.shape[1]];
    let size = data.dtype.size();
    let bytes = data.as_bytes();
    let mut out = vec![0u8; bytes.len()];
    for (r, row) in bytes.chunks_exact(cols * size).enumerate() {
        for (c, value) in row.chunks_exact(size).enumerate() {
            out[(c * rows + r) * size..][..size].copy_from_slice(value);
        }
    }
    TensorData::from_bytes_vec(out, [cols, rows], data.dtype)
}

/// Load `files` into `module`. Every parameter must be found exactly once with the right shape,
/// and every tensor in the files must be used. `extra` adds name remappings (regex, replacement).
/// Floats are converted to `device`'s default float type.
pub fn load<B: Backend, M: Module<B>>(
    module: &mut M,
    source: &ModelSource,
    files: &[WeightFile],
    extra: &[(&str, &str)],
    device: &B::Device,
) -> Result<(), WeightsError> {
    // Asked of the device, not the module: reading a lazy parameter's device would first fill it
    // with the random values it is about to lose.
    let float: DType = burn::tensor::get_device_settings::<B>(device)
        .float_dtype
        .into();
    let mut lister = ParamLister::default();
    module.visit(&mut lister);
    let expected = lister.by_name;
    let mut seen = BTreeSet::new();
    let (mut unexpected, mut bad) = (Vec::new(), Vec::new());
    let mut tensors = HashMap::new();
    for WeightFile(rel) in files {
        let name = source.display(rel);
        let bytes = file_bytes(source, rel)?;
        let json_len = header_length(&name, &bytes)?;
        let json = bytes
            .get(stream::PREFIX_BYTES as usize..(stream::PREFIX_BYTES + json_len) as usize)
            .ok_or_else(|| WeightsError::Unreadable {
                path: name.clone(),
                message: format!("truncated: the header needs {json_len} bytes"),
            })?;
        for t in parse_header(&name, json, Some(bytes.len() as u64))? {
            let key = canonical(&t.name, extra);
            let Some(exp) = expected.get(&key) else {
                if !ignorable(&key) {
                    unexpected.push(t.name);
                }
                continue;
            };
            if !seen.insert(key) {
                bad.push(format!("{}: stored twice", t.name));
            } else if let Some(message) = not_a_weight_dtype(t.dtype) {
                bad.push(format!("{}: {message}", t.name));
            } else if t.shape != exp.file_shape {
                bad.push(format!(
                    "{}: expected shape {:?}, file has {:?}",
                    t.name, exp.file_shape, t.shape
                ));
            } else if bad.is_empty() && unexpected.is_empty() {
                let data = tensor_data(&bytes, &t, float);
                // PyTorch stores Linear weights `[out, in]`, burn holds `[in, out]`. On the CPU
                // backend a transposed view, so it keeps using the file's bytes (its products
                // read either layout at the same speed, `kernels::linear`). Elsewhere the
                // transpose is made on the host: on native wgpu (fused, autotuned matmul) the
                // strided view gave wrong products (latents 3.0 apart from the CPU's).
                let tensor = match exp.transpose {
                    true if crate::sd::kernels::is_flex::<B>() => {
                        Tensor::<B, 2>::from_data(data, device).transpose()
                    }
                    true => Tensor::from_data(transposed(data), device),
                    false => Tensor::from_data(data, device),
                };
                tensors.insert(exp.path.clone(), tensor);
            }
        }
    }
    let missing: Vec<String> = expected
        .keys()
        .filter(|k| !seen.contains(*k))
        .cloned()
        .collect();
    if missing.is_empty() && unexpected.is_empty() && bad.is_empty() {
        *module = module.clone().map(&mut ParamSetter::new(tensors));
        return Ok(());
    }
    let mut details = String::new();
    list("tensors missing from the file", &missing, &mut details);
    list("unexpected tensors in the file", &unexpected, &mut details);
    list("tensors of the wrong shape or type", &bad, &mut details);
    Err(WeightsError::Mismatch {
        path: files
            .first()
            .map(|f| source.display(&f.0))
            .unwrap_or_default(),
        details,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{TB, device, parity_folder};

    fn header(dtype: DType, shape: Vec<usize>, start: u64) -> HeaderTensor {
        let n: usize = shape.iter().product();
        HeaderTensor {
            name: "w".into(),
            dtype,
            shape,
            start,
            end: start + (n * dtype.size()) as u64,
        }
    }

    #[test]
    fn transposed_swaps_rows_and_columns_of_any_element_size() {
        let t = transposed(TensorData::new(vec![1.0f32, 2., 3., 4., 5., 6.], [2, 3]));
        assert_eq!(t.shape, burn::tensor::Shape::new([3, 2]));
        assert_eq!(t.to_vec::<f32>().unwrap(), [1., 4., 2., 5., 3., 6.]);
        let halves = [1.0f32, 2., 3., 4., 5., 6.].map(half::f16::from_f32);
        let t = transposed(TensorData::new(halves.to_vec(), [3, 2]));
        assert_eq!(t.shape, burn::tensor::Shape::new([2, 3]));
        let want = [1.0f32, 3., 5., 2., 4., 6.].map(half::f16::from_f32);
        assert_eq!(t.to_vec::<half::f16>().unwrap(), want);
    }

    #[test]
    fn tensor_bytes_are_shared_or_converted() {
        let values: Vec<f32> = (0..6).map(|v| v as f32 * 0.5).collect();
        // One spare byte first, so the same values are seen aligned and misaligned.
        let mut file = vec![0u8; 4];
        file.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        file.push(0);
        file.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        let halves: Vec<u8> = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let half_start = file.len() as u64;
        file.extend(&halves);
        let file = bytes::Bytes::from(file);
        let aligned = header(DType::F32, vec![2, 3], 4);
        let misaligned = header(DType::F32, vec![2, 3], 4 + 24 + 1);
        let f16 = header(DType::F16, vec![2, 3], half_start);
        let base = file.as_ptr() as usize;
        // The aligned test needs the buffer itself 4-aligned, which the allocator gives.
        assert_eq!(base % 4, 0);
        for t in [&aligned, &misaligned, &f16] {
            let data = tensor_data(&file, t, DType::F32);
            assert_eq!(data.shape.as_slice(), &[2, 3]);
            assert_eq!(data.to_vec::<f32>().unwrap(), values);
            let data = tensor_data(&file, t, DType::F16);
            assert_eq!(data.dtype, DType::F16);
        }
        // The aligned f32 tensor is the file's memory, not a copy.
        let shared = tensor_data(&file, &aligned, DType::F32);
        assert_eq!(shared.bytes.as_ptr() as usize, base + 4);
    }

    #[test]
    fn a_loaded_unet_equals_its_file_and_mismatches_name_the_tensors() {
        let source = parity_folder("conv-f32", "weights-load");
        let (_, unet) = crate::sd::pipeline::load_unet::<TB>(&source, "unet", &device()).unwrap();
        // Spot-check a Linear weight (stored [out, in], held [in, out]) against the file.
        let path = source
            .path("unet/diffusion_pytorch_model.safetensors")
            .unwrap();
        let file = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        let (name, view) = st
            .tensors()
            .into_iter()
            .find(|(n, v)| n.ends_with("to_q.weight") && v.shape().len() == 2)
            .unwrap();
        let stored = crate::sd::convert::floats(view.dtype(), view.data()).unwrap();
        let [out, inp] = [view.shape()[0], view.shape()[1]];
        let mut found = None;
        unet.visit(&mut FindParam {
            path: vec![],
            want: name.to_string(),
            found: &mut found,
        });
        let held = found.expect("parameter exists");
        assert_eq!(held.len(), out * inp);
        for (o, i) in [(0, 0), (out - 1, 0), (0, inp - 1), (out / 2, inp / 3)] {
            assert_eq!(held[i * out + o], stored[o * inp + i], "{name}[{o},{i}]");
        }
        // A file of another model: every problem named, nothing loaded.
        let other = parity_folder("conv-f32", "weights-other");
        let vae_file = other
            .path("vae/diffusion_pytorch_model.safetensors")
            .unwrap();
        std::fs::copy(&vae_file, &path).unwrap();
        let err = crate::sd::pipeline::load_unet::<TB>(&source, "unet", &device())
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing from the file"), "{err}");
        assert!(err.contains("unexpected tensors"), "{err}");
    }

    /// Reads one float parameter's values by module path.
    struct FindParam<'a> {
        path: Vec<String>,
        want: String,
        found: &'a mut Option<Vec<f32>>,
    }

    impl<B: Backend> burn::module::ModuleVisitor<B> for FindParam<'_> {
        fn enter_module(&mut self, name: &str, container: &str) {
            if !container.starts_with("Enum:") {
                self.path.push(name.to_string());
            }
        }
        fn exit_module(&mut self, _name: &str, container: &str) {
            if !container.starts_with("Enum:") {
                self.path.pop();
            }
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            if self.path.join(".") == self.want {
                *self.found = Some(param.val().into_data().convert::<f32>().to_vec().unwrap());
            }
        }
    }
}
