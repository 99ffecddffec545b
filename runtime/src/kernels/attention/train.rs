//! Causal self-attention from the fused q/k/v projection, with RoPE, per head: the scores of
//! one head (t x t) live only in a per-task buffer, and the backward pass recomputes them
//! instead of keeping (batch, heads, t, t) tensors alive between the passes.
//!
//! Layout: the input is the output of one matrix product with the stacked q, k and v weights,
//! (batch, t, (heads + 2 * kv_heads) * head_dim), each row holding all query heads, then all
//! key heads, then all value heads; the output is (batch, t, heads * head_dim), ready for the
//! output projection. Query head `h` reads KV head `h / (heads / kv_heads)`.

use super::super::gemm::{Mat, matmul};
use super::super::rope::{rope, unrope};
use super::super::{SharedOut, math, pool, slice, with_slice};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// Rows of scores computed together. Only the blocks on or below the diagonal are computed,
/// which skips ~3/8 of the products at t = 256.
const BLOCK: usize = 64;

/// Causal self-attention over `qkv` (batch, t, (n_heads + 2 * n_kv_heads) * head_dim), whose
/// first position sits at the first row of `cos` and `sin` (t, head_dim / 2). Returns
/// (batch, t, n_heads * head_dim). CPU f32 only; differentiable.
pub fn causal_self_attention(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) -> Result<Tensor> {
    let op = CausalAttention {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        n_heads,
        n_kv_heads,
        head_dim,
    };
    qkv.contiguous()?.apply_op1(op)
}

#[derive(Clone)]
struct CausalAttention {
    cos: Tensor,
    sin: Tensor,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

/// Sizes of one call, checked against the input.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    b: usize,
    t: usize,
    /// Width of an input row.
    w: usize,
    nh: usize,
    nkv: usize,
    d: usize,
}

impl Geometry {
    /// The geometry of `b` sequences of `t` positions with `nh` query heads, `nkv` KV heads of
    /// width `d`.
    pub(crate) fn new(b: usize, t: usize, nh: usize, nkv: usize, d: usize) -> Result<Self> {
        if nkv == 0 || !nh.is_multiple_of(nkv) || !d.is_multiple_of(2) {
            candle_core::bail!(
                "{}: {nh} heads, {nkv} KV heads of width {d}",
                CausalAttention::NAME
            );
        }
        Ok(Self {
            b,
            t,
            w: (nh + 2 * nkv) * d,
            nh,
            nkv,
            d,
        })
    }

    /// Output row width.
    pub(crate) fn out_w(&self) -> usize {
        self.nh * self.d
    }
    fn q_col(&self, h: usize) -> usize {
        h * self.d
    }
    fn k_col(&self, g: usize) -> usize {
        (self.nh + g) * self.d
    }
    fn v_col(&self, g: usize) -> usize {
        (self.nh + self.nkv + g) * self.d
    }
    fn rep(&self) -> usize {
        self.nh / self.nkv
    }
}

impl CausalAttention {
    const NAME: &'static str = "anneal-causal-attention";

    fn geometry(&self, shape: &Shape) -> Result<Geometry> {
        let (b, t, w) = shape.dims3()?;
        let g = Geometry::new(b, t, self.n_heads, self.n_kv_heads, self.head_dim)?;
        if w != g.w {
            candle_core::bail!("{}: bad shape {shape:?}", Self::NAME);
        }
        if self.cos.dims() != [t, g.d / 2] || self.sin.dims() != [t, g.d / 2] {
            candle_core::bail!("{}: RoPE tables do not cover {t} positions", Self::NAME);
        }
        Ok(g)
    }

    /// Runs `f` with the RoPE tables' values.
    fn with_tables<R>(&self, f: impl FnOnce(&[f32], &[f32]) -> R) -> Result<R> {
        with_slice(&self.cos, Self::NAME, |c| {
            with_slice(&self.sin, Self::NAME, |s| f(c, s))
        })?
    }
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, Self::NAME)?;
        let g = self.geometry(l.shape())?;
        let mut out = vec![0f32; g.b * g.t * g.out_w()];
        let mut saved = Saved::default();
        self.with_tables(|cos, sin| forward(x, g, cos, sin, &mut out, &mut saved))?;
        let shape = Shape::from((g.b, g.t, g.out_w()));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = arg.apply_op2_no_bwd(&grad.contiguous()?, &CausalAttentionBwd(self.clone()))?;
        Ok(Some(dx))
    }
}

