//! Fused CPU f32 kernels for the training step, each a candle custom op with its backward
//! pass: causal self-attention (RoPE, scores, softmax and weighted sum per head, never
//! materialising the (batch, heads, t, t) tensors), linear maps, RMSNorm and SwiGLU. candle's composite
//! versions allocate and traverse about ten full-size temporaries per op in each direction,
//! which cost more than the matrix products on a small model.
//!
//! The layers use them only for f32 tensors on the CPU that are tracked for gradients (see
//! [`applies`]); other devices and dtypes, and inference, keep candle's path.
//!
//! Determinism: work is split over rayon's pool by rows or heads whose results do not depend
//! on which thread computes them, and every reduction across tasks sums fixed-size partials in
//! a fixed order, so a run is bitwise reproducible for any thread count.

pub(crate) mod attention;
mod linear;
pub(crate) mod norm;
pub(crate) mod swiglu;

pub use attention::causal_self_attention;
pub use linear::linear;
pub use norm::rms_norm;
pub use swiglu::swiglu;

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};

/// Whether the fused training kernels serve `x`: f32 on the CPU, tracked for gradients.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && x.track_op()
}

/// The f32 values of a contiguous CPU storage.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: f32 only");
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous");
    };
    Ok(&v[start..end])
}

/// Runs `f` on the f32 values of CPU tensor `t` (made contiguous first when it is not).
pub(crate) fn with_slice<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: CPU tensors only");
    };
    Ok(f(slice(cpu, layout, op)?))
}

/// A strided view of a row-major-or-not f32 matrix inside a slice.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
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

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            assert!((self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len());
        }
    }
}

/// `dst = (acc ? dst : 0) + beta * lhs @ rhs` on the calling thread, `dst` row-major with row
/// stride `dst_rs`. Bounds are checked here, so callers stay safe.
pub(crate) fn matmul(dst: &mut [f32], dst_rs: usize, acc: bool, lhs: Mat, rhs: Mat, beta: f32) {
    matmul_with(dst, dst_rs, acc, lhs, rhs, beta, gemm::Parallelism::None);
}

/// [`matmul`] split over rayon's threads. gemm splits the output, never the inner dimension,
/// so each value is summed in the same order whatever the thread count.
pub(crate) fn matmul_par(dst: &mut [f32], dst_rs: usize, acc: bool, lhs: Mat, rhs: Mat, beta: f32) {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    matmul_with(dst, dst_rs, acc, lhs, rhs, beta, par);
}

fn matmul_with(
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k);
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * dst_rs + n <= dst.len());
    lhs.check();
    rhs.check();
    if k == 0 {
        if !acc {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: every index gemm touches was bounds-checked above; `dst` is borrowed mutably and
    // cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A pointer that tasks writing disjoint parts of one output buffer share.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(*mut f32, usize);

// SAFETY: tasks only write disjoint index sets (each kernel states which), and the buffer
// outlives the parallel section that uses the pointer.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub fn new(buf: &mut [f32]) -> Self {
        Self(buf.as_mut_ptr(), buf.len())
    }

    /// Writes `src[c]` at `base + r * rs + c` for each row `r` of `src` (rows of `width`).
    ///
    /// # Safety
    /// No other task may write the same indices concurrently.
    pub unsafe fn write_rows(&self, base: usize, rs: usize, src: &[f32], width: usize) {
        for (r, row) in src.chunks_exact(width).enumerate() {
            let at = base + r * rs;
            assert!(at + width <= self.1);
            // SAFETY: in bounds (checked), and disjoint from other tasks' writes (caller).
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), self.0.add(at), width) };
        }
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Device, Result, Tensor, Var};

    /// A deterministic pseudo-random tensor with values in about [-scale, scale].
    pub fn randn(shape: &[usize], seed: u64, scale: f32) -> Result<Tensor> {
        let mut rng = crate::rng::Rng::new(seed, 7);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// Largest absolute difference between two tensors, relative to the largest value of `b`.
    pub fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let m = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(d / m.max(1e-12))
    }

    /// A variable holding `t`.
    pub fn var(t: &Tensor) -> Result<Var> {
        Var::from_tensor(t)
    }
}
