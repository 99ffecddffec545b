//! SwiGLU on the fused gate/up projection: `silu(gate) * up`, forward and backward in one pass;
//! the training step's (a candle custom op, or called by the fused step) and the serving
//! forward pass's.

use super::math::{sigmoid, silu};
use super::{pool, slice};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// Rows per parallel task.
const ROWS: usize = 16;

/// `silu(a) * b` where each row of `gate_up` (.., 2 * width) is `a` then `b`. Returns
/// (.., width). CPU f32; differentiable.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    gate_up.contiguous()?.apply_op1(SwiGlu)
}

struct SwiGlu;

/// `out = silu(a) * b` for rows `[a | b]` of `x` (each 2n wide); `out` rows are n wide.
pub(crate) fn forward(x: &[f32], n: usize, out: &mut [f32]) {
    assert!(n > 0 && x.len().is_multiple_of(2 * n) && out.len() * 2 == x.len());
    pool::chunks_mut(out, ROWS * n, |i, out| {
        let x = &x[i * ROWS * 2 * n..];
        for (o, x) in out.chunks_exact_mut(n).zip(x.chunks_exact(2 * n)) {
            let (a, b) = x.split_at(n);
            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                *o = silu(*a) * b;
            }
        }
    });
}

/// The gradient of [`forward`] with respect to `x`, from the output gradient `g`, into `dx`
/// (every value written).
pub(crate) fn backward(x: &[f32], g: &[f32], n: usize, dx: &mut [f32]) {
    assert!(
        n > 0 && x.len().is_multiple_of(2 * n) && g.len() * 2 == x.len() && dx.len() == x.len()
    );
    pool::chunks_mut(dx, ROWS * 2 * n, |i, dx| {
        let (x, g) = (&x[i * ROWS * 2 * n..], &g[i * ROWS * n..]);
        let rows = dx.chunks_exact_mut(2 * n).zip(x.chunks_exact(2 * n));
        for ((dx, x), g) in rows.zip(g.chunks_exact(n)) {
            let (a, b) = x.split_at(n);
            let (da, db) = dx.split_at_mut(n);
            for i in 0..n {
                let s = sigmoid(a[i]);
                let silu = a[i] * s;
                da[i] = g[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
                db[i] = g[i] * silu;
            }
        }
    });
}

/// Row width (half the input's last dimension) and the output shape.
fn geometry(l: &Layout, name: &str) -> Result<(usize, Shape)> {
    let dims = l.shape().dims();
    let Some(&last) = dims.last() else {
        candle_core::bail!("{name}: scalar input");
    };
    if last % 2 != 0 {
        candle_core::bail!("{name}: odd last dimension {last}");
    }
    let mut out = dims.to_vec();
    *out.last_mut().expect("non-empty") = last / 2;
    Ok((last / 2, Shape::from(out)))
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "anneal-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let (n, shape) = geometry(l, self.name())?;
        let mut out = vec![0f32; x.len() / 2];
        forward(x, n, &mut out);
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &SwiGluBwd)?))
    }
}

/// Gradient with respect to the fused gate/up input.
struct SwiGluBwd;

impl CustomOp2 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "anneal-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(xs, xl, self.name())?, slice(gs, gl, self.name())?);
        let (n, shape) = geometry(xl, self.name())?;
        if gl.shape() != &shape {
            candle_core::bail!("{}: gradient shape {:?}", self.name(), gl.shape());
        }
        let mut dx = vec![0f32; x.len()];
        backward(x, g, n, &mut dx);
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{assert_same_grads, randn, rel_diff, var};
    use candle_core::D;

    /// Forward and gradient match `silu(gate) * up` in candle to 1e-5 of the largest value.
    #[test]
    fn matches_composite() -> Result<()> {
        let x = var(&randn(&[2, 19, 2 * 40], 1, 3.0)?)?;
        let dy = randn(&[2, 19, 40], 2, 1.0)?;
        let fused = swiglu(x.as_tensor())?;
        let (a, b) = (
            x.as_tensor().narrow(D::Minus1, 0, 40)?,
            x.as_tensor().narrow(D::Minus1, 40, 40)?,
        );
        let composite = (candle_nn::ops::silu(&a)? * b)?;
        assert!(rel_diff(&fused, &composite)? < 1e-5);
        assert_same_grads(fused, composite, &dy, &[&x])
    }
}
