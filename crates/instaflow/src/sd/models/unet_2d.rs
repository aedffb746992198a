//! `UNet2DConditionModel` (diffusers `unet_2d_condition.py`) for SD-1.5-structured checkpoints.

use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{Tensor, backend::Backend};
use serde::Deserialize;

use super::attention::TransformerSettings;
use super::config::{ConfigError, OneOrMany, at_most, positive_sizes, require};
use super::embeddings::{TextTimeEmbedding, TimestepEmbedding, timestep_embedding};
use super::resnet::{ResnetSettings, conv2d, group_norm};
use super::unet_2d_blocks::{BlockSettings, DownBlock2D, MidBlock2DCrossAttn, UpBlock2D};
use crate::sd::kernels;

/// The fields of a diffusers `unet/config.json` this implementation reads (others are ignored).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    /// Latent resolution the model was trained at (an int or `[h, w]`).
    pub sample_size: Option<OneOrMany<usize>>,
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// Sinusoid order of the timestep embedding.
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep embedding.
    pub freq_shift: f64,
    /// `CrossAttnDownBlock2D` or `DownBlock2D` per resolution.
    pub down_block_types: Vec<String>,
    /// `UNetMidBlock2DCrossAttn` (or null for none).
    pub mid_block_type: Option<String>,
    /// `UpBlock2D` or `CrossAttnUpBlock2D` per resolution.
    pub up_block_types: Vec<String>,
    /// Channels per resolution.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: OneOrMany<usize>,
    /// Padding of the downsampling convolutions.
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets.
    pub mid_block_scale_factor: f64,
    /// Activation (only `silu`).
    pub act_fn: String,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// GroupNorm epsilon.
    pub norm_eps: f64,
    /// Text-embedding size.
    pub cross_attention_dim: OneOrMany<usize>,
    /// Transformer blocks per attention.
    pub transformer_layers_per_block: OneOrMany<usize>,
    /// Despite its name, the number of heads when `num_attention_heads` is unset (diffusers' reading).
    pub attention_head_dim: OneOrMany<usize>,
    /// Number of attention heads.
    pub num_attention_heads: Option<OneOrMany<usize>>,
    /// Linear instead of 1×1-conv transformer projections.
    pub use_linear_projection: bool,
    /// Must be false.
    pub center_input_sample: bool,
    /// Must be false.
    pub only_cross_attention: serde_json::Value,
    /// Must be false.
    pub dual_cross_attention: bool,
    /// Must be `default`.
    pub resnet_time_scale_shift: String,
    /// Must be `positional`.
    pub time_embedding_type: String,
    /// Must be null.
    pub class_embed_type: Option<String>,
    /// null, or `text`: the pooled prompt is added to the time embedding (diffusers'
    /// `TextTimeEmbedding`), which conditions every ResNet block on it.
    pub addition_embed_type: Option<String>,
    /// Heads of the `text` addition embedding's attention pooling.
    pub addition_embed_type_num_heads: usize,
    /// Must be 3.
    pub conv_in_kernel: usize,
    /// Must be 3.
    pub conv_out_kernel: usize,
    /// Must be null.
    pub time_cond_proj_dim: Option<usize>,
    /// Must be null.
    pub time_embedding_dim: Option<usize>,
    /// Must be null.
    pub timestep_post_act: Option<String>,
    /// Must be `default`.
    pub attention_type: String,
}

impl Default for UNet2DConditionConfig {
    /// diffusers' defaults for `UNet2DConditionModel` (SD-1.5 except `cross_attention_dim`).
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: OneOrMany::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: OneOrMany::One(1280),
            transformer_layers_per_block: OneOrMany::One(1),
            attention_head_dim: OneOrMany::One(8),
            num_attention_heads: None,
            use_linear_projection: false,
            center_input_sample: false,
            only_cross_attention: serde_json::Value::Bool(false),
            dual_cross_attention: false,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            class_embed_type: None,
            addition_embed_type: None,
            addition_embed_type_num_heads: 64,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            time_cond_proj_dim: None,
            time_embedding_dim: None,
            timestep_post_act: None,
            attention_type: "default".into(),
        }
    }
}

