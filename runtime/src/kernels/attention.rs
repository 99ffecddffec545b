//! Fused single-query attention over a preallocated KV cache: the scores, softmax and weighted
//! sum of one query row in one pass over the cached keys and values, with no temporaries
//! beyond a reused score buffer (candle's path builds a chain of small tensors per sequence
//! and layer).

use super::ops::{axpy, dot, softmax};

/// One query position's attention for the query heads that share one KV head.
///
/// `q` holds those heads one after another (`n_rep * head_dim` values); `keys` and `values`
/// hold the KV head's cached positions, `head_dim` values each, of which the first `len` are
/// attended (causality is the caller's `len`). Writes the heads' outputs into `out`, laid out
/// like `q`. `scores` is scratch space.
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
    let keys = &keys[..len * head_dim];
    let values = &values[..len * head_dim];
    for (qh, oh) in q.chunks_exact(head_dim).zip(out.chunks_exact_mut(head_dim)) {
        scores.clear();
        scores.extend(keys.chunks_exact(head_dim).map(|k| dot(qh, k) * scale));
        softmax(scores);
        oh.fill(0.0);
        for (p, v) in scores.iter().zip(values.chunks_exact(head_dim)) {
            axpy(*p, v, oh);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_the_shared_model_attention() {
        let (rep, d, len, cap) = (3usize, 64usize, 37usize, 50usize);
        let f = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * s).sin()).collect() };
        let (q, k, v) = (f(rep * d, 0.37), f(cap * d, 0.11), f(cap * d, 0.23));
        let mut out = vec![0f32; rep * d];
        attend(&q, &k, &v, len, d, &mut Vec::new(), &mut out);
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
