//! The layers of the transformer, and the block operations on them for candle's forward
//! passes ([`CandleOps`], run by the one block recipe of [`super::block`]). Fields are public so
//! that other forward paths (the quantized CPU serving pass) can be built from the same weights.

use super::block::{BlockOps, NormAt, Proj};
use super::{KvCache, ModelConfig, Weights, apply_rope, attention};
use crate::kernels;
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
    /// Attention from the projected heads ([`Acts::One`]: the stacked `[q | k | v]` of a
    /// training step on the CPU, causal in the fused kernel; [`Acts::Parts`]: q, k and v),
    /// whose first token sits at `start_pos`, through the cache of layer `cache.1` when one is
    /// given. `mask` is the causal mask `causal_mask(t, start_pos)` (none for a single token).
    /// Returns the heads' outputs side by side, (b, t, heads * head_dim).
    pub fn attend(
        &self,
        qkv: Acts,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        start_pos: usize,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (q, k, v) = match qkv {
            // The kernel takes the heads out of the stacked rows as they are.
            Acts::One(qkv) => {
                return kernels::causal_self_attention(
                    &qkv,
                    cos,
                    sin,
                    self.n_heads,
                    self.n_kv_heads,
                    self.head_dim,
                );
            }
            Acts::Parts(p) => match <[Tensor; 3]>::try_from(p) {
                Ok([q, k, v]) => (q, k, v),
                Err(p) => candle_core::bail!("attention: {} projections", p.len()),
            },
        };
        let (b, t, _) = q.dims3()?;
        let split = |y: Tensor, heads: usize| {
            y.reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = apply_rope(&split(q, self.n_heads)?, cos, sin)?;
        let k = apply_rope(&split(k, self.n_kv_heads)?, cos, sin)?;
        let v = split(v, self.n_kv_heads)?;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, start_pos, &k, &v)?,
            None => (k, v),
        };
        let y = attention(&q, &k, &v, mask)?;
        let (b, h, t, d) = y.dims4()?;
        y.transpose(1, 2)?.reshape((b, t, h * d))
    }
}

/// SwiGLU feed-forward's weights: down(silu(gate(x)) * up(x)) ([`super::block`]).
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Gate projection (hidden -> intermediate).
    pub gate: Linear,
    /// Up projection (hidden -> intermediate).
    pub up: Linear,
    /// Down projection (intermediate -> hidden).
    pub down: Linear,
}

/// One pre-norm decoder block's weights: x + attn(norm(x)), then + mlp(norm(.)), as
/// [`super::block::block`] runs it.
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

    /// The projections, in the order [`CandleOps::project`] numbers them: q, k, v, o, gate,
    /// up, down.
    pub fn linears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.attn, &self.mlp);
        [&a.q, &a.k, &a.v, &a.o, &m.gate, &m.up, &m.down]
    }
}

/// Activations on candle's path: one tensor, or the parts of a stacked projection computed
/// one by one (stacking the weights of an inference model would copy them on every pass).
pub enum Acts {
    /// One tensor.
    One(Tensor),
    /// The parts of [`Proj::Qkv`] (q, k, v) or [`Proj::GateUp`] (gate, up).
    Parts(Vec<Tensor>),
}

impl Acts {
    /// The one tensor.
    pub fn one(self) -> Result<Tensor> {
        match self {
            Self::One(t) => Ok(t),
            Self::Parts(p) => candle_core::bail!("{} projections where one was expected", p.len()),
        }
    }
}

/// The block operations ([`BlockOps`]) on candle's layers, for every candle forward pass of
/// the architecture; a pass plugs in its attention and how it applies a projection.
pub struct CandleOps<'a, A, P> {
    /// The model's blocks.
    pub blocks: &'a [Block],
    /// Whether a training step on the CPU may run the fused kernels (no KV cache).
    pub fused: bool,
    /// `attend(layer, qkv)`: the layer's attention from its projected heads (see
    /// [`Attention::attend`]).
    pub attend: A,
    /// `project(layer, i, linear, x)`: applies projection `i` (in [`Block::linears`] order)
    /// of the layer, `linear`, to `x`.
    pub project: P,
}

impl<A, P> CandleOps<'_, A, P>
where
    P: FnMut(usize, usize, &Linear, &Tensor) -> Result<Tensor>,
{
    /// Projections `parts` (indices into [`Block::linears`]) of layer `layer` applied to `x`:
    /// one product with the stacked weights where the fused training kernels run (dense
    /// weights, tracked f32 on the CPU), else one product each.
    fn stacked(&mut self, layer: usize, parts: &[usize], x: &Tensor) -> Result<Acts> {
        let linears = self.blocks[layer].linears();
        if self.fused && kernels::applies(x) {
            let dense: Option<Vec<&Tensor>> = parts
                .iter()
                .map(|&i| match linears[i] {
                    Linear::Dense(w) => Some(w),
                    Linear::Quantized(_) => None,
                })
                .collect();
            if let Some(w) = dense {
                return Ok(Acts::One(Linear::Dense(Tensor::cat(&w, 0)?).forward(x)?));
            }
        }
        let parts = parts
            .iter()
            .map(|&i| (self.project)(layer, i, linears[i], x))
            .collect::<Result<Vec<_>>>()?;
        Ok(Acts::Parts(parts))
    }
}

impl<A, P> BlockOps for CandleOps<'_, A, P>
where
    A: FnMut(usize, Acts) -> Result<Tensor>,
    P: FnMut(usize, usize, &Linear, &Tensor) -> Result<Tensor>,
{
    type X = Acts;
    type Error = candle_core::Error;

    fn norm(&mut self, layer: usize, at: NormAt, x: &Acts) -> Result<Acts> {
        let Acts::One(x) = x else {
            candle_core::bail!("norm of stacked projections");
        };
        let b = &self.blocks[layer];
        let norm = match at {
            NormAt::Attention => &b.attn_norm,
            NormAt::FeedForward => &b.ffn_norm,
        };
        Ok(Acts::One(norm.forward(x)?))
    }

    fn linear(&mut self, layer: usize, proj: Proj, x: Acts) -> Result<Acts> {
        let x = x.one()?;
        match proj {
            Proj::Qkv => self.stacked(layer, &[0, 1, 2], &x),
            Proj::GateUp => self.stacked(layer, &[4, 5], &x),
            Proj::O | Proj::Down => {
                let i = if proj == Proj::O { 3 } else { 6 };
                let linear = self.blocks[layer].linears()[i];
                Ok(Acts::One((self.project)(layer, i, linear, &x)?))
            }
        }
    }

    fn attention(&mut self, layer: usize, qkv: Acts) -> Result<Acts> {
        Ok(Acts::One((self.attend)(layer, qkv)?))
    }

    fn activation(&mut self, _layer: usize, gate_up: Acts) -> Result<Acts> {
        Ok(Acts::One(match gate_up {
            Acts::One(gu) => kernels::swiglu(&gu)?,
            Acts::Parts(p) => match <[Tensor; 2]>::try_from(p) {
                Ok([gate, up]) => (candle_nn::ops::silu(&gate)? * up)?,
                Err(p) => candle_core::bail!("SwiGLU of {} projections", p.len()),
            },
        }))
    }

    fn residual(&mut self, x: Acts, y: Acts) -> Result<Acts> {
        Ok(Acts::One((x.one()? + y.one()?)?))
    }
}
