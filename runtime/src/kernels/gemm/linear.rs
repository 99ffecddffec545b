//! `x @ W^T` as one graph node. candle's version is four (reshape, transpose, matmul,
//! reshape), and its backward pass adds every node's gradient into a fresh zeroed buffer, so
//! each reshape of an activation costs a full copy in the backward pass.

use super::super::{slice, with_slice};
use super::{Mat, matmul_par};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `x @ weight^T` over the last dimension of `x`, `weight` (out, in). CPU f32; differentiable
/// in both.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&weight.contiguous()?, Linear)
}

struct Linear;

/// (rows, in, out) of a call, and the output shape.
fn geometry(xl: &Layout, wl: &Layout) -> Result<(usize, usize, usize, Shape)> {
    let (out, inp) = wl.shape().dims2()?;
    let dims = xl.shape().dims();
    if dims.last() != Some(&inp) {
        candle_core::bail!("anneal-linear: {:?} @ {:?}^T", xl.shape(), wl.shape());
    }
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("non-empty") = out;
    Ok((
        xl.shape().elem_count() / inp.max(1),
        inp,
        out,
        Shape::from(out_dims),
    ))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "anneal-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(xs, xl, self.name())?, slice(ws, wl, self.name())?);
        let (rows, inp, out, shape) = geometry(xl, wl)?;
        let mut y = vec![0f32; rows * out];
        let (xm, wm) = (Mat::rows(x, rows, inp, inp), Mat::rows(w, out, inp, inp));
        matmul_par(&mut y, out, false, xm, wm.t(), 1.0);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out, inp) = w.dims2()?;
        let rows = x.elem_count() / inp.max(1);
        let (dx, dw) = with_slice(x, self.name(), |x| {
            with_slice(w, self.name(), |w| {
                with_slice(grad, self.name(), |g| {
                    let (xm, wm) = (Mat::rows(x, rows, inp, inp), Mat::rows(w, out, inp, inp));
                    let gm = Mat::rows(g, rows, out, out);
                    let mut dx = vec![0f32; rows * inp];
                    matmul_par(&mut dx, inp, false, gm, wm, 1.0);
                    let mut dw = vec![0f32; out * inp];
                    matmul_par(&mut dw, inp, false, gm.t(), xm, 1.0);
                    (dx, dw)
                })
            })
        })???;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{assert_same_grads, randn, rel_diff, var};

    /// Forward and both gradients match candle's matmul to 1e-5 of the largest value.
    #[test]
    fn matches_composite() -> Result<()> {
        let x = var(&randn(&[3, 21, 40], 1, 1.0)?)?;
        let w = var(&randn(&[24, 40], 2, 0.3)?)?;
        let dy = randn(&[3, 21, 24], 3, 1.0)?;
        let fused = linear(x.as_tensor(), w.as_tensor())?;
        let composite = x
            .as_tensor()
            .reshape((63, 40))?
            .matmul(&w.as_tensor().t()?)?
            .reshape((3, 21, 24))?;
        assert!(rel_diff(&fused, &composite)? < 1e-5);
        assert_same_grads(fused, composite, &dy, &[&x, &w])
    }
}
