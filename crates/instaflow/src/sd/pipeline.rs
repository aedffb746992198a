//! The InstaFlow text-to-image pipeline over a diffusers folder (`pipeline_rf.py`).
//!
//! ```text
//! z = noise;  for i in 0..N:  τ = 1000·(1 − i/N);  v = UNet(z, τ, text)
//!                             if α ≠ 1: v = v_neg + α·(v − v_neg)
//!                             z = z + v/N
//! image = clamp(VAE.decode(z / scaling_factor)/2 + 0.5, 0, 1)   (pixel-space models: z itself)
//! ```
//! The loop is the crate's Euler solver on the UNet viewed as a [`VelocityField`].
//! [`InstaFlowPipeline::generate`] runs it stage by stage for the CLI and the browser alike.

use std::future::Future;

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use serde::de::DeserializeOwned;
use web_time::Instant;

use crate::flow::solvers::{Solution, Solver, euler};
use crate::flow::unet_timesteps;
use crate::flow::velocity::{Guided, VelocityField};
use crate::sd::models::config::ConfigError;
use crate::sd::models::{
    AutoencoderKL, AutoencoderKLConfig, ClipTextConfig, ClipTextModel, UNet2DConditionConfig,
    UNet2DConditionModel,
};
use crate::sd::source::{ModelSource, SourceError};
use crate::sd::tokenizer::{ClipTokenizer, TokenizerError};
use crate::sd::weights::{self, WeightsError};

/// Why a model folder could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file or folder is missing.
    #[error("{0} not found")]
    Missing(String),
    /// A config file is unreadable or not the expected JSON.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A config asks for something unsupported.
    #[error("{path}: {source}")]
    Unsupported {
        /// The config file.
        path: String,
        /// The problem.
        source: ConfigError,
    },
    /// Weights problem.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// Tokenizer problem.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// Read the `config.json` of component `dir` (e.g. `unet`).
pub fn read_config<T: DeserializeOwned>(source: &ModelSource, dir: &str) -> Result<T, LoadError> {
    if !source.has_dir(dir) {
        return Err(LoadError::Missing(source.display(dir)));
    }
    let rel = format!("{dir}/config.json");
    let text = source
        .read_string(&rel)
        .map_err(|SourceError { path, message }| LoadError::Config { path, message })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Config {
        path: source.display(&rel),
        message: format!("invalid config: {e}"),
    })
}

fn unsupported<'a>(
    source: &'a ModelSource,
    dir: &'a str,
) -> impl FnOnce(ConfigError) -> LoadError + 'a {
    move |e| LoadError::Unsupported {
        path: source.display(&format!("{dir}/config.json")),
        source: e,
    }
}

/// Load the UNet component `dir` (normally `unet`).
pub fn load_unet<B: Backend>(
    source: &ModelSource,
    dir: &str,
    device: &B::Device,
) -> Result<(UNet2DConditionConfig, UNet2DConditionModel<B>), LoadError> {
    let cfg: UNet2DConditionConfig = read_config(source, dir)?;
    let mut model = cfg.init::<B>(device).map_err(unsupported(source, dir))?;
    let files = weights::weight_files(source, dir, &["diffusion_pytorch_model", "model"])?;
    weights::load(&mut model, source, &files, &[], device)?;
    Ok((cfg, model))
}

/// Load the VAE component `dir` (normally `vae`).
pub fn load_vae<B: Backend>(
    source: &ModelSource,
    dir: &str,
    device: &B::Device,
) -> Result<(AutoencoderKLConfig, AutoencoderKL<B>), LoadError> {
    let cfg: AutoencoderKLConfig = read_config(source, dir)?;
    let mut model = cfg.init::<B>(device).map_err(unsupported(source, dir))?;
    let files = weights::weight_files(source, dir, &["diffusion_pytorch_model", "model"])?;
    weights::load(&mut model, source, &files, &[], device)?;
    Ok((cfg, model))
}

/// Load the text-encoder component `dir` (normally `text_encoder`).
pub fn load_text_encoder<B: Backend>(
    source: &ModelSource,
    dir: &str,
    device: &B::Device,
) -> Result<ClipTextModel<B>, LoadError> {
    let cfg: ClipTextConfig = read_config(source, dir)?;
    let mut model = cfg.init::<B>(device).map_err(unsupported(source, dir))?;
    let files = weights::weight_files(source, dir, &["model", "pytorch_model"])?;
    weights::load(&mut model, source, &files, weights::CLIP_REMAPS, device)?;
    Ok(model)
}

