//! `TrainingJob`: train (or fine-tune) a model on a data set, on GPUs of a given type, with
//! checkpoints and failover.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{ComputeResources, Condition, DatasetSpec, StorageUri};

/// Train (or fine-tune) a language model. The operator runs `anneal-runtime train` in worker
/// pods on GPU nodes of the requested type, moves them off a failed node and resumes from the
/// last checkpoint.
// Each printcolumn repeats `type_ = ...`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "anneal.dev",
    version = "v1alpha1",
    kind = "TrainingJob",
    namespaced,
    status = "TrainingJobStatus",
    shortname = "tj",
    category = "anneal",
    doc = "Train or fine-tune a language model on GPU nodes, with checkpoints and failover.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Step", type_ = "string", json_path = ".status.progress.stepOfTotal"),
    printcolumn(name = "Loss", type_ = "number", json_path = ".status.progress.loss"),
    printcolumn(name = "GPU", type_ = "string", json_path = ".spec.resources.gpuType"),
    printcolumn(name = "Restarts", type_ = "integer", json_path = ".status.restarts"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodes[0]", priority = 1),
    printcolumn(name = "Attempt", type_ = "integer", json_path = ".status.attempt", priority = 1),
    printcolumn(name = "Gang", type_ = "string", json_path = ".status.gang.state", priority = 1),
    // The model and data of a job that has started are what its checkpoints were made from:
    // changing them would resume the wrong run. Before the first worker starts they may change.
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || self.spec.model == oldSelf.spec.model")
        .message("spec.model cannot change once the job has started")
        .field_path(".spec.model"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || self.spec.dataset == oldSelf.spec.dataset")
        .message("spec.dataset cannot change once the job has started")
        .field_path(".spec.dataset"),
    // A gang's headless Service is `<name>-workers`, a DNS label of at most 63 characters.
    validation = Rule::new("self.spec.workers == 1 || size(self.metadata.name) <= 55")
        .message("a TrainingJob with more than one worker has a name of at most 55 characters (its workers' Service is <name>-workers)")
        .field_path(".spec.workers"),
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.stage == 'sft' || !has(self.hyperparameters.frozenLayerFraction) || self.hyperparameters.frozenLayerFraction == 0.0",
        "message": "hyperparameters.frozenLayerFraction applies only to stage sft",
        "fieldPath": ".hyperparameters.frozenLayerFraction",
    },
    {
        "rule": "self.workers == 1 || has(self.checkpoint.storage)",
        "message": "checkpoint.storage is required with more than one worker: every worker of a gang resumes from the same checkpoint, so it must be a ReadWriteMany claim (checkpoints inside the pods would be lost with the gang)",
        "fieldPath": ".checkpoint.storage",
    },
    {
        "rule": "self.hyperparameters.warmupSteps < self.hyperparameters.steps",
        "message": "hyperparameters.warmupSteps must be less than hyperparameters.steps",
        "fieldPath": ".hyperparameters.warmupSteps",
    },
    {
        "rule": "self.stage != 'sft' || has(self.model.baseModel) || has(self.model.fromTrainingJob) || self.dataset.uri.startsWith('builtin:') || self.dataset.format != 'text'",
        "message": "stage sft needs prompt/response data: dataset.format must be jsonl (or auto) or a builtin set",
        "fieldPath": ".dataset.format",
    },
    {
        "rule": "self.stage != 'dpo' || has(self.model.baseModel) || has(self.model.fromTrainingJob)",
        "message": "stage dpo needs model.baseModel (or model.fromTrainingJob): the model it aligns, which is also its reference",
        "fieldPath": ".model.baseModel",
    },
    {
        "rule": "self.stage != 'dpo' || self.dataset.format != 'text'",
        "message": "stage dpo needs preference pairs ({\"prompt\", \"chosen\", \"rejected\"} JSON lines): dataset.format must be jsonl (or auto)",
        "fieldPath": ".dataset.format",
    },
    {
        "rule": "!has(self.dpo) || self.stage == 'dpo'",
        "message": "dpo applies only to stage dpo",
        "fieldPath": ".dpo",
    },
    {
        "rule": "!has(self.lora) || (self.stage != 'pretrain' && (has(self.model.baseModel) || has(self.model.fromTrainingJob)))",
        "message": "lora adapts a base model: it needs model.baseModel (or model.fromTrainingJob) and stage sft or dpo",
        "fieldPath": ".lora",
    },
    {
        "rule": "!has(self.lora) || !has(self.hyperparameters.frozenLayerFraction) || self.hyperparameters.frozenLayerFraction == 0.0",
        "message": "lora trains adapters of every block and leaves the weights frozen: hyperparameters.frozenLayerFraction must be 0 with it",
        "fieldPath": ".hyperparameters.frozenLayerFraction",
    },
]))]
pub struct TrainingJobSpec {
    /// What to train: an architecture from scratch, or a base model to fine-tune.
    pub model: ModelSpec,
    /// Training data.
    pub dataset: DatasetSpec,
    /// `pretrain` (next-token loss on all tokens), `sft` (loss on the answers only: responses,
    /// or a chat's assistant messages) or `dpo` (Direct Preference Optimization on
    /// `{"prompt", "chosen", "rejected"}` pairs, from `model.baseModel`).
    #[serde(default)]
    pub stage: Stage,
    /// DPO settings (stage `dpo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoSpec>,
    /// Train low-rank adapters (LoRA) instead of the base model's weights, for sft or dpo: the
    /// weights stay frozen, only the adapters have optimizer state. The output is the merged
    /// model (what serving loads), with the adapters beside it in PEFT's format
    /// (`adapter_model.safetensors`, `adapter_config.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    /// Optimisation settings.
    pub hyperparameters: Hyperparameters,
    /// GPUs, CPU and memory per worker, and placement.
    #[serde(default)]
    pub resources: ComputeResources,
    /// Number of worker pods: a data-parallel gang, one model trained on all of them, each worker
    /// on its shard of every global batch of `workers x batchSize` samples, on distinct nodes.
    /// Losing any worker replaces the whole gang from the last checkpoint, which every worker
    /// reads: with more than one, `checkpoint.storage` is required and must be a ReadWriteMany
    /// claim (the operator holds the gang Pending with condition `StorageShared=False` until
    /// every claim its workers mount can be mounted on several nodes).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub workers: u32,
    /// When and where checkpoints are written.
    #[serde(default)]
    pub checkpoint: CheckpointPolicy,
    /// Where the trained model is written.
    pub output: OutputSpec,
    /// How node and device failures are handled.
    #[serde(default)]
    pub failover_policy: FailoverPolicy,
    /// Suspend, retry and clean-up policy (Kubeflow's `runPolicy`).
    #[serde(default)]
    pub run_policy: RunPolicy,
    /// Runtime image; the operator's default when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
}

