//! `AutoencoderKL` (diffusers `autoencoder_kl.py`, `vae.py`): image ↔ latent.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear, LinearConfig};
use burn::tensor::{Tensor, backend::Backend};
use serde::Deserialize;

use super::attention::{merge_heads, scaled_dot_product, split_heads};
use super::config::{ConfigError, at_most, positive_sizes, require};
use super::resnet::{ResnetBlock2D, ResnetSettings, conv2d, group_norm};
use super::unet_2d_blocks::CoderBlock2D;
use crate::sd::kernels;

/// The fields of a diffusers `vae/config.json` this implementation reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// `DownEncoderBlock2D` per resolution.
    pub down_block_types: Vec<String>,
    /// `UpDecoderBlock2D` per resolution.
    pub up_block_types: Vec<String>,
    /// Channels per resolution.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// Activation (only `silu`).
    pub act_fn: String,
    /// Latent channels.
    pub latent_channels: usize,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// Latents are multiplied by this before the UNet (0.18215 for SD).
    pub scaling_factor: f64,
    /// Whether `quant_conv` exists.
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have attention.
    pub mid_block_add_attention: bool,
    /// Must be null.
    pub shift_factor: Option<f64>,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            shift_factor: None,
        }
    }
}

impl AutoencoderKLConfig {
    /// SD-1.5's VAE config.
    pub fn sd15() -> Self {
        Self {
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            ..Self::default()
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(ConfigError::Invalid(
                "block_out_channels, down_block_types and up_block_types must have the same non-zero length".into(),
            ));
        }
        for t in &self.down_block_types {
            require(
                t == "DownEncoderBlock2D",
                "down_block_types",
                t,
                "DownEncoderBlock2D",
            )?;
        }
        for t in &self.up_block_types {
            require(
                t == "UpDecoderBlock2D",
                "up_block_types",
                t,
                "UpDecoderBlock2D",
            )?;
        }
        require(self.act_fn == "silu", "act_fn", &self.act_fn, "silu")?;
        require(
            self.shift_factor.is_none(),
            "shift_factor",
            self.shift_factor,
            "null",
        )?;
        at_most(&[
            ("the number of blocks", &[self.block_out_channels.len()], 8),
            ("block_out_channels", &self.block_out_channels, 1 << 16),
            ("layers_per_block", &[self.layers_per_block], 64),
            (
                "in_channels / out_channels / latent_channels",
                &[self.in_channels, self.out_channels, self.latent_channels],
                1 << 10,
            ),
        ])?;
        positive_sizes(self.norm_num_groups, &self.block_out_channels)?;
        for &c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                return Err(ConfigError::Invalid(format!(
                    "{c} channels are not divisible into {} norm groups",
                    self.norm_num_groups
                )));
            }
        }
        Ok(())
    }

    /// Build the autoencoder with freshly (lazily) initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<AutoencoderKL<B>, ConfigError> {
        self.check()?;
        let boc = &self.block_out_channels;
        let n = boc.len();
        let g = self.norm_num_groups;
        let resnet = ResnetSettings {
            groups: g,
            eps: 1e-6,
            temb_channels: None,
            output_scale_factor: 1.0,
        };
        let top = boc[n - 1];
        let mid = || MidBlock2D::new(top, self.mid_block_add_attention, resnet, device);

        let mut down_blocks = Vec::new();
        let mut out = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let input = out;
            out = c;
            down_blocks.push(CoderBlock2D::new(
                input,
                out,
                self.layers_per_block,
                false,
                i + 1 < n,
                resnet,
                device,
            ));
        }
        let encoder = Encoder {
            conv_in: conv2d(self.in_channels, boc[0], 3, device),
            down_blocks,
            mid_block: mid(),
            conv_norm_out: group_norm(g, top, 1e-6, device),
            conv_out: conv2d(top, 2 * self.latent_channels, 3, device),
        };

        let mut up_blocks = Vec::new();
        let mut out = top;
        for i in 0..n {
            let input = out;
            out = boc[n - 1 - i];
            up_blocks.push(CoderBlock2D::new(
                input,
                out,
                self.layers_per_block + 1,
                true,
                i + 1 < n,
                resnet,
                device,
            ));
        }
        let decoder = Decoder {
            conv_in: conv2d(self.latent_channels, top, 3, device),
            mid_block: mid(),
            up_blocks,
            conv_norm_out: group_norm(g, boc[0], 1e-6, device),
            conv_out: conv2d(boc[0], self.out_channels, 3, device),
        };
        let lc = self.latent_channels;
        Ok(AutoencoderKL {
            encoder,
            decoder,
            quant_conv: self
                .use_quant_conv
                .then(|| conv2d(2 * lc, 2 * lc, 1, device)),
            post_quant_conv: self.use_post_quant_conv.then(|| conv2d(lc, lc, 1, device)),
            scaling_factor: self.scaling_factor,
        })
    }
}

