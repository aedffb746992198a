//! A small MLP velocity field `v(x, t | label)` for 2-D problems.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::activation::silu;
use burn::tensor::{Int, Tensor, backend::Backend};

use crate::flow::velocity::VelocityField;

/// Configuration of [`ToyMlp`].
#[derive(Config, Debug)]
pub struct ToyMlpConfig {
    /// Number of class labels; label `classes` is the null condition.
    pub classes: usize,
    /// Width of the hidden layers.
    #[config(default = 128)]
    pub hidden: usize,
    /// Number of hidden layers.
    #[config(default = 3)]
    pub depth: usize,
    /// Size of the label embedding.
    #[config(default = 16)]
    pub embed_dim: usize,
    /// Number of sinusoidal time frequencies (each gives a sin and a cos feature).
    #[config(default = 4)]
    pub time_freqs: usize,
}

impl ToyMlpConfig {
    /// Build the network with freshly initialised weights on `device`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ToyMlp<B> {
        let input = 2 + 1 + 2 * self.time_freqs + self.embed_dim;
        ToyMlp {
            label_embedding: EmbeddingConfig::new(self.classes + 1, self.embed_dim).init(device),
            input: LinearConfig::new(input, self.hidden).init(device),
            hidden: (1..self.depth)
                .map(|_| LinearConfig::new(self.hidden, self.hidden).init(device))
                .collect(),
            output: LinearConfig::new(self.hidden, 2).init(device),
            time_freqs: self.time_freqs,
        }
    }
}

/// MLP on `[x, t, sin(πkt), cos(πkt), embed(label)]` with SiLU activations.
#[derive(Module, Debug)]
pub struct ToyMlp<B: Backend> {
    label_embedding: Embedding<B>,
    input: Linear<B>,
    hidden: Vec<Linear<B>>,
    output: Linear<B>,
    time_freqs: usize,
}

impl<B: Backend> ToyMlp<B> {
    fn time_features(&self, t: Tensor<B, 1>) -> Tensor<B, 2> {
        let n = t.dims()[0];
        let t = t.reshape([n, 1]);
        let mut features = vec![t.clone()];
        for k in 1..=self.time_freqs {
            let arg = t.clone() * (std::f64::consts::PI * k as f64);
            features.push(arg.clone().sin());
            features.push(arg.cos());
        }
        Tensor::cat(features, 1)
    }
}

impl<B: Backend> VelocityField<B, 2> for ToyMlp<B> {
    /// Labels `[B]`; the value `classes` means "no condition".
    type Cond = Tensor<B, 1, Int>;

    fn velocity(&self, x: Tensor<B, 2>, t: Tensor<B, 1>, labels: &Self::Cond) -> Tensor<B, 2> {
        let n = x.dims()[0];
        let embedded = self.label_embedding.forward(labels.clone().reshape([n, 1]));
        let embedded = embedded.reshape([n, self.label_embedding.weight.dims()[1]]);
        let h = Tensor::cat(vec![x, self.time_features(t), embedded], 1);
        let mut h = silu(self.input.forward(h));
        for layer in &self.hidden {
            h = silu(layer.forward(h));
        }
        self.output.forward(h)
    }
}
