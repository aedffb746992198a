//! Micro-benchmark of the three kernels SD-style models spend their time in: a 3×3 convolution, a
//! matmul (a linear layer over all latent pixels) and multi-head attention. Used to compare backends.

use burn::tensor::activation::softmax;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Distribution, Tensor, backend::Backend};
use web_time::Instant;

/// Shapes of the benchmark block (defaults: SD-1.5's first UNet stage at a 64×64 latent, attention
/// at the 32×32 stage).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockShape {
    /// Channels of the convolution (in = out).
    pub channels: usize,
    /// Height = width of the convolution input.
    pub size: usize,
    /// Attention heads.
    pub heads: usize,
    /// Attention sequence length (latent pixels).
    pub seq: usize,
    /// Dimension per head.
    pub head_dim: usize,
}

impl Default for BlockShape {
    fn default() -> Self {
        Self {
            channels: 320,
            size: 64,
            heads: 8,
            seq: 1024,
            head_dim: 40,
        }
    }
}

/// Median milliseconds of each kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockTimings {
    /// 3×3 convolution, `channels → channels` on `size × size`.
    pub conv_ms: f64,
    /// `[size², channels] × [channels, channels]` matmul.
    pub matmul_ms: f64,
    /// `softmax(QKᵀ/√d)·V` over `heads × seq × seq`.
    pub attention_ms: f64,
}

impl BlockTimings {
    /// Sum of the three kernels.
    pub fn total_ms(&self) -> f64 {
        self.conv_ms + self.matmul_ms + self.attention_ms
    }
}

/// Wall times of a timed computation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunTimes {
    /// The first (warm-up) run: kernel compilation, autotune, lazy weight initialisation.
    pub first_ms: f64,
    /// Median of the runs after it.
    pub median_ms: f64,
}

/// Run `f` once untimed-for-the-median, then `repeats` times, waiting for each result.
pub fn time_runs<B: Backend, const D: usize>(
    repeats: usize,
    mut f: impl FnMut() -> Tensor<B, D>,
) -> RunTimes {
    // Reading a value back waits for asynchronous backends to finish.
    let mut run = || {
        let start = Instant::now();
        let _ = f().sum().into_data();
        start.elapsed().as_secs_f64() * 1e3
    };
    let first_ms = run();
    let mut times: Vec<f64> = (0..repeats.max(1)).map(|_| run()).collect();
    times.sort_by(f64::total_cmp);
    RunTimes {
        first_ms,
        median_ms: times[times.len() / 2],
    }
}

fn median_ms<B: Backend, const D: usize>(repeats: usize, f: impl FnMut() -> Tensor<B, D>) -> f64 {
    time_runs(repeats, f).median_ms
}

/// Time the block on `device`, `repeats` runs per kernel after one warm-up.
pub fn time_block<B: Backend>(
    device: &B::Device,
    shape: BlockShape,
    repeats: usize,
) -> BlockTimings {
    let normal = Distribution::Normal(0.0, 1.0);
    let (c, s) = (shape.channels, shape.size);
    let x = Tensor::<B, 4>::random([1, c, s, s], normal, device);
    let w = Tensor::<B, 4>::random([c, c, 3, 3], normal, device) * 0.02;
    let conv_ms = median_ms(repeats, || {
        conv2d(
            x.clone(),
            w.clone(),
            None,
            ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
        )
    });

    let a = Tensor::<B, 2>::random([s * s, c], normal, device);
    let b = Tensor::<B, 2>::random([c, c], normal, device);
    let matmul_ms = median_ms(repeats, || a.clone().matmul(b.clone()));

    let qkv = [shape.heads, shape.seq, shape.head_dim];
    let q = Tensor::<B, 3>::random(qkv, normal, device);
    let k = Tensor::<B, 3>::random(qkv, normal, device);
    let v = Tensor::<B, 3>::random(qkv, normal, device);
    let scale = 1.0 / (shape.head_dim as f64).sqrt();
    let attention_ms = median_ms(repeats, || {
        let scores = q.clone().matmul(k.clone().swap_dims(1, 2)) * scale;
        softmax(scores, 2).matmul(v.clone())
    });

    BlockTimings {
        conv_ms,
        matmul_ms,
        attention_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{TB, device};

    #[test]
    fn tiny_block_runs() {
        let shape = BlockShape {
            channels: 4,
            size: 8,
            heads: 2,
            seq: 16,
            head_dim: 4,
        };
        let t = time_block::<TB>(&device(), shape, 1);
        assert!(t.total_ms() >= 0.0 && t.total_ms().is_finite());
    }
}