/// Read the tokenizer and every config of a diffusers folder and build its models with lazily
/// initialised (not yet allocated) weights, for a weight loader to fill.
pub fn init_components<B: Backend>(
    source: &ModelSource,
    device: &B::Device,
) -> Result<InstaFlowPipeline<B>, LoadError> {
    if let ModelSource::Dir(d) = source
        && !d.is_dir()
    {
        return Err(LoadError::Missing(d.display().to_string()));
    }
    let tokenizer = ClipTokenizer::from_source(source, "tokenizer")?;
    let text_cfg: ClipTextConfig = read_config(source, "text_encoder")?;
    let text_encoder = text_cfg
        .init::<B>(device)
        .map_err(unsupported(source, "text_encoder"))?;
    let unet_config: UNet2DConditionConfig = read_config(source, "unet")?;
    let unet = unet_config
        .init::<B>(device)
        .map_err(unsupported(source, "unet"))?;
    let vae_cfg = if source.has_dir("vae") {
        Some(read_config::<AutoencoderKLConfig>(source, "vae")?)
    } else {
        None
    };
    check_components(
        source,
        &tokenizer,
        &text_cfg,
        &unet_config,
        vae_cfg.as_ref(),
    )?;
    let vae_cfg_channels = vae_cfg.as_ref().map(|c| c.block_out_channels.clone());
    let (vae, vae_scale) = match vae_cfg {
        Some(cfg) => {
            let vae = cfg.init::<B>(device).map_err(unsupported(source, "vae"))?;
            (Some(vae), 1 << (cfg.block_out_channels.len() - 1))
        }
        None => (None, 1),
    };
    Ok(InstaFlowPipeline {
        tokenizer,
        text_encoder,
        unet,
        vae,
        unet_config,
        vae_channels: vae_cfg_channels,
        vae_scale,
    })
}

/// The components of one folder must fit together: what one produces, the next must take. Checked
/// from the configs before any weight is read (a mismatch would otherwise fail mid-generation).
fn check_components(
    source: &ModelSource,
    tokenizer: &ClipTokenizer,
    text: &ClipTextConfig,
    unet: &UNet2DConditionConfig,
    vae: Option<&AutoencoderKLConfig>,
) -> Result<(), LoadError> {
    let fail = |dir: &str, message: String| LoadError::Config {
        path: source.display(&format!("{dir}/config.json")),
        message,
    };
    if text.max_position_embeddings < crate::sd::tokenizer::MAX_LENGTH {
        return Err(fail(
            "text_encoder",
            format!(
                "max_position_embeddings {} is shorter than the {} tokens of a prompt",
                text.max_position_embeddings,
                crate::sd::tokenizer::MAX_LENGTH
            ),
        ));
    }
    let top = tokenizer.max_id() as usize;
    if top >= text.vocab_size {
        return Err(fail(
            "text_encoder",
            format!(
                "vocab_size {} is too small for the tokenizer, whose ids go up to {top}",
                text.vocab_size
            ),
        ));
    }
    let blocks = unet.block_out_channels.len();
    let cross = unet
        .cross_attention_dim
        .per_block(blocks, "cross_attention_dim")
        .map_err(|e| fail("unet", e.to_string()))?;
    if let Some(&d) = cross.iter().find(|&&d| d != text.hidden_size) {
        return Err(fail(
            "unet",
            format!(
                "cross_attention_dim {d} does not match the text encoder's hidden_size {}",
                text.hidden_size
            ),
        ));
    }
    let (image_channels, what) = match vae {
        Some(vae) => {
            if unet.in_channels != vae.latent_channels || unet.out_channels != vae.latent_channels {
                return Err(fail(
                    "unet",
                    format!(
                        "in_channels {} / out_channels {} do not match the VAE's latent_channels {}",
                        unet.in_channels, unet.out_channels, vae.latent_channels
                    ),
                ));
            }
            (vae.out_channels, "vae")
        }
        None => {
            if unet.in_channels != unet.out_channels {
                return Err(fail(
                    "unet",
                    format!(
                        "in_channels {} differs from out_channels {}: a model without vae/ samples images in the UNet's own channels",
                        unet.in_channels, unet.out_channels
                    ),
                ));
            }
            (unet.out_channels, "unet")
        }
    };
    if image_channels != 1 && image_channels != 3 {
        let hint = if vae.is_none() {
            " (a latent-space model needs its vae/ folder)"
        } else {
            ""
        };
        return Err(fail(
            what,
            format!("out_channels {image_channels}: images need 1 or 3 channels{hint}"),
        ));
    }
    Ok(())
}

