//! `--device auto|cpu|cuda:N`: which device a command runs on, and the CPU thread count.

use crate::error::RuntimeError;
use candle_core::Device;

/// Resolves a device name. `auto` is the first GPU when built with `cuda` and one is present,
/// else the CPU.
pub fn parse_device(name: &str) -> Result<Device, RuntimeError> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        other => {
            let index = other
                .strip_prefix("cuda:")
                .or(if other == "cuda" { Some("0") } else { None })
                .and_then(|i| i.parse::<usize>().ok())
                .ok_or_else(|| {
                    RuntimeError::user(format!("unknown device {other:?}: use auto, cpu or cuda:N"))
                })?;
            if !candle_core::utils::cuda_is_available() {
                return Err(RuntimeError::user(format!(
                    "{other}: this build has no CUDA support"
                )));
            }
            Device::new_cuda(index).map_err(|e| RuntimeError::Device(format!("cuda:{index}: {e}")))
        }
    }
}

/// Fixes the number of CPU threads candle uses. candle reads `RAYON_NUM_THREADS` for every
/// matmul and rayon sizes its global pool from it on first use, so this must run before any
/// tensor operation. A fixed thread count is what makes CPU runs bitwise reproducible: the
/// matmul kernels partition work by thread count.
pub fn set_cpu_threads(threads: usize) {
    // SAFETY: called once at the start of a command, before the runtime starts any thread.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
}

/// Keeps freed tensor buffers in the allocator instead of returning them to the kernel. A
/// training step frees and reallocates the same activation sizes every time; with glibc's
/// defaults each large buffer is a fresh mmap, page-faulted and zeroed again (measured at
/// ~10% of a small model's step).
pub fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator thresholds; called before the buffers exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Runs candle's element-wise CPU kernels on the calling thread only (matmuls keep
/// `RAYON_NUM_THREADS`), unless `CANDLE_NUM_THREADS` is set. Those kernels are memory-bound and
/// candle parallelises them with spinning barriers: training a 10M-parameter model on 2 cores
/// ran at ~300 tokens/s with them and ~580 without (busy machine, same run otherwise).
pub fn serial_elementwise() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: as in `set_cpu_threads`, before any thread exists.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}
