//! Winograd F(2×2, 3×3) convolution (Lavin & Gray, "Fast Algorithms for Convolutional Neural
//! Networks", 2016): each 2×2 output tile comes from a 4×4 input tile with 16 multiplications per
//! (input, output) channel pair instead of 36, so the matrix products — nearly all of a 3×3
//! convolution's time — shrink 2.25×. Every 3×3 convolution of SD-1.5's UNet and VAE is stride 1
//! with padding 1; the VAE decoder at 512² is almost nothing else.
//!
//! With `U = G g Gᵀ` (weights), `V = Bᵀ d B` (input tiles) and `Y = Aᵀ M A`, the 16 products
//! `M[ξ] = U[ξ] · V[ξ]` (`[O, C] · [C, tiles]`) are plain gemms. The transforms use only
//! additions and halvings, so the result matches the direct convolution to float rounding.
//! Every buffer is ξ-major (`[16, rows, columns]`): each product reads and writes contiguous
//! matrices — with ξ as the innermost index instead, the same products ran 1.2–1.5× slower
//! (gemm's packing walks rows 16× further apart) — and the 16 products run as parallel tasks.

use super::parallelism;

/// Most bytes of transformed input and products held at once; larger images are processed in
/// bands of tile rows.
pub(super) const BAND_BYTES: usize = 64 << 20;

/// Run `f(i, item)` for every item, on all cores where threads exist.
fn for_each_item<T: Send>(items: &mut [T], f: impl Fn(usize, &mut T) + Send + Sync) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        items.par_iter_mut().enumerate().for_each(|(i, t)| f(i, t));
    }
    #[cfg(target_arch = "wasm32")]
    items.iter_mut().enumerate().for_each(|(i, t)| f(i, t));
}

/// `buffer` `[16, n, len]` as, for each of the `n` rows, its 16 slices (one per ξ): every task
/// then writes its own row of all 16 planes, and each plane stays contiguous for its product.
fn rows_of_planes(buffer: &mut [f32], n: usize, len: usize) -> Vec<Vec<&mut [f32]>> {
    let mut rows: Vec<Vec<&mut [f32]>> = (0..n).map(|_| Vec::with_capacity(16)).collect();
    for plane in buffer.chunks_mut(n * len) {
        for (row, slice) in rows.iter_mut().zip(plane.chunks_mut(len)) {
            row.push(slice);
        }
    }
    rows
}

/// `U = G g Gᵀ` for every (output, input) channel pair of `[O, C, 3, 3]` weights, laid out
/// `[16, O, C]`: product ξ's left-hand side is one contiguous `[O, C]` matrix.
pub(super) fn transform_weights(weight: &[f32], o: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0.0f32; 16 * o * c];
    let mut rows = rows_of_planes(&mut u, o, c);
    for_each_item(&mut rows, |out_channel, planes| {
        // This output channel's weights as nine rows over the input channels, so every step
        // below is one vectorised pass over C.
        let mut g = vec![0.0f32; 9 * c];
        for (ci, k) in weight[out_channel * c * 9..(out_channel + 1) * c * 9]
            .chunks_exact(9)
            .enumerate()
        {
            for (tap, &value) in k.iter().enumerate() {
                g[tap * c + ci] = value;
            }
        }
        let tap = |a: usize, b: usize| &g[(3 * a + b) * c..][..c];
        // G g: rows t[i][b] = Σ_a G[i][a]·g[a][b].
        let mut t = vec![0.0f32; 12 * c];
        for b in 0..3 {
            let (g0, g1, g2) = (tap(0, b), tap(1, b), tap(2, b));
            let (rows, _) = t.split_at_mut(12 * c);
            let mut row = rows.chunks_mut(c).skip(b).step_by(3);
            let (t0, t1, t2, t3) = (
                row.next().expect("row"),
                row.next().expect("row"),
                row.next().expect("row"),
                row.next().expect("row"),
            );
            for x in 0..c {
                t0[x] = g0[x];
                t1[x] = 0.5 * (g0[x] + g1[x] + g2[x]);
                t2[x] = 0.5 * (g0[x] - g1[x] + g2[x]);
                t3[x] = g2[x];
            }
        }
        // (G g) Gᵀ: U[i][j] = Σ_b t[i][b]·G[j][b].
        for i in 0..4 {
            let r = |b: usize| &t[(3 * i + b) * c..][..c];
            let (r0, r1, r2) = (r(0), r(1), r(2));
            let [u0, u1, u2, u3] = &mut planes[4 * i..4 * i + 4] else {
                unreachable!("16 planes")
            };
            for x in 0..c {
                u0[x] = r0[x];
                u1[x] = 0.5 * (r0[x] + r1[x] + r2[x]);
                u2[x] = 0.5 * (r0[x] - r1[x] + r2[x]);
                u3[x] = r2[x];
            }
        }
    });
    u
}

