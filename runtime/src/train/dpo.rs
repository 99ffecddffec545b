//! Direct Preference Optimization's loss on the logits of a batch of preference pairs, with its
//! gradient in place of the logits, in the form of TRL's `DPOTrainer` (sigmoid loss):
//!
//! ```text
//! Δ    = (log π(y+) - log π_ref(y+)) - (log π(y-) - log π_ref(y-))
//! loss = -log σ(β Δ)                      (summed over pairs; the step divides by their count)
//! ```
//!
//! where `log π(y)` sums the log-probabilities of a sequence's completion tokens only (the
//! rows whose mask is non-zero; the prompt's rows have mask 0). The reference log-probabilities
//! are numbers given per pair (computed once from the frozen starting model).
//!
//! The gradient is a weighted version of the language-model one: for a chosen row it is
//! `w · mask · (softmax - onehot(target))` and for a rejected row its negative, with
//! `w = β σ(-β Δ)`, so it fits the training step's fused loss slot unchanged. Like the
//! language-model loss, everything is a sum over the batch, so that gradient accumulation and
//! a gang divide once by the total number of pairs.

use crate::kernels::math::softmax_into;
use crate::kernels::pool;
use std::ops::Range;

/// One preference pair's place in the batch and its reference log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// Rows (of logits, targets and mask) of the chosen sequence.
    pub chosen: Range<usize>,
    /// Rows of the rejected sequence.
    pub rejected: Range<usize>,
    /// `log π_ref(y+)`: the reference model's summed completion log-probability of chosen.
    pub ref_chosen: f64,
    /// `log π_ref(y-)`.
    pub ref_rejected: f64,
}

/// The loss and TRL's metrics over some pairs, as sums (add them up over micro-batches and
/// ranks, then take [`Sums::means`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sums {
    /// Pairs.
    pub pairs: f64,
    /// Sum of `-log σ(β Δ)`.
    pub loss: f64,
    /// Sum of `β (log π(y+) - log π_ref(y+))`.
    pub rewards_chosen: f64,
    /// Sum of `β (log π(y-) - log π_ref(y-))`.
    pub rewards_rejected: f64,
    /// Pairs whose chosen reward is strictly above the rejected one.
    pub accurate: f64,
}

impl Sums {
    /// As a flat array (for an all-reduce), and back.
    pub fn to_array(self) -> [f64; 5] {
        [
            self.pairs,
            self.loss,
            self.rewards_chosen,
            self.rewards_rejected,
            self.accurate,
        ]
    }

    /// The inverse of [`Sums::to_array`].
    pub fn from_array(a: [f64; 5]) -> Self {
        Self {
            pairs: a[0],
            loss: a[1],
            rewards_chosen: a[2],
            rewards_rejected: a[3],
            accurate: a[4],
        }
    }

    /// Adds `other`.
    pub fn add(&mut self, other: &Self) {
        let mut a = self.to_array();
        for (x, y) in a.iter_mut().zip(other.to_array()) {
            *x += y;
        }
        *self = Self::from_array(a);
    }

    /// The means TRL reports.
    pub fn means(&self) -> Stats {
        let n = self.pairs.max(1.0);
        Stats {
            loss: self.loss / n,
            rewards_chosen: self.rewards_chosen / n,
            rewards_rejected: self.rewards_rejected / n,
            rewards_margins: (self.rewards_chosen - self.rewards_rejected) / n,
            rewards_accuracies: self.accurate / n,
        }
    }
}

/// The loss and TRL's metrics over a batch (means over its pairs).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Stats {
    /// Mean `-log σ(β Δ)`.
    pub loss: f64,
    /// `rewards/chosen`: mean `β (log π(y+) - log π_ref(y+))`.
    pub rewards_chosen: f64,
    /// `rewards/rejected`.
    pub rewards_rejected: f64,
    /// `rewards/margins`: mean of chosen minus rejected.
    pub rewards_margins: f64,
    /// `rewards/accuracies`: share of pairs whose chosen reward is strictly above the rejected
    /// one (0 at step 0, where both are 0).
    pub rewards_accuracies: f64,
}

