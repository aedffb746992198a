//! Probability-flow teacher for ε-prediction Stable Diffusion models: deterministic DDIM (η = 0),
//! as diffusers' `DDIMScheduler`. This is how InstaFlow makes its 1-RF pairs: the pair is
//! (initial noise, DDIM result) of SD 1.5, and 1-RF is trained on them.
//!
//! DDIM runs in diffusers' own time (τ from ~1000 down to 1); it is not a velocity field in this
//! crate's `t` convention, so it lives beside the solvers rather than among them.

use burn::tensor::{Tensor, TensorData, backend::Backend};
use serde::Deserialize;

use crate::flow::velocity::guide;
use crate::sd::models::UNet2DConditionModel;

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.00085
}
fn default_beta_end() -> f64 {
    0.012
}
fn default_schedule() -> String {
    "scaled_linear".into()
}
fn default_offset() -> usize {
    1
}
fn default_prediction() -> String {
    "epsilon".into()
}

/// The fields of `scheduler/scheduler_config.json` DDIM needs (defaults: SD 1.5's).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SchedulerConfig {
    /// Training timesteps T.
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    /// First β.
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    /// Last β.
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// `scaled_linear` (SD) or `linear`.
    #[serde(default = "default_schedule")]
    pub beta_schedule: String,
    /// Offset added to the inference timesteps (1 for SD).
    #[serde(default = "default_offset")]
    pub steps_offset: usize,
    /// Only `epsilon` is supported.
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    /// Whether ᾱ before the first step is 1 (else ᾱ_0).
    #[serde(default)]
    pub set_alpha_to_one: bool,
    /// `leading`, `trailing` or `linspace`; absent: each scheduler's own default (DDIM's is
    /// `leading`, DPM-Solver's `linspace`, as in diffusers).
    #[serde(default)]
    pub timestep_spacing: Option<String>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

impl SchedulerConfig {
    /// Check the settings DDIM here can follow.
    pub fn validate(&self) -> Result<(), String> {
        if self.prediction_type != "epsilon" {
            return Err(format!(
                "prediction_type {:?}: only \"epsilon\" is supported",
                self.prediction_type
            ));
        }
        if !["scaled_linear", "linear"].contains(&self.beta_schedule.as_str()) {
            return Err(format!(
                "beta_schedule {:?}: expected scaled_linear or linear",
                self.beta_schedule
            ));
        }
        if let Some(spacing) = &self.timestep_spacing
            && !["leading", "trailing", "linspace"].contains(&spacing.as_str())
        {
            return Err(format!(
                "timestep_spacing {spacing:?}: expected leading, trailing or linspace"
            ));
        }
        Ok(())
    }

    /// ᾱ_τ for τ = 0 … T−1.
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let t = self.num_train_timesteps;
        let lin = |a: f64, b: f64, i: usize| a + (b - a) * i as f64 / (t - 1).max(1) as f64;
        let mut prod = 1.0;
        (0..t)
            .map(|i| {
                let beta = match self.beta_schedule.as_str() {
                    "scaled_linear" => lin(self.beta_start.sqrt(), self.beta_end.sqrt(), i).powi(2),
                    _ => lin(self.beta_start, self.beta_end, i),
                };
                prod *= 1.0 - beta;
                prod
            })
            .collect()
    }

    /// The configured timestep spacing, or `default` when the config names none.
    pub fn spacing<'a>(&'a self, default: &'a str) -> &'a str {
        self.timestep_spacing.as_deref().unwrap_or(default)
    }

    /// σ_τ = √((1−ᾱ_τ)/ᾱ_τ) for each of `taus`: the noise levels of the variance-exploding view.
    pub fn sigmas(&self, taus: &[usize]) -> Vec<f64> {
        let ac = self.alphas_cumprod();
        taus.iter()
            .map(|&tau| {
                let a = ac[tau.min(ac.len() - 1)];
                ((1.0 - a) / a).sqrt()
            })
            .collect()
    }

    /// DDIM's `steps` inference timesteps, from noisiest to cleanest.
    pub fn timesteps(&self, steps: usize) -> Vec<usize> {
        let t = self.num_train_timesteps;
        match self.spacing("leading") {
            "linspace" => (0..steps)
                .rev()
                .map(|i| {
                    (i as f64 * (t - 1) as f64 / (steps - 1).max(1) as f64).round_ties_even()
                        as usize
                })
                .collect(),
            "trailing" => {
                let ratio = t as f64 / steps as f64;
                (0..steps)
                    .map(|i| ((t as f64 - i as f64 * ratio).round() as usize).saturating_sub(1))
                    .collect()
            }
            _ => {
                let ratio = t / steps;
                (0..steps)
                    .rev()
                    .map(|i| i * ratio + self.steps_offset)
                    .collect()
            }
        }
    }
}

