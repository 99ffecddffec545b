//! Tokenizers behind one trait: byte-level for models trained from scratch, and a Hugging Face
//! `tokenizer.json` for fine-tuning a base model. (The serving side adds one read from GGUF
//! metadata.) A model directory names its tokenizer in `tokenizer_config.json`.

mod byte;
pub mod chat_template;
mod hf;

pub use byte::ByteTokenizer;
pub use chat_template::{ChatMessage, ChatTemplate};
pub use hf::HfTokenizer;
pub(crate) use hf::{encode_with, literal_twin};

use serde::{Deserialize, Serialize};
use std::path::Path;

/// A tokenizer could not be loaded or could not encode or decode.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer file is missing or malformed.
    #[error("tokenizer {path}: {msg}")]
    Load {
        /// The file.
        path: String,
        /// What went wrong.
        msg: String,
    },
    /// Encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Codec(String),
}

/// Turns text into token ids and back.
pub trait Tokenizer: Send + Sync {
    /// Token ids of `text`, without BOS or EOS added; where the tokenizer has control tokens,
    /// their spelling in `text` becomes them (markup, a raw completion prompt).
    fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError>;
    /// Token ids of `text` read as plain text: the spelling of a control token in it (e.g.
    /// `<|im_end|>`) is encoded as those characters, never as the control token. For text that
    /// someone else wrote (a chat message) inside markup that may hold control tokens.
    fn encode_literal(&self, text: &str) -> Result<Vec<u32>, TokenizerError>;
    /// The control tokens that `encode` recognises in text and `encode_literal` does not:
    /// their spelling and id.
    fn control_tokens(&self) -> &[(String, u32)];
    /// Text of `ids`; special tokens are skipped and invalid UTF-8 is replaced.
    fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError>;
    /// Number of token ids (the model's vocabulary must be at least this large).
    fn vocab_size(&self) -> usize;
    /// Beginning-of-sequence id, if the tokenizer has one.
    fn bos_id(&self) -> Option<u32>;
    /// End-of-sequence id, if the tokenizer has one.
    fn eos_id(&self) -> Option<u32>;
    /// The bytes one token stands for (possibly a partial UTF-8 character), for streaming.
    fn token_to_piece(&self, id: u32) -> Option<Vec<u8>>;
}

/// Which tokenizer a training run or a model directory uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum TokenizerSpec {
    /// One token per byte plus BOS and EOS.
    #[default]
    Byte,
    /// A Hugging Face `tokenizer.json` at `path` (relative to a model directory when saved).
    Huggingface {
        /// The file.
        path: String,
        /// The beginning-of-sequence token's text (e.g. `<|im_start|>`); when absent, the
        /// first of the usual names the vocabulary has.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bos: Option<String>,
        /// The end-of-sequence token's text (e.g. `<|im_end|>`); when absent, as for `bos`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        eos: Option<String>,
    },
}

/// Name of the file in a model directory that records the tokenizer.
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

impl TokenizerSpec {
    /// Loads the tokenizer; relative paths are taken from `base`.
    pub fn load(&self, base: &Path) -> Result<Box<dyn Tokenizer>, TokenizerError> {
        match self {
            Self::Byte => Ok(Box::new(ByteTokenizer)),
            Self::Huggingface { path, bos, eos } => Ok(Box::new(HfTokenizer::from_file_with(
                &base.join(path),
                bos.as_deref(),
                eos.as_deref(),
            )?)),
        }
    }
}
