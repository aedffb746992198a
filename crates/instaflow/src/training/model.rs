//! The model a training run fits: a pixel-space text-to-image InstaFlow (CLIP text encoder +
//! velocity UNet), its architecture presets, and import/export in the diffusers layout.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use serde_json::{Value, json};

use crate::flow::velocity::VelocityField;
use crate::sd::models::{
    ClipTextConfig, ClipTextModel, UNet2DConditionConfig, UNet2DConditionModel,
};
use crate::sd::pipeline::{LoadError, load_text_encoder, load_unet, read_config};
use crate::sd::source::ModelSource;
use crate::sd::tokenizer::MAX_LENGTH;
use crate::training::data::write_atomic;
use burn_store::{
    BurnToPyTorchAdapter, HalfPrecisionAdapter, ModuleAdapter, ModuleSnapshot, SafetensorsStore,
};

/// The trainable part of a pixel-space InstaFlow model: text encoder and velocity UNet, trained
/// together (no pretrained CLIP weights can be had offline).
#[derive(Module, Debug)]
pub struct TextToImage<B: Backend> {
    /// CLIP text encoder.
    pub text_encoder: ClipTextModel<B>,
    /// Velocity UNet.
    pub unet: UNet2DConditionModel<B>,
}

impl<B: Backend> VelocityField<B, 4> for TextToImage<B> {
    /// Token ids `[B, 77]`.
    type Cond = Tensor<B, 2, Int>;

    fn velocity(&self, x: Tensor<B, 4>, t: Tensor<B, 1>, ids: &Tensor<B, 2, Int>) -> Tensor<B, 4> {
        let text = self.text_encoder.forward(ids.clone());
        self.unet.velocity(x, t, &text)
    }
}

/// Architecture of a [`TextToImage`]: the diffusers `config.json` of each part.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// `unet/config.json`.
    pub unet: Value,
    /// `text_encoder/config.json`.
    pub text_encoder: Value,
}

/// Named sizes for new models.
pub const PRESETS: [&str; 3] = ["tiny", "small", "base"];

impl ModelSpec {
    /// A new SD-1.5-style architecture for `channels`×`size`² images (pixel space): `tiny` for tests,
    /// `small` and `base` for real runs.
    pub fn preset(name: &str, channels: usize, size: usize) -> Result<Self, String> {
        // (block widths, layers per block, levels with cross-attention, text width, text layers, heads)
        let (blocks, layers, attn_levels, text_width, text_layers, heads): (
            &[usize],
            usize,
            usize,
            usize,
            usize,
            usize,
        ) = match name {
            "tiny" => (&[16, 32], 1, 1, 32, 1, 2),
            "small" => (&[32, 64, 64], 1, 1, 64, 2, 4),
            "base" => (&[64, 128, 128], 2, 2, 128, 3, 4),
            _ => return Err(format!("unknown model size {name:?} (one of {PRESETS:?})")),
        };
        let levels = blocks.len();
        if !size.is_multiple_of(1 << (levels - 1)) {
            return Err(format!(
                "image size {size} must be a multiple of {}",
                1 << (levels - 1)
            ));
        }
        // Cross-attention only at the coarsest levels (and in the mid block): on CPUs the
        // attention layers at full resolution cost more than everything else together.
        let plain = levels - attn_levels;
        let mut down = vec!["DownBlock2D"; plain];
        down.extend(std::iter::repeat_n("CrossAttnDownBlock2D", attn_levels));
        let mut up: Vec<&str> = std::iter::repeat_n("CrossAttnUpBlock2D", attn_levels).collect();
        up.extend(std::iter::repeat_n("UpBlock2D", plain));
        let unet = json!({
            "_class_name": "UNet2DConditionModel",
            "sample_size": size,
            "in_channels": channels,
            "out_channels": channels,
            "down_block_types": down,
            "up_block_types": up,
            "block_out_channels": blocks,
            "layers_per_block": layers,
            "cross_attention_dim": text_width,
            "attention_head_dim": heads,
            "norm_num_groups": 8,
            "use_linear_projection": true,
        });
        let text_encoder = json!({
            "architectures": ["CLIPTextModel"],
            "vocab_size": 49408,
            "hidden_size": text_width,
            "intermediate_size": 4 * text_width,
            "num_hidden_layers": text_layers,
            "num_attention_heads": heads,
            "max_position_embeddings": MAX_LENGTH,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "eos_token_id": 49407,
            "bos_token_id": 49406,
            "pad_token_id": 49407,
        });
        Ok(Self { unet, text_encoder })
    }

