//! The f32 matrix product behind the fused training kernels: `dst = lhs @ rhs` over strided
//! views, with AVX-512, AVX2 and portable micro-kernels that give the same bits.
//!
//! # Why the bits do not depend on the CPU
//!
//! Every output is one fused multiply-add chain over the inner dimension, in ascending order:
//!
//! ```text
//! s = if acc && beta == 1.0 { dst[i, j] } else { 0.0 }
//! for p in 0..k { s = fma(lhs[i, p], rhs[p, j], s) }
//! dst[i, j] = if beta == 1.0 { s } else { (if acc { dst[i, j] } else { 0.0 }) + beta * s }
//! ```
//!
//! (the last line rounds the product and the sum separately; with `k == 0`, `dst` is left as
//! it is with `acc` and zeroed without). A fused multiply-add rounds once, so each step has
//! exactly one correct result, whether a lane of a 16-wide `vfmadd231ps`, of an 8-wide one, or
//! `f32::mul_add` computes it. The kernels differ only in which outputs they compute side by
//! side, never in how one output is formed:
//!
//! - a tile of outputs keeps its chains in registers;
//! - when `k` is longer than one block, the next block continues each chain from the value the
//!   previous block stored in `dst`: partial sums of blocks are never added together;
//! - threads split the output into disjoint rectangles, never `k`.
//!
//! So a product has the same bits on every vector width, tile shape, block size and thread
//! count, and a training job that fails over between AVX-512 and AVX2 nodes resumes bitwise
//! (given the floating-point environment Rust guarantees: round to nearest, subnormals kept;
//! NaN payloads aside). The tests check it against a scalar loop.
//!
//! # How it is fast
//!
//! The layout follows BLIS. `rhs` is packed once per call, by all threads, into panels `NR`
//! columns wide (zero-padded) that hold the whole inner dimension; when `lhs` has few rows, as
//! in weight gradients, whole panels of a row-major `rhs` are read in place instead, since the
//! pass over `rhs` would cost a large share there. The output is then cut into one rectangle
//! per thread (rows, unless that leaves them unbalanced). A task walks its columns in groups
//! whose `rhs` fits in L2, the inner dimension in blocks of at most `KC`, and its rows in
//! blocks that it packs into `MR`-row micro-panels (rows stay rows when `lhs` is row-major and
//! columns stay columns when it is transposed, so both are plain copies). The micro-kernel
//! keeps an `MR` x `NR` tile of chains in registers and runs them over one block: per step,
//! one broadcast of `lhs` per row and one load of `rhs` per vector, with `rhs` fetched ahead;
//! the next tile of the output is fetched while it runs. `benches/sgemm.rs` measures it on the
//! training step's shapes against the `gemm` crate.

use std::cell::Cell;
use std::ops::Range;
use std::sync::OnceLock;

use super::super::{SharedOut, pool};
use super::Mat;

/// Longest block of the inner dimension one packed `lhs` micro-panel holds.
const KC: usize = 384;
/// Bytes of packed `rhs` one `lhs` micro-panel sweeps before the next (they stay in L2).
const RHS_BLOCK_BYTES: usize = 1 << 20;
/// Bytes of `lhs` a task packs at a time (read row by row of the source, so a transposed `lhs`
/// is read in long runs).
const LHS_BLOCK_BYTES: usize = 192 << 10;
/// Most rows of any kernel's tile.
const MAX_MR: usize = 12;
/// Most columns of any kernel's tile.
const MAX_NR: usize = 32;
/// Products with fewer multiply-adds than this run on the calling thread.
const PAR_MIN: usize = 1 << 20;
/// Products with fewer rows than this read a row-major `rhs` in place (see [`drive`]).
const IN_PLACE_ROWS: usize = 1024;
/// Source rows ahead of the packing loops that they fetch.
const PACK_AHEAD: usize = 12;
/// Steps ahead of the kernel that the x86 ones fetch `rhs` (an L2 hit otherwise stalls them).
const PF: usize = 24;

/// An instruction set the product runs on. All give the same bits; they differ in speed only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F, 12 x 32 tiles.
    Avx512,
    /// AVX2 with FMA, 6 x 16 tiles.
    Avx2,
    /// `f32::mul_add`, 4 x 16 tiles: any CPU (slow where FMA is emulated).
    Portable,
}

impl Isa {
    /// Every instruction set, fastest first.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// Whether this CPU can run it.
    pub fn available(self) -> bool {
        match self {
            // AVX-512F implies AVX2 and FMA (which Rust's `avx512f` enables too, and the
            // packing code uses); checked anyway, against odd virtual CPUs.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f") && Isa::Avx2.available(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512 | Isa::Avx2 => false,
            Isa::Portable => true,
        }
    }

