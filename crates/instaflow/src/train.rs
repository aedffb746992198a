//! Training a text-to-image rectified flow on the SD-1.5 architecture: 1-RF from caption–image
//! data, k-RF on reflow pairs, and one-step distillation — with AdamW, EMA weights, caption
//! dropout (for guidance) and checkpoints that resume bit for bit.
//!
//! Every random choice of step `s` (batch, captions, dropout, noise, times) comes from a generator
//! seeded by `(seed, s)`, so a resumed run draws exactly what an uninterrupted run would have.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::data::{DataError, ImageTextDataset, write_atomic};
#[cfg(not(target_arch = "wasm32"))]
use crate::data_parallel::Replica;
use crate::losses::{TimeSampler, distillation_loss, rectified_flow_loss};
use crate::models::{ClipTextConfig, ClipTextModel, UNet2DConditionConfig, UNet2DConditionModel};
use crate::noise;
use crate::pipeline::{LoadError, load_text_encoder, load_unet, read_config};
use crate::precision::{HalfPrecision, LossScaler, Precision, unscale_gradients};
use crate::reflow::PairSet;
use crate::source::ModelSource;
use crate::tokenizer::{ClipTokenizer, MAX_LENGTH};
use crate::velocity::VelocityField;
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

/// Write `model` as a diffusers folder (`model_index.json`, `unet/`, `text_encoder/`, `tokenizer/`)
/// without a VAE: a pixel-space model the pipeline decodes by rescaling. `half` stores f16.
pub fn save_model<B: Backend>(
    model: &TextToImage<B>,
    spec: &ModelSpec,
    tokenizer: &ModelSource,
    dir: &Path,
    half: bool,
) -> Result<(), String> {
    let mkdir = |d: &Path| std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()));
    let write = |p: PathBuf, bytes: &[u8]| write_atomic(&p, bytes).map_err(|e| e.to_string());
    for sub in ["unet", "text_encoder", "tokenizer"] {
        mkdir(&dir.join(sub))?;
    }
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("json");
    write(dir.join("unet/config.json"), &pretty(&spec.unet))?;
    write(
        dir.join("text_encoder/config.json"),
        &pretty(&spec.text_encoder),
    )?;
    for file in ["vocab.json", "merges.txt"] {
        let bytes = tokenizer
            .read(&format!("tokenizer/{file}"))
            .map_err(|e| e.to_string())?;
        write(dir.join("tokenizer").join(file), &bytes)?;
    }
    let index = json!({
        "_class_name": "RectifiedFlowPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    });
    write(dir.join("model_index.json"), &pretty(&index))?;
    save_safetensors(
        &model.unet,
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        half,
    )?;
    save_safetensors(
        &model.text_encoder,
        &dir.join("text_encoder/model.safetensors"),
        half,
    )
}

/// What a training run fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Rectified flow on independent (noise, image) draws: 1-RF.
    Flow,
    /// Rectified flow on (noise, ODE result) pairs: k-RF.
    Reflow,
    /// One-step distillation on pairs: `‖X0 + v(X0, 0) − X1‖²`.
    Distill,
}

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Total optimisation steps.
    pub steps: usize,
    /// Batch size.
    pub batch: usize,
    /// Peak AdamW learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Gradient-norm clipping.
    pub grad_clip: f64,
    /// EMA decay (warmed up as `min(decay, (1 + s)/(10 + s))`).
    pub ema_decay: f64,
    /// Probability of training on the empty caption (classifier-free guidance needs it).
    pub caption_dropout: f64,
    /// Seed of every random choice.
    pub seed: u64,
    /// The float type of forward and backward passes (the weights stay f32).
    #[serde(default)]
    pub precision: Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch: 32,
            lr: 1e-3,
            warmup: 100,
            weight_decay: 1e-2,
            grad_clip: 1.0,
            ema_decay: 0.999,
            caption_dropout: 0.1,
            seed: 0,
            precision: Precision::F32,
        }
    }
}

/// What the model learns from.
#[derive(Debug, Clone)]
pub enum TrainData {
    /// Captioned images (1-RF).
    Images(ImageTextDataset),
    /// Reflow pairs (k-RF or distillation).
    Pairs(PairSet),
}