/// One image's 3×3 stride-1 convolution: `image` `[C, H, W]`, `u` from [`transform_weights`],
/// `out` `[O, oh, ow]` (overwritten), `padding` (top, left) — the bottom and right padding are
/// implied by `oh`, `ow`. `band_bytes` bounds the scratch memory (tests use small bands).
#[allow(clippy::too_many_arguments)]
pub(super) fn conv3x3(
    image: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    [c, o]: [usize; 2],
    [h, w]: [usize; 2],
    [top, left]: [usize; 2],
    [oh, ow]: [usize; 2],
    band_bytes: usize,
) {
    let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
    let band = (band_bytes / (16 * 4 * (c + o) * tw).max(1)).clamp(1, th);
    let mut v = vec![0.0f32; 16 * c * band * tw];
    let mut m = vec![0.0f32; 16 * o * band * tw];
    let mut out_planes: Vec<&mut [f32]> = out.chunks_mut(oh * ow).collect();
    for t0 in (0..th).step_by(band) {
        let rows = band.min(th - t0);
        let tiles = rows * tw;
        let v = &mut v[..16 * c * tiles];
        let m = &mut m[..16 * o * tiles];
        input_transform(image, v, c, [h, w], [top, left], [t0, rows, tw]);
        // M[ξ] = U[ξ] · V[ξ]: [O, C] · [C, tiles], one product per task (each fills a core).
        let v = &*v;
        let mut products: Vec<&mut [f32]> = m.chunks_mut(o * tiles).collect();
        for_each_item(&mut products, |xi, dst| {
            // SAFETY: dst is the contiguous O × tiles matrix ξ; lhs the contiguous O × C
            // matrix u[ξ·O·C..]; rhs the contiguous C × tiles matrix v[ξ·C·tiles..].
            unsafe {
                gemm::gemm(
                    o,
                    tiles,
                    c,
                    dst.as_mut_ptr(),
                    1,
                    tiles as isize,
                    false,
                    u[xi * o * c..].as_ptr(),
                    1,
                    c as isize,
                    v[xi * c * tiles..].as_ptr(),
                    1,
                    tiles as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism_within(16),
                );
            }
        });
        output_transform(m, bias, &mut out_planes, o, [oh, ow], [t0, rows, tw]);
    }
}

/// Threads for each of `tasks` parallel products: none of their own where the tasks already
/// fill the cores.
fn parallelism_within(tasks: usize) -> gemm::Parallelism {
    #[cfg(not(target_arch = "wasm32"))]
    if tasks >= rayon::current_num_threads() {
        return gemm::Parallelism::None;
    }
    let _ = tasks;
    parallelism()
}