/// The gradient with respect to the fused projection, from the input and the output gradient.
struct CausalAttentionBwd(CausalAttention);

impl CustomOp2 for CausalAttentionBwd {
    fn name(&self) -> &'static str {
        "anneal-causal-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let dy = slice(gs, gl, self.name())?;
        let g = self.0.geometry(xl.shape())?;
        if gl.shape().dims() != [g.b, g.t, g.out_w()] {
            candle_core::bail!("{}: gradient shape {:?}", self.name(), gl.shape());
        }
        let mut dx = vec![0f32; x.len()];
        // The op keeps nothing between the passes: run the forward pass again for its state.
        self.0.with_tables(|cos, sin| {
            let mut saved = Saved::default();
            let mut out = vec![0f32; g.b * g.t * g.out_w()];
            forward(x, g, cos, sin, &mut out, &mut saved);
            backward(x, dy, g, cos, sin, &mut dx, &saved);
        })?;
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// What the backward pass reuses from the forward pass: the rotated (and, for queries,
/// scaled) heads and the attention probabilities, (batch, heads, t, t) on and below the
/// diagonal blocks. Keeping them costs b * heads * t^2 floats and saves recomputing the
/// scores, the softmax and RoPE in the backward pass.
#[derive(Default)]
pub(crate) struct Saved {
    q: Vec<f32>,
    k: Vec<f32>,
    p: Vec<f32>,
}

/// The attention output of `x` (g.b * g.t rows of g.in_w()) into `out` (rows of g.out_w()),
/// RoPE from `cos`/`sin` (at least g.t rows of g.d / 2). Every value of `out` is written.
pub(crate) fn forward(
    x: &[f32],
    g: Geometry,
    cos: &[f32],
    sin: &[f32],
    out: &mut [f32],
    saved: &mut Saved,
) {
    assert_eq!(x.len(), g.b * g.t * g.w);
    assert_eq!(out.len(), g.b * g.t * g.out_w());
    assert!(cos.len() >= g.t * g.d / 2 && sin.len() >= g.t * g.d / 2);
    let (t, d) = (g.t, g.d);
    saved.q.resize(g.b * g.nh * t * d, 0.0);
    saved.k.resize(g.b * g.nkv * t * d, 0.0);
    saved.p.resize(g.b * g.nh * t * t, 0.0);
    pool::chunks_mut(&mut saved.k, t * d, |task, k| {
        let (bi, kv) = (task / g.nkv, task % g.nkv);
        rope_rows(&x[bi * t * g.w..], g, g.k_col(kv), cos, sin, 1.0, k);
    });
    let keys = &saved.k;
    let shared = SharedOut::new(out);
    pool::zip_chunks_mut(&mut saved.p, t * t, &mut saved.q, t * d, |task, p, q| {
        let (bi, h) = (task / g.nh, task % g.nh);
        let x = &x[bi * t * g.w..(bi + 1) * t * g.w];
        let kv = h / g.rep();
        let scale = 1.0 / (d as f32).sqrt();
        rope_rows(x, g, g.q_col(h), cos, sin, scale, q);
        let k = &keys[(bi * g.nkv + kv) * t * d..][..t * d];
        probabilities(q, k, g, p);
        let v = Mat::rows(&x[g.v_col(kv)..], t, d, g.w);
        let mut o = vec![0f32; t * d];
        for (r0, n) in blocks(t) {
            let p_blk = Mat::rows(&p[r0 * t..], n, r0 + n, t);
            matmul(
                &mut o[r0 * d..],
                d,
                false,
                p_blk,
                v.sub(0, r0 + n, 0, d),
                1.0,
            );
        }
        // SAFETY: task (bi, h) alone writes head h's columns of batch bi's rows.
        unsafe {
            shared.write_rows(bi * t * g.out_w() + h * d, g.out_w(), &o, d);
        }
    });
}

/// The gradient with respect to `x` (rows of g.in_w()) of the attention output, from the
/// output gradient `dy` (rows of g.out_w()), into `dx`. Every value of `dx` is written.
pub(crate) fn backward(
    x: &[f32],
    dy: &[f32],
    g: Geometry,
    cos: &[f32],
    sin: &[f32],
    dx: &mut [f32],
    saved: &Saved,
) {
    assert_eq!(x.len(), g.b * g.t * g.w);
    assert_eq!(
        saved.p.len(),
        g.b * g.nh * g.t * g.t,
        "attention: forward not saved"
    );
    assert_eq!(dx.len(), x.len());
    assert_eq!(dy.len(), g.b * g.t * g.out_w());
    assert!(cos.len() >= g.t * g.d / 2 && sin.len() >= g.t * g.d / 2);
    let shared = SharedOut::new(dx);
    pool::run(g.b * g.nkv, |task| {
        let (bi, kv) = (task / g.nkv, task % g.nkv);
        let (t, d) = (g.t, g.d);
        let x = &x[bi * t * g.w..(bi + 1) * t * g.w];
        let dy = &dy[bi * t * g.out_w()..(bi + 1) * t * g.out_w()];
        let scale = 1.0 / (d as f32).sqrt();
        let k = &saved.k[(bi * g.nkv + kv) * t * d..][..t * d];
        let v = Mat::rows(&x[g.v_col(kv)..], t, d, g.w);
        let (mut dk, mut dv) = (vec![0f32; t * d], vec![0f32; t * d]);
        let mut dq = vec![0f32; t * d];
        let mut ds = vec![0f32; t * t];
        let base = bi * t * g.w;
        for h in kv * g.rep()..(kv + 1) * g.rep() {
            let q = &saved.q[(bi * g.nh + h) * t * d..][..t * d];
            let p = &saved.p[(bi * g.nh + h) * t * t..][..t * t];
            let dout = Mat::rows(&dy[h * d..], t, d, g.out_w());
            // dP = dO V^T on and below the diagonal.
            for (r0, n) in blocks(t) {
                matmul(
                    &mut ds[r0 * t..],
                    t,
                    false,
                    dout.sub(r0, n, 0, d),
                    v.sub(0, r0 + n, 0, d).t(),
                    1.0,
                );
            }
            // dS = P * (dP - rowsum(P * dP)).
            for i in 0..t {
                let (pr, dr) = (&p[i * t..i * t + i + 1], &mut ds[i * t..i * t + i + 1]);
                let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                for (dv_, pv) in dr.iter_mut().zip(pr) {
                    *dv_ = pv * (*dv_ - dot);
                }
                let end = ((i / BLOCK) + 1) * BLOCK;
                ds[i * t + i + 1..i * t + end.min(t)].fill(0.0);
            }
            let (pm, dsm) = (Mat::rows(p, t, t, t), Mat::rows(&ds, t, t, t));
            for (r0, n) in blocks(t) {
                // Rows r0.. of dV and dK gather from query rows r0.. only.
                let rest = t - r0;
                matmul(
                    &mut dv[r0 * d..],
                    d,
                    true,
                    pm.sub(r0, rest, r0, n).t(),
                    dout.sub(r0, rest, 0, d),
                    1.0,
                );
                matmul(
                    &mut dk[r0 * d..],
                    d,
                    true,
                    dsm.sub(r0, rest, r0, n).t(),
                    Mat::rows(&q[r0 * d..], rest, d, d),
                    1.0,
                );
                // dQ rows r0.. from keys 0..r0 + n; q was scaled, so is its gradient.
                matmul(
                    &mut dq[r0 * d..],
                    d,
                    false,
                    dsm.sub(r0, n, 0, r0 + n),
                    Mat::rows(k, r0 + n, d, d),
                    scale,
                );
            }
            unrope_rows(&mut dq, g, cos, sin);
            // SAFETY: task (bi, kv) alone writes the q columns of its heads, and its
            // own k and v columns, of batch bi's rows.
            unsafe { shared.write_rows(base + g.q_col(h), g.w, &dq, d) };
        }
        unrope_rows(&mut dk, g, cos, sin);
        // SAFETY: as above.
        unsafe {
            shared.write_rows(base + g.k_col(kv), g.w, &dk, d);
            shared.write_rows(base + g.v_col(kv), g.w, &dv, d);
        }
    });
}

/// Row blocks `(start, len)` covering `0..t`.
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t.div_ceil(BLOCK)).map(move |i| (i * BLOCK, BLOCK.min(t - i * BLOCK)))
}