impl TrainData {
    /// Number of examples.
    pub fn len(&self) -> usize {
        match self {
            Self::Images(d) => d.len(),
            Self::Pairs(p) => p.len(),
        }
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shape `[C, H, W]` of one example.
    pub fn shape(&self) -> [usize; 3] {
        match self {
            Self::Images(d) => [d.channels, d.height, d.width],
            Self::Pairs(p) => p.plan.shape,
        }
    }
}

/// Saved progress next to the weights of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    step: usize,
    stage: Stage,
    config: TrainConfig,
    losses: Vec<(usize, f64)>,
    /// The f16 loss scale (absent in f32/bf16 runs and in older checkpoints).
    #[serde(default)]
    loss_scaler: Option<LossScaler>,
}

/// Flattened float parameters by id (for the EMA).
struct Collect<B: Backend>(HashMap<ParamId, Tensor<B, 1>>);

impl<B: Backend> ModuleVisitor<B> for Collect<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        let n = t.shape().num_elements();
        self.0.insert(param.id, t.reshape([n]));
    }
}

/// Draws every lazily initialised parameter now.
struct Materialize;

impl<B: Backend> ModuleVisitor<B> for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        param.val();
    }
}

/// Whether every float parameter is finite (checked before a checkpoint replaces the last one).
struct AllFinite(bool);

impl<B: Backend> ModuleVisitor<B> for AllFinite {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.0 {
            let sum: f64 = param.val().abs().sum().into_scalar().elem();
            self.0 = sum.is_finite();
        }
    }
}

/// The loss of `stage`'s objective: the flow loss at times `t`, or distillation without them.
fn loss_of<B: Backend, V: VelocityField<B, 4>>(
    field: &V,
    x0: Tensor<B, 4>,
    x1: Tensor<B, 4>,
    t: Option<Tensor<B, 1>>,
    cond: &V::Cond,
) -> Tensor<B, 1> {
    match t {
        Some(t) => rectified_flow_loss(field, x0, x1, t, cond),
        None => distillation_loss(field, x0, x1, cond),
    }
}

/// `ema ← decay·ema + (1 − decay)·current`, parameter by parameter.
struct Blend<B: Backend> {
    current: HashMap<ParamId, Tensor<B, 1>>,
    decay: f64,
}

impl<B: Backend> ModuleMapper<B> for Blend<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let tensor = match self.current.remove(&id) {
            Some(cur) => {
                let shape = tensor.shape();
                tensor * self.decay + cur.reshape(shape) * (1.0 - self.decay)
            }
            None => tensor,
        };
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// The checkpoint folder to resume from: `dir`, or its `.old` twin if a save was cut short.
pub fn checkpoint_to_resume(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.with_extension("old")]
        .into_iter()
        .find(|d| d.join("state.json").is_file())
}

type Optim<B> = OptimizerAdaptor<AdamW, TextToImage<B>, B>;
type Rec = NamedMpkFileRecorder<FullPrecisionSettings>;

/// With [`Trainer::skip_non_finite`], this many dropped batches in a row stop the run: the
/// weights themselves have diverged.
pub const MAX_SKIPPED_IN_A_ROW: usize = 10;

/// A training run in progress: model, EMA copy, optimizer state and loss history.
pub struct Trainer<B: AutodiffBackend> {
    /// The model being optimised.
    pub model: TextToImage<B>,
    /// Exponential moving average of the weights (what gets exported).
    pub ema: TextToImage<B::InnerBackend>,
    optim: Optim<B>,
    /// Steps done.
    pub step: usize,
    /// `(step, loss)` of every step.
    pub losses: Vec<(usize, f64)>,
    /// The settings.
    pub config: TrainConfig,
    /// What is being fitted.
    pub stage: Stage,
    /// Drop a batch whose loss is NaN/inf and go on (instead of stopping the run).
    pub skip_non_finite: bool,
    /// Steps whose batch was dropped for a non-finite loss (this run).
    pub skipped: Vec<usize>,
    /// Seconds spent averaging gradients with the other workers (this run).
    pub all_reduce_seconds: f64,
    /// The loss scale of `--precision f16`.
    pub loss_scaler: LossScaler,
    /// Steps not applied because their f16 gradients overflowed (this run).
    pub overflowed: Vec<usize>,
    #[cfg(not(target_arch = "wasm32"))]
    replica: Option<Replica>,
    tokenizer: ClipTokenizer,
    empty_ids: Vec<u32>,
    device: B::Device,
}

