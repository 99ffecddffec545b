//! The EvalGate state machine: from the gate, its resolved candidate, the baseline and its
//! evaluation pods, decide the status, which pod to create and which to delete. Pure: no client,
//! no clock. Fails closed: anything short of a trustworthy, finite, in-bounds measurement of the
//! right weights is a failed gate.

use anneal_crds::EvalGate;
use anneal_crds::common::set_condition;
use anneal_crds::contract::{self, EvalMessage};
use anneal_crds::evalgate::{
    EvalGateStatus, GatePhase, GateRound, Metric, MetricResult, MetricThreshold, ResolvedModel,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use super::build::CONTAINER;
use crate::labels::{ROUND, TRY};
use crate::pod;
use crate::reconcile::{condition, controlled_by};

/// Rounds kept in `status.history`.
pub const HISTORY: usize = 10;

/// What the candidate is now.
#[derive(Clone, Debug, PartialEq)]
pub enum Candidate {
    /// Nothing to evaluate yet; why.
    Waiting {
        /// CamelCase reason.
        reason: String,
        /// For people.
        message: String,
    },
    /// The candidate can never be evaluated (its TrainingJob failed).
    Unusable {
        /// CamelCase reason.
        reason: String,
        /// For people.
        message: String,
    },
    /// The TrainingJob named is gone: a decided round stands.
    Gone,
    /// This model.
    Ready(ResolvedModel),
}

/// The baseline of `noRegression`.
#[derive(Clone, Debug, PartialEq)]
pub enum Baseline {
    /// No comparison asked for.
    NotAsked,
    /// The ModelServer serves nothing (or does not exist): nothing to compare with.
    NothingServed(String),
    /// Compare with this model.
    Model(ResolvedModel),
}

pub use crate::reconcile::Notice;

/// What the reconciler must do.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The status to write (when it differs from the stored one).
    pub status: EvalGateStatus,
    /// The evaluation pod to create (`try` of the current round), when it is missing.
    pub create_try: Option<u32>,
    /// Pods to delete: of other rounds, of finished tries, or of a round that timed out.
    pub delete: Vec<String>,
    /// Events.
    pub notices: Vec<Notice>,
    /// A verdict was reached now: (`Passed`/`Failed`, reason).
    pub verdict: Option<(GatePhase, String)>,
    /// Look again at this time even if nothing changes (the timeout).
    pub requeue_at: Option<Timestamp>,
}

/// Identifies a round: the candidate (place and digest) and the gate's generation (a changed
/// threshold is a new evaluation). Names the round's pods.
pub fn round_key(candidate: &ResolvedModel, generation: Option<i64>) -> String {
    let mut h = Sha256::new();
    h.update(candidate.uri.as_bytes());
    h.update([0]);
    h.update(candidate.sha256.as_deref().unwrap_or("").as_bytes());
    h.update([0]);
    h.update(generation.unwrap_or(0).to_le_bytes());
    hex::encode(&h.finalize()[..5])
}

fn label_u32(pod: &Pod, key: &str) -> Option<u32> {
    pod.labels().get(key)?.parse().ok()
}

/// Exit codes that say the evaluation itself was refused (bad model, bad data): retrying the
/// same thing cannot help.
fn is_user_error(code: i32) -> bool {
    code == contract::EXIT_USER_ERROR
}

/// How one try of the evaluation ended.
enum TryEnd {
    /// Still running (or starting).
    Running,
    /// The report.
    Reported(String),
    /// The evaluation refused its input (exit 65): the gate fails.
    Refused(String),
    /// The container cannot start without a change (bad image, missing Secret): the gate fails.
    CannotStart(String),
    /// Lost to the infrastructure (node, eviction, device, internal error): retried.
    Lost(String),
}

