//! Timestep embeddings (diffusers `embeddings.py`: `Timesteps`, `TimestepEmbedding`).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::silu;
use burn::tensor::{Tensor, backend::Backend};

/// Sinusoidal embedding of float timesteps `[B]` → `[B, dim]` (`get_timestep_embedding`).
///
/// `exponent_k = −ln(10000)·k/(dim/2 − freq_shift)`; `[sin, cos]`, swapped to `[cos, sin]` when
/// `flip_sin_to_cos`. Timesteps are floats: InstaFlow's τ = 1000·(1 − i/N) is fractional.
pub fn timestep_embedding<B: Backend>(
    timesteps: Tensor<B, 1>,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Tensor<B, 2> {
    let half = dim / 2;
    let n = timesteps.dims()[0];
    let device = timesteps.device();
    let freqs: Vec<f32> = (0..half)
        .map(|k| (-(10000f64.ln()) * k as f64 / (half as f64 - freq_shift)).exp() as f32)
        .collect();
    // In the timesteps' float type, so that a model run in half precision stays in it.
    let freqs = Tensor::<B, 1>::from_floats(freqs.as_slice(), &device)
        .cast(timesteps.dtype())
        .reshape([1, half]);
    let args = timesteps.reshape([n, 1]) * freqs;
    let (sin, cos) = (args.clone().sin(), args.cos());
    let emb = if flip_sin_to_cos {
        Tensor::cat(vec![cos, sin], 1)
    } else {
        Tensor::cat(vec![sin, cos], 1)
    };
    if dim % 2 == 1 {
        let zeros = Tensor::<B, 2>::zeros([n, 1], &device).cast(emb.dtype());
        Tensor::cat(vec![emb, zeros], 1)
    } else {
        emb
    }
}

/// `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    linear_1: Linear<B>,
    linear_2: Linear<B>,
}

impl<B: Backend> TimestepEmbedding<B> {
    /// Build with input size `in_channels` and output size `time_embed_dim`.
    pub fn new(in_channels: usize, time_embed_dim: usize, device: &B::Device) -> Self {
        Self {
            linear_1: LinearConfig::new(in_channels, time_embed_dim).init(device),
            linear_2: LinearConfig::new(time_embed_dim, time_embed_dim).init(device),
        }
    }

    /// Apply the MLP.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }
}
