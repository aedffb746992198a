//! Caption–image data in Stable Diffusion's latent space: each image encoded once by the frozen
//! VAE (the posterior's mean × `scaling_factor`, as diffusers' training scripts do), so a 1-RF
//! fine-tune of an SD or InstaFlow UNet on real images never runs the encoder in its steps.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::sd::models::AutoencoderKL;
use crate::training::data::ImageTextDataset;

/// Images encoded by a VAE, with the captions of the data set they came from.
#[derive(Debug, Clone)]
pub struct EncodedImages {
    /// The data set's items and captions (its pixels are dropped once encoded).
    pub images: ImageTextDataset,
    /// Latent shape `[C, h, w]` of one image.
    pub shape: [usize; 3],
    /// Scaled latents, image after image.
    pub values: Vec<f32>,
}

impl EncodedImages {
    /// Encode every image of `data` with `vae`, `batch` at a time; `progress(done, total)` after
    /// each batch. Grey images are widened to the VAE's channels by repetition.
    pub fn encode<B: Backend>(
        data: &ImageTextDataset,
        vae: &AutoencoderKL<B>,
        vae_channels: usize,
        batch: usize,
        device: &B::Device,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, String> {
        if data.channels != vae_channels && data.channels != 1 {
            return Err(format!(
                "the data set has {}-channel images but the VAE encodes {vae_channels} channels",
                data.channels
            ));
        }
        let mut values = Vec::new();
        let mut shape = [0; 3];
        let all: Vec<usize> = (0..data.len()).collect();
        for rows in all.chunks(batch.max(1)) {
            let mut x = data.pixels::<B>(rows, device);
            if data.channels != vae_channels {
                x = x.repeat_dim(1, vae_channels);
            }
            let (mean, _) = vae.encode(x);
            let mean = mean * vae.scaling_factor();
            let [_, c, h, w] = mean.dims();
            shape = [c, h, w];
            let part = mean.into_data().convert::<f32>();
            values.extend_from_slice(part.as_slice::<f32>().map_err(|e| format!("{e:?}"))?);
            progress(values.len() / (c * h * w), data.len());
        }
        let mut images = data.clone();
        images.images = Vec::new();
        Ok(Self {
            images,
            shape,
            values,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Latents of images `indices`, `[B, C, h, w]`.
    pub fn latents<B: Backend>(&self, indices: &[usize], device: &B::Device) -> Tensor<B, 4> {
        let n = self.shape.iter().product::<usize>();
        let values: Vec<f32> = indices
            .iter()
            .flat_map(|&i| &self.values[i * n..(i + 1) * n])
            .copied()
            .collect();
        let [c, h, w] = self.shape;
        Tensor::from_data(TensorData::new(values, [indices.len(), c, h, w]), device)
    }
}
