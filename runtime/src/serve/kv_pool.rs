//! Per-sequence KV caches, preallocated to the full context and reused: a finished sequence's
//! cache goes back to the pool, and positions beyond a sequence's length are never read, so a
//! reused cache needs no clearing.

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

/// A pool of caches of one capacity.
pub struct KvPool {
    config: ModelConfig,
    capacity: usize,
    device: Device,
    cpu_kernels: bool,
    free: Vec<SeqCache>,
    allocated: usize,
    bytes_each: usize,
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
            allocated: 0,
            bytes_each,
        }
    }

    /// A cache for a new sequence.
    pub fn take(&mut self) -> Result<SeqCache> {
        if let Some(c) = self.free.pop() {
            return Ok(c);
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

    /// Returns a finished sequence's cache.
    pub fn give_back(&mut self, cache: SeqCache) {
        self.free.push(cache);
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
}
