use crate::layout::Layout;
use alloc::vec;
use alloc::vec::Vec;

/// Iterator that yields linear indices for strided tensor access.
///
/// Handles non-contiguous tensors (including those with negative strides from flip)
/// by computing the correct storage index for each logical element position.
pub struct StridedIter {
    /// Current storage index (signed to handle negative strides)
    storage_index: isize,
    /// `(size, stride, position)` of each dimension, innermost last. Copied out of the layout
    /// once: reading `Shape` per element (bounds checks, `num_dims` calls) cost more than the
    /// copy the iterator feeds.
    dims: Vec<(usize, isize, usize)>,
    remaining: usize,
}

impl StridedIter {
    /// Create a new strided iterator for the given layout.
    pub fn new(layout: &Layout) -> Self {
        let shape = layout.shape();
        let strides = layout.strides();
        let dims = (0..shape.num_dims())
            .map(|d| (shape[d], strides[d], 0))
            .collect();
        Self {
            storage_index: layout.start_offset() as isize,
            dims,
            remaining: layout.num_elements(),
        }
    }
}

impl Iterator for StridedIter {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }

        debug_assert!(
            self.storage_index >= 0,
            "StridedIter: negative storage index"
        );
        let idx = self.storage_index as usize;
        self.remaining -= 1;

        // Advance multi-index (last dimension first, like odometer)
        for (size, stride, pos) in self.dims.iter_mut().rev() {
            *pos += 1;
            if *pos < *size {
                self.storage_index += *stride;
                break;
            }
            // Wrap around this dimension
            *pos = 0;
            self.storage_index -= (*size as isize - 1) * *stride;
        }

        Some(idx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for StridedIter {}

/// Visit the rows of two same-shape strided layouts with non-negative strides in row-major
/// order: `f(lhs_start, rhs_start, len, lhs_step, rhs_step)` once per innermost run, after
/// dropping size-1 dimensions and merging dimensions that are one run in both layouts.
///
/// Returns `false` (visiting nothing) when a stride is negative; callers then fall back to
/// [`StridedIter`]. Walking runs instead of elements lets the caller's inner loop vectorise
/// (a broadcast `[1, C, 1, 1]` operand over `[B, C, H, W]` becomes `B·C` runs of `H·W`).
pub fn for_each_run2(
    lhs: &Layout,
    rhs: &Layout,
    mut f: impl FnMut(usize, usize, usize, isize, isize),
) -> bool {
    let shape = lhs.shape();
    let (ls, rs) = (lhs.strides(), rhs.strides());
    if ls.iter().chain(rs.iter()).any(|&s| s < 0) {
        return false;
    }
    // (size, lhs stride, rhs stride), outermost first.
    let mut dims: Vec<(usize, isize, isize)> = Vec::with_capacity(shape.num_dims());
    for d in 0..shape.num_dims() {
        let (n, l, r) = (shape[d], ls[d], rs[d]);
        if n == 0 {
            return true;
        }
        if n == 1 {
            continue;
        }
        match dims.last_mut() {
            Some(prev) if prev.1 == l * n as isize && prev.2 == r * n as isize => {
                prev.0 *= n;
                prev.1 = l;
                prev.2 = r;
            }
            _ => dims.push((n, l, r)),
        }
    }
    let (l0, r0) = (lhs.start_offset(), rhs.start_offset());
    let Some(&(len, l_step, r_step)) = dims.last() else {
        f(l0, r0, 1, 0, 0);
        return true;
    };
    let outer = &dims[..dims.len() - 1];
    let mut pos = vec![0usize; outer.len()];
    let (mut l, mut r) = (l0 as isize, r0 as isize);
    loop {
        f(l as usize, r as usize, len, l_step, r_step);
        // Odometer over the outer dimensions.
        let mut d = outer.len();
        loop {
            if d == 0 {
                return true;
            }
            d -= 1;
            let (n, ld, rd) = outer[d];
            pos[d] += 1;
            if pos[d] < n {
                l += ld;
                r += rd;
                break;
            }
            pos[d] = 0;
            l -= (n as isize - 1) * ld;
            r -= (n as isize - 1) * rd;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_std::Shape;

    #[test]
    fn test_contiguous_iteration() {
        let layout = Layout::contiguous(Shape::from(vec![2, 3]));
        let indices: Vec<_> = StridedIter::new(&layout).collect();
        assert_eq!(indices, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn test_transposed_iteration() {
        // Original: [[0, 1, 2], [3, 4, 5]] (shape [2, 3], strides [3, 1])
        // Transposed: [[0, 3], [1, 4], [2, 5]] (shape [3, 2], strides [1, 3])
        let layout = Layout::contiguous(Shape::from(vec![2, 3])).transpose(0, 1);
        let indices: Vec<_> = StridedIter::new(&layout).collect();
        assert_eq!(indices, vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn test_narrowed_iteration() {
        // Original: [[0, 1, 2, 3], [4, 5, 6, 7]] (shape [2, 4])
        // Narrowed dim=1, start=1, len=2: [[1, 2], [5, 6]]
        let layout = Layout::contiguous(Shape::from(vec![2, 4])).narrow(1, 1, 2);
        let indices: Vec<_> = StridedIter::new(&layout).collect();
        assert_eq!(indices, vec![1, 2, 5, 6]);
    }
}

#[cfg(test)]
mod run_tests {
    use super::*;
    use burn_std::Shape;

    /// The runs of `for_each_run2` expanded element by element equal `StridedIter`'s order.
    fn check(lhs: &Layout, rhs: &Layout) {
        let mut got = Vec::new();
        assert!(for_each_run2(lhs, rhs, |l, r, n, ls, rs| {
            for i in 0..n as isize {
                got.push((
                    (l as isize + i * ls) as usize,
                    (r as isize + i * rs) as usize,
                ));
            }
        }));
        let want: Vec<_> = StridedIter::new(lhs).zip(StridedIter::new(rhs)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn runs_match_the_element_order() {
        let x = Layout::contiguous(Shape::from(vec![2, 3, 4, 5]));
        // A per-channel operand broadcast over batch and space.
        let c = Layout::new(Shape::from(vec![2, 3, 4, 5]), vec![0, 1, 0, 0], 0);
        check(&x, &c);
        check(&c, &x);
        // A permuted operand (heads split out of the last dimension), with an offset.
        let p = Layout::new(Shape::from(vec![2, 3, 4, 5]), vec![60, 5, 15, 1], 7);
        check(&x, &p);
        check(&p, &c);
        // Size-1 and rank-0 layouts.
        let one = Layout::contiguous(Shape::from(vec![1, 1]));
        check(&one, &one);
        let row = Layout::new(Shape::from(vec![3, 1, 4]), vec![4, 9, 1], 2);
        check(&row, &Layout::contiguous(Shape::from(vec![3, 1, 4])));
    }

    #[test]
    fn negative_strides_are_left_to_the_caller() {
        let x = Layout::contiguous(Shape::from(vec![4]));
        let flipped = Layout::new(Shape::from(vec![4]), vec![-1], 3);
        assert!(!for_each_run2(&x, &flipped, |_, _, _, _, _| {}));
    }
}
