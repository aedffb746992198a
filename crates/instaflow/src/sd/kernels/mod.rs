//! CPU kernels for the SD-1.5 hot spots on burn's `Flex` backend: 2-D convolution, GroupNorm
//! (+SiLU) and attention. burn composes GroupNorm from about ten tensor ops, each a full
//! pass and an allocation, and flex runs element-wise ops on one thread; here each is one pass
//! split across threads. flex's convolution re-flattens the weights, transposes the input to NHWC
//! on one thread and packs the weights again for every 512-pixel tile; here the weights are used
//! in their stored `[O, C·kh·kw]` layout, im2col is built in parallel in `[C·kh·kw, pixels]`
//! order, and one multithreaded gemm writes straight into the NCHW output. 3×3 stride-1
//! convolutions on images of 64×64 and more take the Winograd path ([`winograd`]) instead.
//! The transformer activations (GEGLU, `quick_gelu`) are fused passes too ([`activation`]), and
//! `Linear` layers one gemm with the bias folded in ([`linear`]).
//!
//! Rust has no specialisation, so the fast path is chosen at run time: when the backend *is*
//! `Flex` and the tensor is f32, its primitive is taken out, processed in place, and put back;
//! every other backend (wgpu, CUDA, autodiff for training) uses burn's ops unchanged. Written by
//! hand because no crate offers these over burn's tensors.

use std::any::{Any, TypeId};

mod activation;
mod linear;
mod winograd;

pub use activation::{gelu_gate, quick_gelu};
pub use linear::{linear, linears};

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::backend::flex::ops::unary::exp_f32;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, PaddingConfig2d};
use burn::tensor::activation::silu;
use burn::tensor::{DType, Tensor, TensorPrimitive, backend::Backend};

/// `x`'s storage as a unique, contiguous flex f32 tensor, or `x` back when the backend is not
/// flex or the tensor is not f32.
fn take_flex<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<FlexTensor, Tensor<B, D>> {
    let tensor = take_flex_view(x)?;
    // A strided or partial view is copied once (otherwise this shares the buffer); once the
    // original is dropped, a buffer nobody else holds is written in place, a shared one is copied.
    let whole = tensor.to_contiguous();
    drop(tensor);
    Ok(whole)
}

/// Whether `B` is the CPU backend these kernels serve (whose products read strided views).
pub fn is_flex<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Flex>()
}

