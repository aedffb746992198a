//! The InstaFlow text-to-image pipeline over a diffusers folder (`pipeline_rf.py`).
//!
//! ```text
//! z = noise;  for i in 0..N:  τ = 1000·(1 − i/N);  v = UNet(z, τ, text)
//!                             if α ≠ 1: v = v_neg + α·(v − v_neg)
//!                             z = z + v/N
//! image = clamp(VAE.decode(z / scaling_factor)/2 + 0.5, 0, 1)   (pixel-space models: z itself)
//! ```
//! The loop is the crate's Euler solver on the UNet viewed as a [`VelocityField`].

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use serde::de::DeserializeOwned;

use crate::flow::unet_timesteps;
use crate::models::config::ConfigError;
use crate::models::{
    AutoencoderKL, AutoencoderKLConfig, ClipTextConfig, ClipTextModel, UNet2DConditionConfig,
    UNet2DConditionModel,
};
use crate::solvers::{Solution, Solver, euler};
use crate::source::{ModelSource, SourceError};
use crate::tokenizer::{ClipTokenizer, TokenizerError};
use crate::velocity::{Guided, VelocityField};
use crate::weights::{self, WeightsError};

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
    if text.max_position_embeddings < crate::tokenizer::MAX_LENGTH {
        return Err(fail(
            "text_encoder",
            format!(
                "max_position_embeddings {} is shorter than the {} tokens of a prompt",
                text.max_position_embeddings,
                crate::tokenizer::MAX_LENGTH
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
    /// Latent-to-pixel scale (8 for SD, 1 in pixel space).
    pub vae_scale: usize,
}

impl<B: Backend> InstaFlowPipeline<B> {
    /// Load every component of a diffusers folder (on disk or in memory).
    pub fn load(source: &ModelSource, device: &B::Device) -> Result<Self, LoadError> {
        let mut pipe = init_components(source, device)?;
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
        Ok(pipe)
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
            TensorData::new(ids, [n, crate::tokenizer::MAX_LENGTH]),
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

    #[test]
    fn rgb_and_rgba_agree() {
        let pixels =
            Tensor::<TB, 4>::from_floats([[[[0.0, 1.0]], [[0.5, 0.25]], [[1.2, -0.1]]]], &device());
        let rgb = to_rgb8(pixels.clone());
        let rgba = futures_lite::future::block_on(to_rgba8_async(pixels)).unwrap();
        assert_eq!(rgb, vec![vec![0, 128, 255, 255, 64, 0]]);
        assert_eq!(rgba, vec![vec![0, 128, 255, 255, 255, 64, 0, 255]]);
    }
}