/// The attention probabilities of queries `q` over keys `k` (both t x d, q already scaled)
/// into `p` (t x t): row i holds softmax over keys 0..=i, zeros after it up to the end of its
/// row block; entries beyond the block are never read.
fn probabilities(q: &[f32], k: &[f32], g: Geometry, p: &mut [f32]) {
    let (t, d) = (g.t, g.d);
    let km = Mat::rows(k, t, d, d);
    for (r0, n) in blocks(t) {
        matmul(
            &mut p[r0 * t..],
            t,
            false,
            Mat::rows(&q[r0 * d..], n, d, d),
            km.sub(0, r0 + n, 0, d).t(),
            1.0,
        );
        for i in r0..r0 + n {
            let row = &mut p[i * t..i * t + r0 + n];
            let (live, dead) = row.split_at_mut(i + 1);
            math::softmax(live);
            dead.fill(0.0);
        }
    }
}

/// RoPE ([`rope`]) of the head at column `col` of every row of `x` (rows of `g.w`), times
/// `scale`, into `out` (t x d).
fn rope_rows(
    x: &[f32],
    g: Geometry,
    col: usize,
    cos: &[f32],
    sin: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let half = g.d / 2;
    for (pos, dst) in out.chunks_exact_mut(g.d).take(g.t).enumerate() {
        dst.copy_from_slice(&x[pos * g.w + col..pos * g.w + col + g.d]);
        let at = pos * half..(pos + 1) * half;
        rope(dst, &cos[at.clone()], &sin[at], scale);
    }
}

