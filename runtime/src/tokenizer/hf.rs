//! A tokenizer read from a Hugging Face `tokenizer.json`.

use super::{Tokenizer, TokenizerError};
use std::path::Path;

/// Wraps the `tokenizers` crate; BOS/EOS are looked up among common special-token names.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` with special tokens read as text (the flag is the tokenizer's own, not a
    /// per-call argument).
    literal: tokenizers::Tokenizer,
    /// The special added tokens (what `literal` reads as text).
    control: Vec<(String, u32)>,
    bos: Option<u32>,
    eos: Option<u32>,
}

impl HfTokenizer {
    /// Reads `tokenizer.json`; BOS and EOS are the first of the usual names it has.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        Self::from_file_with(path, None, None)
    }

    /// Reads `tokenizer.json` whose BOS and EOS tokens are spelled `bos` and `eos` (when given:
    /// a base model's `tokenizer_config.json` or GGUF metadata says which they are).
    pub fn from_file_with(
        path: &Path,
        bos: Option<&str>,
        eos: Option<&str>,
    ) -> Result<Self, TokenizerError> {
        let bytes = std::fs::read(path).map_err(|e| TokenizerError::Load {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        Self::from_bytes(&bytes, &path.display().to_string(), bos, eos)
    }

    /// A tokenizer from the content of a `tokenizer.json` (`origin` names it in errors).
    pub fn from_bytes(
        bytes: &[u8],
        origin: &str,
        bos: Option<&str>,
        eos: Option<&str>,
    ) -> Result<Self, TokenizerError> {
        let load_err = |msg: String| TokenizerError::Load {
            path: origin.to_string(),
            msg,
        };
        let inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| load_err(e.to_string()))?;
        let find = |named: Option<&str>, usual: &[&str]| match named {
            Some(n) => inner
                .token_to_id(n)
                .map(Some)
                .ok_or_else(|| load_err(format!("has no token {n:?}"))),
            None => Ok(usual.iter().find_map(|n| inner.token_to_id(n))),
        };
        let bos = find(
            bos,
            &["<|begin_of_text|>", "<s>", "<|im_start|>", "<|endoftext|>"],
        )?;
        let eos = find(
            eos,
            &["<|end_of_text|>", "</s>", "<|im_end|>", "<|endoftext|>"],
        )?;
        let (literal, control) = literal_twin(&inner);
        Ok(Self {
            inner,
            literal,
            control,
            bos,
            eos,
        })
    }
}

/// A copy of `inner` that reads its special tokens as text (the flag belongs to the tokenizer,
/// not to a call), and those tokens: what [`Tokenizer::encode_literal`] and
/// [`Tokenizer::control_tokens`] need of a `tokenizers` tokenizer.
pub(crate) fn literal_twin(
    inner: &tokenizers::Tokenizer,
) -> (tokenizers::Tokenizer, Vec<(String, u32)>) {
    let mut literal = inner.clone();
    literal.set_encode_special_tokens(true);
    let control = inner
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| t.special)
        .map(|(id, t)| (t.content, id))
        .collect();
    (literal, control)
}

/// The ids of `text` by `tokenizer`, without BOS or EOS added.
pub(crate) fn encode_with(
    tokenizer: &tokenizers::Tokenizer,
    text: &str,
) -> Result<Vec<u32>, TokenizerError> {
    let enc = tokenizer
        .encode(text, false)
        .map_err(|e| TokenizerError::Codec(e.to_string()))?;
    Ok(enc.get_ids().to_vec())
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        encode_with(&self.inner, text)
    }

    fn encode_literal(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        encode_with(&self.literal, text)
    }

    fn control_tokens(&self) -> &[(String, u32)] {
        &self.control
    }

    fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    fn token_to_piece(&self, id: u32) -> Option<Vec<u8>> {
        self.inner.decode(&[id], false).ok().map(String::into_bytes)
    }
}
