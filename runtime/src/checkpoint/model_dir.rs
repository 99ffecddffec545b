//! The trained model directory that `train` outputs and `eval` and `serve` load:
//! `model.safetensors`, `config.json` (the [`ModelConfig`]), `tokenizer_config.json` (the
//! [`TokenizerSpec`], plus `tokenizer.json` for a Hugging Face tokenizer), the chat template of
//! a model fine-tuned from a chat model (`chat_template.jinja`, as Hugging Face saves it), and
//! `MANIFEST.json` with the sha256 of each. The directory is committed atomically like a
//! checkpoint.

use super::{CheckpointError, atomic, io};
use crate::model::{ModelConfig, Transformer};
use crate::tokenizer::{TOKENIZER_CONFIG, Tokenizer, TokenizerSpec};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Weights file of a model directory.
pub const WEIGHTS: &str = "model.safetensors";
/// Architecture file of a model directory.
pub const CONFIG: &str = "config.json";
/// Chat template file of a model directory (absent for models trained from scratch).
pub const CHAT_TEMPLATE: &str = "chat_template.jinja";
/// Hugging Face tokenizer file of a model directory.
pub const TOKENIZER_JSON: &str = "tokenizer.json";

/// What a model directory records about reading and writing text: the tokenizer (its spec, and
/// the `tokenizer.json` content for a Hugging Face one) and the chat template, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct TextFiles {
    /// The tokenizer; a Hugging Face one is saved as `tokenizer.json` whatever its path.
    pub spec: TokenizerSpec,
    /// `tokenizer.json` (for a Hugging Face tokenizer).
    pub tokenizer_json: Option<Vec<u8>>,
    /// The chat template's source.
    pub chat_template: Option<String>,
}

impl TextFiles {
    /// The byte tokenizer and no template (a model trained from scratch).
    pub fn byte() -> Self {
        Self {
            spec: TokenizerSpec::Byte,
            tokenizer_json: None,
            chat_template: None,
        }
    }

    /// A Hugging Face tokenizer read from `path`, with `bos`/`eos` named when known.
    pub fn huggingface(
        path: &Path,
        bos: Option<String>,
        eos: Option<String>,
        chat_template: Option<String>,
    ) -> Result<Self, CheckpointError> {
        Ok(Self {
            spec: TokenizerSpec::Huggingface {
                path: TOKENIZER_JSON.into(),
                bos,
                eos,
            },
            tokenizer_json: Some(std::fs::read(path).map_err(|e| io(path, e))?),
            chat_template,
        })
    }
}

/// A loaded model directory.
pub struct LoadedModel {
    /// Architecture.
    pub config: ModelConfig,
    /// The model.
    pub model: Transformer,
    /// Its tokenizer.
    pub tokenizer: Box<dyn Tokenizer>,
    /// sha256 of `model.safetensors`: the identity of the weights.
    pub sha256: String,
    /// Its chat template, if it was fine-tuned from a chat model.
    pub chat_template: Option<String>,
}

impl LoadedModel {
    /// How this model reads prompts and writes answers.
    pub fn format(&self) -> Result<crate::data::Format, crate::data::DataError> {
        crate::data::Format::new(self.tokenizer.as_ref(), self.chat_template.as_deref())
    }
}

/// Writes a model directory at `dest` atomically. Returns the weights' sha256.
pub fn save(
    dest: &Path,
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    text: &TextFiles,
) -> Result<String, CheckpointError> {
    save_with(dest, config, tensors, text, |_| Ok(()))
}

/// [`save`], with `extra` writing more files into the directory before it is committed (they
/// are in its manifest like the others).
pub fn save_with(
    dest: &Path,
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    text: &TextFiles,
    extra: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<String, CheckpointError> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = parent.join(format!(".tmp-{name}-{}", atomic::writer_tag()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| io(&tmp, e))?;
    let result = (|| {
        candle_core::safetensors::save(tensors, tmp.join(WEIGHTS))?;
        atomic::write_synced(&tmp.join(CONFIG), &json(config)?)?;
        let spec = match (&text.spec, &text.tokenizer_json) {
            (TokenizerSpec::Byte, _) => TokenizerSpec::Byte,
            (TokenizerSpec::Huggingface { bos, eos, .. }, Some(content)) => {
                atomic::write_synced(&tmp.join(TOKENIZER_JSON), content)?;
                TokenizerSpec::Huggingface {
                    path: TOKENIZER_JSON.into(),
                    bos: bos.clone(),
                    eos: eos.clone(),
                }
            }
            (TokenizerSpec::Huggingface { .. }, None) => {
                return Err(CheckpointError::Format(
                    "a Hugging Face tokenizer without its tokenizer.json".into(),
                ));
            }
        };
        atomic::write_synced(&tmp.join(TOKENIZER_CONFIG), &json(&spec)?)?;
        if let Some(template) = &text.chat_template {
            atomic::write_synced(&tmp.join(CHAT_TEMPLATE), template.as_bytes())?;
        }
        extra(&tmp)?;
        let manifest = atomic::commit_dir(&tmp, dest, || Ok(()))?;
        Ok(manifest.files.get(WEIGHTS).cloned().unwrap_or_default())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Verifies and loads a model directory onto `device`.
pub fn load(dir: &Path, device: &Device) -> Result<LoadedModel, CheckpointError> {
    let manifest = atomic::verify_dir(dir)?;
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).map_err(|e| io(&p, e))
    };
    let corrupt = |name: &str, e: &dyn std::fmt::Display| {
        CheckpointError::Corrupt(format!("{}: {e}", dir.join(name).display()))
    };
    let config: ModelConfig =
        serde_json::from_slice(&read(CONFIG)?).map_err(|e| corrupt(CONFIG, &e))?;
    let config = config.normalized();
    config.validate().map_err(|e| corrupt(CONFIG, &e))?;
    let spec: TokenizerSpec = serde_json::from_slice(&read(TOKENIZER_CONFIG)?)
        .map_err(|e| corrupt(TOKENIZER_CONFIG, &e))?;
    let tokenizer = spec.load(dir).map_err(|e| corrupt(TOKENIZER_CONFIG, &e))?;
    let tensors = candle_core::safetensors::load_buffer(&read(WEIGHTS)?, device)
        .map_err(|e| corrupt(WEIGHTS, &e))?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    let model = Transformer::new(&config, &vb, device).map_err(|e| corrupt(WEIGHTS, &e))?;
    let sha256 = manifest.files.get(WEIGHTS).cloned().unwrap_or_default();
    let chat_template = match manifest.files.contains_key(CHAT_TEMPLATE) {
        true => {
            Some(String::from_utf8(read(CHAT_TEMPLATE)?).map_err(|e| corrupt(CHAT_TEMPLATE, &e))?)
        }
        false => None,
    };
    Ok(LoadedModel {
        config,
        model,
        tokenizer,
        sha256,
        chat_template,
    })
}

/// Pretty JSON of one of the small files of a model directory.
fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, CheckpointError> {
    serde_json::to_vec_pretty(value).map_err(|e| CheckpointError::Format(e.to_string()))
}
