//! GGUF export of a trained model directory (`output.gguf` of a TrainingJob): the same
//! weights, quantized to Q8_0 or Q4_0 with candle's GGUF writer, as a llama-family file that
//! `anneal-runtime serve` (and llama.cpp) loads.
//!
//! - Names: the model directory already uses GGUF's llama names and interleaved RoPE, so the
//!   tensors are written as they are, without the Q/K permutation a Hugging Face conversion
//!   needs. A tied model has no `output.weight`, which GGUF readers take to mean "tied".
//! - Types: 1-D tensors (the RMSNorm weights) stay F32, as llama.cpp keeps them. A matrix whose
//!   inner dimension is not a multiple of the block size (32) cannot be block-quantized and
//!   stays F32 too: exact, and only tiny models have such widths.
//! - Tokenizer: a Hugging Face `tokenizer.json` becomes its byte-level BPE vocabulary and merges;
//!   the byte-level tokenizer becomes a byte-level BPE vocabulary of the 256 byte symbols in
//!   byte order and no merges, so that every byte is one token whose id is the byte, then
//!   BOS (256) and EOS (257) as control tokens.
//!
//! The file is written beside the weights as `model-q8_0.gguf` or `model-q4_0.gguf`, atomically,
//! and added to the directory's manifest, so that a corrupt export fails verification.

use super::{CheckpointError, atomic, io, model_dir};
use crate::gguf::tokenizer::byte_level_char;
use crate::model::{ModelConfig, param_names};
use crate::tokenizer::{ByteTokenizer, TOKENIZER_CONFIG, Tokenizer, TokenizerSpec};
use anneal_crds::trainingjob::GgufQuantization;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::Value as Json;
use std::io::Write;
use std::path::{Path, PathBuf};

/// llama.cpp's token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// Names of the byte-level tokenizer's BOS and EOS in the GGUF vocabulary. As control tokens
/// they are skipped when decoding, like ids 256 and 257 in the byte-level tokenizer; unlike it,
/// the GGUF tokenizer reads these names in input text as the tokens themselves (and streams a
/// generated one as its name), so they are names that hardly occur in text.
const BYTE_BOS: &str = "<|begin_of_text|>";
const BYTE_EOS: &str = "<|end_of_text|>";

/// A GGUF file written next to a model's weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufExport {
    /// The file.
    pub path: PathBuf,
    /// Its sha256 (lowercase hex), as recorded in the directory's manifest.
    pub sha256: String,
}

/// The file name of an export: `model-q8_0.gguf` or `model-q4_0.gguf`.
pub fn file_name(quant: GgufQuantization) -> String {
    format!("model-{}.gguf", tag(quant))
}

/// llama.cpp's lowercase name of a quantization.
fn tag(quant: GgufQuantization) -> &'static str {
    match quant {
        GgufQuantization::Q8_0 => "q8_0",
        GgufQuantization::Q4_0 => "q4_0",
    }
}

/// Writes `<model_dir>/model-<q8_0|q4_0>.gguf` from the verified model directory `model_dir`
/// and records it in the directory's manifest.
pub fn export(model_dir: &Path, quant: GgufQuantization) -> Result<GgufExport, CheckpointError> {
    let manifest = atomic::verify_dir(model_dir)?;
    let config = read_config(model_dir)?;
    let spec: TokenizerSpec = read_json(model_dir, TOKENIZER_CONFIG)?;
    let weights = model_dir.join(model_dir::WEIGHTS);
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)
        .map_err(|e| corrupt(&weights, &e))?;
    let dtype = match quant {
        GgufQuantization::Q8_0 => GgmlDType::Q8_0,
        GgufQuantization::Q4_0 => GgmlDType::Q4_0,
    };
    let mut qtensors = Vec::new();
    for (name, shape) in param_names(&config) {
        let t = tensors
            .get(&name)
            .ok_or_else(|| corrupt(&weights, &format!("missing tensor `{name}`")))?;
        if t.dims() != shape.as_slice() {
            return Err(corrupt(
                &weights,
                &format!(
                    "`{name}` has shape {:?}, config.json needs {shape:?}",
                    t.dims()
                ),
            ));
        }
        qtensors.push((name, quantize(t, dtype)?));
    }

    let sha12 = manifest
        .files
        .get(model_dir::WEIGHTS)
        .and_then(|s| s.get(..12))
        .unwrap_or_default();
    let dir_name = model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = file_name(quant);
    let mut metadata = model_metadata(&config, quant);
    metadata.push((
        "general.name".into(),
        Value::String(format!("{dir_name}@{sha12}-{}", tag(quant))),
    ));
    let chat = manifest.files.contains_key(model_dir::CHAT_TEMPLATE);
    metadata.extend(tokenizer_metadata(
        &spec,
        model_dir,
        config.vocab_size,
        !chat,
    )?);
    if chat {
        let path = model_dir.join(model_dir::CHAT_TEMPLATE);
        let template = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        metadata.push(("tokenizer.chat_template".into(), Value::String(template)));
    }

    let path = model_dir.join(&file);
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let empty_string_arrays: Vec<&str> = metadata
        .iter()
        .filter(|(k, v)| k.as_str() == MERGES && matches!(v, Value::Array(a) if a.is_empty()))
        .map(|(k, _)| k.as_str())
        .collect();
    // Written in memory first (candle's writer seeks), then typed and written out.
    let mut bytes = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut bytes, &meta_refs, &tensor_refs)?;
    let mut bytes = bytes.into_inner();
    type_empty_string_arrays(&mut bytes, &empty_string_arrays).map_err(|e| corrupt(&path, &e))?;
    atomic::write_file_atomic(&path, |f| f.write_all(&bytes).map_err(|e| io(&path, e)))?;
    let sha256 = atomic::add_to_manifest(model_dir, &file)?;
    Ok(GgufExport { path, sha256 })
}

