//! Loading diffusers/transformers safetensors weights (f32, f16 or bf16; one file or shards with
//! an index) into the models of [`crate::models`].
//!
//! burn-store reads tensors lazily from a memory map and converts them one at a time, so a 3.4 GB
//! UNet is never held twice. Every problem is reported with the tensor names involved.

use std::collections::BTreeSet;
use std::rc::Rc;

use burn::tensor::DType;

pub mod stream;

use crate::source::ModelSource;
use burn::tensor::backend::Backend;
use burn_store::{
    ApplyError, ChainAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter,
    SafetensorsStore, TensorSnapshot,
};

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

/// Converts float tensors to the float type the device computes in (f32 unless the device's
/// default was set to f16) as they are read.
#[derive(Debug, Clone)]
struct ToFloat(DType);

impl ModuleAdapter for ToFloat {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let target = self.0;
        if !snapshot.dtype.is_float() || snapshot.dtype == target {
            return snapshot.clone();
        }
        let data = snapshot.clone_data_fn();
        TensorSnapshot::from_closure(
            Rc::new(move || Ok(data()?.convert_dtype(target))),
            target,
            snapshot.shape.clone(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
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

/// A file's tensor name as the module sees it, after [`KEY_REMAPS`].
fn canonical(name: &str, extra: &[(&str, &str)]) -> String {
    KEY_REMAPS
        .iter()
        .chain(extra)
        .fold(name.to_string(), |n, (from, to)| {
            regex::Regex::new(from)
                .expect("valid remap pattern")
                .replace(&n, *to)
                .into_owned()
        })
}

/// burn-store reports norm tensors loaded under burn's names (`gamma`/`beta`) as unused under
/// PyTorch's (`weight`/`bias`); they are not unexpected if the burn name was applied.
fn loaded_as_norm(name: &str, applied: &BTreeSet<String>, extra: &[(&str, &str)]) -> bool {
    let n = canonical(name, extra);
    [(".weight", ".gamma"), (".bias", ".beta")]
        .iter()
        .any(|(pt, burn)| {
            n.strip_suffix(pt)
                .is_some_and(|stem| applied.contains(&format!("{stem}{burn}")))
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

/// Load `files` into `module`. Every parameter must be found exactly once with the right shape,
/// and every tensor in the files must be used. `extra` adds name remappings (regex, replacement).
/// Floats are converted to `device`'s default float type.
pub fn load<B: Backend, M: ModuleSnapshot<B>>(
    module: &mut M,
    source: &ModelSource,
    files: &[WeightFile],
    extra: &[(&str, &str)],
    device: &B::Device,
) -> Result<(), WeightsError> {
    let mut applied = BTreeSet::new();
    let mut missing = None::<BTreeSet<String>>;
    let mut unexpected = Vec::new();
    let mut bad = Vec::new();
    // Asked of the device, not the module: reading a lazy parameter's device would first fill it
    // with the random values it is about to lose (41% of an SD-1.5 folder's load time).
    let float: DType = burn::tensor::get_device_settings::<B>(device)
        .float_dtype
        .into();
    for WeightFile(rel) in files {
        let unreadable = |message: String| WeightsError::Unreadable {
            path: source.display(rel),
            message,
        };
        // Files on disk are memory-mapped and read tensor by tensor; in-memory files are parsed in place.
        let store = match source.path(rel) {
            Some(path) if path.is_file() => SafetensorsStore::from_file(path),
            Some(_) => return Err(unreadable("not found".into())),
            None => SafetensorsStore::from_bytes(Some(
                source.read(rel).map_err(|e| unreadable(e.message))?,
            )),
        };
        let mut store = store
            .with_from_adapter(ChainAdapter::new(PyTorchToBurnAdapter, ToFloat(float)))
            .skip_enum_variants(true)
            .allow_partial(true)
            .validate(false);
        for (from, to) in KEY_REMAPS.iter().chain(extra) {
            store = store.with_key_remapping(*from, *to);
        }
        let result = module
            .load_from(&mut store)
            .map_err(|e| unreadable(describe_store_error(&e.to_string())))?;
        applied.extend(result.applied.iter().cloned());
        let now_missing: BTreeSet<String> = result.missing.iter().map(|(p, _)| p.clone()).collect();
        missing = Some(match missing {
            None => now_missing,
            Some(m) => m.intersection(&now_missing).cloned().collect(),
        });
        unexpected.extend(result.unused.iter().cloned());
        for e in &result.errors {
            bad.push(match e {
                ApplyError::ShapeMismatch {
                    path,
                    expected,
                    found,
                } => {
                    format!(
                        "{path}: expected shape {:?}, file has {:?}",
                        expected.as_slice(),
                        found.as_slice()
                    )
                }
                ApplyError::DTypeMismatch {
                    path,
                    expected,
                    found,
                } => {
                    format!("{path}: expected {expected:?}, file has {found:?}")
                }
                other => other.to_string(),
            });
        }
    }
    let missing: Vec<String> = missing
        .unwrap_or_default()
        .into_iter()
        .filter(|m| !applied.contains(m))
        .collect();
    unexpected.retain(|n| !ignorable(n) && !loaded_as_norm(n, &applied, extra));
    if missing.is_empty() && unexpected.is_empty() && bad.is_empty() {
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

fn describe_store_error(message: &str) -> String {
    if message.contains("HeaderTooLarge")
        || message.contains("InvalidHeader")
        || message.contains("MetadataIncompleteBuffer")
    {
        format!("not a valid safetensors file (truncated or corrupt): {message}")
    } else {
        message.to_string()
    }
}