/// `x`'s flex f32 primitive as it is (possibly a strided view), or `x` back.
fn take_flex_view<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<FlexTensor, Tensor<B, D>> {
    if !is_flex::<B>() || x.dtype() != DType::F32 {
        return Err(x);
    }
    let primitive: Box<dyn Any> = Box::new(x.into_primitive().tensor());
    Ok(*primitive
        .downcast::<FlexTensor>()
        .expect("B is Flex, so its float primitive is a FlexTensor"))
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

/// Run `f` compiled for AVX2 + FMA when the CPU has them (std caches the check), else as the
/// crate is built. Without this our element-wise loops are compiled for x86-64's SSE2 baseline and
/// run four lanes wide; gemm does its own dispatch, but the softmax, GroupNorm and activation
/// passes around it took 15% of the UNet's time on an AVX2 machine. Only code inlined into `f`
/// gets the features: callers pass a closure over an `#[inline(always)]` function. Written by hand
/// because it is a dozen lines (`pulp`, which gemm uses, wants a trait impl per call site).
#[inline(always)]
fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features `with_avx2` is compiled for (checked just above).
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

/// Lanes of the reductions below: independent accumulators, so that the compiler can keep them in
/// vector registers instead of one serial chain of adds.
const LANES: usize = 16;

/// Sum of `x` in [`LANES`] partial sums.
#[inline(always)]
fn sum_f32(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Largest element of `x` (−∞ when empty); NaNs are skipped as by `f32::max`.
#[inline(always)]
fn max_f32(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            // `if` instead of f32::max: the form that compiles to a vector max.
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// Sum of `f(v)` over `x` in f64, [`LANES`] partial sums.
#[inline(always)]
fn sum_f64(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Output pixels from which a 3×3 stride-1 convolution takes the Winograd path (64×64 and up:
/// SD's UNet at its first level, the whole VAE decoder). Below it the weight transform (16/9 of
/// the weights, every call) and the smaller products cost more than they save: the UNet at 64²
/// latent took 6.12 s with this bound, 6.28 s from 32×32 and 6.58 s from 16×16.
const WINOGRAD_MIN_PIXELS: usize = 4096;

/// Whether 3×3 convolutions may take the Winograd path: `INSTAFLOW_CONV=im2col` turns it off, to
/// time the two against each other in one run (`scripts/bench-vs-pytorch.sh`) or to check a
/// suspect result.
fn winograd_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("INSTAFLOW_CONV").map_or(true, |v| v != "im2col"))
}

/// Most im2col bytes built at once; larger images are processed in bands of output rows.
const IM2COL_BYTES: usize = 64 << 20;

/// `torch.nn.Conv2d` (groups 1, dilation 1, explicit padding: every conv of SD-1.5).
pub fn conv2d<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let explicit = match conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) => Some([top, left, bottom, right]),
        PaddingConfig2d::Valid => Some([0; 4]),
        PaddingConfig2d::Same => None,
    };
    let plain = conv.groups == 1 && conv.dilation == [1, 1];
    let (Some(padding), true) = (explicit, plain) else {
        return conv.forward(x);
    };
    let x = match take_flex(x) {
        Ok(x) => x,
        Err(x) => return conv.forward(x),
    };
    let Ok(weight) = take_flex(conv.weight.val()) else {
        unreachable!("the input is a flex f32 tensor, so are the weights")
    };
    let bias = conv.bias.as_ref().map(|b| host_values(&b.val()));
    give_flex(conv2d_f32(
        &x,
        &weight,
        bias.as_deref(),
        conv.stride,
        padding,
    ))
}

/// The convolution on contiguous f32 tensors: `x` `[N, C, H, W]`, `weight` `[O, C, kh, kw]`,
/// `padding` (top, left, bottom, right).
fn conv2d_f32(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&[f32]>,
    [sh, sw]: [usize; 2],
    [top, left, bottom, right]: [usize; 4],
) -> FlexTensor {
    let &[n, c, h, w] = x.layout().shape().as_slice() else {
        unreachable!("rank 4")
    };
    let &[o, _, kh, kw] = weight.layout().shape().as_slice() else {
        unreachable!("rank 4")
    };
    let oh = (h + top + bottom - kh) / sh + 1;
    let ow = (w + left + right - kw) / sw + 1;
    let k = c * kh * kw;
    let (x, weight) = (x.storage::<f32>(), weight.storage::<f32>());
    let mut out = vec![0.0f32; n * o * oh * ow];
    let shape = [n, o, oh, ow];
    if kh == 3 && kw == 3 && sh == 1 && sw == 1 && oh * ow >= WINOGRAD_MIN_PIXELS && winograd_on() {
        let u = winograd::transform_weights(weight, o, c);
        for b in 0..n {
            winograd::conv3x3(
                &x[b * c * h * w..(b + 1) * c * h * w],
                &u,
                bias,
                &mut out[b * o * oh * ow..(b + 1) * o * oh * ow],
                [c, o],
                [h, w],
                [top, left],
                [oh, ow],
                winograd::BAND_BYTES,
            );
        }
        return flex_f32(out, shape);
    }
    // A 1×1 stride-1 unpadded conv is a plain matrix product of the input.
    let direct = kh == 1 && kw == 1 && sh == 1 && sw == 1 && top + left + bottom + right == 0;
    let band = if direct {
        oh
    } else {
        (IM2COL_BYTES / (4 * k * ow).max(1)).clamp(1, oh)
    };
    let mut col = if direct {
        Vec::new()
    } else {
        vec![0.0f32; k * band * ow]
    };
    for b in 0..n {
        let image = &x[b * c * h * w..(b + 1) * c * h * w];
        let out_b = &mut out[b * o * oh * ow..(b + 1) * o * oh * ow];
        for r0 in (0..oh).step_by(band) {
            let rows = band.min(oh - r0);
            let pixels = rows * ow;
            let rhs = if direct {
                &image[r0 * ow..]
            } else {
                im2col(
                    image,
                    &mut col[..k * pixels],
                    [h, w],
                    [kh, kw],
                    [sh, sw],
                    [top, left],
                    r0,
                    [rows, ow],
                );
                &col[..]
            };
            let rhs_rs = if direct {
                (h * w) as isize
            } else {
                pixels as isize
            };
            // SAFETY: dst is O × pixels inside out_b with row stride oh·ow; lhs is O × k
            // (contiguous weights); rhs is k × pixels with row stride rhs_rs, all in bounds.
            unsafe {
                gemm::gemm(
                    o,
                    pixels,
                    k,
                    out_b[r0 * ow..].as_mut_ptr(),
                    1,
                    (oh * ow) as isize,
                    false,
                    weight.as_ptr(),
                    1,
                    k as isize,
                    rhs.as_ptr(),
                    1,
                    rhs_rs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(),
                );
            }
        }
        if let Some(bias) = bias {
            for_each_chunk(out_b, oh * ow, |channel, plane| {
                plane.iter_mut().for_each(|v| *v += bias[channel]);
            });
        }
    }
    flex_f32(out, shape)
}

