//! A preallocated key/value cache: fixed-capacity tensors written in place, so decoding a
//! token never reallocates or concatenates (a measured hot spot with growing caches).

use super::ModelConfig;
use candle_core::{DType, Device, Result, Tensor};

/// Keys and values of every layer for a batch of sequences, up to a fixed capacity.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: keys (batch, n_kv_heads, capacity, head_dim).
    pub keys: Vec<Tensor>,
    /// Per layer: values (batch, n_kv_heads, capacity, head_dim).
    pub values: Vec<Tensor>,
    /// Positions each sequence can hold.
    pub capacity: usize,
}

impl KvCache {
    /// Allocates a zeroed cache for `batch` sequences of up to `capacity` positions.
    pub fn new(
        config: &ModelConfig,
        batch: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (batch, config.n_kv_heads, capacity, config.head_dim());
        let alloc = || Tensor::zeros(shape, dtype, device);
        let keys = (0..config.n_layers)
            .map(|_| alloc())
            .collect::<Result<Vec<_>>>()?;
        let values = (0..config.n_layers)
            .map(|_| alloc())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            keys,
            values,
            capacity,
        })
    }

    /// Bytes held by the cache.
    pub fn size_in_bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Writes `k`, `v` (batch, n_kv_heads, t, head_dim) of `layer` at `start_pos` and returns
    /// views of all positions up to `start_pos + t`.
    pub fn append(
        &mut self,
        layer: usize,
        start_pos: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let end = start_pos + t;
        if end > self.capacity {
            candle_core::bail!(
                "kv cache full: {end} positions > capacity {}",
                self.capacity
            );
        }
        let (kc, vc) = (&self.keys[layer], &self.values[layer]);
        kc.slice_set(&k.contiguous()?, 2, start_pos)?;
        vc.slice_set(&v.contiguous()?, 2, start_pos)?;
        Ok((kc.narrow(2, 0, end)?, vc.narrow(2, 0, end)?))
    }
}
