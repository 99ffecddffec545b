//! A small fork-join pool for the inference kernels: the calling thread and `threads - 1`
//! workers split a range of task indices, then the caller waits until every task is done.
//!
//! Why not candle's or rayon's pool: a decode step makes ~150 parallel calls of 20-100 µs each,
//! so the per-call cost matters. Here a call is one atomic store (plus an unpark only for
//! workers that went to sleep), tasks are claimed with a compare-and-swap on one word, and the
//! caller never waits for a worker that did not take a task (a descheduled worker on a shared
//! node cannot stall the step). Workers spin for a short while after their last task, then park.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The claim word: generation (24 bits) | task count (20 bits) | next task (20 bits). Packing
/// the three makes a claim valid only for the generation and size its claimant saw.
const IDX_BITS: u32 = 20;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;
/// Most tasks one call may have.
pub const MAX_TASKS: usize = IDX_MASK as usize;

fn pack(generation: u64, n: usize, next: usize) -> u64 {
    ((generation & 0xFF_FFFF) << (2 * IDX_BITS)) | ((n as u64) << IDX_BITS) | next as u64
}

fn unpack(word: u64) -> (u64, usize, usize) {
    (
        word >> (2 * IDX_BITS),
        ((word >> IDX_BITS) & IDX_MASK) as usize,
        (word & IDX_MASK) as usize,
    )
}

unsafe fn call_closure<F: Fn(usize) + Sync>(data: *const (), i: usize) {
    // SAFETY: `data` points to the `F` of the call whose task `i` was claimed; the caller keeps
    // it alive until every task has finished.
    unsafe { (*(data as *const F))(i) }
}

struct Shared {
    claim: AtomicU64,
    finished: AtomicUsize,
    /// The current call's closure and its trampoline, written before the claim word of
    /// their generation is published.
    job_ptr: AtomicU64,
    job_call: AtomicU64,
    sleeping: Vec<AtomicBool>,
    handles: OnceLock<Vec<std::thread::Thread>>,
    spin: Duration,
}

/// A fork-join pool; see the module documentation.
pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    generation: std::sync::Mutex<u64>,
}

impl Pool {
    /// A pool running tasks on `threads` threads in all (the caller included).
    pub fn new(threads: usize, spin: Duration) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            claim: AtomicU64::new(pack(0, 0, 0)),
            finished: AtomicUsize::new(0),
            job_ptr: AtomicU64::new(0),
            job_call: AtomicU64::new(0),
            sleeping: (1..threads).map(|_| AtomicBool::new(false)).collect(),
            handles: OnceLock::new(),
            spin,
        });
        let handles = (1..threads)
            .filter_map(|w| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("anneal-kernel-{w}"))
                    .spawn(move || worker(&s, w - 1))
                    .ok()
                    .map(|h| h.thread().clone())
            })
            .collect::<Vec<_>>();
        let threads = handles.len() + 1;
        let _ = shared.handles.set(handles);
        Self {
            shared,
            threads,
            generation: std::sync::Mutex::new(0),
        }
    }

    /// Threads that run tasks, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(i)` for every `i` in `0..n`, spread over the pool, and returns when all are done.
    pub fn run<F: Fn(usize) + Sync>(&self, n: usize, f: F) {
        if n == 0 {
            return;
        }
        if self.threads == 1 || n == 1 {
            (0..n).for_each(f);
            return;
        }
        assert!(n <= MAX_TASKS, "pool: {n} tasks");
        let mut generation = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        *generation += 1;
        let s = &*self.shared;
        s.finished.store(0, Ordering::Relaxed);
        s.job_ptr
            .store(&f as *const F as *const () as u64, Ordering::Relaxed);
        s.job_call
            .store(call_closure::<F> as *const () as u64, Ordering::Relaxed);
        s.claim.store(pack(*generation, n, 0), Ordering::SeqCst);
        if let Some(handles) = s.handles.get() {
            for (flag, h) in s.sleeping.iter().zip(handles) {
                if flag.load(Ordering::SeqCst) {
                    h.unpark();
                }
            }
        }
        let g = *generation & 0xFF_FFFF;
        while let Some(i) = claim(s, g) {
            // A task that unwound out of here would leave workers running a dead closure.
            abort_on_panic(|| f(i));
            s.finished.fetch_add(1, Ordering::Release);
        }
        while s.finished.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
    }
}

fn abort_on_panic(f: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
        std::process::abort();
    }
}

/// Claims the next task of generation `g`, if any is left.
fn claim(s: &Shared, g: u64) -> Option<usize> {
    let mut word = s.claim.load(Ordering::Acquire);
    loop {
        let (wg, n, next) = unpack(word);
        if wg != g || next >= n {
            return None;
        }
        match s
            .claim
            .compare_exchange_weak(word, word + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return Some(next),
            Err(w) => word = w,
        }
    }
}

fn worker(s: &Shared, me: usize) {
    let mut seen = unpack(s.claim.load(Ordering::Acquire)).0;
    loop {
        // Wait for a new generation: spin, then sleep.
        let started = Instant::now();
        let mut spins = 0u32;
        let g = loop {
            let g = unpack(s.claim.load(Ordering::Acquire)).0;
            if g != seen {
                break g;
            }
            spins += 1;
            if !spins.is_multiple_of(64) || started.elapsed() < s.spin {
                std::hint::spin_loop();
                continue;
            }
            s.sleeping[me].store(true, Ordering::SeqCst);
            if unpack(s.claim.load(Ordering::SeqCst)).0 == seen {
                std::thread::park();
            }
            s.sleeping[me].store(false, Ordering::SeqCst);
        };
        seen = g;
        while let Some(i) = claim(s, g) {
            // The job words were written before the claim word of this generation was
            // published, and stay unchanged until task `i` (claimed in this generation) is done.
            let data = s.job_ptr.load(Ordering::Relaxed) as *const ();
            let call = s.job_call.load(Ordering::Relaxed);
            // SAFETY: `call` is a `call_closure::<F>` stored for this generation, matching `data`.
            let call: unsafe fn(*const (), usize) = unsafe { std::mem::transmute(call as usize) };
            // SAFETY: see above; the closure outlives the call, which waits for this task.
            abort_on_panic(|| unsafe { call(data, i) });
            s.finished.fetch_add(1, Ordering::Release);
        }
    }
}

/// The process-wide pool of the inference kernels, sized by `RAYON_NUM_THREADS` (what
/// `--threads` sets) or the number of CPUs; workers spin `ANNEAL_SPIN_US` microseconds
/// (default 200) before sleeping.
pub fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
        let spin = std::env::var("ANNEAL_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200);
        Pool::new(threads, Duration::from_micros(spin))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_calls() {
        let pool = Pool::new(3, Duration::from_micros(50));
        for n in [1usize, 2, 7, 64, 1000] {
            for _ in 0..50 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn works_after_workers_sleep() {
        let pool = Pool::new(2, Duration::from_micros(1));
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(1));
            let sum = AtomicUsize::new(0);
            pool.run(10, |i| {
                sum.fetch_add(i, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 45);
        }
    }
}