fn one() -> u32 {
    1
}

/// Direct Preference Optimization (TRL's `DPOTrainer`, sigmoid loss). The reference model is
/// the base model: its log-probability of every pair is computed once before the first step
/// (and kept in the checkpoints), so no second copy of the weights runs during training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DpoSpec {
    /// Strength of the implicit KL penalty toward the reference: larger stays closer.
    #[serde(default = "default_beta")]
    #[schemars(range(min = 0.001, max = 10.0))]
    pub beta: f64,
}

fn default_beta() -> f64 {
    0.1
}

/// Low-rank adapters: every target weight `W` of every block trains as `W + (alpha / rank) B A`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoraSpec {
    /// Rank of each adapter.
    #[serde(default = "default_lora_rank")]
    #[schemars(range(min = 1, max = 1024))]
    pub rank: u32,
    /// Scale numerator (the change is `alpha / rank` times `B A`).
    #[serde(default = "default_lora_alpha")]
    #[schemars(range(min = 0.001, max = 100000.0))]
    pub alpha: f64,
    /// Weights adapted in every block: `q`, `k`, `v`, `o` (attention), `gate`, `up`, `down`
    /// (feed-forward). PEFT's default for llama models is `q` and `v`.
    #[serde(default = "default_lora_targets")]
    #[schemars(length(min = 1, max = 7))]
    pub targets: Vec<LoraTarget>,
}

