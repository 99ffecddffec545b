//! The trained model directory that `train` outputs and `eval` and `serve` load:
//! `model.safetensors`, `config.json` (the [`ModelConfig`]), `tokenizer_config.json` (the
//! [`TokenizerSpec`], plus `tokenizer.json` for a Hugging Face tokenizer) and `MANIFEST.json`
//! with the sha256 of each. The directory is committed atomically like a checkpoint.

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
}

/// Writes a model directory at `dest` atomically; `tokenizer_source` is the directory that a
/// Hugging Face tokenizer's relative path is taken from. Returns the weights' sha256.
pub fn save(
    dest: &Path,
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    tokenizer: &TokenizerSpec,
    tokenizer_source: &Path,
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
        let spec = match tokenizer {
            TokenizerSpec::Byte => TokenizerSpec::Byte,
            TokenizerSpec::Huggingface { path } => {
                let src = tokenizer_source.join(path);
                std::fs::copy(&src, tmp.join("tokenizer.json")).map_err(|e| io(&src, e))?;
                TokenizerSpec::Huggingface {
                    path: "tokenizer.json".into(),
                }
            }
        };
        atomic::write_synced(&tmp.join(TOKENIZER_CONFIG), &json(&spec)?)?;
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
    Ok(LoadedModel {
        config,
        model,
        tokenizer,
        sha256,
    })
}

/// Pretty JSON of one of the small files of a model directory.
fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, CheckpointError> {
    serde_json::to_vec_pretty(value).map_err(|e| CheckpointError::Format(e.to_string()))
}
