//! What can be wrong with a GGUF file.

use crate::error::RuntimeError;

/// A GGUF file was malformed, unsupported, or lacked something the loader needs.
///
/// Every variant is the file's fault (a user error), except [`GgufError::Io`] and
/// [`GgufError::Candle`].
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file (magic {0:#010x})")]
    BadMagic(u32),
    /// A GGUF version this loader does not read.
    #[error("unsupported GGUF version {0} (2 and 3 are supported)")]
    UnsupportedVersion(u32),
    /// The file ends before a field it announces.
    #[error("truncated at byte {offset}: {what} needs {needed} bytes, {available} left")]
    Truncated {
        /// Where the field starts.
        offset: usize,
        /// The field.
        what: &'static str,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the file.
        available: usize,
    },
    /// A value that cannot be right (bad type tag, non-UTF-8 string, zero alignment, ...).
    #[error("invalid {what} at byte {offset}: {detail}")]
    Invalid {
        /// Where the field starts.
        offset: usize,
        /// The field.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// Arrays nested deeper than the loader accepts.
    #[error("metadata arrays nested deeper than {0} levels")]
    TooDeep(usize),
    /// The same metadata key or tensor name twice.
    #[error("duplicate {kind} `{name}`")]
    Duplicate {
        /// `metadata key` or `tensor`.
        kind: &'static str,
        /// The repeated name.
        name: String,
    },
    /// A tensor whose shape, type or data range does not fit the file.
    #[error("tensor `{name}`: {detail}")]
    BadTensor {
        /// The tensor.
        name: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Metadata the loader needs is absent or has the wrong type.
    #[error("metadata `{key}`: {detail}")]
    Metadata {
        /// The key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// A tensor the model needs is absent.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// candle refused the data.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<GgufError> for RuntimeError {
    fn from(err: GgufError) -> Self {
        match err {
            GgufError::Io { .. } | GgufError::Candle(_) => RuntimeError::Internal(err.to_string()),
            _ => RuntimeError::User(err.to_string()),
        }
    }
}

/// Result type of the GGUF loader.
pub type Result<T, E = GgufError> = std::result::Result<T, E>;
