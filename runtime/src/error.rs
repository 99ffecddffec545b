//! The runtime's error categories and the exit code each one maps to (see
//! [`anneal_crds::contract`]): the operator decides retry, fail or fail-over from the exit code.

use anneal_crds::contract;

/// Every error the runtime ends with falls in one of these categories.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Bad configuration, data or model file: retrying cannot help.
    #[error("{0}")]
    User(String),
    /// The accelerator failed: the operator moves the work to another node.
    #[error("device fault: {0}")]
    Device(String),
    /// Anything else (I/O on a healthy node, a bug): retried with backoff.
    #[error("{0}")]
    Internal(String),
    /// A peer of the data-parallel gang is lost: this worker is fine, its attempt is over.
    #[error("{0}")]
    PeerLost(String),
}

impl RuntimeError {
    /// Shorthand for a [`RuntimeError::User`] error.
    pub fn user(msg: impl Into<String>) -> Self {
        Self::User(msg.into())
    }

    /// The process exit code the operator reads.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::User(_) => contract::EXIT_USER_ERROR,
            Self::Device(_) => contract::EXIT_DEVICE_FAULT,
            Self::Internal(_) => contract::EXIT_INTERNAL,
            Self::PeerLost(_) => contract::EXIT_PEER_LOST,
        }
    }
}

/// Result type of the runtime.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// The category of a failed tensor operation: a CUDA driver, cuBLAS or cuRAND failure is a
/// [`RuntimeError::Device`] fault, except running out of GPU memory, which a job's own sizes
/// cause and a new node would repeat ([`RuntimeError::User`]); anything else (a shape error, an
/// unsupported dtype) is [`RuntimeError::Internal`].
pub fn from_tensor_error(err: &candle_core::Error) -> RuntimeError {
    let msg = err.to_string();
    match cuda_failure(err) {
        Some(CudaFailure::OutOfMemory) => {
            RuntimeError::User(format!("out of GPU memory (lower the batch size): {msg}"))
        }
        Some(CudaFailure::Fault) => RuntimeError::Device(msg),
        Some(CudaFailure::NoDevice) => RuntimeError::Device(format!("no CUDA device: {msg}")),
        None => RuntimeError::Internal(msg),
    }
}

/// Whether `err` is the CUDA driver reporting that there is no GPU at all (what `--device auto`
/// falls back to the CPU on).
pub fn is_no_cuda_device(err: &candle_core::Error) -> bool {
    matches!(cuda_failure(err), Some(CudaFailure::NoDevice))
}

/// Whether a message (a panic's, or an error already turned into text) comes from the CUDA
/// driver or its libraries: cudarc prints their status codes (`CUDA_ERROR_*`, `CUBLAS_STATUS_*`,
/// `CURAND_STATUS_*`).
pub fn is_device_message(msg: &str) -> bool {
    [
        "CUDA_ERROR_",
        "CUBLAS_STATUS_",
        "CURAND_STATUS_",
        "DriverError",
    ]
    .iter()
    .any(|k| msg.contains(k))
        && !msg.contains("CUDA_ERROR_OUT_OF_MEMORY")
}

/// Ends the process with the device-fault exit code when `err` is a device fault: for loops that
/// otherwise answer errors and carry on (the serving engine), since a CUDA context that failed
/// stays failed and only another node (or a restarted pod) can serve again.
pub fn exit_on_device_fault(err: &candle_core::Error) {
    if let RuntimeError::Device(msg) = from_tensor_error(err) {
        eprintln!("anneal-runtime: error: device fault: {msg}");
        std::process::exit(contract::EXIT_DEVICE_FAULT);
    }
}

// Without the `cuda` feature no tensor error is a CUDA one: the variants go unused.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum CudaFailure {
    NoDevice,
    OutOfMemory,
    Fault,
}

/// Unwraps candle's context/backtrace wrappers down to a CUDA error, if that is what it is.
fn cuda_failure(err: &candle_core::Error) -> Option<CudaFailure> {
    use candle_core::Error as E;
    match err {
        E::WithBacktrace { inner, .. } | E::Context { inner, .. } | E::WithPath { inner, .. } => {
            cuda_failure(inner)
        }
        E::Cuda(e) => classify_cuda(e.as_ref()),
        _ => None,
    }
}

#[cfg(feature = "cuda")]
fn classify_cuda(e: &(dyn std::error::Error + 'static)) -> Option<CudaFailure> {
    use candle_core::cuda_backend::CudaError;
    use candle_core::cuda_backend::cudarc::driver::sys::CUresult;
    let driver = |code: CUresult| match code {
        CUresult::CUDA_ERROR_NO_DEVICE => CudaFailure::NoDevice,
        CUresult::CUDA_ERROR_OUT_OF_MEMORY => CudaFailure::OutOfMemory,
        _ => CudaFailure::Fault,
    };
    match e.downcast_ref::<CudaError>()? {
        CudaError::Cuda(d) => Some(driver(d.0)),
        CudaError::Load { cuda, .. } => Some(driver(cuda.0)),
        CudaError::Cublas(c) if format!("{c:?}").contains("ALLOC_FAILED") => {
            Some(CudaFailure::OutOfMemory)
        }
        CudaError::Cublas(_) | CudaError::Curand(_) => Some(CudaFailure::Fault),
        // Missing kernels, unsupported dtypes, layouts, NVRTC: bugs of this build, not the GPU.
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
fn classify_cuda(_: &(dyn std::error::Error + 'static)) -> Option<CudaFailure> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_tensor_errors_are_internal() {
        let err = candle_core::Error::Msg("shape mismatch".into());
        assert!(matches!(from_tensor_error(&err), RuntimeError::Internal(_)));
    }

    #[test]
    fn device_messages() {
        assert!(is_device_message(
            "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was encountered\")"
        ));
        assert!(is_device_message(
            "CublasError(CUBLAS_STATUS_EXECUTION_FAILED)"
        ));
        assert!(!is_device_message(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
        ));
        assert!(!is_device_message("index out of bounds"));
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_errors_are_classified_by_code() {
        use candle_core::cuda_backend::CudaError;
        use candle_core::cuda_backend::cudarc::driver::{DriverError, sys::CUresult};
        let wrap = |code| {
            candle_core::Error::Cuda(Box::new(CudaError::Cuda(DriverError(code))))
                .context("forward")
        };
        let fault = wrap(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS);
        assert_eq!(
            from_tensor_error(&fault).exit_code(),
            contract::EXIT_DEVICE_FAULT
        );
        let oom = wrap(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        assert_eq!(
            from_tensor_error(&oom).exit_code(),
            contract::EXIT_USER_ERROR
        );
        assert!(is_no_cuda_device(&wrap(CUresult::CUDA_ERROR_NO_DEVICE)));
    }
}
