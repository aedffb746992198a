//! The memory a training run needs on each device, from the configs alone (nothing is
//! allocated): weights, gradients, AdamW state, the EMA copy, frozen parts, and the activations
//! autodiff keeps for the backward pass — checked before the first step, so a run that cannot
//! fit is refused with the figures instead of being killed by the kernel minutes later.
//!
//! Weights, gradients and optimizer state are exact counts (f32: 4 bytes a value, AdamW two
//! moments). Activations are a model: values per UNet layer kind
//! ([`UNet2DConditionConfig::activation_census`]) times how many bytes this implementation's
//! autodiff keeps per value, measured on SD-1.5-size and small models (`docs/training.md`).

use burn::backend::Flex;
use serde::Serialize;

use crate::sd::models::{
    ActivationCensus, AutoencoderKLConfig, ClipTextConfig, UNet2DConditionConfig,
};
use crate::sd::tokenizer::MAX_LENGTH;
use crate::sd::weights::stream::checkpoint_layout;
use crate::training::model::ModelSpec;
use crate::training::trainer::TrainConfig;

/// Bytes autodiff keeps per value produced by each layer kind in one f32 training pass: resnets
/// (GroupNorm's intermediates, SiLU and convolution inputs), transformer blocks (norms, q/k/v,
/// GEGLU's 8× wide projection), attention scores (scores, softmax, its backward's inputs).
/// Fitted to the peak RSS of 2-RF steps on the CPU backend of a random SD-1.5 UNet at 64²
/// latents and the `mini` preset at 64² (attention-bound), then checked on others
/// (docs/training.md); resnets and transformers keep the 24 : 80 ratio of a count of the
/// tensors each keeps.
const BYTES_PER_RESNET_VALUE: f64 = 37.2;
const BYTES_PER_TRANSFORMER_VALUE: f64 = 123.8;
const BYTES_PER_SCORE_VALUE: f64 = 12.35;
/// Share of a step's activations still alive when the last gradients are made: the backward
/// pass frees the activations of the high-resolution levels (few parameters) first and fills
/// the gradients of the low-resolution ones (most parameters) last, so both peaks do not add.
const ACTIVATIONS_AT_LAST_GRADIENT: f64 = 0.65;
/// The process itself: code, thread pools, allocator caches (measured with tiny models).
const RUNTIME_BYTES: u64 = 250_000_000;
/// A checkpoint's writer holds the serialized AdamW record (and a little more) in memory.
const EXPORT_PER_OPTIMIZER_BYTE: f64 = 1.1;
/// … and part of the EMA's (it is written too).
const EXPORT_PER_EMA_BYTE: f64 = 0.45;
/// Text encoder activations per token and width per layer, when it trains.
const BYTES_PER_TEXT_VALUE: f64 = 64.0;
/// The VAE decoder's activations per output pixel and first-level channel (LPIPS losses).
const BYTES_PER_DECODER_VALUE: f64 = 60.0;

/// Memory per device for one training configuration, in bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainMemoryPlan {
    /// Parameters that train.
    pub trainable_params: u64,
    /// Parameters that stay frozen (text encoder unless trained, the VAE of a perceptual loss).
    pub frozen_params: u64,
    /// Of the frozen ones, those stored in a half type (2 bytes a value).
    pub half_frozen_params: u64,
    /// Every weight (f32, or half for [`TrainMemoryPlan::half_frozen_params`]).
    pub weights: u64,
    /// Gradients of the trainable weights.
    pub gradients: u64,
    /// AdamW's two moments of the trainable weights.
    pub optimizer: u64,
    /// The EMA copy of the trainable weights (0 without one); its update needs as much again
    /// for a moment, at the end of the step.
    pub ema: u64,
    /// What autodiff keeps of one micro-batch for the backward pass.
    pub activations: u64,
    /// Buffers of a checkpoint and model export (the serialized weights), alive after the
    /// step's activations are freed: the peak is the larger of the two.
    pub export: u64,
    /// The process itself (code, thread pools, allocator caches).
    pub runtime: u64,
    /// Rows of one micro-batch on this device.
    pub micro_batch: usize,
    /// Activations of one row (for [`TrainMemoryPlan::max_micro_batch`]).
    pub activations_per_row: u64,
}