/// A weight of a decoder block that LoRA can adapt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    /// Attention query projection.
    Q,
    /// Attention key projection.
    K,
    /// Attention value projection.
    V,
    /// Attention output projection.
    O,
    /// Feed-forward gate projection.
    Gate,
    /// Feed-forward up projection.
    Up,
    /// Feed-forward down projection.
    Down,
}

impl LoraTarget {
    /// The name the runtime uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Q => "q",
            Self::K => "k",
            Self::V => "v",
            Self::O => "o",
            Self::Gate => "gate",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

fn default_lora_rank() -> u32 {
    16
}

fn default_lora_alpha() -> f64 {
    32.0
}

fn default_lora_targets() -> Vec<LoraTarget> {
    vec![LoraTarget::Q, LoraTarget::V]
}

/// The model to train: exactly one of `architecture` and `baseModel`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.architecture) ? 1 : 0) + (has(self.baseModel) ? 1 : 0) + (has(self.fromTrainingJob) ? 1 : 0) == 1",
    "message": "exactly one of model.architecture, model.baseModel and model.fromTrainingJob must be set",
}]))]
pub struct ModelSpec {
    /// Train a new decoder-only transformer of this shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<Architecture>,
    /// Fine-tune this model: a runtime model directory, a llama-family GGUF file (its weights
    /// dequantized to f32 are the starting point) or a Hugging Face directory (`config.json`,
    /// `model.safetensors`, `tokenizer.json`). Its tokenizer and chat template are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<StorageUri>,
    /// Fine-tune the model another TrainingJob of this namespace writes (its
    /// `status.artifact`): this job waits, Pending with condition `BaseModelReady=False`, until
    /// that one has succeeded, then records the model it starts from in `status.baseModel` and
    /// keeps it (a re-run of the other job does not change a job that has started). How an sft
    /// job and a dpo job on top of it are applied together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_training_job: Option<crate::common::LocalObjectReference>,
}

/// Shape of a decoder-only transformer (pre-norm RMSNorm, RoPE, grouped-query attention, SwiGLU).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.hiddenSize % self.heads == 0",
        "message": "hiddenSize must be a multiple of heads",
        "fieldPath": ".hiddenSize",
    },
    {
        "rule": "!has(self.kvHeads) || self.heads % self.kvHeads == 0",
        "message": "heads must be a multiple of kvHeads",
        "fieldPath": ".kvHeads",
    },
]))]
pub struct Architecture {
    /// Vocabulary size; 256 for the byte-level tokenizer.
    #[serde(default = "byte_vocab")]
    #[schemars(range(min = 2, max = 1048576))]
    pub vocab_size: u32,
    /// Width of the residual stream.
    #[schemars(range(min = 8, max = 65536))]
    pub hidden_size: u32,
    /// Number of transformer blocks.
    #[schemars(range(min = 1, max = 512))]
    pub layers: u32,
    /// Attention heads.
    #[schemars(range(min = 1, max = 512))]
    pub heads: u32,
    /// Key/value heads (grouped-query attention); `heads` when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 512))]
    pub kv_heads: Option<u32>,
    /// Hidden width of the SwiGLU feed-forward layer.
    #[schemars(range(min = 8, max = 262144))]
    pub intermediate_size: u32,
    /// Longest sequence in tokens.
    #[schemars(range(min = 8, max = 1048576))]
    pub context_length: u32,
    /// RoPE base frequency.
    #[serde(default = "rope_theta")]
    #[schemars(range(min = 1.0))]
    pub rope_theta: f64,
    /// Share the input embedding with the output projection.
    #[serde(default)]
    pub tie_embeddings: bool,
}