/// A contiguous flex f32 tensor of `shape` holding `values`.
fn flex_f32(values: Vec<f32>, shape: impl Into<burn::tensor::Shape>) -> FlexTensor {
    FlexTensor::new(
        burn::tensor::Bytes::from_elems(values),
        burn::backend::flex::Layout::contiguous(shape.into()),
        DType::F32,
    )
}

/// Rows `c·kh·kw + i·kw + j` of `col`: the input shifted by kernel offset (i, j) for output rows
/// `r0..r0 + rows`, zero where the window leaves the (padded) image.
#[allow(clippy::too_many_arguments)]
fn im2col(
    image: &[f32],
    col: &mut [f32],
    [h, w]: [usize; 2],
    [kh, kw]: [usize; 2],
    [sh, sw]: [usize; 2],
    [top, left]: [usize; 2],
    r0: usize,
    [rows, ow]: [usize; 2],
) {
    let pixels = rows * ow;
    for_each_chunk(col, kh * kw * pixels, |channel, block| {
        let plane = &image[channel * h * w..(channel + 1) * h * w];
        for (offset, dst) in block.chunks_mut(pixels).enumerate() {
            let (i, j) = (offset / kw, offset % kw);
            for (r, dst_row) in dst.chunks_mut(ow).enumerate() {
                let y = ((r0 + r) * sh + i) as isize - top as isize;
                if y < 0 || y >= h as isize {
                    dst_row.fill(0.0);
                    continue;
                }
                let src = &plane[y as usize * w..(y as usize + 1) * w];
                if sw == 1 {
                    // Output columns whose input column j + x - left lies inside the row.
                    let first = left.saturating_sub(j).min(ow);
                    let last = (w + left).saturating_sub(j).clamp(first, ow);
                    dst_row[..first].fill(0.0);
                    dst_row[first..last].copy_from_slice(&src[first + j - left..last + j - left]);
                    dst_row[last..].fill(0.0);
                } else {
                    for (x, v) in dst_row.iter_mut().enumerate() {
                        let xi = (x * sw + j) as isize - left as isize;
                        *v = if xi < 0 || xi >= w as isize {
                            0.0
                        } else {
                            src[xi as usize]
                        };
                    }
                }
            }
        }
    });
}

/// Most attention-score bytes one task holds (a block of query rows against every key), sized to
/// stay in a core's L2 cache between the two products.
const SCORE_BLOCK_BYTES: usize = 2 << 20;

