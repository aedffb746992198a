//! The transformer activations of SD-1.5 in one threaded pass each: GEGLU's gate (UNet) and
//! `quick_gelu` (CLIP). burn writes GEGLU as two strided copies of the halves, GELU on one thread
//! through libm's `erff` (one call per element) and a product — about 47 M elements per UNet
//! call at 64×64 latent; `quick_gelu` is three passes.

use burn::backend::flex::ops::unary::exp_f32;
use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::{Tensor, backend::Backend};

use super::{flex_f32, for_each_chunk, give_flex, take_flex, vectorized};

/// Elements one task handles (about 64 KiB of output).
const TASK: usize = 16 << 10;

/// `erf` to 1.5e-7 (Abramowitz & Stegun 7.1.26) on the branch-free `exp`, so loops vectorise.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    (1.0 - poly * exp_f32(-a * a)).copysign(x)
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu`.
#[inline(always)]
fn gelu_f32(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `dst` rows (`half` wide) = hidden · gelu(gate) of the matching `src` rows `[hidden | gate | …]`
/// (`width` wide).
#[inline(always)]
fn gate_rows(dst: &mut [f32], src: &[f32], half: usize, width: usize) {
    for (dst, row) in dst.chunks_mut(half).zip(src.chunks(width)) {
        let (hidden, gate) = row.split_at(half);
        for ((d, &x), &g) in dst.iter_mut().zip(hidden).zip(gate) {
            *d = x * gelu_f32(g);
        }
    }
}

/// diffusers' GEGLU gate: `h[…, :I] · gelu(h[…, I:])` for `h` `[B, S, 2I]`.
pub fn gelu_gate<B: Backend>(h: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, s, c2] = h.dims();
    let half = c2 / 2;
    let h = match take_flex(h) {
        Ok(h) => h,
        Err(h) => {
            let hidden = h.clone().slice([0..b, 0..s, 0..half]);
            let gate = h.slice([0..b, 0..s, half..c2]);
            return hidden * gelu(gate);
        }
    };
    let src = h.storage::<f32>();
    let mut out = vec![0.0f32; b * s * half];
    let rows = (TASK / half.max(1)).max(1);
    for_each_chunk(&mut out, rows * half, |task, chunk| {
        let src = &src[task * rows * c2..];
        vectorized(
            #[inline(always)]
            || gate_rows(chunk, src, half, c2),
        );
    });
    give_flex(flex_f32(out, [b, s, half]))
}

/// CLIP's `quick_gelu`: `x · σ(1.702·x)`, in place where nobody else holds `x`.
pub fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let mut x = match take_flex(x) {
        Ok(x) => x,
        Err(x) => return x.clone() * sigmoid(x * 1.702),
    };
    for_each_chunk(x.storage_mut::<f32>(), TASK, |_, chunk| {
        vectorized(
            #[inline(always)]
            || {
                for v in chunk {
                    *v /= 1.0 + exp_f32(-1.702 * *v);
                }
            },
        )
    });
    give_flex(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tolerance};

    #[test]
    fn erf_matches_libm() {
        for i in -4000..=4000 {
            let x = i as f32 / 500.0;
            let (got, want) = (erf_f32(x), burn::backend::flex::ops::unary::erf_f32(x));
            // 1.5e-7 in exact arithmetic, plus float rounding; GELU's own error is half as much.
            assert!((got - want).abs() < 6e-7, "erf({x}) = {got}, libm's {want}");
        }
    }

    #[test]
    fn fused_activations_match_burns_ops() {
        let device = Default::default();
        <Flex as Backend>::seed(&device, 11);
        let h = Tensor::<Flex, 3>::random([2, 5, 14], Distribution::Normal(0.0, 3.0), &device);
        let hidden = h.clone().slice([0..2, 0..5, 0..7]);
        let gate = h.clone().slice([0..2, 0..5, 7..14]);
        // erf's error (< 6e-7, see above) reaches the product scaled by |hidden·gate|/2, and
        // both factors reach ~10 here: bound each element by its own scale, not one constant.
        let got = gelu_gate(h.clone()).into_data().to_vec::<f32>().unwrap();
        let want = (hidden.clone() * gelu(gate.clone())).into_data();
        let scale = (hidden * gate).abs().into_data().to_vec::<f32>().unwrap();
        for ((got, want), scale) in got.iter().zip(want.to_vec::<f32>().unwrap()).zip(scale) {
            let bound = 2e-6 + 4e-7 * scale;
            assert!(
                (got - want).abs() <= bound,
                "{got} vs {want} (bound {bound})"
            );
        }
        let want = h.clone() * sigmoid(h.clone() * 1.702);
        // Shared (h is still held) and unique inputs.
        quick_gelu(h.clone())
            .into_data()
            .assert_approx_eq::<f32>(&want.clone().into_data(), Tolerance::absolute(4e-6));
        let before = h.to_data();
        quick_gelu(h.clone() + 0.0)
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(4e-6));
        assert_eq!(h.into_data(), before);
    }
}
