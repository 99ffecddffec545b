//! Read bandwidth of this machine on the serving pool's threads: a STREAM-like loop that sums a
//! buffer far larger than the last-level cache (1 GiB by default), split in one contiguous slice
//! per thread, best of 10 passes (STREAM reports the best). `serve/bench.sh` prints it beside the
//! bandwidth decode achieves, so both come from the same run. Prints one JSON line.
//!
//! ```text
//! RUSTFLAGS="-C target-cpu=native" CARGO_TARGET_DIR=$HOME/.cache/anneal/target-native \
//!     THREADS=2 cargo bench -p anneal-runtime --bench membw
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anneal_runtime::kernels::pool::Pool;

/// Sums `words` with eight independent lanes so the compiler keeps the loads vectorised and the
/// loop bound by memory, not by one dependency chain.
fn read(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = words.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, w) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*w);
        }
    }
    rest.iter()
        .fold(acc.iter().fold(0, |s, a| s ^ a), |s, w| s ^ w)
}

fn main() {
    let threads: usize = std::env::var("THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let mb: usize = std::env::var("MEMBW_MB")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1024);
    let words = mb * (1 << 20) / 8;
    let pool = Pool::new(threads, Duration::from_micros(200));
    // Written once by the threads that read it (first touch places the pages).
    let mut buf = vec![0u64; words];
    let per = words.div_ceil(threads);
    pool.install(|| {
        anneal_runtime::kernels::pool::chunks_mut(&mut buf, per, |i, chunk| {
            for (j, w) in chunk.iter_mut().enumerate() {
                *w = (i * per + j) as u64;
            }
        })
    });
    let sink = AtomicU64::new(0);
    let mut best = f64::INFINITY;
    for _ in 0..10 {
        let t = Instant::now();
        pool.run(threads, |i| {
            let lo = (i * per).min(words);
            let hi = ((i + 1) * per).min(words);
            sink.fetch_xor(read(&buf[lo..hi]), Ordering::Relaxed);
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    let bytes = (words * 8) as f64;
    println!(
        "{{\"threads\": {threads}, \"buffer_mb\": {mb}, \"read_gb_s\": {:.2}, \"checksum\": {}}}",
        bytes / best / 1e9,
        sink.load(Ordering::Relaxed)
    );
}
