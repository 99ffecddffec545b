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
//! The weights are repacked at load so that one 32-byte vector holds 4 consecutive codes of
//! each of 8 rows: a VNNI instruction against 4 activation codes broadcast to every lane
//! advances the dot products of 8 output rows at once, and after the 8 steps of a block each
//! lane holds its row's block sum, ready to be scaled with no horizontal sums (the layout of
//! llama.cpp's repacked CPU kernels). A tile is 8 weight rows by up to 4 activation rows; the
//! next tile's weights are prefetched while one is computed. A scalar reference computes the
//! same sums.

use super::super::pool::Pool;

/// How weight codes are packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// 4-bit codes: per group of 8 rows and block, 4 vectors of 32 bytes whose low nibbles
    /// are steps 0-3 and high nibbles steps 4-7.
    Q4,
    /// 8-bit unsigned codes: 8 vectors of 32 bytes per group and block.
    Q8,
}

/// Values per block.
pub const BLOCK: usize = 32;
/// Weight rows per group (one output lane each).
const NR: usize = 8;
/// Largest number of activation rows per SIMD tile.
const MR: usize = 4;

/// A quantized (n, k) weight matrix in the kernels' layout.
#[derive(Debug, Clone)]
pub struct QMatrix {
    format: Format,
    n: usize,
    k: usize,
    kb: usize,
    /// Bytes of one group's block: 8 rows x 32 codes.
    group_bytes: usize,
    /// Codes by (group, block), `n` rounded up to [`NR`] rows (zero rows at the end).
    qs: Vec<u8>,
    /// Scales by (group, block, row in group), f16 bits as GGUF stores them (half the bytes
    /// of f32, and exact: the tiles widen them with F16C).
    d: Vec<u16>,
    /// Offsets, laid out like `d`.
    m: Vec<u16>,
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

/// The f16 bits of `v`, when `v` is exactly an f16 value (the offsets of Q8_0 blocks, `-128 d`
/// of an f16 `d`, always are unless they overflow).
fn f32_to_f16_exact(v: f32) -> Option<u16> {
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let a = v.abs();
    let half = if a == 0.0 {
        sign
    } else if a >= f32::from_bits(0x3880_0000) {
        // Normal in f16 (>= 2^-14): rebias the exponent, keep the top 10 mantissa bits.
        let exp = ((a.to_bits() >> 23) as i32) - 127 + 15;
        if exp >= 0x1F {
            return None;
        }
        sign | ((exp as u16) << 10) | ((a.to_bits() >> 13) & 0x3FF) as u16
    } else {
        // Subnormal in f16: a multiple of 2^-24 below 2^-14.
        let frac = a * (1u32 << 24) as f32;
        if frac.fract() != 0.0 {
            return None;
        }
        sign | frac as u16
    };
    (f16_to_f32(half) == v).then_some(half)
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
        let n: usize = parts.iter().map(|p| p.1).sum();
        let groups = n.div_ceil(NR);
        let group_bytes = match format {
            Format::Q4 => NR * BLOCK / 2,
            Format::Q8 => NR * BLOCK,
        };
        let mut w = Self {
            format,
            n,
            k,
            kb,
            group_bytes,
            qs: vec![0; groups * kb * group_bytes],
            d: vec![0; groups * kb * NR],
            m: vec![0; groups * kb * NR],
        };
        let mut row = 0;
        let mut codes = [0u8; BLOCK];
        for &(bytes, rows) in parts {
            if bytes.len() != rows * kb * block_bytes {
                return Err(FormatError(format!(
                    "{} bytes for {rows} rows of {k} ({ggml_type})",
                    bytes.len()
                )));
            }
            for (i, blk) in bytes.chunks_exact(block_bytes).enumerate() {
                let (r, b) = (row + i / kb, i % kb);
                let d = u16::from_le_bytes([blk[0], blk[1]]);
                let m = match format {
                    Format::Q4 => {
                        for t in 0..16 {
                            codes[t] = blk[4 + t] & 0x0F;
                            codes[t + 16] = blk[4 + t] >> 4;
                        }
                        u16::from_le_bytes([blk[2], blk[3]])
                    }
                    Format::Q8 => {
                        for (c, &q) in codes.iter_mut().zip(&blk[2..34]) {
                            *c = (q as i8 as i16 + 128) as u8;
                        }
                        f32_to_f16_exact(-128.0 * f16_to_f32(d)).ok_or_else(|| {
                            FormatError(format!("row {r} block {b}: scale out of range"))
                        })?
                    }
                };
                let at = w.scale_index(r, b);
                w.d[at] = d;
                w.m[at] = m;
                for (t, &c) in codes.iter().enumerate() {
                    let (idx, high) = w.code_index(r, b, t);
                    w.qs[idx] |= if high { c << 4 } else { c };
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

    /// Bytes a product reads from memory: codes, scales and offsets as stored here.
    pub fn size_in_bytes(&self) -> usize {
        self.qs.len() + 2 * (self.d.len() + self.m.len())
    }

    fn scale_index(&self, j: usize, b: usize) -> usize {
        ((j / NR) * self.kb + b) * NR + j % NR
    }

    /// The byte holding value `t` of block `b` of row `j`, and whether it is the high nibble.
    fn code_index(&self, j: usize, b: usize, t: usize) -> (usize, bool) {
        let base = ((j / NR) * self.kb + b) * self.group_bytes;
        let (step, lane_byte) = (t / 4, 4 * (j % NR) + t % 4);
        match self.format {
            Format::Q4 => (base + (step % 4) * 32 + lane_byte, step >= 4),
            Format::Q8 => (base + step * 32 + lane_byte, false),
        }
    }

    /// The code of value `t` of block `b` of row `j`.
    fn code(&self, j: usize, b: usize, t: usize) -> u8 {
        let (idx, high) = self.code_index(j, b, t);
        if high {
            self.qs[idx] >> 4
        } else if self.format == Format::Q4 {
            self.qs[idx] & 0x0F
        } else {
            self.qs[idx]
        }
    }

    /// Row `j` as f32 values (an embedding lookup from a tied output matrix).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        for (b, chunk) in out[..self.k].chunks_exact_mut(BLOCK).enumerate() {
            let at = self.scale_index(j, b);
            let (d, m) = (f16_to_f32(self.d[at]), f16_to_f32(self.m[at]));
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
        // Serial work here would leave the other threads spinning: a batch of rows is split.
        if rows < 2 || pool.threads() == 1 {
            quantize_rows(x, &mut self.qs, &mut self.d, &mut self.s, k);
            return;
        }
        let per = rows.div_ceil(2 * pool.threads()).clamp(1, 16);
        let parts: Vec<_> = x
            .chunks(per * k)
            .zip(self.qs.chunks_mut(per * k))
            .zip(self.d.chunks_mut(per * kbp))
            .zip(self.s.chunks_mut(per * kbp))
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
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected on this CPU.
        unsafe { x86::quantize_rows_avx2(x, qs, d, s, k) };
        return;
    }
    quantize_rows_scalar(x, qs, d, s, k);
}

/// [`quantize_rows`] in portable Rust: the reference the SIMD version is tested against.
fn quantize_rows_scalar(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32], k: usize) {
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
        if has!("avx2") && has!("fma") && has!("f16c") {
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
    let groups = w.n.div_ceil(NR);
    // A few tasks per thread: enough to even out a thread that starts late, few enough that
    // each streams long runs of weights (same-run A/B, SmolLM2 decode on 2 threads: 4 per thread
    // 208-217 tok/s against 8 per thread 184-203; 32 per thread was slower still).
    let tasks = groups.min(pool.threads() * 4).max(1);
    let per = groups.div_ceil(tasks);
    let tasks = groups.div_ceil(per);
    let ptr = OutPtr(out.as_mut_ptr());
    pool.run(tasks, |t| {
        // The whole wrapper (Sync), not its raw pointer field, is captured.
        let out = &ptr;
        let (g0, g1) = (t * per, ((t + 1) * per).min(groups));
        for g in g0..g1 {
            // SAFETY: the group's columns are written by this task alone, inside `out`.
            unsafe { run_group(w, a, g, out.0, isa) };
        }
    });
}

/// Computes columns `8g..8g + 8` (those below `n`) of every output row.
///
/// # Safety
/// `out` points to a live (a.rows, w.n) buffer; `g` is a group of `w`.
unsafe fn run_group(w: &QMatrix, a: &QActs, g: usize, out: *mut f32, isa: Isa) {
    let mut r = 0;
    while r < a.rows {
        let mr = (a.rows - r).min(MR);
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Scalar {
            // SAFETY: the ISA was detected on this CPU; bounds as documented above.
            unsafe { x86::tile(isa, w, a, g, r, mr, out) };
            r += mr;
            continue;
        }
        let _ = isa;
        for c in r..r + mr {
            for j in g * NR..(g * NR + NR).min(w.n) {
                // SAFETY: (c, j) is inside the (a.rows, w.n) buffer.
                unsafe { *out.add(c * w.n + j) = dot_scalar(w, j, a, c) };
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
        let at = w.scale_index(j, b);
        let (d, m) = (f16_to_f32(w.d[at]), f16_to_f32(w.m[at]));
        acc += d * a.d[r * a.kbp + b] * dot as f32 + m * a.s[r * a.kbp + b];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD tiles. One macro writes the tile for each instruction set so that the dot
    //! product instruction is inlined into a function compiled for that set.
    use super::{BLOCK, Format, Isa, NR, QActs, QMatrix};
    use std::arch::x86_64::*;

    macro_rules! tile_fn {
        ($name:ident, $feat:literal, $offset_q8:expr,
         |$acc:ident, $w:ident, $a:ident| q4: $dot4:expr, q8: $dot8:expr) => {
            /// # Safety
            /// The CPU has the features named; see `run_group`.
            #[target_feature(enable = $feat)]
            unsafe fn $name<const M: usize, const Q4: bool>(
                w: &QMatrix,
                a: &QActs,
                g: usize,
                r0: usize,
                out: *mut f32,
            ) {
                // SAFETY: every pointer below stays inside the matrices: group g and its
                // blocks exist, rows r0..r0 + M of `a` exist, blocks < kb.
                unsafe {
                    let (kb, k, gb) = (w.kb, w.k, w.group_bytes);
                    let mut acc = [_mm256_setzero_ps(); M];
                    let low = _mm256_set1_epi8(0x0F);
                    let wq = w.qs.as_ptr().add(g * kb * gb);
                    let (wd, wm) = (w.d.as_ptr().add(g * kb * NR), w.m.as_ptr().add(g * kb * NR));
                    let (aq, ad, as_) = (a.qs.as_ptr(), a.d.as_ptr(), a.s.as_ptr());
                    if r0 == 0 {
                        // The next group's weights: streamed from memory once per product,
                        // so their loads would otherwise wait on DRAM latency.
                        prefetch(wq.wrapping_add(kb * gb), kb * gb);
                        prefetch(wd.wrapping_add(kb * NR).cast(), kb * NR * 2);
                        prefetch(wm.wrapping_add(kb * NR).cast(), kb * NR * 2);
                    }
                    for b in 0..kb {
                        let base = wq.add(b * gb);
                        let mut ws = [_mm256_setzero_si256(); 8];
                        if Q4 {
                            for t in 0..4 {
                                let v = _mm256_loadu_si256(base.add(32 * t) as *const __m256i);
                                ws[t] = _mm256_and_si256(v, low);
                                ws[t + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                            }
                        } else {
                            for (t, x) in ws.iter_mut().enumerate() {
                                *x = _mm256_loadu_si256(base.add(32 * t) as *const __m256i);
                            }
                        }
                        let d8 = _mm256_cvtph_ps(_mm_loadu_si128(wd.add(b * NR).cast()));
                        let m8 = _mm256_cvtph_ps(_mm_loadu_si128(wm.add(b * NR).cast()));
                        for c in 0..M {
                            let ap = aq.add((r0 + c) * k + b * BLOCK) as *const i32;
                            // Two chains of integer sums (one is latency-bound).
                            let mut sums = [_mm256_setzero_si256(); 2];
                            for s in 0..8 {
                                let ($acc, $w, $a) = (
                                    sums[s % 2],
                                    ws[s],
                                    _mm256_set1_epi32(ap.add(s).read_unaligned()),
                                );
                                sums[s % 2] = if Q4 { $dot4 } else { $dot8 };
                            }
                            let dot = _mm256_cvtepi32_ps(_mm256_add_epi32(sums[0], sums[1]));
                            let at = (r0 + c) * a.kbp + b;
                            let scale = _mm256_mul_ps(d8, _mm256_set1_ps(*ad.add(at)));
                            acc[c] = _mm256_fmadd_ps(dot, scale, acc[c]);
                            if Q4 || $offset_q8 {
                                acc[c] = _mm256_fmadd_ps(m8, _mm256_set1_ps(*as_.add(at)), acc[c]);
                            }
                        }
                    }
                    let lanes = (w.n - g * NR).min(NR);
                    for (c, v) in acc.iter().enumerate() {
                        let dst = out.add((r0 + c) * w.n + g * NR);
                        if lanes == NR {
                            _mm256_storeu_ps(dst, *v);
                        } else {
                            let mut tmp = [0f32; NR];
                            _mm256_storeu_ps(tmp.as_mut_ptr(), *v);
                            std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, lanes);
                        }
                    }
                }
            }
        };
    }

    /// [`super::quantize_rows`] with AVX2: the same codes, scales and sums bit for bit (the
    /// conversion rounds to nearest even, as `round_ties_even` does; maxima and integer sums do
    /// not depend on their order).
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_rows_avx2(
        x: &[f32],
        qs: &mut [i8],
        d: &mut [f32],
        s: &mut [f32],
        k: usize,
    ) {
        let kbp = (k / BLOCK).next_multiple_of(8);
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        // packs_epi32 then packs_epi16 interleave the 128-bit lanes: this puts them back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (r, row) in x.chunks_exact(k).enumerate() {
            for (b, blk) in row.chunks_exact(BLOCK).enumerate() {
                // SAFETY: `blk` holds 32 values, read as 4 vectors of 8.
                let v: [__m256; 4] =
                    std::array::from_fn(|i| unsafe { _mm256_loadu_ps(blk.as_ptr().add(8 * i)) });
                let m = _mm256_max_ps(
                    _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                    _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
                );
                let mut lanes = [0f32; 8];
                // SAFETY: 8 f32 fit `lanes`.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
                let amax = lanes.iter().fold(0f32, |a, &l| a.max(l));
                let scale = amax / 127.0;
                let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
                let q: [__m256i; 4] =
                    std::array::from_fn(|i| _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)));
                let sum =
                    _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                let mut sums = [0i32; 8];
                // SAFETY: 8 i32 fit `sums`.
                unsafe { _mm256_storeu_si256(sums.as_mut_ptr().cast(), sum) };
                let packed = _mm256_packs_epi16(
                    _mm256_packs_epi32(q[0], q[1]),
                    _mm256_packs_epi32(q[2], q[3]),
                );
                let codes = _mm256_permutevar8x32_epi32(packed, order);
                let at = r * k + b * BLOCK;
                // SAFETY: 32 codes of this block are inside `qs`.
                unsafe { _mm256_storeu_si256(qs.as_mut_ptr().add(at).cast(), codes) };
                d[r * kbp + b] = scale;
                s[r * kbp + b] = scale * sums.iter().sum::<i32>() as f32;
            }
        }
    }

    /// Prefetches `len` bytes from `p` into the caches (a hint: no access, no fault).
    #[inline(always)]
    fn prefetch(p: *const u8, len: usize) {
        for off in (0..len).step_by(64) {
            // SAFETY: prefetching has no memory effects, even for addresses past the buffer.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast()) };
        }
    }

    tile_fn!(tile_avx512vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", true,
        |z, w, a| q4: _mm256_dpbusd_epi32(z, w, a), q8: _mm256_dpbusd_epi32(z, w, a));
    tile_fn!(tile_avxvnni, "avx2,fma,f16c,avxvnni", true,
        |z, w, a| q4: _mm256_dpbusd_avx_epi32(z, w, a), q8: _mm256_dpbusd_avx_epi32(z, w, a));
    // AVX2: u8 x i8 pairs summed to i16, then to i32. 4-bit codes fit (|15 * 127 * 2|); 8-bit
    // codes would overflow i16, so they go back to signed values (q = code - 128) and use
    // |q| x sign(a, q); the sums are then of q itself, so the -128 offset is not added.
    tile_fn!(tile_avx2, "avx2,fma,f16c", false,
    |z, w, a| q4: _mm256_add_epi32(z, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))),
    q8: {
        let q = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
        _mm256_add_epi32(z, _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(a, q)),
            _mm256_set1_epi16(1)))
    });

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

    /// Runs one tile of `m` (1..=4) activation rows against group `g` with `isa`'s kernel.
    ///
    /// # Safety
    /// `isa` is supported by this CPU (not `Scalar`); see `run_group` for the bounds.
    pub(super) unsafe fn tile(
        isa: Isa,
        w: &QMatrix,
        a: &QActs,
        g: usize,
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
        unsafe { f(w, a, g, r0, out) }
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
        // Every finite f16 goes back to its own bits (-0 to itself too); what f16 cannot hold
        // exactly is refused.
        for bits in 0..=u16::MAX {
            let v = f16_to_f32(bits);
            if v.is_finite() {
                assert_eq!(f32_to_f16_exact(v), Some(bits), "{bits:#06x} ({v})");
            }
        }
        assert_eq!(f32_to_f16_exact(1.0 + f32::EPSILON), None);
        assert_eq!(f32_to_f16_exact(65536.0), None);
        assert_eq!(f32_to_f16_exact(1e-9), None);
    }

    #[test]
    fn simd_quantization_is_the_scalar_one_bit_for_bit() {
        let k = 96;
        let mut x = values(5 * k, 11);
        // Ties (exactly half a step) and an all-zero block.
        x[3] = 0.5;
        x[4] = -0.5;
        x[k..k + BLOCK].fill(0.0);
        let kbp = (k / BLOCK).next_multiple_of(8);
        type Quantize = fn(&[f32], &mut [i8], &mut [f32], &mut [f32], usize);
        let run = |f: Quantize| {
            let (mut q, mut d, mut s) =
                (vec![0i8; x.len()], vec![0f32; 5 * kbp], vec![0f32; 5 * kbp]);
            f(&x, &mut q, &mut d, &mut s, k);
            (q, d, s)
        };
        let want = run(quantize_rows_scalar);
        let got = run(quantize_rows);
        assert_eq!(got.0, want.0);
        assert_eq!(
            got.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            got.2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
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