impl TrainMemoryPlan {
    /// What the run needs at its peak: the fixed part, plus the largest of: a step's
    /// activations (end of the forward pass), the gradients with the activations still alive
    /// when they are complete (end of the backward pass), the export buffers.
    pub fn total(&self) -> u64 {
        self.fixed() + self.transient(self.activations)
    }

    /// The varying part of the peak, for `activations` bytes of them.
    fn transient(&self, activations: u64) -> u64 {
        // Measured: the gradients, the activations still alive and the EMA update's new copy
        // coexist at the end of a step.
        let late =
            self.gradients + (ACTIVATIONS_AT_LAST_GRADIENT * activations as f64) as u64 + self.ema;
        activations.max(late).max(self.export)
    }

    /// Memory held all run long: weights, optimizer state, EMA, the process itself.
    pub fn fixed(&self) -> u64 {
        self.weights + self.optimizer + self.ema + self.runtime
    }

    /// The largest micro-batch per device that fits in `limit` bytes (0 when not even one row
    /// does).
    pub fn max_micro_batch(&self, limit: u64) -> u64 {
        let per_row = self.activations_per_row.max(1);
        let Some(free) = limit.checked_sub(self.fixed()) else {
            return 0;
        };
        let mut rows = free / per_row;
        while rows > 0 && self.transient(rows * per_row) > free {
            rows -= 1;
        }
        rows
    }

    /// The plan as a table of `(what, bytes)` rows, total last.
    pub fn rows(&self) -> Vec<(String, u64)> {
        vec![
            (
                format!(
                    "weights ({} trainable + {} frozen parameters, f32{})",
                    millions(self.trainable_params),
                    millions(self.frozen_params),
                    match self.half_frozen_params {
                        0 => String::new(),
                        n => format!("; {} frozen stored in half", millions(n)),
                    }
                ),
                self.weights,
            ),
            (
                "gradients (made as the activations are freed)".into(),
                self.gradients,
            ),
            ("AdamW state (2 moments)".into(), self.optimizer),
            ("EMA copy".into(), self.ema),
            (
                "the process (code, threads, allocator)".into(),
                self.runtime,
            ),
            (
                format!("activations ({} rows per micro-batch)", self.micro_batch),
                self.activations,
            ),
            (
                "checkpoint and export buffers (not at once with the activations)".into(),
                self.export,
            ),
            ("total".into(), self.total()),
        ]
    }
}

fn millions(n: u64) -> String {
    format!("{:.1} M", n as f64 / 1e6)
}

/// Parameters of a module built lazily from its config (nothing is allocated).
fn count<M: burn::module::Module<Flex>>(module: &M) -> u64 {
    checkpoint_layout(module)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum()
}