impl<B: Backend> VelocityField<B, 4> for UNet2DConditionModel<B> {
    /// Text embeddings `[B, 77, D]`.
    type Cond = Tensor<B, 3>;

    fn velocity(&self, x: Tensor<B, 4>, t: Tensor<B, 1>, text: &Tensor<B, 3>) -> Tensor<B, 4> {
        self.forward(x, unet_timesteps(t), text)
    }
}

/// Settings of one generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateOptions {
    /// Euler steps N (1 for InstaFlow's one-step models).
    pub steps: usize,
    /// Guidance α (1 = plain conditional: one UNet evaluation per step).
    pub guidance: f64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            steps: 1,
            guidance: 1.0,
        }
    }
}

/// The initial latents of a generation.
#[derive(Debug, Clone, PartialEq)]
pub enum InitialNoise {
    /// Drawn from this seed with the crate's generator (the same image on every backend).
    Seed(u64),
    /// Given values, the latent shape flattened (e.g. read from a file).
    Values(Vec<f32>),
}

/// A stage of [`InstaFlowPipeline::generate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationStage {
    /// The prompts are encoded.
    TextEncoded,
    /// Euler step `index` (from 0) of `of` is done.
    Step {
        /// This step.
        index: usize,
        /// Steps in all.
        of: usize,
        /// UNet evaluations it took (2 with guidance).
        evals: usize,
    },
    /// The latents are decoded to pixels.
    Decoded,
}

/// What the caller of [`InstaFlowPipeline::generate`] does between stages.
pub trait StageHook<B: Backend> {
    /// Return once the device has computed `probe` (one value of the stage's output): devices
    /// queue work, so only a read-back makes the stage's time mean finished work. Natively this is
    /// a blocking read; in a browser an awaited one.
    fn settle(&mut self, probe: Tensor<B, 1>) -> impl Future<Output = Result<(), String>>;

    /// Told when a stage is done and how long it took (progress messages, memory samples).
    fn finished(&mut self, _stage: GenerationStage, _ms: f64) {}
}

/// Milliseconds per stage of one generation, each measured after the device finished it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Timings {
    /// Text encoding.
    pub encode_ms: f64,
    /// Each Euler step (one or two UNet evaluations).
    pub step_ms: Vec<f64>,
    /// VAE decoding (or rescaling in pixel space).
    pub decode_ms: f64,
}

impl Timings {
    /// All UNet steps together.
    pub fn unet_ms(&self) -> f64 {
        self.step_ms.iter().sum()
    }
}

/// What [`InstaFlowPipeline::generate`] made.
#[derive(Debug)]
pub struct Generated<B: Backend> {
    /// The final latents `[B, C, h, w]`.
    pub latents: Tensor<B, 4>,
    /// RGB pixels in [0, 1], `[B, 3, H, W]`.
    pub pixels: Tensor<B, 4>,
    /// Stage timings.
    pub timings: Timings,
}

/// The first value of `t`, as a one-element tensor: reading it back waits for `t`.
fn probe<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Tensor<B, 1> {
    t.clone().flatten::<1>(0, D - 1).slice(0..1)
}

/// What one generation needs in memory, estimated from the configs before anything is allocated.
/// The activations are a lower bound — the largest tensors alive at once (the UNet's skip
/// connections and widest level, the VAE decoder's full-resolution layers) — so a request refused
/// by it cannot fit; one accepted may still need somewhat more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Bytes of the weights in the compute float type.
    pub weights: u64,
    /// Bytes of activations alive at the peak, for the whole batch.
    pub activations: u64,
    /// Bytes of the initial noise on the host (f32), made before anything reaches the device.
    pub noise: u64,
    /// Bytes of the largest single tensor (also a lower bound): a GPU allocates each tensor as one
    /// buffer, and WebGPU caps a buffer's size whatever memory the GPU has.
    pub largest_tensor: u64,
    /// Which layer makes [`largest_tensor`](Self::largest_tensor), for messages.
    pub largest_in: &'static str,
}