fn try_end(pod: &Pod) -> TryEnd {
    if let Some(exit) = pod::exit_of(pod, CONTAINER) {
        let tail = exit.message.trim();
        return match exit.code {
            0 => TryEnd::Reported(exit.message),
            code if is_user_error(code) => TryEnd::Refused(format!("exit {code}: {tail}")),
            code => TryEnd::Lost(format!("exit {code}: {tail}")),
        };
    }
    if let Some(why) = pod::failed_before_start(pod, CONTAINER) {
        return TryEnd::Lost(why);
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return TryEnd::Lost(
            "the evaluation pod was deleted (evicted, or its node was lost)".into(),
        );
    }
    if let Some(why) = pod::cannot_start(pod, CONTAINER) {
        return TryEnd::CannotStart(why);
    }
    TryEnd::Running
}

/// The verdict on one round.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Every metric that counts held, and the measurement can be trusted.
    pub passed: bool,
    /// In a word: `Passed`, `ThresholdFailed`, `Regression`, `DigestMismatch`, `BadReport`,
    /// `Timeout`, `EvaluationRefused`, `PodCannotStart`, `InfrastructureFailure`.
    pub reason: String,
    /// For people: the metrics, or what failed with its value and bound.
    pub message: String,
    /// Each metric measured (empty when the evaluation produced none that can be trusted).
    pub results: Vec<MetricResult>,
    /// The digest of the weights the evaluation measured.
    pub measured_sha256: Option<String>,
}

impl Verdict {
    fn failed(reason: &str, message: String) -> Self {
        Self {
            passed: false,
            reason: reason.into(),
            message,
            results: Vec::new(),
            measured_sha256: None,
        }
    }
}

/// The verdict on one report: each metric against its bounds and the baseline.
pub fn judge(
    gate: &EvalGate,
    candidate: &ResolvedModel,
    baseline: Option<&ResolvedModel>,
    message: &str,
) -> Verdict {
    let report: EvalMessage = match serde_json::from_str(message.trim()) {
        Ok(report) => report,
        Err(e) => {
            return Verdict::failed(
                "BadReport",
                format!(
                    "the evaluation's report cannot be read ({e}): {}",
                    message.trim()
                ),
            );
        }
    };
    if let Some(want) = &candidate.sha256
        && !report.model_sha256.eq_ignore_ascii_case(want)
    {
        return Verdict::failed(
            "DigestMismatch",
            format!(
                "the evaluated weights have sha256 {}, not the candidate's {want}: the model at {} changed",
                report.model_sha256, candidate.uri
            ),
        );
    }
    let base_report = match baseline {
        None => None,
        Some(base) => {
            let Some(b) = report.baseline.as_deref() else {
                return Verdict::failed(
                    "BadReport",
                    "the evaluation did not report the baseline model".into(),
                );
            };
            if let Some(want) = &base.sha256
                && !b.model_sha256.eq_ignore_ascii_case(want)
            {
                return Verdict::failed(
                    "DigestMismatch",
                    format!(
                        "the baseline's weights have sha256 {}, not the served model's {want}",
                        b.model_sha256
                    ),
                );
            }
            Some(b)
        }
    };
    let tolerance = gate
        .spec
        .no_regression
        .as_ref()
        .map_or(0.0, |n| n.tolerance);
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for t in &gate.spec.metrics {
        let value = report.value(t.metric);
        let base = base_report.and_then(|b| b.value(t.metric));
        let (passed, why) = check(t, value, base, tolerance);
        if !passed && !t.dry_run {
            failures.push(why);
        }
        results.push(MetricResult {
            metric: t.metric,
            value,
            min: t.min,
            max: t.max,
            baseline: base,
            passed,
            dry_run: t.dry_run,
        });
    }
    let measured_sha256 = Some(report.model_sha256.to_lowercase());
    if failures.is_empty() {
        let message = summary(&results);
        return Verdict {
            passed: true,
            reason: "Passed".into(),
            message,
            results,
            measured_sha256,
        };
    }
    let regression = failures.iter().all(|f| f.contains("served model"));
    Verdict {
        passed: false,
        reason: if regression {
            "Regression"
        } else {
            "ThresholdFailed"
        }
        .into(),
        message: failures.join("; "),
        results,
        measured_sha256,
    }
}