/// `V = Bᵀ d B` for every input channel and tile of tile rows `t0..t0 + rows`, into `v`
/// `[16, C, rows·tw]`. Each input row is first copied into a zero-padded row, so the tile
/// loops run without bounds checks and vectorise.
fn input_transform(
    image: &[f32],
    v: &mut [f32],
    c: usize,
    [h, w]: [usize; 2],
    [top, left]: [usize; 2],
    [t0, rows, tw]: [usize; 3],
) {
    let tiles = rows * tw;
    let padded = 2 * tw + 2;
    let mut channels = rows_of_planes(v, c, tiles);
    for_each_item(&mut channels, |channel, planes| {
        let plane = &image[channel * h * w..(channel + 1) * h * w];
        let mut d = vec![0.0f32; 4 * padded];
        let mut t = vec![0.0f32; 4 * padded];
        for ty in 0..rows {
            // The four input rows of this tile row, zero outside the image.
            for (i, row) in d.chunks_mut(padded).enumerate() {
                row.fill(0.0);
                let y = (2 * (t0 + ty) + i) as isize - top as isize;
                if !(0..h as isize).contains(&y) {
                    continue;
                }
                let src = &plane[y as usize * w..(y as usize + 1) * w];
                // Input column x sits at padded position x + left; keep what fits.
                let n = w.min(padded.saturating_sub(left));
                row[left..left + n].copy_from_slice(&src[..n]);
            }
            // Bᵀ d over whole rows.
            let (d0, rest) = d.split_at(padded);
            let (d1, rest) = rest.split_at(padded);
            let (d2, d3) = rest.split_at(padded);
            let (r0, rest) = t.split_at_mut(padded);
            let (r1, rest) = rest.split_at_mut(padded);
            let (r2, r3) = rest.split_at_mut(padded);
            for x in 0..padded {
                r0[x] = d0[x] - d2[x];
                r1[x] = d1[x] + d2[x];
                r2[x] = d2[x] - d1[x];
                r3[x] = d1[x] - d3[x];
            }
            // · B along each row, tile by tile.
            for (i, r) in t.chunks(padded).enumerate() {
                let [p0, p1, p2, p3] = &mut planes[4 * i..4 * i + 4] else {
                    unreachable!("16 planes")
                };
                let span = ty * tw..(ty + 1) * tw;
                let (p0, p1, p2, p3) = (
                    &mut p0[span.clone()],
                    &mut p1[span.clone()],
                    &mut p2[span.clone()],
                    &mut p3[span],
                );
                for tx in 0..tw {
                    let q = &r[2 * tx..2 * tx + 4];
                    p0[tx] = q[0] - q[2];
                    p1[tx] = q[1] + q[2];
                    p2[tx] = q[2] - q[1];
                    p3[tx] = q[1] - q[3];
                }
            }
        }
    });
}