impl MemoryEstimate {
    /// Weights + activations: what the compute device must hold.
    pub fn device(&self) -> u64 {
        self.weights.saturating_add(self.activations)
    }
}

/// Tokenizer, text encoder, UNet and VAE of one diffusers folder.
#[derive(Debug)]
pub struct InstaFlowPipeline<B: Backend> {
    /// The tokenizer.
    pub tokenizer: ClipTokenizer,
    /// The text encoder.
    pub text_encoder: ClipTextModel<B>,
    /// The velocity UNet.
    pub unet: UNet2DConditionModel<B>,
    /// The autoencoder; `None` for pixel-space models (no `vae/` folder), whose samples are
    /// images in `[-1, 1]`.
    pub vae: Option<AutoencoderKL<B>>,
    /// The UNet's config.
    pub unet_config: UNet2DConditionConfig,
    /// The VAE's `block_out_channels` (`None` in pixel space).
    pub vae_channels: Option<Vec<usize>>,
    /// Latent-to-pixel scale (8 for SD, 1 in pixel space).
    pub vae_scale: usize,
}

impl<B: Backend> InstaFlowPipeline<B> {
    /// Load every component of a diffusers folder (on disk or in memory).
    pub fn load(source: &ModelSource, device: &B::Device) -> Result<Self, LoadError> {
        let mut pipe = init_components(source, device)?;
        pipe.load_weights(source, device)?;
        Ok(pipe)
    }

    /// Fill the weights of a pipeline from [`init_components`] (lets a caller check a request
    /// against [`Self::memory_estimate`] before gigabytes are read).
    pub fn load_weights(
        &mut self,
        source: &ModelSource,
        device: &B::Device,
    ) -> Result<(), LoadError> {
        let pipe = self;
        let [(text, text_stems), (unet, unet_stems), (vae, vae_stems)] = weights::COMPONENTS;
        let files = |dir, stems| weights::weight_files(source, dir, stems);
        let clip = weights::CLIP_REMAPS;
        weights::load(
            &mut pipe.text_encoder,
            source,
            &files(text, text_stems)?,
            clip,
            device,
        )?;
        weights::load(
            &mut pipe.unet,
            source,
            &files(unet, unet_stems)?,
            &[],
            device,
        )?;
        if let Some(model) = &mut pipe.vae {
            weights::load(model, source, &files(vae, vae_stems)?, &[], device)?;
        }
        Ok(())
    }

    /// The memory generating latents of `shape` `[B, C, h, w]` needs, from the configs alone
    /// (nothing is allocated), with `float_bytes` per value (4 for f32, 2 for f16).
    pub fn memory_estimate(&self, shape: [usize; 4], float_bytes: usize) -> MemoryEstimate {
        let params = |layout: Vec<(String, Vec<usize>)>| -> u128 {
            layout
                .iter()
                .map(|(_, s)| s.iter().map(|&d| d as u128).product::<u128>())
                .sum()
        };
        let mut count = params(weights::stream::checkpoint_layout(&self.text_encoder))
            + params(weights::stream::checkpoint_layout(&self.unet));
        if let Some(vae) = &self.vae {
            count += params(weights::stream::checkpoint_layout(vae));
        }
        // Saturating: a typed size of 10⁶ × 10⁶ must give "too big", not wrap around.
        let product = |xs: &[u128]| xs.iter().fold(1u128, |p, &x| p.saturating_mul(x));
        let [b, _, h, w] = shape.map(|d| d as u128);
        let unet = &self.unet_config.block_out_channels;
        // The UNet keeps every down-block output for its skip connections (≈ 3 per level) and
        // works on ~4 tensors of its widest level at a time.
        let skips = unet.iter().enumerate().fold(0u128, |sum, (l, &c)| {
            sum.saturating_add(product(&[3, c as u128, h >> l, w >> l]))
        });
        let unet_peak = skips.saturating_add(product(&[4, unet[0] as u128, h, w]));
        // The VAE decoder's last up block: ~3 tensors of its first channel count at full size.
        let scale = self.vae_scale as u128;
        let vae_peak = self
            .vae_channels
            .as_ref()
            .map_or(0, |c| product(&[3, c[0] as u128, h, w, scale, scale]));
        let clamp = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
        let bytes = float_bytes as u128;
        // Single tensors that certainly exist: the UNet's first level (conv_in's output), the
        // feed-forward's GEGLU projection (8·C per pixel) at the widest level with attention, and
        // the VAE decoder's last up block at full size.
        let attention_level = self
            .unet_config
            .down_block_types
            .iter()
            .position(|t| t.contains("Attn"));
        let largest = [
            (
                "the UNet's first level",
                product(&[b, unet[0] as u128, h, w]),
            ),
            (
                "the UNet's attention feed-forward",
                attention_level.map_or(0, |l| product(&[b, 8 * unet[l] as u128, h >> l, w >> l])),
            ),
            (
                "the VAE decoder's full-resolution layers",
                self.vae_channels
                    .as_ref()
                    .map_or(0, |c| product(&[b, c[0] as u128, h, w, scale, scale])),
            ),
        ]
        .into_iter()
        .max_by_key(|&(_, n)| n)
        .expect("three candidates");
        MemoryEstimate {
            weights: clamp(count.saturating_mul(bytes)),
            activations: clamp(product(&[b, unet_peak.max(vae_peak), bytes])),
            noise: clamp(product(&shape.map(|d| d as u128)).saturating_mul(4)),
            largest_tensor: clamp(largest.1.saturating_mul(bytes)),
            largest_in: largest.0,
        }
    }