/// The inverse rotation of [`rope_rows`] ([`unrope`]), in place on `x` (t x d): the gradient
/// of a rotated head with respect to the head before rotation.
fn unrope_rows(x: &mut [f32], g: Geometry, cos: &[f32], sin: &[f32]) {
    let half = g.d / 2;
    for (pos, row) in x.chunks_exact_mut(g.d).enumerate() {
        let at = pos * half..(pos + 1) * half;
        unrope(row, &cos[at.clone()], &sin[at]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{assert_same_grads, randn, rel_diff, var};
    use crate::model::{apply_rope, attention, causal_mask};
    use candle_core::{D, Device};

    /// The composite version: split heads, RoPE, masked softmax attention, merge heads.
    fn reference(
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        nh: usize,
        nkv: usize,
        d: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = qkv.dims3()?;
        let split = |col: usize, heads: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, col * d, heads * d)?
                .reshape((b, t, heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = apply_rope(&split(0, nh)?, cos, sin)?;
        let k = apply_rope(&split(nh, nkv)?, cos, sin)?;
        let v = split(nh + nkv, nkv)?;
        let mask = causal_mask(t, 0, &Device::Cpu)?;
        let y = attention(&q, &k, &v, Some(&mask))?;
        y.transpose(1, 2)?.reshape((b, t, nh * d))
    }

    fn check(b: usize, t: usize, nh: usize, nkv: usize, d: usize) -> Result<()> {
        let cfg = crate::model::ModelConfig {
            vocab_size: 16,
            hidden_size: nh * d,
            n_layers: 1,
            n_heads: nh,
            n_kv_heads: nkv,
            intermediate_size: 16,
            max_seq_len: t,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_embeddings: false,
        };
        let (cos, sin) = crate::model::rope_tables(&cfg, &Device::Cpu)?;
        let x = var(&randn(&[b, t, (nh + 2 * nkv) * d], 1, 1.0)?)?;
        let dy = randn(&[b, t, nh * d], 2, 1.0)?;
        let fused = causal_self_attention(x.as_tensor(), &cos, &sin, nh, nkv, d)?;
        let composite = reference(x.as_tensor(), &cos, &sin, nh, nkv, d)?;
        let fwd = rel_diff(&fused, &composite)?;
        assert!(fwd < 1e-5, "forward differs by {fwd}");
        assert_same_grads(fused, composite, &dy, &[&x])
    }

    /// Forward and gradient match the composite candle version to 1e-5 of the largest value,
    /// with grouped KV heads and a length that is not a multiple of the block.
    #[test]
    fn matches_composite() -> Result<()> {
        check(2, 100, 4, 2, 16)?;
        check(1, 130, 2, 2, 8)?;
        check(3, 7, 3, 1, 4)
    }
}
