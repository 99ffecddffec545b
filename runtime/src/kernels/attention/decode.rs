//! Fused single-query attention over a preallocated KV cache: the scores, softmax and weighted
//! sum of one query row in one pass over the cached keys and values, with no temporaries
//! beyond a reused score buffer (candle's path builds a chain of small tensors per sequence
//! and layer).

use super::super::math::{axpy, softmax};

/// Positions per key tile. Keys are cached transposed in tiles of this many positions,
/// `[tile][head_dim][KEY_TILE]`, so that one query's scores against a tile are
/// `head_dim` vector multiply-adds with no horizontal sums.
pub const KEY_TILE: usize = 16;

/// Where key element `d` of position `pos` sits in a transposed key cache.
#[inline]
pub fn key_index(pos: usize, d: usize, head_dim: usize) -> usize {
    (pos / KEY_TILE) * head_dim * KEY_TILE + d * KEY_TILE + pos % KEY_TILE
}

/// One query position's attention for the query heads that share one KV head.
///
/// `q` holds those heads one after another (`n_rep * head_dim` values); `keys` is the KV
/// head's cache in the transposed tile layout ([`key_index`]) and `values` its values,
/// `head_dim` per position; the first `len` positions are attended (causality is the caller's
/// `len`). Writes the heads' outputs into `out`, laid out like `q`. `scores` is scratch.
pub fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    len: usize,
    head_dim: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let scale = 1.0 / (head_dim as f32).sqrt();
    let tiles = len.div_ceil(KEY_TILE);
    let keys = &keys[..tiles * head_dim * KEY_TILE];
    let values = &values[..len * head_dim];
    scores.resize(tiles * KEY_TILE, 0.0);
    for (qh, oh) in q.chunks_exact(head_dim).zip(out.chunks_exact_mut(head_dim)) {
        for (tile, s) in keys
            .chunks_exact(head_dim * KEY_TILE)
            .zip(scores.chunks_exact_mut(KEY_TILE))
        {
            tile_scores(qh, tile, scale, s);
        }
        let probs = &mut scores[..len];
        softmax(probs);
        match head_dim {
            64 => weighted_sum::<64>(probs, values, oh),
            128 => weighted_sum::<128>(probs, values, oh),
            _ => {
                oh.fill(0.0);
                for (p, v) in probs.iter().zip(values.chunks_exact(head_dim)) {
                    axpy(*p, v, oh);
                }
            }
        }
    }
}

/// Scores of one query head against one key tile. Four partial sums over `d` keep four
/// independent chains of fused multiply-adds in flight (one chain is latency-bound).
#[inline]
fn tile_scores(q: &[f32], tile: &[f32], scale: f32, out: &mut [f32]) {
    let mut acc = [[0f32; KEY_TILE]; 4];
    let rows = tile.chunks_exact(4 * KEY_TILE);
    for (qd, four) in q.chunks_exact(4).zip(rows) {
        for (j, row) in four.chunks_exact(KEY_TILE).enumerate() {
            for l in 0..KEY_TILE {
                acc[j][l] = qd[j].mul_add(row[l], acc[j][l]);
            }
        }
    }
    // head_dim not a multiple of 4: the rest.
    let done = q.len() / 4 * 4;
    for (qd, row) in q[done..]
        .iter()
        .zip(tile[done * KEY_TILE..].chunks_exact(KEY_TILE))
    {
        for l in 0..KEY_TILE {
            acc[0][l] = qd.mul_add(row[l], acc[0][l]);
        }
    }
    for l in 0..KEY_TILE {
        out[l] = (acc[0][l] + acc[1][l] + acc[2][l] + acc[3][l]) * scale;
    }
}

/// `out = sum_j probs[j] * values[j]` with the output held in registers across positions.
#[inline]
fn weighted_sum<const D: usize>(probs: &[f32], values: &[f32], out: &mut [f32]) {
    let mut acc = [0f32; D];
    for (p, v) in probs.iter().zip(values.chunks_exact(D)) {
        for i in 0..D {
            acc[i] = p.mul_add(v[i], acc[i]);
        }
    }
    out[..D].copy_from_slice(&acc);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_the_shared_model_attention() {
        for (rep, d, len, cap) in [
            (3usize, 64usize, 37usize, 50usize),
            (2, 30, 17, 17),
            (1, 128, 1, 5),
        ] {
            check(rep, d, len, cap);
        }
    }

    fn check(rep: usize, d: usize, len: usize, cap: usize) {
        let f = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * s).sin()).collect() };
        let (q, k, v) = (f(rep * d, 0.37), f(cap * d, 0.11), f(cap * d, 0.23));
        let mut kt = vec![0f32; cap.next_multiple_of(KEY_TILE) * d];
        for p in 0..cap {
            for i in 0..d {
                kt[key_index(p, i, d)] = k[p * d + i];
            }
        }
        let mut out = vec![0f32; rep * d];
        attend(&q, &kt, &v, len, d, &mut Vec::new(), &mut out);
        let dev = Device::Cpu;
        let qt = Tensor::from_slice(&q, (1, rep, 1, d), &dev).unwrap();
        let kt = Tensor::from_slice(&k[..len * d], (1, 1, len, d), &dev).unwrap();
        let vt = Tensor::from_slice(&v[..len * d], (1, 1, len, d), &dev).unwrap();
        let want = crate::model::attention(&qt, &kt, &vt, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