/// The loss of one pair and whether it is ranked right, from its policy and reference
/// log-probabilities: `(-log σ(β Δ), β Δ+, β Δ-)`.
pub fn pair_loss(beta: f64, chosen: f64, rejected: f64) -> (f64, f64, f64) {
    let z = beta * (chosen - rejected);
    // -log σ(z) = softplus(-z), stably.
    let loss = if z > 0.0 {
        (-z).exp().ln_1p()
    } else {
        -z + z.exp().ln_1p()
    };
    (loss, beta * chosen, beta * rejected)
}

/// Rows per parallel task.
const ROWS: usize = 64;

/// The log-probability of each row's target (`mask`-weighted; 0 where the mask is 0) and, when
/// `keep_softmax`, the softmax in place of the row's logits.
fn row_logps(
    logits: &mut [f32],
    targets: &[u32],
    mask: &[f32],
    vocab: usize,
    keep_softmax: bool,
) -> Vec<f64> {
    assert!(vocab > 0 && logits.len() == targets.len() * vocab && mask.len() == targets.len());
    let mut out = vec![0f64; targets.len()];
    pool::zip_chunks_mut(logits, ROWS * vocab, &mut out, ROWS, |i, logits, out| {
        let (targets, mask) = (&targets[i * ROWS..], &mask[i * ROWS..]);
        let mut p = vec![0f32; vocab];
        for (((row, &t), &m), o) in logits
            .chunks_exact_mut(vocab)
            .zip(targets)
            .zip(mask)
            .zip(out.iter_mut())
        {
            if m == 0.0 {
                continue;
            }
            let lse = softmax_into(row, &mut p);
            *o = f64::from(m) * (f64::from(row[t as usize]) - f64::from(lse));
            if keep_softmax {
                row.copy_from_slice(&p);
            }
        }
    });
    out
}

/// The summed completion log-probability of each range of rows (a sequence) under `logits`:
/// what the reference model's pass computes once, and what preference accuracy compares.
pub fn sequence_logps(
    logits: &[f32],
    targets: &[u32],
    mask: &[f32],
    vocab: usize,
    sequences: &[Range<usize>],
) -> Vec<f64> {
    let mut scratch = logits.to_vec();
    let rows = row_logps(&mut scratch, targets, mask, vocab, false);
    sequences
        .iter()
        .map(|r| rows[r.clone()].iter().sum())
        .collect()
}

/// The DPO loss of `pairs` and, in place of `logits`, the gradient of the summed loss (rows in
/// no pair, and masked rows, get zero).
pub fn loss_and_grad(
    logits: &mut [f32],
    targets: &[u32],
    mask: &[f32],
    vocab: usize,
    pairs: &[Pair],
    beta: f64,
) -> Sums {
    let rows = row_logps(logits, targets, mask, vocab, true);
    let mut sums = Sums::default();
    // Each row's gradient weight: +w for chosen rows, -w for rejected ones, 0 elsewhere.
    let mut weight = vec![0f32; targets.len()];
    for pair in pairs {
        let chosen: f64 = rows[pair.chosen.clone()].iter().sum::<f64>() - pair.ref_chosen;
        let rejected: f64 = rows[pair.rejected.clone()].iter().sum::<f64>() - pair.ref_rejected;
        let (loss, reward_chosen, reward_rejected) = pair_loss(beta, chosen, rejected);
        let w = beta * sigmoid(-(reward_chosen - reward_rejected));
        for r in pair.chosen.clone() {
            weight[r] += w as f32;
        }
        for r in pair.rejected.clone() {
            weight[r] -= w as f32;
        }
        sums.add(&Sums {
            pairs: 1.0,
            loss,
            rewards_chosen: reward_chosen,
            rewards_rejected: reward_rejected,
            accurate: f64::from(u8::from(reward_chosen > reward_rejected)),
        });
    }
    pool::chunks_mut(logits, ROWS * vocab, |i, logits| {
        let (targets, mask, weight) =
            (&targets[i * ROWS..], &mask[i * ROWS..], &weight[i * ROWS..]);
        for (((row, &t), &m), &w) in logits
            .chunks_exact_mut(vocab)
            .zip(targets)
            .zip(mask)
            .zip(weight)
        {
            let scale = m * w;
            if scale == 0.0 {
                row.fill(0.0);
                continue;
            }
            // The row holds its softmax: (softmax - onehot) * scale.
            row[t as usize] -= 1.0;
            row.iter_mut().for_each(|x| *x *= scale);
        }
    });
    sums
}