    /// The same architecture with the pooled prompt added to the UNet's time embedding
    /// (`addition_embed_type: "text"`, pooling with as many heads as the cross-attention).
    pub fn with_pooled_text(mut self) -> Self {
        let heads = self.unet["attention_head_dim"].clone();
        if let Some(unet) = self.unet.as_object_mut() {
            unet.insert("addition_embed_type".into(), json!("text"));
            unet.insert("addition_embed_type_num_heads".into(), heads);
        }
        self
    }

    /// Read the configs of a model folder.
    pub fn from_source(source: &ModelSource) -> Result<Self, LoadError> {
        Ok(Self {
            unet: read_config(source, "unet")?,
            text_encoder: read_config(source, "text_encoder")?,
        })
    }

    /// The UNet config.
    pub fn unet_config(&self) -> Result<UNet2DConditionConfig, String> {
        serde_json::from_value(self.unet.clone()).map_err(|e| format!("unet config: {e}"))
    }

    /// A freshly initialised model. Its weights are drawn here, in parameter order, from the
    /// backend's seeded generator: burn initialises parameters lazily, at their first use, so
    /// copies made before that (one per training device) would each draw their own.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<TextToImage<B>, String> {
        let text: ClipTextConfig = serde_json::from_value(self.text_encoder.clone())
            .map_err(|e| format!("text encoder config: {e}"))?;
        let model = TextToImage {
            text_encoder: text.init(device).map_err(|e| e.to_string())?,
            unet: self
                .unet_config()?
                .init(device)
                .map_err(|e| e.to_string())?,
        };
        model.visit(&mut Materialize);
        Ok(model)
    }

    /// Image shape `[C, H, W]` the model generates.
    pub fn image_shape(&self) -> Result<[usize; 3], String> {
        let cfg = self.unet_config()?;
        let (h, w) = cfg.latent_size();
        Ok([cfg.in_channels, h, w])
    }
}

/// Load the text encoder and UNet of a model folder for training or as a teacher.
pub fn load_model<B: Backend>(
    source: &ModelSource,
    device: &B::Device,
) -> Result<(ModelSpec, TextToImage<B>), LoadError> {
    let spec = ModelSpec::from_source(source)?;
    let text_encoder = load_text_encoder(source, "text_encoder", device)?;
    let (_, unet) = load_unet(source, "unet", device)?;
    Ok((spec, TextToImage { text_encoder, unet }))
}

/// Inverse of the loader's name remaps: module paths → diffusers names.
pub(crate) const SAVE_REMAPS: &[(&str, &str)] = &[
    (r"\.ff\.proj_in\.", ".ff.net.0.proj."),
    (r"\.ff\.proj_out\.", ".ff.net.2."),
];

pub(crate) fn save_safetensors<B: Backend, M: ModuleSnapshot<B>>(
    module: &M,
    path: &Path,
    half: bool,
) -> Result<(), String> {
    // Written beside the target and renamed over it: an interrupted export never leaves a
    // half-written weights file where the last good one was.
    let tmp = path.with_extension("tmp.safetensors");
    let store = SafetensorsStore::from_file(&tmp)
        .overwrite(true)
        .skip_enum_variants(true);
    let store = if half {
        store.with_to_adapter(BurnToPyTorchAdapter.chain(HalfPrecisionAdapter::new()))
    } else {
        store.with_to_adapter(BurnToPyTorchAdapter)
    };
    let mut store = SAVE_REMAPS
        .iter()
        .fold(store, |s, (from, to)| s.with_key_remapping(*from, *to));
    let saved = module
        .save_into(&mut store)
        .map_err(|e| e.to_string())
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    saved.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("writing {}: {e}", path.display())
    })
}

/// How [`save_model`] writes a run's model.
#[derive(Debug, Clone, Copy)]
pub struct Export<'a> {
    /// The folder the run started from (for a model from scratch, any source of the tokenizer):
    /// `tokenizer/` is copied from it, and when it has a `vae/` (a latent-space model: SD or
    /// InstaFlow) so are `vae/` and `scheduler/`, unchanged — the frozen parts of the recipe.
    pub base: &'a ModelSource,
    /// Store the trained weights in f16.
    pub half: bool,
    /// The text encoder was frozen: its files are copied from `base` byte for byte instead of
    /// being written again.
    pub text_encoder_frozen: bool,
}

/// The scheduler a latent-space export names when the base folder has none: SD-1.5's settings
/// (InstaFlow's sampler ignores them; diffusers' pipelines need a scheduler to load).
fn default_scheduler() -> Value {
    json!({
        "_class_name": "DPMSolverMultistepScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "steps_offset": 1,
    })
}

