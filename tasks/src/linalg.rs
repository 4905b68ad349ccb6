//! A bounds-checked, single-threaded wrapper around the `gemm` crate (the
//! matrix kernel dfdx's CPU backend uses).
//!
//! Why drive `gemm` directly instead of dfdx's autodiff: dfdx 0.13's
//! convolution and pooling need nightly Rust (`generic_const_exprs`), and
//! its matmul backward always computes the gradient of the input, which for
//! the first layer of a 784-256 MLP is a third of the work. Calling the same
//! kernel here with `Parallelism::None` also makes every result independent
//! of the rayon pool it runs in, so training is bit-identical whatever the
//! thread count, and many clients can train in parallel without nested
//! parallelism.
#![allow(unsafe_code)]

/// A read-only strided view of an `m x n` matrix inside a slice: element
/// `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// Row-major `rows x cols`.
    pub fn rm(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major `rows x cols` matrix (so `cols x rows`).
    pub fn rm_t(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows: cols,
            cols: rows,
            rs: 1,
            cs: cols,
        }
    }

    fn fits(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1).checked_mul(self.rs).and_then(|a| {
            (self.cols - 1)
                .checked_mul(self.cs)
                .and_then(|b| a.checked_add(b))
        });
        matches!(last, Some(l) if l < self.data.len())
    }
}

/// `out (m x n, row-major) = a (m x k) * b (k x n)`, or `out += a * b` when
/// `accumulate` is true.
///
/// Panics if the shapes disagree or a view overruns its slice: shapes are
/// fixed by the model spec, never by input data, so a mismatch is a bug.
pub(crate) fn matmul(out: &mut [f32], a: View<'_>, b: View<'_>, accumulate: bool) {
    product(out, a, b, accumulate, 1.0);
}

/// `out += scale * a * b` (`out` row-major `m x n`): a product added straight
/// into an existing matrix, e.g. an SGD step `w -= lr * g` with `g` a
/// product, without a buffer for `g` or a second pass.
pub(crate) fn matmul_add_scaled(out: &mut [f32], a: View<'_>, b: View<'_>, scale: f32) {
    product(out, a, b, true, scale);
}

fn product(out: &mut [f32], a: View<'_>, b: View<'_>, accumulate: bool, scale: f32) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: inner dimensions differ");
    assert!(
        a.fits() && b.fits(),
        "matmul: operand view overruns its slice"
    );
    assert!(out.len() >= m * n, "matmul: output too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: every element the kernel reads or writes lies inside the
    // slices, checked just above (`fits` and the output length); the output
    // does not alias the inputs (`&mut` vs `&`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_products_worked_by_hand() {
        // [1 2 3; 4 5 6] * [1 0; 0 1; 1 1] = [4 5; 10 11]
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let mut out = [0.0; 4];
        matmul(&mut out, View::rm(&a, 2, 3), View::rm(&b, 3, 2), false);
        assert_eq!(out, [4.0, 5.0, 10.0, 11.0]);
        // Accumulate, and a transposed view: a * a^T = [14 32; 32 77].
        matmul(&mut out, View::rm(&a, 2, 3), View::rm_t(&a, 2, 3), true);
        assert_eq!(out, [18.0, 37.0, 42.0, 88.0]);
    }

    #[test]
    fn scaled_product_adds_into_the_output() {
        // w = [1 1; 1 1]; w += -0.5 * ([1 2; 3 4] * I) = [0.5 0; -0.5 -1]
        let a = [1.0, 2.0, 3.0, 4.0];
        let eye = [1.0, 0.0, 0.0, 1.0];
        let mut w = [1.0; 4];
        matmul_add_scaled(&mut w, View::rm(&a, 2, 2), View::rm(&eye, 2, 2), -0.5);
        assert_eq!(w, [0.5, 0.0, -0.5, -1.0]);
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn overrun_is_refused() {
        let a = [1.0; 5];
        let mut out = [0.0; 4];
        matmul(&mut out, View::rm(&a, 2, 3), View::rm(&a, 3, 2), false);
    }
}
