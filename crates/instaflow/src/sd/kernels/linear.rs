//! `torch.nn.Linear` on the CPU backend as one gemm with the bias folded in. burn runs a matmul
//! and then a broadcast add (a second pass and allocation), and lets gemm split the work across
//! threads itself, which it does poorly when there are few rows: CLIP's 77 tokens through its
//! 768→3072 MLP ran at 67 GFLOP/s on two threads, slower than on one (71). Here each thread takes
//! its own band of output columns (and of the weights): 134–150 GFLOP/s at 77 rows, 157 at 4,096.

use burn::nn::Linear;
use burn::tensor::{Tensor, backend::Backend};

use super::{flex_f32, give_flex, host_values, parallelism, take_flex, take_flex_view};

/// Multiply-adds under which a product runs on one thread (waking the others costs more).
const SERIAL_MACS: usize = 1 << 20;

/// `x · W + b` for `x` `[…, in]` through `linear` (weights stored `[in, out]`).
pub fn linear<B: Backend, const D: usize>(linear: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let mut dims = x.dims();
    let x = match take_flex(x) {
        Ok(x) => x,
        Err(x) => return linear.forward(x),
    };
    let Ok(weight) = take_flex_view(linear.weight.val()) else {
        unreachable!("the input is a flex f32 tensor, so are the weights")
    };
    let [k, n] = [weight.layout().shape()[0], weight.layout().shape()[1]];
    // Loaded weights are usually a transposed view of the file's `[out, in]` (no copy at load);
    // gemm reads either layout at the same speed. Anything else is made contiguous.
    let weight = match weight.layout().strides() {
        &[rs, 1] if rs == n as isize => weight,
        &[1, cs] if cs == k as isize => weight,
        _ => weight.to_contiguous(),
    };
    let [rs, cs] = [weight.layout().strides()[0], weight.layout().strides()[1]];
    let rhs = &weight.storage::<f32>()[weight.layout().start_offset()..];
    let m = dims.iter().product::<usize>() / k.max(1);
    let bias = linear.bias.as_ref().map(|b| host_values(&b.val()));
    let mut out = match &bias {
        Some(bias) => bias.repeat(m),
        None => vec![0.0f32; m * n],
    };
    matmul_into(
        &mut out,
        x.storage::<f32>(),
        Rhs {
            values: rhs,
            row_stride: rs,
            col_stride: cs,
        },
        [m, k, n],
        bias.is_some(),
    );
    dims[D - 1] = n;
    give_flex(flex_f32(out, dims))
}

/// A raw output pointer shared by the tasks that write disjoint column bands of it.
#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: every task writes only its own columns (see `matmul_into`).
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// A `[k, n]` right-hand side: row-major, or the transpose of a row-major `[n, k]`.
struct Rhs<'a> {
    values: &'a [f32],
    row_stride: isize,
    col_stride: isize,
}

/// `out (+)= lhs · rhs` for row-major `lhs` `[m, k]` and `out` `[m, n]`; the product is added
/// to `out`'s values when `accumulate`. Each thread takes a band of output columns (and the
/// matching weights) with a single-threaded gemm: on two cores this measured 125–160 GFLOP/s
/// where gemm's own split gave 67–147, worst with few rows.
fn matmul_into(out: &mut [f32], lhs: &[f32], rhs: Rhs, [m, k, n]: [usize; 3], accumulate: bool) {
    let last = (k.max(1) - 1) as isize * rhs.row_stride + (n.max(1) - 1) as isize * rhs.col_stride;
    assert!(out.len() >= m * n && lhs.len() >= m * k && (rhs.values.len() as isize) > last);
    let alpha = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: dst covers rows 0..m and columns j0..j0 + cols of `out` (row stride n); lhs is
    // m × k (row stride k); rhs columns j0..j0 + cols of the k × n operand: all in bounds by the
    // assert above.
    let product = |dst: Dst, j0: usize, cols: usize, parallelism| unsafe {
        gemm::gemm(
            m,
            cols,
            k,
            dst.0.add(j0),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.values.as_ptr().offset(j0 as isize * rhs.col_stride),
            rhs.col_stride,
            rhs.row_stride,
            alpha,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    };
    let dst = Dst(out.as_mut_ptr());
    let serial = m * n * k < SERIAL_MACS;
    #[cfg(not(target_arch = "wasm32"))]
    if !serial && rayon::current_num_threads() > 1 && n >= 32 {
        use rayon::prelude::*;
        // Bands of whole 16-column vectors, one per thread.
        let threads = rayon::current_num_threads();
        let band = n.div_ceil(threads).next_multiple_of(16);
        (0..n.div_ceil(band)).into_par_iter().for_each(|i| {
            let j0 = i * band;
            product(dst, j0, band.min(n - j0), gemm::Parallelism::None)
        });
        return;
    }
    let threads = if serial {
        gemm::Parallelism::None
    } else {
        parallelism()
    };
    product(dst, 0, n, threads);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{TB, device, to_vec};
    use burn::module::Param;
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;

    /// Against burn's `Linear` on every path: few rows split by columns (with a last band
    /// narrower than the others), many rows, tiny products, with and without bias.
    #[test]
    fn matches_burns_linear() {
        let dev = device();
        for (rows, k, n, bias) in [
            (77, 768, 3000, true),
            (77, 96, 40, false),
            (300, 64, 200, true),
            (1, 320, 1280, true),
            (5, 512, 2051, false),
        ] {
            let layer = LinearConfig::new(k, n).with_bias(bias).init::<TB>(&dev);
            let x = Tensor::<TB, 3>::random([1, rows, k], Distribution::Normal(0.0, 1.0), &dev);
            let want = to_vec(layer.forward(x.clone()));
            // The same weights as a transposed view of `[out, in]` (as loaded from a file) and
            // as a view with padded rows (made contiguous first).
            let stored = layer.weight.val().transpose().into_data();
            let mut transposed = layer.clone();
            transposed.weight = Param::from_tensor(Tensor::from_data(stored, &dev).transpose());
            let mut padded = layer.clone();
            padded.weight = Param::from_tensor(
                layer
                    .weight
                    .val()
                    .pad((0, 3, 0, 0), 0.0)
                    .slice([0..k, 0..n]),
            );
            for (layout, layer) in [
                ("[in, out]", &layer),
                ("[out, in]ᵀ", &transposed),
                ("padded", &padded),
            ] {
                let got = linear(layer, x.clone());
                assert_eq!(got.dims(), [1, rows, n]);
                let got = to_vec(got);
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    err < 1e-4,
                    "{rows}×{k}→{n}, bias {bias}, {layout}: max |Δ| {err}"
                );
            }
        }
    }
}
