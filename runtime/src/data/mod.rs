//! Training and evaluation data: where it comes from (`file://`, `pvc://`, `builtin:` URIs),
//! what an example is (free text, a prompt with its response, a chat, a preference pair), the
//! deterministic train/validation/test split, how a model's prompt format turns examples into
//! token samples, and the batches the trainer consumes.

mod batch;
mod builtin;
pub mod format;
mod source;

pub use batch::{Batch, Cursor, Loader, PairSample, Sample, tokenize};
pub use format::Format;
pub use source::{DatasetFormat, load, load_as, resolve_path};

use crate::tokenizer::ChatMessage;
use serde::{Deserialize, Serialize};

/// Data could not be read or is malformed. Always the user's to fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The URI names no supported source.
    #[error("unsupported data URI {0:?}: use file://PATH, pvc://CLAIM/PATH or builtin:NAME")]
    Scheme(String),
    /// A built-in data set that does not exist or has bad parameters.
    #[error("builtin data set {0}")]
    Builtin(String),
    /// The file cannot be read.
    #[error("cannot read data file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line of a JSONL file is not a valid example.
    #[error("{path}:{line}: {msg}")]
    Malformed {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// The data set (or the requested split of it) has no usable example.
    #[error("data set {0} has no examples in the requested split")]
    Empty(String),
    /// The stage needs another kind of example.
    #[error("{0}")]
    Kind(String),
    /// Tokenization failed.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
}

/// One example of a data set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Example {
    /// A prompt and the response the model should give (sft, exact-match evaluation).
    Pair {
        /// The prompt.
        prompt: String,
        /// The expected response.
        response: String,
    },
    /// Free text (pretraining).
    Text {
        /// The text.
        text: String,
    },
    /// A conversation (sft): the loss covers the assistant's messages only.
    Chat {
        /// The messages, in order.
        messages: Vec<ChatMessage>,
    },
    /// A preference pair (dpo): a prompt, the answer preferred and the one rejected.
    Preference {
        /// The prompt.
        prompt: Prompt,
        /// The preferred answer.
        chosen: String,
        /// The rejected answer.
        rejected: String,
    },
}

/// A prompt: plain text (the user's message, for a chat model), or chat messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Messages, ending where the assistant answers.
    Messages(Vec<ChatMessage>),
}

impl Prompt {
    /// The prompt as chat messages (plain text is one user message).
    pub fn messages(&self) -> Vec<ChatMessage> {
        match self {
            Self::Text(t) => vec![ChatMessage::new("user", t)],
            Self::Messages(m) => m.clone(),
        }
    }

    /// The prompt as text (messages' contents one per line).
    pub fn text(&self) -> String {
        match self {
            Self::Text(t) => t.clone(),
            Self::Messages(m) => m
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

impl Example {
    /// The whole example as one text (what pretraining sees).
    pub fn full_text(&self) -> String {
        match self {
            Self::Pair { prompt, response } => format!("{prompt}{response}"),
            Self::Text { text } => text.clone(),
            Self::Chat { messages } => messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            Self::Preference { prompt, chosen, .. } => format!("{}{chosen}", prompt.text()),
        }
    }

    /// FNV-1a of the content: the split an example falls in depends only on its content, so
    /// train and eval agree without sharing state, and duplicates never straddle two splits.
    fn content_hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for &b in bytes {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        match self {
            Self::Pair { prompt, response } => {
                feed(prompt.as_bytes());
                feed(&[0]);
                feed(response.as_bytes());
            }
            Self::Text { text } => feed(text.as_bytes()),
            // Kinds added later hash their JSON, which is as stable as their content.
            other => feed(serde_json::to_string(other).unwrap_or_default().as_bytes()),
        }
        h
    }
}

/// The three parts of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "camelCase")]
pub enum Split {
    /// What the model trains on.
    Train,
    /// Held out for validation during training.
    Validation,
    /// Held out for the final evaluation (the eval gate's default).
    Test,
}

/// Relative sizes of train, validation and test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitRatios {
    /// Train share.
    pub train: f64,
    /// Validation share.
    pub validation: f64,
    /// Test share.
    pub test: f64,
}

impl Default for SplitRatios {
    fn default() -> Self {
        Self {
            train: 8.0,
            validation: 1.0,
            test: 1.0,
        }
    }
}

impl SplitRatios {
    /// Which split an example with `hash` belongs to.
    fn split_of(&self, hash: u64) -> Split {
        let total = self.train + self.validation + self.test;
        let u = (hash >> 11) as f64 / (1u64 << 53) as f64 * total;
        if u < self.train {
            Split::Train
        } else if u < self.train + self.validation {
            Split::Validation
        } else {
            Split::Test
        }
    }

    /// Checks the ratios are usable.
    pub fn validate(&self) -> Result<(), String> {
        let all = [self.train, self.validation, self.test];
        if all.iter().any(|r| !r.is_finite() || *r < 0.0) || all.iter().sum::<f64>() <= 0.0 {
            return Err("split ratios must be non-negative and not all zero".into());
        }
        Ok(())
    }
}

/// The examples of `examples` that fall in `split`, in their original order.
pub fn split(examples: Vec<Example>, ratios: &SplitRatios, which: Split) -> Vec<Example> {
    examples
        .into_iter()
        .filter(|e| ratios.split_of(e.content_hash()) == which)
        .collect()
}
