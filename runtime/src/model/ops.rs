//! The pieces of a forward pass that a decoder needs on its own: RoPE tables and application,
//! the causal mask, grouped-KV expansion and attention. Public so that a batched decode (each
//! sequence at its own position) can be written outside this module from the same parts.
//!
//! candle's fast RoPE, softmax and RMSNorm kernels have no backward pass; when a tensor is
//! tracked for gradients these functions take differentiable paths instead.

use super::ModelConfig;
use candle_core::{CpuStorage, D, DType, Device, Layout, Result, Shape, Tensor};

/// RoPE cos and sin tables, each (max_seq_len, head_dim / 2), in f32.
pub fn rope_tables(config: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = config.head_dim() / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            1.0 / config
                .rope_theta
                .powf(2.0 * i as f64 / config.head_dim() as f64) as f32
        })
        .collect();
    let n = config.max_seq_len;
    let mut angles = Vec::with_capacity(n * half);
    for pos in 0..n {
        angles.extend(inv_freq.iter().map(|f| pos as f32 * f));
    }
    let angles = Tensor::from_vec(angles, (n, half), device)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// Applies interleaved (GGUF-style) RoPE to `x` (batch, heads, seq, head_dim). `cos` and `sin`
/// are (seq, head_dim / 2) for a shared position range, or (batch, seq, head_dim / 2) for
/// sequences at different positions (not differentiable).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    if !x.track_op() {
        return candle_nn::rotary_emb::rope_i(&x, cos, sin);
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, RopeCpu)
    } else {
        candle_nn::rotary_emb::rope_i_slow(&x, cos, sin)
    }
}

/// Differentiable interleaved RoPE on CPU. Its gradient is the inverse rotation, i.e. the
/// same op with the sine negated.
struct RopeCpu;

impl candle_core::CustomOp3 for RopeCpu {
    fn name(&self) -> &'static str {
        "anneal-rope-i"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        lx: &Layout,
        cs: &CpuStorage,
        lc: &Layout,
        ss: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(s)) = (xs, cs, ss) else {
            candle_core::bail!("anneal-rope-i: f32 only");
        };
        let (Some((x0, x1)), Some((c0, c1)), Some((s0, s1))) = (
            lx.contiguous_offsets(),
            lc.contiguous_offsets(),
            ls.contiguous_offsets(),
        ) else {
            candle_core::bail!("anneal-rope-i: inputs must be contiguous");
        };
        let (x, c, s) = (&x[x0..x1], &c[c0..c1], &s[s0..s1]);
        let (_b, _h, t, d) = lx.shape().dims4()?;
        if c.len() != t * d / 2 || s.len() != c.len() {
            candle_core::bail!("anneal-rope-i: tables do not match {:?}", lx.shape());
        }
        let mut out = vec![0f32; x.len()];
        for (row_in, row_out) in x.chunks_exact(t * d).zip(out.chunks_exact_mut(t * d)) {
            for (pos, (xi, yi)) in row_in
                .chunks_exact(d)
                .zip(row_out.chunks_exact_mut(d))
                .enumerate()
            {
                let (cp, sp) = (
                    &c[pos * d / 2..(pos + 1) * d / 2],
                    &s[pos * d / 2..(pos + 1) * d / 2],
                );
                for i in 0..d / 2 {
                    let (a, b) = (xi[2 * i], xi[2 * i + 1]);
                    yi[2 * i] = a * cp[i] - b * sp[i];
                    yi[2 * i + 1] = a * sp[i] + b * cp[i];
                }
            }
        }
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad
            .contiguous()?
            .apply_op3_no_bwd(cos, &sin.neg()?, &RopeCpu)?;
        Ok((Some(g), None, None))
    }
}

/// Additive causal mask (t, offset + t): query i (at position offset + i) sees keys 0..=offset + i.
pub fn causal_mask(t: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let total = offset + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j <= offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, total), device)
}

/// Expands (batch, n_kv_heads, seq, head_dim) to (batch, n_kv_heads * n_rep, seq, head_dim),
/// each KV head serving `n_rep` consecutive query heads.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kvh, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kvh, n_rep, t, d))?
        .reshape((b, kvh * n_rep, t, d))
}

/// Scaled dot-product attention: `q` (batch, heads, t, d) over `k`, `v` (batch, kv_heads, T, d),
/// with an additive `mask` broadcastable to (batch, heads, t, T). Returns (batch, heads, t, d).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let n_rep = q.dim(1)? / k.dim(1)?;
    let k = repeat_kv(k, n_rep)?;
    let v = repeat_kv(v, n_rep)?;
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    // bf16/f16 scores are normalised in f32 (as fused attention kernels do); the mask is f32.
    let low_precision = matches!(scores.dtype(), DType::BF16 | DType::F16);
    let scores = if low_precision {
        scores.to_dtype(DType::F32)?
    } else {
        scores
    };
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = if scores.track_op() {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?
    };
    let probs = if low_precision {
        probs.to_dtype(v.dtype())?
    } else {
        probs
    };
    probs.matmul(&v.contiguous()?)
}