/// Per-block values resolved from a config, as diffusers resolves them.
/// Values one UNet forward pass produces, by kind (see
/// [`UNet2DConditionConfig::activation_census`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActivationCensus {
    /// Resnet blocks: input plus output widths × pixels.
    pub resnet: u64,
    /// Transformer blocks: width × pixels per transformer layer.
    pub transformer: u64,
    /// Attention scores: heads × pixels × (pixels + text tokens) per transformer layer.
    pub attention_scores: u64,
}

#[derive(Debug, Clone)]
struct Resolved {
    cross_attn_down: Vec<bool>,
    cross_attn_up: Vec<bool>,
    heads: Vec<usize>,
    layers: Vec<usize>,
    cross_dim: Vec<usize>,
    transformer_layers: Vec<usize>,
}

impl UNet2DConditionConfig {
    /// SD-1.5's UNet config.
    pub fn sd15() -> Self {
        Self {
            sample_size: Some(OneOrMany::One(64)),
            cross_attention_dim: OneOrMany::One(768),
            ..Self::default()
        }
    }

    /// Latent size `(h, w)` the model was trained at (64×64 for SD-1.5).
    pub fn latent_size(&self) -> (usize, usize) {
        match &self.sample_size {
            Some(OneOrMany::One(s)) => (*s, *s),
            Some(OneOrMany::Many(v)) if v.len() == 2 => (v[0], v[1]),
            _ => (64, 64),
        }
    }

    fn resolve(&self) -> Result<Resolved, ConfigError> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(ConfigError::Invalid(format!(
                "block_out_channels, down_block_types and up_block_types must have the same non-zero length (got {n}, {}, {})",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        let down = |t: &String| match t.as_str() {
            "CrossAttnDownBlock2D" => Ok(true),
            "DownBlock2D" => Ok(false),
            _ => Err(ConfigError::Unsupported {
                field: "down_block_types",
                value: t.clone(),
                supported: "CrossAttnDownBlock2D, DownBlock2D",
            }),
        };
        let up = |t: &String| match t.as_str() {
            "CrossAttnUpBlock2D" => Ok(true),
            "UpBlock2D" => Ok(false),
            _ => Err(ConfigError::Unsupported {
                field: "up_block_types",
                value: t.clone(),
                supported: "CrossAttnUpBlock2D, UpBlock2D",
            }),
        };
        require(
            self.mid_block_type.as_deref() == Some("UNetMidBlock2DCrossAttn"),
            "mid_block_type",
            &self.mid_block_type,
            "UNetMidBlock2DCrossAttn",
        )?;
        require(self.act_fn == "silu", "act_fn", &self.act_fn, "silu")?;
        require(
            !self.center_input_sample,
            "center_input_sample",
            self.center_input_sample,
            "false",
        )?;
        require(
            self.only_cross_attention == serde_json::Value::Bool(false),
            "only_cross_attention",
            &self.only_cross_attention,
            "false",
        )?;
        require(
            !self.dual_cross_attention,
            "dual_cross_attention",
            self.dual_cross_attention,
            "false",
        )?;
        require(
            self.resnet_time_scale_shift == "default",
            "resnet_time_scale_shift",
            &self.resnet_time_scale_shift,
            "default",
        )?;
        require(
            self.time_embedding_type == "positional",
            "time_embedding_type",
            &self.time_embedding_type,
            "positional",
        )?;
        require(
            self.class_embed_type.is_none(),
            "class_embed_type",
            &self.class_embed_type,
            "null",
        )?;
        require(
            matches!(self.addition_embed_type.as_deref(), None | Some("text")),
            "addition_embed_type",
            &self.addition_embed_type,
            "null or \"text\"",
        )?;
        require(
            self.conv_in_kernel == 3,
            "conv_in_kernel",
            self.conv_in_kernel,
            "3",
        )?;
        require(
            self.conv_out_kernel == 3,
            "conv_out_kernel",
            self.conv_out_kernel,
            "3",
        )?;
        require(
            self.time_cond_proj_dim.is_none(),
            "time_cond_proj_dim",
            self.time_cond_proj_dim,
            "null",
        )?;
        require(
            self.time_embedding_dim.is_none(),
            "time_embedding_dim",
            self.time_embedding_dim,
            "null",
        )?;
        require(
            self.timestep_post_act.is_none(),
            "timestep_post_act",
            &self.timestep_post_act,
            "null",
        )?;
        require(
            self.attention_type == "default",
            "attention_type",
            &self.attention_type,
            "default",
        )?;
        let sample = self
            .sample_size
            .as_ref()
            .map(OneOrMany::values)
            .unwrap_or_default();
        at_most(&[
            ("the number of blocks", &[n], 8),
            ("block_out_channels", &self.block_out_channels, 1 << 16),
            ("layers_per_block", &self.layers_per_block.values(), 64),
            (
                "transformer_layers_per_block",
                &self.transformer_layers_per_block.values(),
                64,
            ),
            (
                "cross_attention_dim",
                &self.cross_attention_dim.values(),
                1 << 16,
            ),
            (
                "attention_head_dim",
                &self.attention_head_dim.values(),
                1 << 16,
            ),
            (
                "num_attention_heads",
                &self
                    .num_attention_heads
                    .as_ref()
                    .map(OneOrMany::values)
                    .unwrap_or_default(),
                1 << 12,
            ),
            (
                "in_channels / out_channels",
                &[self.in_channels, self.out_channels],
                1 << 10,
            ),
            ("sample_size", &sample, 1 << 14),
        ])?;
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .per_block(n, "num_attention_heads")?;
        positive_sizes(self.norm_num_groups, &self.block_out_channels)?;
        for (i, (&h, &c)) in heads.iter().zip(&self.block_out_channels).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(ConfigError::Invalid(format!(
                    "block {i}: {c} channels are not divisible into {h} attention heads"
                )));
            }
            if c % self.norm_num_groups != 0 {
                return Err(ConfigError::Invalid(format!(
                    "block {i}: {c} channels are not divisible into {} norm groups",
                    self.norm_num_groups
                )));
            }
        }
        Ok(Resolved {
            cross_attn_down: self
                .down_block_types
                .iter()
                .map(down)
                .collect::<Result<_, _>>()?,
            cross_attn_up: self
                .up_block_types
                .iter()
                .map(up)
                .collect::<Result<_, _>>()?,
            heads,
            layers: self.layers_per_block.per_block(n, "layers_per_block")?,
            cross_dim: self
                .cross_attention_dim
                .per_block(n, "cross_attention_dim")?,
            transformer_layers: self
                .transformer_layers_per_block
                .per_block(n, "transformer_layers_per_block")?,
        })
    }

