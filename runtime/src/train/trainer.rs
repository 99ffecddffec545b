//! The training state and one optimizer step; checkpoint save and restore of that state.

use super::TrainError;
use super::base;
use super::config::{Stage, TrainConfig};
use super::dpo;
use super::fused::{self, FusedStep};
use super::lora::Lora;
use super::loss::{self, Objective};
use super::optim::{self, AdamW};
use super::resume::{self, JobIdentity};
use crate::checkpoint::model_dir::TextFiles;
use crate::checkpoint::{CheckpointDir, CheckpointError, atomic};
use crate::data::{self, Batch, Cursor, Format, Loader, PairSample, Sample, Split};
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
    /// DPO's metrics (stage dpo).
    pub preference: Option<dpo::Stats>,
}

/// What a run trains on: samples (pretraining, sft) or preference pairs (dpo).
pub enum TrainData {
    /// Token samples.
    Samples(Loader<Sample>),
    /// Preference pairs.
    Pairs {
        /// The pairs, with their reference log-probabilities.
        loader: Loader<PairSample>,
        /// DPO's beta.
        beta: f64,
    },
}

impl TrainData {
    /// The loader's position.
    pub fn cursor(&self) -> Cursor {
        match self {
            Self::Samples(l) => l.cursor,
            Self::Pairs { loader, .. } => loader.cursor,
        }
    }

    /// Moves the loader to `cursor`.
    pub fn seek(&mut self, cursor: Cursor) {
        match self {
            Self::Samples(l) => l.seek(cursor),
            Self::Pairs { loader, .. } => loader.seek(cursor),
        }
    }

