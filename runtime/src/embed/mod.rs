//! Sentence embeddings with a BERT-family encoder (all-MiniLM-L6-v2 and its kind): a
//! sentence-transformers model directory (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `modules.json`, the pooling module's `config.json`), run through candle-transformers' `bert`
//! model, pooled and normalised as the directory's modules say.
//!
//! [`batcher`] runs the model on its own thread and batches waiting inputs by a token budget.

pub mod batcher;
mod cpu_bert;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde::Deserialize;
use std::path::Path;

/// The model directory does not hold a usable embedding model.
#[derive(Debug, thiserror::Error)]
#[error("embedding model {dir}: {msg}")]
pub struct LoadError {
    dir: String,
    msg: String,
}

/// How token vectors become one sentence vector (sentence-transformers' `Pooling` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over the sentence's tokens (padding excluded).
    Mean,
    /// The first token's vector (`[CLS]`).
    Cls,
    /// The element-wise maximum over the sentence's tokens.
    Max,
}

/// The encoder: anneal's own kernels over packed sequences on the CPU, candle-transformers'
/// `bert` (padded batches) on a GPU.
enum Encoder {
    Cpu(cpu_bert::CpuBert),
    Candle(BertModel),
}

/// A loaded embedding model.
pub struct EmbeddingModel {
    encoder: Encoder,
    /// Its tokenizer (truncation and padding turned off: the batcher pads).
    pub tokenizer: tokenizers::Tokenizer,
    /// How token vectors are pooled.
    pub pooling: Pooling,
    /// Whether sentence vectors are L2-normalised (a `Normalize` module).
    pub normalize: bool,
    /// Most tokens per input, special tokens included.
    pub max_tokens: usize,
    /// Vector length.
    pub dimensions: usize,
    /// Id of the padding token.
    pad_id: u32,
    device: Device,
}

/// Whether `dir` holds a BERT-family encoder (a `config.json` whose `model_type` is `bert` or
/// whose `architectures` names a Bert model) rather than a generative model.
pub fn is_embedding_model(dir: &Path) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        model_type: Option<String>,
        #[serde(default)]
        architectures: Vec<String>,
    }
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    let Ok(probe) = serde_json::from_str::<Probe>(&text) else {
        return false;
    };
    probe.model_type.as_deref() == Some("bert")
        || probe.architectures.iter().any(|a| a.starts_with("Bert"))
}

#[derive(Deserialize)]
struct Module {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize, Default)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Deserialize, Default)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

impl EmbeddingModel {
    /// Loads the sentence-transformers directory `dir` onto `device` (f32).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, LoadError> {
        let fail = |msg: String| LoadError {
            dir: dir.display().to_string(),
            msg,
        };
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| fail(format!("{name}: {e}")))
        };
        let config: Config = serde_json::from_str(&read("config.json")?)
            .map_err(|e| fail(format!("config.json: {e}")))?;
        // Without modules.json a directory is a plain transformers model: sentence-transformers
        // then pools by the mean and does not normalise; so do we.
        let modules: Vec<Module> = match dir.join("modules.json").exists() {
            true => serde_json::from_str(&read("modules.json")?)
                .map_err(|e| fail(format!("modules.json: {e}")))?,
            false => Vec::new(),
        };
        let pooling = match modules.iter().find(|m| m.kind.ends_with(".Pooling")) {
            Some(m) => {
                let name = format!("{}/config.json", m.path);
                let p: PoolingConfig = serde_json::from_str(&read(&name)?)
                    .map_err(|e| fail(format!("{name}: {e}")))?;
                pooling_of(&p).map_err(|e| fail(format!("{name}: {e}")))?
            }
            None => Pooling::Mean,
        };
        if let Some(m) = modules.iter().find(|m| {
            !m.kind.ends_with(".Transformer")
                && !m.kind.ends_with(".Pooling")
                && !m.kind.ends_with(".Normalize")
        }) {
            return Err(fail(format!(
                "modules.json: module {} ({}) is not supported (Transformer, Pooling and Normalize are)",
                m.path, m.kind
            )));
        }
        let normalize = modules.iter().any(|m| m.kind.ends_with(".Normalize"));
        let st: SentenceBertConfig = match dir.join("sentence_bert_config.json").exists() {
            true => serde_json::from_str(&read("sentence_bert_config.json")?)
                .map_err(|e| fail(format!("sentence_bert_config.json: {e}")))?,
            false => SentenceBertConfig::default(),
        };
        let max_tokens = st
            .max_seq_length
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| fail(format!("tokenizer.json: {e}")))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| fail(format!("tokenizer.json: {e}")))?;
        let weights = dir.join(crate::checkpoint::model_dir::WEIGHTS);
        if !weights.exists() {
            return Err(fail(format!(
                "{} is missing",
                crate::checkpoint::model_dir::WEIGHTS
            )));
        }
        // SAFETY: the file is mapped read-only; a model directory is not rewritten in place
        // (a new model is a new directory, pinned by digest).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .map_err(|e| fail(format!("model.safetensors: {e}")))?;
        let encoder = if device.is_cpu() {
            cpu_bert::CpuBert::load(vb, &config).map(Encoder::Cpu)
        } else {
            BertModel::load(vb, &config).map(Encoder::Candle)
        }
        .map_err(|e| fail(format!("weights: {e}")))?;
        Ok(Self {
            encoder,
            tokenizer,
            pooling,
            normalize,
            max_tokens,
            dimensions: config.hidden_size,
            pad_id: config.pad_token_id as u32,
            device: device.clone(),
        })
    }

    /// Token ids of `text` with the tokenizer's special tokens (`[CLS] ... [SEP]`), untruncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    /// The sentence vectors of `inputs` (token ids, each at most [`Self::max_tokens`] long),
    /// computed as one batch.
    pub fn embed(&self, inputs: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let d = self.dimensions;
        if inputs.iter().any(|i| i.is_empty()) {
            candle_core::bail!("an input has no tokens");
        }
        // Each input's token rows: packed on the CPU, the unpadded part of its row of the padded
        // batch on a GPU.
        let (hidden, starts, stride): (Vec<f32>, Vec<usize>, usize) = match &self.encoder {
            Encoder::Cpu(bert) => {
                let starts = inputs
                    .iter()
                    .scan(0, |at, i| {
                        let s = *at;
                        *at += i.len();
                        Some(s)
                    })
                    .collect();
                (bert.forward(inputs)?, starts, d)
            }
            Encoder::Candle(bert) => {
                let width = inputs.iter().map(|i| i.len()).max().unwrap_or(0);
                let hidden = self.padded_forward(bert, inputs, width)?;
                let starts = (0..inputs.len()).map(|i| i * width).collect();
                (hidden, starts, d)
            }
        };
        Ok(inputs
            .iter()
            .zip(starts)
            .map(|(input, start)| {
                let rows = &hidden[start * stride..(start + input.len()) * stride];
                let mut v = pool(self.pooling, rows, d);
                if self.normalize {
                    normalize(&mut v);
                }
                v
            })
            .collect())
    }

    /// candle-transformers' forward pass over `inputs` padded to `width`: (n * width, d) values.
    fn padded_forward(
        &self,
        bert: &BertModel,
        inputs: &[&[u32]],
        width: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let n = inputs.len();
        let mut ids = vec![self.pad_id; n * width];
        let mut mask = vec![0u32; n * width];
        for (row, input) in inputs.iter().enumerate() {
            ids[row * width..row * width + input.len()].copy_from_slice(input);
            mask[row * width..row * width + input.len()].fill(1);
        }
        let ids = Tensor::from_vec(ids, (n, width), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, width), &self.device)?;
        let types = ids.zeros_like()?;
        bert.forward(&ids, &types, Some(&mask))?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()
    }
}

