//! Fused CPU kernels for the SD-1.5 hot spots on burn's `Flex` backend: GroupNorm(+SiLU) and the
//! attention softmax. burn composes these from many tensor ops (GroupNorm is about ten, each a
//! full pass and an allocation; flex runs element-wise ops on one thread); here each is one pass
//! over the data, split across threads.
//!
//! Rust has no specialisation, so the fast path is chosen at run time: when the backend *is*
//! `Flex` and the tensor is f32, its primitive is taken out, processed in place, and put back;
//! every other backend (wgpu, CUDA, autodiff for training) uses burn's ops unchanged. Written by
//! hand because no crate offers these over burn's tensors.

use std::any::{Any, TypeId};

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::nn::GroupNorm;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{DType, Tensor, TensorPrimitive, backend::Backend};

/// `x`'s storage as a unique, contiguous flex f32 tensor, or `x` back when the backend is not
/// flex or the tensor is not f32.
fn take_flex<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<FlexTensor, Tensor<B, D>> {
    if TypeId::of::<B>() != TypeId::of::<Flex>() || x.dtype() != DType::F32 {
        return Err(x);
    }
    let primitive: Box<dyn Any> = Box::new(x.into_primitive().tensor());
    let tensor = *primitive
        .downcast::<FlexTensor>()
        .expect("B is Flex, so its float primitive is a FlexTensor");
    // A strided or partial view is copied once (otherwise this shares the buffer); once the
    // original is dropped, a buffer nobody else holds is written in place, a shared one is copied.
    let whole = tensor.to_contiguous();
    drop(tensor);
    Ok(whole)
}

/// The inverse of [`take_flex`].
fn give_flex<B: Backend, const D: usize>(tensor: FlexTensor) -> Tensor<B, D> {
    let primitive: Box<dyn Any> = Box::new(tensor);
    let primitive = *primitive
        .downcast::<B::FloatTensorPrimitive>()
        .expect("B is Flex");
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// A parameter's values on the host (a few hundred floats: gamma/beta).
fn host_values<B: Backend>(t: &Tensor<B, 1>) -> Vec<f32> {
    t.to_data().convert::<f32>().to_vec().expect("f32 values")
}

/// Run `f` on each chunk of `data` (`chunk` elements, the last may be shorter) with its index,
/// on all cores where threads exist.
fn for_each_chunk(data: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Send + Sync) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
    #[cfg(target_arch = "wasm32")]
    data.chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, c)| f(i, c));
}

#[inline]
fn silu_f32(y: f32) -> f32 {
    y / (1.0 + (-y).exp())
}

/// `torch.nn.GroupNorm` on `[N, C, H, W]`, followed by SiLU when `then_silu` (the pair every SD
/// ResNet block and the VAE decoder use).
pub fn group_norm<B: Backend>(
    norm: &GroupNorm<B>,
    x: Tensor<B, 4>,
    then_silu: bool,
) -> Tensor<B, 4> {
    let mut t = match take_flex(x) {
        Ok(t) => t,
        Err(x) => {
            let y = norm.forward(x);
            return if then_silu { silu(y) } else { y };
        }
    };
    let dims = t.layout().shape().to_vec();
    let (channels, groups) = (dims[1], norm.num_groups);
    let spatial: usize = dims[2..].iter().product();
    let per_group = channels / groups * spatial;
    let (gamma, beta) = match (&norm.gamma, &norm.beta) {
        (Some(g), Some(b)) => (host_values(&g.val()), host_values(&b.val())),
        _ => (vec![1.0; channels], vec![0.0; channels]),
    };
    let eps = norm.epsilon;
    for_each_chunk(t.storage_mut::<f32>(), per_group, |index, data| {
        // Two passes in f64: the same statistics as torch's within float rounding.
        let n = data.len() as f64;
        let mean = data.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let rstd = 1.0 / (var + eps).sqrt();
        let first_channel = (index % groups) * (channels / groups);
        for (c, plane) in data.chunks_mut(spatial).enumerate() {
            let scale = (rstd * gamma[first_channel + c] as f64) as f32;
            let shift = (beta[first_channel + c] as f64
                - mean * rstd * gamma[first_channel + c] as f64) as f32;
            if then_silu {
                plane
                    .iter_mut()
                    .for_each(|v| *v = silu_f32(*v * scale + shift));
            } else {
                plane.iter_mut().for_each(|v| *v = *v * scale + shift);
            }
        }
    });
    give_flex(t)
}

/// Softmax over the last dimension (attention scores).
pub fn softmax_last<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let mut t = match take_flex(x) {
        Ok(t) => t,
        Err(x) => return softmax(x, D - 1),
    };
    let row = *t.layout().shape().last().expect("rank ≥ 1");
    // Rows are short (≤ 4096); hand each thread many of them.
    let rows_per_task = (65536 / row.max(1)).max(1);
    for_each_chunk(t.storage_mut::<f32>(), rows_per_task * row, |_, rows| {
        for r in rows.chunks_mut(row) {
            let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for v in r.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            r.iter_mut().for_each(|v| *v *= inv);
        }
    });
    give_flex(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::GroupNormConfig;
    use burn::tensor::{Distribution, Tolerance};

    fn affine(norm: GroupNorm<Flex>, channels: usize) -> GroupNorm<Flex> {
        let device = Default::default();
        let mut norm = norm;
        norm.gamma = Some(burn::module::Param::from_tensor(Tensor::random(
            [channels],
            Distribution::Normal(1.0, 0.5),
            &device,
        )));
        norm.beta = Some(burn::module::Param::from_tensor(Tensor::random(
            [channels],
            Distribution::Normal(0.0, 0.5),
            &device,
        )));
        norm
    }

    #[test]
    fn fused_group_norm_matches_burns_ops() {
        let device = Default::default();
        let norm = affine(
            GroupNormConfig::new(4, 12).with_epsilon(1e-6).init(&device),
            12,
        );
        // Shifted and scaled input: the mean/variance path must not lose precision.
        let x = Tensor::<Flex, 4>::random([2, 12, 5, 7], Distribution::Normal(3.0, 2.0), &device);
        for then_silu in [false, true] {
            let want = {
                let y = norm.forward(x.clone());
                if then_silu { silu(y) } else { y }
            };
            let got = group_norm(&norm, x.clone(), then_silu);
            got.into_data()
                .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-5));
        }
        // A strided (permuted) input is made contiguous first.
        let xt = x.clone().swap_dims(2, 3);
        let want = norm.forward(xt.clone());
        group_norm(&norm, xt, false)
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-5));
        // The input tensor someone else still holds is not written to.
        let before = x.to_data();
        let _ = group_norm(&norm, x.clone(), true);
        assert_eq!(x.into_data(), before);
    }

    #[test]
    fn fused_softmax_matches_burns_ops() {
        let device = Default::default();
        let x = Tensor::<Flex, 4>::random([2, 3, 9, 77], Distribution::Normal(0.0, 4.0), &device);
        let want = softmax(x.clone(), 3);
        softmax_last(x)
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-6));
        // Masked rows (−∞ after the diagonal) stay finite.
        let mask = Tensor::<Flex, 2>::full([9, 9], f32::MIN, &device).triu(1);
        let s = Tensor::<Flex, 2>::random([9, 9], Distribution::Default, &device) + mask;
        let got: Vec<f32> = softmax_last(s).into_data().to_vec().unwrap();
        assert!(got.iter().all(|v| v.is_finite()));
        assert!((got[0] - 1.0).abs() < 1e-6, "row 0 sees only token 0");
    }
}
