//! The byte-level BPE tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`), built
//! with the `tokenizers` crate and served through the runtime's [`Tokenizer`] trait.

use super::{Array, GgufError, Header, Result};
use crate::tokenizer::{Tokenizer, TokenizerError, encode_with, literal_twin};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

/// llama.cpp's token types that are not plain text: unknown (2), control (3), user-defined (4).
const SPECIAL_TYPES: [i64; 3] = [2, 3, 4];

/// A GPT-2 style (byte-level BPE) tokenizer from GGUF metadata.
pub struct GgufTokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` with special tokens read as text (the flag is the tokenizer's own, not a
    /// per-call argument).
    literal: tokenizers::Tokenizer,
    /// The special tokens (what `literal` reads as text).
    control: Vec<(String, u32)>,
    bos: Option<u32>,
    eos: Option<u32>,
}

fn meta_err(key: &str, detail: impl Into<String>) -> GgufError {
    GgufError::Metadata {
        key: key.into(),
        detail: detail.into(),
    }
}

fn strings<'a>(h: &'a Header, key: &str) -> Result<&'a [String]> {
    match h.get(key)?.as_array() {
        Some(Array::String(v)) => Ok(v),
        // candle's GGUF writer types an empty array as u32 (a byte-level export has no merges).
        Some(a) if a.is_empty() => Ok(&[]),
        _ => Err(meta_err(key, "is not an array of strings")),
    }
}

impl GgufTokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.{model,pre,tokens,merges,token_type,...}`.
    pub fn from_header(h: &Header) -> Result<Self> {
        let model = h.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(meta_err(
                "tokenizer.ggml.model",
                format!("`{model}` (only gpt2 byte-level BPE is supported)"),
            ));
        }
        let tokens = strings(h, "tokenizer.ggml.tokens")?;
        let merges = strings(h, "tokenizer.ggml.merges")?
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        meta_err("tokenizer.ggml.merges", format!("entry `{m}` is not `a b`"))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        // tokenizers' BPE builder indexes a buffer sized by the longest token with each merged
        // pair and panics when a merge's result is not in the vocabulary (found by the fuzzer):
        // check every merge here first.
        let known: std::collections::HashSet<&str> = tokens.iter().map(String::as_str).collect();
        if let Some((a, b)) = merges.iter().find(|(a, b)| {
            !known.contains(a.as_str())
                || !known.contains(b.as_str())
                || !known.contains(format!("{a}{b}").as_str())
        }) {
            return Err(meta_err(
                "tokenizer.ggml.merges",
                format!("merge `{a} {b}` is not made of, or into, vocabulary tokens"),
            ));
        }
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| meta_err("tokenizer.ggml.merges", e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        // add_prefix_space=false, trim_offsets=true, use_regex=true: GPT-2's own settings.
        let byte_level = ByteLevel::new(false, true, true);
        let pre = h.get_str("tokenizer.ggml.pre").unwrap_or("gpt2");
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            // SmolLM's tokenizer.json splits every digit on its own before the byte-level step.
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            _ => byte_level.into(),
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
        if let Ok(Some(Array::Int(types))) =
            h.get("tokenizer.ggml.token_type").map(|v| v.as_array())
        {
            let specials: Vec<AddedToken> = types
                .iter()
                .zip(tokens)
                .filter(|(ty, _)| SPECIAL_TYPES.contains(ty))
                .map(|(_, tok)| AddedToken::from(tok.clone(), true))
                .collect();
            inner
                .add_special_tokens(specials)
                .map_err(|e| meta_err("tokenizer.ggml.token_type", e.to_string()))?;
        }
        let id = |key: &str| {
            h.get_u64(key)
                .ok()
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < tokens.len())
        };
        let (literal, control) = literal_twin(&inner);
        Ok(Self {
            inner,
            literal,
            control,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
        })
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` (what a model fine-tuned from this
    /// GGUF records), and the spelling of its BOS and EOS.
    pub fn to_json(&self) -> Result<(String, Option<String>, Option<String>)> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| meta_err("tokenizer.ggml.tokens", e.to_string()))?;
        let name = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        Ok((json, name(self.bos), name(self.eos)))
    }

    /// The id of a token string (e.g. `<|im_end|>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

fn codec(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Codec(e.to_string())
}

impl Tokenizer for GgufTokenizer {
    fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, TokenizerError> {
        encode_with(&self.inner, text)
    }

    fn encode_literal(&self, text: &str) -> std::result::Result<Vec<u32>, TokenizerError> {
        encode_with(&self.literal, text)
    }

    fn control_tokens(&self) -> &[(String, u32)] {
        &self.control
    }

    fn decode(&self, ids: &[u32]) -> std::result::Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(codec)
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
        let token = self.inner.id_to_token(id)?;
        byte_level_bytes(&token)
    }
}

/// GPT-2's byte-to-character table: the character a byte-level vocabulary writes for byte `b`
/// (the inverse of [`byte_level_bytes`]).
pub fn byte_level_char(b: u8) -> char {
    if is_printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !is_printable(x)).count() as u32;
    char::from_u32(0x100 + rank).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// Bytes that GPT-2's table maps to themselves.
fn is_printable(b: u8) -> bool {
    matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff)
}

/// Inverts GPT-2's byte-to-character table: the bytes a byte-level token stands for.
fn byte_level_bytes(token: &str) -> Option<Vec<u8>> {
    token
        .chars()
        .map(|c| {
            let c = c as u32;
            match c {
                // Printable bytes map to themselves...
                0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff => Some(c as u8),
                // ...the others to 256 + their rank among the unprintable bytes.
                0x100..=0x143 => (0u8..=255)
                    .filter(|&b| !is_printable(b))
                    .nth((c - 0x100) as usize),
                _ => None,
            }
        })
        .collect()
}