    /// The name `ANNEAL_SGEMM` uses for it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// The fastest one this CPU has, unless the environment variable `ANNEAL_SGEMM` names
    /// another one it has (for tests and benchmarks). Decided once per process.
    pub fn selected() -> Isa {
        static SELECTED: OnceLock<Isa> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let best = Isa::ALL
                .into_iter()
                .find(|i| i.available())
                .unwrap_or(Isa::Portable);
            let Ok(name) = std::env::var("ANNEAL_SGEMM") else {
                return best;
            };
            match Isa::ALL.into_iter().find(|i| i.name() == name) {
                Some(isa) if isa.available() => isa,
                _ => {
                    tracing::warn!(
                        "ANNEAL_SGEMM={name} is unknown or not supported here; using {}",
                        best.name()
                    );
                    best
                }
            }
        })
    }

    /// `dst = (acc ? dst : 0) + beta * lhs @ rhs` on the calling thread, with the bits the
    /// module documentation defines; `dst` is row-major with row stride `dst_rs`.
    ///
    /// # Panics
    /// When the shapes disagree, a view or `dst` is too short for its shape, rows of `dst`
    /// overlap, or this CPU lacks the instruction set.
    pub fn matmul(self, dst: &mut [f32], dst_rs: usize, acc: bool, lhs: Mat, rhs: Mat, beta: f32) {
        self.run(1, dst, dst_rs, acc, lhs, rhs, beta);
    }

    /// [`Isa::matmul`] split over the threads of the calling thread's [`pool`], with the same bits.
    pub fn matmul_par(
        self,
        dst: &mut [f32],
        dst_rs: usize,
        acc: bool,
        lhs: Mat,
        rhs: Mat,
        beta: f32,
    ) {
        self.run(pool::threads(), dst, dst_rs, acc, lhs, rhs, beta);
    }

    /// Checks everything the kernels rely on, so that callers stay safe.
    #[allow(clippy::too_many_arguments)]
    fn run(
        self,
        threads: usize,
        dst: &mut [f32],
        dst_rs: usize,
        acc: bool,
        lhs: Mat,
        rhs: Mat,
        beta: f32,
    ) {
        let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
        assert_eq!(rhs.rows, k, "sgemm: inner dimensions differ");
        if m == 0 || n == 0 {
            return;
        }
        assert!(m == 1 || dst_rs >= n, "sgemm: rows of dst overlap");
        let end = (m - 1).checked_mul(dst_rs).and_then(|e| e.checked_add(n));
        assert!(end.is_some_and(|e| e <= dst.len()), "sgemm: dst too short");
        lhs.check();
        rhs.check();
        assert!(self.available(), "sgemm: this CPU lacks {}", self.name());
        if k == 0 {
            if !acc {
                for r in 0..m {
                    dst[r * dst_rs..r * dst_rs + n].fill(0.0);
                }
            }
            return;
        }
        if beta != 1.0 && acc {
            // The chains start from zero, so the old values must survive them: a side buffer.
            // No caller needs this today; it is here so the function means what it says.
            let mut chain = vec![0f32; m * n];
            self.run(threads, &mut chain, n, false, lhs, rhs, 1.0);
            for (r, chain) in chain.chunks_exact(n).enumerate() {
                for (d, s) in dst[r * dst_rs..r * dst_rs + n].iter_mut().zip(chain) {
                    *d += beta * s;
                }
            }
            return;
        }
        let job = Job {
            m,
            n,
            k,
            lhs,
            dst: SharedOut::new(dst),
            dst_rs,
            load: acc,
            scale: (beta != 1.0).then_some(beta),
        };
        let small = m.saturating_mul(n).saturating_mul(k) < PAR_MIN;
        let threads = if small { 1 } else { threads };
        // SAFETY: the CPU has the instruction set (checked above), and `job` holds the
        // checked bounds.
        unsafe {
            match self {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => drive::<x86::Avx512>(threads, &job, rhs),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => drive::<x86::Avx2>(threads, &job, rhs),
                #[cfg(not(target_arch = "x86_64"))]
                Isa::Avx512 | Isa::Avx2 => unreachable!("checked available above"),
                Isa::Portable => drive::<Portable>(threads, &job, rhs),
            }
        }
    }
}

/// One product whose bounds [`Isa::run`] has checked.
struct Job<'a> {
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat<'a>,
    dst: SharedOut,
    dst_rs: usize,
    /// Whether the chains start from `dst` (else from zero).
    load: bool,
    /// `beta` when it is not 1: the chains start from zero and `dst = 0 + beta * chain`.
    scale: Option<f32>,
}

/// One call of a micro-kernel.
#[derive(Clone, Copy)]
struct Tile {
    /// Rows of the tile, `1..=MR`.
    rows: usize,
    /// Steps of the chains, `1..=KC`.
    kc: usize,
    /// The packed `lhs` micro-panel: `a[r * KC + p]` when `a_rows`, else `a[p * MR + r]`.
    a: *const f32,
    a_rows: bool,
    /// The `rhs` panel: `b[p * ldb + j]` (packed, `ldb == NR`, or `rhs` itself).
    b: *const f32,
    ldb: usize,
    /// The outputs: `c[r * ldc + j]` for `r < rows`, `j < NR`.
    c: *mut f32,
    ldc: usize,
    /// Whether the chains continue from `c` (else start from zero).
    load: bool,
    /// Whether only the first `NR / 2` columns are wanted (the last panel of a product whose
    /// width leaves few columns there): kernels may skip the others, leaving anything in them.
    half: bool,
}