/// The plan for training `spec` on samples of shape `sample` (`[C, h, w]`) with `config`,
/// `rows` rows per device and micro-batch; `perceptual_vae` is the VAE a perceptual loss decodes
/// through (frozen; its decoder's activations count).
pub fn plan(
    spec: &ModelSpec,
    sample: [usize; 3],
    rows: usize,
    config: &TrainConfig,
    perceptual_vae: Option<&AutoencoderKLConfig>,
) -> Result<TrainMemoryPlan, String> {
    let device = Default::default();
    let unet_cfg: UNet2DConditionConfig = spec.unet_config()?;
    let text_cfg: ClipTextConfig = serde_json::from_value(spec.text_encoder.clone())
        .map_err(|e| format!("text encoder config: {e}"))?;
    let unet = count(&unet_cfg.init::<Flex>(&device).map_err(|e| e.to_string())?);
    let text = count(&text_cfg.init::<Flex>(&device).map_err(|e| e.to_string())?);
    let vae = match perceptual_vae {
        Some(cfg) => count(&cfg.init::<Flex>(&device).map_err(|e| e.to_string())?),
        None => 0,
    };
    let (trainable, frozen) = match config.train_text_encoder {
        true => (unet + text, vae),
        false => (unet, text + vae),
    };
    // A frozen text encoder is stored in the half type of half-precision passes (the VAE of a
    // perceptual loss decodes f32 predictions, so it stays f32).
    let half_frozen = match (config.train_text_encoder, config.precision.half()) {
        (false, Some(_)) => text,
        _ => 0,
    };
    let [_, h, w] = sample;
    let census: ActivationCensus = unet_cfg
        .activation_census(h, w, MAX_LENGTH)
        .map_err(|e| e.to_string())?;
    let mut per_row = BYTES_PER_RESNET_VALUE * census.resnet as f64
        + BYTES_PER_TRANSFORMER_VALUE * census.transformer as f64
        + BYTES_PER_SCORE_VALUE * census.attention_scores as f64;
    if config.train_text_encoder {
        let layers = text_cfg.num_hidden_layers as f64;
        per_row += BYTES_PER_TEXT_VALUE * layers * (MAX_LENGTH * text_cfg.hidden_size) as f64;
    }
    if let Some(cfg) = perceptual_vae {
        let scale = 1usize << cfg.block_out_channels.len().saturating_sub(1);
        let pixels = (h * scale * w * scale) as f64;
        per_row += BYTES_PER_DECODER_VALUE * pixels * cfg.block_out_channels[0] as f64;
    }
    // Half-precision passes keep half-size activations.
    if config.precision.half().is_some() {
        per_row /= 2.0;
    }
    let per_row = per_row as u64;
    let f32_bytes = 4;
    let ema = match config.ema_decay > 0.0 {
        true => trainable * f32_bytes,
        false => 0,
    };
    Ok(TrainMemoryPlan {
        trainable_params: trainable,
        frozen_params: frozen,
        weights: (trainable + frozen) * f32_bytes - half_frozen * 2,
        half_frozen_params: half_frozen,
        gradients: trainable * f32_bytes,
        optimizer: 2 * trainable * f32_bytes,
        ema,
        activations: per_row * rows as u64,
        export: (EXPORT_PER_OPTIMIZER_BYTE * (2 * trainable * f32_bytes) as f64
            + EXPORT_PER_EMA_BYTE * ema as f64) as u64,
        runtime: RUNTIME_BYTES,
        micro_batch: rows,
        activations_per_row: per_row,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_counts_are_the_published_parameter_counts() {
        let spec = ModelSpec {
            unet: serde_json::json!({
                "sample_size": 64, "cross_attention_dim": 768,
            }),
            text_encoder: serde_json::json!({
                "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                "num_hidden_layers": 12, "num_attention_heads": 12,
                "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            }),
        };
        let frozen_text = TrainConfig {
            train_text_encoder: false,
            ema_decay: 0.0,
            ..TrainConfig::default()
        };
        let p = plan(&spec, [4, 64, 64], 1, &frozen_text, None).unwrap();
        // diffusers' SD-1.5 UNet and CLIP-L text model (FACTS.md).
        assert_eq!(p.trainable_params, 859_520_964);
        assert_eq!(p.frozen_params, 123_060_480);
        assert_eq!(p.gradients, 4 * 859_520_964);
        assert_eq!(p.optimizer, 8 * 859_520_964);
        assert_eq!(p.ema, 0);
        // Activations grow with the rows and the latent size.
        let two = plan(&spec, [4, 64, 64], 2, &frozen_text, None).unwrap();
        assert_eq!(two.activations, 2 * p.activations);
        let small = plan(&spec, [4, 32, 32], 1, &frozen_text, None).unwrap();
        assert!(small.activations * 3 < p.activations);
        // The peak is the largest of the step's phases, never less than its parts.
        assert!(p.total() >= p.fixed() + p.activations);
        assert!(p.total() >= p.fixed() + p.gradients);
        assert!(p.total() >= p.fixed() + p.export);
        // bf16 passes store the frozen text encoder in bf16.
        let bf16 = TrainConfig {
            precision: crate::training::precision::Precision::Bf16,
            ..frozen_text.clone()
        };
        let half = plan(&spec, [4, 64, 64], 1, &bf16, None).unwrap();
        assert_eq!(half.weights, p.weights - 2 * 123_060_480);
        for rows in [1, 3] {
            let plan = plan(&spec, [4, 64, 64], rows, &frozen_text, None).unwrap();
            assert_eq!(p.max_micro_batch(plan.total()), rows as u64);
            assert_eq!(p.max_micro_batch(plan.total() - 1), rows as u64 - 1);
        }
    }
}