    /// How many values the UNet's layers produce in one forward pass over a `h`×`w` latent
    /// (batch 1) with `text_len` text tokens, by kind — what autodiff keeps for the backward pass
    /// grows with these (the training memory plan weighs them). Up blocks count their resnets'
    /// concatenated inputs as twice their width.
    pub fn activation_census(
        &self,
        h: usize,
        w: usize,
        text_len: usize,
    ) -> Result<ActivationCensus, ConfigError> {
        let r = self.resolve()?;
        let boc = &self.block_out_channels;
        let n = boc.len();
        let mut census = ActivationCensus::default();
        let spatial = |level: usize| ((h >> level) * (w >> level)) as u64;
        let transformer = |census: &mut ActivationCensus, level: usize, count: usize| {
            let (s, c) = (spatial(level), boc[level] as u64);
            let layers = (count * r.transformer_layers[level]) as u64;
            census.transformer += layers * c * s;
            census.attention_scores += layers * r.heads[level] as u64 * s * (s + text_len as u64);
        };
        let mut in_ch = boc[0] as u64;
        for (level, &c) in boc.iter().enumerate() {
            let c = c as u64;
            census.resnet += (in_ch + c) * spatial(level)
                + (r.layers[level] as u64 - 1) * 2 * c * spatial(level);
            in_ch = c;
            if r.cross_attn_down[level] {
                transformer(&mut census, level, r.layers[level]);
            }
        }
        census.resnet += 2 * 2 * boc[n - 1] as u64 * spatial(n - 1);
        transformer(&mut census, n - 1, 1);
        for (i, &cross) in r.cross_attn_up.iter().enumerate() {
            let level = n - 1 - i;
            let layers = r.layers[level] + 1;
            census.resnet += layers as u64 * 3 * boc[level] as u64 * spatial(level);
            if cross {
                transformer(&mut census, level, layers);
            }
        }
        Ok(census)
    }

