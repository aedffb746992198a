//! Velocity fields `v(x, t | c)` and classifier-free guidance.

use burn::tensor::{Tensor, backend::Backend};

/// A (conditional) velocity field over batched rank-`D` tensors: `dx/dt = v(x, t | c)`.
///
/// `t` holds one rectified-flow time per batch row (see [`crate::flow`] for the convention).
pub trait VelocityField<B: Backend, const D: usize> {
    /// The condition: class labels, text embeddings, …  It must be able to express "no condition"
    /// (∅), which guidance needs.
    type Cond;

    /// Evaluate `v(x, t | cond)`.
    fn velocity(&self, x: Tensor<B, D>, t: Tensor<B, 1>, cond: &Self::Cond) -> Tensor<B, D>;
}

/// An ODE right-hand side `f(x, t)` with one scalar time for the whole batch; what solvers integrate.
pub trait Ode<B: Backend, const D: usize> {
    /// Evaluate `f(x, t)`.
    fn rhs(&self, x: Tensor<B, D>, t: f64) -> Tensor<B, D>;
}

impl<B: Backend, const D: usize, F> Ode<B, D> for F
where
    F: Fn(Tensor<B, D>, f64) -> Tensor<B, D>,
{
    fn rhs(&self, x: Tensor<B, D>, t: f64) -> Tensor<B, D> {
        self(x, t)
    }
}

/// Classifier-free guidance for a velocity field: `v^α = α·v_cond + (1 − α)·v_null`
/// (written `v_null + α·(v_cond − v_null)`, as in `pipeline_rf.py`). `α = 1` is plain conditional.
pub fn guide<B: Backend, const D: usize>(
    v_cond: Tensor<B, D>,
    v_null: Tensor<B, D>,
    alpha: f64,
) -> Tensor<B, D> {
    v_null.clone() + (v_cond - v_null) * alpha
}

/// A velocity field bound to a condition and a guidance strength α: an [`Ode`] for the solvers.
///
/// With `α = 1` (or no null condition) it costs one network evaluation per call, otherwise two.
pub struct Guided<'a, V, C> {
    field: &'a V,
    cond: &'a C,
    null: Option<&'a C>,
    alpha: f64,
}

impl<'a, V, C> Guided<'a, V, C> {
    /// Plain conditional velocity `v(x, t | cond)`.
    pub fn new(field: &'a V, cond: &'a C) -> Self {
        Self {
            field,
            cond,
            null: None,
            alpha: 1.0,
        }
    }

    /// Guided velocity `α·v(x,t|cond) + (1 − α)·v(x,t|null)`.
    pub fn with_guidance(field: &'a V, cond: &'a C, null: &'a C, alpha: f64) -> Self {
        Self {
            field,
            cond,
            null: Some(null),
            alpha,
        }
    }

    /// Number of network evaluations one call of [`Ode::rhs`] costs.
    pub fn evals_per_call(&self) -> usize {
        if self.needs_null() { 2 } else { 1 }
    }

    fn needs_null(&self) -> bool {
        self.null.is_some() && self.alpha != 1.0
    }
}

impl<B, V, const D: usize> Ode<B, D> for Guided<'_, V, V::Cond>
where
    B: Backend,
    V: VelocityField<B, D>,
{
    fn rhs(&self, x: Tensor<B, D>, t: f64) -> Tensor<B, D> {
        let n = x.dims()[0];
        let times = Tensor::<B, 1>::full([n], t, &x.device());
        let v_cond = self.field.velocity(x.clone(), times.clone(), self.cond);
        match self.null {
            Some(null) if self.needs_null() => {
                let v_null = self.field.velocity(x, times, null);
                guide(v_cond, v_null, self.alpha)
            }
            _ => v_cond,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{TB, device, to_vec};
    use std::cell::Cell;

    /// v(x, t | c) = c·x + t, counting evaluations.
    struct Affine {
        calls: Cell<usize>,
    }
    impl VelocityField<TB, 2> for Affine {
        type Cond = f64;
        fn velocity(&self, x: Tensor<TB, 2>, t: Tensor<TB, 1>, c: &f64) -> Tensor<TB, 2> {
            self.calls.set(self.calls.get() + 1);
            x * *c + crate::flow::broadcast_time::<TB, 2>(t)
        }
    }

    #[test]
    fn cfg_formula_and_eval_count() {
        let dev = device();
        let field = Affine {
            calls: Cell::new(0),
        };
        let x = Tensor::<TB, 2>::from_floats([[1.0, 2.0]], &dev);
        let (c, null) = (3.0, 0.0);

        // α = 2: 2·(3x + t) − 1·(0·x + t) = 6x + t; at t = 0.5 → [6.5, 12.5].
        let g = Guided::with_guidance(&field, &c, &null, 2.0);
        assert_eq!(g.evals_per_call(), 2);
        let v = to_vec(g.rhs(x.clone(), 0.5));
        assert_eq!(v, vec![6.5, 12.5]);
        assert_eq!(field.calls.get(), 2);

        // α = 1 needs only the conditional evaluation.
        let g = Guided::with_guidance(&field, &c, &null, 1.0);
        assert_eq!(g.evals_per_call(), 1);
        let v = to_vec(g.rhs(x.clone(), 0.5));
        assert_eq!(v, vec![3.5, 6.5]);
        assert_eq!(field.calls.get(), 3);

        // α = 0 is the unconditional field.
        let v = to_vec(Guided::with_guidance(&field, &c, &null, 0.0).rhs(x, 0.5));
        assert_eq!(v, vec![0.5, 0.5]);
    }
}
