//! Loss, perplexity, token accuracy and exact match over a set of examples.

use super::{EvalError, generate::greedy};
use crate::checkpoint::model_dir::LoadedModel;
use crate::data::{Batch, Example, Split, tokenize};
use crate::train::loss::masked_nll_sum;
use candle_core::{D, DType, Device};
use serde::Serialize;

/// The JSON `eval` prints (well under the 4 KB termination-message limit).
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Always `"eval"`.
    pub event: &'static str,
    /// Model directory evaluated.
    pub model_path: String,
    /// sha256 of its weights (`model.safetensors`).
    pub model_sha256: String,
    /// Data URI.
    pub data: String,
    /// Split evaluated.
    pub split: Split,
    /// Examples evaluated.
    pub examples: usize,
    /// Predictions scored (response tokens for prompt/response data, all tokens for text).
    pub tokens: usize,
    /// Mean negative log-likelihood per scored token.
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Share of scored tokens whose most likely prediction is right (teacher-forced).
    pub token_accuracy: f64,
    /// Share of prompt/response examples whose greedy response equals the reference
    /// (whitespace-trimmed); null for free-text data.
    pub exact_match: Option<f64>,
    /// The same measured for `--baseline`, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Box<EvalReport>>,
}

/// Scores `examples` with `loaded`.
pub fn evaluate(
    loaded: &LoadedModel,
    examples: &[Example],
    batch_size: usize,
    max_new_tokens: usize,
    device: &Device,
) -> Result<EvalReport, EvalError> {
    let pairs = examples.iter().all(|e| matches!(e, Example::Pair { .. }));
    let tok = loaded.tokenizer.as_ref();
    let samples = tokenize(examples, tok, pairs, loaded.config.max_seq_len)?;
    let pad = tok.eos_id().unwrap_or(0);
    let (mut nll, mut tokens, mut correct) = (0f64, 0usize, 0usize);
    for chunk in samples.chunks(batch_size) {
        let refs: Vec<_> = chunk.iter().collect();
        let batch = Batch::new(&refs, pad, device)?;
        let logits = loaded.model.forward(&batch.inputs, 0, None)?;
        nll += f64::from(masked_nll_sum(&logits, &batch.targets, &batch.mask)?.to_scalar::<f32>()?);
        let hits = logits
            .argmax(D::Minus1)?
            .eq(&batch.targets)?
            .to_dtype(DType::F32)?;
        correct += (hits * &batch.mask)?.sum_all()?.to_scalar::<f32>()? as usize;
        tokens += batch.n_tokens;
    }
    let exact_match = if pairs {
        let mut hits = 0usize;
        for e in examples {
            let Example::Pair { prompt, response } = e else {
                continue;
            };
            let mut ids: Vec<u32> = tok.bos_id().into_iter().collect();
            ids.extend(tok.encode(prompt).map_err(crate::data::DataError::from)?);
            let out = greedy(&loaded.model, &ids, max_new_tokens, tok.eos_id(), device)?;
            let text = tok.decode(&out).map_err(crate::data::DataError::from)?;
            hits += usize::from(text.trim() == response.trim());
        }
        Some(hits as f64 / examples.len() as f64)
    } else {
        None
    };
    let loss = nll / tokens.max(1) as f64;
    Ok(EvalReport {
        event: "eval",
        model_path: String::new(),
        model_sha256: loaded.sha256.clone(),
        data: String::new(),
        split: Split::Test,
        examples: examples.len(),
        tokens,
        loss,
        perplexity: loss.exp(),
        token_accuracy: correct as f64 / tokens.max(1) as f64,
        exact_match,
        baseline: None,
    })
}
