//! DPM-Solver++ (2M), the multistep probability-flow solver the InstaFlow paper used to make its
//! SD 1.5 pairs, as diffusers' `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`,
//! `solver_order=2`, `solver_type="midpoint"`, `lower_order_final=True` and a final σ of 0.
//!
//! Like DDIM it runs in diffusers' own time τ (the scheduler settings are [`SchedulerConfig`]);
//! the model predicts ε and the solver steps on the data prediction x̂₀ in log-SNR time λ:
//!
//! ```text
//! x̂₀ = (x − σ_s ε)/α_s            h = λ_t − λ_s
//! first order:  x ← (σ_t/σ_s) x − α_t (e^{−h} − 1) x̂₀
//! second order: D = x̂₀ + (x̂₀ − x̂₀_prev)·h/(2 h_prev), x ← (σ_t/σ_s) x − α_t (e^{−h} − 1) D
//! ```

use burn::tensor::{Tensor, backend::Backend};

use crate::sd::ddim::{SchedulerConfig, guided_epsilon};
use crate::sd::models::UNet2DConditionModel;

/// The `steps` timesteps DPM-Solver visits, from noisiest to cleanest (its default spacing is
/// `linspace`; numpy's round-half-to-even, as diffusers).
pub fn timesteps(cfg: &SchedulerConfig, steps: usize) -> Vec<usize> {
    let t = cfg.num_train_timesteps;
    match cfg.spacing("linspace") {
        "leading" => {
            let ratio = t / (steps + 1);
            (1..=steps)
                .rev()
                .map(|i| i * ratio + cfg.steps_offset)
                .collect()
        }
        "trailing" => {
            let ratio = t as f64 / steps as f64;
            (0..steps)
                .map(|i| {
                    ((t as f64 - i as f64 * ratio).round_ties_even() as usize).saturating_sub(1)
                })
                .collect()
        }
        _ => (1..=steps)
            .rev()
            .map(|i| (i as f64 * (t - 1) as f64 / steps as f64).round_ties_even() as usize)
            .collect(),
    }
}

/// (α, σ, λ) of the VP process at noise level `sigma` (the VE σ = √((1−ᾱ)/ᾱ)); λ = log(α/σ).
fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let s = sigma * alpha;
    (alpha, s, alpha.ln() - s.ln())
}

/// DPM-Solver++ (2M) from `noise` (x_T) with `steps` model evaluations (×2 with guidance) and
/// guidance `alpha` on ε: `ε = ε(∅) + α·(ε(text) − ε(∅))`.
pub fn dpm_solver_sample<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    noise: Tensor<B, 4>,
    text: &Tensor<B, 3>,
    negative: &Tensor<B, 3>,
    alpha: f64,
    steps: usize,
    cfg: &SchedulerConfig,
) -> Tensor<B, 4> {
    let taus = timesteps(cfg, steps);
    let mut sigmas = cfg.sigmas(&taus);
    sigmas.push(0.0);
    let mut x = noise;
    let mut previous: Option<Tensor<B, 4>> = None;
    for (i, &tau) in taus.iter().enumerate() {
        let eps = guided_epsilon(unet, &x, tau, text, negative, alpha);
        let (a_s, s_s, l_s) = alpha_sigma_lambda(sigmas[i]);
        let x0 = (x.clone() - eps * s_s) / a_s;
        if sigmas[i + 1] == 0.0 {
            // The last step lands on σ = 0, where the update is x̂₀ itself.
            x = x0;
            break;
        }
        let (a_t, s_t, l_t) = alpha_sigma_lambda(sigmas[i + 1]);
        let h = l_t - l_s;
        let d = match &previous {
            // Second order from the previous data prediction (not on the first step).
            Some(x0_prev) => {
                let (_, _, l_prev) = alpha_sigma_lambda(sigmas[i - 1]);
                let r = (l_s - l_prev) / h;
                x0.clone() + (x0.clone() - x0_prev.clone()) * (0.5 / r)
            }
            None => x0.clone(),
        };
        x = x * (s_t / s_s) - d * (a_t * ((-h).exp() - 1.0));
        previous = Some(x0);
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_follow_diffusers_spacings() {
        let mut cfg = SchedulerConfig::default();
        // DPMSolverMultistepScheduler(...).set_timesteps(n).timesteps, diffusers 0.42.
        assert_eq!(timesteps(&cfg, 5), vec![999, 799, 599, 400, 200]);
        assert_eq!(timesteps(&cfg, 4), vec![999, 749, 500, 250]);
        cfg.timestep_spacing = Some("leading".into());
        assert_eq!(timesteps(&cfg, 4), vec![801, 601, 401, 201]);
        cfg.timestep_spacing = Some("trailing".into());
        assert_eq!(timesteps(&cfg, 4), vec![999, 749, 499, 249]);
    }

    #[test]
    fn sigma_is_the_noise_to_signal_ratio() {
        let cfg = SchedulerConfig::default();
        let ac = cfg.alphas_cumprod();
        let s = cfg.sigmas(&[500])[0];
        assert!((s * s - (1.0 - ac[500]) / ac[500]).abs() < 1e-12);
        let (a, sv, l) = alpha_sigma_lambda(s);
        assert!((a * a - ac[500]).abs() < 1e-12);
        assert!((l - (a / sv).ln()).abs() < 1e-12);
    }
}
