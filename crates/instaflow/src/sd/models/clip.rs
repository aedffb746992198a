//! `CLIPTextModel` (transformers `modeling_clip.py`): the text encoder; its last hidden state is
//! the UNet's conditioning.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::{Int, Tensor, backend::Backend};
use serde::Deserialize;

use super::attention::{merge_heads, scaled_dot_product, split_heads};
use super::config::{ConfigError, require};
use crate::sd::kernels;

/// The fields of a transformers `text_encoder/config.json` this implementation reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    /// Vocabulary size (49,408 for CLIP).
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Context length (77).
    pub max_position_embeddings: usize,
    /// `quick_gelu` (CLIP) or `gelu`.
    pub hidden_act: String,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipTextConfig {
    /// CLIP ViT-L/14's text encoder (SD-1.5).
    pub fn sd15() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_attention_heads: 12,
            ..Self::default()
        }
    }

    /// Build the model with freshly (lazily) initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<ClipTextModel<B>, ConfigError> {
        let gelu_exact = match self.hidden_act.as_str() {
            "quick_gelu" => false,
            "gelu" => true,
            other => {
                return Err(ConfigError::Unsupported {
                    field: "hidden_act",
                    value: other.into(),
                    supported: "quick_gelu, gelu",
                });
            }
        };
        super::config::at_most(&[
            ("vocab_size", &[self.vocab_size], 1 << 20),
            ("hidden_size", &[self.hidden_size], 1 << 16),
            ("intermediate_size", &[self.intermediate_size], 1 << 18),
            ("num_hidden_layers", &[self.num_hidden_layers], 256),
            ("num_attention_heads", &[self.num_attention_heads], 1 << 12),
            (
                "max_position_embeddings",
                &[self.max_position_embeddings],
                1 << 16,
            ),
        ])?;
        let (d, h) = (self.hidden_size, self.num_attention_heads);
        require(
            h > 0 && d % h == 0,
            "num_attention_heads",
            h,
            "a divisor of hidden_size",
        )?;
        let ln = || {
            LayerNormConfig::new(d)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        Ok(ClipTextModel {
            text_model: ClipTextTransformer {
                embeddings: ClipEmbeddings {
                    token_embedding: EmbeddingConfig::new(self.vocab_size, d).init(device),
                    position_embedding: EmbeddingConfig::new(self.max_position_embeddings, d)
                        .init(device),
                },
                encoder: ClipEncoder {
                    layers: (0..self.num_hidden_layers)
                        .map(|_| ClipEncoderLayer {
                            self_attn: ClipAttention {
                                q_proj: lin(d, d),
                                k_proj: lin(d, d),
                                v_proj: lin(d, d),
                                out_proj: lin(d, d),
                                heads: h,
                            },
                            layer_norm1: ln(),
                            mlp: ClipMlp {
                                fc1: lin(d, self.intermediate_size),
                                fc2: lin(self.intermediate_size, d),
                                gelu_exact,
                            },
                            layer_norm2: ln(),
                        })
                        .collect(),
                },
                final_layer_norm: ln(),
            },
        })
    }

    /// Number of parameters, without allocating weights.
    pub fn num_params<B: Backend>(&self, device: &B::Device) -> Result<usize, ConfigError> {
        Ok(super::lazy_param_count(&self.init::<B>(device)?))
    }
}

/// Token and position embeddings.
#[derive(Module, Debug)]
pub struct ClipEmbeddings<B: Backend> {
    token_embedding: Embedding<B>,
    position_embedding: Embedding<B>,
}

/// Multi-head self-attention with biases.
#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    out_proj: Linear<B>,
    heads: usize,
}

/// Two-layer MLP with `quick_gelu` (`x·σ(1.702x)`) or exact GELU.
#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    fc1: Linear<B>,
    fc2: Linear<B>,
    gelu_exact: bool,
}

/// Pre-norm transformer layer.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    self_attn: ClipAttention<B>,
    layer_norm1: LayerNorm<B>,
    mlp: ClipMlp<B>,
    layer_norm2: LayerNorm<B>,
}

/// The stack of layers.
#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    layers: Vec<ClipEncoderLayer<B>>,
}

/// `text_model` of `CLIPTextModel`.
#[derive(Module, Debug)]
pub struct ClipTextTransformer<B: Backend> {
    embeddings: ClipEmbeddings<B>,
    encoder: ClipEncoder<B>,
    final_layer_norm: LayerNorm<B>,
}

/// The CLIP text encoder.
#[derive(Module, Debug)]
pub struct ClipTextModel<B: Backend> {
    text_model: ClipTextTransformer<B>,
}

impl<B: Backend> ClipTextModel<B> {
    /// Token ids `[B, S]` → last hidden state `[B, S, hidden]` (after the final LayerNorm).
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let tm = &self.text_model;
        let [b, s] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..s as i64, &device).reshape([1, s]);
        let mut x = tm.embeddings.token_embedding.forward(ids)
            + tm.embeddings
                .position_embedding
                .forward(positions)
                .expand([b as i64, -1, -1]);
        // Causal mask: token i sees tokens ≤ i. In the hidden state's float type (mixed-precision
        // training runs this in f16, where f32::MIN becomes −∞: still a zero weight).
        let mask = Tensor::<B, 2>::full([s, s], f32::MIN, &device)
            .triu(1)
            .cast(x.dtype());
        for layer in &tm.encoder.layers {
            let a = &layer.self_attn;
            let h = layer.layer_norm1.forward(x.clone());
            let [q, k, v] = kernels::linears([&a.q_proj, &a.k_proj, &a.v_proj], h)
                .map(|t| split_heads(t, a.heads));
            x = x + kernels::linear(
                &a.out_proj,
                merge_heads(scaled_dot_product(q, k, v, Some(mask.clone()))),
            );
            let h = kernels::linear(&layer.mlp.fc1, layer.layer_norm2.forward(x.clone()));
            let h = if layer.mlp.gelu_exact {
                gelu(h)
            } else {
                kernels::quick_gelu(h)
            };
            x = x + kernels::linear(&layer.mlp.fc2, h);
        }
        tm.final_layer_norm.forward(x)
    }
}