/// `softmax(QKᵀ/√D + mask)·V` over `[B, H, S, D]` tensors on flex, or `None` on other backends.
/// Blocks of query rows are processed independently on all cores: scores for the block, softmax,
/// product with V, so the `[Sq, Sk]` score matrix is never written to memory whole (537 MB per
/// self-attention at SD's 64×64 latent).
pub fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: Option<&Tensor<B, 2>>,
) -> Option<Tensor<B, 4>> {
    let [b, h, sq, d] = q.dims();
    let sk = k.dims()[2];
    let (q, k, v) = (
        take_flex(q.clone()).ok()?,
        take_flex(k.clone()).ok()?,
        take_flex(v.clone()).ok()?,
    );
    let mask = match mask {
        Some(m) => Some(take_flex(m.clone()).ok()?),
        None => None,
    };
    let (qs, ks, vs) = (q.storage::<f32>(), k.storage::<f32>(), v.storage::<f32>());
    let mask = mask.as_ref().map(|m| m.storage::<f32>());
    let scale = 1.0 / (d as f32).sqrt();
    // At least d rows: each block packs all of K (sk × d) again, so fewer, taller blocks when d
    // is large (the VAE's single 512-wide head).
    let rows = (SCORE_BLOCK_BYTES / (4 * sk)).max(d).clamp(1, sq);
    let mut out = vec![0.0f32; b * h * sq * d];
    let head = |index: usize, out_head: &mut [f32]| {
        let (qh, kh, vh) = (
            &qs[index * sq * d..],
            &ks[index * sk * d..],
            &vs[index * sk * d..],
        );
        let block = |r0: usize, out_rows: &mut [f32]| {
            let n = out_rows.len() / d;
            let mut scores = vec![0.0f32; n * sk];
            // SAFETY: scores is n × sk; Q rows r0.. are n × d (row stride d); Kᵀ reads K (sk × d)
            // with swapped strides; all within the head's slices.
            unsafe {
                gemm::gemm(
                    n,
                    sk,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    sk as isize,
                    false,
                    qh[r0 * d..].as_ptr(),
                    1,
                    d as isize,
                    kh.as_ptr(),
                    d as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            let mask = mask.map(|m| &m[r0 * sk..(r0 + n) * sk]);
            vectorized(
                #[inline(always)]
                || softmax_rows(&mut scores, mask, sk),
            );
            // SAFETY: out_rows is n × d; scores n × sk; V sk × d, all contiguous.
            unsafe {
                gemm::gemm(
                    n,
                    d,
                    sk,
                    out_rows.as_mut_ptr(),
                    1,
                    d as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    sk as isize,
                    vh.as_ptr(),
                    1,
                    d as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        };
        for_each_chunk(out_head, rows * d, |i, out_rows| block(i * rows, out_rows));
    };
    for_each_chunk(&mut out, sq * d, head);
    Some(give_flex(FlexTensor::new(
        burn::tensor::Bytes::from_elems(out),
        burn::backend::flex::Layout::contiguous([b, h, sq, d].into()),
        DType::F32,
    )))
}

/// Softmax of each `sk`-long row of `scores` after adding the matching row of `mask`.
#[inline(always)]
fn softmax_rows(scores: &mut [f32], mask: Option<&[f32]>, sk: usize) {
    for (r, row) in scores.chunks_mut(sk).enumerate() {
        if let Some(mask) = mask {
            let m = &mask[r * sk..(r + 1) * sk];
            row.iter_mut().zip(m).for_each(|(s, m)| *s += m);
        }
        let max = max_f32(row);
        // Exponentials in their own pass so that it vectorises (a running sum would serialise
        // it).
        row.iter_mut().for_each(|s| *s = exp_f32(*s - max));
        let inv = 1.0 / sum_f32(row);
        row.iter_mut().for_each(|s| *s *= inv);
    }
}

fn parallelism() -> gemm::Parallelism {
    #[cfg(not(target_arch = "wasm32"))]
    {
        gemm::Parallelism::Rayon(0)
    }
    #[cfg(target_arch = "wasm32")]
    {
        gemm::Parallelism::None
    }
}

/// SiLU on the CPU backend's branch-free `exp`, so loops over planes vectorise (libm's `expf` is
/// one call per element).
#[inline(always)]
fn silu_f32(y: f32) -> f32 {
    y / (1.0 + exp_f32(-y))
}

/// Normalise one group (its channels' `spatial`-long planes, one after another) to zero mean and
/// unit variance, scale and shift each channel by `gamma`/`beta`, then SiLU when `then_silu`.
#[inline(always)]
fn normalize_group(
    data: &mut [f32],
    spatial: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    then_silu: bool,
) {
    // Two passes in f64: the same statistics as torch's within float rounding.
    let n = data.len() as f64;
    let mean = sum_f64(data, |v| v as f64) / n;
    let var = sum_f64(data, |v| (v as f64 - mean).powi(2)) / n;
    let rstd = 1.0 / (var + eps).sqrt();
    for ((plane, &g), &b) in data.chunks_mut(spatial).zip(gamma).zip(beta) {
        let scale = (rstd * g as f64) as f32;
        let shift = (b as f64 - mean * rstd * g as f64) as f32;
        if then_silu {
            plane
                .iter_mut()
                .for_each(|v| *v = silu_f32(*v * scale + shift));
        } else {
            plane.iter_mut().for_each(|v| *v = *v * scale + shift);
        }
    }
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
        let first_channel = (index % groups) * (channels / groups);
        let (gamma, beta) = (&gamma[first_channel..], &beta[first_channel..]);
        vectorized(
            #[inline(always)]
            || normalize_group(data, spatial, gamma, beta, eps, then_silu),
        );
    });
    give_flex(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::GroupNormConfig;
    use burn::tensor::activation::softmax;
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
    fn conv2d_matches_burns_conv() {
        use burn::nn::conv::Conv2dConfig;
        let device = Default::default();
        // (in, out, kernel, stride, padding, input H×W, bias): SD's 3×3, the downsampler's
        // stride 2 with asymmetric padding, 1×1 projections, and a band split (big input).
        let cases = [
            (
                5,
                7,
                3,
                1,
                PaddingConfig2d::Explicit(1, 1, 1, 1),
                (9, 11),
                true,
            ),
            (
                4,
                6,
                3,
                2,
                PaddingConfig2d::Explicit(0, 0, 1, 1),
                (10, 7),
                true,
            ),
            (
                6,
                3,
                3,
                2,
                PaddingConfig2d::Explicit(1, 1, 1, 1),
                (8, 8),
                false,
            ),
            (8, 5, 1, 1, PaddingConfig2d::Valid, (6, 5), true),
            (3, 4, 3, 1, PaddingConfig2d::Valid, (7, 6), true),
            (
                64,
                8,
                3,
                1,
                PaddingConfig2d::Explicit(1, 1, 1, 1),
                (200, 150),
                true,
            ),
        ];
        for (cin, cout, k, s, padding, (h, w), bias) in cases {
            let conv = Conv2dConfig::new([cin, cout], [k, k])
                .with_stride([s, s])
                .with_padding(padding.clone())
                .with_bias(bias)
                .init::<Flex>(&device);
            let x = Tensor::<Flex, 4>::random([2, cin, h, w], Distribution::Default, &device);
            let want = conv.forward(x.clone());
            let got = conv2d(&conv, x);
            assert_eq!(got.dims(), want.dims(), "{padding:?}");
            got.into_data()
                .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-4));
        }
    }

    #[test]
    fn blocked_attention_matches_burns_ops() {
        let device = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        // Self-attention with more keys than fit one score block, and CLIP's causal mask.
        for (sq, sk, masked) in [(300, 40_000, false), (7, 9, false), (77, 77, true)] {
            let q = Tensor::<Flex, 4>::random([1, 2, sq, 8], normal, &device);
            let k = Tensor::<Flex, 4>::random([1, 2, sk, 8], normal, &device);
            let v = Tensor::<Flex, 4>::random([1, 2, sk, 8], normal, &device);
            let mask = masked.then(|| Tensor::<Flex, 2>::full([sq, sk], f32::MIN, &device).triu(1));
            let mut scores = q.clone().matmul(k.clone().swap_dims(2, 3)) / (8f64).sqrt();
            if let Some(m) = &mask {
                scores = scores + m.clone().reshape([1, 1, sq, sk]);
            }
            let want = softmax(scores, 3).matmul(v.clone());
            // Strided (head-split) inputs, as the models pass them.
            let got =
                attention(&q, &k.swap_dims(2, 3).swap_dims(2, 3), &v, mask.as_ref()).expect("flex");
            got.into_data()
                .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-5));
        }
    }
}
