//! Quantized matrix products `y = x W^T` for inference, on GGUF Q4_1 and Q8_0 weights as
//! stored (no re-quantization: the weights are exact).
//!
//! The activations are quantized once per product to 8 bits per value with one f32 scale per
//! 32 values (ggml's Q8_0/Q8_1 scheme, what llama.cpp does for these formats). Every weight
//! block is held as unsigned 8-bit codes `q` with a scale `d` and an offset `m` (value
//! `d * q + m`): Q4_1 as its 4-bit codes, Q8_0 as `q + 128` with `m = -128 d`. One block's
//! product with an activation block (codes `a`, scale `da`, `sa = da * sum(a)`) is then
//! `d * da * dot(q, a) + m * sa`, and `dot(u8, i8)` is one AVX-512/AVX VNNI instruction.
//!
//! The SIMD kernels compute a tile of 4 weight rows by up to 4 activation rows, so each weight
//! block is loaded (and, for Q4_1, unpacked) once per 4 activation rows: the batched decode
//! step reads the weights once for the whole batch. A scalar reference computes the same sums.

use super::pool::Pool;

/// How weight codes are packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// 4-bit codes, 16 bytes per block of 32 (ggml order: byte `t` holds values `t` and `t + 16`).
    Q4,
    /// 8-bit unsigned codes, 32 bytes per block.
    Q8,
}

/// Values per block.
pub const BLOCK: usize = 32;
/// Weight rows per SIMD tile.
const NR: usize = 4;
/// Largest number of activation rows per SIMD tile.
const MR: usize = 4;

/// A quantized (n, k) weight matrix in the kernels' layout.
#[derive(Debug, Clone)]
pub struct QMatrix {
    format: Format,
    n: usize,
    k: usize,
    kb: usize,
    /// Stride of `d` and `m`: blocks per row rounded up to 8 (zero padding), so the offset
    /// terms can be summed 8 blocks at a time.
    kbp: usize,
    row_bytes: usize,
    /// Codes, `n` rounded up to [`NR`] rows (zero rows at the end).
    qs: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
}

/// A weight format the kernels do not take, or bytes that do not match the shape.
#[derive(Debug, thiserror::Error)]
#[error("quantized matrix: {0}")]
pub struct FormatError(String);

fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exp = ((bits >> 10) & 0x1F) as u32;
    let frac = (bits & 0x3FF) as u32;
    let v = match exp {
        0 if frac == 0 => sign,
        0 => {
            // Subnormal: value = frac * 2^-24.
            let f = frac as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -f } else { f };
        }
        0x1F => sign | 0x7F80_0000 | (frac << 13),
        _ => sign | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(v)
}

