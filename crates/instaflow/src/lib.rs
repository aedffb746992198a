//! # instaflow
//!
//! InstaFlow (Liu et al., ICLR 2024) on [burn]: text-conditioned rectified flow, *reflow* to
//! straighten it, and *distillation* into a generator that needs one network evaluation.
//!
//! The crate is generic over burn backends and builds natively and for `wasm32`.
//!
//! * [`flow`] — the time convention (the only place that converts time).
//! * [`velocity`] — velocity fields and classifier-free guidance.
//! * [`solvers`] — Euler, Heun, adaptive RK45, each reporting NFE.
//! * [`losses`] — rectified-flow / reflow and distillation objectives.
//! * [`metrics`] — straightness, transport cost, sliced Wasserstein.
//! * [`models`] — SD-1.5 networks: CLIP text encoder, UNet, VAE.
//! * [`kernels`] — convolution, GroupNorm(+SiLU) and attention kernels for the CPU backend.
//! * [`pipeline`] — the InstaFlow sampling loop over a diffusers folder.
//! * [`noise`] — seeded, backend-independent Gaussian noise.
//! * [`bench`] — kernel timings for comparing backends.
//! * [`source`] — model files from a folder or from memory.
//! * [`weights`] — safetensors loading with precise errors.
//! * [`toy`] — the whole method on a 2-D conditional problem.
//! * [`classifier`] — the small CNN behind the Fréchet distance and prompt accuracy.
//! * [`data`] — caption–image data sets (MNIST-text, emoji) prepared from registry packages.
//! * [`precision`] — mixed-precision training: f16/bf16 passes over f32 weights, loss scaling.
//! * [`train`] — 1-RF, k-RF and distillation training with checkpoints; model export.
//! * `data_parallel` — training on several devices: shares of each batch, averaged gradients
//!   (native builds).
//! * [`ddim`] — DDIM for ε-prediction SD teachers (InstaFlow's 1-RF pairs).
//! * [`dpm_solver`] — DPM-Solver++ (2M), the faster teacher solver for ε-prediction models.
//! * [`reflow`] — sharded, resumable reflow pair generation.

pub mod bench;
pub mod classifier;
pub mod convert;
pub mod data;
#[cfg(not(target_arch = "wasm32"))]
pub mod data_parallel;
pub mod ddim;
pub mod dpm_solver;
pub mod flow;
pub mod kernels;
pub mod losses;
pub mod metrics;
pub mod models;
pub mod noise;
pub mod pipeline;
pub mod precision;
pub mod reflow;
pub mod solvers;
pub mod source;
pub mod tokenizer;
pub mod toy;
pub mod train;
pub mod velocity;
pub mod weights;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
pub(crate) mod test_util;

/// The crate version.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
