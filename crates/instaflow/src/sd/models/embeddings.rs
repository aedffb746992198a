//! Timestep and text embeddings (diffusers `embeddings.py`: `Timesteps`, `TimestepEmbedding`,
//! `AttentionPooling`, `TextTimeEmbedding`).

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::silu;
use burn::tensor::{Distribution, Tensor, backend::Backend};

use super::attention::scaled_dot_product;

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

/// `AttentionPooling`: one query — the mean token plus a learned position — attends over itself
/// and the tokens; the result is that query's output (CLIP-style pooling of `[B, S, D]` → `[B, D]`).
#[derive(Module, Debug)]
pub struct AttentionPooling<B: Backend> {
    positional_embedding: Param<Tensor<B, 2>>,
    k_proj: Linear<B>,
    q_proj: Linear<B>,
    v_proj: Linear<B>,
    num_heads: usize,
}

impl<B: Backend> AttentionPooling<B> {
    /// `num_heads` heads over `dim` features (`dim` must be a multiple of `num_heads`).
    pub fn new(num_heads: usize, dim: usize, device: &B::Device) -> Self {
        // diffusers: randn(1, dim) / √dim.
        let positional = Tensor::random(
            [1, dim],
            Distribution::Normal(0.0, 1.0 / (dim as f64).sqrt()),
            device,
        );
        Self {
            positional_embedding: Param::from_tensor(positional),
            k_proj: LinearConfig::new(dim, dim).init(device),
            q_proj: LinearConfig::new(dim, dim).init(device),
            v_proj: LinearConfig::new(dim, dim).init(device),
            num_heads,
        }
    }

    /// Pool `[B, S, D]` tokens into `[B, D]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, _, d] = x.dims();
        let (heads, per_head) = (self.num_heads, d / self.num_heads);
        let class = x.clone().mean_dim(1) + self.positional_embedding.val().unsqueeze::<3>();
        let x = Tensor::cat(vec![class.clone(), x], 1);
        let split = |t: Tensor<B, 3>| {
            let s = t.dims()[1];
            t.reshape([b, s, heads, per_head]).swap_dims(1, 2)
        };
        // diffusers scales q and k by d^(-1/4) each: the same as the usual 1/√d on the scores.
        let q = split(self.q_proj.forward(class));
        let k = split(self.k_proj.forward(x.clone()));
        let v = split(self.v_proj.forward(x));
        // [B, H, 1, P] → [B, H·P] in head order.
        scaled_dot_product(q, k, v, None).reshape([b, d])
    }
}

/// `TextTimeEmbedding` (diffusers, `addition_embed_type: "text"`): the text tokens pooled into one
/// vector the size of the time embedding, which the UNet adds to it — so the prompt reaches every
/// ResNet block directly, not only the cross-attention layers.
#[derive(Module, Debug)]
pub struct TextTimeEmbedding<B: Backend> {
    norm1: LayerNorm<B>,
    pool: AttentionPooling<B>,
    proj: Linear<B>,
    norm2: LayerNorm<B>,
}

impl<B: Backend> TextTimeEmbedding<B> {
    /// From `encoder_dim` text features to `time_embed_dim`, pooling with `num_heads` heads.
    pub fn new(
        encoder_dim: usize,
        time_embed_dim: usize,
        num_heads: usize,
        device: &B::Device,
    ) -> Self {
        Self {
            norm1: LayerNormConfig::new(encoder_dim).init(device),
            pool: AttentionPooling::new(num_heads, encoder_dim, device),
            proj: LinearConfig::new(encoder_dim, time_embed_dim).init(device),
            norm2: LayerNormConfig::new(time_embed_dim).init(device),
        }
    }

    /// `[B, S, D]` text → `[B, time_embed_dim]`.
    pub fn forward(&self, text: Tensor<B, 3>) -> Tensor<B, 2> {
        let pooled = self.pool.forward(self.norm1.forward(text));
        self.norm2.forward(self.proj.forward(pooled))
    }
}