/// A micro-kernel: continues `rows` x `NR` chains over `kc` steps.
trait Kernel {
    const MR: usize;
    const NR: usize;

    /// # Safety
    /// The CPU has the kernel's instruction set; `t.rows` is in `1..=MR` and `t.kc` in
    /// `1..=KC`; `t.a`, `t.b` and `t.c` are valid for the reads and writes [`Tile`] lists, and
    /// nothing else accesses the outputs meanwhile.
    unsafe fn tile(t: Tile);

    /// Packs columns `j0..j0 + w` of a transposed `rhs` (row stride 1) like [`pack_rhs`] with
    /// vector transposes, if the kernel has them (else returns false).
    ///
    /// # Safety
    /// The CPU has the kernel's instruction set.
    unsafe fn pack_transposed(_rhs: Mat, _j0: usize, _w: usize, _out: &mut [f32]) -> bool {
        false
    }
}

/// Strides (row, step) of a packed `lhs` micro-panel with `mr` rows.
const fn a_strides(a_rows: bool, mr: usize) -> (usize, usize) {
    if a_rows { (KC, 1) } else { (1, mr) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Kernel, Mat, PF, Tile, a_strides};

    /// Calls `$f::<rows, a_rows, vectors>` for the tile's row count, layout and width (each a
    /// separate kernel, so that the accumulators live in registers).
    macro_rules! by_rows {
        ($f:ident, $t:expr, $($m:literal)*) => {
            match ($t.rows, $t.a_rows, $t.half) {
                $(
                    ($m, true, false) => $f::<$m, true, 2>($t),
                    ($m, false, false) => $f::<$m, false, 2>($t),
                    ($m, true, true) => $f::<$m, true, 1>($t),
                    ($m, false, true) => $f::<$m, false, 1>($t),
                )*
                _ => unreachable!("tile rows out of range"),
            }
        };
    }

    /// `out[p * nr + j] = rhs[p, j0 + j]` for `p < k`, `j < w`, zero for `w <= j < nr`, where
    /// `rhs` is transposed (row stride 1): 8 x 8 blocks go through AVX transposes.
    ///
    /// # Safety
    /// The CPU has AVX.
    unsafe fn pack_transposed(rhs: Mat, j0: usize, w: usize, nr: usize, out: &mut [f32]) {
        let (k, cs) = (rhs.rows, rhs.cs);
        assert!(rhs.rs == 1 && j0 + w <= rhs.cols && w <= nr && out.len() >= k * nr);
        let at = |p: usize, j: usize| rhs.data[p + (j0 + j) * cs];
        let (k8, w8) = (k / 8 * 8, w / 8 * 8);
        for jb in (0..w8).step_by(8) {
            for pb in (0..k8).step_by(8) {
                // SAFETY: the CPU has AVX (caller). Reads elements (pb..pb + 8, j0 + jb..j0 +
                // jb + 8) of `rhs`, inside its checked view; writes `out[(pb + t) * nr + jb..]
                // [..8]`, inside `out` as asserted.
                unsafe {
                    transpose8(
                        rhs.data.as_ptr().add(pb + (j0 + jb) * cs),
                        cs,
                        out.as_mut_ptr().add(pb * nr + jb),
                        nr,
                    )
                };
            }
            for p in k8..k {
                for j in jb..jb + 8 {
                    out[p * nr + j] = at(p, j);
                }
            }
        }
        for p in 0..k {
            for j in w8..w {
                out[p * nr + j] = at(p, j);
            }
            out[p * nr + w..(p + 1) * nr].fill(0.0);
        }
    }

    /// Writes the transpose of the 8 x 8 block at `src` (row stride `lds`) to `dst` (row
    /// stride `ldd`).
    ///
    /// # Safety
    /// The CPU has AVX; both blocks are valid for 8 rows of 8.
    #[target_feature(enable = "avx")]
    unsafe fn transpose8(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
        // SAFETY: the rows are valid (caller).
        let r: [__m256; 8] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(src.add(i * lds)) });
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let o = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (i, o) in o.into_iter().enumerate() {
            // SAFETY: the rows are valid (caller).
            unsafe { _mm256_storeu_ps(dst.add(i * ldd), o) };
        }
    }

    /// 12 x 32: 24 zmm accumulators, two for the `rhs` row; `lhs` is broadcast from memory.
    pub struct Avx512;

    impl Kernel for Avx512 {
        const MR: usize = 12;
        const NR: usize = 32;

        unsafe fn tile(t: Tile) {
            // SAFETY: the caller's contract is the kernel's.
            unsafe { by_rows!(avx512, t, 1 2 3 4 5 6 7 8 9 10 11 12) }
        }

        unsafe fn pack_transposed(rhs: Mat, j0: usize, w: usize, out: &mut [f32]) -> bool {
            // SAFETY: the CPU has the kernel's instruction set, so AVX (caller).
            unsafe { pack_transposed(rhs, j0, w, Self::NR, out) };
            true
        }
    }

    /// The tile function `$name::<M, ROWS, V>`: `M` rows by `V` vectors of `$lanes` (`V` is 2,
    /// or 1 for a half tile), one broadcast of `a` per row and step, the next rows of `b`
    /// prefetched a cache line at a time. One body for every vector width.
    macro_rules! tile_fn {
        ($name:ident, $feat:literal, $kernel:ty, $lanes:literal, $zero:ident, $load:ident,
         $store:ident, $splat:ident, $fma:ident) => {
            #[target_feature(enable = $feat)]
            unsafe fn $name<const M: usize, const ROWS: bool, const V: usize>(t: Tile) {
                let Tile {
                    kc,
                    a,
                    b,
                    ldb,
                    c,
                    ldc,
                    load,
                    ..
                } = t;
                let (ars, acs) = a_strides(ROWS, <$kernel>::MR);
                let mut acc = [[$zero(); V]; M];
                if load {
                    for (r, row) in acc.iter_mut().enumerate() {
                        for (v, x) in row.iter_mut().enumerate() {
                            // SAFETY: `c` holds `M` rows of `lanes V` at stride `ldc`
                            // ([`Kernel::tile`]).
                            *x = unsafe { $load(c.add(r * ldc + $lanes * v)) };
                        }
                    }
                }
                for p in 0..kc {
                    // SAFETY: `p < kc`, and `a`, `b` hold `kc` steps ([`Kernel::tile`]).
                    unsafe {
                        let bp = b.add(p * ldb);
                        for off in (0..V * $lanes).step_by(16) {
                            _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PF * ldb + off).cast());
                        }
                        let mut bv = [$zero(); V];
                        for (v, x) in bv.iter_mut().enumerate() {
                            *x = $load(bp.add($lanes * v));
                        }
                        let ap = a.add(p * acs);
                        for (r, row) in acc.iter_mut().enumerate() {
                            let av = $splat(*ap.add(r * ars));
                            for (x, b) in row.iter_mut().zip(bv) {
                                *x = $fma(av, b, *x);
                            }
                        }
                    }
                }
                for (r, row) in acc.iter().enumerate() {
                    for (v, x) in row.iter().enumerate() {
                        // SAFETY: as for the loads.
                        unsafe { $store(c.add(r * ldc + $lanes * v), *x) };
                    }
                }
            }
        };
    }

    tile_fn!(
        avx512,
        "avx512f",
        Avx512,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps
    );
    tile_fn!(
        avx2,
        "avx2,fma",
        Avx2,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps
    );

    /// 6 x 16: 12 ymm accumulators, two for the `rhs` row, one broadcast.
    pub struct Avx2;

    impl Kernel for Avx2 {
        const MR: usize = 6;
        const NR: usize = 16;

        unsafe fn tile(t: Tile) {
            // SAFETY: the caller's contract is the kernel's.
            unsafe { by_rows!(avx2, t, 1 2 3 4 5 6) }
        }

        unsafe fn pack_transposed(rhs: Mat, j0: usize, w: usize, out: &mut [f32]) -> bool {
            // SAFETY: the CPU has the kernel's instruction set, so AVX (caller).
            unsafe { pack_transposed(rhs, j0, w, Self::NR, out) };
            true
        }
    }
}