/// The key of the BPE merges, a string array that llama.cpp requires (empty for the byte-level
/// tokenizer).
const MERGES: &str = "tokenizer.ggml.merges";

/// GGUF's type tags of an array and of a string.
const GGUF_ARRAY: u32 = 9;
const GGUF_STRING: u32 = 8;

/// candle's writer gives an empty array the element type u32; llama.cpp refuses a `merges` that
/// is not an array of strings ("invalid gguf type for tokenizer.ggml.merges"). The element type of
/// each empty array named in `keys` is rewritten in place as string (the same four bytes).
fn type_empty_string_arrays(gguf: &mut [u8], keys: &[&str]) -> Result<(), String> {
    for key in keys {
        let mut pattern = (key.len() as u64).to_le_bytes().to_vec();
        pattern.extend_from_slice(key.as_bytes());
        pattern.extend_from_slice(&GGUF_ARRAY.to_le_bytes());
        let element_type_at = pattern.len();
        pattern.extend_from_slice(&4u32.to_le_bytes());
        pattern.extend_from_slice(&0u64.to_le_bytes());
        let found = gguf
            .windows(pattern.len())
            .position(|w| w == pattern.as_slice())
            .ok_or_else(|| format!("the empty array {key} is not in the written header"))?;
        let at = found + element_type_at;
        gguf[at..at + 4].copy_from_slice(&GGUF_STRING.to_le_bytes());
    }
    Ok(())
}

/// One tensor in the export's type: block-quantized where its rows fit whole blocks, else F32.
fn quantize(t: &Tensor, dtype: GgmlDType) -> Result<QTensor, CheckpointError> {
    let inner = t.dims().last().copied().unwrap_or(0);
    let dtype = if t.rank() >= 2 && inner.is_multiple_of(dtype.block_size()) {
        dtype
    } else {
        GgmlDType::F32
    };
    Ok(QTensor::quantize(t, dtype)?)
}

/// `general.*` and `llama.*` keys: what `crate::gguf::model_config` (and llama.cpp) reads.
fn model_metadata(c: &ModelConfig, quant: GgufQuantization) -> Vec<(String, Value)> {
    let u32_of = |v: usize| Value::U32(u32::try_from(v).unwrap_or(u32::MAX));
    // llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0 and _Q4_0.
    let file_type = match quant {
        GgufQuantization::Q8_0 => 7,
        GgufQuantization::Q4_0 => 2,
    };
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.file_type".into(), Value::U32(file_type)),
        ("llama.vocab_size".into(), u32_of(c.vocab_size)),
        ("llama.context_length".into(), u32_of(c.max_seq_len)),
        ("llama.embedding_length".into(), u32_of(c.hidden_size)),
        ("llama.block_count".into(), u32_of(c.n_layers)),
        (
            "llama.feed_forward_length".into(),
            u32_of(c.intermediate_size),
        ),
        ("llama.attention.head_count".into(), u32_of(c.n_heads)),
        ("llama.attention.head_count_kv".into(), u32_of(c.n_kv_heads)),
        ("llama.rope.dimension_count".into(), u32_of(c.head_dim())),
        // llama.cpp reads these two as f32 only.
        (
            "llama.rope.freq_base".into(),
            Value::F32(c.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_norm_eps as f32),
        ),
    ]
}

