//! ODE solvers for `dx/dt = f(x, t)` on batched tensors: Euler, Heun and adaptive
//! Dormand–Prince RK45. Every solver reports its number of function evaluations (NFE).
//!
//! Euler with `N = 1` from `t = 0` is InstaFlow's one-step generator: `x1 = x0 + v(x0, 0)`.

use burn::tensor::{ElementConversion, Tensor, backend::Backend};

use crate::flow::velocity::Ode;

/// The result of integrating an ODE.
#[derive(Debug, Clone)]
pub struct Solution<B: Backend, const D: usize> {
    /// State at the end time.
    pub x: Tensor<B, D>,
    /// Number of evaluations of the right-hand side.
    pub nfe: usize,
    /// Accepted steps taken.
    pub steps: usize,
    /// `(t, x_t)` at every accepted step including both ends, if requested.
    pub trajectory: Option<Vec<(f64, Tensor<B, D>)>>,
}

/// Which solver to use, with its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Solver {
    /// Explicit Euler with a fixed number of steps (1 = one-step generation).
    Euler {
        /// Number of steps.
        steps: usize,
    },
    /// Heun's second-order method (two evaluations per step).
    Heun {
        /// Number of steps.
        steps: usize,
    },
    /// Adaptive Dormand–Prince 5(4).
    Rk45(Rk45Options),
}

impl Solver {
    /// Integrate `ode` from `t0` to `t1` starting at `x`.
    pub fn solve<B: Backend, const D: usize>(
        &self,
        ode: &impl Ode<B, D>,
        x: Tensor<B, D>,
        t0: f64,
        t1: f64,
        keep_trajectory: bool,
    ) -> Solution<B, D> {
        match *self {
            Solver::Euler { steps } => euler(ode, x, t0, t1, steps, keep_trajectory),
            Solver::Heun { steps } => heun(ode, x, t0, t1, steps, keep_trajectory),
            Solver::Rk45(opts) => rk45(ode, x, t0, t1, opts, keep_trajectory),
        }
    }
}

/// Explicit Euler: `x ← x + h·f(x, t)` with `h = (t1 − t0)/steps`. Order 1.
pub fn euler<B: Backend, const D: usize>(
    ode: &impl Ode<B, D>,
    mut x: Tensor<B, D>,
    t0: f64,
    t1: f64,
    steps: usize,
    keep_trajectory: bool,
) -> Solution<B, D> {
    assert!(steps > 0, "Euler needs at least one step");
    let h = (t1 - t0) / steps as f64;
    let mut traj = keep_trajectory.then(|| vec![(t0, x.clone())]);
    for i in 0..steps {
        let t = t0 + i as f64 * h;
        x = x.clone() + ode.rhs(x, t) * h;
        if let Some(tr) = traj.as_mut() {
            tr.push((t0 + (i + 1) as f64 * h, x.clone()));
        }
    }
    Solution {
        x,
        nfe: steps,
        steps,
        trajectory: traj,
    }
}

/// Heun's method (explicit trapezoid): predictor Euler, corrector average of slopes. Order 2.
pub fn heun<B: Backend, const D: usize>(
    ode: &impl Ode<B, D>,
    mut x: Tensor<B, D>,
    t0: f64,
    t1: f64,
    steps: usize,
    keep_trajectory: bool,
) -> Solution<B, D> {
    assert!(steps > 0, "Heun needs at least one step");
    let h = (t1 - t0) / steps as f64;
    let mut traj = keep_trajectory.then(|| vec![(t0, x.clone())]);
    for i in 0..steps {
        let t = t0 + i as f64 * h;
        let k1 = ode.rhs(x.clone(), t);
        let predicted = x.clone() + k1.clone() * h;
        let k2 = ode.rhs(predicted, t + h);
        x = x + (k1 + k2) * (h / 2.0);
        if let Some(tr) = traj.as_mut() {
            tr.push((t + h, x.clone()));
        }
    }
    Solution {
        x,
        nfe: 2 * steps,
        steps,
        trajectory: traj,
    }
}

/// Settings of the adaptive RK45 solver.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rk45Options {
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// Give up (returning the state reached) after this many attempted steps.
    pub max_steps: usize,
}

impl Default for Rk45Options {
    fn default() -> Self {
        Self {
            rtol: 1e-5,
            atol: 1e-5,
            max_steps: 10_000,
        }
    }
}

