//! `--device auto|cpu|cuda:N`: which device a command runs on, the dtype training computes in
//! there, and the CPU thread count.

use crate::error::RuntimeError;
use anneal_crds::trainingjob::Precision;
use candle_core::{DType, Device};

/// Resolves a device name. `auto` is the first GPU when built with `cuda` and the driver reports
/// one, else the CPU; a GPU that is present but fails to initialise is a device fault (exit code
/// [`anneal_crds::contract::EXIT_DEVICE_FAULT`]), never a silent fallback to the CPU, so that the
/// operator moves the work to a healthy node.
pub fn parse_device(name: &str) -> Result<Device, RuntimeError> {
    let device = match name {
        "cpu" => return Ok(Device::Cpu),
        "auto" => auto_device()?,
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
            Device::new_cuda(index)
                .map_err(|e| RuntimeError::Device(format!("cuda:{index}: {e}")))?
        }
    };
    if device.is_cuda() {
        exit_on_device_panic();
    }
    Ok(device)
}

#[cfg(feature = "cuda")]
fn auto_device() -> Result<Device, RuntimeError> {
    match Device::new_cuda(0) {
        Ok(device) => Ok(device),
        Err(e) if crate::error::is_no_cuda_device(&e) => {
            eprintln!("anneal-runtime: --device auto: no CUDA device ({e}); running on the CPU");
            Ok(Device::Cpu)
        }
        Err(e) => Err(RuntimeError::Device(format!("cuda:0: {e}"))),
    }
}

#[cfg(not(feature = "cuda"))]
fn auto_device() -> Result<Device, RuntimeError> {
    Ok(Device::Cpu)
}

/// The dtype a training step computes in: bf16 on a GPU unless the TrainingJob asks for fp32,
/// f32 on the CPU unless it asks for bf16 explicitly. Weights and optimizer moments stay f32
/// (master weights) whatever this says; the step casts a bf16 copy of the model (see
/// [`crate::model::Transformer::to_dtype`]).
pub fn training_dtype(precision: Precision, device: &Device) -> DType {
    match precision {
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::Auto if device.is_cuda() => DType::BF16,
        Precision::Auto => DType::F32,
    }
}

/// Makes a panic whose message names CUDA end the process with the device-fault exit code, as
/// a CUDA error returned as a value does: a panic inside candle's or cudarc's CUDA code (e.g.
/// on a lost device) would otherwise end with Rust's 101 and the operator would retry on the
/// same broken node. Other panics keep the default behaviour.
fn exit_on_device_panic() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if crate::error::is_device_message(msg) {
                eprintln!("anneal-runtime: error: device fault: panic: {msg}");
                std::process::exit(anneal_crds::contract::EXIT_DEVICE_FAULT);
            }
            default(info);
        }));
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_picks_the_compute_dtype() {
        let cpu = Device::Cpu;
        assert_eq!(training_dtype(Precision::Auto, &cpu), DType::F32);
        assert_eq!(training_dtype(Precision::Fp32, &cpu), DType::F32);
        assert_eq!(training_dtype(Precision::Bf16, &cpu), DType::BF16);
    }

    #[test]
    fn device_names() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(matches!(parse_device("tpu"), Err(RuntimeError::User(_))));
        #[cfg(not(feature = "cuda"))]
        {
            assert!(parse_device("auto").unwrap().is_cpu());
            assert!(matches!(parse_device("cuda:0"), Err(RuntimeError::User(_))));
        }
    }
}