/// 4 x 16 with `f32::mul_add`: for CPUs without AVX2 and other architectures (computes half
/// tiles whole).
struct Portable;

impl Kernel for Portable {
    const MR: usize = 4;
    const NR: usize = 16;

    unsafe fn tile(t: Tile) {
        let (ars, acs) = a_strides(t.a_rows, Self::MR);
        let mut acc = [[0f32; 16]; 4];
        let acc = &mut acc[..t.rows];
        if t.load {
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: `c` holds `rows` rows of 16 at stride `ldc` ([`Kernel::tile`]).
                *row = unsafe { t.c.add(r * t.ldc).cast::<[f32; 16]>().read_unaligned() };
            }
        }
        for p in 0..t.kc {
            // SAFETY: `p < kc`, and `a`, `b` hold `kc` steps ([`Kernel::tile`]).
            let b = unsafe { t.b.add(p * t.ldb).cast::<[f32; 16]>().read_unaligned() };
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let a = unsafe { *t.a.add(r * ars + p * acs) };
                for (s, b) in row.iter_mut().zip(b) {
                    *s = a.mul_add(b, *s);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe { t.c.add(r * t.ldc).cast::<[f32; 16]>().write_unaligned(*row) };
        }
    }
}

thread_local! {
    /// The packed `rhs` of the calling thread's product, kept for the next one. Taken out for
    /// the duration of a call, so that a product run inline by a task of another (a nested
    /// call) gets a buffer of its own.
    static PACKED_RHS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// A task's packed block of `lhs` rows, likewise.
    static PACKED_LHS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Packs `rhs`, splits the output over `threads` tasks and runs them.
///
/// # Safety
/// The CPU has `K`'s instruction set; `job` holds bounds that [`Isa::run`] checked.
unsafe fn drive<K: Kernel>(threads: usize, job: &Job, rhs: Mat) {
    let panels = job.n.div_ceil(K::NR);
    let panel_len = job.k * K::NR;
    // Whole panels of a row-major `rhs` can be read in place. That saves a pass over `rhs`,
    // which costs most where `lhs` has few rows (weight gradients), but the kernels run a
    // little slower on rows that are not cache-line aligned, so not for many rows. Nor with a
    // row stride of a multiple of 2 KiB, whose rows share few cache sets.
    let in_place = rhs.cs == 1 && !rhs.rs.is_multiple_of(512) && job.m < IN_PLACE_ROWS;
    let first = if in_place { job.n / K::NR } else { 0 };
    let mut store = PACKED_RHS.with(Cell::take);
    let packed = aligned(&mut store, (panels - first) * panel_len);
    // SAFETY: the CPU has `K`'s instruction set (caller).
    let pack = |(i, out): (usize, &mut [f32])| unsafe { pack_rhs::<K>(rhs, first + i, out) };
    if threads > 1 {
        pool::chunks_mut(packed, panel_len, |i, out| pack((i, out)));
    } else {
        packed.chunks_mut(panel_len).enumerate().for_each(pack);
    }
    let rhs = RhsPanels { packed, first, rhs };
    let (tr, tc) = grid(job.m, K::MR, panels, threads);
    let task = |t: usize| {
        let (rows, cols) = (part(job.m, tr, t / tc), part(panels, tc, t % tc));
        // SAFETY: as for the packing; the tasks' rectangles are disjoint.
        unsafe { run_block::<K>(job, &rhs, rows, cols) };
    };
    if tr * tc == 1 {
        task(0);
    } else {
        pool::run(tr * tc, task);
    }
    PACKED_RHS.with(|c| c.set(store));
}

/// Where the tasks find the panels of `rhs`.
struct RhsPanels<'a> {
    /// Panels `first..`, packed: `k * NR` floats each.
    packed: &'a [f32],
    first: usize,
    /// Panels before `first` are whole columns of `rhs` itself, row-major.
    rhs: Mat<'a>,
}

