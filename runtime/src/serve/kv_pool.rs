//! Per-sequence KV caches, preallocated to the full context and reused: a finished sequence's
//! cache goes back to the pool, and positions beyond a sequence's length are never read, so a
//! reused cache needs no clearing.
//!
//! The prefix cache: a finished sequence's cache keeps the tokens whose keys and values it holds
//! (and whose caller it was). A new prompt takes the free cache sharing its longest prefix with
//! the same caller and computes only the rest (llama-server's `cache_prompt`, vLLM's automatic
//! prefix caching at whole-sequence granularity). The keys and values of a position depend only
//! on the tokens up to it, so a reused prefix gives the same bits as computing it again. A cache
//! whose prefix nobody shares is overwritten, least recently used first, only when a sequence
//! needs one and none is empty.

use super::cpu_model::CpuKv;
use crate::model::{KvCache, ModelConfig};
use candle_core::{DType, Device, Result};

/// One sequence's cache: candle tensors for the candle model, plain buffers for the CPU
/// kernels ([`super::cpu_model`]).
pub enum SeqCache {
    /// For [`crate::model::Transformer`]'s forward passes.
    Candle(KvCache),
    /// For [`super::cpu_model::CpuModel`].
    Cpu(CpuKv),
}

impl SeqCache {
    /// The candle cache (an error for a CPU-kernel cache).
    pub fn candle(&mut self) -> Result<&mut KvCache> {
        match self {
            Self::Candle(c) => Ok(c),
            Self::Cpu(_) => candle_core::bail!("a CPU-kernel cache given to the candle model"),
        }
    }
}

/// A free cache and what it holds.
struct Free {
    cache: SeqCache,
    /// Tokens whose keys and values fill positions `0..tokens.len()`.
    tokens: Vec<u32>,
    /// Whose they are (a hash of the caller's credentials): never shared with another.
    owner: u64,
    /// When it was last given back (larger is later).
    used: u64,
}

/// A pool of caches of one capacity.
pub struct KvPool {
    config: ModelConfig,
    capacity: usize,
    device: Device,
    cpu_kernels: bool,
    free: Vec<Free>,
    tick: u64,
    allocated: usize,
    bytes_each: usize,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl KvPool {
    /// A pool of caches holding `capacity` positions each, for the CPU kernels when
    /// `cpu_kernels`, else candle caches on `device`.
    pub fn new(config: &ModelConfig, capacity: usize, device: &Device, cpu_kernels: bool) -> Self {
        let c = config;
        // keys and values, every layer, f32
        let bytes_each = 2 * c.n_layers * c.n_kv_heads * capacity * c.head_dim() * 4;
        Self {
            config: c.clone(),
            capacity,
            device: device.clone(),
            cpu_kernels,
            free: Vec::new(),
            tick: 0,
            allocated: 0,
            bytes_each,
        }
    }

    /// A cache for a new sequence: an empty one, else the least recently used (its prefix is
    /// dropped), else a new one.
    pub fn take(&mut self) -> Result<SeqCache> {
        let pick = self
            .free
            .iter()
            .enumerate()
            .min_by_key(|(_, f)| (!f.tokens.is_empty(), f.used))
            .map(|(i, _)| i);
        if let Some(i) = pick {
            return Ok(self.free.swap_remove(i).cache);
        }
        let c = if self.cpu_kernels {
            SeqCache::Cpu(CpuKv::new(&self.config, self.capacity))
        } else {
            SeqCache::Candle(KvCache::new(
                &self.config,
                1,
                self.capacity,
                DType::F32,
                &self.device,
            )?)
        };
        self.allocated += 1;
        Ok(c)
    }

    /// A cache for a sequence of `prompt` by `owner`, and how many of its first positions already
    /// hold that prompt's keys and values (at most all but its last token, whose logits the
    /// sequence needs).
    pub fn take_for(&mut self, prompt: &[u32], owner: u64) -> Result<(SeqCache, usize)> {
        let most = prompt.len().saturating_sub(1);
        let best = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, f)| f.owner == owner)
            .map(|(i, f)| (common_prefix(&f.tokens, prompt).min(most), i))
            .max();
        match best {
            Some((reused, i)) if reused > 0 => Ok((self.free.swap_remove(i).cache, reused)),
            _ => Ok((self.take()?, 0)),
        }
    }

    /// Returns a cache whose content is unknown (a failed or cancelled sequence).
    pub fn give_back(&mut self, cache: SeqCache) {
        self.keep(cache, Vec::new(), 0);
    }

    /// Returns a finished sequence's cache, holding the keys and values of `tokens` for `owner`.
    pub fn keep(&mut self, cache: SeqCache, tokens: Vec<u32>, owner: u64) {
        self.tick += 1;
        self.free.push(Free {
            cache,
            tokens,
            owner,
            used: self.tick,
        });
    }

    /// Caches waiting in the pool for a sequence.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Caches held by sequences: zero when nothing runs, or a sequence's cache was not returned.
    pub fn in_use(&self) -> usize {
        self.allocated - self.free.len()
    }

    /// Bytes held by every cache the pool allocated.
    pub fn bytes(&self) -> usize {
        self.allocated * self.bytes_each
    }

    /// Positions each cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caches_in_use_until_given_back() {
        let config: ModelConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": 8, "n_layers": 1, "n_heads": 2, "intermediate_size": 16, "max_seq_len": 4
        }))
        .unwrap();
        let mut pool = KvPool::new(&config, 4, &Device::Cpu, true);
        let (a, b) = (pool.take().unwrap(), pool.take().unwrap());
        assert_eq!((pool.in_use(), pool.free()), (2, 0));
        pool.give_back(a);
        assert_eq!((pool.in_use(), pool.free()), (1, 1));
        // A reused cache is not a new allocation.
        let c = pool.take().unwrap();
        assert_eq!((pool.in_use(), pool.free()), (2, 0));
        pool.give_back(b);
        pool.give_back(c);
        assert_eq!((pool.in_use(), pool.free()), (0, 2));
    }

    #[test]
    fn the_longest_shared_prefix_of_the_same_owner_is_reused_and_the_oldest_prefix_goes_first() {
        let config: ModelConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": 8, "n_layers": 1, "n_heads": 2, "intermediate_size": 16, "max_seq_len": 16
        }))
        .unwrap();
        let mut pool = KvPool::new(&config, 16, &Device::Cpu, true);
        let (a, b) = (pool.take().unwrap(), pool.take().unwrap());
        pool.keep(a, vec![1, 2, 3, 4, 5], 7);
        pool.keep(b, vec![1, 2, 9], 7);
        // Another caller shares nothing.
        let (c, reused) = pool.take_for(&[1, 2, 3, 4, 6], 8).unwrap();
        assert_eq!(reused, 0);
        assert_eq!(
            pool.free(),
            1,
            "the oldest prefix ([1,2,3,4,5]) was overwritten"
        );
        pool.keep(c, vec![1, 2, 3, 4, 6], 8);
        let (d, reused) = pool.take_for(&[1, 2, 9, 9], 7).unwrap();
        assert_eq!(reused, 3);
        // At most all but the last token: its logits are needed.
        pool.keep(d, vec![1, 2, 3], 7);
        let (_, reused) = pool.take_for(&[1, 2, 3], 7).unwrap();
        assert_eq!(reused, 2);
        assert_eq!(pool.in_use() + pool.free(), 2);
    }
}
