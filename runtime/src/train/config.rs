//! The training configuration file (`anneal-runtime train --config FILE`, YAML or JSON). It
//! mirrors the TrainingJob spec: the operator renders the spec into this file.

use crate::data::SplitRatios;
use crate::model::ModelConfig;
use crate::tokenizer::TokenizerSpec;
pub use anneal_crds::common::DatasetFormat;
pub use anneal_crds::trainingjob::{GgufQuantization, Precision, Schedule};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Everything a training run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainConfig {
    /// The model to train.
    pub model: ModelSpec,
    /// Tokenizer of a model trained from scratch (a base model brings its own).
    #[serde(default)]
    pub tokenizer: TokenizerSpec,
    /// Training data.
    pub dataset: DatasetSpec,
    /// `pretrain` (next-token loss on all text), `sft` (loss on responses only) or `dpo`
    /// (preference pairs, from a base model).
    #[serde(default)]
    pub stage: Stage,
    /// DPO settings (stage `dpo`).
    #[serde(default)]
    pub dpo: DpoSettings,
    /// Train low-rank adapters of the base model's weights instead of the weights (sft, dpo).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<super::lora::LoraSettings>,
    /// Optimisation settings.
    #[serde(default)]
    pub hyperparameters: Hyperparameters,
    /// Checkpoint policy.
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    /// Where the trained model goes.
    pub output: OutputSpec,
}

/// The model: an architecture trained from scratch, or a base model directory to fine-tune.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelSpec {
    /// Architecture for training from scratch.
    #[serde(default)]
    pub architecture: Option<ModelConfig>,
    /// A model directory (from an earlier `train`) to start from; its architecture wins.
    #[serde(default)]
    pub base: Option<String>,
}

/// Training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatasetSpec {
    /// `file://PATH`, `pvc://CLAIM/PATH` or `builtin:NAME`.
    pub uri: String,
    /// File format (`auto`: from the file name).
    #[serde(default)]
    pub format: DatasetFormat,
    /// Train/validation/test ratios.
    #[serde(default)]
    pub split: SplitRatios,
}

/// Training stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Stage {
    /// Next-token prediction on whole texts.
    #[default]
    Pretrain,
    /// Supervised fine-tuning: loss on response tokens only, lower layers optionally frozen.
    Sft,
    /// Direct Preference Optimization on `{prompt, chosen, rejected}` pairs, against the base
    /// model as the reference.
    Dpo,
}

/// DPO settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DpoSettings {
    /// Strength of the implicit KL penalty toward the reference (TRL's `beta`).
    pub beta: f64,
}

impl Default for DpoSettings {
    fn default() -> Self {
        Self { beta: 0.1 }
    }
}

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Hyperparameters {
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation: usize,
    /// Tokens per sequence (default: the model's maxSeqLen).
    pub seq_len: Option<usize>,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Learning rate at the end of the cosine decay (default: a tenth of the peak).
    pub min_learning_rate: Option<f64>,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Decay after the warm-up: cosine (to `minLearningRate`), linear (to zero) or constant.
    pub schedule: Schedule,
    /// Compute precision: `auto` is bf16 on a GPU and f32 on the CPU.
    pub precision: Precision,
    /// AdamW decoupled weight decay (matrices only, not norms).
    pub weight_decay: f64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// AdamW epsilon.
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    pub grad_clip: f64,
    /// Fraction of the lower blocks (and the embedding, when untied) left frozen in sft.
    pub freeze_fraction: f64,
    /// Seed of initialisation and data order.
    pub seed: u64,
    /// CPU threads. Results are bitwise reproducible for a given thread count.
    pub threads: Option<usize>,
    /// Print a progress line every this many steps (and at the last step).
    pub log_every: u64,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 16,
            gradient_accumulation: 1,
            seq_len: None,
            learning_rate: 1e-3,
            min_learning_rate: None,
            warmup_steps: 100,
            schedule: Schedule::Cosine,
            precision: Precision::Auto,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            freeze_fraction: 0.0,
            seed: 0,
            threads: None,
            log_every: 10,
        }
    }
}

/// Checkpoint policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CheckpointSpec {
    /// Directory (default: `$ANNEAL_CHECKPOINT_DIR`; no checkpoints when neither is set).
    pub dir: Option<String>,
    /// Write a checkpoint every this many steps (0: only the final one).
    pub every_steps: u64,
    /// Keep the newest this many.
    pub keep: usize,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            dir: None,
            every_steps: 100,
            keep: 3,
        }
    }
}

/// Where the trained model goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutputSpec {
    /// Model directory (`file://`, `pvc://` or a path), replaced atomically.
    pub path: String,
    /// Also export the model as a GGUF file in this quantization (inside the model directory).
    #[serde(default)]
    pub gguf: Option<GgufQuantization>,
}

impl TrainConfig {
    /// Reads a YAML or JSON file (JSON is YAML).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        let config: Self = serde_yaml::from_str(&text)
            .map_err(|e| format!("invalid config {}: {e}", path.display()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that the types cannot.
    pub fn validate(&self) -> Result<(), String> {
        let h = &self.hyperparameters;
        let checks = [
            (h.steps == 0, "hyperparameters.steps must be positive"),
            (
                h.batch_size == 0,
                "hyperparameters.batchSize must be positive",
            ),
            (
                h.gradient_accumulation == 0,
                "hyperparameters.gradientAccumulation must be positive",
            ),
            (
                h.seq_len == Some(0),
                "hyperparameters.seqLen must be positive",
            ),
            (
                !(h.learning_rate.is_finite() && h.learning_rate > 0.0),
                "hyperparameters.learningRate must be positive",
            ),
            (
                !(0.0..1.0).contains(&h.beta1) || !(0.0..1.0).contains(&h.beta2),
                "hyperparameters.beta1/beta2 must be in [0, 1)",
            ),
            (
                !(h.weight_decay.is_finite() && h.weight_decay >= 0.0),
                "hyperparameters.weightDecay must be >= 0",
            ),
            (
                !(h.grad_clip.is_finite() && h.grad_clip >= 0.0),
                "hyperparameters.gradClip must be >= 0",
            ),
            (
                !(0.0..=1.0).contains(&h.freeze_fraction),
                "hyperparameters.freezeFraction must be in [0, 1]",
            ),
            (
                h.threads == Some(0),
                "hyperparameters.threads must be positive",
            ),
            (
                self.model.architecture.is_none() && self.model.base.is_none(),
                "model needs an architecture or a base",
            ),
            (
                self.stage == Stage::Dpo && self.model.base.is_none(),
                "stage dpo needs a base model (the reference it is aligned against)",
            ),
            (
                !(self.dpo.beta.is_finite() && self.dpo.beta > 0.0),
                "dpo.beta must be positive",
            ),
            (
                self.lora.is_some() && self.model.base.is_none(),
                "lora needs a base model to adapt",
            ),
            (
                self.lora.is_some() && h.freeze_fraction > 0.0,
                "lora trains adapters of every block: freezeFraction must be 0 with it",
            ),
        ];
        if let Some((_, msg)) = checks.iter().find(|(bad, _)| *bad) {
            return Err((*msg).to_string());
        }
        if let Some(lora) = &self.lora {
            lora.validate()?;
        }
        self.dataset.split.validate()
    }
}
