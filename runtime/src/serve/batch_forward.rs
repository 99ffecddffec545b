//! The decode step of continuous batching, written on the shared
//! [`Transformer`](crate::model::Transformer) (style.md #11: one model definition): every
//! sequence contributes one token at its own position; the projections and the feed-forward
//! run as one batched matmul, attention runs per sequence against that sequence's own
//! preallocated cache.

use super::decode_weights::{DecodeWeights, apply};
use crate::model::{KvCache, Transformer, apply_rope, attention};
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
        let mut x = self.embed(&ids)?;
        const NONE: &super::decode_weights::BlockPadded =
            &[None, None, None, None, None, None, None];
        for (layer, block) in self.blocks.iter().enumerate() {
            let attn = &block.attn;
            let p = padded.blocks.get(layer).unwrap_or(NONE);
            let h = block.attn_norm.forward(&x)?;
            // (b, 1, heads * d) -> (b, heads, 1, d): with one position the transpose is free.
            let q = attn
                .q
                .forward(&h)?
                .reshape((b, attn.n_heads, 1, attn.head_dim))?;
            let k = attn
                .k
                .forward(&h)?
                .reshape((b, attn.n_kv_heads, 1, attn.head_dim))?;
            let v = attn
                .v
                .forward(&h)?
                .reshape((b, attn.n_kv_heads, 1, attn.head_dim))?;
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
            let y = y.transpose(1, 2)?.reshape((bh, t, nh * d))?;
            x = (x + apply(&attn.o, &p[3], &y)?)?;
            let h = block.ffn_norm.forward(&x)?;
            let gate = candle_nn::ops::silu(&apply(&block.mlp.gate, &p[4], &h)?)?;
            let up = apply(&block.mlp.up, &p[5], &h)?;
            let m = apply(&block.mlp.down, &p[6], &(gate * up)?)?;
            x = (x + m)?;
        }
        let x = self.norm.forward(&x)?;
        apply(&self.lm_head, &padded.lm_head, &x)?.squeeze(1)
    }
}
