//! anneal's own CPU kernels, by operation, for every caller: the training step (each a candle
//! custom op with its backward pass, or called directly by the fused step), the serving engine's
//! quantized forward pass, and the BERT encoder.
//!
//! - [`math`]: `exp` and what is built on it (softmax, sigmoid, SiLU, erf), fixed-lane sums;
//! - [`norm`]: RMSNorm, forward (training and serving) and backward;
//! - [`rope`]: the rotary position embedding and its inverse;
//! - [`attention`]: causal self-attention for training (with backward) and single-query
//!   attention over a serving KV cache (decode), on the same softmax and RoPE;
//! - [`swiglu`]: the SwiGLU activation, forward and backward;
//! - [`gemm`]: matrix products, f32 ([`gemm::sgemm`], with the `linear` custom op) and
//!   quantized GGUF blocks ([`gemm::qmatmul`]);
//! - [`pool`]: the thread pool and every parallel-for entry point the kernels use;
//! - here: the candle custom-op glue ([`applies`], [`slice`], [`with_slice`], [`SharedOut`]).
//!
//! candle's composite versions of the training ops allocate and traverse about ten full-size
//! temporaries per op in each direction, which cost more than the matrix products on a small
//! model. The layers use the custom ops only for f32 tensors on the CPU that are tracked for
//! gradients (see [`applies`]); other devices and dtypes, and inference, keep candle's path.
//!
//! Determinism: work is split over the [`pool`] by rows or heads whose results do not depend
//! on which thread computes them, and every reduction across tasks sums fixed-size partials in
//! a fixed order, so a run is bitwise reproducible for any thread count. The matrix products
//! ([`gemm::sgemm`]) also give the same bits on every vector width, so a job can move between
//! AVX-512 and AVX2 nodes.

pub mod attention;
pub mod gemm;
pub(crate) mod math;
pub(crate) mod norm;
pub mod pool;
pub(crate) mod rope;
pub(crate) mod swiglu;

pub use attention::causal_self_attention;
pub use gemm::Mat;
pub use gemm::linear::linear;
pub(crate) use gemm::{matmul, matmul_par};
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

    /// The start of the buffer, for tasks that check their own bounds.
    pub fn ptr(&self) -> *mut f32 {
        self.0
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

    /// Backpropagates `fused * dy` and `composite * dy` and asserts that the gradients of
    /// every variable in `vars` agree to 1e-5 of the largest value.
    pub fn assert_same_grads(
        fused: Tensor,
        composite: Tensor,
        dy: &Tensor,
        vars: &[&Var],
    ) -> Result<()> {
        let gf = (fused * dy)?.sum_all()?.backward()?;
        let gc = (composite * dy)?.sum_all()?.backward()?;
        for v in vars {
            let (f, c) = (gf.get(v.as_tensor()), gc.get(v.as_tensor()));
            let d = rel_diff(f.expect("fused gradient"), c.expect("composite gradient"))?;
            assert!(d < 1e-5, "gradient differs by {d}");
        }
        Ok(())
    }
}