/// A byte-level BPE vocabulary: tokens by id, their llama.cpp types, merges, BOS and EOS.
struct Vocabulary {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    pre: &'static str,
    bos: Option<u32>,
    eos: Option<u32>,
}

/// `tokenizer.ggml.*` keys for the model directory's tokenizer, the vocabulary padded with
/// unused tokens up to the model's `vocab_size`. `add_bos`: whether every sequence starts with
/// BOS (the plain format); a chat model's template writes its own markup instead.
fn tokenizer_metadata(
    spec: &TokenizerSpec,
    model_dir: &Path,
    vocab_size: usize,
    add_bos: bool,
) -> Result<Vec<(String, Value)>, CheckpointError> {
    let mut v = match spec {
        TokenizerSpec::Byte => byte_vocabulary(),
        TokenizerSpec::Huggingface { path, .. } => {
            let tokenizer = spec
                .load(model_dir)
                .map_err(|e| CheckpointError::Format(e.to_string()))?;
            hf_vocabulary(&model_dir.join(path), tokenizer.as_ref())?
        }
    };
    if v.tokens.len() > vocab_size {
        return Err(CheckpointError::Corrupt(format!(
            "the tokenizer has {} tokens, the model's vocabulary only {vocab_size}",
            v.tokens.len()
        )));
    }
    for i in v.tokens.len()..vocab_size {
        v.tokens.push(format!("<|unused_{i}|>"));
        v.types.push(TOKEN_UNUSED);
    }
    let strings = |s: Vec<String>| Value::Array(s.into_iter().map(Value::String).collect());
    let mut out = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(v.pre.into())),
        ("tokenizer.ggml.tokens".into(), strings(v.tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(v.types.into_iter().map(Value::I32).collect()),
        ),
        (MERGES.into(), strings(v.merges)),
    ];
    if let Some(bos) = v.bos {
        out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
        // Plain-format training and serving start every sequence with BOS; a chat model's
        // template writes its own.
        out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    }
    if let Some(eos) = v.eos {
        out.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    Ok(out)
}

/// The byte-level tokenizer as byte-level BPE without merges: id `b` is byte `b`.
fn byte_vocabulary() -> Vocabulary {
    let mut tokens: Vec<String> = (0..=255u8)
        .map(|b| byte_level_char(b).to_string())
        .collect();
    let mut types = vec![TOKEN_NORMAL; 256];
    tokens.extend([BYTE_BOS.to_string(), BYTE_EOS.to_string()]);
    types.extend([TOKEN_CONTROL, TOKEN_CONTROL]);
    Vocabulary {
        tokens,
        types,
        merges: Vec::new(),
        pre: GPT2_PRE,
        bos: ByteTokenizer.bos_id(),
        eos: ByteTokenizer.eos_id(),
    }
}

/// A Hugging Face byte-level BPE `tokenizer.json` as GGUF vocabulary and merges. Only the
/// pre-tokenizers the GGUF loader reproduces are accepted: GPT-2's byte-level one, and
/// SmolLM's (single digits, then byte-level).
fn hf_vocabulary(path: &Path, runtime: &dyn Tokenizer) -> Result<Vocabulary, CheckpointError> {
    let bad = |detail: String| CheckpointError::Format(format!("{}: {detail}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    let json: Json = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(bad(format!(
            "model type {} cannot be exported to GGUF (only byte-level BPE)",
            model["type"]
        )));
    }
    if !json["normalizer"].is_null() {
        return Err(bad("a normalizer cannot be exported to GGUF".into()));
    }
    let pre = pre_tokenizer(&json["pre_tokenizer"]).ok_or_else(|| {
        bad(format!(
            "pre-tokenizer {} has no GGUF equivalent (byte-level, optionally after single digits)",
            json["pre_tokenizer"]
        ))
    })?;

    let mut by_id: Vec<Option<(String, i32)>> = Vec::new();
    let mut put = |id: Option<u64>, token: &str, ty: i32| -> Result<(), CheckpointError> {
        let id = id
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < 1 << 24)
            .ok_or_else(|| bad(format!("token `{token}` has no valid id")))?;
        if by_id.len() <= id {
            by_id.resize(id + 1, None);
        }
        by_id[id] = Some((token.to_string(), ty));
        Ok(())
    };
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    for (token, id) in vocab {
        put(id.as_u64(), token, TOKEN_NORMAL)?;
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let token = added["content"].as_str().unwrap_or_default();
        let ty = if added["special"] == true {
            TOKEN_CONTROL
        } else {
            TOKEN_USER_DEFINED
        };
        put(added["id"].as_u64(), token, ty)?;
    }
    let mut tokens = Vec::with_capacity(by_id.len());
    let mut types = Vec::with_capacity(by_id.len());
    for (id, entry) in by_id.into_iter().enumerate() {
        let (token, ty) = entry.ok_or_else(|| bad(format!("no token has id {id}")))?;
        tokens.push(token);
        types.push(ty);
    }
    let merges = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            // Older files write "a b", newer ones ["a", "b"].
            Json::String(s) => Some(s.clone()),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => Some(format!("{a} {b}")),
                _ => None,
            },
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("model.merges has an entry that is not a pair of tokens".into()))?;
    // The runtime's own choice of BOS and EOS, so that the export serves like the directory.
    Ok(Vocabulary {
        tokens,
        types,
        merges,
        pre,
        bos: runtime.bos_id(),
        eos: runtime.eos_id(),
    })
}

