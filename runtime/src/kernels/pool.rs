//! The one thread pool of anneal's own kernels (serving, training, embedding) and every
//! parallel-for entry point they use: [`run`] (tasks by index), [`chunks_mut`] (disjoint chunks
//! of an output) and [`map`] (one value per task, in task order). Kernels split work into tasks
//! whose results do not depend on which thread runs them, so results do not depend on the
//! thread count either.
//!
//! A fork-join pool: the calling thread and `threads - 1` workers split a range of task indices,
//! then the caller waits until every task is done. A call made from inside a task, or while
//! another thread's call holds the pool, runs its tasks on the calling thread (no nesting, no
//! waiting on a pool that is busy with someone else's call).
//!
//! Why not candle's or rayon's pool: a decode step makes ~150 parallel calls of 20-100 µs each,
//! so the per-call cost matters. Here a call is one atomic store (plus an unpark only for
//! workers that went to sleep), tasks are claimed with a compare-and-swap on one word, and the
//! caller never waits for a worker that did not take a task (a descheduled worker on a shared
//! node cannot stall the step). Workers spin for a short while after their last task, then park.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
    generation: Mutex<u64>,
}

thread_local! {
    /// Set while this thread runs a task of some pool: a parallel call from there runs inline.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
    /// The pool that [`run`] and friends use on this thread ([`Pool::install`]); the global one
    /// when null.
    static CURRENT: Cell<*const Pool> = const { Cell::new(std::ptr::null()) };
}

/// Runs `f` with [`IN_TASK`] set.
fn as_task(f: impl FnOnce()) {
    let was = IN_TASK.replace(true);
    f();
    IN_TASK.set(was);
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
            generation: Mutex::new(0),
        }
    }

    /// Threads that run tasks, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` with this pool as the one [`run`], [`chunks_mut`] and [`map`] use on the
    /// calling thread (tests and benchmarks pick a thread count this way).
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        let was = CURRENT.replace(self);
        let r = f();
        CURRENT.set(was);
        r
    }

    /// Runs `f(i)` for every `i` in `0..n`, spread over the pool, and returns when all are done.
    pub fn run<F: Fn(usize) + Sync>(&self, n: usize, f: F) {
        if n == 0 {
            return;
        }
        if self.threads == 1 || n == 1 || IN_TASK.get() {
            (0..n).for_each(f);
            return;
        }
        assert!(n <= MAX_TASKS, "pool: {n} tasks");
        let mut generation = match self.generation.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            // Another thread's call holds the workers: run here rather than wait for it.
            Err(std::sync::TryLockError::WouldBlock) => {
                (0..n).for_each(|i| as_task(|| f(i)));
                return;
            }
        };
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
            abort_on_panic(|| as_task(|| f(i)));
            s.finished.fetch_add(1, Ordering::Release);
        }
        // Wait for the tasks workers took: spin (a decode step's tasks end within microseconds),
        // then yield, so that on a busy machine a worker descheduled with a long task (a
        // training product) gets the core back sooner than a spinning caller would give it.
        let started = Instant::now();
        let mut spins = 0u32;
        while s.finished.load(Ordering::Acquire) < n {
            spins += 1;
            if spins.is_multiple_of(64) && started.elapsed() > CALLER_SPIN {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// How long a caller spins for its workers' tasks before it yields between checks.
const CALLER_SPIN: Duration = Duration::from_micros(50);

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
    IN_TASK.set(true);
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

/// The process-wide pool of the kernels, sized by `RAYON_NUM_THREADS` (what
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

/// The pool the calling thread uses: the one [`Pool::install`] set, else [`global`].
fn current() -> &'static Pool {
    let p = CURRENT.get();
    if p.is_null() {
        global()
    } else {
        // SAFETY: `install` keeps the pool borrowed while the pointer is set.
        unsafe { &*p }
    }
}

/// Threads of the calling thread's pool (1 inside a task, where calls run inline).
pub fn threads() -> usize {
    if IN_TASK.get() {
        1
    } else {
        current().threads()
    }
}

/// Runs `f(i)` for every `i` in `0..n` on the calling thread's pool.
pub fn run(n: usize, f: impl Fn(usize) + Sync) {
    current().run(n, f);
}

/// A buffer whose disjoint chunks tasks take.
struct Chunks<T> {
    base: *mut T,
    len: usize,
    size: usize,
}

// SAFETY: each task takes a distinct chunk of the buffer, which outlives the call.
unsafe impl<T: Send> Sync for Chunks<T> {}

impl<T> Chunks<T> {
    fn new(buf: &mut [T], size: usize) -> Self {
        assert!(size > 0);
        Self {
            base: buf.as_mut_ptr(),
            len: buf.len(),
            size,
        }
    }

    fn count(&self) -> usize {
        self.len.div_ceil(self.size)
    }

    /// Chunk `i`.
    ///
    /// # Safety
    /// No one else may hold chunk `i` while the result lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self, i: usize) -> &mut [T] {
        let start = i * self.size;
        assert!(start < self.len);
        // SAFETY: in bounds (checked); exclusive (caller).
        unsafe {
            std::slice::from_raw_parts_mut(self.base.add(start), self.size.min(self.len - start))
        }
    }
}