impl RhsPanels<'_> {
    /// Steps `p0..p0 + kc` of panel `jp` of width `nr`, and the distance between steps.
    fn block(&self, jp: usize, nr: usize, (p0, kc): (usize, usize)) -> (&[f32], usize) {
        if jp < self.first {
            let s = p0 * self.rhs.rs + jp * nr;
            (
                &self.rhs.data[s..s + (kc - 1) * self.rhs.rs + nr],
                self.rhs.rs,
            )
        } else {
            let s = (jp - self.first) * self.rhs.rows * nr + p0 * nr;
            (&self.packed[s..s + kc * nr], nr)
        }
    }
}

/// `len` floats of `store` starting on a 64-byte boundary (so `rhs` rows stay in cache lines).
fn aligned(store: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if store.len() < len + 16 {
        *store = vec![0.0; len + 16];
    }
    let off = store.as_ptr().align_offset(64).min(16);
    &mut store[off..off + len]
}

/// The `tr` x `tc` grid of at most `threads` tasks over `m` rows and `cols` panels whose
/// largest task is smallest; parts have at least `mr` rows. Splitting columns makes each part
/// pack the same `lhs` rows again, so fewer row parts must win by more than 1/16.
fn grid(m: usize, mr: usize, cols: usize, threads: usize) -> (usize, usize) {
    let mut best = (1, 1);
    let mut best_cost = usize::MAX;
    for tr in (1..=threads.min(m.div_ceil(mr)).max(1)).rev() {
        let tc = (threads / tr).clamp(1, cols.max(1));
        let cost = m.div_ceil(tr) * cols.div_ceil(tc);
        if cost.saturating_mul(16) < best_cost.saturating_mul(15) {
            (best, best_cost) = ((tr, tc), cost);
        }
    }
    best
}

/// Part `i` of `0..n` cut into `parts` near-equal ranges.
fn part(n: usize, parts: usize, i: usize) -> Range<usize> {
    i * n / parts..(i + 1) * n / parts
}

/// Blocks `(p0, kc)` of `0..k`, near-equal and at most `KC` long.
fn k_blocks(k: usize) -> impl Iterator<Item = (usize, usize)> {
    let count = k.div_ceil(KC);
    (0..count).map(move |i| (i * k / count, (i + 1) * k / count - i * k / count))
}

