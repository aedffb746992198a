//! # instaflow
//!
//! InstaFlow (Liu et al., ICLR 2024) on [burn]: text-conditioned rectified flow, *reflow* to
//! straighten it, and *distillation* into a generator that needs one network evaluation.
//!
//! The crate is generic over burn backends and builds natively and for `wasm32`.
//!
//! The tree follows the paper:
//!
//! * [`flow`] — rectified flow: the time convention (the only place that converts time),
//!   velocity fields and guidance, solvers (Euler, Heun, RK45), losses, metrics, noise.
//! * [`sd`] — Stable Diffusion 1.5 networks (CLIP, UNet, VAE) with CPU kernels, tokenizer,
//!   weights and model sources, the InstaFlow sampling pipeline, DDIM and DPM-Solver++ teachers.
//! * [`training`] — 1-RF, k-RF and distillation training (checkpoints, EMA, several devices,
//!   mixed precision), reflow pairs, data sets, the evaluation classifier.
//! * [`toy`] — the whole method on a 2-D conditional problem.
//! * [`bench`] — kernel timings for comparing backends.

pub mod bench;
pub mod flow;
pub mod sd;
pub mod toy;
pub mod training;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
pub(crate) mod test_util;

/// The crate version.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
