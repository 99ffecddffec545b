//! RMSNorm with a learned scale, forward and backward in one pass over each row: the training
//! step's (a candle custom op, or called by the fused step) and the serving forward pass's.

use super::math::dot;
use super::{pool, slice, with_slice};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Rows per parallel task; also the size of the partial sums of the scale's gradient, so
/// their (fixed) summation order does not depend on the thread count.
const ROWS: usize = 32;

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dimension. CPU f32; differentiable in
/// both `x` and `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f32,
}

/// 1 / sqrt(mean(row^2) + eps).
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = dot(row, row) / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// `out = x / rms(x) * w`, row by row (rows of `w.len()`), in parallel over blocks of rows.
pub(crate) fn forward(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    assert!(n > 0 && x.len().is_multiple_of(n) && out.len() == x.len());
    pool::chunks_mut(out, ROWS * n, |i, out| {
        let x = &x[i * ROWS * n..];
        for (o, x) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
            let r = inv_rms(x, eps);
            for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                *o = x * r * w;
            }
        }
    });
}

/// The gradients of [`forward`] from the output gradient `g`: into `dx` (added to it when
/// `acc_dx`) and `dw` (likewise with `acc_dw`). The scale's gradient sums fixed blocks of
/// rows, then the blocks in order, so it does not depend on the thread count.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    x: &[f32],
    w: &[f32],
    eps: f32,
    g: &[f32],
    dx: &mut [f32],
    acc_dx: bool,
    dw: &mut [f32],
    acc_dw: bool,
) {
    let n = w.len();
    assert!(n > 0 && x.len().is_multiple_of(n) && g.len() == x.len() && dx.len() == x.len());
    assert_eq!(dw.len(), n);
    let partials: Vec<Vec<f32>> = pool::map_chunks_mut(dx, ROWS * n, |b, dx| {
        let at = b * ROWS * n;
        let (x, g) = (&x[at..at + dx.len()], &g[at..at + dx.len()]);
        let mut dw = vec![0f32; n];
        let rows = dx.chunks_exact_mut(n).zip(x.chunks_exact(n));
        for ((dx, x), g) in rows.zip(g.chunks_exact(n)) {
            let r = inv_rms(x, eps);
            let c: f32 = g.iter().zip(w).zip(x).map(|((g, w), x)| g * w * x).sum();
            let k = r * r * r * c / n as f32;
            for i in 0..n {
                let d = r * g[i] * w[i] - x[i] * k;
                dx[i] = if acc_dx { dx[i] + d } else { d };
                dw[i] += g[i] * x[i] * r;
            }
        }
        dw
    });
    if !acc_dw {
        dw.fill(0.0);
    }
    for p in &partials {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "anneal-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(xs, xl, self.name())?, slice(ws, wl, self.name())?);
        let n = w.len();
        if xl.shape().dims().last() != Some(&n) {
            candle_core::bail!("{}: scale of {n} for {:?}", self.name(), xl.shape());
        }
        let mut out = vec![0f32; x.len()];
        forward(x, w, self.eps, &mut out);
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = w.elem_count();
        let (dx, dw) = with_slice(x, self.name(), |x| {
            with_slice(w, self.name(), |w| {
                with_slice(grad, self.name(), |g| {
                    let mut dx = vec![0f32; x.len()];
                    let mut dw = vec![0f32; n];
                    backward(x, w, self.eps, g, &mut dx, false, &mut dw, false);
                    (dx, dw)
                })
            })
        })???;
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
        Ok((Some(dx), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{assert_same_grads, randn, rel_diff, var};

    /// Forward and both gradients match candle's composite RMSNorm to 1e-5 of the largest value.
    #[test]
    fn matches_composite() -> Result<()> {
        let x = var(&randn(&[3, 37, 48], 1, 2.0)?)?;
        let w = var(&(randn(&[48], 2, 0.5)? + 1.0)?)?;
        let dy = randn(&[3, 37, 48], 3, 1.0)?;
        let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)?;
        let composite = candle_nn::ops::rms_norm_slow(x.as_tensor(), w.as_tensor(), 1e-5)?;
        assert!(rel_diff(&fused, &composite)? < 1e-5);
        assert_same_grads(fused, composite, &dy, &[&x, &w])
    }
}
