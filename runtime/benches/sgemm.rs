//! GFLOP/s of the training kernels' matrix product (`kernels::gemm::sgemm`) on the shapes a
//! training step runs, per instruction set, against the `gemm` crate (AVX2 kernels: it is
//! built without `x86-v4`). Prints a table; not a test.
//!
//! ```text
//! RUSTFLAGS="-C target-cpu=native" CARGO_TARGET_DIR=$HOME/.cache/anneal/target-native \
//!     cargo bench -p anneal-runtime --bench sgemm
//! ```
//!
//! Products of the linear layers run on a 2-thread pool (`matmul_par`), the attention ones on
//! one thread (`matmul`: heads already run in parallel). `SGEMM_THREADS` changes the former;
//! an argument keeps only the rows whose line contains it (`-- "2048, 704"`); for profiling,
//! `SGEMM_ONLY=avx512` (or `avx2`, `gemm`) times that one alone.

use std::time::{Duration, Instant};

use anneal_runtime::kernels::Mat;
use anneal_runtime::kernels::gemm::sgemm::Isa;
use anneal_runtime::kernels::pool::Pool;

/// How the operands of one product are stored, as the training step stores them.
#[derive(Clone, Copy)]
enum Role {
    /// `x @ W^T`: lhs row-major, rhs the transpose of a row-major weight.
    Forward,
    /// `dY @ W`: both row-major.
    InputGrad,
    /// `dY^T @ X`: lhs the transpose of a row-major gradient, rhs row-major.
    WeightGrad,
    /// Attention `Q K^T` (one thread).
    Scores,
    /// Attention `P V` (one thread, V inside the fused projection's rows).
    Weighted,
    /// Attention `P^T dO` (one thread).
    ValueGrad,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Forward => "x@W^T",
            Role::InputGrad => "dY@W",
            Role::WeightGrad => "dY^T@X",
            Role::Scores => "Q@K^T 1t",
            Role::Weighted => "P@V 1t",
            Role::ValueGrad => "P^T@dO 1t",
        }
    }

    fn single_thread(self) -> bool {
        matches!(self, Role::Scores | Role::Weighted | Role::ValueGrad)
    }

    /// Storage lengths and the (rs, cs) strides of lhs (m x k) and rhs (k x n).
    fn layout(self, m: usize, k: usize, n: usize) -> [(usize, usize, usize); 2] {
        match self {
            Role::Forward | Role::Scores => [(m * k, k, 1), (n * k, 1, k)],
            Role::InputGrad => [(m * k, k, 1), (k * n, n, 1)],
            Role::WeightGrad | Role::ValueGrad => [(k * m, 1, m), (k * n, n, 1)],
            // V's rows are rows of the fused q/k/v projection, 3 heads wide.
            Role::Weighted => [(m * k, k, 1), (k * 3 * n, 3 * n, 1)],
        }
    }
}

/// The step's products at batch 8 x context 256, as (m, k, n) of `[m x k] @ [k x n]`.
fn shapes() -> Vec<(&'static str, Role, usize, usize, usize)> {
    let rows = 2048;
    let mut out = Vec::new();
    for (model, h, inter, vocab) in [("1M", 128, 352, 258), ("10M", 384, 1024, 258)] {
        // qkv, o, gate+up, down, head: (in, out).
        let linears = [(h, 3 * h), (h, h), (h, 2 * inter), (inter, h), (h, vocab)];
        for (i, o) in linears {
            out.push((model, Role::Forward, rows, i, o));
        }
        for (i, o) in linears {
            out.push((model, Role::InputGrad, rows, o, i));
        }
        for (i, o) in linears {
            out.push((model, Role::WeightGrad, o, rows, i));
        }
    }
    for d in [32, 64] {
        out.push(("attn", Role::Scores, 64, d, 256));
        out.push(("attn", Role::Weighted, 64, 256, d));
        out.push(("attn", Role::ValueGrad, 256, 64, d));
    }
    out
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

/// Best mean time of one call over a few batches of at least 40 ms each.
fn time(mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    let mut per_batch = 1;
    while start.elapsed() < Duration::from_millis(40) {
        f();
        per_batch += 1;
    }
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_batch {
                f();
            }
            t.elapsed() / per_batch
        })
        .min()
        .unwrap()
}

fn main() {
    let threads = std::env::var("SGEMM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    // Ours on anneal's pool, the `gemm` crate on a rayon pool, each with `threads` threads.
    let ours_pool = Pool::new(threads, Duration::from_micros(200));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let only = std::env::var("SGEMM_ONLY").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .filter(|i| i.available() && wanted(i.name()))
        .collect();
    print!("{:<5} {:<10} {:>17}", "model", "product", "m, k, n");
    for isa in &isas {
        print!(" {:>8}", format!("ours-{}", isa.name()));
    }
    println!(
        " {:>8} {:>6}   (GFLOP/s, {threads} threads)",
        "gemm", "ratio"
    );
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    for (model, role, m, k, n) in shapes() {
        let label = format!(
            "{:<5} {:<10} {:>17}",
            model,
            role.name(),
            format!("{m}, {k}, {n}")
        );
        if filter.as_ref().is_some_and(|f| !label.contains(f.as_str())) {
            continue;
        }
        let [(la, ars, acs), (lb, brs, bcs)] = role.layout(m, k, n);
        let (a, b) = (values(la, 1), values(lb, 2));
        let lhs = Mat {
            data: &a,
            rows: m,
            cols: k,
            rs: ars,
            cs: acs,
        };
        let rhs = Mat {
            data: &b,
            rows: k,
            cols: n,
            rs: brs,
            cs: bcs,
        };
        let mut dst = vec![0f32; m * n];
        let gflops = |t: Duration| 2.0 * (m * n * k) as f64 / t.as_secs_f64() / 1e9;
        let single = role.single_thread();
        let mut ours = Vec::new();
        for &isa in &isas {
            let t = ours_pool.install(|| {
                time(|| {
                    if single {
                        isa.matmul(&mut dst, n, false, lhs, rhs, 1.0);
                    } else {
                        isa.matmul_par(&mut dst, n, false, lhs, rhs, 1.0);
                    }
                })
            });
            ours.push(gflops(t));
        }
        let par = if single {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads)
        };
        if !wanted("gemm") {
            println!(
                "{label}{}",
                ours.iter()
                    .map(|g| format!(" {g:>8.1}"))
                    .collect::<String>()
            );
            continue;
        }
        let t = pool.install(|| {
            time(|| {
                // SAFETY: the strides describe `a`, `b` and `dst` (sized above) exactly.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        dst.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        acs as isize,
                        ars as isize,
                        b.as_ptr(),
                        bcs as isize,
                        brs as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    )
                }
            })
        });
        let theirs = gflops(t);
        print!("{label}");
        for g in &ours {
            print!(" {g:>8.1}");
        }
        println!(" {theirs:>8.1} {:>5.2}x", ours[0] / theirs);
    }
}
