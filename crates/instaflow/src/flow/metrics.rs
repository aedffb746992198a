//! Path metrics of a flow (straightness, transport cost) and sample-based distances.

use burn::tensor::{ElementConversion, Tensor, backend::Backend};
use rand::Rng;

use crate::flow::velocity::Ode;

/// Straightness and transport cost of a flow, measured on one batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathStats {
    /// `S = ∫₀¹ E‖(Z1 − Z0) − v(Z_t, t)‖² dt`; 0 iff every path is a straight line.
    pub straightness: f64,
    /// `E‖Z1 − Z0‖²`: the transport cost of the coupling the flow induces.
    pub transport_cost: f64,
}

/// Per-row squared norm averaged over the batch: `E‖x‖²`.
fn mean_sq_norm<B: Backend, const D: usize>(x: Tensor<B, D>) -> f64 {
    let n = x.dims()[0] as f64;
    x.powi_scalar(2).sum().into_scalar().elem::<f64>() / n
}

/// Straightness and transport cost of the flow `ode` from the noise batch `z0`, with the path
/// discretised by `steps` Euler steps: `S ≈ (1/N) Σ_i E‖(Z1 − Z0) − v(Z_{t_i}, t_i)‖²`.
pub fn path_stats<B: Backend, const D: usize>(
    ode: &impl Ode<B, D>,
    z0: Tensor<B, D>,
    steps: usize,
) -> PathStats {
    let h = 1.0 / steps as f64;
    let mut z = z0.clone();
    let mut velocities = Vec::with_capacity(steps);
    for i in 0..steps {
        let v = ode.rhs(z.clone(), i as f64 * h);
        z = z + v.clone() * h;
        velocities.push(v);
    }
    let displacement = z - z0;
    let straightness = velocities
        .into_iter()
        .map(|v| mean_sq_norm(displacement.clone() - v))
        .sum::<f64>()
        / steps as f64;
    PathStats {
        straightness,
        transport_cost: mean_sq_norm(displacement),
    }
}

/// Sliced 2-Wasserstein distance between two equally sized point sets in `R^dim` (rows of `a`, `b`),
/// averaged over `projections` random directions: `sqrt(E_θ W2²(θ·a, θ·b))`.
pub fn sliced_wasserstein(
    a: &[f32],
    b: &[f32],
    dim: usize,
    projections: usize,
    rng: &mut impl Rng,
) -> f64 {
    assert_eq!(
        a.len(),
        b.len(),
        "sliced Wasserstein needs equal sample counts"
    );
    assert_eq!(a.len() % dim, 0);
    let n = a.len() / dim;
    let mut total = 0.0;
    for _ in 0..projections {
        let mut dir: Vec<f64> = crate::flow::noise::standard_normal(rng, dim)
            .into_iter()
            .map(f64::from)
            .collect();
        let norm = dir.iter().map(|x| x * x).sum::<f64>().sqrt();
        dir.iter_mut().for_each(|x| *x /= norm);
        let project = |pts: &[f32]| {
            let mut p: Vec<f64> = pts
                .chunks(dim)
                .map(|row| row.iter().zip(&dir).map(|(x, d)| *x as f64 * d).sum())
                .collect();
            p.sort_by(f64::total_cmp);
            p
        };
        let (pa, pb) = (project(a), project(b));
        total += pa
            .iter()
            .zip(&pb)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            / n as f64;
    }
    (total / projections as f64).sqrt()
}

/// Unbiased squared maximum mean discrepancy between point sets (rows of `a`, `b` in `R^dim`) with a
/// sum of Gaussian kernels `exp(−‖x − y‖² / (2σ²))` over `bandwidths`. Unlike transport distances it
/// is not dominated by small differences in how much mass each mode gets.
pub fn mmd2(a: &[f32], b: &[f32], dim: usize, bandwidths: &[f64]) -> f64 {
    let rows = |v: &[f32]| -> Vec<Vec<f64>> {
        v.chunks(dim)
            .map(|r| r.iter().map(|&x| x as f64).collect())
            .collect()
    };
    let (a, b) = (rows(a), rows(b));
    assert!(
        a.len() > 1 && b.len() > 1,
        "MMD needs at least two points per set"
    );
    let k = |x: &[f64], y: &[f64]| {
        let d2: f64 = x.iter().zip(y).map(|(p, q)| (p - q).powi(2)).sum();
        bandwidths
            .iter()
            .map(|s| (-d2 / (2.0 * s * s)).exp())
            .sum::<f64>()
    };
    let within = |s: &[Vec<f64>]| {
        let mut total = 0.0;
        for i in 0..s.len() {
            for j in (i + 1)..s.len() {
                total += k(&s[i], &s[j]);
            }
        }
        2.0 * total / (s.len() * (s.len() - 1)) as f64
    };
    let mut cross = 0.0;
    for x in &a {
        for y in &b {
            cross += k(x, y);
        }
    }
    within(&a) + within(&b) - 2.0 * cross / (a.len() * b.len()) as f64
}