/// Packs panel `jp` of `rhs` (columns `jp * NR..`, all rows) into `out[p * NR + j]`, columns
/// past the end zero.
///
/// # Safety
/// The CPU has `K`'s instruction set.
unsafe fn pack_rhs<K: Kernel>(rhs: Mat, jp: usize, out: &mut [f32]) {
    let j0 = jp * K::NR;
    let w = K::NR.min(rhs.cols - j0);
    // SAFETY: the CPU has `K`'s instruction set (caller).
    if rhs.rs == 1 && rhs.cs != 1 && unsafe { K::pack_transposed(rhs, j0, w, out) } {
        return;
    }
    for (p, o) in out.chunks_exact_mut(K::NR).enumerate() {
        let s = p * rhs.rs + j0 * rhs.cs;
        prefetch(rhs.data.as_ptr().wrapping_add(s + PACK_AHEAD * rhs.rs));
        if rhs.cs == 1 && w == K::NR {
            o.copy_from_slice(&rhs.data[s..s + K::NR]);
            continue;
        }
        if rhs.cs == 1 {
            o[..w].copy_from_slice(&rhs.data[s..s + w]);
        } else {
            for (j, v) in o[..w].iter_mut().enumerate() {
                *v = rhs.data[s + j * rhs.cs];
            }
        }
        o[w..].fill(0.0);
    }
}

/// Packs `lhs` rows `rows`, columns `p0..p0 + kc`, as micro-panels of `MR` rows: panel `t` at
/// `buf[t * MR * KC..]`. Returns whether in the row layout (see [`Tile::a`]), which a row-major
/// `lhs` gets; others get the column layout, a plain copy for a transposed `lhs`.
fn pack_lhs<K: Kernel>(
    lhs: Mat,
    rows: Range<usize>,
    block: (usize, usize),
    buf: &mut [f32],
) -> bool {
    let ((p0, kc), slot) = (block, K::MR * KC);
    if lhs.cs == 1 {
        for (r, i) in rows.enumerate() {
            let (s, o) = (i * lhs.rs + p0, r / K::MR * slot + r % K::MR * KC);
            buf[o..o + kc].copy_from_slice(&lhs.data[s..s + kc]);
        }
        return true;
    }
    let (n, full) = (rows.len(), rows.len() / K::MR * K::MR);
    for p in 0..kc {
        let s = rows.start * lhs.rs + (p0 + p) * lhs.cs;
        if lhs.rs == 1 {
            for line in (0..n).step_by(16) {
                prefetch(
                    lhs.data
                        .as_ptr()
                        .wrapping_add(s + PACK_AHEAD * lhs.cs + line),
                );
            }
            // Row p of the transposed source: whole micro-panel columns, then the rest.
            let src = &lhs.data[s..s + n];
            for (t, col) in src[..full].chunks_exact(K::MR).enumerate() {
                buf[t * slot + p * K::MR..][..K::MR].copy_from_slice(col);
            }
            if full < n {
                let o = full / K::MR * slot + p * K::MR;
                buf[o..o + n - full].copy_from_slice(&src[full..]);
            }
            continue;
        }
        for r in 0..n {
            buf[r / K::MR * slot + p * K::MR + r % K::MR] = lhs.data[s + r * lhs.rs];
        }
    }
    false
}

/// Computes output rows `rows` and panels `panels` from the packed `rhs`.
///
/// # Safety
/// The CPU has `K`'s instruction set; `job` holds checked bounds; `rows` x `panels` is inside
/// the output, and no other task writes it meanwhile.
unsafe fn run_block<K: Kernel>(
    job: &Job,
    rhs: &RhsPanels,
    rows: Range<usize>,
    panels: Range<usize>,
) {
    debug_assert!(K::MR <= MAX_MR && K::NR <= MAX_NR);
    let dst = job.dst.ptr();
    let longest = k_blocks(job.k).map(|(_, kc)| kc).max().unwrap_or(1);
    let group_len = (RHS_BLOCK_BYTES / (longest * K::NR * 4)).max(1);
    let block_rows = (LHS_BLOCK_BYTES / (K::MR * KC * 4)).max(1) * K::MR;
    let mut store = PACKED_LHS.with(Cell::take);
    let abuf = aligned(&mut store, block_rows * KC);
    for jc in panels.clone().step_by(group_len) {
        let group = jc..(jc + group_len).min(panels.end);
        for (block, (p0, kc)) in k_blocks(job.k).enumerate() {
            let load = job.load || block > 0;
            for ic in rows.clone().step_by(block_rows) {
                let ic_rows = ic..(ic + block_rows).min(rows.end);
                let a_rows = pack_lhs::<K>(job.lhs, ic_rows.clone(), (p0, kc), abuf);
                for (t, i0) in ic_rows.clone().step_by(K::MR).enumerate() {
                    let mr = K::MR.min(ic_rows.end - i0);
                    let a = &abuf[t * K::MR * KC..(t + 1) * K::MR * KC];
                    for jp in group.clone() {
                        // The next tile's outputs, to fetch while this one computes.
                        let next = if jp + 1 < group.end {
                            Some((i0, jp + 1))
                        } else {
                            (i0 + K::MR < rows.end).then_some((i0 + K::MR, group.start))
                        };
                        if let Some((i, j)) = next {
                            for r in i..i + K::MR.min(rows.end - i) {
                                // Inside dst: row r < m, column j * NR < n.
                                prefetch(dst.wrapping_add(r * job.dst_rs + j * K::NR));
                                prefetch(dst.wrapping_add(r * job.dst_rs + j * K::NR + 16));
                            }
                        }
                        let (b, ldb) = rhs.block(jp, K::NR, (p0, kc));
                        let tile = Tile {
                            rows: mr,
                            kc,
                            a: a.as_ptr(),
                            a_rows,
                            b: b.as_ptr(),
                            ldb,
                            // SAFETY: row i0 < m, column jp * NR < n: inside dst ([`Isa::run`]).
                            c: unsafe { dst.add(i0 * job.dst_rs + jp * K::NR) },
                            ldc: job.dst_rs,
                            load,
                            half: false,
                        };
                        let width = K::NR.min(job.n - jp * K::NR);
                        // SAFETY: the CPU has the kernel's instruction set (caller); `b` holds
                        // `kc` steps of `NR` at `ldb` and `a` `mr` rows of `kc`; the tile's
                        // `mr` x `width` outputs lie in dst and in this task's rectangle.
                        unsafe { run_tile::<K>(tile, width) };
                    }
                }
            }
        }
    }
    PACKED_LHS.with(|c| c.set(store));
    if let Some(beta) = job.scale {
        let cols = panels.start * K::NR..(panels.end * K::NR).min(job.n);
        for i in rows {
            for j in cols.clone() {
                // SAFETY: (i, j) is inside dst and in this task's rectangle.
                unsafe {
                    let d = dst.add(i * job.dst_rs + j);
                    *d = 0.0 + beta * *d;
                }
            }
        }
    }
}

