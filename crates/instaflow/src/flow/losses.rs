//! Training objectives of rectified flow, reflow and distillation.
//!
//! All losses are the mean squared error per element (like diffusers' `F.mse_loss`), i.e. the
//! paper's `E‖·‖²` divided by the dimension, so learning rates do not depend on the data size.
//! *Reflow* is [`rectified_flow_loss`] applied to pairs `(X0, ODE[v_k](X0 | c))` instead of
//! independent draws; nothing else changes.

use burn::tensor::{Tensor, backend::Backend};
use rand::Rng;
use rand_distr::StandardNormal;

use crate::flow::velocity::VelocityField;
use crate::flow::{T_NOISE, interpolate, target_velocity};

/// How training times `t` are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum TimeSampler {
    /// `t ~ U(0, 1)`, the paper's choice.
    #[default]
    Uniform,
    /// `t = sigmoid(m + s·ε)`, `ε ~ N(0, 1)`: more weight on the middle of the path.
    LogitNormal {
        /// Location `m`.
        mean: f64,
        /// Scale `s`.
        std: f64,
    },
}

impl TimeSampler {
    /// Draw `n` times in `[0, 1]`.
    pub fn sample(&self, rng: &mut impl Rng, n: usize) -> Vec<f32> {
        match *self {
            TimeSampler::Uniform => (0..n).map(|_| rng.random::<f32>()).collect(),
            TimeSampler::LogitNormal { mean, std } => (0..n)
                .map(|_| {
                    let e: f64 = rng.sample(StandardNormal);
                    (1.0 / (1.0 + (-(mean + std * e)).exp())) as f32
                })
                .collect(),
        }
    }
}

/// Mean squared error per element, as a one-element tensor (differentiable).
pub fn mse<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, 1> {
    (a - b).powi_scalar(2).mean()
}

/// Rectified-flow loss `E ‖(X1 − X0) − v(X_t, t | c)‖²` at the given per-row times `t`.
pub fn rectified_flow_loss<B: Backend, const D: usize, V: VelocityField<B, D>>(
    field: &V,
    x0: Tensor<B, D>,
    x1: Tensor<B, D>,
    t: Tensor<B, 1>,
    cond: &V::Cond,
) -> Tensor<B, 1> {
    let xt = interpolate(x0.clone(), x1.clone(), t.clone());
    mse(field.velocity(xt, t, cond), target_velocity(x0, x1))
}

/// Distillation loss `D(ODE[v_k](X0 | c), X0 + v(X0, 0 | c))` with `D` = L2: the student's one
/// Euler step from noise must land on the teacher's ODE solution `x1_teacher`.
pub fn distillation_loss<B: Backend, const D: usize, V: VelocityField<B, D>>(
    student: &V,
    x0: Tensor<B, D>,
    x1_teacher: Tensor<B, D>,
    cond: &V::Cond,
) -> Tensor<B, 1> {
    mse(one_step(student, x0, cond), x1_teacher)
}

/// The student's one Euler step from noise, `X0 + v(X0, 0 | c)`: what distillation compares
/// with the teacher's ODE solution.
pub fn one_step<B: Backend, const D: usize, V: VelocityField<B, D>>(
    student: &V,
    x0: Tensor<B, D>,
    cond: &V::Cond,
) -> Tensor<B, D> {
    let n = x0.dims()[0];
    let t0 = Tensor::<B, 1>::full([n], T_NOISE, &x0.device());
    x0.clone() + student.velocity(x0, t0, cond)
}

/// Pseudo-Huber distance per row, `√(‖a − b‖² + c²) − c` (Song & Dhariwal 2023; 2-rectified
/// flow++ uses `c = 0.00054·√d` for `d` values per sample): L2-like near zero, L1-like far
/// away, so outlier pairs pull less.
pub fn pseudo_huber<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
    c: f64,
) -> Tensor<B, 1> {
    let n = a.dims()[0];
    let squared = (a - b).powi_scalar(2).reshape([n as i32, -1]).sum_dim(1);
    (squared + c * c).sqrt().reshape([n]) - c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{TB, device, to_vec};

    /// v(x, t | c) = c·x: simple enough to compute the loss by hand.
    struct Scale;
    impl VelocityField<TB, 2> for Scale {
        type Cond = f32;
        fn velocity(&self, x: Tensor<TB, 2>, _t: Tensor<TB, 1>, c: &f32) -> Tensor<TB, 2> {
            x * *c
        }
    }

    #[test]
    fn rectified_flow_loss_by_hand() {
        let dev = device();
        let x0 = Tensor::<TB, 2>::from_floats([[0.0, 2.0], [1.0, 1.0]], &dev);
        let x1 = Tensor::<TB, 2>::from_floats([[4.0, 0.0], [3.0, -1.0]], &dev);
        let t = Tensor::<TB, 1>::from_floats([0.5, 0.25], &dev);
        // X_t: row 0 = [2, 1], row 1 = [1.5, 0.5]; v = 2·X_t = [4, 2], [3, 1].
        // target X1 − X0: [4, −2], [2, −2]; residuals [0, 4], [1, 3] → (0 + 16 + 1 + 9)/4 = 6.5.
        let loss = rectified_flow_loss(&Scale, x0, x1, t, &2.0);
        assert_eq!(to_vec(loss), vec![6.5]);
    }

    #[test]
    fn distillation_loss_by_hand() {
        let dev = device();
        let x0 = Tensor::<TB, 2>::from_floats([[1.0, -1.0]], &dev);
        let x1 = Tensor::<TB, 2>::from_floats([[3.0, 0.0]], &dev);
        // one step: x0 + 3·x0 = [4, −4]; residual [1, −4] → (1 + 16)/2 = 8.5.
        assert_eq!(to_vec(distillation_loss(&Scale, x0, x1, &3.0)), vec![8.5]);
    }

    #[test]
    fn pseudo_huber_by_hand() {
        let dev = device();
        let a = Tensor::<TB, 2>::from_floats([[3.0, 0.0], [1.0, 1.0]], &dev);
        let b = Tensor::<TB, 2>::from_floats([[0.0, 4.0], [1.0, 1.0]], &dev);
        // ‖a − b‖ = 5 and 0; c = 12: √(25 + 144) − 12 = 1 and 0.
        assert_eq!(to_vec(pseudo_huber(a, b, 12.0)), vec![1.0, 0.0]);
    }

    #[test]
    fn time_samplers_stay_in_unit_interval() {
        let mut rng = crate::flow::noise::rng(1);
        for s in [
            TimeSampler::Uniform,
            TimeSampler::LogitNormal {
                mean: 0.0,
                std: 1.0,
            },
        ] {
            let t = s.sample(&mut rng, 1000);
            assert!(t.iter().all(|&x| (0.0..=1.0).contains(&x)));
            let mean = t.iter().sum::<f32>() / 1000.0;
            assert!((mean - 0.5).abs() < 0.05, "{s:?} mean {mean}");
        }
    }
}
