//! Greedy decoding through a preallocated KV cache.

use crate::model::{KvCache, Transformer};
use candle_core::{DType, Device, Result, Tensor};

/// Greedily continues `prompt` by up to `max_new_tokens`, stopping at a token of `stops` (not
/// included) or at the model's context limit.
pub fn greedy(
    model: &Transformer,
    prompt: &[u32],
    max_new_tokens: usize,
    stops: &[u32],
    device: &Device,
) -> Result<Vec<u32>> {
    let limit = model.config.max_seq_len;
    if prompt.is_empty() || prompt.len() >= limit {
        return Ok(Vec::new());
    }
    let capacity = (prompt.len() + max_new_tokens).min(limit);
    let mut cache = KvCache::new(&model.config, 1, capacity, DType::F32, device)?;
    let input = Tensor::new(prompt, device)?.unsqueeze(0)?;
    let mut logits = model.forward_last(&input, 0, Some(&mut cache))?;
    let mut pos = prompt.len();
    let mut out = Vec::new();
    while out.len() < max_new_tokens {
        let next = logits
            .argmax(candle_core::D::Minus1)?
            .squeeze(0)?
            .to_scalar::<u32>()?;
        if stops.contains(&next) {
            break;
        }
        out.push(next);
        if pos >= capacity {
            break;
        }
        let input = Tensor::new(&[next], device)?.unsqueeze(0)?;
        logits = model.forward_last(&input, pos, Some(&mut cache))?;
        pos += 1;
    }
    Ok(out)
}
