//! Stable Diffusion 1.5's networks, one file per diffusers module, configured from the
//! `config.json` files of a diffusers folder.
//!
//! Field names of every module equal the tensor names of diffusers/transformers checkpoints
//! (`down_blocks.0.resnets.1.conv1.weight`, …) so weights load without a name table.

pub mod attention;
pub mod clip;
pub mod config;
pub mod embeddings;
pub mod random;
pub mod resnet;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod vae;

pub use clip::{ClipTextConfig, ClipTextModel};
pub use unet_2d::{ActivationCensus, UNet2DConditionConfig, UNet2DConditionModel};
pub use vae::{AutoencoderKL, AutoencoderKLConfig};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Tensor, backend::Backend};

/// Counts parameters from their declared shapes without initialising them (burn initialises
/// parameters lazily, so a model built only to be counted allocates no weights).
struct LazyCounter(usize);

impl<B: Backend> ModuleVisitor<B> for LazyCounter {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0 += param.lazy_shape().num_elements();
    }
}

/// Number of float parameters of `module`, without materialising lazily initialised weights.
pub fn lazy_param_count<B: Backend, M: Module<B>>(module: &M) -> usize {
    let mut counter = LazyCounter(0);
    module.visit(&mut counter);
    counter.0
}
