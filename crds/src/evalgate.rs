//! `EvalGate`: evaluate a candidate model against metric thresholds; a candidate that passes is
//! the gate's promoted model, which the ModelServers that follow the gate serve.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    ComputeResources, Condition, DatasetSpec, LocalObjectReference, SplitPart, StorageUri,
};

/// Evaluate a candidate model; when every threshold holds (and, with `noRegression`, it is not
/// worse than the model served now) it becomes the gate's promoted model. The gate does not know
/// who serves it: a ModelServer names the gate it follows (`spec.model.fromEvalGate`), so each
/// object is owned by whoever applies it (GitOps), and a server never serves a model its gate did
/// not pass.
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
    printcolumn(
        name = "Promoted",
        type_ = "string",
        json_path = ".status.promoted.sha256"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Evaluated\")].message",
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
    /// Evaluate at most this many examples (the first of the split); all when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000000))]
    pub max_examples: Option<u32>,
    /// Thresholds; the gate passes only when all that are not `dryRun` hold.
    #[schemars(length(min = 1, max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["metric"]))]
    pub metrics: Vec<MetricThreshold>,
    /// Also require that the candidate is not worse than a baseline (the model a ModelServer
    /// serves now, or a TrainingJob's model), both measured in the same evaluation pod on the
    /// same data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_regression: Option<NoRegression>,
    /// The gate fails when one evaluation (all its tries) takes longer than this.
    #[serde(default = "timeout_seconds")]
    #[schemars(range(min = 10, max = 86400))]
    pub timeout_seconds: u32,
    /// Evaluation pods lost to an infrastructure failure (node lost, pod evicted or refused by
    /// the kubelet, device fault, internal error) are started again this many times before the
    /// gate fails.
    #[serde(default = "retries")]
    #[schemars(range(min = 0, max = 10))]
    pub retries: u32,
    /// Compute of the evaluation pod, and its placement.
    #[serde(default)]
    pub resources: ComputeResources,
    /// Runtime image; the operator's default when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
}

fn retries() -> u32 {
    2
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
    /// A TrainingJob in this namespace; its `status.artifact` is evaluated once the job has
    /// succeeded, and every new artifact (a re-run, a new round) is evaluated again.
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
    /// Exact-match accuracy of greedy responses, in [0, 1]; higher is better. Only data with
    /// answers has it (prompt/response, chat: the last assistant message, preference pairs:
    /// the chosen answer): on free text it is missing, and a gate that asks for it fails.
    Accuracy,
    /// Next-token accuracy, in [0, 1]; higher is better.
    TokenAccuracy,
    /// Share of held-out preference pairs (`{"prompt", "chosen", "rejected"}`) whose chosen
    /// answer the model prefers, in [0, 1]; higher is better. For a DPO model the preference is
    /// its implicit reward (log-probability ratio to the job's base model, its reference),
    /// otherwise its log-probability. Only preference data has it.
    PreferenceAccuracy,
}

impl Metric {
    /// Every metric, in the order the runtime reports them.
    pub const ALL: [Metric; 5] = [
        Metric::Loss,
        Metric::Perplexity,
        Metric::Accuracy,
        Metric::TokenAccuracy,
        Metric::PreferenceAccuracy,
    ];

    /// The name used in the spec and in Events.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Loss => "loss",
            Metric::Perplexity => "perplexity",
            Metric::Accuracy => "accuracy",
            Metric::TokenAccuracy => "tokenAccuracy",
            Metric::PreferenceAccuracy => "preferenceAccuracy",
        }
    }

    /// Whether a larger value is better (for the no-regression comparison).
    pub fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::Accuracy | Metric::TokenAccuracy | Metric::PreferenceAccuracy
        )
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
    /// Measure and report this metric, but leave it out of the verdict (to try a new threshold).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// Compare against a baseline model, evaluated in the same pod on the same examples: the one a
/// ModelServer serves now, or the one a TrainingJob wrote (the sft model a dpo job started
/// from: "exact match not below the sft model's").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.modelServer) != has(self.trainingJob)",
    "message": "noRegression names exactly one of modelServer and trainingJob",
}]))]
pub struct NoRegression {
    /// The ModelServer whose current model is the baseline. While it serves nothing there is
    /// nothing to compare with, and only the thresholds decide (said in the status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_server: Option<LocalObjectReference>,
    /// A TrainingJob of this namespace whose model (`status.artifact`) is the baseline. Until
    /// it has succeeded there is nothing to compare with (as for a server that serves nothing);
    /// a candidate trained from its model comes after it anyway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_job: Option<LocalObjectReference>,
    /// Relative slack: the candidate may be this much worse (0.01 = 1%) and still pass.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub tolerance: f64,
}

/// Lifecycle phase of an EvalGate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum GatePhase {
    /// Waiting for a candidate (e.g. its TrainingJob to succeed).
    #[default]
    Pending,
    /// An evaluation pod is running.
    Evaluating,
    /// The candidate passed and is the promoted model.
    Passed,
    /// The candidate failed (a threshold, a regression, or an evaluation that could not be
    /// trusted: a missing or non-finite metric, another model's digest, a timeout, a pod that
    /// could not run); the model promoted before, if any, stays promoted.
    Failed,
}

/// Observed state of an EvalGate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvalGateStatus {
    /// Lifecycle phase of the current candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<GatePhase>,
    /// `Evaluated` (a verdict on the current candidate exists) and `Promoted` (the current
    /// candidate is the promoted model), as Kubernetes API conventions have them: `kubectl wait
    /// --for=condition=Promoted evalgate/<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The candidate of the current round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<ResolvedModel>,
    /// Identifies the current round (candidate and gate generation); names its pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<String>,
    /// Evaluation pods started for the current round (1 + retries used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tries: Option<u32>,
    /// When the current round's evaluation started (its timeout counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the verdict on the current round was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluated_at: Option<Time>,
    /// Each metric of the current round against its bounds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<MetricResult>,
    /// The model compared with (`noRegression`), when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<ResolvedModel>,
    /// The last candidate that passed: what following ModelServers serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted: Option<ResolvedModel>,
    /// When `promoted` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_at: Option<Time>,
    /// Verdicts of the last rounds, newest last (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub history: Vec<GateRound>,
}

/// The verdict of one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GateRound {
    /// The candidate.
    pub candidate: ResolvedModel,
    /// `Passed` or `Failed`.
    pub phase: GatePhase,
    /// Why, in a word (`Passed`, `ThresholdFailed`, `Timeout`, ...).
    pub reason: String,
    /// When.
    pub at: Time,
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
    /// The EvalGate that passed it, for a model a gate promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<String>,
    /// For a model aligned with DPO: the model it was aligned against (its TrainingJob's base
    /// model), against which `preferenceAccuracy` ranks pairs by the implicit reward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

impl ResolvedModel {
    /// Whether `other` is the same model: the same place and, where both know it, the same
    /// digest (a model overwritten in place is another model).
    pub fn same_model(&self, other: &ResolvedModel) -> bool {
        self.uri == other.uri && self.sha256 == other.sha256
    }
}

/// One metric measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricResult {
    /// Which metric.
    pub metric: Metric,
    /// Measured value of the candidate; missing when the evaluation did not report a finite one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Lowest value that passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Highest value that passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Value of the baseline model, when compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    /// Whether the bounds (and the baseline comparison) held.
    pub passed: bool,
    /// Reported only; not part of the verdict.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}
