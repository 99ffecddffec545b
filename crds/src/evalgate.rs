//! `EvalGate`: evaluate a candidate model against metric thresholds and promote it into
//! ModelServers only when every threshold holds.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    ComputeResources, Condition, DatasetSpec, LocalObjectReference, SplitPart, StorageUri,
};

/// Evaluate a candidate model; promote it into the target ModelServers only if every
/// threshold holds (and, optionally, it does not regress against the model served now).
// Each printcolumn repeats `type_ = ...`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "anneal.dev",
    version = "v1alpha1",
    kind = "EvalGate",
    namespaced,
    status = "EvalGateStatus",
    shortname = "eg",
    category = "anneal",
    doc = "Evaluate a candidate model against metric thresholds; promote it only when they hold.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Candidate",
        type_ = "string",
        json_path = ".status.candidate.source"
    ),
    printcolumn(name = "Verdict", type_ = "string", json_path = ".status.verdict"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Passed\")].message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EvalGateSpec {
    /// The model to evaluate.
    pub candidate: Candidate,
    /// Evaluation data.
    pub dataset: DatasetSpec,
    /// Part of the data set evaluated.
    #[serde(default)]
    pub split: SplitPart,
    /// Thresholds; the gate passes only when all hold.
    #[schemars(length(min = 1, max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["metric"]))]
    pub metrics: Vec<MetricThreshold>,
    /// Also require no regression against the model the first target ModelServer serves now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_regression: Option<NoRegression>,
    /// Give up (gate Failed) when the evaluation takes longer than this.
    #[serde(default = "timeout_seconds")]
    #[schemars(range(min = 10, max = 86400))]
    pub timeout_seconds: u32,
    /// ModelServers that serve the candidate once the gate passes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub promote_to: Vec<LocalObjectReference>,
    /// Compute of the evaluation pod.
    #[serde(default)]
    pub resources: ComputeResources,
    /// Runtime image; the operator's default when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
}

fn timeout_seconds() -> u32 {
    1800
}

/// What is evaluated: the artifact of a TrainingJob, or a model at a URI.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.trainingJob) != has(self.uri)",
    "message": "exactly one of candidate.trainingJob and candidate.uri must be set",
}]))]
pub struct Candidate {
    /// A TrainingJob in this namespace; evaluated once its `status.artifact` appears.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_job: Option<LocalObjectReference>,
    /// A model directory or GGUF file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StorageUri>,
}

/// Metrics the runtime's `eval` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Metric {
    /// Mean next-token cross-entropy (nats); lower is better.
    Loss,
    /// exp(loss); lower is better.
    Perplexity,
    /// Exact-match accuracy of greedy responses, in [0, 1]; higher is better.
    Accuracy,
    /// Next-token accuracy, in [0, 1]; higher is better.
    TokenAccuracy,
}

impl Metric {
    /// Whether a larger value is better (for the no-regression comparison).
    pub fn higher_is_better(self) -> bool {
        matches!(self, Metric::Accuracy | Metric::TokenAccuracy)
    }
}

/// Bounds one metric must stay within.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.min) || has(self.max)",
        "message": "a metric threshold needs min, max or both",
    },
    {
        "rule": "!has(self.min) || !has(self.max) || self.min <= self.max",
        "message": "min must not be greater than max",
        "fieldPath": ".min",
    },
]))]
pub struct MetricThreshold {
    /// Which metric.
    pub metric: Metric,
    /// Lowest value that passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Highest value that passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// Compare against the model being served now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NoRegression {
    /// The ModelServer whose current model is the baseline; the first `promoteTo` when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_server: Option<LocalObjectReference>,
    /// Relative slack: the candidate may be this much worse (0.01 = 1%) and still pass.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub tolerance: f64,
}

/// Lifecycle phase of an EvalGate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum GatePhase {
    /// Waiting for the candidate (e.g. its TrainingJob to succeed).
    #[default]
    Pending,
    /// The evaluation pod is running.
    Evaluating,
    /// Decided; see `verdict`.
    Completed,
    /// The evaluation could not run (timeout, bad candidate).
    Error,
}

/// Outcome of a gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Verdict {
    /// Every threshold held; the candidate was promoted.
    Passed,
    /// A threshold (or the no-regression check) failed; nothing was promoted.
    Failed,
}

/// Observed state of an EvalGate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvalGateStatus {
    /// Lifecycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<GatePhase>,
    /// `Passed`, `Promoted`, ... (Kubernetes API conventions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The resolved candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<ResolvedModel>,
    /// Outcome, once decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// Each metric measured against its threshold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<MetricResult>,
    /// The model promoted by this gate (what following ModelServers serve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted: Option<ResolvedModel>,
    /// When the evaluation finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluated_at: Option<Time>,
}

/// A model pinned by content.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedModel {
    /// Where it came from, for display: `trainingjob/<name>` or the URI.
    pub source: String,
    /// Where the model is.
    pub uri: String,
    /// sha256 of its weights (hex), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// One metric measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricResult {
    /// Which metric.
    pub metric: Metric,
    /// Measured value of the candidate.
    pub value: f64,
    /// Baseline value (the served model), when compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    /// Whether the threshold (and baseline comparison) held.
    pub passed: bool,
}