fn byte_vocab() -> u32 {
    256
}

fn rope_theta() -> f64 {
    10000.0
}

/// Training stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Next-token prediction on every token.
    #[default]
    Pretrain,
    /// Supervised fine-tuning: loss on response tokens only; lower layers may be frozen.
    Sft,
    /// Direct Preference Optimization against the base model.
    Dpo,
}

/// Learning-rate schedule after warm-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine decay to 10% of the peak rate.
    #[default]
    Cosine,
    /// Linear decay to zero.
    Linear,
    /// Constant rate.
    Constant,
}

/// Numeric precision of training.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on GPUs, f32 on CPU.
    #[default]
    Auto,
    /// f32 everywhere.
    Fp32,
    /// bf16 compute with f32 master weights.
    Bf16,
}

/// Optimisation settings (AdamW).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hyperparameters {
    /// Optimizer steps.
    #[schemars(range(min = 1, max = 100000000))]
    pub steps: u64,
    /// Sequences per micro-batch per worker.
    #[schemars(range(min = 1, max = 65536))]
    pub batch_size: u32,
    /// Peak learning rate, in (0, 1].
    #[schemars(extend("minimum" = 0.0, "exclusiveMinimum" = true, "maximum" = 1.0))]
    pub learning_rate: f64,
    /// Steps of linear warm-up (less than `steps`).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub warmup_steps: u64,
    /// Decay after warm-up.
    #[serde(default)]
    pub schedule: Schedule,
    /// AdamW decoupled weight decay.
    #[serde(default = "weight_decay")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    #[serde(default = "grad_clip")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub gradient_clip: f64,
    /// Compute precision.
    #[serde(default)]
    pub precision: Precision,
    /// Seed of initialisation, shuffling and sampling.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub seed: u64,
    /// Micro-batches accumulated into one optimizer step.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 4096))]
    pub gradient_accumulation: u32,
    /// Fraction of the lowest layers frozen during sft, in [0, 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0.0, "maximum" = 1.0, "exclusiveMaximum" = true))]
    pub frozen_layer_fraction: Option<f64>,
}

fn weight_decay() -> f64 {
    0.01
}

fn grad_clip() -> f64 {
    1.0
}

/// When and where checkpoints are written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointPolicy {
    /// Write a checkpoint every this many optimizer steps.
    #[serde(default = "every_steps")]
    #[schemars(range(min = 1, max = 100000000))]
    pub every_steps: u64,
    /// Checkpoints kept; older ones are deleted.
    #[serde(default = "keep")]
    #[schemars(range(min = 1, max = 100))]
    pub keep: u32,
    /// Storage; an operator-made volume scoped to the job when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<CheckpointStorage>,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            every_steps: every_steps(),
            keep: keep(),
            storage: None,
        }
    }
}

fn every_steps() -> u64 {
    100
}

fn keep() -> u32 {
    3
}

/// Where checkpoints live: a PersistentVolumeClaim the workers mount, or a URI.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.pvc) != has(self.uri)",
        "message": "exactly one of checkpoint.storage.pvc and checkpoint.storage.uri must be set",
    },
    {
        "rule": "!has(self.uri) || self.uri.matches('^pvc://[^/]+')",
        "message": "checkpoint.storage.uri must be pvc://<claim>[/<path>]: checkpoints need a volume that outlives the pod, and object storage (s3://) is not supported yet",
        "fieldPath": ".uri",
    },
]))]
pub struct CheckpointStorage {
    /// Name of a PersistentVolumeClaim in the job's namespace (ReadWriteMany when workers may
    /// move between nodes). Each job writes below `<namespace>/<name>/<uid>/` in it, so jobs
    /// sharing a claim never see each other's checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub pvc: Option<String>,
    /// `pvc://<claim>/<path>`: like `pvc`, below `<path>` in the claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StorageUri>,
}

