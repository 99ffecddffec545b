//! Choosing the next token from logits: greedy at temperature 0, otherwise temperature, top-k
//! and top-p (nucleus) sampling from a seeded generator, so a request with a seed is repeatable.

use crate::rng::Rng;

/// How one request samples.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax): the same text every time.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches this mass (1 = all).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// A sampler: the parameters and the generator state of one sequence.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    // Reused between tokens: (logit, id) candidates.
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler for one sequence.
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed, 0x5a3);
        Self {
            params,
            rng,
            scratch: Vec::new(),
        }
    }

    /// The next token given the logits of the last position.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 || self.params.top_k == 1 {
            return argmax(logits);
        }
        let c = &mut self.scratch;
        c.clear();
        // NaN logits (a broken model) are skipped rather than poisoning the distribution.
        c.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| (l, i as u32)),
        );
        if c.is_empty() {
            return 0;
        }
        let k = if self.params.top_k == 0 {
            c.len()
        } else {
            self.params.top_k.min(c.len())
        };
        if k < c.len() {
            c.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            c.truncate(k);
        }
        c.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let inv_t = 1.0 / self.params.temperature;
        let max = c[0].0;
        let mut total = 0.0f32;
        for e in c.iter_mut() {
            e.0 = ((e.0 - max) * inv_t).exp();
            total += e.0;
        }
        // Nucleus: the shortest prefix (most likely first) whose mass reaches top_p.
        let mut keep = c.len();
        if self.params.top_p < 1.0 {
            let mut mass = 0.0;
            for (i, e) in c.iter().enumerate() {
                mass += e.0 / total;
                if mass >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept: f32 = c[..keep].iter().map(|e| e.0).sum();
        let mut r = self.rng.next_f64() as f32 * kept;
        for e in &c[..keep] {
            if r < e.0 {
                return e.1;
            }
            r -= e.0;
        }
        c[keep - 1].1
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = (f32::NEG_INFINITY, 0u32);
    for (i, &l) in logits.iter().enumerate() {
        if l > best.0 {
            best = (l, i as u32);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_largest() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 40,
            seed: 7,
        };
        let run = || {
            let mut s = Sampler::new(p.clone());
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn top_k_restricts_choices() {
        let logits = [5.0, 4.0, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 2,
            ..Default::default()
        });
        for _ in 0..200 {
            assert!(s.sample(&logits) < 2);
        }
    }

    #[test]
    fn top_p_restricts_choices() {
        let logits = [10.0, 0.0, 0.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            ..Default::default()
        });
        for _ in 0..200 {
            assert_eq!(s.sample(&logits), 0);
        }
    }
}