/// Runs `f(i, chunk)` for the `i`-th chunk of `size` values of `buf` (the last may be
/// shorter), in parallel.
pub fn chunks_mut<T: Send>(buf: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunks = Chunks::new(buf, size);
    // SAFETY: task i alone takes chunk i.
    run(chunks.count(), |i| f(i, unsafe { chunks.get(i) }));
}

/// [`chunks_mut`] over two buffers with as many chunks each: `f(i, a_i, b_i)`.
pub fn zip_chunks_mut<A: Send, B: Send>(
    a: &mut [A],
    size_a: usize,
    b: &mut [B],
    size_b: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let (a, b) = (Chunks::new(a, size_a), Chunks::new(b, size_b));
    assert_eq!(a.count(), b.count(), "zip_chunks_mut: chunk counts differ");
    run(a.count(), |i| {
        // SAFETY: task i alone takes chunk i of each.
        let (ca, cb) = unsafe { (a.get(i), b.get(i)) };
        f(i, ca, cb)
    });
}

/// [`chunks_mut`] whose tasks return a value each: the values in chunk order.
pub fn map_chunks_mut<T: Send, U: Send>(
    buf: &mut [T],
    size: usize,
    f: impl Fn(usize, &mut [T]) -> U + Sync,
) -> Vec<U> {
    let chunks = Chunks::new(buf, size);
    let mut out: Vec<Option<U>> = (0..chunks.count()).map(|_| None).collect();
    let slots = Chunks::new(&mut out, 1);
    run(chunks.count(), |i| {
        // SAFETY: task i alone takes chunk i of each.
        let (chunk, slot) = unsafe { (chunks.get(i), slots.get(i)) };
        slot[0] = Some(f(i, chunk));
    });
    out.into_iter()
        .map(|v| v.expect("every task ran"))
        .collect()
}

/// `f(i)` for every `i` in `0..n`, computed in parallel, in order of `i`.
pub fn map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    chunks_mut(&mut out, 1, |i, o| o[0] = Some(f(i)));
    out.into_iter()
        .map(|v| v.expect("every task ran"))
        .collect()
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
    fn nested_and_concurrent_calls_run_inline() {
        let pool = Pool::new(2, Duration::from_micros(50));
        pool.install(|| {
            let sums = map(8, |i| map(4, |j| i * j).iter().sum::<usize>());
            assert_eq!(sums, (0..8).map(|i| 6 * i).collect::<Vec<_>>());
            std::thread::scope(|s| {
                for _ in 0..3 {
                    s.spawn(|| {
                        let mut v = vec![0usize; 1000];
                        chunks_mut(&mut v, 7, |i, c| c.fill(i));
                        assert!(v.iter().enumerate().all(|(j, &x)| x == j / 7));
                    });
                }
            });
        });
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
