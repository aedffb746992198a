//! A small CNN classifier trained on the same data as the generator: its penultimate features
//! stand in for Inception's in the Fréchet distance (Inception weights cannot be had offline), and
//! its predictions check that an image shows what its prompt asked for.

use std::path::Path;

use burn::module::{AutodiffModule, Module};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::activation::relu;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::module::avg_pool2d;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use burn_store::{ModuleSnapshot, SafetensorsStore};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::flow::noise;
use crate::training::data::ImageTextDataset;

/// Shape of a [`Classifier`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    /// Image channels.
    pub channels: usize,
    /// Image side (a multiple of 4).
    pub size: usize,
    /// Number of classes.
    pub classes: usize,
    /// Width of the first convolution.
    pub width: usize,
    /// Size of the feature vector used by the Fréchet distance.
    pub features: usize,
}

/// conv–relu–pool ×2, then a feature layer and a linear head.
#[derive(Module, Debug)]
pub struct Classifier<B: Backend> {
    conv1: Conv2d<B>,
    conv2: Conv2d<B>,
    conv3: Conv2d<B>,
    features: Linear<B>,
    head: Linear<B>,
}

impl ClassifierConfig {
    /// A fresh classifier.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Classifier<B> {
        let conv = |i, o| {
            Conv2dConfig::new([i, o], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        let w = self.width;
        let flat = 2 * w * (self.size / 4) * (self.size / 4);
        Classifier {
            conv1: conv(self.channels, w),
            conv2: conv(w, 2 * w),
            conv3: conv(2 * w, 2 * w),
            features: LinearConfig::new(flat, self.features).init(device),
            head: LinearConfig::new(self.features, self.classes).init(device),
        }
    }
}

fn pool<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    avg_pool2d(x, [2, 2], [2, 2], [0, 0], true, false)
}

impl<B: Backend> Classifier<B> {
    /// Penultimate features `[B, F]` of images in `[-1, 1]`.
    pub fn features(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = pool(relu(self.conv1.forward(x)));
        let x = pool(relu(self.conv2.forward(x)));
        let x = relu(self.conv3.forward(x));
        relu(self.features.forward(x.flatten(1, 3)))
    }

    /// Class logits `[B, K]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        self.head.forward(self.features(x))
    }

    /// Predicted class of each image.
    pub fn predict(&self, x: Tensor<B, 4>) -> Vec<usize> {
        let idx = self.forward(x).argmax(1);
        idx.into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .expect("i64")
            .into_iter()
            .map(|i| i as usize)
            .collect()
    }

    /// Save the weights (safetensors) and the config (JSON next to it).
    pub fn save(&self, cfg: &ClassifierConfig, path: &Path) -> Result<(), String> {
        let mut store = SafetensorsStore::from_file(path).overwrite(true);
        self.save_into(&mut store)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::write(
            path.with_extension("json"),
            serde_json::to_vec_pretty(cfg).expect("json"),
        )
        .map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Load a classifier written by [`Classifier::save`].
pub fn load<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<(ClassifierConfig, Classifier<B>), String> {
    let cfg_path = path.with_extension("json");
    let text = std::fs::read(&cfg_path).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    let cfg: ClassifierConfig =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    let mut model = cfg.init::<B>(device);
    let mut store = SafetensorsStore::from_file(path);
    model
        .load_from(&mut store)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((cfg, model))
}

/// Train a classifier of `data`'s labels with Adam at learning rate `lr`; returns it with its
/// accuracy on `test`.
pub fn train<B: AutodiffBackend>(
    data: &ImageTextDataset,
    test: &ImageTextDataset,
    epochs: usize,
    lr: f64,
    seed: u64,
    device: &B::Device,
    mut progress: impl FnMut(usize, usize, f64),
) -> (ClassifierConfig, Classifier<B::InnerBackend>, f64) {
    let cfg = ClassifierConfig {
        channels: data.channels,
        size: data.height,
        classes: data.classes.len().max(1),
        width: 16,
        features: 64,
    };
    let mut model = cfg.init::<B>(device);
    let mut optim = AdamConfig::new().init();
    let mut rng = noise::rng(seed);
    let labelled: Vec<usize> = (0..data.len())
        .filter(|&i| data.items[i].label.is_some())
        .collect();
    let batch = 64;
    let total = epochs * labelled.len().div_ceil(batch);
    let mut step = 0;
    for _ in 0..epochs {
        let mut order = labelled.clone();
        order.shuffle(&mut rng);
        for idx in order.chunks(batch) {
            let x = data.pixels::<B>(idx, device);
            let y: Vec<i64> = idx
                .iter()
                .map(|&i| data.items[i].label.unwrap_or(0) as i64)
                .collect();
            let y = Tensor::<B, 1, Int>::from_data(TensorData::new(y, [idx.len()]), device);
            let loss = CrossEntropyLossConfig::new()
                .init(device)
                .forward(model.forward(x), y);
            let value: f64 = loss.clone().into_scalar().elem();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
            step += 1;
            progress(step, total, value);
        }
    }
    let model = model.valid();
    let accuracy = accuracy(&model, test, device);
    (cfg, model, accuracy)
}

/// Share of `data`'s labelled images the classifier gets right.
pub fn accuracy<B: Backend>(
    model: &Classifier<B>,
    data: &ImageTextDataset,
    device: &B::Device,
) -> f64 {
    let labelled: Vec<usize> = (0..data.len())
        .filter(|&i| data.items[i].label.is_some())
        .collect();
    let mut right = 0;
    for idx in labelled.chunks(256) {
        let pred = model.predict(data.pixels::<B>(idx, device));
        right += idx
            .iter()
            .zip(pred)
            .filter(|&(&i, p)| data.items[i].label == Some(p))
            .count();
    }
    right as f64 / labelled.len().max(1) as f64
}
