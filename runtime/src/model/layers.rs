//! The layers of the transformer. Fields are public so that other forward paths (a batched
//! decode) can be written from the same weights.

use super::{KvCache, ModelConfig, Weights, apply_rope, attention, kernels};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Result, Tensor};

/// A linear map without bias: a dense weight (trainable when it is a variable) or a quantized
/// one. Both compute `x @ W^T` with `W` of shape (out, in).
#[derive(Debug, Clone)]
pub enum Linear {
    /// Dense (out, in) weight.
    Dense(Tensor),
    /// Quantized weight (GGUF), inference only.
    Quantized(QMatMul),
}

impl Linear {
    /// Applies the map to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) if kernels::applies(x) && w.dtype() == DType::F32 => {
                kernels::linear(x, w)
            }
            Self::Dense(w) => {
                let dims = x.dims();
                let in_dim = dims[dims.len() - 1];
                let rows = x.elem_count() / in_dim.max(1);
                let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
                let mut out_dims = dims.to_vec();
                let last = out_dims.len() - 1;
                out_dims[last] = w.dim(0)?;
                y.reshape(out_dims)
            }
            Self::Quantized(q) => q.forward(x),
        }
    }
}

/// RMSNorm with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Scale, (hidden,).
    pub weight: Tensor,
    /// Added to the mean square before the square root.
    pub eps: f64,
}

impl RmsNorm {
    /// Wraps a scale tensor.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// Normalises the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if kernels::applies(x) {
            return kernels::rms_norm(x, &self.weight, self.eps as f32);
        }
        if x.track_op() || self.weight.track_op() {
            candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps as f32)
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
        }
    }
}

/// Causal self-attention with grouped KV heads.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection (hidden -> heads * head_dim).
    pub q: Linear,
    /// Key projection (hidden -> kv_heads * head_dim).
    pub k: Linear,
    /// Value projection (hidden -> kv_heads * head_dim).
    pub v: Linear,
    /// Output projection (heads * head_dim -> hidden).
    pub o: Linear,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl Attention {
    /// Projects `x` (batch, seq, hidden) into q (b, heads, t, d) and k, v (b, kv_heads, t, d),
    /// with RoPE applied to q and k.
    pub fn qkv(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let split = |y: Tensor, heads: usize| {
            y.reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(x)?, self.n_heads)?;
        let k = split(self.k.forward(x)?, self.n_kv_heads)?;
        let v = split(self.v.forward(x)?, self.n_kv_heads)?;
        Ok((apply_rope(&q, cos, sin)?, apply_rope(&k, cos, sin)?, v))
    }

    /// Merges heads (b, heads, t, d) back to (b, t, hidden) and applies the output projection.
    pub fn output(&self, y: &Tensor) -> Result<Tensor> {
        let (b, h, t, d) = y.dims4()?;
        self.o.forward(&y.transpose(1, 2)?.reshape((b, t, h * d))?)
    }

    /// Attention over `x` whose first token sits at `start_pos`, through the cache of layer
    /// `cache.1` when one is given. `mask` is the causal mask `causal_mask(t, start_pos)`
    /// (none for a single token); a training step on the CPU applies causality in its fused
    /// kernel instead.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        start_pos: usize,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        if cache.is_none()
            && kernels::applies(x)
            && let (Linear::Dense(q), Linear::Dense(k), Linear::Dense(v)) =
                (&self.q, &self.k, &self.v)
        {
            {
                // One product with the stacked weights instead of three; the kernel takes the
                // heads out of its rows as they are.
                let qkv = Linear::Dense(Tensor::cat(&[q, k, v], 0)?).forward(x)?;
                let y = kernels::causal_self_attention(
                    &qkv,
                    cos,
                    sin,
                    self.n_heads,
                    self.n_kv_heads,
                    self.head_dim,
                )?;
                return self.o.forward(&y);
            }
        }
        let (q, k, v) = self.qkv(x, cos, sin)?;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, start_pos, &k, &v)?,
            None => (k, v),
        };
        self.output(&attention(&q, &k, &v, mask)?)
    }
}

/// SwiGLU feed-forward: down(silu(gate(x)) * up(x)).
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Gate projection (hidden -> intermediate).
    pub gate: Linear,
    /// Up projection (hidden -> intermediate).
    pub up: Linear,
    /// Down projection (intermediate -> hidden).
    pub down: Linear,
}

impl Mlp {
    /// Applies the feed-forward to the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if kernels::applies(x)
            && let (Linear::Dense(g), Linear::Dense(u)) = (&self.gate, &self.up)
        {
            // One product with the stacked gate and up weights, then the fused SwiGLU.
            let gate_up = Linear::Dense(Tensor::cat(&[g, u], 0)?).forward(x)?;
            return self.down.forward(&kernels::swiglu(&gate_up)?);
        }
        let gate = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        self.down.forward(&(gate * self.up.forward(x)?)?)
    }
}

/// One pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(.)).
#[derive(Debug, Clone)]
pub struct Block {
    /// Norm before attention.
    pub attn_norm: RmsNorm,
    /// Self-attention.
    pub attn: Attention,
    /// Norm before the feed-forward.
    pub ffn_norm: RmsNorm,
    /// Feed-forward.
    pub mlp: Mlp,
}

impl Block {
    /// Builds block `i` from weights named `blk.{i}.*`.
    pub fn new(config: &ModelConfig, w: &impl Weights, i: usize) -> Result<Self> {
        let (h, hd) = (config.hidden_size, config.head_dim());
        let p = |n: &str| format!("blk.{i}.{n}");
        let eps = config.rms_norm_eps;
        Ok(Self {
            attn_norm: RmsNorm::new(w.tensor(&p("attn_norm.weight"), &[h])?, eps),
            attn: Attention {
                q: w.linear(&p("attn_q"), h, config.n_heads * hd)?,
                k: w.linear(&p("attn_k"), h, config.n_kv_heads * hd)?,
                v: w.linear(&p("attn_v"), h, config.n_kv_heads * hd)?,
                o: w.linear(&p("attn_output"), config.n_heads * hd, h)?,
                n_heads: config.n_heads,
                n_kv_heads: config.n_kv_heads,
                head_dim: hd,
            },
            ffn_norm: RmsNorm::new(w.tensor(&p("ffn_norm.weight"), &[h])?, eps),
            mlp: Mlp {
                gate: w.linear(&p("ffn_gate"), h, config.intermediate_size)?,
                up: w.linear(&p("ffn_up"), h, config.intermediate_size)?,
                down: w.linear(&p("ffn_down"), config.intermediate_size, h)?,
            },
        })
    }

    /// Applies the block.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        start_pos: usize,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let a = self.attn.forward(
            &self.attn_norm.forward(x)?,
            cos,
            sin,
            mask,
            start_pos,
            cache,
        )?;
        let x = (x + a)?;
        let m = self.mlp.forward(&self.ffn_norm.forward(&x)?)?;
        x + m
    }
}