/// `Y = Aᵀ M A` (+ bias) from `m` `[16, O, rows·tw]` into output rows `2·t0..` of every plane.
fn output_transform(
    m: &[f32],
    bias: Option<&[f32]>,
    out_planes: &mut [&mut [f32]],
    o: usize,
    [oh, ow]: [usize; 2],
    [t0, rows, tw]: [usize; 3],
) {
    let tiles = rows * tw;
    for_each_item(out_planes, |channel, plane| {
        let b = bias.map_or(0.0, |b| b[channel]);
        let mut s = vec![0.0f32; 8 * tw];
        let mut y_row = vec![0.0f32; 2 * tw];
        for ty in 0..rows {
            let e = |xi: usize| &m[(xi * o + channel) * tiles + ty * tw..][..tw];
            // Aᵀ M: s0_j = M_0j + M_1j + M_2j, s1_j = M_1j − M_2j − M_3j, over the tile row.
            for j in 0..4 {
                let (m0, m1, m2, m3) = (e(j), e(4 + j), e(8 + j), e(12 + j));
                let (s0, s1) = s[2 * j * tw..(2 * j + 2) * tw].split_at_mut(tw);
                for x in 0..tw {
                    s0[x] = m0[x] + m1[x] + m2[x];
                    s1[x] = m1[x] - m2[x] - m3[x];
                }
            }
            // · A: output columns 2x and 2x + 1 of both output rows.
            for dy in 0..2 {
                let y = 2 * (t0 + ty) + dy;
                if y >= oh {
                    break;
                }
                let col = |j: usize| &s[(2 * j + dy) * tw..][..tw];
                let (c0, c1, c2, c3) = (col(0), col(1), col(2), col(3));
                for (x, pair) in y_row.chunks_exact_mut(2).enumerate() {
                    pair[0] = c0[x] + c1[x] + c2[x] + b;
                    pair[1] = c1[x] - c2[x] - c3[x] + b;
                }
                plane[y * ow..(y + 1) * ow].copy_from_slice(&y_row[..ow]);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Distribution, Tensor, TensorData, Tolerance};

    #[test]
    fn matches_burns_convolution_at_every_edge_and_band() {
        let device = Default::default();
        // (in, out, H, W, padding top/left/bottom/right, band bytes): even and odd sizes (a
        // last tile half outside), no padding, asymmetric padding, one tile row per band, and
        // bands that do not divide the tile rows.
        let cases = [
            (3, 5, 8, 8, [1, 1, 1, 1], BAND_BYTES),
            (4, 3, 7, 9, [1, 1, 1, 1], BAND_BYTES),
            (2, 2, 6, 5, [0, 0, 0, 0], BAND_BYTES),
            (3, 4, 9, 6, [0, 1, 2, 1], 1),
            (5, 6, 11, 13, [1, 1, 1, 1], 16 * 4 * 11 * 7 * 2),
        ];
        for (cin, cout, h, w, [top, left, bottom, right], band) in cases {
            let conv = Conv2dConfig::new([cin, cout], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
                .init::<Flex>(&device);
            let x = Tensor::<Flex, 4>::random([1, cin, h, w], Distribution::Default, &device);
            let want = conv.forward(x.clone());
            let [_, _, oh, ow] = want.dims();
            let values = |t: Tensor<Flex, 4>| t.into_data().to_vec::<f32>().unwrap();
            let bias = conv.bias.as_ref().unwrap().val().into_data();
            let u = transform_weights(&values(conv.weight.val()), cout, cin);
            let mut out = vec![f32::NAN; cout * oh * ow];
            conv3x3(
                &values(x),
                &u,
                Some(&bias.to_vec::<f32>().unwrap()),
                &mut out,
                [cin, cout],
                [h, w],
                [top, left],
                [oh, ow],
                band,
            );
            TensorData::new(out, [1, cout, oh, ow])
                .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-5));
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// Per-shape timings of the weight transform and the whole convolution:
    /// `cargo test --release -p instaflow --lib winograd::timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn phases() {
        for (c, o, s) in [
            (128, 128, 512),
            (256, 256, 256),
            (512, 512, 128),
            (320, 320, 64),
            (640, 640, 32),
            (1280, 1280, 16),
        ] {
            let image: Vec<f32> = (0..c * s * s).map(|i| (i % 97) as f32 * 0.01).collect();
            let weight: Vec<f32> = (0..o * c * 9).map(|i| (i % 89) as f32 * 0.001).collect();
            let mut out = vec![0.0f32; o * s * s];
            let mut run = |u: &[f32]| {
                conv3x3(
                    &image,
                    u,
                    None,
                    &mut out,
                    [c, o],
                    [s, s],
                    [1, 1],
                    [s, s],
                    BAND_BYTES,
                )
            };
            // Once untimed: the first call pays for fresh pages.
            let u = transform_weights(&weight, o, c);
            run(&u);
            drop(u);
            let t = std::time::Instant::now();
            let u = transform_weights(&weight, o, c);
            let tw_ms = t.elapsed().as_secs_f64() * 1e3;
            let t = std::time::Instant::now();
            run(&u);
            let all_ms = t.elapsed().as_secs_f64() * 1e3;
            let gflop = 2.0 * (o * c * 9 * s * s) as f64 / 1e9;
            eprintln!(
                "{c}→{o} at {s}²: weights {tw_ms:.1} ms, conv {all_ms:.1} ms ({:.0} direct-GFLOP/s)",
                gflop / all_ms * 1e3
            );
        }
    }
}
