//! The decode step of continuous batching, written on the shared
//! [`Transformer`](crate::model::Transformer) and its block recipe
//! ([`crate::model::block`], style.md #11: one model definition): every sequence contributes
//! one token at its own position; the projections and the feed-forward run as one batched
//! matmul, attention runs per sequence against that sequence's own preallocated cache.

use super::decode_weights::{DecodeWeights, apply};
use crate::model::block::block;
use crate::model::{Acts, CandleOps, KvCache, Linear, Transformer, apply_rope, attention};
use candle_core::{Result, Tensor};

impl Transformer {
    /// Logits (batch, vocab) for one new token per sequence: `tokens[i]` sits at position
    /// `positions[i]` of the sequence whose cache is `caches[i]`.
    pub fn forward_decode_batch(
        &self,
        tokens: &[u32],
        positions: &[usize],
        caches: &mut [&mut KvCache],
        padded: &DecodeWeights,
    ) -> Result<Tensor> {
        let b = tokens.len();
        if positions.len() != b || caches.len() != b || b == 0 {
            candle_core::bail!(
                "decode batch: {b} tokens, {} positions, {} caches",
                positions.len(),
                caches.len()
            );
        }
        if let Some(&p) = positions.iter().find(|&&p| p >= self.config.max_seq_len) {
            candle_core::bail!(
                "position {p} is beyond max_seq_len {}",
                self.config.max_seq_len
            );
        }
        let device = self.embedding.device();
        let ids = Tensor::from_slice(tokens, (b, 1), device)?;
        let pos: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let pos = Tensor::from_slice(&pos, b, device)?;
        // (b, 1, head_dim / 2): each sequence rotates by its own position.
        let cos = self.cos.index_select(&pos, 0)?.unsqueeze(1)?;
        let sin = self.sin.index_select(&pos, 0)?.unsqueeze(1)?;
        const NONE: &super::decode_weights::BlockPadded =
            &[None, None, None, None, None, None, None];
        let mut ops = CandleOps {
            blocks: &self.blocks,
            fused: false,
            // Attention per sequence, against that sequence's own cache.
            attend: |layer: usize, qkv: Acts| {
                let Acts::Parts(p) = qkv else {
                    candle_core::bail!("decode batch: stacked projections");
                };
                let attn = &self.blocks[layer].attn;
                let d = attn.head_dim;
                // (b, 1, heads * d) -> (b, heads, 1, d): with one position the transpose is free.
                let q = p[0].reshape((b, attn.n_heads, 1, d))?;
                let k = p[1].reshape((b, attn.n_kv_heads, 1, d))?;
                let v = p[2].reshape((b, attn.n_kv_heads, 1, d))?;
                let q = apply_rope(&q, &cos, &sin)?;
                let k = apply_rope(&k, &cos, &sin)?;
                let mut outs = Vec::with_capacity(b);
                for (i, cache) in caches.iter_mut().enumerate() {
                    let (kc, vc) = cache.append(
                        layer,
                        positions[i],
                        &k.narrow(0, i, 1)?,
                        &v.narrow(0, i, 1)?,
                    )?;
                    outs.push(attention(&q.narrow(0, i, 1)?, &kc, &vc, None)?);
                }
                let y = Tensor::cat(&outs, 0)?;
                let (bh, nh, t, d) = y.dims4()?;
                y.transpose(1, 2)?.reshape((bh, t, nh * d))
            },
            // The padded forms of the quantized projections where there are some.
            project: |layer: usize, i: usize, linear: &Linear, x: &Tensor| {
                let p = padded.blocks.get(layer).unwrap_or(NONE);
                apply(linear, &p[i], x)
            },
        };
        let mut x = Acts::One(self.embed(&ids)?);
        for layer in 0..self.blocks.len() {
            x = block(&mut ops, layer, x)?;
        }
        let x = x.one()?;
        let x = self.norm.forward(&x)?;
        apply(&self.lm_head, &padded.lm_head, &x)?.squeeze(1)
    }
}