    /// Number of training items (samples or pairs).
    pub fn len(&self) -> usize {
        match self {
            Self::Samples(l) => l.len(),
            Self::Pairs { loader, .. } => loader.len(),
        }
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Name of the LoRA adapters' file in a checkpoint.
const ADAPTERS: &str = "adapters.safetensors";

/// Name of the reference log-probabilities' file in a DPO checkpoint.
const REFERENCE: &str = "reference.safetensors";

/// A [`VarMap`] of a base model's weights, each one the model needs present.
fn varmap_of(
    config: &ModelConfig,
    mut tensors: HashMap<String, Tensor>,
) -> Result<VarMap, TrainError> {
    let varmap = VarMap::new();
    {
        let mut data = lock(&varmap)?;
        for (name, shape) in crate::model::param_names(config) {
            let t = tensors.remove(&name).ok_or_else(|| {
                TrainError::Config(format!("base model: missing tensor `{name}`"))
            })?;
            if t.dims() != shape.as_slice() {
                return Err(TrainError::Config(format!(
                    "base model: `{name}` has shape {:?}, the architecture needs {shape:?}",
                    t.dims()
                )));
            }
            data.insert(
                name,
                candle_core::Var::from_tensor(&t.to_dtype(DType::F32)?)?,
            );
        }
    }
    Ok(varmap)
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
    pub data: TrainData,
    /// Tokenizer.
    pub tokenizer: Box<dyn Tokenizer>,
    /// The tokenizer and chat template to record in the output (the base model's).
    pub text: TextFiles,
    /// What kind of base model the run started from, if any.
    pub base_kind: Option<&'static str>,
    /// The LoRA adapters, when the run trains adapters instead of weights.
    pub lora: Option<Lora>,
    /// The weights whose gradients a step computes (the optimizer's, or the adapted ones), by
    /// name and shape, and their variables.
    grad_names: Vec<(String, Vec<usize>)>,
    grad_vars: Vec<candle_core::Var>,
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
            Some(uri) => Some(base::load(&resolve(uri)?, &device).map_err(TrainError::Base)?),
            None => None,
        };
        let base_kind = base.as_ref().map(|b| b.kind);
        let (model_config, base_tensors, text) = match base {
            Some(b) => (b.config, Some(b.tensors), b.text),
            None => {
                let text = match &config.tokenizer {
                    TokenizerSpec::Huggingface { path, bos, eos } => {
                        TextFiles::huggingface(&resolve(path)?, bos.clone(), eos.clone(), None)
                            .map_err(|e| TrainError::Config(e.to_string()))?
                    }
                    TokenizerSpec::Byte => TextFiles::byte(),
                };
                let tokenizer =
                    base::text_tokenizer(&text).map_err(|e| TrainError::Config(e.to_string()))?;
                let mut arch = config.model.architecture.clone().ok_or_else(|| {
                    TrainError::Config("model needs an architecture or a base".into())
                })?;
                if arch.vocab_size == 0 {
                    arch.vocab_size = tokenizer.vocab_size();
                }
                (arch.normalized(), None, text)
            }
        };
        let tokenizer = base::text_tokenizer(&text).map_err(TrainError::Base)?;
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

        let varmap = match base_tensors {
            Some(tensors) => varmap_of(&model_config, tensors)?,
            None => init_params(&model_config, h.seed, &device)?,
        };
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let model = Transformer::new(&model_config, &vb, &device)?;

        let frozen_blocks = match config.stage {
            Stage::Sft => (h.freeze_fraction * model_config.n_layers as f64).floor() as usize,
            Stage::Pretrain | Stage::Dpo => 0,
        };
        let lora = match &config.lora {
            Some(settings) => Some(Lora::new(
                settings.clone(),
                &model_config,
                &varmap,
                h.seed,
                &device,
            )?),
            None => None,
        };
        // What the optimizer updates, and the weights whose gradients the step computes: the
        // same, except with LoRA (the adapters; the adapted weights).
        let trainable: Vec<_> = match &lora {
            Some(l) => l.vars(),
            None => lock(&varmap)?
                .iter()
                .filter(|(name, _)| !is_frozen(name, frozen_blocks, model_config.tie_embeddings))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect(),
        };
        let optimizer = AdamW::new(trainable, h)?;
        let (grad_names, grad_vars) = match &lora {
            Some(l) => (l.weights(), l.weight_vars()),
            None => (
                optimizer
                    .params
                    .iter()
                    .map(|p| (p.name.clone(), p.var.dims().to_vec()))
                    .collect(),
                optimizer.params.iter().map(|p| p.var.clone()).collect(),
            ),
        };

        let format = Format::new(tokenizer.as_ref(), text.chat_template.as_deref())?;
        let examples = data::load_as(&config.dataset.uri, config.dataset.format)?;
        let train = data::split(examples, &config.dataset.split, Split::Train);
        let tok = tokenizer.as_ref();
        let data = match config.stage {
            Stage::Dpo => {
                let mut pairs = Vec::new();
                for ex in &train {
                    if let Some((chosen, rejected)) = format.preference(tok, ex, seq_len)? {
                        pairs.push(PairSample {
                            chosen,
                            rejected,
                            reference: None,
                        });
                    }
                }
                if pairs.is_empty() {
                    return Err(data::DataError::Empty(config.dataset.uri.clone()).into());
                }
                TrainData::Pairs {
                    loader: Loader::new(pairs, h.seed, Cursor::default()),
                    beta: config.dpo.beta,
                }
            }
            stage => {
                let samples = data::tokenize(&train, tok, &format, stage == Stage::Sft, seq_len)?;
                if samples.is_empty() {
                    return Err(data::DataError::Empty(config.dataset.uri.clone()).into());
                }
                TrainData::Samples(Loader::new(samples, h.seed, Cursor::default()))
            }
        };
        let pad = tokenizer.eos_id().unwrap_or(0);
        let rng = Rng::new(h.seed, 0x7EA1);
        let compute_dtype = crate::device::training_dtype(h.precision, &device);
        let fused = if compute_dtype == DType::F32 && fused::applies(&model) {
            let names = grad_names.iter().map(|(n, _)| n.clone()).collect();
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
            data,
            tokenizer,
            text,
            base_kind,
            lora,
            grad_names,
            grad_vars,
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

    /// Computes the reference log-probabilities of every preference pair that has none yet,
    /// with the model as it is (the base model, before the first step); returns how many
    /// pairs were scored. A no-op for other stages and after a resume (the checkpoint has them).
    pub fn compute_reference(&mut self) -> Result<usize, TrainError> {
        let TrainData::Pairs { loader, .. } = &mut self.data else {
            return Ok(0);
        };
        let per_batch = self.config.hyperparameters.batch_size.max(1);
        let todo: Vec<usize> = (0..loader.items().len())
            .filter(|&i| loader.items()[i].reference.is_none())
            .collect();
        let vocab = self.model_config.vocab_size;
        // candle's path computes in the training dtype: cast the model once, not per batch.
        let cast = match self.fused {
            Some(_) => None,
            None => Some(self.model.to_dtype(self.compute_dtype)?),
        };
        for chunk in todo.chunks(per_batch) {
            let items = loader.items();
            let samples: Vec<&Sample> = chunk
                .iter()
                .flat_map(|&i| [&items[i].chosen, &items[i].rejected])
                .collect();
            let batch = Batch::new(&samples, self.pad, &self.device)?;
            let t = batch.inputs.dim(1)?;
            let targets = batch.targets.flatten_all()?.to_vec1::<u32>()?;
            let mask = batch.mask.flatten_all()?.to_vec1::<f32>()?;
            let rows: Vec<_> = (0..samples.len()).map(|r| r * t..(r + 1) * t).collect();
            // The forward pass the steps run (the fused one, or candle's in the training
            // dtype), so that the first step's policy is its reference exactly.
            let logps = match self.fused.as_mut() {
                Some(step) => {
                    let logits = step.logits(&self.model, &batch)?;
                    dpo::sequence_logps(logits, &targets, &mask, vocab, &rows)
                }
                None => {
                    let model = cast.as_ref().ok_or_else(|| {
                        TrainError::Internal("no model in the training dtype".into())
                    })?;
                    let logits = model
                        .forward(&batch.inputs, 0, None)?
                        .detach()
                        .to_dtype(DType::F32)?;
                    dpo::batch_logps(&logits, &batch.targets, &batch.mask)?
                        .to_dtype(DType::F64)?
                        .to_vec1::<f64>()?
                }
            };
            let items = loader.items_mut();
            for (k, &i) in chunk.iter().enumerate() {
                items[i].reference = Some((logps[2 * k], logps[2 * k + 1]));
            }
        }
        Ok(todo.len())
    }

    /// One optimizer step over `gradientAccumulation` micro-batches.
    pub fn train_step(&mut self) -> Result<StepStats, TrainError> {
        let h = &self.config.hyperparameters;
        let lr = optim::learning_rate(h, self.step);
        let (mut loss_sum, mut counted, mut tokens) = (0f64, 0usize, 0usize);
        let mut preference: Option<dpo::Sums> = None;
        if let Some(lora) = &self.lora {
            lora.merge()?;
        }
        // candle's autograd path (GPU, bf16, or ANNEAL_FUSED_STEP=0) sums its gradients here.
        let mut sums: Vec<Option<Tensor>> = vec![None; self.grad_vars.len()];
        let cast;
        let model = if self.fused.is_some() || self.compute_dtype == self.model.embedding.dtype() {
            &self.model
        } else {
            cast = self.model.to_dtype(self.compute_dtype)?;
            &cast
        };
        let (per_rank, pad, device) = (h.batch_size, self.pad, self.device.clone());
        // A gang on the fused step sums each block's gradients while the backward pass of the
        // blocks below runs (not with LoRA: there only the small adapter gradients are summed).
        let overlap = self.fused.is_some()
            && self.gang.world() > 1
            && self.lora.is_none()
            && std::env::var("ANNEAL_OVERLAP_ALLREDUCE").map_or(true, |v| v != "0");
        let mut summed = false;
        for micro in 0..h.gradient_accumulation {
            let last = micro + 1 == h.gradient_accumulation;
            // A lone worker's shard is the whole batch; a rank's is its part of the gang's.
            let (batch, pairs, beta) = match &mut self.data {
                TrainData::Samples(loader) => {
                    let samples = super::gang::next_shard(loader, &self.gang, per_rank);
                    (Batch::new(&samples, pad, &device)?, Vec::new(), 0.0)
                }
                TrainData::Pairs { loader, beta } => {
                    let picked = super::gang::next_shard(loader, &self.gang, per_rank);
                    let samples: Vec<&Sample> = picked
                        .iter()
                        .flat_map(|p| [&p.chosen, &p.rejected])
                        .collect();
                    let batch = Batch::new(&samples, pad, &device)?;
                    let t = batch.inputs.dim(1)?;
                    let pairs = picked
                        .iter()
                        .enumerate()
                        .map(|(i, p)| {
                            let (ref_chosen, ref_rejected) = p.reference.ok_or_else(|| {
                                TrainError::Internal("reference log-probs not computed".into())
                            })?;
                            Ok(dpo::Pair {
                                chosen: 2 * i * t..(2 * i + 1) * t,
                                rejected: (2 * i + 1) * t..(2 * i + 2) * t,
                                ref_chosen,
                                ref_rejected,
                            })
                        })
                        .collect::<Result<Vec<_>, TrainError>>()?;
                    (batch, pairs, *beta)
                }
            };
            tokens += batch.n_inputs;
            let objective = match self.data {
                TrainData::Samples(_) => Objective::Nll,
                TrainData::Pairs { .. } => Objective::Dpo {
                    pairs: &pairs,
                    beta,
                },
            };
            if batch.n_tokens == 0 {
                continue;
            }
            counted += match objective {
                Objective::Nll => batch.n_tokens,
                Objective::Dpo { pairs, .. } => pairs.len(),
            };
            let outcome = match self.fused.as_mut() {
                Some(step) if overlap && last => {
                    summed = true;
                    step.accumulate_summed(model, Some((&batch, &objective)), &mut self.gang)?
                        .ok_or_else(|| {
                            TrainError::Internal("no outcome of the last micro-batch".into())
                        })?
                }
                Some(step) => step.accumulate(model, &batch, &objective)?,
                None => {
                    // The loss is computed in f32 whatever the compute dtype (a no-op in f32).
                    let logits = model
                        .forward(&batch.inputs, 0, None)?
                        .to_dtype(DType::F32)?;
                    let (loss, outcome) = loss::loss_tensor(&logits, &batch, &objective)?;
                    let store = loss.backward()?;
                    for (acc, var) in sums.iter_mut().zip(&self.grad_vars) {
                        if let Some(g) = store.get(var.as_tensor()) {
                            *acc = Some(match acc.take() {
                                None => g.clone(),
                                Some(a) => (a + g)?,
                            });
                        }
                    }
                    outcome
                }
            };
            loss_sum += outcome.loss_sum;
            if let Some(d) = outcome.dpo {
                preference.get_or_insert_default().add(&d);
            }
        }
        if overlap
            && !summed
            && let Some(step) = self.fused.as_mut()
        {
            // This rank's last micro-batch had no loss token: its part of the sum, sent now.
            step.accumulate_summed(model, None, &mut self.gang)?;
        }
        let grads = match self.fused.as_mut() {
            Some(step) => step.take_grads(&self.grad_names)?,
            None => sums
                .into_iter()
                .zip(&self.grad_vars)
                .map(|(g, var)| g.map_or_else(|| var.as_tensor().zeros_like(), Ok))
                .collect::<candle_core::Result<Vec<_>>>()?,
        };
        // With LoRA, the adapters' gradients from the adapted weights', in optimizer order.
        let grads = match &self.lora {
            Some(lora) => {
                let mut by_name = lora.adapter_grads(&grads)?;
                self.optimizer
                    .params
                    .iter()
                    .map(|p| {
                        by_name.remove(&p.name).ok_or_else(|| {
                            TrainError::Internal(format!("no gradient for {}", p.name))
                        })
                    })
                    .collect::<Result<Vec<_>, TrainError>>()?
            }
            None => grads,
        };
        // The gang's sums: every rank then takes the step of the whole global batch.
        let grads = if overlap {
            grads
        } else {
            super::gang::sum_gradients(&mut self.gang, grads)?
        };
        let mut totals = vec![loss_sum, counted as f64, tokens as f64];
        let is_dpo = matches!(self.data, TrainData::Pairs { .. });
        if is_dpo {
            totals.extend(preference.unwrap_or_default().to_array());
        }
        super::gang::sum_stats(&mut self.gang, &mut totals)?;
        let (loss_sum, counted, tokens) = (totals[0], totals[1] as usize, totals[2] as usize);
        let preference = is_dpo.then(|| {
            dpo::Sums::from_array([totals[3], totals[4], totals[5], totals[6], totals[7]]).means()
        });
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
            preference,
        })
    }

