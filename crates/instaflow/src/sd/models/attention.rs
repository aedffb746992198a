//! Attention (diffusers `attention_processor.py`), the transformer block and `Transformer2DModel`.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Tensor, backend::Backend};

use super::resnet::{conv2d, group_norm};
use crate::sd::kernels;

/// Most attention-score elements computed at once. SD-1.5's self-attention at a 64×64 latent would
/// need 8 heads × 4096² scores (537 MB in f32); queries are processed in chunks below this budget,
/// which changes nothing numerically (softmax is per query row).
pub const MAX_SCORE_ELEMENTS: usize = 1 << 24;

/// Scaled dot-product attention over `[B, H, Sq, D]` queries and `[B, H, Sk, D]` keys/values,
/// `softmax(QKᵀ/√D)·V`, in query chunks of at most [`MAX_SCORE_ELEMENTS`] scores.
/// `mask` (`[Sq, Sk]`, added to the scores) is used by CLIP's causal attention.
pub fn scaled_dot_product<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 2>>,
) -> Tensor<B, 4> {
    if let Some(out) = kernels::attention(&q, &k, &v, mask.as_ref()) {
        return out;
    }
    let [b, h, sq, d] = q.dims();
    let sk = k.dims()[2];
    // Scaling Q (Sq×D) instead of the scores (Sq×Sk) saves a pass over the largest tensor here.
    let q = q * (1.0 / (d as f64).sqrt());
    let kt = k.swap_dims(2, 3);
    let chunk = (MAX_SCORE_ELEMENTS / (b * h * sk).max(1)).clamp(1, sq);
    let mut outputs = Vec::with_capacity(sq.div_ceil(chunk));
    let mut start = 0;
    while start < sq {
        let end = (start + chunk).min(sq);
        let qc = q.clone().slice([0..b, 0..h, start..end, 0..d]);
        let mut scores = qc.matmul(kt.clone());
        if let Some(m) = &mask {
            let mc = m.clone().slice([start..end, 0..sk]);
            scores = scores + mc.reshape([1, 1, end - start, sk]);
        }
        outputs.push(softmax(scores, 3).matmul(v.clone()));
        start = end;
    }
    if outputs.len() == 1 {
        outputs.pop().expect("one chunk")
    } else {
        Tensor::cat(outputs, 2)
    }
}

/// `[B, S, H·D]` → `[B, H, S, D]`.
pub fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, s, c] = x.dims();
    x.reshape([b, s, heads, c / heads]).swap_dims(1, 2)
}

/// `[B, H, S, D]` → `[B, S, H·D]`.
pub fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, s, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, s, h * d])
}

/// diffusers' `Attention` with `to_q`, `to_k`, `to_v` and `to_out.0` (stored as `to_out[0]`).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    to_q: Linear<B>,
    to_k: Linear<B>,
    to_v: Linear<B>,
    to_out: Vec<Linear<B>>,
    heads: usize,
}

impl<B: Backend> Attention<B> {
    /// `query_dim` → `heads × dim_head`; keys/values from `cross_dim` (or `query_dim` for self-attention).
    pub fn new(
        query_dim: usize,
        cross_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        qkv_bias: bool,
        device: &B::Device,
    ) -> Self {
        let inner = heads * dim_head;
        let kv = cross_dim.unwrap_or(query_dim);
        Self {
            to_q: LinearConfig::new(query_dim, inner)
                .with_bias(qkv_bias)
                .init(device),
            to_k: LinearConfig::new(kv, inner)
                .with_bias(qkv_bias)
                .init(device),
            to_v: LinearConfig::new(kv, inner)
                .with_bias(qkv_bias)
                .init(device),
            to_out: vec![LinearConfig::new(inner, query_dim).init(device)],
            heads,
        }
    }

    /// Attend from `x` `[B, S, C]` to `context` (`x` itself when `None`).
    pub fn forward(&self, x: Tensor<B, 3>, context: Option<&Tensor<B, 3>>) -> Tensor<B, 3> {
        let [q, k, v] = match context {
            None => kernels::linears([&self.to_q, &self.to_k, &self.to_v], x),
            Some(ctx) => {
                let [k, v] = kernels::linears([&self.to_k, &self.to_v], ctx.clone());
                [kernels::linear(&self.to_q, x), k, v]
            }
        }
        .map(|t| split_heads(t, self.heads));
        kernels::linear(
            &self.to_out[0],
            merge_heads(scaled_dot_product(q, k, v, None)),
        )
    }
}

/// GEGLU feed-forward: `proj_out(h · gelu(gate))` with `[h, gate] = proj_in(x)`; diffusers names
/// these `ff.net.0.proj` and `ff.net.2` (renamed when weights load).
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    proj_in: Linear<B>,
    proj_out: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    /// Hidden size `4·dim`, as in SD.
    pub fn new(dim: usize, device: &B::Device) -> Self {
        let inner = 4 * dim;
        Self {
            proj_in: LinearConfig::new(dim, 2 * inner).init(device),
            proj_out: LinearConfig::new(inner, dim).init(device),
        }
    }

    /// Apply the block to `[B, S, dim]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = kernels::gelu_gate(kernels::linear(&self.proj_in, x));
        kernels::linear(&self.proj_out, h)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU, each pre-norm and residual.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock<B: Backend> {
    norm1: LayerNorm<B>,
    attn1: Attention<B>,
    norm2: LayerNorm<B>,
    attn2: Attention<B>,
    norm3: LayerNorm<B>,
    ff: FeedForward<B>,
}