/// Single-head self-attention over pixels with GroupNorm and a residual (the VAE's mid block).
#[derive(Module, Debug)]
pub struct SpatialAttention<B: Backend> {
    group_norm: GroupNorm<B>,
    to_q: Linear<B>,
    to_k: Linear<B>,
    to_v: Linear<B>,
    to_out: Vec<Linear<B>>,
}

impl<B: Backend> SpatialAttention<B> {
    fn new(ch: usize, groups: usize, device: &B::Device) -> Self {
        let lin = || LinearConfig::new(ch, ch).init(device);
        Self {
            group_norm: group_norm(groups, ch, 1e-6, device),
            to_q: lin(),
            to_k: lin(),
            to_v: lin(),
            to_out: vec![lin()],
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let tokens = kernels::group_norm(&self.group_norm, x.clone(), false)
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let q = split_heads(self.to_q.forward(tokens.clone()), 1);
        let k = split_heads(self.to_k.forward(tokens.clone()), 1);
        let v = split_heads(self.to_v.forward(tokens), 1);
        let out = self.to_out[0].forward(merge_heads(scaled_dot_product(q, k, v, None)));
        out.swap_dims(1, 2).reshape([b, c, h, w]) + x
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, (attention,) resnet.
#[derive(Module, Debug)]
pub struct MidBlock2D<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    attentions: Vec<SpatialAttention<B>>,
}

impl<B: Backend> MidBlock2D<B> {
    fn new(ch: usize, attention: bool, resnet: ResnetSettings, device: &B::Device) -> Self {
        Self {
            resnets: (0..2)
                .map(|_| ResnetBlock2D::new(ch, ch, resnet, device))
                .collect(),
            attentions: if attention {
                vec![SpatialAttention::new(ch, resnet.groups, device)]
            } else {
                Vec::new()
            },
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x, None);
        if let Some(a) = self.attentions.first() {
            x = a.forward(x);
        }
        self.resnets[1].forward(x, None)
    }
}

/// Image → latent moments `[mean, logvar]`.
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    conv_in: Conv2d<B>,
    down_blocks: Vec<CoderBlock2D<B>>,
    mid_block: MidBlock2D<B>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

/// Latent → image.
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    conv_in: Conv2d<B>,
    mid_block: MidBlock2D<B>,
    up_blocks: Vec<CoderBlock2D<B>>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

/// The KL autoencoder of Stable Diffusion.
#[derive(Module, Debug)]
pub struct AutoencoderKL<B: Backend> {
    encoder: Encoder<B>,
    decoder: Decoder<B>,
    quant_conv: Option<Conv2d<B>>,
    post_quant_conv: Option<Conv2d<B>>,
    scaling_factor: f64,
}

impl<B: Backend> AutoencoderKL<B> {
    /// Latents are multiplied by this before diffusion and divided by it before decoding.
    pub fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }

    /// Mean and log-variance `[B, latent, H/f, W/f]` of the posterior for images in [−1, 1].
    pub fn encode(&self, image: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let e = &self.encoder;
        let mut x = kernels::conv2d(&e.conv_in, image);
        for block in &e.down_blocks {
            x = block.forward(x);
        }
        x = e.mid_block.forward(x);
        let x = kernels::group_norm(&e.conv_norm_out, x, true);
        let mut moments = kernels::conv2d(&e.conv_out, x);
        if let Some(q) = &self.quant_conv {
            moments = kernels::conv2d(q, moments);
        }
        let [b, c2, h, w] = moments.dims();
        let c = c2 / 2;
        let mean = moments.clone().slice([0..b, 0..c, 0..h, 0..w]);
        let logvar = moments.slice([0..b, c..c2, 0..h, 0..w]).clamp(-30.0, 20.0);
        (mean, logvar)
    }

    /// Decode (unscaled) latents to images in about [−1, 1].
    pub fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let d = &self.decoder;
        let z = match &self.post_quant_conv {
            Some(p) => kernels::conv2d(p, latents),
            None => latents,
        };
        let mut x = d.mid_block.forward(kernels::conv2d(&d.conv_in, z));
        for block in &d.up_blocks {
            x = block.forward(x);
        }
        let x = kernels::group_norm(&d.conv_norm_out, x, true);
        kernels::conv2d(&d.conv_out, x)
    }
}
