//! `anneal-runtime eval`: the gate metrics of a model on a data set: loss, perplexity,
//! token accuracy (teacher-forced) and exact-match accuracy (greedy generation of each
//! response). Prints one JSON object and writes the same to the termination log, which is how
//! the operator reads it.

mod generate;
mod metrics;

pub use generate::greedy;
pub use metrics::{EvalReport, evaluate};

use crate::checkpoint::{CheckpointError, model_dir};
use crate::data::{self, DataError, Split, SplitRatios};
use crate::error::RuntimeError;
use anneal_crds::contract;
use std::path::PathBuf;

/// Arguments of `anneal-runtime eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory written by `train` (path, `file://` or `pvc://`).
    #[arg(long)]
    pub model: String,
    /// A second model (the one served now) evaluated on the same examples in the same process,
    /// reported as `baseline`, so that a gate compares like with like.
    #[arg(long)]
    pub baseline: Option<String>,
    /// The reference a DPO model was aligned against (its base model): preference accuracy
    /// then ranks pairs by the implicit reward, as DPO trained it.
    #[arg(long)]
    pub reference: Option<String>,
    /// Data URI (`file://`, `pvc://`, `builtin:`), split like training data.
    #[arg(long)]
    pub data: String,
    /// File format of the data: auto (from the file name), text or jsonl.
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    pub format: data::DatasetFormat,
    /// Which split to evaluate.
    #[arg(long, value_enum, default_value = "test")]
    pub split: Split,
    /// Train:validation:test ratios; must match the training run's.
    #[arg(long, default_value = "8:1:1")]
    pub split_ratios: String,
    /// Evaluate at most this many examples (the first ones of the split).
    #[arg(long)]
    pub max_examples: Option<usize>,
    /// Longest response generated for exact match.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sequences per teacher-forced batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// CPU threads (fixed for reproducible numbers).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Device: auto, cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Where the result also goes, when that file exists.
    #[arg(long, env = "ANNEAL_TERMINATION_LOG", default_value = contract::TERMINATION_LOG)]
    pub termination_log: PathBuf,
}

/// Why an evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Bad arguments.
    #[error("{0}")]
    Args(String),
    /// The data is missing or malformed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The model directory is missing or corrupt.
    #[error("model: {0}")]
    Model(#[from] CheckpointError),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl From<EvalError> for RuntimeError {
    fn from(e: EvalError) -> Self {
        let msg = e.to_string();
        match e {
            EvalError::Tensor(e) => crate::error::from_tensor_error(&e),
            EvalError::Model(CheckpointError::Io { source, .. })
                if source.kind() != std::io::ErrorKind::NotFound =>
            {
                RuntimeError::Internal(msg)
            }
            _ => RuntimeError::User(msg),
        }
    }
}

fn parse_format(s: &str) -> Result<data::DatasetFormat, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("{s:?}: expected auto, text or jsonl"))
}

fn parse_ratios(s: &str) -> Result<SplitRatios, EvalError> {
    let bad = || {
        EvalError::Args(format!(
            "--split-ratios {s:?}: expected TRAIN:VALIDATION:TEST"
        ))
    };
    let parts: Vec<f64> = s
        .split(':')
        .map(|p| p.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let [train, validation, test] = parts[..] else {
        return Err(bad());
    };
    let r = SplitRatios {
        train,
        validation,
        test,
    };
    r.validate().map_err(EvalError::Args)?;
    Ok(r)
}

/// Runs `anneal-runtime eval`.
pub fn run(args: Args) -> crate::error::Result<()> {
    crate::device::set_cpu_threads(args.threads.max(1));
    let device = crate::device::parse_device(&args.device)?;
    let report = run_eval(&args, &device).map_err(RuntimeError::from)?;
    let json = serde_json::to_string(&report).map_err(|e| RuntimeError::Internal(e.to_string()))?;
    println!("{json}");
    if args.termination_log.exists() {
        let mut bytes = json.into_bytes();
        bytes.truncate(contract::TERMINATION_MESSAGE_MAX_BYTES);
        std::fs::write(&args.termination_log, bytes).map_err(|e| {
            RuntimeError::Internal(format!("{}: {e}", args.termination_log.display()))
        })?;
    }
    Ok(())
}

fn run_eval(args: &Args, device: &candle_core::Device) -> Result<EvalReport, EvalError> {
    let ratios = parse_ratios(&args.split_ratios)?;
    let mut examples = data::split(data::load_as(&args.data, args.format)?, &ratios, args.split);
    if let Some(n) = args.max_examples {
        examples.truncate(n);
    }
    if examples.is_empty() {
        return Err(DataError::Empty(args.data.clone()).into());
    }
    let mut report = eval_model("--model", &args.model, &examples, args, device)?;
    if let Some(baseline) = &args.baseline {
        let base = eval_model("--baseline", baseline, &examples, args, device)?;
        report.baseline = Some(Box::new(base));
    }
    Ok(report)
}

/// The model named by `flag` = `uri`: a model directory, or any base model `train` reads (a
/// GGUF file, a Hugging Face directory), so that a base model's scores can be compared.
fn load_model(
    flag: &str,
    uri: &str,
    device: &candle_core::Device,
) -> Result<model_dir::LoadedModel, EvalError> {
    let path = data::resolve_path(uri)?
        .ok_or_else(|| EvalError::Args(format!("{flag} {uri}: not a file location")))?;
    if !path.exists() {
        return Err(EvalError::Args(format!(
            "{flag} {}: no such model",
            path.display()
        )));
    }
    if path.join(crate::checkpoint::atomic::MANIFEST).exists() {
        return Ok(model_dir::load(&path, device)?);
    }
    let base = crate::train::base::load(&path, device)?;
    let tokenizer = base.tokenizer()?;
    let vb = candle_nn::VarBuilder::from_tensors(base.tensors, candle_core::DType::F32, device);
    let model = crate::model::Transformer::new(&base.config, &vb, device)?;
    Ok(model_dir::LoadedModel {
        config: base.config,
        model,
        tokenizer,
        sha256: crate::checkpoint::atomic::sha256_file(&path).unwrap_or_default(),
        chat_template: base.text.chat_template,
    })
}

/// Loads the model directory named by `flag` = `uri` and scores `examples` with it.
fn eval_model(
    flag: &str,
    uri: &str,
    examples: &[data::Example],
    args: &Args,
    device: &candle_core::Device,
) -> Result<EvalReport, EvalError> {
    let dir = data::resolve_path(uri)?
        .ok_or_else(|| EvalError::Args(format!("{flag} {uri}: not a file location")))?;
    let loaded = load_model(flag, uri, device)?;
    let reference = match &args.reference {
        Some(uri) => Some(load_model("--reference", uri, device)?),
        None => None,
    };
    let mut report = evaluate(
        &loaded,
        reference.as_ref(),
        examples,
        args.batch_size.max(1),
        args.max_new_tokens,
        device,
    )?;
    report.model_path = dir.display().to_string();
    report.data = args.data.clone();
    report.split = args.split;
    Ok(report)
}