impl<B: Backend> BasicTransformerBlock<B> {
    /// `dim = heads·dim_head`; `cross_dim` is the text-embedding size.
    pub fn new(
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_dim: usize,
        device: &B::Device,
    ) -> Self {
        Self {
            norm1: LayerNormConfig::new(dim).init(device),
            attn1: Attention::new(dim, None, heads, dim_head, false, device),
            norm2: LayerNormConfig::new(dim).init(device),
            attn2: Attention::new(dim, Some(cross_dim), heads, dim_head, false, device),
            norm3: LayerNormConfig::new(dim).init(device),
            ff: FeedForward::new(dim, device),
        }
    }

    /// Apply the block to `[B, S, dim]` attending to `context` `[B, T, cross_dim]`.
    pub fn forward(&self, x: Tensor<B, 3>, context: &Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.attn1.forward(self.norm1.forward(x.clone()), None) + x;
        let x = self
            .attn2
            .forward(self.norm2.forward(x.clone()), Some(context))
            + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}

/// Input/output projection of [`Transformer2DModel`]: a 1×1 convolution or a linear layer
/// (`use_linear_projection`).
#[derive(Module, Debug)]
pub enum Projection<B: Backend> {
    /// 1×1 convolution on `[B, C, H, W]`.
    Conv(Conv2d<B>),
    /// Linear layer on `[B, HW, C]`.
    Linear(Linear<B>),
}

/// `Transformer2DModel` for continuous inputs: GroupNorm, projection in, transformer blocks,
/// projection out, residual.
#[derive(Module, Debug)]
pub struct Transformer2DModel<B: Backend> {
    norm: GroupNorm<B>,
    proj_in: Projection<B>,
    transformer_blocks: Vec<BasicTransformerBlock<B>>,
    proj_out: Projection<B>,
}

/// Settings of a [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerSettings {
    /// Attention heads.
    pub heads: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Text-embedding size.
    pub cross_attention_dim: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// Linear instead of 1×1-conv projections.
    pub use_linear_projection: bool,
}

impl<B: Backend> Transformer2DModel<B> {
    /// Build for `channels` channels (`dim_head = channels / heads`).
    pub fn new(channels: usize, s: TransformerSettings, device: &B::Device) -> Self {
        let dim_head = channels / s.heads;
        let inner = s.heads * dim_head;
        let proj = |i: usize, o: usize| {
            if s.use_linear_projection {
                Projection::Linear(LinearConfig::new(i, o).init(device))
            } else {
                Projection::Conv(conv2d(i, o, 1, device))
            }
        };
        Self {
            norm: group_norm(s.groups, channels, 1e-6, device),
            proj_in: proj(channels, inner),
            transformer_blocks: (0..s.layers)
                .map(|_| {
                    BasicTransformerBlock::new(
                        inner,
                        s.heads,
                        dim_head,
                        s.cross_attention_dim,
                        device,
                    )
                })
                .collect(),
            proj_out: proj(inner, channels),
        }
    }

    /// Apply to `x` `[B, C, H, W]` with text `context` `[B, T, D]`.
    pub fn forward(&self, x: Tensor<B, 4>, context: &Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = kernels::group_norm(&self.norm, x, false);
        let to_tokens = |x: Tensor<B, 4>| {
            let ch = x.dims()[1];
            x.reshape([b, ch, h * w]).swap_dims(1, 2)
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(kernels::conv2d(conv, x)),
            Projection::Linear(lin) => lin.forward(to_tokens(x)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context);
        }
        let to_image = |t: Tensor<B, 3>| {
            let ch = t.dims()[2];
            t.swap_dims(1, 2).reshape([b, ch, h, w])
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => kernels::conv2d(conv, to_image(tokens)),
            Projection::Linear(lin) => to_image(lin.forward(tokens)),
        };
        let _ = c;
        out + residual
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{TB, device, to_vec};
    use burn::tensor::Distribution;

    #[test]
    fn chunked_attention_equals_one_shot() {
        let dev = device();
        let shape = [1, 2, 3000, 8];
        let q = Tensor::<TB, 4>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        let k = Tensor::<TB, 4>::random([1, 2, 3000, 8], Distribution::Normal(0.0, 1.0), &dev);
        let v = Tensor::<TB, 4>::random([1, 2, 3000, 8], Distribution::Normal(0.0, 1.0), &dev);
        // 2·3000 keys per query row → 2796 query rows per chunk: two chunks.
        let chunked = to_vec(scaled_dot_product(q.clone(), k.clone(), v.clone(), None));
        let scores = q.matmul(k.swap_dims(2, 3)) / (8f64).sqrt();
        let direct = to_vec(softmax(scores, 3).matmul(v));
        let max = crate::test_util::max_abs_diff(&chunked, &direct);
        assert!(max < 1e-5, "{max}");
    }
}
