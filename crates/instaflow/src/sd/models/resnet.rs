//! `ResnetBlock2D`, `Downsample2D`, `Upsample2D` (diffusers `resnet.py`, `downsampling.py`,
//! `upsampling.py`).

use crate::sd::kernels;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::silu;
use burn::tensor::{Tensor, backend::Backend};

/// A `k×k` stride-1 convolution padded by `k/2` (diffusers' `conv1`, `conv_in`, …).
pub fn conv2d<B: Backend>(in_ch: usize, out_ch: usize, k: usize, device: &B::Device) -> Conv2d<B> {
    let p = k / 2;
    Conv2dConfig::new([in_ch, out_ch], [k, k])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .init(device)
}

/// `torch.nn.GroupNorm(groups, channels, eps)`.
pub fn group_norm<B: Backend>(
    groups: usize,
    channels: usize,
    eps: f64,
    device: &B::Device,
) -> GroupNorm<B> {
    GroupNormConfig::new(groups, channels)
        .with_epsilon(eps)
        .init(device)
}

/// Residual block with an optional time embedding (`time_embedding_norm = "default"`).
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: Backend> {
    norm1: GroupNorm<B>,
    conv1: Conv2d<B>,
    time_emb_proj: Option<Linear<B>>,
    norm2: GroupNorm<B>,
    conv2: Conv2d<B>,
    conv_shortcut: Option<Conv2d<B>>,
    output_scale_factor: f64,
}

/// Settings of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetSettings {
    /// GroupNorm groups.
    pub groups: usize,
    /// GroupNorm epsilon.
    pub eps: f64,
    /// Size of the time embedding, or `None` (VAE).
    pub temb_channels: Option<usize>,
    /// The output is divided by this.
    pub output_scale_factor: f64,
}

impl<B: Backend> ResnetBlock2D<B> {
    /// Build a block from `in_ch` to `out_ch` channels.
    pub fn new(in_ch: usize, out_ch: usize, s: ResnetSettings, device: &B::Device) -> Self {
        Self {
            norm1: group_norm(s.groups, in_ch, s.eps, device),
            conv1: conv2d(in_ch, out_ch, 3, device),
            time_emb_proj: s
                .temb_channels
                .map(|t| LinearConfig::new(t, out_ch).init(device)),
            norm2: group_norm(s.groups, out_ch, s.eps, device),
            conv2: conv2d(out_ch, out_ch, 3, device),
            conv_shortcut: (in_ch != out_ch).then(|| conv2d(in_ch, out_ch, 1, device)),
            output_scale_factor: s.output_scale_factor,
        }
    }

    /// `x`: `[B, C, H, W]`; `temb`: `[B, T]` (already the UNet's time embedding).
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<&Tensor<B, 2>>) -> Tensor<B, 4> {
        let mut h = kernels::conv2d(
            &self.conv1,
            kernels::group_norm(&self.norm1, x.clone(), true),
        );
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(silu(temb.clone()));
            let [b, c] = t.dims();
            h = h + t.reshape([b, c, 1, 1]);
        }
        let h = kernels::conv2d(&self.conv2, kernels::group_norm(&self.norm2, h, true));
        let x = match &self.conv_shortcut {
            Some(c) => kernels::conv2d(c, x),
            None => x,
        };
        let out = x + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// Stride-2 convolution. With `padding = 0` (the VAE encoder) the input is first padded by one pixel
/// on the right and bottom, as diffusers does.
#[derive(Module, Debug)]
pub struct Downsample2D<B: Backend> {
    conv: Conv2d<B>,
}

impl<B: Backend> Downsample2D<B> {
    /// Build with the given symmetric `padding` (1 in the UNet, 0 in the VAE).
    pub fn new(channels: usize, padding: usize, device: &B::Device) -> Self {
        let pad = if padding == 0 {
            PaddingConfig2d::Explicit(0, 0, 1, 1)
        } else {
            PaddingConfig2d::Explicit(padding, padding, padding, padding)
        };
        Self {
            conv: Conv2dConfig::new([channels, channels], [3, 3])
                .with_stride([2, 2])
                .with_padding(pad)
                .init(device),
        }
    }

    /// Halve the resolution.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        kernels::conv2d(&self.conv, x)
    }
}

/// Nearest-neighbour ×2 upsampling followed by a 3×3 convolution.
#[derive(Module, Debug)]
pub struct Upsample2D<B: Backend> {
    conv: Conv2d<B>,
}

impl<B: Backend> Upsample2D<B> {
    /// Build for `channels` channels.
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self {
            conv: conv2d(channels, channels, 3, device),
        }
    }

    /// Double the resolution.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        // Exact nearest ×2: repeat every pixel into a 2×2 square.
        let x = x
            .reshape([b, c, h, 1, w, 1])
            .expand([b, c, h, 2, w, 2])
            .reshape([b, c, 2 * h, 2 * w]);
        kernels::conv2d(&self.conv, x)
    }
}
