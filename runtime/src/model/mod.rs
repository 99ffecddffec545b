//! The one decoder-only transformer definition that training, evaluation and serving share:
//! pre-norm RMSNorm, RoPE, causal attention with grouped KV heads, SwiGLU feed-forward and
//! optional tied embeddings.
//!
//! Weights come through the [`Weights`] trait, so the same [`Transformer`] is built from
//! trainable variables (a [`candle_nn::VarMap`]), a safetensors file or quantized GGUF tensors.
//! Tensor names follow GGUF's llama naming (`token_embd`, `blk.N.attn_q`, ...), and RoPE is the
//! interleaved (GGUF) variant, so a GGUF llama file loads without permuting any weight.

pub mod block;
mod cache;
mod config;
mod layers;
mod ops;
mod weights;

pub use cache::KvCache;
pub use config::{ConfigError, ModelConfig};
pub use layers::{Acts, Attention, Block, CandleOps, Linear, Mlp, RmsNorm};
pub use ops::{apply_rope, attention, causal_mask, repeat_kv, rope_tables};
pub use weights::{Weights, init_params, param_names};

use candle_core::{D, DType, Device, Result, Tensor};

/// The transformer: embedding, blocks, final norm and language-model head.
#[derive(Debug, Clone)]
pub struct Transformer {
    /// Architecture this model was built for.
    pub config: ModelConfig,
    /// Token embedding table, (vocab_size, hidden_size).
    pub embedding: Tensor,
    /// The decoder blocks, lowest first.
    pub blocks: Vec<Block>,
    /// Final RMSNorm before the head.
    pub norm: RmsNorm,
    /// Output projection to the vocabulary (the embedding itself when tied).
    pub lm_head: Linear,
    /// RoPE cosine table, (max_seq_len, head_dim / 2).
    pub cos: Tensor,
    /// RoPE sine table, (max_seq_len, head_dim / 2).
    pub sin: Tensor,
}

impl Transformer {
    /// Builds the model from a weight source; `device` holds the RoPE tables.
    pub fn new(config: &ModelConfig, weights: &impl Weights, device: &Device) -> Result<Self> {
        let h = config.hidden_size;
        let embedding = weights.tensor("token_embd.weight", &[config.vocab_size, h])?;
        let blocks = (0..config.n_layers)
            .map(|i| Block::new(config, weights, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(
            weights.tensor("output_norm.weight", &[h])?,
            config.rms_norm_eps,
        );
        let head_name = if config.tie_embeddings {
            "token_embd"
        } else {
            "output"
        };
        let lm_head = weights.linear(head_name, h, config.vocab_size)?;
        let (cos, sin) = rope_tables(config, device)?;
        Ok(Self {
            config: config.clone(),
            embedding,
            blocks,
            norm,
            lm_head,
            cos,
            sin,
        })
    }

    /// The same model computing in `dtype` (bf16 for GPU training): every dense weight and the
    /// RoPE tables cast, quantized weights as they are. The casts are ordinary tensor ops, so
    /// gradients flow back through them to the f32 weights this was made from (the master
    /// weights the optimizer updates). With `dtype` already the model's, a cheap clone.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let norm =
            |n: &RmsNorm| -> Result<RmsNorm> { Ok(RmsNorm::new(n.weight.to_dtype(dtype)?, n.eps)) };
        let linear = |l: &Linear| -> Result<Linear> {
            Ok(match l {
                Linear::Dense(w) => Linear::Dense(w.to_dtype(dtype)?),
                Linear::Quantized(_) => l.clone(),
            })
        };
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                let (a, m) = (&b.attn, &b.mlp);
                Ok(Block {
                    attn_norm: norm(&b.attn_norm)?,
                    attn: Attention {
                        q: linear(&a.q)?,
                        k: linear(&a.k)?,
                        v: linear(&a.v)?,
                        o: linear(&a.o)?,
                        ..a.clone()
                    },
                    ffn_norm: norm(&b.ffn_norm)?,
                    mlp: Mlp {
                        gate: linear(&m.gate)?,
                        up: linear(&m.up)?,
                        down: linear(&m.down)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: self.config.clone(),
            embedding: self.embedding.to_dtype(dtype)?,
            blocks,
            norm: norm(&self.norm)?,
            lm_head: linear(&self.lm_head)?,
            cos: self.cos.to_dtype(dtype)?,
            sin: self.sin.to_dtype(dtype)?,
        })
    }

    /// Embeds `tokens` (batch, seq) of u32 ids into (batch, seq, hidden).
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let flat = tokens.flatten_all()?;
        self.embedding
            .index_select(&flat, 0)?
            .reshape((b, t, self.config.hidden_size))
    }

    /// Logits (batch, seq, vocab) for `tokens` (batch, seq) whose first token sits at position
    /// `start_pos`. With a cache the new keys and values are written into it in place and
    /// attention covers every cached position before them; training and evaluation pass `None`.
    pub fn forward(
        &self,
        tokens: &Tensor,
        start_pos: usize,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (_b, t) = tokens.dims2()?;
        let end = start_pos + t;
        if end > self.config.max_seq_len {
            candle_core::bail!(
                "sequence of {end} tokens exceeds max_seq_len {}",
                self.config.max_seq_len
            );
        }
        let cos = self.cos.narrow(0, start_pos, t)?;
        let sin = self.sin.narrow(0, start_pos, t)?;
        let mask = if t > 1 {
            Some(causal_mask(t, start_pos, tokens.device())?)
        } else {
            None
        };
        let mut ops = CandleOps {
            blocks: &self.blocks,
            fused: cache.is_none(),
            attend: |layer: usize, qkv: Acts| {
                let layer_cache = cache.as_deref_mut().map(|c| (c, layer));
                self.blocks[layer].attn.attend(
                    qkv,
                    &cos,
                    &sin,
                    mask.as_ref(),
                    start_pos,
                    layer_cache,
                )
            },
            project: |_: usize, _: usize, l: &Linear, x: &Tensor| l.forward(x),
        };
        let mut x = Acts::One(self.embed(tokens)?);
        for layer in 0..self.blocks.len() {
            x = block::block(&mut ops, layer, x)?;
        }
        let x = self.norm.forward(&x.one()?)?;
        self.lm_head.forward(&x)
    }

    /// Logits of the last position only, (batch, vocab): what greedy decoding needs.
    pub fn forward_last(
        &self,
        tokens: &Tensor,
        start_pos: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let logits = self.forward(tokens, start_pos, cache)?;
        let t = logits.dim(1)?;
        logits.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()
    }

    /// Index of the largest logit along the last dimension.
    pub fn argmax(logits: &Tensor) -> Result<Tensor> {
        logits.argmax(D::Minus1)
    }
}