impl CheckpointStorage {
    /// The claim and the directory in it that checkpoints go below (`""` for the claim's root).
    pub fn claim_and_path(&self) -> Option<(&str, &str)> {
        if let Some(claim) = &self.pvc {
            return Some((claim.as_str(), ""));
        }
        let rest = self.uri.as_ref()?.as_str().strip_prefix("pvc://")?;
        let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
        (!claim.is_empty()).then_some((claim, path.trim_matches('/')))
    }
}

/// Where the trained model goes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    /// Destination of the model directory (safetensors + config + tokenizer + sha256).
    pub uri: StorageUri,
    /// Also export a GGUF file in this quantization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gguf: Option<GgufQuantization>,
}

/// GGUF export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum GgufQuantization {
    /// 8-bit blocks.
    #[serde(rename = "Q8_0")]
    Q8_0,
    /// 4-bit blocks.
    #[serde(rename = "Q4_0")]
    Q4_0,
}

/// How node and device failures are handled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverPolicy {
    /// Fail-overs (node or device faults) allowed before the job fails.
    #[serde(default = "max_restarts")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_restarts: u32,
    /// A GPU node whose Lease is older than this is treated as failed. At least 15: a stock
    /// kubelet renews its Lease every 10 s (a quarter of its 40 s lease duration), and 5 s more
    /// covers API latency and clock skew, so a healthy node is never taken for a dead one.
    #[serde(default = "lease_timeout")]
    #[schemars(range(min = 15, max = 600))]
    pub node_lease_timeout_seconds: u32,
    /// A gang (`workers` > 1) whose workers are not all placed on nodes this long after they
    /// were created releases them (they would hold GPUs idle) and tries again as a new attempt
    /// after as long again; default 120.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 3600))]
    pub gang_placement_timeout_seconds: Option<u32>,
}

impl Default for FailoverPolicy {
    fn default() -> Self {
        Self {
            max_restarts: max_restarts(),
            node_lease_timeout_seconds: lease_timeout(),
            gang_placement_timeout_seconds: None,
        }
    }
}

fn max_restarts() -> u32 {
    5
}

fn lease_timeout() -> u32 {
    15
}

/// Suspend, retry and clean-up policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    /// Stop the workers (checkpoint kept) until set back to false.
    #[serde(default)]
    pub suspend: bool,
    /// Delete the finished job this long after it succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<u32>,
    /// Retries after a worker exits with an internal error. User errors (bad config or data,
    /// exit code 65) are never retried.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub backoff_limit: u32,
}

/// Lifecycle phase of a TrainingJob.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TrainingPhase {
    /// Accepted; workers not yet running.
    #[default]
    Pending,
    /// Workers are training.
    Running,
    /// A failed node or device is being replaced.
    Restarting,
    /// Suspended by `runPolicy.suspend`.
    Suspended,
    /// The model is written to `status.artifact`.
    Succeeded,
    /// Given up; `conditions` say why.
    Failed,
}

/// Observed state of a TrainingJob.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobStatus {
    /// Lifecycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TrainingPhase>,
    /// `Running` (the current attempt's workers all run), `Complete`, `Failed` and `Suspended`,
    /// each with a reason and message (Kubernetes API conventions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current attempt; it increases with every replacement of the workers and fences checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Nodes the current attempt's workers run on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Nodes this job's new workers avoid because they failed under it recently; a node leaves
    /// this list when its exclusion expires (the operator's `--node-exclusion-seconds`, 10
    /// minutes by default), `failovers` keeps the history.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_nodes: Vec<String>,
    /// Worker replacements so far (fail-overs and retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u32>,
    /// Training progress, written by the runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TrainingProgress>,
    /// The newest checkpoint that verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointRecord>,
    /// The trained model, once the job succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ModelArtifact>,
    /// The base model this job trains from, when `spec.model.fromTrainingJob` named it:
    /// recorded before the first worker starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<BaseModelRecord>,
    /// The current attempt's gang, when the job has more than one worker: its state and where
    /// each worker runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang: Option<GangStatus>,
    /// Every fail-over: which node, why, when detected, when the replacement ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failovers: Vec<FailoverRecord>,
    /// When the first worker started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}

