//! The time convention of rectified flow, owned in one place.
//!
//! * `t ∈ [0, 1]`; `X0 ~ N(0, I)` is noise at `t = 0`, `X1` is data at `t = 1`.
//! * The interpolation is `X_t = t·X1 + (1 − t)·X0`, whose velocity is the constant `X1 − X0`.
//! * Stable-Diffusion-style UNets take a timestep `τ ∈ [0, 1000]` with noise at `τ = 1000`,
//!   so `τ = 1000·(1 − t)` (InstaFlow's `pipeline_rf.py`). Nothing else in the crate converts time.

use burn::tensor::{Tensor, backend::Backend};

/// Time of pure noise (`X0`).
pub const T_NOISE: f64 = 0.0;
/// Time of data (`X1`).
pub const T_DATA: f64 = 1.0;
/// Number of training timesteps of the SD-style UNet; `τ = UNET_TIMESTEPS·(1 − t)`.
pub const UNET_TIMESTEPS: f64 = 1000.0;

/// The point `X_t = t·X1 + (1 − t)·X0` on the straight path from noise `x0` to data `x1`.
///
/// `t` holds one time per batch row and is broadcast over the remaining dimensions.
pub fn interpolate<B: Backend, const D: usize>(
    x0: Tensor<B, D>,
    x1: Tensor<B, D>,
    t: Tensor<B, 1>,
) -> Tensor<B, D> {
    let t = broadcast_time::<B, D>(t);
    x0.clone() + (x1 - x0) * t
}

/// The regression target of rectified flow: the straight-path velocity `X1 − X0`.
pub fn target_velocity<B: Backend, const D: usize>(
    x0: Tensor<B, D>,
    x1: Tensor<B, D>,
) -> Tensor<B, D> {
    x1 - x0
}

/// UNet timestep `τ = 1000·(1 − t)` for a rectified-flow time `t` (float; fractional for most N).
pub fn unet_timestep(t: f64) -> f64 {
    UNET_TIMESTEPS * (1.0 - t)
}

/// [`unet_timestep`] for a batch of times: `τ = 1000·(1 − t)` element-wise.
pub fn unet_timesteps<B: Backend>(t: Tensor<B, 1>) -> Tensor<B, 1> {
    t.neg().add_scalar(1.0).mul_scalar(UNET_TIMESTEPS)
}

/// Inverse of [`unet_timestep`]: `t = 1 − τ/1000`.
pub fn flow_time(tau: f64) -> f64 {
    1.0 - tau / UNET_TIMESTEPS
}

/// The `N` Euler times `t_i = i/N`, `i = 0 … N−1` (the left ends of the steps).
pub fn euler_times(steps: usize) -> Vec<f64> {
    (0..steps).map(|i| i as f64 / steps as f64).collect()
}

/// Reshape per-row times `[B]` to `[B, 1, …, 1]` so they broadcast against a rank-`D` batch.
pub fn broadcast_time<B: Backend, const D: usize>(t: Tensor<B, 1>) -> Tensor<B, D> {
    let n = t.dims()[0];
    let mut shape = [1usize; D];
    shape[0] = n;
    t.reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_mapping_matches_pipeline_rf() {
        // pipeline_rf.py: τ_i = (1 − i/N)·1000; noise at τ = 1000.
        assert_eq!(unet_timestep(T_NOISE), 1000.0);
        assert_eq!(unet_timestep(T_DATA), 0.0);
        let n = 3;
        let taus: Vec<f64> = euler_times(n).into_iter().map(unet_timestep).collect();
        assert!(
            (taus[1] - 2000.0 / 3.0).abs() < 1e-9,
            "fractional τ for N=3: {taus:?}"
        );
        for t in [0.0, 0.25, 0.7, 1.0] {
            assert!((flow_time(unet_timestep(t)) - t).abs() < 1e-12);
        }
    }
}