/// Each batch row's summed completion log-probability under `logits` (batch, t, vocab), as a
/// tensor (candle's autograd path; the reference's pass uses it too, so that the first step's
/// policy equals its reference exactly).
pub fn batch_logps(
    logits: &candle_core::Tensor,
    targets: &candle_core::Tensor,
    mask: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    let (b, t, v) = logits.dims3()?;
    let logp = candle_nn::ops::log_softmax(&logits.reshape((b * t, v))?, candle_core::D::Minus1)?
        .gather(&targets.reshape((b * t, 1))?, 1)?
        .squeeze(1)?;
    (logp * mask.reshape(b * t)?)?.reshape((b, t))?.sum(1)
}

/// The summed DPO loss of `pairs` as a tensor (candle's autograd path: GPU, bf16), from logits
/// (batch, t, vocab) whose batch rows are the pairs' sequences (a pair's ranges of token rows
/// each cover one batch row), with its value and metrics.
pub fn loss_tensor(
    logits: &candle_core::Tensor,
    targets: &candle_core::Tensor,
    mask: &candle_core::Tensor,
    pairs: &[Pair],
    beta: f64,
) -> candle_core::Result<(candle_core::Tensor, super::loss::Outcome)> {
    use candle_core::{DType, Tensor};
    let t = logits.dim(1)?;
    let dev = logits.device();
    let per_seq = batch_logps(logits, targets, mask)?;
    let row = |r: &Range<usize>| (r.start / t) as u32;
    let pick = |rows: Vec<u32>| per_seq.index_select(&Tensor::new(rows, dev)?, 0);
    let chosen = pick(pairs.iter().map(|p| row(&p.chosen)).collect())?;
    let rejected = pick(pairs.iter().map(|p| row(&p.rejected)).collect())?;
    let refs = |f: fn(&Pair) -> f64| {
        Tensor::new(pairs.iter().map(|p| f(p) as f32).collect::<Vec<_>>(), dev)
    };
    let reward_chosen = ((chosen - refs(|p| p.ref_chosen)?)? * beta)?;
    let reward_rejected = ((rejected - refs(|p| p.ref_rejected)?)? * beta)?;
    let minus_z = (&reward_rejected - &reward_chosen)?;
    // softplus(-z) = max(-z, 0) + log(1 + exp(-|z|)), stably.
    let loss = (minus_z.relu()? + ((minus_z.abs()?.neg()?.exp()? + 1.0)?.log()?))?.sum_all()?;
    let values = |t: &Tensor| t.to_dtype(DType::F64)?.to_vec1::<f64>();
    let mut sums = Sums::default();
    for (c, r) in values(&reward_chosen)?
        .into_iter()
        .zip(values(&reward_rejected)?)
    {
        sums.add(&Sums {
            pairs: 1.0,
            loss: pair_loss(1.0, c, r).0,
            rewards_chosen: c,
            rewards_rejected: r,
            accurate: f64::from(u8::from(c > r)),
        });
    }
    Ok((
        loss,
        super::loss::Outcome {
            loss_sum: sums.loss,
            dpo: Some(sums),
        },
    ))
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of two pairs: rows 0..4 chosen and 4..8 rejected of pair 0 (prompt rows 0 and 4
    /// masked out), 8..11 and 11..14 of pair 1.
    /// Logits, targets, mask, and each pair's (chosen, rejected) rows.
    type Batch = (
        Vec<f32>,
        Vec<u32>,
        Vec<f32>,
        Vec<(Range<usize>, Range<usize>)>,
    );

    fn batch(vocab: usize) -> Batch {
        let rows = 14;
        let logits: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 7919 % 101) as f32 / 101.0 - 0.5) * 3.0)
            .collect();
        let targets: Vec<u32> = (0..rows).map(|r| (r * 5 % vocab) as u32).collect();
        let mut mask = vec![1f32; rows];
        for r in [0, 4, 8, 11] {
            mask[r] = 0.0;
        }
        (logits, targets, mask, vec![(0..4, 4..8), (8..11, 11..14)])
    }

    fn pairs(spans: &[(Range<usize>, Range<usize>)], refs: &[f64]) -> Vec<Pair> {
        spans
            .iter()
            .enumerate()
            .map(|(i, (c, r))| Pair {
                chosen: c.clone(),
                rejected: r.clone(),
                ref_chosen: refs[2 * i],
                ref_rejected: refs[2 * i + 1],
            })
            .collect()
    }

    /// The batch's logits scored as their own reference: each sequence's log-probability.
    fn own_logps(vocab: usize) -> (Batch, Vec<f64>) {
        let (logits, targets, mask, spans) = batch(vocab);
        let seqs: Vec<_> = spans
            .iter()
            .flat_map(|(c, r)| [c.clone(), r.clone()])
            .collect();
        let refs = sequence_logps(&logits, &targets, &mask, vocab, &seqs);
        ((logits, targets, mask, spans), refs)
    }

    /// The loss and metrics at beta 0.1 (means over the pairs), the logits left as they are.
    fn stats_of(logits: &[f32], targets: &[u32], mask: &[f32], vocab: usize, p: &[Pair]) -> Stats {
        loss_and_grad(&mut logits.to_vec(), targets, mask, vocab, p, 0.1).means()
    }

    /// The summed loss (what the gradient is of).
    fn loss_of(logits: &[f32], targets: &[u32], mask: &[f32], vocab: usize, p: &[Pair]) -> f64 {
        loss_and_grad(&mut logits.to_vec(), targets, mask, vocab, p, 0.1).loss
    }

    #[test]
    fn the_loss_of_the_reference_itself_is_ln_2_and_no_pair_is_ahead() {
        let vocab = 11;
        let ((logits, targets, mask, spans), refs) = own_logps(vocab);
        let stats = stats_of(&logits, &targets, &mask, vocab, &pairs(&spans, &refs));
        assert!(
            (stats.loss - std::f64::consts::LN_2).abs() < 1e-6,
            "{stats:?}"
        );
        assert_eq!(stats.rewards_accuracies, 0.0);
        assert!(stats.rewards_chosen.abs() < 1e-9 && stats.rewards_margins.abs() < 1e-9);
    }

    #[test]
    fn the_gradient_matches_finite_differences() {
        let vocab = 7;
        let (logits, targets, mask, spans) = batch(vocab);
        // References away from the policy, so that σ is not at 1/2 and the pairs differ.
        let p = pairs(&spans, &[-9.0, -7.5, -4.0, -6.5]);
        let mut grad = logits.clone();
        loss_and_grad(&mut grad, &targets, &mask, vocab, &p, 0.1);
        let mut worst = 0f64;
        let mut checked = 0;
        for i in (0..logits.len()).step_by(3) {
            let h = 1e-2f32;
            let mut up = logits.clone();
            up[i] += h;
            let mut down = logits.clone();
            down[i] -= h;
            let numeric = (loss_of(&up, &targets, &mask, vocab, &p)
                - loss_of(&down, &targets, &mask, vocab, &p))
                / f64::from(2.0 * h);
            let analytic = f64::from(grad[i]);
            worst = worst.max((numeric - analytic).abs());
            checked += 1;
        }
        let scale = grad.iter().fold(0f32, |m, g| m.max(g.abs()));
        assert!(scale > 1e-4, "the gradient is not trivially zero: {scale}");
        assert!(
            worst < 1e-3 * f64::from(scale),
            "worst {worst} of {scale}, {checked} checked"
        );
        // Masked prompt rows and their logits get no gradient.
        assert!(grad[..vocab].iter().all(|g| *g == 0.0));
    }

    #[test]
    fn a_pair_the_policy_prefers_counts_as_accurate() {
        let vocab = 11;
        let ((logits, targets, mask, spans), mut refs) = own_logps(vocab);
        // Pair 0's reference liked its chosen answer less than the policy does now.
        refs[0] -= 5.0;
        let stats = stats_of(&logits, &targets, &mask, vocab, &pairs(&spans, &refs));
        assert_eq!(stats.rewards_accuracies, 0.5);
        assert!((stats.rewards_chosen - 0.25).abs() < 1e-6, "{stats:?}");
        assert!(stats.loss < std::f64::consts::LN_2);
    }
}