// Dormand–Prince 5(4) tableau.
const C: [f64; 7] = [0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0];
const A: [&[f64]; 7] = [
    &[],
    &[1.0 / 5.0],
    &[3.0 / 40.0, 9.0 / 40.0],
    &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    &[
        19372.0 / 6561.0,
        -25360.0 / 2187.0,
        64448.0 / 6561.0,
        -212.0 / 729.0,
    ],
    &[
        9017.0 / 3168.0,
        -355.0 / 33.0,
        46732.0 / 5247.0,
        49.0 / 176.0,
        -5103.0 / 18656.0,
    ],
    // The 5th-order weights: the last stage is evaluated at the new point (FSAL).
    &[
        35.0 / 384.0,
        0.0,
        500.0 / 1113.0,
        125.0 / 192.0,
        -2187.0 / 6784.0,
        11.0 / 84.0,
    ],
];
/// 5th-order minus embedded 4th-order weights: the local error estimate.
const E: [f64; 7] = [
    71.0 / 57600.0,
    0.0,
    -71.0 / 16695.0,
    71.0 / 1920.0,
    -17253.0 / 339200.0,
    22.0 / 525.0,
    -1.0 / 40.0,
];

/// Root-mean-square of `e / (atol + rtol·max(|x|, |x_new|))` over the whole batch (Hairer's norm).
fn error_norm<B: Backend, const D: usize>(
    e: Tensor<B, D>,
    x: &Tensor<B, D>,
    x_new: &Tensor<B, D>,
    opts: &Rk45Options,
) -> f64 {
    let scale = x.clone().abs().max_pair(x_new.clone().abs()) * opts.rtol + opts.atol;
    (e / scale)
        .powi_scalar(2)
        .mean()
        .sqrt()
        .into_scalar()
        .elem::<f64>()
}

