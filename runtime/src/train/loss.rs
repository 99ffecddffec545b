//! The training loss.

use crate::kernels;
use crate::kernels::math::softmax_into;
use crate::kernels::pool;
use candle_core::{CpuStorage, CustomOp3, D, DType, Layout, Result, Shape, Tensor};

/// What a step minimises.
#[derive(Debug, Clone, Copy)]
pub enum Objective<'a> {
    /// The language-model loss: negative log-likelihood of the counted targets.
    Nll,
    /// DPO over the batch's preference pairs.
    Dpo {
        /// Each pair's rows and reference log-probabilities.
        pairs: &'a [super::dpo::Pair],
        /// The KL penalty's strength.
        beta: f64,
    },
}

/// A micro-batch's summed loss, and the preference sums of a DPO one.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// The summed loss (over counted tokens, or over pairs).
    pub loss_sum: f64,
    /// DPO's sums.
    pub dpo: Option<super::dpo::Sums>,
}

/// `objective`'s summed loss over `batch` under `logits` (batch, t, vocab), as a tensor to
/// differentiate (candle's autograd path), with its value.
pub fn loss_tensor(
    logits: &Tensor,
    batch: &crate::data::Batch,
    objective: &Objective,
) -> Result<(Tensor, Outcome)> {
    match objective {
        Objective::Nll => {
            let loss = masked_nll_sum(logits, &batch.targets, &batch.mask)?;
            let value = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            Ok((
                loss,
                Outcome {
                    loss_sum: value,
                    dpo: None,
                },
            ))
        }
        Objective::Dpo { pairs, beta } => {
            super::dpo::loss_tensor(logits, &batch.targets, &batch.mask, pairs, *beta)
        }
    }
}

/// Sum over the counted positions of the negative log-likelihood of `targets` (batch, t)
/// under `logits` (batch, t, vocab); `mask` (batch, t) is 1.0 where a prediction counts.
/// Summing (not averaging) lets gradient accumulation divide once by the total token count.
pub fn masked_nll_sum(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if kernels::applies(logits) && targets.dtype() == DType::U32 && mask.dtype() == DType::F32 {
        return logits.reshape((b * t, v))?.contiguous()?.apply_op3(
            &targets.flatten_all()?.contiguous()?,
            &mask.flatten_all()?.contiguous()?,
            MaskedNll,
        );
    }
    let logp = candle_nn::ops::log_softmax(&logits.reshape((b * t, v))?, D::Minus1)?;
    let picked = logp.gather(&targets.reshape((b * t, 1))?, 1)?.squeeze(1)?;
    (picked * mask.reshape(b * t)?)?.sum_all()?.neg()
}

/// Rows per parallel task; the per-task sums are added in task order.
const ROWS: usize = 64;

/// The masked NLL sum of f32 logits (rows, vocab) on the CPU in one pass per row: log-softmax,
/// pick and mask fused, and the gradient `mask * (softmax - onehot)` in another.
struct MaskedNll;

/// The masked NLL sum of `logits` (rows of `vocab`) and, in place of the logits, its
/// gradient `mask * (softmax - onehot(target))`, in one pass per row (rows that do not count
/// get a zero gradient). The per-task sums are added in task order (f64), as in the op.
pub(crate) fn nll_sum_and_grad(
    logits: &mut [f32],
    targets: &[u32],
    mask: &[f32],
    vocab: usize,
) -> f64 {
    assert!(vocab > 0 && logits.len() == targets.len() * vocab && mask.len() == targets.len());
    let partials: Vec<f64> = pool::map_chunks_mut(logits, ROWS * vocab, |i, logits| {
        let (targets, mask) = (&targets[i * ROWS..], &mask[i * ROWS..]);
        let mut p = vec![0f32; vocab];
        let mut sum = 0f64;
        for ((row, &t), &m) in logits.chunks_exact_mut(vocab).zip(targets).zip(mask) {
            if m == 0.0 {
                row.fill(0.0);
                continue;
            }
            let lse = softmax_into(row, &mut p);
            sum += f64::from(m * (lse - row[t as usize]));
            row.copy_from_slice(&p);
            row[t as usize] -= 1.0;
            row.iter_mut().for_each(|x| *x *= m);
        }
        sum
    });
    partials.iter().sum::<f64>()
}

/// The loss op's inputs as slices: logits, targets, mask, and the vocabulary size.
type Inputs<'a> = (&'a [f32], &'a [u32], &'a [f32], usize);

