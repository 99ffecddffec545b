//! Loss, perplexity, token accuracy and exact match over a set of examples.

use super::{EvalError, generate::greedy};
use crate::checkpoint::model_dir::LoadedModel;
use crate::data::{Batch, Example, Prompt, Sample, Split, tokenize};
use crate::train::dpo::sequence_logps;
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
    /// Share of preference pairs whose chosen answer the model prefers (by its implicit reward
    /// against `--reference` when given); null for data without pairs.
    pub preference_accuracy: Option<f64>,
    /// The same measured for `--baseline`, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Box<EvalReport>>,
}

/// The prompt and expected answer of an example, if it has one: a pair's response, a chat's
/// last assistant message, a preference pair's chosen answer.
fn answered(example: &Example) -> Option<(Prompt, String)> {
    match example {
        Example::Pair { prompt, response } => {
            Some((Prompt::Text(prompt.clone()), response.clone()))
        }
        Example::Preference { prompt, chosen, .. } => Some((prompt.clone(), chosen.clone())),
        Example::Chat { messages } => {
            let last = messages.iter().rposition(|m| m.role == "assistant")?;
            Some((
                Prompt::Messages(messages[..last].to_vec()),
                messages[last].content.clone(),
            ))
        }
        Example::Text { .. } => None,
    }
}

/// The summed answer log-probability of each sample under `model`, `batch_size` at a time.
fn answer_logps(
    model: &LoadedModel,
    samples: &[Sample],
    batch_size: usize,
    device: &Device,
) -> Result<Vec<f64>, EvalError> {
    let pad = model.tokenizer.eos_id().unwrap_or(0);
    let vocab = model.config.vocab_size;
    let mut out = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(batch_size) {
        let refs: Vec<_> = chunk.iter().collect();
        let batch = Batch::new(&refs, pad, device)?;
        let t = batch.inputs.dim(1)?;
        let logits = model
            .model
            .forward(&batch.inputs, 0, None)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let targets = batch.targets.flatten_all()?.to_vec1::<u32>()?;
        let mask = batch.mask.flatten_all()?.to_vec1::<f32>()?;
        let rows: Vec<_> = (0..chunk.len()).map(|r| r * t..(r + 1) * t).collect();
        out.extend(sequence_logps(&logits, &targets, &mask, vocab, &rows));
    }
    Ok(out)
}

/// The chosen and the rejected sample of every preference pair in `examples` (pairs whose
/// answers do not fit the model are skipped).
fn preference_samples(model: &LoadedModel, examples: &[Example]) -> Result<Vec<Sample>, EvalError> {
    let format = model.format()?;
    let mut samples = Vec::new();
    for e in examples
        .iter()
        .filter(|e| matches!(e, Example::Preference { .. }))
    {
        if let Some((c, r)) =
            format.preference(model.tokenizer.as_ref(), e, model.config.max_seq_len)?
        {
            samples.extend([c, r]);
        }
    }
    Ok(samples)
}

/// The share of preference pairs in `examples` whose chosen answer `model` prefers: by its
/// implicit DPO reward (log-probability minus `reference`'s) when a reference is given, by its
/// log-probability otherwise; strictly (a tie is not a preference). `None` without pairs.
pub fn preference_accuracy(
    model: &LoadedModel,
    reference: Option<&LoadedModel>,
    examples: &[Example],
    batch_size: usize,
    device: &Device,
) -> Result<Option<f64>, EvalError> {
    let samples = preference_samples(model, examples)?;
    if samples.is_empty() {
        return Ok(None);
    }
    let mut scores = answer_logps(model, &samples, batch_size, device)?;
    if let Some(r) = reference {
        if r.tokenizer.vocab_size() != model.tokenizer.vocab_size() {
            return Err(EvalError::Args(
                "--reference has another tokenizer than --model".into(),
            ));
        }
        let base = answer_logps(r, &samples, batch_size, device)?;
        scores.iter_mut().zip(base).for_each(|(s, b)| *s -= b);
    }
    let pairs = scores.len() / 2;
    let right = scores.chunks_exact(2).filter(|p| p[0] > p[1]).count();
    Ok(Some(right as f64 / pairs as f64))
}

/// Scores `examples` with `loaded`; preference pairs are ranked against `reference` (the DPO
/// reference) when given.
pub fn evaluate(
    loaded: &LoadedModel,
    reference: Option<&LoadedModel>,
    examples: &[Example],
    batch_size: usize,
    max_new_tokens: usize,
    device: &Device,
) -> Result<EvalReport, EvalError> {
    let tok = loaded.tokenizer.as_ref();
    let format = loaded.format()?;
    let answers: Vec<(Prompt, String)> = examples.iter().filter_map(answered).collect();
    let with_answers = answers.len() == examples.len();
    let seq_len = loaded.config.max_seq_len;
    // Teacher-forced scores: on the answers where every example has one, on all text otherwise.
    let samples = if with_answers {
        let mut samples = Vec::new();
        for (prompt, response) in &answers {
            samples.extend(format.completion(tok, prompt, response, seq_len)?);
        }
        samples
    } else {
        tokenize(examples, tok, &format, false, seq_len)?
    };
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
    let exact_match = if with_answers {
        let stops = crate::data::format::stop_ids(tok);
        let mut hits = 0usize;
        for (prompt, response) in &answers {
            let ids = format.prompt_ids(tok, prompt)?;
            let out = greedy(&loaded.model, &ids, max_new_tokens, &stops, device)?;
            let text = tok.decode(&out).map_err(crate::data::DataError::from)?;
            hits += usize::from(text.trim() == response.trim());
        }
        Some(hits as f64 / examples.len() as f64)
    } else {
        None
    };
    let preference_accuracy = preference_accuracy(loaded, reference, examples, batch_size, device)?;
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
        preference_accuracy,
        baseline: None,
    })
}