fn ckpt_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Invalid {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Start from `model` (fresh, or initialised from a teacher).
    pub fn new(
        model: TextToImage<B>,
        config: TrainConfig,
        stage: Stage,
        tokenizer: ClipTokenizer,
        device: &B::Device,
    ) -> Result<Self, String> {
        let optim = AdamWConfig::new()
            .with_weight_decay(config.weight_decay as f32)
            .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(
                config.grad_clip as f32,
            )))
            .init();
        let empty_ids = tokenizer.encode("").map_err(|e| e.to_string())?;
        Ok(Self {
            ema: model.valid(),
            model,
            optim,
            step: 0,
            losses: Vec::new(),
            skip_non_finite: false,
            skipped: Vec::new(),
            all_reduce_seconds: 0.0,
            loss_scaler: LossScaler::default(),
            overflowed: Vec::new(),
            #[cfg(not(target_arch = "wasm32"))]
            replica: None,
            config,
            stage,
            tokenizer,
            empty_ids,
            device: device.clone(),
        })
    }

    /// The learning rate at step `s` (linear warm-up, then constant).
    pub fn lr(&self, s: usize) -> f64 {
        self.config.lr * ((s + 1) as f64 / self.config.warmup.max(1) as f64).min(1.0)
    }

    /// Make this trainer one worker of a data-parallel group (joined with [`Replica::join`]): it
    /// computes its share of every batch and averages gradients with the others before updating.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn join_group(&mut self, replica: Replica) -> Result<(), String> {
        replica.check_batch(self.config.batch)?;
        self.replica = Some(replica);
        Ok(())
    }

    /// The rows of a batch this trainer computes: all of them, or its share in a group.
    fn rows(&self, batch: usize) -> std::ops::Range<usize> {
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(r) = &self.replica {
            return r.rows(batch);
        }
        0..batch
    }

    /// `value` averaged over the group (itself without one).
    fn mean_over_group(&mut self, value: f64) -> Result<f64, String> {
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(r) = &self.replica {
            let start = web_time::Instant::now();
            let mean = r.mean::<B::InnerBackend>(&[value as f32], &self.device)?[0];
            self.all_reduce_seconds += start.elapsed().as_secs_f64();
            return Ok(mean as f64);
        }
        Ok(value)
    }

    /// `grads` averaged over the group (themselves without one).
    fn mean_gradients_over_group(
        &mut self,
        #[allow(unused_mut)] mut grads: GradientsParams,
    ) -> Result<GradientsParams, String> {
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(replica) = &self.replica {
            self.all_reduce_seconds += replica.mean_gradients(&self.model, &mut grads)?;
        }
        Ok(grads)
    }

    /// Whether any worker of the group says `yes` (itself without one): lets every worker stop
    /// after the same step when one of them is asked to.
    pub fn anyone(&mut self, yes: bool) -> Result<bool, String> {
        Ok(self.mean_over_group(if yes { 1.0 } else { 0.0 })? > 0.0)
    }

    fn ids(&self, captions: &[String]) -> Result<Tensor<B, 2, Int>, String> {
        let mut ids = Vec::with_capacity(captions.len() * MAX_LENGTH);
        for c in captions {
            let row = if c.is_empty() {
                self.empty_ids.clone()
            } else {
                self.tokenizer.encode(c).map_err(|e| e.to_string())?
            };
            ids.extend(row.into_iter().map(i64::from));
        }
        Ok(Tensor::from_data(
            TensorData::new(ids, [captions.len(), MAX_LENGTH]),
            &self.device,
        ))
    }

    /// One optimisation step; returns the loss before the update.
    pub fn train_step(&mut self, data: &TrainData) -> Result<f64, String> {
        if data.is_empty() {
            return Err("no training examples".into());
        }
        let s = self.step;
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(s as u64);
        let b = self.config.batch;
        // The whole batch is drawn on every worker, in the same order, so that the draws depend
        // on (seed, step) only; each worker then computes its own rows of it.
        let idx: Vec<usize> = (0..b).map(|_| rng.random_range(0..data.len())).collect();
        let rows = self.rows(b);
        let mine = &idx[rows.clone()];
        let [c, h, w] = data.shape();
        let (x0, x1, mut captions) = match data {
            TrainData::Images(d) => {
                let captions: Vec<String> = idx
                    .iter()
                    .map(|&i| d.caption(i, &mut rng).to_string())
                    .collect();
                let n = c * h * w;
                let x0 =
                    noise::standard_normal(&mut rng, b * n)[rows.start * n..rows.end * n].to_vec();
                let x0 =
                    Tensor::from_data(TensorData::new(x0, [rows.len(), c, h, w]), &self.device);
                (x0, d.pixels::<B>(mine, &self.device), captions)
            }
            TrainData::Pairs(p) => {
                let (x0, x1) = p.tensors::<B>(mine, &self.device);
                (
                    x0,
                    x1,
                    idx.iter()
                        .map(|&i| p.prompt(i).to_string())
                        .collect::<Vec<_>>(),
                )
            }
        };
        if self.stage != Stage::Distill {
            for cap in captions.iter_mut() {
                if rng.random_bool(self.config.caption_dropout) {
                    cap.clear();
                }
            }
        }
        let ids = self.ids(&captions[rows.clone()])?;
        let t = match self.stage {
            Stage::Distill => None,
            Stage::Flow | Stage::Reflow => {
                let t = TimeSampler::Uniform.sample(&mut rng, b)[rows.clone()].to_vec();
                Some(Tensor::<B, 1>::from_data(
                    TensorData::new(t, [rows.len()]),
                    &self.device,
                ))
            }
        };
        let loss = match self.config.precision.half() {
            None => loss_of(&self.model, x0, x1, t, &ids),
            Some(half) => loss_of(&HalfPrecision::new(&self.model, half), x0, x1, t, &ids),
        };
        // The batch's loss: the mean of the workers' (equal shares), the same on every worker,
        // so that all of them take the same decision below.
        let value = self.mean_over_group(loss.clone().into_scalar().elem())?;
        if !value.is_finite() && self.skip_non_finite {
            // Every step has its own seeded draw, so skipping keeps the schedule of the rest.
            self.skipped.push(s);
            self.step += 1;
            let run = self
                .skipped
                .iter()
                .rev()
                .zip((0..=s).rev())
                .take_while(|(a, b)| *a == b);
            if run.count() >= MAX_SKIPPED_IN_A_ROW {
                return Err(format!(
                    "the loss was {value} for {MAX_SKIPPED_IN_A_ROW} steps in a row (last: step \
                     {s}): the weights have diverged, not one batch (lower --lr, then --resume)"
                ));
            }
            return Ok(value);
        }
        if !value.is_finite() {
            return Err(format!(
                "the loss became {value} at step {s}; nothing of this step was applied and the \
                 last checkpoint is kept (lower --lr, then --resume)"
            ));
        }
        let scaled = self.config.precision == Precision::F16;
        let loss = match scaled {
            true => loss * self.loss_scaler.scale,
            false => loss,
        };
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        let mut grads = self.mean_gradients_over_group(grads)?;
        // Gradients are the same on every worker after the mean, so all take the same decision.
        if scaled {
            let finite = unscale_gradients(&self.model, &mut grads, self.loss_scaler.scale);
            if !self.loss_scaler.update(finite) {
                self.overflowed.push(s);
                self.step += 1;
                self.losses.push((s, value));
                return Ok(value);
            }
        }
        self.model = self.optim.step(self.lr(s), self.model.clone(), grads);
        let decay = self.config.ema_decay.min((1 + s) as f64 / (10 + s) as f64);
        let mut current = Collect(HashMap::new());
        self.model.valid().visit(&mut current);
        self.ema = self.ema.clone().map(&mut Blend {
            current: current.0,
            decay,
        });
        self.step += 1;
        self.losses.push((s, value));
        Ok(value)
    }

    /// Write model, EMA, optimizer state and progress to `dir` (replaced atomically: a crash
    /// leaves either the previous checkpoint or the new one).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<(), DataError> {
        // Weights that diverged never replace the last good checkpoint.
        let mut finite = AllFinite(true);
        self.model.visit(&mut finite);
        self.ema.visit(&mut finite);
        if !finite.0 {
            return Err(ckpt_err(
                dir,
                format!(
                    "the weights are not finite after step {}; {} (lower --lr)",
                    self.step,
                    if dir.exists() {
                        "the previous checkpoint is kept: --resume continues from it"
                    } else {
                        "no checkpoint was written"
                    }
                ),
            ));
        }
        let tmp = dir.with_extension("tmp");
        let old = dir.with_extension("old");
        let write = || -> Result<(), String> {
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
            let rec = Rec::new();
            rec.record(self.model.clone().into_record(), tmp.join("model"))
                .map_err(|e| e.to_string())?;
            rec.record(self.ema.clone().into_record(), tmp.join("ema"))
                .map_err(|e| e.to_string())?;
            rec.record(self.optim.to_record(), tmp.join("optim"))
                .map_err(|e| e.to_string())?;
            let state = State {
                step: self.step,
                stage: self.stage,
                config: self.config.clone(),
                losses: self.losses.clone(),
                loss_scaler: (self.config.precision == Precision::F16)
                    .then(|| self.loss_scaler.clone()),
            };
            std::fs::write(
                tmp.join("state.json"),
                serde_json::to_vec(&state).expect("json"),
            )
            .map_err(|e| e.to_string())
        };
        // A failed write (a full disk, say) leaves the last checkpoint as it was.
        if let Err(e) = write() {
            let _ = std::fs::remove_dir_all(&tmp);
            let kept = if dir.exists() {
                "the previous checkpoint is kept"
            } else {
                "no earlier checkpoint exists"
            };
            return Err(ckpt_err(
                &tmp,
                format!(
                    "writing the step-{} checkpoint failed ({e}); {kept}",
                    self.step
                ),
            ));
        }
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(dir, &old).map_err(|e| ckpt_err(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| ckpt_err(dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Continue from a checkpoint written by [`Trainer::save_checkpoint`]. The stage and settings
    /// must match the run being resumed.
    pub fn resume(&mut self, dir: &Path) -> Result<(), DataError> {
        let state_path = dir.join("state.json");
        let text = std::fs::read(&state_path).map_err(|e| ckpt_err(&state_path, e))?;
        let state: State = serde_json::from_slice(&text).map_err(|e| ckpt_err(&state_path, e))?;
        if state.stage != self.stage {
            return Err(ckpt_err(
                &state_path,
                format!(
                    "checkpoint is a {:?} run, not {:?}",
                    state.stage, self.stage
                ),
            ));
        }
        let rec = Rec::new();
        let model = rec
            .load(dir.join("model"), &self.device)
            .map_err(|e| ckpt_err(dir, e))?;
        let ema = rec
            .load(dir.join("ema"), &self.device)
            .map_err(|e| ckpt_err(dir, e))?;
        let optim = rec
            .load(dir.join("optim"), &self.device)
            .map_err(|e| ckpt_err(dir, e))?;
        self.model = self.model.clone().load_record(model);
        self.ema = self.ema.clone().load_record(ema);
        self.optim = self.optim.clone().load_record(optim);
        self.step = state.step;
        self.losses = state.losses;
        // Only the length and the precision may change on resume.
        let (steps, precision) = (self.config.steps, self.config.precision);
        self.config = TrainConfig {
            steps,
            precision,
            ..state.config
        };
        self.loss_scaler = state.loss_scaler.unwrap_or_default();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::T_NOISE;
    use crate::losses::mse;
    use crate::solvers::euler;
    use crate::test_util::{TB, device, to_vec};
    use crate::velocity::Guided;
    use burn::backend::Autodiff;

    type AD = Autodiff<TB>;

    fn fixture() -> ImageTextDataset {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data/mnist-8");
        ImageTextDataset::load(&dir).expect("committed fixture")
    }

    fn tokenizer() -> ClipTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/clip-tokenizer");
        ClipTokenizer::from_dir(&dir).unwrap()
    }

    fn trainer(stage: Stage, steps: usize, lr: f64) -> Trainer<AD> {
        <TB as Backend>::seed(&device(), 7);
        let spec = ModelSpec::preset("tiny", 1, 8).unwrap();
        let model = spec.init::<AD>(&device()).unwrap();
        let cfg = TrainConfig {
            steps,
            batch: 16,
            lr,
            warmup: 5,
            ema_decay: 0.9,
            ..TrainConfig::default()
        };
        Trainer::new(model, cfg, stage, tokenizer(), &device()).unwrap()
    }

    /// The sum of every parameter tensor, in visiting order.
    fn param_sums<B: Backend>(m: &TextToImage<B>) -> Vec<f32> {
        struct Sums(Vec<f32>);
        impl<B: Backend> ModuleVisitor<B> for Sums {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                self.0.push(to_vec(p.val().sum())[0]);
            }
        }
        let mut s = Sums(Vec::new());
        m.visit(&mut s);
        s.0
    }

    fn mean(v: &[(usize, f64)]) -> f64 {
        v.iter().map(|p| p.1).sum::<f64>() / v.len() as f64
    }

    #[test]
    fn flow_loss_decreases() {
        let data = TrainData::Images(fixture());
        let mut t = trainer(Stage::Flow, 60, 3e-3);
        for _ in 0..60 {
            t.train_step(&data).unwrap();
        }
        let (first, last) = (mean(&t.losses[..10]), mean(&t.losses[50..]));
        assert!(last < 0.7 * first, "loss {first:.3} → {last:.3}");
    }

    #[test]
    fn checkpoint_resumes_bit_for_bit() {
        let dir = std::env::temp_dir().join(format!("instaflow-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data = TrainData::Images(fixture());
        let mut a = trainer(Stage::Flow, 6, 3e-3);
        for _ in 0..3 {
            a.train_step(&data).unwrap();
        }
        a.save_checkpoint(&dir).unwrap();
        let next_a: Vec<f64> = (0..3).map(|_| a.train_step(&data).unwrap()).collect();
        // A fresh process: other initial weights, then the checkpoint.
        let mut b = trainer(Stage::Flow, 6, 3e-3);
        b.train_step(&data).unwrap();
        let from = checkpoint_to_resume(&dir).unwrap();
        b.resume(&from).unwrap();
        assert_eq!(b.step, 3);
        let next_b: Vec<f64> = (0..3).map(|_| b.train_step(&data).unwrap()).collect();
        assert_eq!(next_a, next_b);
        assert_eq!(param_sums(&a.ema), param_sums(&b.ema));
        // A checkpoint of another stage is refused.
        let mut c = trainer(Stage::Distill, 6, 3e-3);
        assert!(c.resume(&from).unwrap_err().to_string().contains("Flow"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn distillation_brings_one_step_closer_to_the_teacher() {
        let data = fixture();
        let mut teacher = trainer(Stage::Flow, 80, 3e-3);
        let images = TrainData::Images(data.clone());
        for _ in 0..80 {
            teacher.train_step(&images).unwrap();
        }
        let teacher_model = teacher.model.valid();
        // Pairs from the teacher's 8-step ODE, written through the reflow module.
        let dir = std::env::temp_dir().join(format!("instaflow-distill-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let plan = crate::reflow::PairPlan {
            prompts: data.all_captions(),
            total: 96,
            seed: 3,
            shape: [1, 8, 8],
            chunk: 48,
            teacher: "test".into(),
            solver: "euler:8".into(),
            guidance: 1.0,
        };
        let tok = tokenizer();
        let dev = device();
        let ids_of = |prompts: &[&str]| {
            let ids: Vec<i64> = prompts
                .iter()
                .flat_map(|p| tok.encode(p).unwrap().into_iter().map(i64::from))
                .collect();
            Tensor::<TB, 2, Int>::from_data(TensorData::new(ids, [prompts.len(), MAX_LENGTH]), &dev)
        };
        let solve = |_: &[usize], prompts: &[&str], noise: Vec<f32>| {
            let z0 =
                Tensor::<TB, 4>::from_data(TensorData::new(noise, [prompts.len(), 1, 8, 8]), &dev);
            let ids = ids_of(prompts);
            let x = euler(
                &Guided::new(&teacher_model, &ids),
                z0,
                T_NOISE,
                1.0,
                8,
                false,
            )
            .x;
            Ok(to_vec(x))
        };
        crate::reflow::generate_shard(&plan, &dir, 0, 1, solve, |_, _| {}).unwrap();
        let pairs = PairSet::load(&dir).unwrap();
        // One-step error of a model on all pairs: ‖X0 + v(X0, 0) − X1‖².
        let one_step_error = |m: &TextToImage<TB>| {
            let rows: Vec<usize> = (0..pairs.len()).collect();
            let (x0, x1) = pairs.tensors::<TB>(&rows, &dev);
            let prompts: Vec<&str> = rows.iter().map(|&r| pairs.prompt(r)).collect();
            let one = euler(
                &Guided::new(m, &ids_of(&prompts)),
                x0,
                T_NOISE,
                1.0,
                1,
                false,
            )
            .x;
            to_vec(mse(one, x1))[0]
        };
        let before = one_step_error(&teacher_model);
        let mut student = Trainer::new(
            teacher.model.clone(),
            TrainConfig {
                steps: 60,
                ..teacher.config.clone()
            },
            Stage::Distill,
            tok.clone(),
            &dev,
        )
        .unwrap();
        let pair_data = TrainData::Pairs(pairs.clone());
        for _ in 0..60 {
            student.train_step(&pair_data).unwrap();
        }
        let after = one_step_error(&student.model.valid());
        assert!(
            after < 0.7 * before,
            "one-step error vs teacher ODE: {before:.4} → {after:.4}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exported_model_loads_in_the_pipeline_with_the_same_velocity() {
        let dir = std::env::temp_dir().join(format!("instaflow-export-{}", std::process::id()));
        let spec = ModelSpec::preset("tiny", 1, 8).unwrap();
        let model = spec.init::<TB>(&device()).unwrap();
        // save_model copies `tokenizer/` from a model source: lay the assets out that way.
        let tok = dir.join("src/tokenizer");
        std::fs::create_dir_all(&tok).unwrap();
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/clip-tokenizer");
        for f in ["vocab.json", "merges.txt"] {
            std::fs::copy(assets.join(f), tok.join(f)).unwrap();
        }
        let tok_src = ModelSource::dir(dir.join("src"));
        for half in [false, true] {
            let out = dir.join(if half { "f16" } else { "f32" });
            save_model(&model, &spec, &tok_src, &out, half).unwrap();
            let pipe =
                crate::pipeline::InstaFlowPipeline::<TB>::load(&ModelSource::dir(&out), &device())
                    .unwrap();
            assert!(pipe.vae.is_none());
            let z =
                crate::noise::gaussian::<TB, 4>(&mut crate::noise::rng(1), [2, 1, 8, 8], &device());
            let text = pipe
                .encode_prompts(&["a seven", "zero"], &device())
                .unwrap();
            let t = Tensor::<TB, 1>::from_floats([0.0, 0.5], &device());
            let ids = {
                let ids: Vec<i64> = ["a seven", "zero"]
                    .iter()
                    .flat_map(|p| pipe.tokenizer.encode(p).unwrap().into_iter().map(i64::from))
                    .collect();
                Tensor::<TB, 2, Int>::from_data(TensorData::new(ids, [2, MAX_LENGTH]), &device())
            };
            let a = to_vec(pipe.unet.velocity(z.clone(), t.clone(), &text));
            let b = to_vec(model.velocity(z, t, &ids));
            let err = crate::test_util::max_abs_diff(&a, &b);
            let tol = if half { 5e-2 } else { 1e-5 };
            assert!(err < tol, "half={half}: max difference {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