fn inputs<'a>(
    name: &str,
    (ls, ll): (&'a CpuStorage, &Layout),
    (ts, tl): (&'a CpuStorage, &Layout),
    (ms, ml): (&'a CpuStorage, &Layout),
) -> Result<Inputs<'a>> {
    let logits = kernels::slice(ls, ll, name)?;
    let mask = kernels::slice(ms, ml, name)?;
    let (CpuStorage::U32(targets), Some((t0, t1))) = (ts, tl.contiguous_offsets()) else {
        candle_core::bail!("{name}: targets must be contiguous u32");
    };
    let targets = &targets[t0..t1];
    let (rows, vocab) = ll.shape().dims2()?;
    if targets.len() != rows || mask.len() != rows {
        candle_core::bail!("{name}: {rows} rows but {} targets", targets.len());
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("{name}: target {bad} outside the vocabulary of {vocab}");
    }
    Ok((logits, targets, mask, vocab))
}

impl CustomOp3 for MaskedNll {
    fn name(&self) -> &'static str {
        "anneal-masked-nll"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (logits, targets, mask, v) = inputs(self.name(), (ls, ll), (ts, tl), (ms, ml))?;
        // The gradient comes with the sum at little extra cost; the op keeps only the sum
        // (this graph path serves ANNEAL_FUSED_STEP=0; the fused step uses both).
        let mut scratch = logits.to_vec();
        let total = nll_sum_and_grad(&mut scratch, targets, mask, v) as f32;
        Ok((CpuStorage::F32(vec![total]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let d = logits.apply_op2_no_bwd(
            targets,
            &MaskedNllBwd {
                grad: g,
                mask: mask.clone(),
            },
        )?;
        Ok((Some(d), None, None))
    }
}

/// `grad * mask * (softmax(logits) - onehot(target))`, row by row.
struct MaskedNllBwd {
    grad: f32,
    mask: Tensor,
}

impl candle_core::CustomOp2 for MaskedNllBwd {
    fn name(&self) -> &'static str {
        "anneal-masked-nll-bwd"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (ms, ml) = self.mask.storage_and_layout();
        let candle_core::Storage::Cpu(ms) = &*ms else {
            candle_core::bail!("{}: CPU only", self.name());
        };
        let (logits, targets, mask, v) = inputs(self.name(), (ls, ll), (ts, tl), (ms, ml))?;
        let mut d = logits.to_vec();
        nll_sum_and_grad(&mut d, targets, mask, v);
        if self.grad != 1.0 {
            pool::chunks_mut(&mut d, 1 << 14, |_, d| {
                d.iter_mut().for_each(|x| *x *= self.grad)
            });
        }
        Ok((CpuStorage::F32(d), ll.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused loss and its gradient match the composite log-softmax version to 1e-5.
    #[test]
    fn fused_matches_composite() -> Result<()> {
        let (b, t, v) = (3, 11, 29);
        let mut rng = crate::rng::Rng::new(5, 1);
        let x: Vec<f32> = (0..b * t * v).map(|_| rng.normal() as f32 * 3.0).collect();
        let logits = Var::from_vec(x, (b, t, v), &Device::Cpu)?;
        let targets: Vec<u32> = (0..b * t).map(|i| (i * 7 % v) as u32).collect();
        let targets = Tensor::from_vec(targets, (b, t), &Device::Cpu)?;
        let mask: Vec<f32> = (0..b * t).map(|i| f32::from(i % 3 != 0)).collect();
        let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu)?;
        let fused = masked_nll_sum(logits.as_tensor(), &targets, &mask)?;
        let lp = candle_nn::ops::log_softmax(&logits.as_tensor().reshape((b * t, v))?, D::Minus1)?;
        let picked = lp.gather(&targets.reshape((b * t, 1))?, 1)?.squeeze(1)?;
        let composite = (picked * mask.reshape(b * t)?)?.sum_all()?.neg()?;
        let (f, c) = (fused.to_scalar::<f32>()?, composite.to_scalar::<f32>()?);
        assert!((f - c).abs() < 1e-5 * c.abs(), "{f} vs {c}");
        let gf = (fused * 0.5)?.backward()?;
        let gc = (composite * 0.5)?.backward()?;
        let (gf, gc) = (gf.get(&logits).unwrap(), gc.get(&logits).unwrap());
        let diff = (gf - gc)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "gradient differs by {diff}");
        Ok(())
    }
}