    /// The noise shape `[batch, C, h, w]` for images of `width`×`height` pixels (default: the
    /// UNet's `sample_size`); sizes must be positive multiples of what the UNet's down-sampling
    /// and the VAE allow.
    pub fn latent_shape(
        &self,
        batch: usize,
        width: Option<usize>,
        height: Option<usize>,
    ) -> Result<[usize; 4], String> {
        let multiple = self.vae_scale << (self.unet_config.block_out_channels.len() - 1);
        let (lh, lw) = self.unet_config.latent_size();
        let width = width.unwrap_or(lw * self.vae_scale);
        let height = height.unwrap_or(lh * self.vae_scale);
        for (name, v) in [("width", width), ("height", height)] {
            if v == 0 || v % multiple != 0 {
                return Err(format!(
                    "{name} {v}: must be a positive multiple of {multiple} for this model"
                ));
            }
        }
        Ok([
            batch,
            self.unet_config.in_channels,
            height / self.vae_scale,
            width / self.vae_scale,
        ])
    }

    /// Text embeddings `[B, 77, D]` of `prompts`.
    pub fn encode_prompts(
        &self,
        prompts: &[&str],
        device: &B::Device,
    ) -> Result<Tensor<B, 3>, TokenizerError> {
        let mut ids = Vec::new();
        for p in prompts {
            ids.extend(self.tokenizer.encode(p)?.into_iter().map(i64::from));
        }
        let n = prompts.len();
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids, [n, crate::sd::tokenizer::MAX_LENGTH]),
            device,
        );
        Ok(self.text_encoder.forward(ids))
    }

    /// Embeddings of `prompts` and of the null branch of guidance (`negatives`). The null branch
    /// is only used when α ≠ 1, so otherwise its text-encoder call is skipped and the prompt
    /// embeddings stand in for it.
    pub fn encode_for_guidance(
        &self,
        prompts: &[&str],
        negatives: &[&str],
        guidance: f64,
        device: &B::Device,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 3>), TokenizerError> {
        let text = self.encode_prompts(prompts, device)?;
        let negative = if guidance != 1.0 {
            self.encode_prompts(negatives, device)?
        } else {
            text.clone()
        };
        Ok((text, negative))
    }

    /// The initial latents of `shape` `[B, C, h, w]` on `device`: drawn from a seed, or given
    /// values checked for count and finiteness.
    pub fn initial_noise(
        &self,
        shape: [usize; 4],
        noise: InitialNoise,
        device: &B::Device,
    ) -> Result<Tensor<B, 4>, String> {
        let values = match noise {
            InitialNoise::Seed(seed) => crate::flow::noise::standard_normal(
                &mut crate::flow::noise::rng(seed),
                shape.iter().product(),
            ),
            InitialNoise::Values(values) => {
                let expected: usize = shape.iter().product();
                if values.len() != expected {
                    return Err(format!(
                        "the noise has {} values; this model needs {expected} (shape {shape:?})",
                        values.len()
                    ));
                }
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(format!("noise value {i} is not finite"));
                }
                values
            }
        };
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// One generation, stage by stage: encode `prompt` (and `negative_prompt` when α ≠ 1) for
    /// every row of `noise`, take `opts.steps` Euler steps of the guided velocity from `noise`
    /// (t = 0) to t = 1, decode. `hook` waits for each stage (timed) and hears when it is done.
    pub async fn generate<H: StageHook<B>>(
        &self,
        prompt: &str,
        negative_prompt: &str,
        noise: Tensor<B, 4>,
        opts: GenerateOptions,
        hook: &mut H,
    ) -> Result<Generated<B>, String> {
        let device = noise.device();
        let b = noise.dims()[0];
        let mut timings = Timings::default();
        let start = Instant::now();
        let (text, negative) = self
            .encode_for_guidance(
                &vec![prompt; b],
                &vec![negative_prompt; b],
                opts.guidance,
                &device,
            )
            .map_err(|e| e.to_string())?;
        hook.settle(probe(&negative)).await?;
        timings.encode_ms = ms(start);
        hook.finished(GenerationStage::TextEncoded, timings.encode_ms);

        let ode = Guided::with_guidance(&self.unet, &text, &negative, opts.guidance);
        let n = opts.steps;
        let mut z = noise;
        for i in 0..n {
            let start = Instant::now();
            let t0 = i as f64 / n as f64;
            z = euler(&ode, z, t0, t0 + 1.0 / n as f64, 1, false).x;
            hook.settle(probe(&z)).await?;
            timings.step_ms.push(ms(start));
            let stage = GenerationStage::Step {
                index: i,
                of: n,
                evals: ode.evals_per_call(),
            };
            hook.finished(stage, timings.step_ms[i]);
        }

        let start = Instant::now();
        let pixels = self.decode(z.clone());
        hook.settle(probe(&pixels)).await?;
        timings.decode_ms = ms(start);
        hook.finished(GenerationStage::Decoded, timings.decode_ms);
        Ok(Generated {
            latents: z,
            pixels,
            timings,
        })
    }

    /// Run the sampling loop from `noise` `[B, 4, h, w]`; returns the final latents.
    pub fn sample(
        &self,
        noise: Tensor<B, 4>,
        text: &Tensor<B, 3>,
        negative: &Tensor<B, 3>,
        opts: GenerateOptions,
    ) -> Tensor<B, 4> {
        let ode = Guided::with_guidance(&self.unet, text, negative, opts.guidance);
        euler(&ode, noise, 0.0, 1.0, opts.steps, false).x
    }

    /// Solve the guided ODE from `noise` to `t = 1` with any solver (reflow pairs, evaluation).
    pub fn solve(
        &self,
        noise: Tensor<B, 4>,
        text: &Tensor<B, 3>,
        negative: &Tensor<B, 3>,
        guidance: f64,
        solver: Solver,
    ) -> Solution<B, 4> {
        let ode = Guided::with_guidance(&self.unet, text, negative, guidance);
        solver.solve(&ode, noise, 0.0, 1.0, false)
    }

    /// Decode latents to RGB pixels in [0, 1], `[B, 3, H, W]` (grey images are repeated to RGB).
    pub fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let image = match &self.vae {
            Some(vae) => vae.decode(latents / vae.scaling_factor()),
            None => latents,
        };
        let image = if image.dims()[1] == 1 {
            image.repeat_dim(1, 3)
        } else {
            image
        };
        (image / 2.0 + 0.5).clamp(0.0, 1.0)
    }
}

