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
        }
    }
}

/// Result type of the runtime.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
