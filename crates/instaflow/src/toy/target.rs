//! The toy data distribution π1: a mixture of Gaussians on a circle, conditioned on a class label.

use rand::Rng;
use rand_distr::StandardNormal;

/// Class `c` owns two opposite modes on a circle, at angles `π·c/K` and `π·c/K + π`; the label is
/// the "prompt". Two modes per class keep the conditional 1-RF paths crossing, which reflow fixes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ToyTarget {
    /// Number of classes `K` (the null label is `K`).
    pub classes: usize,
    /// Radius of the circle of modes.
    pub radius: f32,
    /// Standard deviation of each mode.
    pub mode_std: f32,
}

impl ToyTarget {
    /// Modes per class.
    pub const MODES_PER_CLASS: usize = 2;

    /// The label that means "no condition" (∅).
    pub fn null_label(&self) -> usize {
        self.classes
    }

    /// Centre of mode `m` (0 or 1) of class `c`.
    pub fn mode_center(&self, class: usize, mode: usize) -> [f32; 2] {
        let angle = std::f32::consts::PI * (class as f32 / self.classes as f32 + mode as f32);
        [self.radius * angle.cos(), self.radius * angle.sin()]
    }

    /// One sample of π1 given `class`.
    pub fn sample(&self, class: usize, rng: &mut impl Rng) -> [f32; 2] {
        let mode = rng.random_range(0..Self::MODES_PER_CLASS);
        let [cx, cy] = self.mode_center(class, mode);
        let ex: f32 = rng.sample(StandardNormal);
        let ey: f32 = rng.sample(StandardNormal);
        [cx + self.mode_std * ex, cy + self.mode_std * ey]
    }

    /// Samples (flattened rows) for each of `labels`.
    pub fn sample_many(&self, labels: &[usize], rng: &mut impl Rng) -> Vec<f32> {
        labels.iter().flat_map(|&c| self.sample(c, rng)).collect()
    }

    /// The class whose nearest mode is closest to `p`.
    pub fn classify(&self, p: [f32; 2]) -> usize {
        let dist = |c: usize, m: usize| {
            let [x, y] = self.mode_center(c, m);
            (x - p[0]).powi(2) + (y - p[1]).powi(2)
        };
        (0..self.classes)
            .min_by(|&a, &b| {
                let da = dist(a, 0).min(dist(a, 1));
                let db = dist(b, 0).min(dist(b, 1));
                da.total_cmp(&db)
            })
            .expect("at least one class")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_classified_as_their_class() {
        let target = ToyTarget {
            classes: 4,
            radius: 3.0,
            mode_std: 0.25,
        };
        let mut rng = crate::flow::noise::rng(0);
        for c in 0..4 {
            for _ in 0..100 {
                assert_eq!(target.classify(target.sample(c, &mut rng)), c);
            }
        }
        let [x, y] = target.mode_center(1, 1);
        assert!((x.hypot(y) - 3.0).abs() < 1e-5);
    }
}
