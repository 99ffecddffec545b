//! The training loss.

use candle_core::{D, Result, Tensor};

/// Sum over the counted positions of the negative log-likelihood of `targets` (batch, t)
/// under `logits` (batch, t, vocab); `mask` (batch, t) is 1.0 where a prediction counts.
/// Summing (not averaging) lets gradient accumulation divide once by the total token count.
pub fn masked_nll_sum(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let logp = candle_nn::ops::log_softmax(&logits.reshape((b * t, v))?, D::Minus1)?;
    let picked = logp.gather(&targets.reshape((b * t, 1))?, 1)?.squeeze(1)?;
    (picked * mask.reshape(b * t)?)?.sum_all()?.neg()
}
