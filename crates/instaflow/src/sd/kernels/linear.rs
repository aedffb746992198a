//! `torch.nn.Linear` on the CPU backend as one gemm with the bias folded in. burn runs a matmul
//! and then a broadcast add (a second pass and allocation), and lets gemm split the work across
//! threads itself, which it does poorly when there are few rows: CLIP's 77 tokens through its
//! 768→3072 MLP ran at 67 GFLOP/s on two threads, slower than on one (71). Here each thread takes
//! its own band of output columns (and of the weights): 113–135 GFLOP/s at 77 rows where gemm's
//! split gave 59–98, the same as gemm's at 4,096 rows (144–160 against 152–157; `timing` below).

use burn::nn::Linear;
use burn::tensor::{Tensor, backend::Backend};

use super::{flex_f32, give_flex, host_values, take_flex, take_flex_view};

/// Multiply-adds under which a product runs on one thread (waking the others costs more).
const SERIAL_MACS: usize = 1 << 20;

/// `x · W + b` for `x` `[…, in]` through `linear` (weights held `[in, out]`).
pub fn linear<B: Backend, const D: usize>(linear: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let [y] = linears([linear], x);
    y
}

/// Several layers applied to the same input (attention's q, k and v) in one parallel region, so
/// the threads meet once instead of once per layer.
pub fn linears<B: Backend, const D: usize, const N: usize>(
    layers: [&Linear<B>; N],
    x: Tensor<B, D>,
) -> [Tensor<B, D>; N] {
    let dims = x.dims();
    let x = match take_flex(x) {
        Ok(x) => x,
        Err(x) => return layers.map(|layer| layer.forward(x.clone())),
    };
    let k = dims[D - 1];
    let m = dims.iter().product::<usize>() / k.max(1);
    let weights = layers.map(|layer| {
        let Ok(weight) = take_flex_view(layer.weight.val()) else {
            unreachable!("the input is a flex f32 tensor, so are the weights")
        };
        let n = weight.layout().shape()[1];
        // Loaded weights are a transposed view of the file's `[out, in]` (no copy at load); gemm
        // reads either layout at the same speed. Anything else is made contiguous.
        match *weight.layout().strides() {
            [rs, 1] if rs == n as isize => weight,
            [1, cs] if cs == k as isize => weight,
            _ => weight.to_contiguous(),
        }
    });
    let widths = weights.each_ref().map(|w| w.layout().shape()[1]);
    let mut outs: [Vec<f32>; N] = std::array::from_fn(|i| match &layers[i].bias {
        Some(bias) => host_values(&bias.val()).repeat(m),
        None => vec![0.0f32; m * widths[i]],
    });
    let products: Vec<Product> = (0..N)
        .zip(outs.iter_mut())
        .map(|(i, out)| {
            let (weight, n) = (&weights[i], widths[i]);
            let strides = weight.layout().strides();
            let rhs = &weight.storage::<f32>()[weight.layout().start_offset()..];
            let last = (k.max(1) - 1) as isize * strides[0] + (n.max(1) - 1) as isize * strides[1];
            assert_eq!(
                weight.layout().shape()[0],
                k,
                "Linear: input width ≠ weight rows"
            );
            assert!(out.len() == m * n && (rhs.len() as isize) > last);
            Product {
                out: Dst(out.as_mut_ptr()),
                rhs,
                row_stride: strides[0],
                col_stride: strides[1],
                n,
                accumulate: layers[i].bias.is_some(),
            }
        })
        .collect();
    let lhs = x.storage::<f32>();
    assert!(lhs.len() >= m * k);
    run(&products, lhs, m, k);
    drop(products);
    let shapes = widths.map(|n| {
        let mut shape = dims;
        shape[D - 1] = n;
        shape
    });
    let mut outs = outs.into_iter();
    std::array::from_fn(|i| give_flex(flex_f32(outs.next().expect("one per layer"), shapes[i])))
}

/// A raw output pointer shared by the tasks that write disjoint column bands of it.
#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: every task writes only its own columns (see `run`).
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// One `out (+)= lhs · rhs`: `out` row-major `[m, n]`; `rhs` `[k, n]` with the given strides
/// (row-major, or the transpose of a row-major `[n, k]`); added to `out` when `accumulate`.
struct Product<'a> {
    out: Dst,
    rhs: &'a [f32],
    row_stride: isize,
    col_stride: isize,
    n: usize,
    accumulate: bool,
}

