//! Stable Diffusion 1.5 as InstaFlow uses it: the networks (CLIP text encoder, UNet, VAE), the
//! tokenizer, weights and model sources, the sampling pipeline, and the ε-prediction teacher
//! solvers (DDIM, DPM-Solver++) that make reflow pairs from SD checkpoints.

pub mod convert;
pub mod ddim;
pub mod dpm_solver;
pub mod kernels;
pub mod models;
pub mod pipeline;
pub mod source;
pub mod tokenizer;
pub mod weights;