/// Training progress as the runtime reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingProgress {
    /// Optimizer steps done.
    pub step: u64,
    /// Optimizer steps in all.
    pub total_steps: u64,
    /// `"step/total"`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_of_total: Option<String>,
    /// Training loss at `step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Learning rate at `step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Training throughput.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// DPO's implicit rewards at `step` (stage dpo).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewards: Option<PreferenceRewards>,
    /// When this was reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Time>,
}

/// DPO's implicit rewards, `beta x (log π(y) - log π_ref(y))`, as TRL reports them (means over
/// the step's pairs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreferenceRewards {
    /// Mean reward of the preferred answers.
    pub chosen: f64,
    /// Mean reward of the rejected answers.
    pub rejected: f64,
    /// Mean of chosen minus rejected.
    pub margins: f64,
    /// Share of pairs whose chosen reward is strictly above the rejected one.
    pub accuracies: f64,
}

impl TrainingProgress {
    /// Progress at `step` of `total_steps`, with the `step/total` column filled in.
    pub fn at(step: u64, total_steps: u64) -> Self {
        Self {
            step,
            total_steps,
            step_of_total: Some(format!("{step}/{total_steps}")),
            ..Self::default()
        }
    }
}

/// The model a job fine-tunes, taken from another TrainingJob.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BaseModelRecord {
    /// The TrainingJob it came from.
    pub training_job: String,
    /// Where the model is (that job's `status.artifact.uri`).
    pub uri: String,
    /// sha256 of its weights (hex).
    pub sha256: String,
}

/// A checkpoint that was written and verified.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRecord {
    /// Optimizer step it holds.
    pub step: u64,
    /// Attempt that wrote it.
    pub attempt: u32,
    /// Where it is.
    pub uri: String,
    /// When it was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// A model produced by training.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelArtifact {
    /// Where the model directory is.
    pub uri: String,
    /// sha256 of the weights (hex).
    pub sha256: String,
    /// GGUF export, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gguf_uri: Option<String>,
}

/// Why a worker was moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FailoverReason {
    /// The node's Ready condition was not True.
    NodeNotReady,
    /// The node's Lease was older than `nodeLeaseTimeoutSeconds`.
    NodeLeaseExpired,
    /// The node's GPUs were marked unhealthy (taint or condition).
    GpuUnhealthy,
    /// The node's allocatable GPUs dropped below what the worker holds.
    GpuCapacityLost,
    /// The worker exited with the runtime's device-fault code.
    DeviceFault,
    /// The node or pod disappeared.
    NodeDeleted,
    /// The pod failed before its worker ran: rejected by the kubelet at admission (for example
    /// `UnexpectedAdmissionError` or `OutOfnvidia.com/gpu`), evicted before start, or refused by
    /// node affinity.
    PodFailed,
}

/// The workers of one attempt of a data-parallel job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GangStatus {
    /// Placing, Placed or Released.
    pub state: GangState,
    /// Workers of the attempt placed on a node.
    pub placed: u32,
    /// Each worker of the attempt, by rank.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<WorkerStatus>,
}

/// Where a gang stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum GangState {
    /// Not all workers have a node yet.
    #[default]
    Placing,
    /// Every worker has its own node.
    Placed,
    /// The gang could not be placed in time: its workers were released (the `GangPlaced`
    /// condition says why); a new attempt follows.
    Released,
}

/// One worker of a gang.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    /// Its rank.
    pub rank: u32,
    /// Its pod.
    pub pod: String,
    /// The node it was placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The pod's phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// One fail-over.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverRecord {
    /// Attempt that failed.
    pub attempt: u32,
    /// Node it ran on.
    pub node: String,
    /// Why it was failed.
    pub reason: FailoverReason,
    /// When the operator detected the failure.
    pub detected_at: Time,
    /// When the replacement worker was Running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_at: Option<Time>,
}
