//! Token samples and the seeded loader that cuts them into batches. The loader's whole state
//! is a [`Cursor`], so a checkpoint can resume the exact same sequence of batches.

use super::{DataError, Example, Format};
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// One training sequence and the positions whose prediction the loss covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Token ids, at most `seq_len + 1` of them.
    pub tokens: Vec<u32>,
    /// Ranges of positions in `tokens` whose prediction counts (from 1 on: position 0 has no
    /// context): everything for pretraining, the response for sft, each assistant turn of a
    /// chat.
    pub loss: Vec<Range<usize>>,
}

impl Sample {
    /// A sample whose loss covers the predictions of `tokens[loss_from..]`.
    pub fn new(tokens: Vec<u32>, loss_from: usize) -> Self {
        let end = tokens.len();
        Self {
            tokens,
            loss: std::iter::once(loss_from.max(1)..end).collect(),
        }
    }

    /// Whether the prediction of `tokens[pos]` counts.
    pub fn counts(&self, pos: usize) -> bool {
        self.loss.iter().any(|r| r.contains(&pos))
    }

    /// Cuts the sample to its first `len` tokens (and its loss ranges with it).
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
        for r in &mut self.loss {
            r.end = r.end.min(len);
        }
        self.loss.retain(|r| r.start < r.end);
    }

    /// Number of predictions that count.
    pub fn n_counted(&self) -> usize {
        self.loss.iter().map(ExactSizeIterator::len).sum()
    }
}

/// Tokenizes `examples` into samples of at most `seq_len + 1` tokens, as `format` writes them.
/// `sft` keeps one sample per example (a prompt/response pair or a chat) with the loss on the
/// model's answers only; pretraining joins all texts into one stream cut into windows.
pub fn tokenize(
    examples: &[Example],
    tokenizer: &dyn Tokenizer,
    format: &Format,
    sft: bool,
    seq_len: usize,
) -> Result<Vec<Sample>, DataError> {
    let mut samples = Vec::new();
    if sft {
        for ex in examples {
            if let Some(sample) = format.answer_sample(tokenizer, ex, seq_len)? {
                samples.push(sample);
            }
        }
    } else {
        let bos: Vec<u32> = tokenizer.bos_id().into_iter().collect();
        let eos: Vec<u32> = tokenizer.eos_id().into_iter().collect();
        let mut stream = Vec::new();
        for ex in examples {
            stream.extend(&bos);
            stream.extend(tokenizer.encode(&ex.full_text())?);
            stream.extend(&eos);
        }
        // Windows overlap by one token so that every token is predicted exactly once.
        let mut start = 0;
        while start + 1 < stream.len() {
            let end = (start + seq_len + 1).min(stream.len());
            samples.push(Sample::new(stream[start..end].to_vec(), 1));
            start += seq_len;
        }
    }
    Ok(samples)
}

/// A batch on the device: inputs and targets (batch, t) as u32, the loss mask (batch, t) f32.
#[derive(Debug)]
pub struct Batch {
    /// Input ids.
    pub inputs: Tensor,
    /// Target ids (inputs shifted by one).
    pub targets: Tensor,
    /// 1.0 where a prediction counts, 0.0 on prompt tokens and padding.
    pub mask: Tensor,
    /// Number of predictions that count.
    pub n_tokens: usize,
    /// Number of real (not padding) input tokens.
    pub n_inputs: usize,
}

impl Batch {
    /// Pads `samples` to a common length (with `pad`, masked out) and moves them to `device`.
    pub fn new(samples: &[&Sample], pad: u32, device: &Device) -> candle_core::Result<Self> {
        let t = samples
            .iter()
            .map(|s| s.tokens.len() - 1)
            .max()
            .unwrap_or(0)
            .max(1);
        let (mut inputs, mut targets, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        let mut n_tokens = 0;
        for s in samples {
            for j in 0..t {
                let (input, target) = match (s.tokens.get(j), s.tokens.get(j + 1)) {
                    (Some(&i), Some(&o)) => (i, Some(o)),
                    (Some(&i), None) => (i, None),
                    _ => (pad, None),
                };
                let counts = target.is_some() && s.counts(j + 1);
                n_tokens += usize::from(counts);
                inputs.push(input);
                targets.push(target.unwrap_or(pad));
                mask.push(if counts { 1f32 } else { 0.0 });
            }
        }
        let b = samples.len();
        let n_inputs = samples
            .iter()
            .map(|s| s.tokens.len().saturating_sub(1))
            .sum();
        Ok(Self {
            inputs: Tensor::from_vec(inputs, (b, t), device)?,
            targets: Tensor::from_vec(targets, (b, t), device)?,
            mask: Tensor::from_vec(mask, (b, t), device)?,
            n_tokens,
            n_inputs,
        })
    }
}

/// Position of the loader: epoch and index into that epoch's shuffled order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    /// Completed passes over the data.
    pub epoch: u64,
    /// Next position in this epoch's order.
    pub index: usize,
}