impl QMatrix {
    /// Builds a matrix from GGUF blocks: the rows of every part (`(bytes, rows)`, each of
    /// width `k`) one after another, so that projections sharing an input (q, k and v; gate
    /// and up) become one product. `ggml_type` is `"q4_1"` or `"q8_0"`.
    pub fn from_ggml(
        ggml_type: &str,
        parts: &[(&[u8], usize)],
        k: usize,
    ) -> Result<Self, FormatError> {
        let (format, block_bytes) = match ggml_type {
            "q4_1" => (Format::Q4, 20),
            "q8_0" => (Format::Q8, 34),
            other => return Err(FormatError(format!("{other} is not supported"))),
        };
        if k == 0 || !k.is_multiple_of(BLOCK) {
            return Err(FormatError(format!(
                "width {k} is not a multiple of {BLOCK}"
            )));
        }
        let kb = k / BLOCK;
        let kbp = kb.next_multiple_of(8);
        let n: usize = parts.iter().map(|p| p.1).sum();
        let n_pad = n.next_multiple_of(NR);
        let row_bytes = match format {
            Format::Q4 => kb * 16,
            Format::Q8 => k,
        };
        let mut w = Self {
            format,
            n,
            k,
            kb,
            kbp,
            row_bytes,
            qs: vec![0; n_pad * row_bytes],
            d: vec![0.0; n_pad * kbp],
            m: vec![0.0; n_pad * kbp],
        };
        let mut row = 0;
        for &(bytes, rows) in parts {
            if bytes.len() != rows * kb * block_bytes {
                return Err(FormatError(format!(
                    "{} bytes for {rows} rows of {k} ({ggml_type})",
                    bytes.len()
                )));
            }
            for (i, blk) in bytes.chunks_exact(block_bytes).enumerate() {
                let (r, b) = (row + i / kb, i % kb);
                let d = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
                let codes = &mut w.qs[r * row_bytes..(r + 1) * row_bytes];
                match format {
                    Format::Q4 => {
                        w.d[r * kbp + b] = d;
                        w.m[r * kbp + b] = f16_to_f32(u16::from_le_bytes([blk[2], blk[3]]));
                        codes[b * 16..(b + 1) * 16].copy_from_slice(&blk[4..20]);
                    }
                    Format::Q8 => {
                        w.d[r * kbp + b] = d;
                        w.m[r * kbp + b] = -128.0 * d;
                        for (c, &q) in codes[b * 32..(b + 1) * 32].iter_mut().zip(&blk[2..34]) {
                            *c = (q as i8 as i16 + 128) as u8;
                        }
                    }
                }
            }
            row += rows;
        }
        Ok(w)
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// The code of value `t` of block `b` of row `j`.
    fn code(&self, j: usize, b: usize, t: usize) -> u8 {
        let row = &self.qs[j * self.row_bytes..];
        match self.format {
            Format::Q4 => {
                let byte = row[b * 16 + t % 16];
                if t < 16 { byte & 0x0F } else { byte >> 4 }
            }
            Format::Q8 => row[b * 32 + t],
        }
    }

    /// Row `j` as f32 values (an embedding lookup from a tied output matrix).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        for (b, chunk) in out[..self.k].chunks_exact_mut(BLOCK).enumerate() {
            let (d, m) = (self.d[j * self.kbp + b], self.m[j * self.kbp + b]);
            for (t, o) in chunk.iter_mut().enumerate() {
                *o = d * self.code(j, b, t) as f32 + m;
            }
        }
    }
}