/// Mean and covariance of the rows of `x` (`dim` columns), in f64.
fn moments(x: &[f32], dim: usize) -> (nalgebra::DVector<f64>, nalgebra::DMatrix<f64>) {
    let n = x.len() / dim;
    let m = nalgebra::DMatrix::<f64>::from_row_iterator(n, dim, x.iter().map(|&v| v as f64));
    let mean = m.row_mean().transpose();
    let centred = m - nalgebra::DMatrix::from_fn(n, dim, |_, j| mean[j]);
    let cov = centred.transpose() * &centred / (n as f64 - 1.0);
    (mean, cov)
}

/// Fréchet distance between Gaussians fitted to two feature sets (rows of `a`, `b` in `R^dim`):
/// `‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½)`, the formula of FID, computed with symmetric
/// eigendecompositions so it stays real and stable.
pub fn frechet_distance(a: &[f32], b: &[f32], dim: usize) -> f64 {
    assert!(
        a.len() >= 2 * dim
            && b.len() >= 2 * dim
            && a.len().is_multiple_of(dim)
            && b.len().is_multiple_of(dim)
    );
    let (mu_a, cov_a) = moments(a, dim);
    let (mu_b, cov_b) = moments(b, dim);
    let sqrt_psd = |m: nalgebra::DMatrix<f64>| {
        let eig = m.symmetric_eigen();
        let d = eig.eigenvalues.map(|l| l.max(0.0).sqrt());
        &eig.eigenvectors * nalgebra::DMatrix::from_diagonal(&d) * eig.eigenvectors.transpose()
    };
    let root_a = sqrt_psd(cov_a.clone());
    let middle = &root_a * &cov_b * &root_a;
    let middle = (&middle + middle.transpose()) / 2.0;
    let trace_sqrt: f64 = middle
        .symmetric_eigen()
        .eigenvalues
        .iter()
        .map(|l| l.max(0.0).sqrt())
        .sum();
    (mu_a - mu_b).norm_squared() + cov_a.trace() + cov_b.trace() - 2.0 * trace_sqrt
}

#[cfg(test)]
mod tests {
    #[test]
    fn frechet_distance_of_known_gaussians() {
        // N(0, I) vs N(m, 4I) in 2-D: ‖m‖² + Tr(I + 4I − 2·2I) = ‖m‖² + 2.
        let mut rng = crate::flow::noise::rng(3);
        let a = crate::flow::noise::standard_normal(&mut rng, 2 * 40_000);
        let b: Vec<f32> = crate::flow::noise::standard_normal(&mut rng, 2 * 40_000)
            .chunks(2)
            .flat_map(|r| [2.0 * r[0] + 1.0, 2.0 * r[1] - 2.0])
            .collect();
        let fd = frechet_distance(&a, &b, 2);
        assert!((fd - 7.0).abs() < 0.15, "{fd}");
        assert!(frechet_distance(&a, &a, 2).abs() < 1e-9);
    }

    use super::*;
    use crate::test_util::{TB, device};

    #[test]
    fn straight_flow_has_zero_straightness() {
        let dev = device();
        let z0 = Tensor::<TB, 2>::from_floats([[0.0, 0.0], [1.0, 2.0]], &dev);
        let constant = |x: Tensor<TB, 2>, _t: f64| x.zeros_like() + 3.0;
        let s = path_stats(&constant, z0, 10);
        assert!(s.straightness.abs() < 1e-9);
        assert!(
            (s.transport_cost - 18.0).abs() < 1e-4,
            "‖(3,3)‖² = 18, got {}",
            s.transport_cost
        );
    }

    #[test]
    fn curved_flow_straightness_by_hand() {
        // v(t) = 2t in 1-D: Z1 − Z0 = 1, S = ∫ (1 − 2t)² dt = 1/3 (Euler sum → 1/3 as N grows).
        let dev = device();
        let z0 = Tensor::<TB, 2>::from_floats([[0.0]], &dev);
        let field = |x: Tensor<TB, 2>, t: f64| x.zeros_like() + 2.0 * t;
        let s = path_stats(&field, z0, 1000);
        assert!(
            (s.straightness - 1.0 / 3.0).abs() < 2e-3,
            "{}",
            s.straightness
        );
    }

    #[test]
    fn mmd_separates_shifted_sets() {
        let mut rng = crate::flow::noise::rng(4);
        let a = crate::flow::noise::standard_normal(&mut rng, 2 * 300);
        let b = crate::flow::noise::standard_normal(&mut rng, 2 * 300);
        let shifted: Vec<f32> = b.iter().map(|x| x + 1.0).collect();
        let same = mmd2(&a, &b, 2, &[0.5, 1.0]);
        let far = mmd2(&a, &shifted, 2, &[0.5, 1.0]);
        assert!(same.abs() < 0.01, "same distribution: {same}");
        assert!(far > 0.1, "shifted by (1,1): {far}");
    }

    #[test]
    fn sliced_wasserstein_of_a_shift() {
        let mut rng = crate::flow::noise::rng(3);
        let a = crate::flow::noise::standard_normal(&mut rng, 2 * 500);
        let b: Vec<f32> = a.iter().map(|x| x + 1.0).collect();
        // Shifting by (1,1) moves each projection by θ·(1,1): E(θ·(1,1))² = 1 for unit θ in 2-D.
        let sw = sliced_wasserstein(&a, &b, 2, 400, &mut rng);
        assert!((sw - 1.0).abs() < 0.1, "{sw}");
        assert!(sliced_wasserstein(&a, &a, 2, 10, &mut rng) < 1e-12);
    }
}
