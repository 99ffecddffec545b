//! Element-wise and row-wise arithmetic of every kernel (training, serving, embedding) on plain
//! f32 slices, written so the compiler vectorises them (no `unsafe`): `exp` and what is built on
//! it (softmax, sigmoid, SiLU, erf), and fixed-lane reductions.
//!
//! libm's `expf` is a function call per value (8% of a 1M-parameter training step went
//! there; softmax and SiLU take tens of millions in a 512-token prefill). This one is a handful of fused multiply-adds and integer operations with no
//! branches, so loops over it compile to SIMD; every lane does the same operations in the
//! same order, so the result does not depend on the vector width and stays bitwise the same
//! on every x86-64 CPU (and any with a fused multiply-add).

/// e^x to about 2 ulp, for x in [-87, 88] (clamped there: results below e^-87 come out as
/// e^-87, about 1.6e-38, which every use here treats as zero).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for |n| < 2^11.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (ties to even).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = x.mul_add(LOG2E, ROUND) - ROUND;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    // Taylor series of e^r to degree 7 on |r| <= ln 2 / 2: truncation below 6e-9.
    let mut p: f32 = 1.0 / 5040.0;
    p = p.mul_add(r, 1.0 / 720.0);
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    // 2^n for n in [-126, 127]: the exponent field alone.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// Lanes of the sums below: a fixed number, so the order of additions is the same whatever
/// the vector width.
const LANES: usize = 16;

/// Sum of `x` in `LANES` interleaved partial sums, then those in order.
#[inline]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    for (a, v) in acc.iter_mut().zip(tail) {
        *a += v;
    }
    acc.iter().sum()
}

/// Sum of `a[i] * b[i]` in `LANES` interleaved partial sums (fixed order, as [`sum`]).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    for ((a, x), y) in acc.iter_mut().zip(ra).zip(rb) {
        *a += x * y;
    }
    acc.iter().sum()
}

/// `y[i] += a * x[i]`.
#[inline]
pub(crate) fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `y[i] += x[i]`.
pub(crate) fn add_assign(y: &mut [f32], x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += x;
    }
}

/// Largest value of `x` (negative infinity when empty).
#[inline]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a = a.max(v);
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// Softmax of `x` into `out`; returns the log of the normaliser (logsumexp of `x`).
pub(crate) fn softmax_into(x: &[f32], out: &mut [f32]) -> f32 {
    let m = max(x);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = exp(v - m);
    }
    let s = sum(out);
    let inv = 1.0 / s;
    for o in out.iter_mut() {
        *o *= inv;
    }
    m + s.ln()
}

/// Softmax of `x` in place.
pub(crate) fn softmax(x: &mut [f32]) {
    let m = max(x);
    for v in x.iter_mut() {
        *v = exp(*v - m);
    }
    let inv = 1.0 / sum(x);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// The logistic function.
#[inline(always)]
pub(crate) fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + exp(-a))
}

/// SiLU (swish): `a * sigmoid(a)`.
#[inline(always)]
pub(crate) fn silu(a: f32) -> f32 {
    a * sigmoid(a)
}

/// The error function to about 4e-7 absolute (Abramowitz and Stegun 7.1.26 with [`exp`]):
/// branch-free, so loops over it vectorise.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / P.mul_add(a, 1.0);
    let mut poly = A[4];
    for c in A[..4].iter().rev() {
        poly = poly.mul_add(t, *c);
    }
    let y = 1.0 - poly * t * exp(-a * a);
    y.copysign(x)
}

/// GELU with the exact (erf) form, as BERT's `gelu`: `x/2 * (1 + erf(x / sqrt 2))`.
#[inline(always)]
pub(crate) fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within 5e-7 of the error function (its Taylor series in f64).
    #[test]
    fn erf_is_accurate() {
        fn erf64(x: f64) -> f64 {
            // Taylor series; exact enough for |x| <= 4, and erf is 1 beyond to f32 precision.
            if x.abs() > 4.0 {
                return x.signum();
            }
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        }
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            worst = worst.max((f64::from(erf(x)) - erf64(f64::from(x))).abs());
            x += 0.0071;
        }
        assert!(worst < 5e-7, "absolute error {worst}");
        assert!(erf(0.0).abs() < 1e-7);
        assert!((gelu_erf(1.0) - 0.841_344_7).abs() < 1e-6);
    }

    /// Within 2 ulp-ish (3e-7 relative) of the f64 exponential across the range used.
    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        for x in [0.0f32, -0.0, 1e-30, -1e-30, 0.5, -0.5, 1.0, 10.0, -10.0] {
            let want = f64::from(x).exp();
            worst = worst.max(((f64::from(exp(x)) - want) / want).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite());
    }

    /// Within 5e-7 of libm's `expf` on a fine grid (the serving kernels' check, kept when
    /// their own polynomial was merged into this one).
    #[test]
    fn exp_is_close_to_libm() {
        let mut worst = 0f32;
        for i in -87_000..88_000 {
            let x = i as f32 / 1000.0 + 0.000_37;
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 5e-7, "relative error {worst}");
    }

    /// The reductions match plain sums at lengths around the lane count.
    #[test]
    fn reductions_match_plain_sums_at_odd_lengths() {
        for n in [0usize, 1, 15, 16, 17, 64, 577] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            assert!((f64::from(dot(&a, &b)) - plain).abs() < 1e-4);
            let plain: f64 = a.iter().map(|x| f64::from(*x)).sum();
            assert!((f64::from(sum(&a)) - plain).abs() < 1e-4);
        }
    }

    /// Softmax sums to one and matches the plain formula.
    #[test]
    fn softmax_matches_formula() {
        let x: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 23) as f32 * 0.37 - 4.0)
            .collect();
        let mut out = vec![0f32; x.len()];
        let lse = softmax_into(&x, &mut out);
        let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let z: f64 = x.iter().map(|&v| f64::from(v - m).exp()).sum();
        assert!((f64::from(lse) - (f64::from(m) + z.ln())).abs() < 1e-5);
        for (o, &v) in out.iter().zip(&x) {
            assert!((f64::from(*o) - f64::from(v - m).exp() / z).abs() < 1e-6);
        }
        let mut y = x.clone();
        softmax(&mut y);
        assert_eq!(y, out);
        assert!((sum(&out) - 1.0).abs() < 1e-6);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }
}