/// The UNet's ε at timestep `tau` for every sample of `x`, guided by `alpha`:
/// `ε(∅) + α·(ε(text) − ε(∅))` (one evaluation when α = 1). Shared by the ε-prediction teachers.
pub fn guided_epsilon<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    x: &Tensor<B, 4>,
    tau: usize,
    text: &Tensor<B, 3>,
    negative: &Tensor<B, 3>,
    alpha: f64,
) -> Tensor<B, 4> {
    let n = x.dims()[0];
    let ts = Tensor::<B, 1>::from_data(TensorData::new(vec![tau as f32; n], [n]), &x.device());
    let eps_text = unet.forward(x.clone(), ts.clone(), text);
    if alpha == 1.0 {
        eps_text
    } else {
        guide(eps_text, unet.forward(x.clone(), ts, negative), alpha)
    }
}

/// Deterministic DDIM from `noise` (x_T) with `steps` steps and guidance `alpha` on ε:
/// `ε = ε(∅) + α·(ε(text) − ε(∅))`, `x0 = (x − √(1−ᾱ)ε)/√ᾱ`, `x ← √ᾱ_prev·x0 + √(1−ᾱ_prev)·ε`.
pub fn ddim_sample<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    noise: Tensor<B, 4>,
    text: &Tensor<B, 3>,
    negative: &Tensor<B, 3>,
    alpha: f64,
    steps: usize,
    cfg: &SchedulerConfig,
) -> Tensor<B, 4> {
    let ac = cfg.alphas_cumprod();
    let final_ac = if cfg.set_alpha_to_one { 1.0 } else { ac[0] };
    let ratio = cfg.num_train_timesteps / steps;
    let mut x = noise;
    for tau in cfg.timesteps(steps) {
        let eps = guided_epsilon(unet, &x, tau, text, negative, alpha);
        let a_t = ac[tau.min(ac.len() - 1)];
        let a_prev = tau.checked_sub(ratio).map_or(final_ac, |p| ac[p]);
        let x0 = (x - eps.clone() * (1.0 - a_t).sqrt()) / a_t.sqrt();
        x = x0 * a_prev.sqrt() + eps * (1.0 - a_prev).sqrt();
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_schedule_and_timesteps_match_diffusers() {
        let cfg = SchedulerConfig::default();
        let ac = cfg.alphas_cumprod();
        // diffusers DDIMScheduler (SD 1.5 config): alphas_cumprod[0], [999].
        assert!((ac[0] - 0.99915).abs() < 2e-6, "{}", ac[0]);
        assert!((ac[999] - 0.0046601).abs() < 2e-6, "{}", ac[999]);
        assert_eq!(cfg.timesteps(4), vec![751, 501, 251, 1]);
        assert!(cfg.validate().is_ok());
        let v: SchedulerConfig =
            serde_json::from_str(r#"{"prediction_type":"v_prediction"}"#).unwrap();
        assert!(v.validate().is_err());
    }
}