/// One vector of `rows` (a sentence's token vectors, `d` wide).
fn pool(pooling: Pooling, rows: &[f32], d: usize) -> Vec<f32> {
    let n = rows.len() / d;
    match pooling {
        Pooling::Cls => rows[..d].to_vec(),
        Pooling::Mean => {
            let mut v = vec![0f32; d];
            for row in rows.chunks_exact(d) {
                v.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
            v.iter_mut().for_each(|a| *a /= n as f32);
            v
        }
        Pooling::Max => {
            let mut v = vec![f32::NEG_INFINITY; d];
            for row in rows.chunks_exact(d) {
                v.iter_mut().zip(row).for_each(|(a, b)| *a = a.max(*b));
            }
            v
        }
    }
}

/// Scales `v` to length 1 (a zero vector stays zero), as sentence-transformers' `Normalize`.
fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

fn pooling_of(p: &PoolingConfig) -> Result<Pooling, String> {
    match (
        p.pooling_mode_mean_tokens,
        p.pooling_mode_cls_token,
        p.pooling_mode_max_tokens,
        p.pooling_mode_mean_sqrt_len_tokens,
    ) {
        (true, false, false, false) => Ok(Pooling::Mean),
        (false, true, false, false) => Ok(Pooling::Cls),
        (false, false, true, false) => Ok(Pooling::Max),
        _ => Err("exactly one of pooling_mode_mean_tokens, pooling_mode_cls_token and pooling_mode_max_tokens must be true (other modes are not supported)".into()),
    }
}

/// Shortens a sentence vector to its first `dims` values (Matryoshka-style, as OpenAI's
/// `dimensions` and sentence-transformers' `truncate_dim` do), normalised again when the model
/// normalises.
pub fn shorten(mut v: Vec<f32>, dims: usize, renormalize: bool) -> Vec<f32> {
    if dims >= v.len() {
        return v;
    }
    v.truncate(dims);
    if renormalize {
        normalize(&mut v);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pooling_mode_is_required() {
        let p = |mean, cls, max| PoolingConfig {
            pooling_mode_mean_tokens: mean,
            pooling_mode_cls_token: cls,
            pooling_mode_max_tokens: max,
            pooling_mode_mean_sqrt_len_tokens: false,
        };
        assert_eq!(pooling_of(&p(true, false, false)), Ok(Pooling::Mean));
        assert_eq!(pooling_of(&p(false, true, false)), Ok(Pooling::Cls));
        assert!(pooling_of(&p(true, true, false)).is_err());
        assert!(pooling_of(&p(false, false, false)).is_err());
    }

    #[test]
    fn a_shortened_vector_is_normalised_again() {
        let v = shorten(vec![3.0, 4.0, 12.0], 2, true);
        assert_eq!(v, vec![0.6, 0.8]);
        assert_eq!(shorten(vec![3.0, 4.0, 12.0], 2, false), vec![3.0, 4.0]);
        assert_eq!(shorten(vec![1.0], 4, true), vec![1.0]);
    }
}