/// llama.cpp's name of GPT-2's byte-level pre-tokenizer (`tokenizer.ggml.pre`); it refuses "gpt2"
/// ("unknown pre-tokenizer type").
const GPT2_PRE: &str = "gpt-2";

/// The `tokenizer.ggml.pre` name of a `tokenizer.json` pre-tokenizer, if the GGUF loader has it.
fn pre_tokenizer(p: &Json) -> Option<&'static str> {
    // The loader's byte-level step: no prefix space, GPT-2's regex.
    let byte_level = |b: &Json| {
        b["type"] == "ByteLevel" && b["add_prefix_space"] != true && b["use_regex"] != false
    };
    if byte_level(p) {
        return Some(GPT2_PRE);
    }
    match (
        p["type"].as_str(),
        p["pretokenizers"].as_array().map(Vec::as_slice),
    ) {
        (Some("Sequence"), Some([d, b]))
            if d["type"] == "Digits" && d["individual_digits"] == true && byte_level(b) =>
        {
            Some("smollm")
        }
        _ => None,
    }
}

fn read_json<T: serde::de::DeserializeOwned>(dir: &Path, name: &str) -> Result<T, CheckpointError> {
    let path = dir.join(name);
    let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| corrupt(&path, &e))
}

fn read_config(dir: &Path) -> Result<ModelConfig, CheckpointError> {
    let config = read_json::<ModelConfig>(dir, model_dir::CONFIG)?.normalized();
    config
        .validate()
        .map_err(|e| corrupt(&dir.join(model_dir::CONFIG), &e))?;
    Ok(config)
}

fn corrupt(path: &Path, e: &dyn std::fmt::Display) -> CheckpointError {
    CheckpointError::Corrupt(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn byte_vocabulary_is_one_token_per_byte_in_byte_order() {
        let v = byte_vocabulary();
        assert_eq!(v.tokens.len(), 258);
        assert_eq!(v.tokens[b'A' as usize], "A");
        assert_eq!(v.tokens[b' ' as usize], "Ġ");
        assert_eq!(v.tokens[b'\n' as usize], "Ċ");
        let distinct: std::collections::HashSet<_> = v.tokens.iter().collect();
        assert_eq!(distinct.len(), 258);
        assert_eq!((v.bos, v.eos), (Some(256), Some(257)));
        assert_eq!(&v.types[256..], &[TOKEN_CONTROL, TOKEN_CONTROL]);
    }

    #[test]
    fn only_pre_tokenizers_the_loader_has_are_exported() {
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true});
        assert_eq!(pre_tokenizer(&byte_level), Some("gpt-2"));
        let smollm = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]});
        assert_eq!(pre_tokenizer(&smollm), Some("smollm"));
        let prefix = json!({"type": "ByteLevel", "add_prefix_space": true});
        assert_eq!(pre_tokenizer(&prefix), None);
        assert_eq!(pre_tokenizer(&json!({"type": "Metaspace"})), None);
        assert_eq!(pre_tokenizer(&Json::Null), None);
    }

    #[test]
    fn unsupported_tokenizer_json_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!(
            "anneal-gguf-export-{}",
            crate::checkpoint::atomic::writer_tag()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        let byte_level = json!({"type": "ByteLevel"});
        let cases = [
            (json!({"model": {"type": "WordPiece"}}), "model type"),
            (
                json!({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Metaspace"}}),
                "pre-tokenizer",
            ),
            (
                json!({"model": {"type": "BPE", "vocab": {"a": 0, "b": 2}, "merges": []},
                       "pre_tokenizer": byte_level}),
                "no token has id 1",
            ),
        ];
        for (file, want) in cases {
            std::fs::write(&path, file.to_string()).unwrap();
            let err = hf_vocabulary(&path, &ByteTokenizer)
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains(want), "{err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
