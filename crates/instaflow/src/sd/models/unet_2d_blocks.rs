//! UNet blocks (diffusers `unet_2d_blocks.py`). `CrossAttnDownBlock2D` and `DownBlock2D` share one
//! struct (a plain block has no `attentions`), as do the up blocks, so tensor paths stay diffusers'.

use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

use super::attention::{Transformer2DModel, TransformerSettings};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetSettings, Upsample2D};

/// One transformer per resnet for cross-attention blocks, none for plain ones.
fn transformers<B: Backend>(
    s: &BlockSettings,
    channels: usize,
    device: &B::Device,
) -> Vec<Transformer2DModel<B>> {
    s.transformer
        .map(|t| {
            (0..s.layers)
                .map(|_| Transformer2DModel::new(channels, t, device))
                .collect()
        })
        .unwrap_or_default()
}

/// A resnet followed, in cross-attention blocks, by its transformer.
fn layer<B: Backend>(
    resnet: &ResnetBlock2D<B>,
    attention: Option<&Transformer2DModel<B>>,
    x: Tensor<B, 4>,
    temb: Option<&Tensor<B, 2>>,
    context: Option<&Tensor<B, 3>>,
) -> Tensor<B, 4> {
    let x = resnet.forward(x, temb);
    match (attention, context) {
        (Some(attn), Some(ctx)) => attn.forward(x, ctx),
        _ => x,
    }
}

/// `CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (without).
#[derive(Module, Debug)]
pub struct DownBlock2D<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    attentions: Vec<Transformer2DModel<B>>,
    downsamplers: Vec<Downsample2D<B>>,
}

/// Shape of one down or up block.
#[derive(Debug, Clone, Copy)]
pub struct BlockSettings {
    /// Resnet layers.
    pub layers: usize,
    /// Cross-attention transformers after each resnet, or `None` for a plain block.
    pub transformer: Option<TransformerSettings>,
    /// Resnet settings.
    pub resnet: ResnetSettings,
    /// Whether the block changes resolution at its end.
    pub resample: bool,
    /// Padding of the downsampling convolution.
    pub downsample_padding: usize,
}

impl<B: Backend> DownBlock2D<B> {
    /// Build a block from `in_ch` to `out_ch` channels.
    pub fn new(in_ch: usize, out_ch: usize, s: BlockSettings, device: &B::Device) -> Self {
        Self {
            resnets: (0..s.layers)
                .map(|j| {
                    ResnetBlock2D::new(
                        if j == 0 { in_ch } else { out_ch },
                        out_ch,
                        s.resnet,
                        device,
                    )
                })
                .collect(),
            attentions: transformers(&s, out_ch, device),
            downsamplers: if s.resample {
                vec![Downsample2D::new(out_ch, s.downsample_padding, device)]
            } else {
                Vec::new()
            },
        }
    }

    /// Returns the output and pushes every intermediate state onto `skips`.
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        temb: Option<&Tensor<B, 2>>,
        context: Option<&Tensor<B, 3>>,
        skips: &mut Vec<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            x = layer(resnet, self.attentions.get(j), x, temb, context);
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = down.forward(x);
            skips.push(x.clone());
        }
        x
    }
}

/// `CrossAttnUpBlock2D` or `UpBlock2D`: resnets take the previous output concatenated with a skip.
#[derive(Module, Debug)]
pub struct UpBlock2D<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    attentions: Vec<Transformer2DModel<B>>,
    upsamplers: Vec<Upsample2D<B>>,
}

impl<B: Backend> UpBlock2D<B> {
    /// Build an up block: `prev_ch` from below, skips of `skip_in_ch` (last layer) / `out_ch`.
    pub fn new(
        prev_ch: usize,
        skip_in_ch: usize,
        out_ch: usize,
        s: BlockSettings,
        device: &B::Device,
    ) -> Self {
        Self {
            resnets: (0..s.layers)
                .map(|j| {
                    let skip = if j == s.layers - 1 {
                        skip_in_ch
                    } else {
                        out_ch
                    };
                    let input = if j == 0 { prev_ch } else { out_ch };
                    ResnetBlock2D::new(input + skip, out_ch, s.resnet, device)
                })
                .collect(),
            attentions: transformers(&s, out_ch, device),
            upsamplers: if s.resample {
                vec![Upsample2D::new(out_ch, device)]
            } else {
                Vec::new()
            },
        }
    }

    /// Consumes skips from the end of `skips`.
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        temb: Option<&Tensor<B, 2>>,
        context: Option<&Tensor<B, 3>>,
        skips: &mut Vec<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("as many skips as up-block resnets");
            x = layer(
                resnet,
                self.attentions.get(j),
                Tensor::cat(vec![x, skip], 1),
                temb,
                context,
            );
        }
        for up in &self.upsamplers {
            x = up.forward(x);
        }
        x
    }

    /// Number of resnets (skips consumed).
    pub fn layers(&self) -> usize {
        self.resnets.len()
    }
}

/// Encoder/decoder block of the VAE (`DownEncoderBlock2D` / `UpDecoderBlock2D`): resnets without
/// time embedding and an optional resampler.
#[derive(Module, Debug)]
pub struct CoderBlock2D<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    downsamplers: Vec<Downsample2D<B>>,
    upsamplers: Vec<Upsample2D<B>>,
}

impl<B: Backend> CoderBlock2D<B> {
    /// `DownEncoderBlock2D` (downsampling with padding 0) or `UpDecoderBlock2D` (upsampling).
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        layers: usize,
        up: bool,
        resample: bool,
        resnet: ResnetSettings,
        device: &B::Device,
    ) -> Self {
        Self {
            resnets: (0..layers)
                .map(|j| {
                    ResnetBlock2D::new(if j == 0 { in_ch } else { out_ch }, out_ch, resnet, device)
                })
                .collect(),
            downsamplers: if resample && !up {
                vec![Downsample2D::new(out_ch, 0, device)]
            } else {
                Vec::new()
            },
            upsamplers: if resample && up {
                vec![Upsample2D::new(out_ch, device)]
            } else {
                Vec::new()
            },
        }
    }

    /// Apply the block.
    pub fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for r in &self.resnets {
            x = r.forward(x, None);
        }
        for d in &self.downsamplers {
            x = d.forward(x);
        }
        for u in &self.upsamplers {
            x = u.forward(x);
        }
        x
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) per layer.
#[derive(Module, Debug)]
pub struct MidBlock2DCrossAttn<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    attentions: Vec<Transformer2DModel<B>>,
}

impl<B: Backend> MidBlock2DCrossAttn<B> {
    /// Build with one transformer/resnet pair (SD's `num_layers = 1`).
    pub fn new(
        ch: usize,
        t: TransformerSettings,
        resnet: ResnetSettings,
        device: &B::Device,
    ) -> Self {
        Self {
            resnets: (0..2)
                .map(|_| ResnetBlock2D::new(ch, ch, resnet, device))
                .collect(),
            attentions: vec![Transformer2DModel::new(ch, t, device)],
        }
    }

    /// Apply the block.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x, Some(temb));
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = resnet.forward(attn.forward(x, context), Some(temb));
        }
        x
    }
}