/// Runs `t`, whose outputs are only `width` columns wide: a tile past the last column goes
/// through a local copy of its live part.
///
/// # Safety
/// As [`Kernel::tile`], except that only `width` columns of `t.c` need to be valid.
unsafe fn run_tile<K: Kernel>(mut t: Tile, width: usize) {
    if width == K::NR {
        // SAFETY: the caller's contract, with all `NR` columns valid.
        unsafe { K::tile(t) };
        return;
    }
    let mut local = [0f32; MAX_MR * MAX_NR];
    let (out, ldc) = (t.c, t.ldc);
    (t.c, t.ldc, t.half) = (local.as_mut_ptr(), K::NR, width <= K::NR / 2);
    if t.load {
        for (r, row) in local.chunks_exact_mut(K::NR).take(t.rows).enumerate() {
            // SAFETY: row `r` of the tile has `width` valid columns (caller).
            unsafe { std::ptr::copy_nonoverlapping(out.add(r * ldc), row.as_mut_ptr(), width) };
        }
    }
    // SAFETY: the caller's contract, with `local` holding `rows` rows of `NR`.
    unsafe { K::tile(t) };
    for (r, row) in local.chunks_exact(K::NR).take(t.rows).enumerate() {
        // SAFETY: as for the copy in.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(r * ldc), width) };
    }
}

