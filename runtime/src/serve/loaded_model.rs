//! What the server serves: the shared transformer, its tokenizer and chat template, loaded from
//! a GGUF file or from a model directory written by `anneal-runtime train`.

use super::chat_template::{ChatTemplate, TemplateError};
use crate::data::format::{special_names, stop_ids};
use crate::gguf::{GgufError, GgufFile, GgufTokenizer, GgufWeights, Q41Policy, model_config};
use crate::model::Transformer;
use crate::tokenizer::Tokenizer;
use candle_core::Device;
use std::path::Path;
use std::sync::Arc;

/// The model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A malformed or unsupported GGUF file.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The weights do not fit the architecture.
    #[error("building the model: {0}")]
    Model(#[from] candle_core::Error),
    /// The chat template does not compile.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// A model directory written by `train` that does not load.
    #[error("model directory: {0}")]
    ModelDir(#[from] crate::checkpoint::CheckpointError),
}

impl From<LoadError> for crate::error::RuntimeError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Gguf(g) => g.into(),
            other => crate::error::RuntimeError::User(other.to_string()),
        }
    }
}

/// A model ready to serve.
pub struct LoadedModel {
    /// The name `/v1/models` reports and requests may use.
    pub id: String,
    /// The network.
    pub transformer: Transformer,
    /// Its tokenizer.
    pub tokenizer: Arc<dyn Tokenizer>,
    /// Its chat template.
    pub chat_template: ChatTemplate,
    /// Tokens that end a generation (EOS and the chat turn end).
    pub stop_ids: Vec<u32>,
}

/// Loads `path` onto `device`: a model directory written by `anneal-runtime train`, or a GGUF
/// file (llama family).
pub fn load(
    path: &Path,
    policy: Q41Policy,
    max_seq_len: Option<usize>,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    let loaded = if path.is_dir() {
        load_model_dir(path, max_seq_len, device)?
    } else {
        load_gguf(path, policy, max_seq_len, device)?
    };
    // A GPU copies weights on the loading thread's stream; the engine runs on another thread.
    device.synchronize()?;
    Ok(loaded)
}

fn load_model_dir(
    path: &Path,
    max_seq_len: Option<usize>,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    let loaded = crate::checkpoint::model_dir::load(path, device)?;
    let mut transformer = loaded.model;
    if let Some(m) = max_seq_len {
        // The RoPE tables cover the trained length; a smaller limit only bounds the caches.
        transformer.config.max_seq_len = transformer.config.max_seq_len.min(m);
    }
    let tokenizer: Arc<dyn Tokenizer> = Arc::from(loaded.tokenizer);
    // A model fine-tuned from a chat model keeps its template; models trained from scratch
    // have none: ChatML text, which a byte-level tokenizer encodes like any other text.
    let (bos, eos) = special_names(tokenizer.as_ref());
    let chat_template = ChatTemplate::new(loaded.chat_template.as_deref(), &bos, &eos)?;
    let stop_ids = stop_ids(tokenizer.as_ref());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id = format!(
        "{name}@{}",
        loaded.sha256.get(..12).unwrap_or(&loaded.sha256)
    );
    Ok(LoadedModel {
        id,
        transformer,
        tokenizer,
        chat_template,
        stop_ids,
    })
}

fn load_gguf(
    path: &Path,
    policy: Q41Policy,
    max_seq_len: Option<usize>,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    let file = GgufFile::open(path)?;
    let mut config = model_config(&file.header)?;
    if let Some(m) = max_seq_len {
        config.max_seq_len = config.max_seq_len.min(m);
    }
    let transformer = Transformer::new(&config, &GgufWeights::new(&file, device, policy), device)?;
    let tokenizer = GgufTokenizer::from_header(&file.header)?;
    let (bos, eos) = special_names(&tokenizer);
    let template = file.header.get_str("tokenizer.chat_template").ok();
    let chat_template = ChatTemplate::new(template, &bos, &eos)?;
    let stop_ids = stop_ids(&tokenizer);
    let id = file
        .header
        .get_str("general.name")
        .map(str::to_string)
        .unwrap_or_else(|_| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
    Ok(LoadedModel {
        id,
        transformer,
        tokenizer: Arc::new(tokenizer),
        chat_template,
        stop_ids,
    })
}
