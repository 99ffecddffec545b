//! Rotary position embedding, interleaved (GGUF) layout: pairs `(2i, 2i + 1)` of a head are
//! rotated by the angle whose cosine and sine are `cos[i]` and `sin[i]` (the rows of
//! [`crate::model::rope_tables`] at the head's position). One rotation for the serving and the
//! training kernels, the same as candle's [`crate::model::apply_rope`].

/// Rotates one head vector `x` in place and multiplies it by `scale` (1.0: exact, no scaling;
/// training folds the attention scale 1/sqrt(d) of queries in here).
#[inline]
pub(crate) fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], scale: f32) {
    for ((pair, c), s) in x.chunks_exact_mut(2).zip(cos).zip(sin) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = (a * c - b * s) * scale;
        pair[1] = (a * s + b * c) * scale;
    }
}

/// The inverse rotation of [`rope`] (its transpose, without the scale), in place: the gradient
/// of a rotated head with respect to the head before rotation.
#[inline]
pub(crate) fn unrope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    for ((pair, c), s) in x.chunks_exact_mut(2).zip(cos).zip(sin) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c + b * s;
        pair[1] = b * c - a * s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_and_unrope_undoes_it() {
        let mut x = [1.0, 0.0, 0.0, 2.0];
        rope(&mut x, &[0.0, 1.0], &[1.0, 0.0], 1.0);
        assert_eq!(x, [0.0, 1.0, 0.0, 2.0]);
        unrope(&mut x, &[0.0, 1.0], &[1.0, 0.0]);
        assert_eq!(x, [1.0, 0.0, 0.0, 2.0]);
        rope(&mut x, &[0.0, 1.0], &[1.0, 0.0], 0.5);
        assert_eq!(x, [0.0, 0.5, 0.0, 1.0]);
    }
}
