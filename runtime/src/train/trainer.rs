//! The training state and one optimizer step; checkpoint save and restore of that state.

use super::TrainError;
use super::config::{Stage, TrainConfig};
use super::fused::{self, FusedStep};
use super::loss::masked_nll_sum;
use super::optim::{self, AdamW};
use super::resume::{self, JobIdentity};
use crate::checkpoint::{CheckpointDir, CheckpointError, atomic, model_dir};
use crate::data::{self, Batch, Cursor, Loader, Split};
use crate::model::{ModelConfig, Transformer, init_params};
use crate::rng::Rng;
use crate::tokenizer::{Tokenizer, TokenizerSpec};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `state.json` of a checkpoint: everything besides tensors that resume needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Attempt that wrote the checkpoint.
    pub attempt: u64,
    /// Data loader position.
    pub cursor: Cursor,
    /// Trainer RNG state (reserved for stochastic training features; saved so they resume too).
    pub rng: Rng,
    /// AdamW bias-correction step.
    pub optimizer_step: u64,
    /// Architecture, to refuse resuming into a different model.
    pub model: ModelConfig,
    /// The configuration of the run that wrote it: a resume compares its own with it
    /// ([`resume::check`]).
    pub config: TrainConfig,
    /// The job that wrote it; `None` in checkpoints of runtimes that did not record it.
    #[serde(default)]
    pub job: Option<JobIdentity>,
    /// [`resume::spec_digest`] of the run that wrote it, for people and tools; `None` in older
    /// checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_digest: Option<String>,
}

/// Summary of one optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Mean loss per counted token.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Input tokens processed.
    pub tokens: usize,
}

/// A model being trained.
pub struct Trainer {
    /// The run's configuration.
    pub config: TrainConfig,
    /// Architecture (with the vocabulary size filled in).
    pub model_config: ModelConfig,
    /// The model, whose weights are the variables in `varmap`.
    pub model: Transformer,
    /// All weights, trainable or frozen.
    pub varmap: VarMap,
    /// Optimizer over the trainable weights.
    pub optimizer: AdamW,
    /// Training batches.
    pub loader: Loader,
    /// Tokenizer.
    pub tokenizer: Box<dyn Tokenizer>,
    /// Tokenizer to record in the output, and the directory its file is relative to.
    pub tokenizer_spec: (TokenizerSpec, PathBuf),
    /// Optimizer steps done.
    pub step: u64,
    /// Trainer RNG.
    pub rng: Rng,
    /// What the forward and backward passes compute in: f32, or bf16 on a copy of the model
    /// cast from the f32 master weights each step (gradients come back f32 through the casts).
    pub compute_dtype: DType,
    /// The job this run trains for: recorded in its checkpoints, and a resume refuses another
    /// job's (a local run by default).
    pub job: JobIdentity,
    /// The gang this rank trains with ([`super::gang`]); a ring of one for a lone worker.
    pub gang: crate::dist::Ring,
    /// The hand-written CPU f32 step's buffers, when it serves this model.
    fused: Option<FusedStep>,
    device: Device,
    pad: u32,
}

