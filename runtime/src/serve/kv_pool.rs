//! Per-sequence KV caches, preallocated to the full context and reused: a finished sequence's
//! cache goes back to the pool, and positions beyond a sequence's length are never read, so a
//! reused cache needs no clearing.

use crate::model::{KvCache, ModelConfig};
use candle_core::{DType, Device, Result};

/// A pool of caches of one capacity.
pub struct KvPool {
    config: ModelConfig,
    capacity: usize,
    device: Device,
    free: Vec<KvCache>,
    allocated: usize,
    bytes_each: usize,
}

impl KvPool {
    /// A pool of caches holding `capacity` positions each.
    pub fn new(config: &ModelConfig, capacity: usize, device: &Device) -> Self {
        let c = config;
        // keys and values, every layer, f32
        let bytes_each = 2 * c.n_layers * c.n_kv_heads * capacity * c.head_dim() * 4;
        Self {
            config: c.clone(),
            capacity,
            device: device.clone(),
            free: Vec::new(),
            allocated: 0,
            bytes_each,
        }
    }

    /// A cache for a new sequence.
    pub fn take(&mut self) -> Result<KvCache> {
        if let Some(c) = self.free.pop() {
            return Ok(c);
        }
        let c = KvCache::new(&self.config, 1, self.capacity, DType::F32, &self.device)?;
        self.allocated += 1;
        Ok(c)
    }

    /// Returns a finished sequence's cache.
    pub fn give_back(&mut self, cache: KvCache) {
        self.free.push(cache);
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