/// Asks for the cache line holding `p` (a hint: any address is fine).
#[inline(always)]
fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address; SSE is part of x86_64.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition: one `mul_add` chain per output, ascending.
    fn reference(dst: &mut [f32], dst_rs: usize, acc: bool, lhs: Mat, rhs: Mat, beta: f32) {
        let at = |m: &Mat, i: usize, j: usize| m.data[i * m.rs + j * m.cs];
        for i in 0..lhs.rows {
            for j in 0..rhs.cols {
                let d = &mut dst[i * dst_rs + j];
                let mut s = if acc && beta == 1.0 { *d } else { 0.0 };
                for p in 0..lhs.cols {
                    s = at(&lhs, i, p).mul_add(at(&rhs, p, j), s);
                }
                *d = if beta == 1.0 {
                    s
                } else {
                    (if acc { *d } else { 0.0 }) + beta * s
                };
            }
        }
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed, 11);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// How an operand is stored.
    #[derive(Clone, Copy, Debug)]
    enum Layout {
        /// Row-major with padding after each row.
        Rows,
        /// The transpose of a row-major matrix.
        Transposed,
        /// Neither stride 1.
        Strided,
    }

    /// A `rows` x `cols` view stored as `layout`, and its storage.
    fn operand(rows: usize, cols: usize, layout: Layout, seed: u64) -> (Vec<f32>, usize, usize) {
        let (rs, cs, len) = match layout {
            Layout::Rows => (cols + 3, 1, rows * (cols + 3)),
            Layout::Transposed => (1, rows + 1, cols * (rows + 1)),
            Layout::Strided => (2 * cols + 1, 2, rows * (2 * cols + 1)),
        };
        (values(len, seed), rs, cs)
    }

    fn view(data: &[f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Mat<'_> {
        Mat {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    const LAYOUTS: [Layout; 3] = [Layout::Rows, Layout::Transposed, Layout::Strided];

    /// Runs one case on every instruction set the CPU has and compares the bits with the
    /// reference.
    fn check(m: usize, k: usize, n: usize, variant: usize) {
        let (ll, rl) = (LAYOUTS[variant % 3], LAYOUTS[variant / 3 % 3]);
        let acc = variant / 9 % 2 == 1;
        let beta = if variant / 18 % 2 == 1 { 0.125 } else { 1.0 };
        let seed = (m * 1_000_000 + k * 1000 + n) as u64;
        let (a, ars, acs) = operand(m, k, ll, seed);
        let (b, brs, bcs) = operand(k, n, rl, seed + 1);
        let (lhs, rhs) = (view(&a, m, k, ars, acs), view(&b, k, n, brs, bcs));
        let dst_rs = n + 2;
        let init = values(m * dst_rs, seed + 2);
        let mut want = init.clone();
        reference(&mut want, dst_rs, acc, lhs, rhs, beta);
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            let mut got = init.clone();
            isa.matmul(&mut got, dst_rs, acc, lhs, rhs, beta);
            assert!(
                same_bits(&got, &want),
                "{isa:?} m={m} k={k} n={n} lhs={ll:?} rhs={rl:?} acc={acc} beta={beta}"
            );
        }
    }

    fn same_bits(got: &[f32], want: &[f32]) -> bool {
        got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(g, w)| g.to_bits() == w.to_bits())
    }

    /// Every instruction set gives the reference's bits, over edge sizes, layouts, `acc` and
    /// `beta` (each shape gets a different combination of those; a few shapes get all).
    #[test]
    fn every_isa_matches_the_reference_bitwise() {
        let sizes = [1, 2, 5, 13, 31, 33, 64, 65, 100];
        let ks = [1, 2, 5, 13, 33, 64, 100, 257, 600];
        let mut variant = 0;
        for &m in &sizes {
            for &n in &sizes {
                for &k in &ks {
                    check(m, k, n, variant % 36);
                    variant += 7;
                }
            }
        }
        for variant in 0..36 {
            check(37, 300, 70, variant);
        }
        // Several blocks of packed lhs rows and of k, each layout.
        for variant in 0..9 {
            check(260, 400, 40, variant);
        }
        // Enough rows that a row-major rhs is packed rather than read in place.
        for variant in [0, 1, 2, 10, 20] {
            check(IN_PLACE_ROWS + 6, 40, 70, variant);
        }
        // Several column groups and k blocks, and a remainder of each.
        check(30, 530, 1100, 0);
        check(30, 530, 1100, 10);
    }

    /// `k == 0`: zeros, or `dst` unchanged with `acc`.
    #[test]
    fn empty_inner_dimension() {
        let (a, b) = (vec![0f32; 0], vec![0f32; 0]);
        let (lhs, rhs) = (view(&a, 3, 0, 0, 1), view(&b, 0, 4, 4, 1));
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            let mut d = vec![1f32; 12];
            isa.matmul(&mut d, 4, true, lhs, rhs, 1.0);
            assert_eq!(d, vec![1.0; 12]);
            isa.matmul(&mut d, 4, false, lhs, rhs, 0.5);
            assert_eq!(d, vec![0.0; 12]);
        }
    }

    /// The parallel split gives the single-thread bits for 1, 2 and 3 threads.
    #[test]
    fn threads_do_not_change_the_bits() {
        let shapes = [
            (2048, 128, 258),
            (258, 2048, 128),
            (13, 700, 1100),
            (600, 64, 40),
            (64, 32, 256),
        ];
        for (i, &(m, k, n)) in shapes.iter().enumerate() {
            for (ll, rl) in [
                (Layout::Rows, Layout::Transposed),
                (Layout::Transposed, Layout::Rows),
            ] {
                let seed = i as u64 * 10;
                let (a, ars, acs) = operand(m, k, ll, seed);
                let (b, brs, bcs) = operand(k, n, rl, seed + 1);
                let (lhs, rhs) = (view(&a, m, k, ars, acs), view(&b, k, n, brs, bcs));
                let init = values(m * n, seed + 2);
                for (acc, beta) in [(false, 1.0), (true, 1.0), (false, 0.125)] {
                    let isa = Isa::selected();
                    let mut want = init.clone();
                    isa.matmul(&mut want, n, acc, lhs, rhs, beta);
                    for threads in 1..=3 {
                        let pool = pool::Pool::new(threads, std::time::Duration::from_micros(50));
                        let mut got = init.clone();
                        pool.install(|| isa.matmul_par(&mut got, n, acc, lhs, rhs, beta));
                        assert!(
                            same_bits(&got, &want),
                            "{threads} threads: {m}x{k}x{n} {ll:?} {rl:?} acc={acc} beta={beta}"
                        );
                    }
                }
            }
        }
    }

    /// Largest task first: the grid splits whichever dimension balances the work.
    #[test]
    fn grid_balances_tasks() {
        assert_eq!(grid(2048, 12, 4, 2), (2, 1));
        assert_eq!(grid(2048, 12, 4, 3), (3, 1));
        assert_eq!(grid(128, 12, 4, 2), (2, 1));
        assert_eq!(grid(24, 12, 8, 2), (2, 1));
        assert_eq!(grid(12, 12, 8, 2), (1, 2));
        assert_eq!(grid(1, 12, 1, 8), (1, 1));
        assert_eq!(grid(13, 12, 1, 2), (2, 1));
    }
}