/// Quantise channel-last pixels in [0, 1] to bytes (`round(255·x)`, as diffusers' `numpy_to_pil`),
/// one buffer per image, appending an opaque alpha channel when `alpha` is set.
fn quantize(hwc: &[f32], images: usize, pixels_per_image: usize, alpha: bool) -> Vec<Vec<u8>> {
    let byte = |x: f32| (x.clamp(0.0, 1.0) * 255.0).round() as u8;
    hwc.chunks(pixels_per_image * 3)
        .take(images)
        .map(|img| {
            if alpha {
                img.chunks(3)
                    .flat_map(|p| [byte(p[0]), byte(p[1]), byte(p[2]), 255])
                    .collect()
            } else {
                img.iter().map(|&x| byte(x)).collect()
            }
        })
        .collect()
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Pixels `[B, 3, H, W]` in [0, 1] → one interleaved 8-bit RGB buffer per image.
pub fn to_rgb8<B: Backend>(pixels: Tensor<B, 4>) -> Vec<Vec<u8>> {
    let [b, _, h, w] = pixels.dims();
    let hwc: Vec<f32> = pixels
        .permute([0, 2, 3, 1])
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 pixels");
    quantize(&hwc, b, h * w, false)
}

/// Pixels `[B, 3, H, W]` in [0, 1] → one RGBA buffer per image (canvas `ImageData` layout), read
/// back asynchronously (WebGPU in a browser cannot block).
pub async fn to_rgba8_async<B: Backend>(pixels: Tensor<B, 4>) -> Result<Vec<Vec<u8>>, String> {
    let [b, _, h, w] = pixels.dims();
    let data = pixels
        .permute([0, 2, 3, 1])
        .into_data_async()
        .await
        .map_err(|e| format!("reading the image back from the device: {e:?}"))?;
    let hwc: Vec<f32> = data
        .convert::<f32>()
        .to_vec()
        .map_err(|e| format!("{e:?}"))?;
    Ok(quantize(&hwc, b, h * w, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{TB, device};

    /// Edit `dir/config.json` of a copy of the parity model, then build its components.
    fn with_config(tag: &str, dir: &str, edit: &[(&str, serde_json::Value)]) -> String {
        let source = crate::test_util::parity_folder("conv-f32", tag);
        let path = source.path(&format!("{dir}/config.json")).unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for (k, v) in edit {
            cfg[*k] = v.clone();
        }
        std::fs::write(&path, cfg.to_string()).unwrap();
        match init_components::<TB>(&source, &device()) {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn components_that_do_not_fit_together_are_refused_from_their_configs() {
        use serde_json::json;
        assert_eq!(with_config("fit-ok", "unet", &[]), "ok");
        let cases = [
            // (edited file, key, value, message, file the message names)
            (
                "unet",
                "cross_attention_dim",
                json!(7),
                "cross_attention_dim 7 does not match",
                "unet",
            ),
            (
                "unet",
                "in_channels",
                json!(3),
                "do not match the VAE's latent_channels",
                "unet",
            ),
            (
                "vae",
                "latent_channels",
                json!(8),
                "the VAE's latent_channels 8",
                "unet",
            ),
            (
                "vae",
                "out_channels",
                json!(4),
                "out_channels 4: images need 1 or 3",
                "vae",
            ),
            (
                "text_encoder",
                "max_position_embeddings",
                json!(16),
                "shorter than the 77",
                "text_encoder",
            ),
            (
                "text_encoder",
                "vocab_size",
                json!(1000),
                "vocab_size 1000 is too small",
                "text_encoder",
            ),
        ];
        for (i, (dir, key, value, want, named)) in cases.into_iter().enumerate() {
            let err = with_config(&format!("fit-{i}"), dir, &[(key, value)]);
            assert!(err.contains(want), "{dir}.{key}: {err}");
            assert!(err.contains(&format!("{named}/config.json")), "{err}");
        }
        // A latent-space model without its VAE would write latents as a picture.
        let source = crate::test_util::parity_folder("conv-f32", "fit-novae");
        std::fs::remove_dir_all(source.path("vae").unwrap()).unwrap();
        let err = init_components::<TB>(&source, &device())
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs its vae/ folder"), "{err}");
    }

    /// Records what `generate` tells its hook.
    #[derive(Default)]
    struct Record {
        settled: usize,
        stages: Vec<GenerationStage>,
    }

    impl<B: Backend> StageHook<B> for Record {
        async fn settle(&mut self, probe: Tensor<B, 1>) -> Result<(), String> {
            assert_eq!(probe.dims(), [1]);
            probe.into_data();
            self.settled += 1;
            Ok(())
        }

        fn finished(&mut self, stage: GenerationStage, ms: f64) {
            assert!(ms >= 0.0);
            self.stages.push(stage);
        }
    }

    #[test]
    fn generate_runs_the_sampling_loop_stage_by_stage() {
        let source = crate::test_util::parity_folder("conv-f32", "generate");
        let pipe = InstaFlowPipeline::<TB>::load(&source, &device()).unwrap();
        let shape = pipe.latent_shape(2, None, None).unwrap();
        let opts = GenerateOptions {
            steps: 3,
            guidance: 1.5,
        };
        let noise = pipe
            .initial_noise(shape, InitialNoise::Seed(7), &device())
            .unwrap();
        let mut hook = Record::default();
        let out = futures_lite::future::block_on(pipe.generate(
            "a red heart",
            "",
            noise.clone(),
            opts,
            &mut hook,
        ))
        .unwrap();
        let steps = (0..3).map(|index| GenerationStage::Step {
            index,
            of: 3,
            evals: 2,
        });
        let expected: Vec<_> = std::iter::once(GenerationStage::TextEncoded)
            .chain(steps)
            .chain([GenerationStage::Decoded])
            .collect();
        assert_eq!(hook.stages, expected);
        assert_eq!((hook.settled, out.timings.step_ms.len()), (5, 3));

        // The same as the one-call loop and decoder.
        let (text, neg) = pipe
            .encode_for_guidance(&["a red heart"; 2], &[""; 2], 1.5, &device())
            .unwrap();
        let latents = pipe.sample(noise, &text, &neg, opts);
        let diff = |a: Tensor<TB, 4>, b: Tensor<TB, 4>| {
            let d: f32 = (a - b).abs().max().into_scalar();
            d
        };
        assert!(diff(out.latents.clone(), latents.clone()) <= 1e-5);
        assert!(diff(out.pixels, pipe.decode(latents)) <= 1e-5);

        // Given noise is checked.
        let n: usize = shape.iter().product();
        let short = pipe.initial_noise(shape, InitialNoise::Values(vec![0.0; n - 1]), &device());
        assert!(
            short
                .unwrap_err()
                .contains(&format!("this model needs {n}"))
        );
        let mut nan = vec![0.0; n];
        nan[5] = f32::NAN;
        let nan = pipe.initial_noise(shape, InitialNoise::Values(nan), &device());
        assert_eq!(nan.unwrap_err(), "noise value 5 is not finite");
    }

    #[test]
    fn rgb_and_rgba_agree() {
        let pixels =
            Tensor::<TB, 4>::from_floats([[[[0.0, 1.0]], [[0.5, 0.25]], [[1.2, -0.1]]]], &device());
        let rgb = to_rgb8(pixels.clone());
        let rgba = futures_lite::future::block_on(to_rgba8_async(pixels)).unwrap();
        assert_eq!(rgb, vec![vec![0, 128, 255, 255, 64, 0]]);
        assert_eq!(rgba, vec![vec![0, 128, 255, 255, 255, 64, 0, 255]]);
    }

    #[test]
    fn memory_estimate_counts_every_weight_and_grows_with_batch_and_size() {
        let source = crate::test_util::parity_folder("conv-f32", "estimate");
        let pipe = init_components::<TB>(&source, &device()).unwrap();
        // Weights: every tensor the checkpoints hold (f32 files), at 4 and 2 bytes per value.
        let mut values = 0u64;
        for dir in ["text_encoder", "unet", "vae"] {
            for weights::WeightFile(f) in
                weights::weight_files(&source, dir, &["model", "diffusion_pytorch_model"]).unwrap()
            {
                let bytes = source.read(&f).unwrap();
                let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
                values += st
                    .tensors()
                    .iter()
                    .filter(|(n, _)| !n.ends_with("position_ids"))
                    .map(|(_, t)| t.shape().iter().product::<usize>() as u64)
                    .sum::<u64>();
            }
        }
        let one = pipe.memory_estimate([1, 4, 8, 8], 4);
        assert_eq!(one.weights, 4 * values);
        assert_eq!(pipe.memory_estimate([1, 4, 8, 8], 2).weights, 2 * values);
        assert_eq!(one.noise, 4 * 4 * 8 * 8);
        assert!(one.activations > 0);
        let four = pipe.memory_estimate([4, 4, 8, 8], 4);
        assert_eq!(four.activations, 4 * one.activations);
        let wide = pipe.memory_estimate([1, 4, 16, 16], 4);
        assert_eq!(wide.activations, 4 * one.activations);
        // Absurd requests saturate instead of overflowing.
        let huge = pipe.memory_estimate([usize::MAX, 4, usize::MAX, usize::MAX], 4);
        assert_eq!(
            (
                huge.activations,
                huge.noise,
                huge.device(),
                huge.largest_tensor
            ),
            (u64::MAX, u64::MAX, u64::MAX, u64::MAX)
        );
        // The largest single tensor is one of the activations, and grows with batch and size.
        assert!(one.largest_tensor > 0 && one.largest_tensor <= one.activations);
        assert_eq!(four.largest_tensor, 4 * one.largest_tensor);
        assert_eq!(wide.largest_tensor, 4 * one.largest_tensor);
    }
}