impl Trainer {
    /// Builds model, optimizer and data for `config` at step 0.
    pub fn new(config: TrainConfig, device: Device) -> Result<Self, TrainError> {
        let h = &config.hyperparameters;
        let base = match &config.model.base {
            Some(uri) => Some(resolve(uri)?),
            None => None,
        };
        let (model_config, base_tensors, tokenizer, tokenizer_spec) = match &base {
            Some(dir) => {
                let loaded = model_dir::load(dir, &device).map_err(TrainError::Base)?;
                let spec: TokenizerSpec = read_json(&dir.join(crate::tokenizer::TOKENIZER_CONFIG))?;
                let tensors =
                    candle_core::safetensors::load(dir.join(model_dir::WEIGHTS), &device)?;
                (
                    loaded.config,
                    Some(tensors),
                    loaded.tokenizer,
                    (spec, dir.clone()),
                )
            }
            None => {
                let spec = match &config.tokenizer {
                    TokenizerSpec::Huggingface { path } => TokenizerSpec::Huggingface {
                        path: resolve(path)?.display().to_string(),
                    },
                    TokenizerSpec::Byte => TokenizerSpec::Byte,
                };
                let tokenizer = spec
                    .load(Path::new("."))
                    .map_err(|e| TrainError::Config(e.to_string()))?;
                let mut arch = config.model.architecture.clone().ok_or_else(|| {
                    TrainError::Config("model needs an architecture or a base".into())
                })?;
                if arch.vocab_size == 0 {
                    arch.vocab_size = tokenizer.vocab_size();
                }
                (
                    arch.normalized(),
                    None,
                    tokenizer,
                    (spec, PathBuf::from(".")),
                )
            }
        };
        model_config
            .validate()
            .map_err(|e| TrainError::Config(e.to_string()))?;
        if model_config.vocab_size < tokenizer.vocab_size() {
            return Err(TrainError::Config(format!(
                "model vocabSize {} is smaller than the tokenizer's {}",
                model_config.vocab_size,
                tokenizer.vocab_size()
            )));
        }
        let seq_len = h.seq_len.unwrap_or(model_config.max_seq_len);
        if seq_len > model_config.max_seq_len {
            return Err(TrainError::Config(format!(
                "seqLen {seq_len} exceeds the model's maxSeqLen {}",
                model_config.max_seq_len
            )));
        }

        let mut varmap = init_params(&model_config, h.seed, &device)?;
        if let Some(tensors) = base_tensors {
            for (name, t) in tensors {
                varmap
                    .set_one(&name, &t)
                    .map_err(|e| TrainError::Config(format!("base model: {e}")))?;
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let model = Transformer::new(&model_config, &vb, &device)?;

        let frozen_blocks = match config.stage {
            Stage::Sft => (h.freeze_fraction * model_config.n_layers as f64).floor() as usize,
            Stage::Pretrain => 0,
        };
        let trainable: Vec<_> = lock(&varmap)?
            .iter()
            .filter(|(name, _)| !is_frozen(name, frozen_blocks, model_config.tie_embeddings))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let optimizer = AdamW::new(trainable, h)?;

        let examples = data::load_as(&config.dataset.uri, config.dataset.format)?;
        let train = data::split(examples, &config.dataset.split, Split::Train);
        let samples = data::tokenize(
            &train,
            tokenizer.as_ref(),
            config.stage == Stage::Sft,
            seq_len,
        )?;
        if samples.is_empty() {
            return Err(data::DataError::Empty(config.dataset.uri.clone()).into());
        }
        let loader = Loader::new(samples, h.seed, Cursor::default());
        let pad = tokenizer.eos_id().unwrap_or(0);
        let rng = Rng::new(h.seed, 0x7EA1);
        let compute_dtype = crate::device::training_dtype(h.precision, &device);
        let fused = if compute_dtype == DType::F32 && fused::applies(&model) {
            let names = optimizer.params.iter().map(|p| p.name.clone()).collect();
            Some(FusedStep::new(&model, names)?)
        } else {
            None
        };
        Ok(Self {
            config,
            model_config,
            model,
            varmap,
            optimizer,
            loader,
            tokenizer,
            tokenizer_spec,
            step: 0,
            rng,
            compute_dtype,
            job: JobIdentity::default(),
            gang: crate::dist::Ring::solo(),
            fused,
            device,
            pad,
        })
    }

    /// One optimizer step over `gradientAccumulation` micro-batches.
    pub fn train_step(&mut self) -> Result<StepStats, TrainError> {
        let h = &self.config.hyperparameters;
        let lr = optim::learning_rate(h, self.step);
        let (mut loss_sum, mut counted, mut tokens) = (0f64, 0usize, 0usize);
        // candle's autograd path (GPU, bf16, or ANNEAL_FUSED_STEP=0) sums its gradients here.
        let mut sums: Vec<Option<Tensor>> = vec![None; self.optimizer.params.len()];
        let cast;
        let model = if self.fused.is_some() || self.compute_dtype == self.model.embedding.dtype() {
            &self.model
        } else {
            cast = self.model.to_dtype(self.compute_dtype)?;
            &cast
        };
        let (per_rank, pad, device) = (h.batch_size, self.pad, self.device.clone());
        for _ in 0..h.gradient_accumulation {
            // A lone worker's shard is the whole batch; a rank's is its part of the gang's.
            let samples = super::gang::next_shard(&mut self.loader, &self.gang, per_rank);
            tokens += samples.iter().map(|s| s.tokens.len() - 1).sum::<usize>();
            let batch = Batch::new(&samples, pad, &device)?;
            if batch.n_tokens == 0 {
                continue;
            }
            counted += batch.n_tokens;
            if let Some(step) = self.fused.as_mut() {
                loss_sum += step.accumulate(model, &batch)?;
                continue;
            }
            // The loss is computed in f32 whatever the compute dtype (a no-op in f32).
            let logits = model
                .forward(&batch.inputs, 0, None)?
                .to_dtype(DType::F32)?;
            let loss = masked_nll_sum(&logits, &batch.targets, &batch.mask)?;
            loss_sum += f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            let store = loss.backward()?;
            for (acc, p) in sums.iter_mut().zip(&self.optimizer.params) {
                if let Some(g) = store.get(p.var.as_tensor()) {
                    *acc = Some(match acc.take() {
                        None => g.clone(),
                        Some(a) => (a + g)?,
                    });
                }
            }
        }
        let grads = match self.fused.as_mut() {
            Some(step) => {
                let names: Vec<_> = self
                    .optimizer
                    .params
                    .iter()
                    .map(|p| (p.name.clone(), p.var.dims().to_vec()))
                    .collect();
                step.take_grads(&names)?
            }
            None => sums
                .into_iter()
                .zip(&self.optimizer.params)
                .map(|(g, p)| g.map_or_else(|| p.var.as_tensor().zeros_like(), Ok))
                .collect::<candle_core::Result<Vec<_>>>()?,
        };
        // The gang's sums: every rank then takes the step of the whole global batch.
        let grads = super::gang::sum_gradients(&mut self.gang, grads)?;
        let (loss_sum, counted, tokens) =
            super::gang::sum_counts(&mut self.gang, loss_sum, counted, tokens)?;
        let scale = 1.0 / counted.max(1) as f64;
        let grad_norm = optim::global_norm(&grads, scale)?;
        if !grad_norm.is_finite() {
            return Err(TrainError::Diverged {
                step: self.step + 1,
            });
        }
        let factor = optim::clip_factor(grad_norm, h.grad_clip);
        self.optimizer.step(&grads, scale * factor, lr)?;
        self.step += 1;
        Ok(StepStats {
            loss: loss_sum * scale,
            grad_norm,
            lr,
            tokens,
        })
    }

    /// Every weight by name (frozen ones included).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        Ok(lock(&self.varmap)?
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect())
    }