/// Adaptive Dormand–Prince RK45 with one step size for the whole batch.
///
/// The initial step follows Hairer, Nørsett & Wanner (one extra evaluation); step control uses the
/// standard `0.9·err^(−1/5)` rule clamped to `[0.2, 10]`.
pub fn rk45<B: Backend, const D: usize>(
    ode: &impl Ode<B, D>,
    mut x: Tensor<B, D>,
    t0: f64,
    t1: f64,
    opts: Rk45Options,
    keep_trajectory: bool,
) -> Solution<B, D> {
    let span = t1 - t0;
    let dir = span.signum();
    let mut traj = keep_trajectory.then(|| vec![(t0, x.clone())]);
    let mut t = t0;
    let mut k1 = ode.rhs(x.clone(), t);
    let mut nfe = 1;

    // Initial step: h = 0.01·‖x‖/‖f‖, then refined with a second derivative estimate.
    let d0 = error_norm(x.clone(), &x, &x, &opts);
    let d1 = error_norm(k1.clone(), &x, &x, &opts);
    let mut h = if d0 < 1e-5 || d1 < 1e-5 {
        1e-6
    } else {
        0.01 * d0 / d1
    }
    .min(span.abs());
    {
        let probe = x.clone() + k1.clone() * (dir * h);
        let k = ode.rhs(probe, t + dir * h);
        nfe += 1;
        let d2 = error_norm(k - k1.clone(), &x, &x, &opts) / h;
        let h1 = if d1.max(d2) <= 1e-15 {
            (h * 1e-3).max(1e-6)
        } else {
            (0.01 / d1.max(d2)).powf(1.0 / 5.0)
        };
        h = (100.0 * h).min(h1).min(span.abs());
    }

    let mut accepted = 0;
    let mut attempts = 0;
    while dir * (t1 - t) > 1e-12 && attempts < opts.max_steps {
        attempts += 1;
        h = h.min((t1 - t).abs());
        let hs = dir * h;
        let mut k = vec![k1.clone()];
        for stage in 1..7 {
            let mut xi = x.clone();
            for (j, a) in A[stage].iter().enumerate() {
                if *a != 0.0 {
                    xi = xi + k[j].clone() * (hs * a);
                }
            }
            if stage == 6 {
                // xi is the 5th-order solution; the 7th stage is f at the new point (FSAL).
                let x_new = xi;
                let k7 = ode.rhs(x_new.clone(), t + hs);
                k.push(k7);
                nfe += 6;
                let mut err = k[0].clone() * (hs * E[0]);
                for (j, e) in E.iter().enumerate().skip(1) {
                    if *e != 0.0 {
                        err = err + k[j].clone() * (hs * e);
                    }
                }
                let en = error_norm(err, &x, &x_new, &opts);
                if en <= 1.0 {
                    t += hs;
                    x = x_new;
                    k1 = k.pop().expect("seven stages");
                    accepted += 1;
                    if let Some(tr) = traj.as_mut() {
                        tr.push((t, x.clone()));
                    }
                    let factor = if en == 0.0 {
                        10.0
                    } else {
                        (0.9 * en.powf(-0.2)).clamp(0.2, 10.0)
                    };
                    h *= factor;
                } else {
                    h *= (0.9 * en.powf(-0.2)).clamp(0.2, 1.0);
                }
                break;
            }
            k.push(ode.rhs(xi, t + C[stage] * hs));
        }
    }
    Solution {
        x,
        nfe,
        steps: accepted,
        trajectory: traj,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{TB, device, to_vec};

    /// Closed-form solution of the test ODE.
    fn exact(x0: f64, t: f64) -> f64 {
        // dx/dt = −x + cos t  ⇒  x = (x0 − 1/2)e^{−t} + (cos t + sin t)/2
        (x0 - 0.5) * (-t).exp() + (t.cos() + t.sin()) / 2.0
    }

    fn ode() -> impl Ode<TB, 2> {
        |x: Tensor<TB, 2>, t: f64| -x + t.cos()
    }

    fn error(solver: Solver) -> (f64, usize) {
        let x0 = [0.3f32, -1.2];
        let x = Tensor::<TB, 2>::from_floats([x0], &device());
        let sol = solver.solve(&ode(), x, 0.0, 1.0, false);
        let got = to_vec(sol.x);
        let err = got
            .iter()
            .zip(x0)
            .map(|(g, a)| (*g as f64 - exact(a as f64, 1.0)).abs())
            .fold(0.0, |m: f64, d| {
                if d.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.max(d)
                }
            });
        (err, sol.nfe)
    }

    #[test]
    fn euler_is_first_order() {
        let (e1, n1) = error(Solver::Euler { steps: 20 });
        let (e2, n2) = error(Solver::Euler { steps: 40 });
        assert_eq!((n1, n2), (20, 40));
        let ratio = e1 / e2;
        assert!(
            (1.8..2.2).contains(&ratio),
            "halving h should halve the error, ratio {ratio}"
        );
    }

    #[test]
    fn heun_is_second_order() {
        let (e1, n1) = error(Solver::Heun { steps: 10 });
        let (e2, _) = error(Solver::Heun { steps: 20 });
        assert_eq!(n1, 20);
        let ratio = e1 / e2;
        assert!(
            (3.5..4.5).contains(&ratio),
            "halving h should quarter the error, ratio {ratio}"
        );
    }

    #[test]
    fn rk45_meets_tolerance_and_adapts() {
        let loose = Rk45Options {
            rtol: 1e-3,
            atol: 1e-3,
            ..Default::default()
        };
        let tight = Rk45Options {
            rtol: 1e-6,
            atol: 1e-6,
            ..Default::default()
        };
        let (e_loose, n_loose) = error(Solver::Rk45(loose));
        let (e_tight, n_tight) = error(Solver::Rk45(tight));
        assert!(e_loose < 1e-3, "error {e_loose} above tolerance 1e-3");
        assert!(
            e_tight < 1e-5,
            "error {e_tight} (f32 state) for tolerance 1e-6"
        );
        assert!(
            n_tight > n_loose,
            "tighter tolerance must cost more NFE ({n_tight} vs {n_loose})"
        );
    }

    #[test]
    fn euler_one_step_is_exact_on_a_straight_field() {
        // A straight flow: v(x, t) = x1 − x0 for the pair (x0, x1), constant along the path.
        let dev = device();
        let x0 = Tensor::<TB, 2>::from_floats([[0.5, -2.0], [1.0, 3.0]], &dev);
        let x1 = Tensor::<TB, 2>::from_floats([[4.0, 1.0], [-1.0, 0.25]], &dev);
        let v = x1.clone() - x0.clone();
        let straight = move |_x: Tensor<TB, 2>, _t: f64| v.clone();
        let sol = euler(&straight, x0, 0.0, 1.0, 1, true);
        assert_eq!(sol.nfe, 1);
        assert_eq!(to_vec(sol.x), to_vec(x1));
        assert_eq!(sol.trajectory.unwrap().len(), 2);
    }

    #[test]
    fn rk45_is_cheap_on_a_straight_field() {
        let dev = device();
        let x0 = Tensor::<TB, 2>::from_floats([[0.5, -2.0]], &dev);
        let straight = |x: Tensor<TB, 2>, _t: f64| x.zeros_like() + 2.0;
        let sol = rk45(&straight, x0, 0.0, 1.0, Rk45Options::default(), false);
        // Two evaluations choose the first step (h ≈ 0.04 here); zero error estimates then let the
        // step grow tenfold, so three steps of six evaluations reach t = 1.
        assert!(
            sol.nfe <= 20,
            "a straight field needs ~three steps, got NFE {}",
            sol.nfe
        );
        let x = to_vec(sol.x);
        assert!((x[0] - 2.5).abs() < 1e-6 && x[1].abs() < 1e-6, "{x:?}");
    }
}