/// A preference pair's two samples and the reference model's log-probability of each
/// (computed once, before the first step; `None` until then).
#[derive(Debug, Clone, PartialEq)]
pub struct PairSample {
    /// The prompt answered with the preferred response.
    pub chosen: Sample,
    /// The prompt answered with the rejected response.
    pub rejected: Sample,
    /// `(log π_ref(chosen), log π_ref(rejected))`.
    pub reference: Option<(f64, f64)>,
}

/// Yields batches (of samples, or of preference pairs) in an order that depends only on the
/// seed and the cursor.
#[derive(Debug)]
pub struct Loader<T = Sample> {
    samples: Vec<T>,
    seed: u64,
    order: Vec<usize>,
    /// Where the next batch starts.
    pub cursor: Cursor,
}

impl<T> Loader<T> {
    /// A loader over non-empty `samples`, positioned at `cursor`.
    pub fn new(samples: Vec<T>, seed: u64, cursor: Cursor) -> Self {
        let mut loader = Self {
            order: Vec::new(),
            samples,
            seed,
            cursor,
        };
        loader.reshuffle();
        loader
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there is no sample at all.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Moves to `cursor` (a position saved by a checkpoint).
    pub fn seek(&mut self, cursor: Cursor) {
        self.cursor = cursor;
        self.reshuffle();
    }

    fn reshuffle(&mut self) {
        // One independent permutation per epoch, derived from (seed, epoch) alone.
        self.order = (0..self.samples.len()).collect();
        Rng::new(self.seed, 0xDA7A ^ self.cursor.epoch).shuffle(&mut self.order);
    }

    /// Every item, in data order.
    pub fn items(&self) -> &[T] {
        &self.samples
    }

    /// Every item, in data order, to fill in what is computed once (reference log-probs).
    pub fn items_mut(&mut self) -> &mut [T] {
        &mut self.samples
    }

    /// The next `size` samples, wrapping into the next epoch when this one runs out.
    pub fn next_samples(&mut self, size: usize) -> Vec<&T> {
        let mut picked = Vec::with_capacity(size);
        while picked.len() < size && !self.samples.is_empty() {
            if self.cursor.index >= self.order.len() {
                self.cursor = Cursor {
                    epoch: self.cursor.epoch + 1,
                    index: 0,
                };
                self.reshuffle();
            }
            picked.push(self.order[self.cursor.index]);
            self.cursor.index += 1;
        }
        picked.into_iter().map(|i| &self.samples[i]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::ByteTokenizer;

    #[test]
    fn sft_masks_prompt() {
        let ex = [Example::Pair {
            prompt: "1+1=".into(),
            response: "2".into(),
        }];
        let s = tokenize(&ex, &ByteTokenizer, &Format::Plain, true, 64).unwrap();
        assert_eq!(s[0].tokens.len(), 7);
        let b = Batch::new(&[&s[0]], ByteTokenizer::EOS, &Device::Cpu).unwrap();
        // Predictions of "2" and EOS count, the prompt's do not.
        assert_eq!(b.n_tokens, 2);
        assert_eq!(
            b.mask.to_vec2::<f32>().unwrap()[0],
            vec![0., 0., 0., 0., 1., 1.]
        );
    }

    #[test]
    fn loader_resumes_identically() {
        let samples: Vec<Sample> = (0..10).map(|i| Sample::new(vec![i, i + 1], 1)).collect();
        let mut a = Loader::new(samples.clone(), 3, Cursor::default());
        let first: Vec<u32> = a.next_samples(7).iter().map(|s| s.tokens[0]).collect();
        let cursor = a.cursor;
        let rest_a: Vec<u32> = a.next_samples(9).iter().map(|s| s.tokens[0]).collect();
        let mut b = Loader::new(samples, 3, cursor);
        let rest_b: Vec<u32> = b.next_samples(9).iter().map(|s| s.tokens[0]).collect();
        assert_eq!(rest_a, rest_b);
        assert_eq!(first.len(), 7);
    }
}