    /// Writes a checkpoint of the current step into `dir`.
    pub fn save_checkpoint(&self, dir: &CheckpointDir) -> Result<PathBuf, TrainError> {
        let tensors = self.tensors()?;
        let state = TrainState {
            step: self.step,
            attempt: dir.attempt,
            cursor: self.loader.cursor,
            rng: self.rng,
            optimizer_step: self.optimizer.t,
            model: self.model_config.clone(),
            config: self.config.clone(),
            job: Some(self.job.clone()),
            spec_digest: Some(resume::spec_digest(&self.config, &self.model_config)),
        };
        let keep = self.config.checkpoint.keep;
        Ok(dir.save(self.step, keep, |tmp| {
            candle_core::safetensors::save(&tensors, tmp.join("model.safetensors"))?;
            candle_core::safetensors::save(
                &self.optimizer.state_tensors(),
                tmp.join("optimizer.safetensors"),
            )?;
            let json = serde_json::to_vec_pretty(&state)
                .map_err(|e| CheckpointError::Format(e.to_string()))?;
            atomic::write_synced(&tmp.join("state.json"), &json)
        })?)
    }

    /// Restores the state saved in checkpoint directory `path` (already verified), if it is of
    /// this job and run ([`resume::check`]); returns what changed since it was written.
    pub fn restore(&mut self, path: &Path) -> Result<resume::Accepted, TrainError> {
        let corrupt = |e: &dyn std::fmt::Display| {
            TrainError::Checkpoint(CheckpointError::Corrupt(format!("{}: {e}", path.display())))
        };
        let state: TrainState = read_json(&path.join("state.json"))?;
        let accepted = resume::check(path, &state, &self.job, &self.config, &self.model_config)?;
        self.varmap
            .load(path.join("model.safetensors"))
            .map_err(|e| corrupt(&e))?;
        let moments =
            candle_core::safetensors::load(path.join("optimizer.safetensors"), &self.device)
                .map_err(|e| corrupt(&e))?;
        self.optimizer
            .load_state(moments, state.optimizer_step)
            .map_err(|e| corrupt(&e))?;
        self.loader.seek(state.cursor);
        self.rng = state.rng;
        self.step = state.step;
        Ok(accepted)
    }
}

fn lock(
    varmap: &VarMap,
) -> Result<std::sync::MutexGuard<'_, HashMap<String, candle_core::Var>>, TrainError> {
    varmap
        .data()
        .lock()
        .map_err(|_| TrainError::Internal("weights lock poisoned".into()))
}

/// Whether a parameter stays fixed: blocks below `frozen_blocks`, and the untied embedding
/// along with them.
fn is_frozen(name: &str, frozen_blocks: usize, tied: bool) -> bool {
    if frozen_blocks == 0 {
        return false;
    }
    if name == "token_embd.weight" {
        return !tied;
    }
    name.strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
        .is_some_and(|i| i < frozen_blocks)
}

/// A local path for a `file://`, `pvc://` or plain path URI.
pub fn resolve(uri: &str) -> Result<PathBuf, TrainError> {
    data::resolve_path(uri)?
        .ok_or_else(|| TrainError::Config(format!("{uri}: not a file location")))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| {
        TrainError::Checkpoint(CheckpointError::Io {
            path: path.display().to_string(),
            source: e,
        })
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        TrainError::Checkpoint(CheckpointError::Corrupt(format!("{}: {e}", path.display())))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn freezing() {
        assert!(super::is_frozen("blk.0.attn_q.weight", 1, false));
        assert!(!super::is_frozen("blk.1.attn_q.weight", 1, false));
        assert!(super::is_frozen("token_embd.weight", 1, false));
        assert!(!super::is_frozen("token_embd.weight", 1, true));
        assert!(!super::is_frozen("blk.0.attn_q.weight", 0, false));
    }
}