/// Copy `rel` from `base` into `dir` (atomically), unless an earlier export of this run already
/// put a file of the same size there.
fn copy_file(base: &ModelSource, rel: &str, dir: &Path) -> Result<(), String> {
    let to = dir.join(rel);
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    match base.path(rel) {
        Some(from) => {
            let same = |a: &Path, b: &Path| match (std::fs::metadata(a), std::fs::metadata(b)) {
                (Ok(a), Ok(b)) => a.len() == b.len(),
                _ => false,
            };
            if same(&from, &to) {
                return Ok(());
            }
            let tmp = to.with_extension("copying");
            std::fs::copy(&from, &tmp)
                .and_then(|_| std::fs::rename(&tmp, &to))
                .map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    format!("copying {} to {}: {e}", from.display(), to.display())
                })
        }
        None => {
            let bytes = base.read(rel).map_err(|e| e.to_string())?;
            write_atomic(&to, &bytes).map_err(|e| e.to_string())
        }
    }
}

/// Copy component `name` (config, weights, shard index) from `base` into `dir`.
fn copy_component(base: &ModelSource, name: &str, dir: &Path) -> Result<(), String> {
    let stems = crate::sd::weights::COMPONENTS
        .iter()
        .find(|(c, _)| *c == name)
        .map_or(&[][..], |(_, stems)| *stems);
    copy_file(base, &format!("{name}/config.json"), dir)?;
    for stem in stems {
        let index = format!("{name}/{stem}.safetensors.index.json");
        if base.exists(&index) {
            copy_file(base, &index, dir)?;
        }
    }
    let files = crate::sd::weights::weight_files(base, name, stems).map_err(|e| e.to_string())?;
    for file in files {
        copy_file(base, &file.0, dir)?;
    }
    Ok(())
}

/// Write `model` as a diffusers folder: `model_index.json`, `unet/` (velocity), `text_encoder/`,
/// `tokenizer/`, and — when `export.base` has a VAE — `vae/` and `scheduler/` too: a complete
/// pipeline for `generate`, the npm package and diffusers' InstaFlow pipeline. Without a VAE it
/// is a pixel-space model the pipeline decodes by rescaling.
pub fn save_model<B: Backend>(
    model: &TextToImage<B>,
    spec: &ModelSpec,
    dir: &Path,
    export: Export<'_>,
) -> Result<(), String> {
    let Export {
        base,
        half,
        text_encoder_frozen,
    } = export;
    let mkdir = |d: &Path| std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()));
    let write = |p: PathBuf, bytes: &[u8]| write_atomic(&p, bytes).map_err(|e| e.to_string());
    for sub in ["unet", "text_encoder", "tokenizer"] {
        mkdir(&dir.join(sub))?;
    }
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("json");
    write(dir.join("unet/config.json"), &pretty(&spec.unet))?;
    let tokenizer_files = ["vocab.json", "merges.txt"];
    for file in ["special_tokens_map.json", "tokenizer_config.json"]
        .iter()
        .filter(|f| base.exists(&format!("tokenizer/{f}")))
        .chain(&tokenizer_files)
    {
        copy_file(base, &format!("tokenizer/{file}"), dir)?;
    }
    let latent = base.has_dir("vae");
    let mut index = json!({
        "_class_name": "RectifiedFlowPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    });
    if latent {
        copy_component(base, "vae", dir)?;
        let scheduler = "scheduler/scheduler_config.json";
        let config = match base.exists(scheduler) {
            true => serde_json::from_slice(&base.read(scheduler).map_err(|e| e.to_string())?)
                .map_err(|e| format!("{}: {e}", base.display(scheduler)))?,
            false => default_scheduler(),
        };
        mkdir(&dir.join("scheduler"))?;
        write(dir.join(scheduler), &pretty(&config))?;
        let class = config["_class_name"]
            .as_str()
            .unwrap_or("DPMSolverMultistepScheduler");
        let extra = json!({
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", class],
            "safety_checker": [null, null],
            "feature_extractor": [null, null],
            "requires_safety_checker": false,
        });
        if let (Some(index), Some(extra)) = (index.as_object_mut(), extra.as_object()) {
            index.extend(extra.clone());
        }
    }
    write(dir.join("model_index.json"), &pretty(&index))?;
    save_safetensors(
        &model.unet,
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        half,
    )?;
    if text_encoder_frozen && base.has_dir("text_encoder") {
        return copy_component(base, "text_encoder", dir);
    }
    write(
        dir.join("text_encoder/config.json"),
        &pretty(&spec.text_encoder),
    )?;
    save_safetensors(
        &model.text_encoder,
        &dir.join("text_encoder/model.safetensors"),
        half,
    )
}

/// Draws every lazily initialised parameter now.
struct Materialize;

impl<B: Backend> ModuleVisitor<B> for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        param.val();
    }
}