    /// The device the model trains on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every weight by name (frozen ones included).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        // The adapted weights as the adapters stand now (the last step moved them).
        if let Some(lora) = &self.lora {
            lora.merge()?;
        }
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
            cursor: self.data.cursor(),
            rng: self.rng,
            optimizer_step: self.optimizer.t,
            model: self.model_config.clone(),
            config: self.config.clone(),
            job: Some(self.job.clone()),
            spec_digest: Some(resume::spec_digest(&self.config, &self.model_config)),
        };
        let keep = self.config.checkpoint.keep;
        // DPO's reference log-probs, so that a resume uses the very same numbers.
        let reference = match &self.data {
            TrainData::Pairs { loader, .. } => {
                let values = loader
                    .items()
                    .iter()
                    .map(|p| p.reference.ok_or(()))
                    .collect::<Result<Vec<_>, ()>>()
                    .map_err(|()| TrainError::Internal("reference log-probs missing".into()))?;
                let flat: Vec<f64> = values.into_iter().flat_map(|(c, r)| [c, r]).collect();
                let n = flat.len() / 2;
                Some(Tensor::from_vec(flat, (n, 2), &Device::Cpu)?)
            }
            TrainData::Samples(_) => None,
        };
        Ok(dir.save(self.step, keep, |tmp| {
            candle_core::safetensors::save(&tensors, tmp.join("model.safetensors"))?;
            candle_core::safetensors::save(
                &self.optimizer.state_tensors(),
                tmp.join("optimizer.safetensors"),
            )?;
            if let Some(lora) = &self.lora {
                candle_core::safetensors::save(&lora.tensors(), tmp.join(ADAPTERS))?;
            }
            if let Some(refs) = &reference {
                candle_core::safetensors::save(
                    &HashMap::from([("reference".to_string(), refs.clone())]),
                    tmp.join(REFERENCE),
                )?;
            }
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
        self.data.seek(state.cursor);
        if let Some(lora) = &self.lora {
            let tensors = candle_core::safetensors::load(path.join(ADAPTERS), &self.device)
                .map_err(|e| corrupt(&e))?;
            lora.load(&tensors)?;
        }
        if let TrainData::Pairs { loader, .. } = &mut self.data {
            let refs = candle_core::safetensors::load(path.join(REFERENCE), &Device::Cpu)
                .map_err(|e| corrupt(&e))?;
            let values = refs
                .get("reference")
                .ok_or_else(|| corrupt(&"no `reference` tensor"))?
                .flatten_all()
                .and_then(|t| t.to_vec1::<f64>())
                .map_err(|e| corrupt(&e))?;
            if values.len() != 2 * loader.len() {
                return Err(corrupt(&format!(
                    "{} reference log-probs for {} pairs",
                    values.len(),
                    loader.len()
                )));
            }
            for (item, v) in loader.items_mut().iter_mut().zip(values.chunks_exact(2)) {
                item.reference = Some((v[0], v[1]));
            }
        }
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