    /// Build the model with freshly initialised weights on `device`.
    pub fn init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<UNet2DConditionModel<B>, ConfigError> {
        let r = self.resolve()?;
        let boc = &self.block_out_channels;
        let n = boc.len();
        let temb_dim = 4 * boc[0];
        let resnet = ResnetSettings {
            groups: self.norm_num_groups,
            eps: self.norm_eps,
            temb_channels: Some(temb_dim),
            output_scale_factor: 1.0,
        };
        let transformer = |i: usize| TransformerSettings {
            heads: r.heads[i],
            layers: r.transformer_layers[i],
            cross_attention_dim: r.cross_dim[i],
            groups: self.norm_num_groups,
            use_linear_projection: self.use_linear_projection,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = boc[0];
        for (i, &channels) in boc.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = channels;
            let s = BlockSettings {
                layers: r.layers[i],
                transformer: r.cross_attn_down[i].then(|| transformer(i)),
                resnet,
                resample: i + 1 < n,
                downsample_padding: self.downsample_padding,
            };
            down_blocks.push(DownBlock2D::new(in_ch, out_ch, s, device));
        }

        let mid_block = MidBlock2DCrossAttn::new(
            boc[n - 1],
            transformer(n - 1),
            ResnetSettings {
                output_scale_factor: self.mid_block_scale_factor,
                ..resnet
            },
            device,
        );

        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = boc[n - 1];
        for i in 0..n {
            let rev = n - 1 - i;
            let prev_ch = out_ch;
            out_ch = boc[rev];
            let skip_in = boc[rev.saturating_sub(1)];
            let s = BlockSettings {
                layers: r.layers[rev] + 1,
                transformer: r.cross_attn_up[i].then(|| transformer(rev)),
                resnet,
                resample: i + 1 < n,
                downsample_padding: 0,
            };
            up_blocks.push(UpBlock2D::new(prev_ch, skip_in, out_ch, s, device));
        }

        Ok(UNet2DConditionModel {
            conv_in: conv2d(self.in_channels, boc[0], 3, device),
            time_embedding: TimestepEmbedding::new(boc[0], temb_dim, device),
            add_embedding: self.text_time_embedding(&r, temb_dim, device)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(self.norm_num_groups, boc[0], self.norm_eps, device),
            conv_out: conv2d(boc[0], self.out_channels, 3, device),
            time_proj_dim: boc[0],
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
        })
    }

    /// The `text` addition embedding, when the config asks for it.
    fn text_time_embedding<B: Backend>(
        &self,
        r: &Resolved,
        temb_dim: usize,
        device: &B::Device,
    ) -> Result<Option<TextTimeEmbedding<B>>, ConfigError> {
        if self.addition_embed_type.is_none() {
            return Ok(None);
        }
        let (dim, heads) = (r.cross_dim[0], self.addition_embed_type_num_heads);
        require(
            heads > 0 && dim % heads == 0,
            "addition_embed_type_num_heads",
            heads,
            "a divisor of cross_attention_dim",
        )?;
        Ok(Some(TextTimeEmbedding::new(dim, temb_dim, heads, device)))
    }

    /// Number of parameters, from the config; weights are initialised lazily, so none are allocated.
    pub fn num_params<B: Backend>(&self, device: &B::Device) -> Result<usize, ConfigError> {
        Ok(super::lazy_param_count(&self.init::<B>(device)?))
    }
}

/// The SD UNet, predicting (for InstaFlow checkpoints) the velocity `v` directly.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel<B: Backend> {
    conv_in: Conv2d<B>,
    time_embedding: TimestepEmbedding<B>,
    add_embedding: Option<TextTimeEmbedding<B>>,
    down_blocks: Vec<DownBlock2D<B>>,
    mid_block: MidBlock2DCrossAttn<B>,
    up_blocks: Vec<UpBlock2D<B>>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
    time_proj_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// `sample` `[B, 4, h, w]`, float UNet timesteps `[B]` (τ ∈ [0, 1000]), text `[B, 77, D]`.
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timesteps: Tensor<B, 1>,
        context: &Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        let t = timestep_embedding(
            timesteps,
            self.time_proj_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
        );
        let mut temb = self.time_embedding.forward(t);
        if let Some(add) = &self.add_embedding {
            temb = temb + add.forward(context.clone());
        }

        let mut x = kernels::conv2d(&self.conv_in, sample);
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(x, Some(&temb), Some(context), &mut skips);
        }
        x = self.mid_block.forward(x, &temb, context);
        for block in &self.up_blocks {
            x = block.forward(x, Some(&temb), Some(context), &mut skips);
        }
        let x = kernels::group_norm(&self.conv_norm_out, x, true);
        kernels::conv2d(&self.conv_out, x)
    }
}