impl Product<'_> {
    /// Columns `j0..j0 + cols`.
    ///
    /// # Safety
    /// `out` must hold `m × n` values, `rhs` the whole `[k, n]` operand, `lhs` `m × k`, and no
    /// other task may write these columns meanwhile.
    unsafe fn columns(
        &self,
        lhs: &[f32],
        [m, k]: [usize; 2],
        j0: usize,
        cols: usize,
        parallelism: gemm::Parallelism,
    ) {
        unsafe {
            gemm::gemm(
                m,
                cols,
                k,
                self.out.0.add(j0),
                1,
                self.n as isize,
                self.accumulate,
                lhs.as_ptr(),
                1,
                k as isize,
                self.rhs.as_ptr().offset(j0 as isize * self.col_stride),
                self.col_stride,
                self.row_stride,
                if self.accumulate { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    }
}

/// Every product with row-major `lhs` `[m, k]`. Each thread takes bands of output columns (and
/// the matching weights) with a single-threaded gemm (see the module's note for why).
fn run(products: &[Product], lhs: &[f32], m: usize, k: usize) {
    let macs: usize = products.iter().map(|p| m * p.n * k).sum();
    if macs < SERIAL_MACS {
        one_thread(products, lhs, m, k);
    } else {
        in_bands(products, lhs, m, k);
    }
}

/// The products one after another on the calling thread.
fn one_thread(products: &[Product], lhs: &[f32], m: usize, k: usize) {
    for p in products {
        // SAFETY: sizes checked by the caller; one product at a time.
        unsafe { p.columns(lhs, [m, k], 0, p.n, gemm::Parallelism::None) };
    }
}

/// Bands of whole 16-column vectors, one per thread and product, as parallel tasks.
#[cfg(not(target_arch = "wasm32"))]
fn in_bands(products: &[Product], lhs: &[f32], m: usize, k: usize) {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    if threads == 1 {
        return one_thread(products, lhs, m, k);
    }
    let bands: Vec<(usize, usize, usize)> = products
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            let band = p.n.div_ceil(threads).next_multiple_of(16).max(16);
            (0..p.n.div_ceil(band)).map(move |b| (i, b * band, band.min(p.n - b * band)))
        })
        .collect();
    bands.into_par_iter().for_each(|(i, j0, cols)| {
        // SAFETY: sizes checked by the caller; bands of one product are disjoint columns.
        unsafe { products[i].columns(lhs, [m, k], j0, cols, gemm::Parallelism::None) }
    });
}

/// wasm32 has no threads here.
#[cfg(target_arch = "wasm32")]
fn in_bands(products: &[Product], lhs: &[f32], m: usize, k: usize) {
    one_thread(products, lhs, m, k);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{TB, device, to_vec};
    use burn::module::Param;
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;

    /// Against burn's `Linear` on every path: few rows and many, bands of columns with a last
    /// one narrower than the others, tiny products on one thread, with and without bias, alone
    /// and grouped.
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
            // One at a time and the three in one region.
            let alone = linear(&layer, x.clone());
            let [a, b, c] = linears([&layer, &transposed, &padded], x.clone());
            for (layout, got) in [
                ("alone", alone),
                ("[in, out]", a),
                ("[out, in]ᵀ", b),
                ("padded", c),
            ] {
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

#[cfg(test)]
mod timing {
    use super::*;

    /// Median GFLOP/s of the column bands against one gemm call splitting the threads itself,
    /// and one thread, at the shapes of CLIP (77 rows) and of the UNet's 64×64 level:
    /// `cargo test --release -p instaflow --lib linear::timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bands_against_gemms_own_split() {
        for [m, k, n] in [
            [77, 768, 768],
            [77, 768, 3072],
            [77, 3072, 768],
            [4096, 320, 2560],
            [4096, 1280, 320],
        ] {
            let lhs: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let rhs: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
            let mut out = vec![0.0f32; m * n];
            let product = Product {
                out: Dst(out.as_mut_ptr()),
                rhs: &rhs,
                row_stride: n as isize,
                col_stride: 1,
                n,
                accumulate: false,
            };
            let gflops = |f: &dyn Fn()| {
                let mut runs: Vec<f64> = (0..31)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        f();
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                runs.sort_by(f64::total_cmp);
                2.0 * (m * n * k) as f64 / runs[runs.len() / 2] / 1e9
            };
            let products = [product];
            let bands = gflops(&|| run(&products, &lhs, m, k));
            // SAFETY: `out`, `rhs` and `lhs` hold the whole operands; one call at a time.
            let own = gflops(&|| unsafe {
                products[0].columns(&lhs, [m, k], 0, n, gemm::Parallelism::Rayon(0))
            });
            let one = gflops(&|| unsafe {
                products[0].columns(&lhs, [m, k], 0, n, gemm::Parallelism::None)
            });
            eprintln!(
                "{m}×{k}→{n}: bands {bands:.0} GFLOP/s, gemm's own split {own:.0}, one thread {one:.0}"
            );
        }
    }
}
