//! `ModelServer`: serve a model (pinned, or whatever an EvalGate last promoted) over an
//! OpenAI-compatible API, rolling back a model whose pods do not become Ready in time.
//!
//! GitOps: the operator never writes a ModelServer's `spec`. Promotion and roll-back live in
//! its `status` and in the Deployment it owns, so the user's manifests stay in sync.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{ComputeResources, Condition, LocalObjectReference, StorageUri};
use crate::evalgate::ResolvedModel;

/// Serve a model over an OpenAI-compatible HTTP API (a Deployment and a Service running
/// `anneal-runtime serve`). Follows an EvalGate or pins a model URI.
// Each printcolumn repeats `type_ = ...`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "anneal.dev",
    version = "v1alpha1",
    kind = "ModelServer",
    namespaced,
    status = "ModelServerStatus",
    shortname = "ms",
    category = "anneal",
    doc = "Serve a model over an OpenAI-compatible API; only models that passed their gate roll out.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".status.currentModel.source"
    ),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Previous",
        type_ = "string",
        json_path = ".status.previousModel.source",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.engine.maxTokens <= self.engine.contextLength",
        "message": "engine.maxTokens must not exceed engine.contextLength",
        "fieldPath": ".engine.maxTokens",
    },
    {
        "rule": "self.engine.maxConcurrentRequests >= self.engine.maxBatchSize",
        "message": "engine.maxConcurrentRequests counts the requests decoding (up to maxBatchSize) and those queued: it must be at least engine.maxBatchSize",
        "fieldPath": ".engine.maxConcurrentRequests",
    },
]))]
pub struct ModelServerSpec {
    /// What to serve.
    pub model: ModelSource,
    /// Serving pods.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 64))]
    pub replicas: u32,
    /// GPUs, CPU and memory per pod, and placement.
    #[serde(default)]
    pub resources: ComputeResources,
    /// Inference engine settings.
    #[serde(default)]
    pub engine: EngineSettings,
    /// A new model whose pods are not all Ready within this many seconds is rolled back.
    #[serde(default = "rollback_deadline")]
    #[schemars(range(min = 10, max = 86400))]
    pub rollback_deadline_seconds: u32,
    /// A Secret holding the API key clients must send (`Authorization: Bearer <key>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,
    /// Runtime image; the operator's default when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
}

fn one() -> u32 {
    1
}

fn rollback_deadline() -> u32 {
    600
}

/// Where the served model comes from: exactly one of `uri` and `fromEvalGate`. To gate a pinned
/// model, name it as the EvalGate's `candidate.uri` and follow the gate: a new URI in Git is then
/// evaluated before it is served.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.uri) != has(self.fromEvalGate)",
    "message": "exactly one of model.uri and model.fromEvalGate must be set",
}]))]
pub struct ModelSource {
    /// A pinned model directory or GGUF file. A sentence-transformers directory of a
    /// BERT-family encoder (e.g. all-MiniLM-L6-v2) is served as an embedding model on
    /// `/v1/embeddings` (detected from its `config.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StorageUri>,
    /// Serve what this EvalGate last promoted (by digest); nothing until it has promoted a model,
    /// and the last passing model while a later candidate fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_eval_gate: Option<LocalObjectReference>,
}

/// Inference engine settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EngineSettings {
    /// Sequences decoded together in one step.
    #[serde(default = "max_batch_size")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_batch_size: u32,
    /// Requests admitted (running + queued) before answering 429.
    #[serde(default = "max_concurrent_requests")]
    #[schemars(range(min = 1, max = 65536))]
    pub max_concurrent_requests: u32,
    /// Longest prompt + completion in tokens (at most the model's own).
    #[serde(default = "context_length")]
    #[schemars(range(min = 16, max = 1048576))]
    pub context_length: u32,
    /// Upper bound on `max_tokens` of a request.
    #[serde(default = "max_tokens")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_tokens: u32,
    /// Whole answers to deterministic requests (temperature 0, or a seed), served again without
    /// the engine; never shared across API keys. Clients opt out with `Cache-Control: no-cache`.
    #[serde(default)]
    pub response_cache: ResponseCacheSettings,
}

/// The response cache of each serving pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResponseCacheSettings {
    /// Seconds an answer is kept; 0 turns the cache off.
    #[serde(default = "cache_ttl")]
    #[schemars(range(min = 0, max = 86400))]
    pub ttl_seconds: u32,
    /// Memory the cache may hold per pod, in MiB (least recently used answers go first).
    #[serde(default = "cache_mib")]
    #[schemars(range(min = 1, max = 65536))]
    pub max_mebibytes: u32,
}

impl Default for ResponseCacheSettings {
    fn default() -> Self {
        Self {
            ttl_seconds: cache_ttl(),
            max_mebibytes: cache_mib(),
        }
    }
}

fn cache_ttl() -> u32 {
    300
}

fn cache_mib() -> u32 {
    64
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_batch_size: max_batch_size(),
            max_concurrent_requests: max_concurrent_requests(),
            context_length: context_length(),
            max_tokens: max_tokens(),
            response_cache: ResponseCacheSettings::default(),
        }
    }
}

fn max_batch_size() -> u32 {
    16
}

fn max_concurrent_requests() -> u32 {
    64
}

fn context_length() -> u32 {
    2048
}

fn max_tokens() -> u32 {
    512
}

/// A key of a Secret in the same namespace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[serde(default = "api_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn api_key() -> String {
    "api-key".into()
}

/// Lifecycle phase of a ModelServer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServerPhase {
    /// No model to serve yet (e.g. the gate has promoted nothing).
    #[default]
    Pending,
    /// A new model is rolling out.
    RollingOut,
    /// All replicas serve the current model.
    Ready,
    /// The last roll-out missed its deadline and the previous model is served again; the failed
    /// model is not tried again until the model to serve changes.
    RolledBack,
    /// Fewer replicas are Ready than asked for, or a roll-out with nothing to roll back to missed
    /// its deadline.
    Degraded,
}

/// Observed state of a ModelServer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelServerStatus {
    /// Lifecycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ServerPhase>,
    /// `Ready`, `Progressing`, `RolledBack` (Kubernetes API conventions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The model the Deployment runs now (rolling out or served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_model: Option<ResolvedModel>,
    /// The last model that was served by every replica before the current one: the roll-back
    /// target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_model: Option<ResolvedModel>,
    /// A model that missed its roll-out deadline and was rolled back; not tried again while it
    /// is the model to serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_from: Option<ResolvedModel>,
    /// When the current roll-out started; absent once every replica is Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_started_at: Option<Time>,
    /// Roll-outs, newest last (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub history: Vec<RolloutRecord>,
    /// Pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Pods Ready with the current model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<u32>,
    /// In-cluster base URL of the OpenAI-compatible API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// How one roll-out ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RolloutOutcome {
    /// Every replica became Ready with the model.
    Served,
    /// The model missed its deadline and the previous one was restored.
    RolledBack,
    /// The model missed its deadline with nothing to roll back to.
    DeadlineExceeded,
}

/// One roll-out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRecord {
    /// The model rolled out.
    pub model: ResolvedModel,
    /// How it ended.
    pub outcome: RolloutOutcome,
    /// When the roll-out started.
    pub started_at: Time,
    /// When it ended.
    pub finished_at: Time,
}