/// Activations quantized for [`matmul`]: per row, i8 codes, and per block of 32 the scale and
/// the scale times the sum of the codes.
#[derive(Debug, Clone, Default)]
pub struct QActs {
    rows: usize,
    k: usize,
    kbp: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl QActs {
    /// Quantizes `x` (rows, k), reusing this buffer; many rows are split over `pool`.
    pub fn quantize(&mut self, x: &[f32], k: usize, pool: &Pool) {
        assert!(k.is_multiple_of(BLOCK) && x.len().is_multiple_of(k));
        let rows = x.len() / k;
        let kbp = (k / BLOCK).next_multiple_of(8);
        self.rows = rows;
        self.k = k;
        self.kbp = kbp;
        self.qs.resize(rows * k, 0);
        // Padding blocks must stay zero: the offset terms run over them.
        self.d.clear();
        self.d.resize(rows * kbp, 0.0);
        self.s.clear();
        self.s.resize(rows * kbp, 0.0);
        const ROWS_PER_TASK: usize = 16;
        if rows < 2 * ROWS_PER_TASK {
            quantize_rows(x, &mut self.qs, &mut self.d, &mut self.s, k);
            return;
        }
        let parts: Vec<_> = x
            .chunks(ROWS_PER_TASK * k)
            .zip(self.qs.chunks_mut(ROWS_PER_TASK * k))
            .zip(self.d.chunks_mut(ROWS_PER_TASK * kbp))
            .zip(self.s.chunks_mut(ROWS_PER_TASK * kbp))
            .map(|(((x, q), d), s)| std::sync::Mutex::new((x, q, d, s)))
            .collect();
        pool.run(parts.len(), |i| {
            let mut part = parts[i].lock().unwrap_or_else(|p| p.into_inner());
            let (x, q, d, s) = &mut *part;
            quantize_rows(x, q, d, s, k);
        });
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Quantizes whole rows of `x` (width `k`) into codes, scales and scaled code sums.
fn quantize_rows(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32], k: usize) {
    let kbp = (k / BLOCK).next_multiple_of(8);
    for (r, row) in x.chunks_exact(k).enumerate() {
        for (b, blk) in row.chunks_exact(BLOCK).enumerate() {
            // Fixed-width lanes so that the compiler vectorizes the max and the sum.
            let mut mx = [0f32; 8];
            for c in blk.chunks_exact(8) {
                for l in 0..8 {
                    mx[l] = mx[l].max(c[l].abs());
                }
            }
            let amax = mx.iter().fold(0f32, |a, &v| a.max(v));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let codes = &mut qs[r * k + b * BLOCK..r * k + (b + 1) * BLOCK];
            let mut sum = [0i32; 8];
            for (c, v) in codes.chunks_exact_mut(8).zip(blk.chunks_exact(8)) {
                for l in 0..8 {
                    let q = (v[l] * inv).round_ties_even() as i32;
                    c[l] = q as i8;
                    sum[l] += q;
                }
            }
            d[r * kbp + b] = scale;
            s[r * kbp + b] = scale * sum.iter().sum::<i32>() as f32;
        }
    }
}

/// Which kernel this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust.
    Scalar,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-VNNI (256-bit VNNI without AVX-512).
    AvxVnni,
    /// AVX-512 VNNI on 256-bit registers (32 of them).
    Avx512Vnni,
}

/// The best kernel this CPU supports (`ANNEAL_KERNEL_ISA=scalar|avx2|avxvnni` lowers it).
pub fn detect() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let best = best_isa();
        match std::env::var("ANNEAL_KERNEL_ISA").as_deref() {
            Ok("scalar") => Isa::Scalar,
            Ok("avx2") if best != Isa::Scalar => Isa::Avx2,
            Ok("avxvnni") if matches!(best, Isa::AvxVnni | Isa::Avx512Vnni) => {
                if avx_vnni() {
                    Isa::AvxVnni
                } else {
                    best
                }
            }
            _ => best,
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn avx_vnni() -> bool {
    std::arch::is_x86_feature_detected!("avxvnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx_vnni() -> bool {
    false
}

fn best_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") {
            if has!("avx512vnni") && has!("avx512vl") && has!("avx512f") {
                return Isa::Avx512Vnni;
            }
            if has!("avxvnni") {
                return Isa::AvxVnni;
            }
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// `out` (rows, n) = `a` (rows, k) times `w` (n, k) transposed, on the pool's threads.
pub fn matmul(w: &QMatrix, a: &QActs, out: &mut [f32], pool: &Pool) {
    matmul_with(w, a, out, pool, detect());
}

/// A raw output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements of one live buffer.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// [`matmul`] with a chosen kernel (tests compare them).
pub fn matmul_with(w: &QMatrix, a: &QActs, out: &mut [f32], pool: &Pool, isa: Isa) {
    assert_eq!(w.k, a.k, "matmul: widths differ");
    assert_eq!(out.len(), a.rows * w.n, "matmul: output size");
    let tiles = w.n.div_ceil(NR);
    let tasks = tiles.min(pool.threads() * 8).max(1);
    let per = tiles.div_ceil(tasks);
    let tasks = tiles.div_ceil(per);
    let ptr = OutPtr(out.as_mut_ptr());
    pool.run(tasks, |t| {
        // The whole wrapper (Sync), not its raw pointer field, is captured.
        let out = &ptr;
        let (t0, t1) = (t * per, ((t + 1) * per).min(tiles));
        for tile in t0..t1 {
            // SAFETY: the tile's columns are written by this task alone, inside `out`.
            unsafe { run_tile(w, a, tile * NR, out.0, isa) };
        }
    });
}

/// Computes columns `j..j + NR` (those below `n`) of every output row.
///
/// # Safety
/// `out` points to a live (a.rows, w.n) buffer; `j + NR` is within the padded rows of `w`.
unsafe fn run_tile(w: &QMatrix, a: &QActs, j: usize, out: *mut f32, isa: Isa) {
    let mut r = 0;
    while r < a.rows {
        let mr = (a.rows - r).min(MR);
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Scalar {
            // SAFETY: the ISA was detected on this CPU; bounds as documented above.
            unsafe { x86::tile(isa, w, a, j, r, mr, out) };
            r += mr;
            continue;
        }
        let _ = isa;
        for c in r..r + mr {
            for i in j..(j + NR).min(w.n) {
                // SAFETY: (c, i) is inside the (a.rows, w.n) buffer.
                unsafe { *out.add(c * w.n + i) = dot_scalar(w, i, a, c) };
            }
        }
        r += mr;
    }
}

/// The reference: weight row `j` times activation row `r`.
pub fn dot_scalar(w: &QMatrix, j: usize, a: &QActs, r: usize) -> f32 {
    let mut acc = 0f32;
    for b in 0..w.kb {
        let codes = &a.qs[r * a.k + b * BLOCK..r * a.k + (b + 1) * BLOCK];
        let dot: i32 = codes
            .iter()
            .enumerate()
            .map(|(t, &q)| w.code(j, b, t) as i32 * q as i32)
            .sum();
        acc += w.d[j * w.kbp + b] * a.d[r * a.kbp + b] * dot as f32
            + w.m[j * w.kbp + b] * a.s[r * a.kbp + b];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD tiles. One macro writes the tile for each instruction set so that the dot
    //! product instruction is inlined into a function compiled for that set.
    use super::{Format, Isa, NR, QActs, QMatrix};
    use std::arch::x86_64::*;

    macro_rules! tile_fn {
        ($name:ident, $feat:literal, |$acc:ident, $w:ident, $a:ident| q4: $dot4:expr, q8: $dot8:expr) => {
            /// # Safety
            /// The CPU has the features named; see `run_tile`.
            #[target_feature(enable = $feat)]
            unsafe fn $name<const M: usize, const Q4: bool>(
                w: &QMatrix,
                a: &QActs,
                j: usize,
                r0: usize,
                out: *mut f32,
            ) {
                // SAFETY: every pointer below stays inside the matrices: rows j..j + NR exist
                // (padded), rows r0..r0 + M of `a` exist, blocks < kb, offsets < kbp.
                unsafe {
                    let (kb, kbp, k, rb) = (w.kb, w.kbp, w.k, w.row_bytes);
                    let mut acc = [[_mm256_setzero_ps(); M]; NR];
                    let low = _mm256_set1_epi8(0x0F);
                    let (wq, aq) = (w.qs.as_ptr(), a.qs.as_ptr());
                    let (wd, ad) = (w.d.as_ptr(), a.d.as_ptr());
                    if r0 == 0 {
                        // The next tile's weights: streamed from memory once per product,
                        // so their loads would otherwise wait on DRAM latency.
                        prefetch(wq.wrapping_add((j + NR) * rb), NR * rb);
                        prefetch(wd.wrapping_add((j + NR) * kbp).cast(), NR * kbp * 4);
                        prefetch(
                            w.m.as_ptr().wrapping_add((j + NR) * kbp).cast(),
                            NR * kbp * 4,
                        );
                    }
                    for b in 0..kb {
                        let mut wv = [_mm256_setzero_si256(); NR];
                        let mut bw = [_mm256_setzero_ps(); NR];
                        for i in 0..NR {
                            let row = wq.add((j + i) * rb);
                            wv[i] = if Q4 {
                                let x = _mm_loadu_si128(row.add(b * 16) as *const __m128i);
                                _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(x, 4), x), low)
                            } else {
                                _mm256_loadu_si256(row.add(b * 32) as *const __m256i)
                            };
                            bw[i] = _mm256_set1_ps(*wd.add((j + i) * kbp + b));
                        }
                        for c in 0..M {
                            let av =
                                _mm256_loadu_si256(aq.add((r0 + c) * k + b * 32) as *const __m256i);
                            let ba = _mm256_set1_ps(*ad.add((r0 + c) * kbp + b));
                            for i in 0..NR {
                                let ($acc, $w, $a) = (_mm256_setzero_si256(), wv[i], av);
                                let dot = if Q4 { $dot4 } else { $dot8 };
                                acc[i][c] = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(dot),
                                    _mm256_mul_ps(bw[i], ba),
                                    acc[i][c],
                                );
                            }
                        }
                    }
                    // Offsets: m * sa summed over blocks, 8 blocks at a time (zero padded).
                    let (wm, as_) = (w.m.as_ptr(), a.s.as_ptr());
                    for ch in (0..kbp).step_by(8) {
                        for i in 0..NR {
                            let mv = _mm256_loadu_ps(wm.add((j + i) * kbp + ch));
                            for c in 0..M {
                                let sv = _mm256_loadu_ps(as_.add((r0 + c) * kbp + ch));
                                acc[i][c] = _mm256_fmadd_ps(mv, sv, acc[i][c]);
                            }
                        }
                    }
                    for i in 0..NR {
                        if j + i < w.n {
                            for c in 0..M {
                                *out.add((r0 + c) * w.n + j + i) = hsum(acc[i][c]);
                            }
                        }
                    }
                }
            }
        };
    }

    /// Prefetches `len` bytes from `p` into the caches (a hint: no access, no fault).
    #[inline(always)]
    fn prefetch(p: *const u8, len: usize) {
        for off in (0..len).step_by(64) {
            // SAFETY: prefetching has no memory effects, even for addresses past the buffer.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast()) };
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: AVX is implied by every caller's features.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }

    tile_fn!(tile_avx512vnni, "avx2,fma,avx512f,avx512vl,avx512vnni",
        |z, w, a| q4: _mm256_dpbusd_epi32(z, w, a), q8: _mm256_dpbusd_epi32(z, w, a));
    tile_fn!(tile_avxvnni, "avx2,fma,avxvnni",
        |z, w, a| q4: _mm256_dpbusd_avx_epi32(z, w, a), q8: _mm256_dpbusd_avx_epi32(z, w, a));
    // AVX2: u8 x i8 pairs summed to i16 (4-bit codes: |15 * 127 * 2| fits), then to i32; 8-bit
    // codes would overflow i16, so they are widened first.
    tile_fn!(tile_avx2, "avx2,fma",
        |z, w, a| q4: _mm256_add_epi32(z, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))),
        q8: _mm256_add_epi32(
            _mm256_madd_epi16(
                _mm256_cvtepu8_epi16(_mm256_castsi256_si128(w)),
                _mm256_cvtepi8_epi16(_mm256_castsi256_si128(a))),
            _mm256_madd_epi16(
                _mm256_cvtepu8_epi16(_mm256_extracti128_si256(w, 1)),
                _mm256_cvtepi8_epi16(_mm256_extracti128_si256(a, 1)))));

    type TileFn = unsafe fn(&QMatrix, &QActs, usize, usize, *mut f32);

    macro_rules! pick {
        ($f:ident, $q4:expr, $m:expr) => {
            match ($q4, $m) {
                (true, 1) => $f::<1, true> as TileFn,
                (true, 2) => $f::<2, true>,
                (true, 3) => $f::<3, true>,
                (true, _) => $f::<4, true>,
                (false, 1) => $f::<1, false>,
                (false, 2) => $f::<2, false>,
                (false, 3) => $f::<3, false>,
                (false, _) => $f::<4, false>,
            }
        };
    }

    /// Runs one tile of `m` (1..=4) activation rows with `isa`'s kernel.
    ///
    /// # Safety
    /// `isa` is supported by this CPU (not `Scalar`); see `run_tile` for the bounds.
    pub(super) unsafe fn tile(
        isa: Isa,
        w: &QMatrix,
        a: &QActs,
        j: usize,
        r0: usize,
        m: usize,
        out: *mut f32,
    ) {
        let q4 = w.format == Format::Q4;
        let f = match isa {
            Isa::Avx512Vnni => pick!(tile_avx512vnni, q4, m),
            Isa::AvxVnni => pick!(tile_avxvnni, q4, m),
            Isa::Avx2 | Isa::Scalar => pick!(tile_avx2, q4, m),
        };
        // SAFETY: forwarded from the caller.
        unsafe { f(w, a, j, r0, out) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn f16_bits(v: f32) -> [u8; 2] {
        // Values used here are exact in f16 (multiples of 1/1024 in a small range).
        let bits = v.to_bits();
        let sign = ((bits >> 16) & 0x8000) as u16;
        if v == 0.0 {
            return sign.to_le_bytes();
        }
        let exp = ((bits >> 23) & 0xFF) as i32 - 127 + 15;
        let frac = ((bits >> 13) & 0x3FF) as u16;
        (sign | ((exp as u16) << 10) | frac).to_le_bytes()
    }

    /// Random GGUF blocks of `rows` x `k` in `ty`.
    fn blocks(ty: &str, rows: usize, k: usize, seed: u64) -> Vec<u8> {
        let v = values(rows * k * 2, seed);
        let mut out = Vec::new();
        for (i, chunk) in v.chunks_exact(64).take(rows * k / 32).enumerate() {
            let d = (1 + i % 7) as f32 / 1024.0;
            out.extend(f16_bits(d));
            if ty == "q4_1" {
                out.extend(f16_bits(-((i % 5) as f32) / 64.0));
                out.extend(chunk[..16].iter().map(|x| ((x + 1.0) * 127.9) as u8));
            } else {
                out.extend(chunk[..32].iter().map(|x| (x * 127.0) as i8 as u8));
            }
        }
        out
    }

    fn check(ty: &str, n: usize, k: usize, rows: usize) {
        let bytes = blocks(ty, n, k, n as u64 * 31 + k as u64);
        let split = n / 3;
        let w = QMatrix::from_ggml(
            ty,
            &[
                (&bytes[..bytes.len() / n * split], split),
                (&bytes[bytes.len() / n * split..], n - split),
            ],
            k,
        )
        .unwrap();
        let mut a = QActs::default();
        let pool = Pool::new(2, Duration::from_micros(20));
        a.quantize(&values(rows * k, rows as u64 + 7), k, &pool);
        let reference: Vec<f32> = (0..rows)
            .flat_map(|r| (0..n).map(move |j| (r, j)))
            .map(|(r, j)| dot_scalar(&w, j, &a, r))
            .collect();
        // The reference against plain f32 arithmetic on the dequantized values.
        let mut wrow = vec![0f32; k];
        for j in 0..n {
            w.dequantize_row(j, &mut wrow);
            for r in 0..rows {
                let x: f32 = (0..k)
                    .map(|t| {
                        let b = t / 32;
                        wrow[t] * a.d[r * a.kbp + b] * a.qs[r * k + t] as f32
                    })
                    .sum();
                let y = reference[r * n + j];
                assert!(
                    (x - y).abs() <= 1e-3 * (1.0 + x.abs()),
                    "{ty} ({r}, {j}): {x} vs {y}"
                );
            }
        }
        for isa in [Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni] {
            let supported = match isa {
                Isa::Scalar => true,
                Isa::Avx2 => best_isa() != Isa::Scalar,
                Isa::AvxVnni => avx_vnni(),
                Isa::Avx512Vnni => best_isa() == Isa::Avx512Vnni,
            };
            if !supported {
                continue;
            }
            let mut out = vec![f32::NAN; rows * n];
            matmul_with(&w, &a, &mut out, &pool, isa);
            for (i, (x, y)) in out.iter().zip(&reference).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                    "{ty} {isa:?} n={n} k={k} rows={rows} [{i}]: {x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn simd_kernels_match_the_scalar_reference() {
        for ty in ["q4_1", "q8_0"] {
            for (n, k) in [(4, 32), (7, 64), (13, 576), (40, 1536), (6, 288)] {
                for rows in [1, 2, 3, 4, 5, 9, 17] {
                    check(ty, n, k, rows);
                }
            }
        }
    }

    #[test]
    fn f16_conversion() {
        for (bits, v) in [
            (0x3C00u16, 1.0f32),
            (0xC000, -2.0),
            (0x0001, 5.960_464_5e-8),
            (0x7BFF, 65504.0),
            (0, 0.0),
        ] {
            assert_eq!(f16_to_f32(bits), v);
        }
    }

    #[test]
    fn activation_codes_round_trip() {
        let x = values(3 * 64, 3);
        let mut a = QActs::default();
        a.quantize(&x, 64, &Pool::new(1, Duration::ZERO));
        for (i, v) in x.iter().enumerate() {
            let (r, b) = (i / 64, (i % 64) / 32);
            let back = a.d[r * a.kbp + b] * a.qs[i] as f32;
            assert!((back - v).abs() <= a.d[r * a.kbp + b] * 0.5 + 1e-7);
        }
    }
}
