//! Matrix products: f32 ([`sgemm`], and the training's `linear` custom op on it) and on
//! quantized GGUF blocks ([`qmatmul`], serving).

pub(crate) mod linear;
pub mod qmatmul;
pub mod sgemm;

/// A strided view of a row-major-or-not f32 matrix inside a slice (public for the [`sgemm`]
/// benchmark).
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    /// The values; element (r, c) is `data[r * rs + c * cs]`.
    pub data: &'a [f32],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance between rows.
    pub rs: usize,
    /// Distance between columns.
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `rows` x `cols` with row stride `rs`, starting at `data[0]`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transposed view.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Rows `r0..r0 + n` and columns `c0..c0 + m`.
    pub fn sub(self, r0: usize, n: usize, c0: usize, m: usize) -> Self {
        assert!(r0 + n <= self.rows && c0 + m <= self.cols);
        let start = if n == 0 || m == 0 {
            0
        } else {
            r0 * self.rs + c0 * self.cs
        };
        Self {
            data: &self.data[start..],
            rows: n,
            cols: m,
            ..self
        }
    }

    /// Panics unless every element lies inside `data` (the matrix products' unsafe code
    /// relies on it).
    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1)
                .checked_mul(self.rs)
                .zip((self.cols - 1).checked_mul(self.cs))
                .and_then(|(r, c)| r.checked_add(c));
            assert!(
                last.is_some_and(|l| l < self.data.len()),
                "view out of bounds"
            );
        }
    }
}

/// `dst = (acc ? dst : 0) + beta * lhs @ rhs` on the calling thread, `dst` row-major with row
/// stride `dst_rs`, with the same bits on every CPU ([`sgemm`]). Bounds are checked there, so
/// callers stay safe.
pub(crate) fn matmul(dst: &mut [f32], dst_rs: usize, acc: bool, lhs: Mat, rhs: Mat, beta: f32) {
    sgemm::Isa::selected().matmul(dst, dst_rs, acc, lhs, rhs, beta);
}

/// [`matmul`] split over the [`super::pool`]'s threads. The output is split, never the inner dimension, so
/// each value is summed in the same order whatever the thread count.
pub(crate) fn matmul_par(dst: &mut [f32], dst_rs: usize, acc: bool, lhs: Mat, rhs: Mat, beta: f32) {
    sgemm::Isa::selected().matmul_par(dst, dst_rs, acc, lhs, rhs, beta);
}
