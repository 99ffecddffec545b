//! Data-parallel training: what a rank of a gang does differently from a lone worker.
//!
//! - Every rank draws the whole global batch (`world x batchSize` samples) from its own loader
//!   and keeps its shard, `[rank x batchSize, (rank + 1) x batchSize)`: N workers of batch B see
//!   the batches one worker of batch N x B would, in the same order, and every loader's cursor
//!   stays the same (so rank 0's checkpoint holds everyone's data position).
//! - Each rank sums its loss and gradients over its shard (not averaged); the ring sums them over
//!   the gang together with the loss-token count, and the step divides by the global count, as
//!   a single worker does over its batch: the step is that of the big batch.
//! - Ranks join the gang after building and resuming their state and prove with a digest of it
//!   (weights, optimizer moments, step, data cursor, RNG) that they start from the same one.

use super::TrainError;
use super::trainer::Trainer;
use crate::data::Loader;
use crate::dist::{DistError, Ring};
use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};

/// This rank's part of a global batch of `world x per_rank` samples.
pub fn shard<T>(global: Vec<T>, rank: usize, per_rank: usize) -> Vec<T> {
    global
        .into_iter()
        .skip(rank * per_rank)
        .take(per_rank)
        .collect()
}

/// The samples of one micro-batch for this rank: its shard of the next global batch.
pub fn next_shard<'a, T>(loader: &'a mut Loader<T>, gang: &Ring, per_rank: usize) -> Vec<&'a T> {
    let global = loader.next_samples(per_rank * gang.world());
    shard(global, gang.rank(), per_rank)
}

/// Sums `grads` over the gang in place of each rank's own (one all-reduce of all of them as
/// one flat buffer: one round of the ring instead of one per tensor).
/// Gradients on an accelerator go through the ring's device transport when one is attached
/// (NCCL on CUDA: device to device, one call per tensor).
pub fn sum_gradients(ring: &mut Ring, grads: Vec<Tensor>) -> Result<Vec<Tensor>, TrainError> {
    if let Some(device) = ring.device()
        && grads.iter().all(|g| !g.device().is_cpu())
    {
        return grads
            .iter()
            .map(|g| Ok(device.all_reduce_sum(g)?))
            .collect();
    }
    if ring.world() == 1 {
        return Ok(grads);
    }
    let mut flat = Vec::new();
    for g in &grads {
        flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    ring.all_reduce_sum(&mut flat)?;
    let mut offset = 0;
    grads
        .iter()
        .map(|g| {
            let n = g.elem_count();
            let t = Tensor::from_slice(&flat[offset..offset + n], g.shape(), g.device())?
                .to_dtype(g.dtype());
            offset += n;
            Ok(t?)
        })
        .collect()
}

/// A step's sums (loss, counts, preference metrics) summed over the gang in place (f64: exact
/// for counts below 2^53).
pub fn sum_stats(ring: &mut Ring, sums: &mut [f64]) -> Result<(), DistError> {
    if ring.world() > 1 {
        ring.all_reduce_sum(sums)?;
    }
    Ok(())
}

/// `sha256:<hex>` of everything a step depends on: weights and optimizer moments (by name),
/// step, optimizer step, data cursor and RNG.
pub fn state_digest(t: &Trainer) -> Result<String, TrainError> {
    let mut h = Sha256::new();
    let state = serde_json::json!({
        "step": t.step, "optimizerStep": t.optimizer.t, "cursor": t.data.cursor(), "rng": t.rng,
    });
    h.update(state.to_string().as_bytes());
    let mut feed = |tensors: std::collections::HashMap<String, Tensor>| -> Result<(), TrainError> {
        let mut names: Vec<_> = tensors.keys().cloned().collect();
        names.sort();
        for name in names {
            let values = tensors[&name]
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            h.update(name.as_bytes());
            for v in values {
                h.update(v.to_le_bytes());
            }
        }
        Ok(())
    };
    feed(t.tensors()?)?;
    feed(t.optimizer.state_tensors())?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shards_of_a_global_batch_are_its_consecutive_parts() {
        let global: Vec<u32> = (0..8).collect();
        assert_eq!(shard(global.clone(), 0, 4), [0, 1, 2, 3]);
        assert_eq!(shard(global.clone(), 1, 4), [4, 5, 6, 7]);
        // The tail of a data set shorter than the global batch: later ranks get less.
        assert_eq!(shard(vec![0, 1, 2, 3, 4], 1, 3), [3, 4]);
        assert!(shard(vec![0, 1], 1, 3).is_empty());
    }
}
