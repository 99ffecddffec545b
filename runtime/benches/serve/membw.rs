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

/// Sums `words` into four vector accumulators (AVX2 loads, 128 bytes per iteration), so the loop
/// is bound by memory, not by one dependency chain or by scalar loads.
fn read(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected on this CPU.
        return unsafe { read_avx2(words) };
    }
    words.iter().fold(0, |s, w| s.wrapping_add(*w))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn read_avx2(words: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let chunks = words.chunks_exact(16);
    let rest = chunks.remainder();
    let mut acc = [_mm256_setzero_si256(); 4];
    for c in chunks {
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: 4 u64 at 4i..4i + 4 are inside the 16-word chunk.
            let v = unsafe { _mm256_loadu_si256(c.as_ptr().add(4 * i).cast()) };
            *a = _mm256_add_epi64(*a, v);
        }
    }
    let mut lanes = [0u64; 4];
    let total = _mm256_add_epi64(
        _mm256_add_epi64(acc[0], acc[1]),
        _mm256_add_epi64(acc[2], acc[3]),
    );
    // SAFETY: 4 u64 fit `lanes`.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), total) };
    rest.iter().chain(&lanes).fold(0, |s, w| s.wrapping_add(*w))
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