/// Whether one metric holds; why not, in words that name the metric, its value and its bound.
fn check(
    t: &MetricThreshold,
    value: Option<f64>,
    base: Option<f64>,
    tolerance: f64,
) -> (bool, String) {
    let name = t.metric.as_str();
    let Some(v) = value else {
        let why = if t.metric == Metric::Accuracy {
            " (exact match needs prompt/response data)"
        } else {
            ""
        };
        return (false, format!("{name}: no finite value was reported{why}"));
    };
    if let Some(min) = t.min
        && v < min
    {
        return (false, format!("{name} {v:.4} is below the minimum {min}"));
    }
    if let Some(max) = t.max
        && v > max
    {
        return (false, format!("{name} {v:.4} is above the maximum {max}"));
    }
    if let Some(b) = base {
        let slack = tolerance * b.abs();
        let worse = if t.metric.higher_is_better() {
            v < b - slack
        } else {
            v > b + slack
        };
        if worse {
            return (
                false,
                format!(
                    "{name} {v:.4} is worse than the served model's {b:.4} by more than the tolerance {tolerance}"
                ),
            );
        }
    }
    (true, String::new())
}

fn summary(results: &[MetricResult]) -> String {
    results
        .iter()
        .map(|r| {
            let value = r.value.map_or("-".to_string(), |v| format!("{v:.4}"));
            let dry = if r.dry_run { " (dry run)" } else { "" };
            format!("{} {value}{dry}", r.metric.as_str())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Decides what to do. `pods` are the gate's evaluation pods (any round).
pub fn decide(
    gate: &EvalGate,
    candidate: &Candidate,
    baseline: &Baseline,
    pods: &[Pod],
    now: Timestamp,
) -> Plan {
    let generation = gate.metadata.generation;
    let uid = gate.metadata.uid.as_deref();
    let mut status = gate.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let mut plan = Plan::default();
    let ours: Vec<&Pod> = pods.iter().filter(|p| controlled_by(*p, uid)).collect();

    let model = match candidate {
        Candidate::Ready(model) => model.clone(),
        Candidate::Gone if status.round.is_some() => {
            // The candidate's TrainingJob was deleted (a TTL, say): its round stands.
            if status.phase == Some(GatePhase::Evaluating) {
                status.candidate.clone().unwrap_or_default()
            } else {
                plan.delete = ours.iter().map(|p| p.name_any()).collect();
                plan.status = status;
                return plan;
            }
        }
        Candidate::Gone => {
            let message = "the candidate TrainingJob does not exist".to_string();
            return waiting(gate, status, &ours, "CandidateNotFound", &message, now);
        }
        Candidate::Waiting { reason, message } => {
            return waiting(gate, status, &ours, reason, message, now);
        }
        Candidate::Unusable { reason, message } => {
            let mut plan = waiting(gate, status, &ours, reason, message, now);
            let said = plan
                .status
                .conditions
                .iter()
                .any(|c| c.type_ == "Evaluated" && c.reason == *reason && c.status == "True");
            if !said {
                plan.status.phase = Some(GatePhase::Failed);
                plan.status.round = None;
                let promoted = plan.status.promoted.is_some();
                set_condition(
                    &mut plan.status.conditions,
                    condition("Evaluated", true, reason, message, generation, now),
                );
                set_condition(
                    &mut plan.status.conditions,
                    condition("Promoted", false, reason, &keeps(promoted), generation, now),
                );
                plan.notices.push(Notice {
                    warning: true,
                    reason: reason.clone(),
                    message: message.clone(),
                });
            }
            return plan;
        }
    };

    let key = round_key(&model, generation);
    if status.round.as_deref() != Some(key.as_str()) {
        // A new round: recorded before its pod exists, so that a crash in between creates the
        // same pod (the name holds the round and the try) and never a second one.
        status.round = Some(key.clone());
        status.candidate = Some(model.clone());
        status.phase = Some(GatePhase::Evaluating);
        status.tries = Some(1);
        status.started_at = Some(Time(now));
        status.evaluated_at = None;
        status.results.clear();
        status.baseline = match baseline {
            Baseline::Model(m) => Some(m.clone()),
            _ => None,
        };
        let compared = match baseline {
            Baseline::NotAsked => String::new(),
            Baseline::NothingServed(why) => format!(" ({why}: not compared)"),
            Baseline::Model(m) => format!(
                " against the served model {}",
                m.sha256.as_deref().map_or(m.uri.as_str(), short)
            ),
        };
        let message = format!("evaluating {}{compared}", describe(&model));
        set_condition(
            &mut status.conditions,
            condition("Evaluated", false, "Evaluating", &message, generation, now),
        );
        let promoted = status.promoted.is_some();
        set_condition(
            &mut status.conditions,
            condition(
                "Promoted",
                false,
                "Evaluating",
                &keeps(promoted),
                generation,
                now,
            ),
        );
        plan.notices.push(Notice {
            warning: false,
            reason: "Evaluating".into(),
            message,
        });
    }
    let tries = status.tries.unwrap_or(1);
    // Pods of other rounds (a candidate replaced mid-evaluation) and earlier tries go.
    let current = |p: &&Pod| {
        p.labels().get(ROUND).map(String::as_str) == Some(key.as_str())
            && label_u32(p, TRY) == Some(tries)
    };
    plan.delete = ours
        .iter()
        .filter(|p| !current(p))
        .map(|p| p.name_any())
        .collect();
    if status.phase != Some(GatePhase::Evaluating) {
        // Decided: the round's pod has done its work.
        plan.delete
            .extend(ours.iter().filter(|p| current(p)).map(|p| p.name_any()));
        plan.status = status;
        return plan;
    }

    let started = status.started_at.as_ref().map_or(now, |t| t.0);
    let deadline = started
        .checked_add(SignedDuration::from_secs(i64::from(
            gate.spec.timeout_seconds,
        )))
        .unwrap_or(now);
    let pod = ours.iter().find(|p| current(p));
    let end = pod.map_or(TryEnd::Running, |p| try_end(p));
    let decided = match end {
        TryEnd::Reported(message) => Some(judge(gate, &model, status.baseline.as_ref(), &message)),
        TryEnd::Refused(why) => Some(Verdict::failed(
            "EvaluationRefused",
            format!("the evaluation refused its input: {why}"),
        )),
        TryEnd::CannotStart(why) => Some(Verdict::failed(
            "PodCannotStart",
            format!("the evaluation pod cannot start: {why}"),
        )),
        TryEnd::Lost(why) if tries > gate.spec.retries => Some(Verdict::failed(
            "InfrastructureFailure",
            format!("evaluation lost {tries} time(s), the last: {why}"),
        )),
        TryEnd::Lost(why) => {
            status.tries = Some(tries + 1);
            plan.notices.push(Notice {
                warning: true,
                reason: "EvaluationRetried".into(),
                message: format!(
                    "try {tries} of the evaluation was lost ({why}); starting try {} of {}",
                    tries + 1,
                    gate.spec.retries + 1
                ),
            });
            plan.delete.extend(pod.map(|p| p.name_any()));
            plan.create_try = Some(tries + 1);
            None
        }
        TryEnd::Running if now >= deadline => Some(Verdict::failed(
            "Timeout",
            format!(
                "no verdict within timeoutSeconds {} (try {tries})",
                gate.spec.timeout_seconds
            ),
        )),
        TryEnd::Running => {
            if pod.is_none() {
                plan.create_try = Some(tries);
            }
            plan.requeue_at = Some(deadline);
            None
        }
    };
    if let Some(verdict) = decided {
        decide_round(gate, &mut status, &mut plan, &model, verdict, now);
        plan.delete.extend(pod.map(|p| p.name_any()));
    }
    plan.status = status;
    plan
}

/// Records the verdict on the current round.
fn decide_round(
    gate: &EvalGate,
    status: &mut EvalGateStatus,
    plan: &mut Plan,
    model: &ResolvedModel,
    verdict: Verdict,
    now: Timestamp,
) {
    let generation = gate.metadata.generation;
    let mut model = model.clone();
    model.gate = Some(gate.name_any());
    // The digest the evaluation measured pins a candidate given by URI.
    if model.sha256.is_none() {
        model.sha256 = verdict.measured_sha256.clone();
    }
    status.evaluated_at = Some(Time(now));
    status.results = verdict.results;
    let passed = verdict.passed && model.sha256.is_some();
    let phase = if passed {
        GatePhase::Passed
    } else {
        GatePhase::Failed
    };
    status.phase = Some(phase);
    status.candidate = Some(model.clone());
    let reason = verdict.reason;
    let text = if passed {
        format!("{} passed: {}", describe(&model), verdict.message)
    } else {
        format!("{} failed: {}", describe(&model), verdict.message)
    };
    set_condition(
        &mut status.conditions,
        condition("Evaluated", true, &reason, &text, generation, now),
    );
    if passed {
        status.promoted = Some(model.clone());
        status.promoted_at = Some(Time(now));
        set_condition(
            &mut status.conditions,
            condition(
                "Promoted",
                true,
                "Passed",
                &format!("{} is the promoted model", describe(&model)),
                generation,
                now,
            ),
        );
    } else {
        let promoted = status.promoted.is_some();
        set_condition(
            &mut status.conditions,
            condition(
                "Promoted",
                false,
                &reason,
                &keeps(promoted),
                generation,
                now,
            ),
        );
    }
    status.history.push(GateRound {
        candidate: model.clone(),
        phase,
        reason: reason.clone(),
        at: Time(now),
    });
    let excess = status.history.len().saturating_sub(HISTORY);
    status.history.drain(..excess);
    plan.notices.push(Notice {
        warning: !passed,
        reason: if passed {
            "Promoted".into()
        } else {
            reason.clone()
        },
        message: text,
    });
    plan.verdict = Some((phase, reason));
}

/// A gate with no candidate to evaluate now.
fn waiting(
    gate: &EvalGate,
    mut status: EvalGateStatus,
    ours: &[&Pod],
    reason: &str,
    message: &str,
    now: Timestamp,
) -> Plan {
    let generation = gate.metadata.generation;
    let mut plan = Plan {
        delete: ours.iter().map(|p| p.name_any()).collect(),
        ..Plan::default()
    };
    if status.phase != Some(GatePhase::Failed) {
        status.phase = Some(GatePhase::Pending);
        let promoted = status.promoted.is_some();
        set_condition(
            &mut status.conditions,
            condition("Evaluated", false, reason, message, generation, now),
        );
        set_condition(
            &mut status.conditions,
            condition("Promoted", false, reason, &keeps(promoted), generation, now),
        );
    }
    plan.status = status;
    plan
}

/// What the Promoted condition says while the current candidate is not promoted.
fn keeps(promoted: bool) -> String {
    if promoted {
        "the current candidate is not promoted; the model promoted before stays promoted".into()
    } else {
        "no model has passed this gate".into()
    }
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

fn describe(model: &ResolvedModel) -> String {
    match &model.sha256 {
        Some(sha) => format!("{} (sha256 {})", model.source, short(sha)),
        None => model.source.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OperatorConfig;
    use crate::evalgate::build::eval_pod;
    use anneal_crds::evalgate::NoRegression;
    use serde_json::json;

    const SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const BASE_SHA: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn gate() -> EvalGate {
        let text = include_str!("../../../manifests/examples/evalgate.yaml");
        let mut gate: EvalGate = serde_yaml::from_str(text).unwrap();
        gate.metadata.namespace = Some("ml".into());
        gate.metadata.uid = Some("gate-uid".into());
        gate.metadata.generation = Some(1);
        // accuracy >= 0.9, loss <= 0.5, tokenAccuracy >= 0.95 (dry run); no baseline here.
        gate.spec.no_regression = None;
        gate
    }

    fn model() -> ResolvedModel {
        ResolvedModel {
            source: "trainingjob/arith".into(),
            uri: "pvc://anneal-models/arith".into(),
            sha256: Some(SHA.into()),
            gate: None,
            reference: None,
        }
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    /// The round's pod as the gate made it, with its container ended as given.
    fn pod_of(gate: &EvalGate, try_: u32, exit: Option<(i32, &str)>) -> Pod {
        let status = gate.status.as_ref().unwrap();
        let mut pod = eval_pod(
            gate,
            status.round.as_deref().unwrap(),
            try_,
            status.candidate.as_ref().unwrap(),
            status.baseline.as_ref(),
            &OperatorConfig::default(),
        )
        .unwrap();
        pod.status = Some(
            serde_json::from_value(match exit {
                None => json!({"phase": "Running", "containerStatuses": [{"name": CONTAINER, "image": "x", "imageID": "", "ready": true, "restartCount": 0, "state": {"running": {}}}]}),
                Some((code, message)) => json!({
                    "phase": if code == 0 { "Succeeded" } else { "Failed" },
                    "containerStatuses": [{"name": CONTAINER, "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"terminated": {"exitCode": code, "message": message}}}],
                }),
            })
            .unwrap(),
        );
        pod
    }

    fn report(sha: &str, accuracy: Option<f64>, loss: f64) -> String {
        json!({"model_sha256": sha, "examples": 100, "loss": loss, "perplexity": loss.exp(),
               "token_accuracy": 0.97, "exact_match": accuracy})
        .to_string()
    }

    /// Starts a round at t(0) and returns the gate as stored after it.
    fn started(mut gate: EvalGate, baseline: &Baseline) -> EvalGate {
        let plan = decide(&gate, &Candidate::Ready(model()), baseline, &[], t(0));
        assert_eq!(plan.status.phase, Some(GatePhase::Evaluating));
        assert_eq!(plan.create_try, Some(1));
        gate.status = Some(plan.status);
        gate
    }

    fn verdict(gate: &EvalGate, message: &str) -> Plan {
        let pod = pod_of(gate, 1, Some((0, message)));
        decide(
            gate,
            &Candidate::Ready(model()),
            &Baseline::NotAsked,
            &[pod],
            t(60),
        )
    }

    fn condition_of<'a>(plan: &'a Plan, type_: &str) -> &'a anneal_crds::Condition {
        plan.status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap()
    }

    #[test]
    fn a_candidate_within_every_bound_is_promoted_and_its_pod_removed() {
        let gate = started(gate(), &Baseline::NotAsked);
        // Again before the pod reports: the same pod, never a second one.
        let again = decide(
            &gate,
            &Candidate::Ready(model()),
            &Baseline::NotAsked,
            &[],
            t(5),
        );
        assert_eq!(again.create_try, Some(1));
        assert_eq!(again.status, *gate.status.as_ref().unwrap());
        let plan = verdict(&gate, &report(SHA, Some(0.95), 0.2));
        assert_eq!(plan.status.phase, Some(GatePhase::Passed));
        let promoted = plan.status.promoted.as_ref().unwrap();
        assert_eq!(promoted.sha256.as_deref(), Some(SHA));
        assert_eq!(promoted.gate.as_deref(), Some("arith"));
        assert_eq!(condition_of(&plan, "Promoted").status, "True");
        assert_eq!(condition_of(&plan, "Evaluated").status, "True");
        assert_eq!(plan.delete.len(), 1);
        assert_eq!(plan.verdict, Some((GatePhase::Passed, "Passed".into())));
        assert_eq!(plan.status.results.len(), 3);
        assert_eq!(plan.status.history.len(), 1);
    }

    #[test]
    fn a_failed_bound_names_the_metric_its_value_and_the_bound_and_promotes_nothing() {
        let gate = started(gate(), &Baseline::NotAsked);
        let plan = verdict(&gate, &report(SHA, Some(0.82), 0.2));
        assert_eq!(plan.status.phase, Some(GatePhase::Failed));
        assert_eq!(plan.status.promoted, None);
        let evaluated = condition_of(&plan, "Evaluated");
        assert_eq!(evaluated.reason, "ThresholdFailed");
        assert!(
            evaluated
                .message
                .contains("accuracy 0.8200 is below the minimum 0.9"),
            "{}",
            evaluated.message
        );
        assert!(
            plan.notices
                .iter()
                .any(|n| n.warning && n.message.contains("accuracy 0.82"))
        );
        // Per-metric results are kept for a failed round too.
        let accuracy = plan
            .status
            .results
            .iter()
            .find(|r| r.metric == Metric::Accuracy)
            .unwrap();
        assert_eq!((accuracy.value, accuracy.passed), (Some(0.82), false));
    }

    #[test]
    fn nan_missing_metrics_bad_reports_and_other_weights_fail_closed() {
        let gate = started(gate(), &Baseline::NotAsked);
        let nan = verdict(&gate, &report(SHA, None, f64::NAN));
        assert_eq!(nan.status.phase, Some(GatePhase::Failed));
        assert!(
            condition_of(&nan, "Evaluated")
                .message
                .contains("no finite value")
        );
        let other = verdict(&gate, &report(BASE_SHA, Some(1.0), 0.1));
        assert_eq!(condition_of(&other, "Evaluated").reason, "DigestMismatch");
        let garbage = verdict(&gate, "panicked at ...");
        assert_eq!(condition_of(&garbage, "Evaluated").reason, "BadReport");
        for plan in [nan, other, garbage] {
            assert_eq!(plan.status.promoted, None);
        }
    }

    #[test]
    fn a_dry_run_metric_is_reported_but_not_part_of_the_verdict() {
        let gate = started(gate(), &Baseline::NotAsked);
        let mut message: serde_json::Value =
            serde_json::from_str(&report(SHA, Some(0.95), 0.2)).unwrap();
        message["token_accuracy"] = json!(0.5);
        let plan = verdict(&gate, &message.to_string());
        assert_eq!(plan.status.phase, Some(GatePhase::Passed));
        let dry = plan.status.results.iter().find(|r| r.dry_run).unwrap();
        assert_eq!((dry.metric, dry.passed), (Metric::TokenAccuracy, false));
    }

    #[test]
    fn a_regression_against_the_served_model_fails_within_bounds() {
        let mut gate = gate();
        gate.spec.no_regression = Some(NoRegression {
            model_server: Some(anneal_crds::common::LocalObjectReference {
                name: "arith".into(),
            }),
            training_job: None,
            tolerance: 0.01,
        });
        let served = ResolvedModel {
            source: "trainingjob/arith".into(),
            uri: "pvc://anneal-models/arith-v1".into(),
            sha256: Some(BASE_SHA.into()),
            gate: Some("arith".into()),
            reference: None,
        };
        let gate = started(gate, &Baseline::Model(served.clone()));
        assert_eq!(gate.status.as_ref().unwrap().baseline, Some(served));
        let pod = pod_of(&gate, 1, None);
        let args = &pod.spec.as_ref().unwrap().containers[0].args;
        assert!(args.as_ref().unwrap().contains(&"--baseline".to_string()));
        let mut message: serde_json::Value =
            serde_json::from_str(&report(SHA, Some(0.95), 0.30)).unwrap();
        message["baseline"] = serde_json::from_str(&report(BASE_SHA, Some(0.95), 0.20)).unwrap();
        let plan = verdict(&gate, &message.to_string());
        assert_eq!(condition_of(&plan, "Evaluated").reason, "Regression");
        let loss = plan
            .status
            .results
            .iter()
            .find(|r| r.metric == Metric::Loss)
            .unwrap();
        assert_eq!(loss.baseline, Some(0.2));
        // Within the tolerance of the served model it passes.
        message["loss"] = json!(0.201);
        message["perplexity"] = json!(0.201f64.exp());
        let plan = verdict(&gate, &message.to_string());
        assert_eq!(
            plan.status.phase,
            Some(GatePhase::Passed),
            "{:?}",
            plan.status.conditions
        );
    }

    #[test]
    fn lost_pods_are_retried_a_bounded_number_of_times_then_the_gate_fails() {
        let mut gate = started(gate(), &Baseline::NotAsked);
        gate.spec.retries = 1;
        let lost = pod_of(&gate, 1, Some((75, "CUDA error")));
        let plan = decide(
            &gate,
            &Candidate::Ready(model()),
            &Baseline::NotAsked,
            std::slice::from_ref(&lost),
            t(10),
        );
        assert_eq!((plan.status.tries, plan.create_try), (Some(2), Some(2)));
        assert!(plan.delete.contains(&lost.name_any()));
        gate.status = Some(plan.status);
        let lost = pod_of(&gate, 2, Some((1, "internal")));
        let plan = decide(
            &gate,
            &Candidate::Ready(model()),
            &Baseline::NotAsked,
            &[lost],
            t(20),
        );
        assert_eq!(plan.status.phase, Some(GatePhase::Failed));
        assert_eq!(
            condition_of(&plan, "Evaluated").reason,
            "InfrastructureFailure"
        );
        // A refused input (exit 65) is not retried.
        let gate = started(self::gate(), &Baseline::NotAsked);
        let refused = pod_of(&gate, 1, Some((65, "no such model directory")));
        let plan = decide(
            &gate,
            &Candidate::Ready(model()),
            &Baseline::NotAsked,
            &[refused],
            t(10),
        );
        assert_eq!(condition_of(&plan, "Evaluated").reason, "EvaluationRefused");
    }

    #[test]
    fn an_evaluation_pod_that_cannot_start_fails_the_gate_with_the_kubelets_reason() {
        let gate = started(gate(), &Baseline::NotAsked);
        let mut pod = pod_of(&gate, 1, None);
        pod.status = Some(
            serde_json::from_value(json!({"phase": "Pending", "containerStatuses": [{
                "name": CONTAINER, "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}}}]}))
            .unwrap(),
        );
        let plan = decide(
            &gate,
            &Candidate::Ready(model()),
            &Baseline::NotAsked,
            &[pod],
            t(10),
        );
        let evaluated = condition_of(&plan, "Evaluated");
        assert_eq!(evaluated.reason, "PodCannotStart");
        assert!(
            evaluated.message.contains("ImagePullBackOff"),
            "{}",
            evaluated.message
        );
        assert_eq!(plan.status.promoted, None);
    }

    #[test]
    fn no_verdict_before_the_timeout_fails_the_gate_and_removes_the_pod() {
        let gate = started(gate(), &Baseline::NotAsked);
        let running = pod_of(&gate, 1, None);
        let before = decide(
            &gate,
            &Candidate::Ready(model()),
            &Baseline::NotAsked,
            std::slice::from_ref(&running),
            t(10),
        );
        assert_eq!(before.requeue_at, Some(t(900)));
        let after = decide(
            &gate,
            &Candidate::Ready(model()),
            &Baseline::NotAsked,
            &[running],
            t(900),
        );
        assert_eq!(condition_of(&after, "Evaluated").reason, "Timeout");
        assert_eq!(after.delete.len(), 1);
    }

    #[test]
    fn a_new_artifact_is_a_new_round_and_a_deleted_job_leaves_the_verdict_standing() {
        let gate0 = started(gate(), &Baseline::NotAsked);
        let mut gate = gate0.clone();
        gate.status = Some(verdict(&gate0, &report(SHA, Some(0.95), 0.2)).status);
        let decided = gate.status.clone().unwrap();
        // The TrainingJob deleted (a TTL): nothing changes.
        let gone = decide(&gate, &Candidate::Gone, &Baseline::NotAsked, &[], t(100));
        assert_eq!(gone.status, decided);
        // Re-run: waiting keeps the promoted model.
        let waiting = Candidate::Waiting {
            reason: "WaitingForTraining".into(),
            message: "running".into(),
        };
        let plan = decide(&gate, &waiting, &Baseline::NotAsked, &[], t(100));
        assert_eq!(plan.status.phase, Some(GatePhase::Pending));
        assert_eq!(plan.status.promoted, decided.promoted);
        // A new artifact: a new round, a new pod name.
        let next = ResolvedModel {
            sha256: Some(BASE_SHA.into()),
            ..model()
        };
        let plan = decide(
            &gate,
            &Candidate::Ready(next),
            &Baseline::NotAsked,
            &[],
            t(200),
        );
        assert_eq!(plan.status.phase, Some(GatePhase::Evaluating));
        assert_ne!(plan.status.round, decided.round);
        assert_eq!(plan.create_try, Some(1));
        assert_eq!(plan.status.promoted, decided.promoted);
    }
}
