//! The TrainingJob state machine: from the job and what its workers and their nodes look like now,
//! decide what to delete, what to create and what the status is. Pure: no client, no clock.

use std::collections::BTreeMap;

use anneal_crds::TrainingJob;
use anneal_crds::common::{Condition, set_condition};
use anneal_crds::contract;
use anneal_crds::trainingjob::{
    FailoverReason, FailoverRecord, ModelArtifact, TrainingJobStatus, TrainingPhase,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::labels::ATTEMPT;
use crate::trainingjob::build::CONTAINER;

/// A pod to delete; `force` skips the grace period (its node is gone and will never confirm).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deletion {
    /// Pod name.
    pub pod: String,
    /// Delete with grace period 0.
    pub force: bool,
}

/// An Event to record on the TrainingJob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// `Normal` or `Warning`.
    pub warning: bool,
    /// Short CamelCase reason.
    pub reason: String,
    /// What happened, for people.
    pub message: String,
}

/// What the reconciler must do.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The status to write (progress and lastCheckpoint are the runtime's and are left out).
    pub status: TrainingJobStatus,
    /// Pods to delete.
    pub delete: Vec<Deletion>,
    /// Create the missing workers of this attempt.
    pub create_attempt: Option<u32>,
    /// Events to record.
    pub notices: Vec<Notice>,
    /// A failover was decided now, for this reason.
    pub failover: Option<FailoverReason>,
}

/// What was observed about the job's world.
pub struct Observed<'a> {
    /// Every pod labelled with this job.
    pub pods: &'a [Pod],
    /// Nodes that cannot run workers, and why.
    pub failed_nodes: &'a BTreeMap<String, FailoverReason>,
    /// Now.
    pub now: Timestamp,
}

fn attempt_of(pod: &Pod) -> Option<u32> {
    pod.labels().get(ATTEMPT).and_then(|a| a.parse().ok())
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

fn phase_of(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Exit code and termination message of the worker container, once it ended.
fn exit_of(pod: &Pod) -> Option<(i32, String)> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let worker = statuses.iter().find(|s| s.name == CONTAINER)?;
    let terminated = worker.state.as_ref()?.terminated.as_ref()?;
    Some((
        terminated.exit_code,
        terminated.message.clone().unwrap_or_default(),
    ))
}

fn is_terminal(phase: Option<TrainingPhase>) -> bool {
    matches!(
        phase,
        Some(TrainingPhase::Succeeded | TrainingPhase::Failed)
    )
}

/// The artifact a successful worker reports in its termination message (`{"artifact": {...}}`).
fn artifact_from(message: &str) -> Option<ModelArtifact> {
    let value: serde_json::Value = serde_json::from_str(message).ok()?;
    serde_json::from_value(value.get("artifact")?.clone()).ok()
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(now),
    }
}

/// Decides the next step of `job` given what was observed.
pub fn decide(job: &TrainingJob, observed: &Observed<'_>) -> Plan {
    let now = observed.now;
    let generation = job.metadata.generation;
    let mut status = job.status.clone().unwrap_or_default();
    // The runtime owns these; the operator never writes them back.
    status.progress = None;
    status.last_checkpoint = None;
    status.observed_generation = generation;
    let mut plan = Plan::default();
    let mut attempt = status.attempt.unwrap_or(1).max(1);
    let workers = job.spec.workers;

    let set =
        |status: &mut TrainingJobStatus, type_: &str, on: bool, reason: &str, message: &str| {
            set_condition(
                &mut status.conditions,
                condition(type_, on, reason, message, generation, now),
            );
        };

    if is_terminal(status.phase) {
        plan.status = status;
        return plan;
    }
    // Resuming starts a new attempt: a worker of the suspended one that still lives (on a
    // partitioned node) is fenced off, and its checkpoints can no longer overwrite the new ones.
    let resuming = status.phase == Some(TrainingPhase::Suspended) && !job.spec.run_policy.suspend;
    if resuming {
        attempt += 1;
        status.attempt = Some(attempt);
        status.phase = Some(TrainingPhase::Pending);
    }

    // Workers of earlier attempts are fenced: delete them, forcibly when their node is gone.
    for pod in observed
        .pods
        .iter()
        .filter(|p| attempt_of(p) != Some(attempt))
    {
        let force = node_of(pod).is_some_and(|n| observed.failed_nodes.contains_key(n));
        if pod.metadata.deletion_timestamp.is_none() || force {
            plan.delete.push(Deletion {
                pod: pod.name_any(),
                force,
            });
        }
    }
    let current: Vec<&Pod> = observed
        .pods
        .iter()
        .filter(|p| attempt_of(p) == Some(attempt))
        .collect();

    if job.spec.run_policy.suspend {
        for pod in &current {
            plan.delete.push(Deletion {
                pod: pod.name_any(),
                force: false,
            });
        }
        status.phase = Some(TrainingPhase::Suspended);
        status.nodes.clear();
        set(
            &mut status,
            "Suspended",
            true,
            "Suspended",
            "runPolicy.suspend is true; workers stopped, checkpoints kept",
        );
        set(&mut status, "Running", false, "Suspended", "suspended");
        plan.status = status;
        return plan;
    }
    if resuming {
        set(
            &mut status,
            "Suspended",
            false,
            "Resumed",
            &format!("runPolicy.suspend is false; starting attempt {attempt}"),
        );
        plan.notices.push(Notice {
            warning: false,
            reason: "Resumed".into(),
            message: format!("runPolicy.suspend is false; starting attempt {attempt}"),
        });
    }

    // Why the current attempt cannot go on, if it cannot: (reason, node, message).
    let mut broken: Option<(FailoverReason, String, String)> = None;
    let mut succeeded = 0;
    let mut artifact = None;
    for pod in &current {
        if let Some((code, message)) = exit_of(pod) {
            match code {
                contract::EXIT_OK => {
                    succeeded += 1;
                    artifact = artifact.or_else(|| artifact_from(&message));
                }
                contract::EXIT_USER_ERROR => {
                    return fail(
                        status,
                        plan,
                        "UserError",
                        &format!("{}: {message}", pod.name_any()),
                        generation,
                        now,
                    );
                }
                contract::EXIT_DEVICE_FAULT => {
                    let node = node_of(pod).unwrap_or_default().to_string();
                    broken = Some((
                        FailoverReason::DeviceFault,
                        node,
                        format!("worker exited with the device-fault code: {message}"),
                    ));
                }
                other => {
                    let retries = status
                        .restarts
                        .unwrap_or(0)
                        .saturating_sub(status.failovers.len() as u32);
                    if retries >= job.spec.run_policy.backoff_limit {
                        let why = format!(
                            "{} exited with code {other} after {retries} retries: {message}",
                            pod.name_any()
                        );
                        return fail(status, plan, "BackoffLimitExceeded", &why, generation, now);
                    }
                    plan.notices.push(Notice {
                        warning: true,
                        reason: "Retrying".into(),
                        message: format!("{} exited with code {other}; retrying", pod.name_any()),
                    });
                    for pod in &current {
                        plan.delete.push(Deletion {
                            pod: pod.name_any(),
                            force: false,
                        });
                    }
                    attempt += 1;
                    status.restarts = Some(status.restarts.unwrap_or(0) + 1);
                    status.attempt = Some(attempt);
                    status.phase = Some(TrainingPhase::Restarting);
                    plan.create_attempt = Some(attempt);
                    plan.status = status;
                    return plan;
                }
            }
        } else if let Some(node) = node_of(pod)
            && let Some(reason) = observed.failed_nodes.get(node)
        {
            broken = Some((
                *reason,
                node.to_string(),
                format!("node {node}: {reason:?}"),
            ));
        }
    }

    if let Some((reason, node, message)) = broken {
        let restarts = status.restarts.unwrap_or(0);
        if restarts >= job.spec.failover_policy.max_restarts {
            let why = format!("{message}; failoverPolicy.maxRestarts ({restarts}) reached");
            return fail(status, plan, "FailoverLimitReached", &why, generation, now);
        }
        let force = reason != FailoverReason::DeviceFault;
        for pod in &current {
            plan.delete.push(Deletion {
                pod: pod.name_any(),
                force,
            });
        }
        if !node.is_empty() && !status.excluded_nodes.contains(&node) {
            status.excluded_nodes.push(node.clone());
        }
        status.failovers.push(FailoverRecord {
            attempt,
            node: node.clone(),
            reason,
            detected_at: Time(now),
            recovered_at: None,
        });
        attempt += 1;
        status.attempt = Some(attempt);
        status.restarts = Some(restarts + 1);
        status.phase = Some(TrainingPhase::Restarting);
        status.nodes.clear();
        set(&mut status, "Running", false, "FailingOver", &message);
        plan.notices.push(Notice {
            warning: true,
            reason: "FailingOver".into(),
            message: format!(
                "attempt {} on {node}: {message}; starting attempt {attempt}",
                attempt - 1
            ),
        });
        plan.failover = Some(reason);
        plan.create_attempt = Some(attempt);
        plan.status = status;
        return plan;
    }

    if succeeded == workers && workers > 0 {
        status.phase = Some(TrainingPhase::Succeeded);
        status.completion_time = Some(Time(now));
        status.artifact = artifact.or(status.artifact);
        status.nodes.clear();
        set(
            &mut status,
            "Running",
            false,
            "Completed",
            "training finished",
        );
        set(
            &mut status,
            "Complete",
            true,
            "Completed",
            "training finished; the model is in status.artifact",
        );
        plan.notices.push(Notice {
            warning: false,
            reason: "Completed".into(),
            message: "training finished".into(),
        });
        plan.status = status;
        return plan;
    }

    status.attempt = Some(attempt);
    if current.len() < workers as usize {
        plan.create_attempt = Some(attempt);
    }
    let running = current.iter().filter(|p| phase_of(p) == "Running").count();
    if running == workers as usize {
        if status.phase != Some(TrainingPhase::Running) {
            plan.notices.push(Notice {
                warning: false,
                reason: "Running".into(),
                message: format!("attempt {attempt}: {workers} worker(s) running"),
            });
        }
        status.phase = Some(TrainingPhase::Running);
        status.start_time = status.start_time.or(Some(Time(now)));
        let mut nodes: Vec<String> = current
            .iter()
            .filter_map(|p| node_of(p).map(str::to_string))
            .collect();
        nodes.sort();
        status.nodes = nodes;
        if let Some(last) = status.failovers.last_mut()
            && last.recovered_at.is_none()
            && last.attempt < attempt
        {
            last.recovered_at = Some(Time(now));
        }
        let message = format!("attempt {attempt} running on {}", status.nodes.join(", "));
        set(&mut status, "Running", true, "WorkersRunning", &message);
    } else if status.phase != Some(TrainingPhase::Restarting) {
        status.phase = Some(TrainingPhase::Pending);
        set(
            &mut status,
            "Running",
            false,
            "WorkersPending",
            &format!("{running}/{workers} worker(s) of attempt {attempt} running"),
        );
    }
    plan.status = status;
    plan
}

fn fail(
    mut status: TrainingJobStatus,
    mut plan: Plan,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Plan {
    status.phase = Some(TrainingPhase::Failed);
    status.completion_time = Some(Time(now));
    status.nodes.clear();
    set_condition(
        &mut status.conditions,
        condition("Running", false, reason, message, generation, now),
    );
    set_condition(
        &mut status.conditions,
        condition("Failed", true, reason, message, generation, now),
    );
    plan.notices.push(Notice {
        warning: true,
        reason: reason.into(),
        message: message.into(),
    });
    plan.status = status;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job() -> TrainingJob {
        let mut job: TrainingJob =
            serde_yaml::from_str(include_str!("../../../manifests/examples/trainingjob.yaml"))
                .unwrap();
        job.metadata.namespace = Some("ml".into());
        job.metadata.generation = Some(1);
        job
    }

    fn pod(attempt: u32, node: Option<&str>, phase: &str, exit: Option<(i32, &str)>) -> Pod {
        let state = match exit {
            Some((code, msg)) => json!({"terminated": {"exitCode": code, "message": msg}}),
            None => json!({"running": {}}),
        };
        serde_json::from_value(json!({
            "metadata": {"name": format!("arith-a{attempt}-w0"), "labels": {ATTEMPT: attempt.to_string()}},
            "spec": {"nodeName": node, "containers": [{"name": CONTAINER}]},
            "status": {"phase": phase, "containerStatuses": [{"name": CONTAINER, "state": state, "ready": false, "restartCount": 0, "image": "", "imageID": ""}]},
        }))
        .unwrap()
    }

    fn plan(job: &TrainingJob, pods: &[Pod], failed: &[(&str, FailoverReason)]) -> Plan {
        let failed_nodes = failed.iter().map(|(n, r)| (n.to_string(), *r)).collect();
        decide(
            job,
            &Observed {
                pods,
                failed_nodes: &failed_nodes,
                now: Timestamp::from_second(1000).unwrap(),
            },
        )
    }

    fn with_status(mut job: TrainingJob, status: &TrainingJobStatus) -> TrainingJob {
        job.status = Some(status.clone());
        job
    }

    #[test]
    fn new_job_creates_attempt_one() {
        let p = plan(&job(), &[], &[]);
        assert_eq!(p.create_attempt, Some(1));
        assert_eq!(p.status.phase, Some(TrainingPhase::Pending));
        assert_eq!(p.status.observed_generation, Some(1));
    }

    #[test]
    fn running_worker_makes_the_job_running_on_its_node() {
        let p = plan(&job(), &[pod(1, Some("gpu-h100-0"), "Running", None)], &[]);
        assert_eq!(p.create_attempt, None);
        assert_eq!(p.status.phase, Some(TrainingPhase::Running));
        assert_eq!(p.status.nodes, ["gpu-h100-0"]);
        assert!(p.status.start_time.is_some());
    }

    #[test]
    fn failed_node_fails_over_to_the_next_attempt_excluding_it() {
        let running = plan(&job(), &[pod(1, Some("gpu-h100-0"), "Running", None)], &[]).status;
        let job = with_status(job(), &running);
        let p = plan(
            &job,
            &[pod(1, Some("gpu-h100-0"), "Running", None)],
            &[("gpu-h100-0", FailoverReason::NodeNotReady)],
        );
        assert_eq!(p.failover, Some(FailoverReason::NodeNotReady));
        assert_eq!(
            p.delete,
            [Deletion {
                pod: "arith-a1-w0".into(),
                force: true
            }]
        );
        assert_eq!(p.create_attempt, Some(2));
        assert_eq!(p.status.attempt, Some(2));
        assert_eq!(p.status.restarts, Some(1));
        assert_eq!(p.status.excluded_nodes, ["gpu-h100-0"]);
        assert_eq!(p.status.failovers[0].node, "gpu-h100-0");
        assert!(p.status.failovers[0].recovered_at.is_none());

        // The replacement runs elsewhere: recovered, and the old pod is still fenced off.
        let job = with_status(job, &p.status);
        let pods = [
            pod(1, Some("gpu-h100-0"), "Running", None),
            pod(2, Some("gpu-h100-1"), "Running", None),
        ];
        let p = plan(&job, &pods, &[("gpu-h100-0", FailoverReason::NodeNotReady)]);
        assert_eq!(p.status.phase, Some(TrainingPhase::Running));
        assert!(p.status.failovers[0].recovered_at.is_some());
        assert_eq!(
            p.delete,
            [Deletion {
                pod: "arith-a1-w0".into(),
                force: true
            }]
        );
    }

    #[test]
    fn device_fault_exit_fails_over_and_user_error_fails_without_retry() {
        let p = plan(
            &job(),
            &[pod(
                1,
                Some("gpu-h100-0"),
                "Failed",
                Some((contract::EXIT_DEVICE_FAULT, "CUDA error")),
            )],
            &[],
        );
        assert_eq!(p.failover, Some(FailoverReason::DeviceFault));
        assert_eq!(p.create_attempt, Some(2));
        let p = plan(
            &job(),
            &[pod(
                1,
                Some("gpu-h100-0"),
                "Failed",
                Some((contract::EXIT_USER_ERROR, "bad data")),
            )],
            &[],
        );
        assert_eq!(p.status.phase, Some(TrainingPhase::Failed));
        assert_eq!(p.create_attempt, None);
        assert!(
            p.status
                .conditions
                .iter()
                .any(|c| c.type_ == "Failed" && c.reason == "UserError")
        );
    }

    #[test]
    fn internal_errors_retry_up_to_the_backoff_limit() {
        // The example allows 2 retries.
        let mut status = TrainingJobStatus::default();
        for expected_attempt in [2, 3] {
            let job = with_status(job(), &status);
            let attempt = status.attempt.unwrap_or(1);
            let p = plan(
                &job,
                &[pod(attempt, Some("n"), "Failed", Some((1, "panic")))],
                &[],
            );
            assert_eq!(p.create_attempt, Some(expected_attempt));
            status = p.status;
        }
        let job = with_status(job(), &status);
        let p = plan(
            &job,
            &[pod(3, Some("n"), "Failed", Some((1, "panic")))],
            &[],
        );
        assert_eq!(p.status.phase, Some(TrainingPhase::Failed));
    }

    #[test]
    fn max_restarts_bounds_failovers() {
        let mut job = job();
        job.spec.failover_policy.max_restarts = 0;
        let p = plan(
            &job,
            &[pod(1, Some("a"), "Running", None)],
            &[("a", FailoverReason::GpuUnhealthy)],
        );
        assert_eq!(p.status.phase, Some(TrainingPhase::Failed));
        assert_eq!(p.create_attempt, None);
    }

    #[test]
    fn success_records_the_artifact() {
        let msg = r#"{"artifact": {"uri": "pvc://anneal-models/arith", "sha256": "ab12"}}"#;
        let p = plan(
            &job(),
            &[pod(1, Some("a"), "Succeeded", Some((0, msg)))],
            &[],
        );
        assert_eq!(p.status.phase, Some(TrainingPhase::Succeeded));
        assert_eq!(p.status.artifact.unwrap().sha256, "ab12");
    }

    #[test]
    fn suspend_stops_workers_and_finished_jobs_stay_finished() {
        let mut suspended = job();
        suspended.spec.run_policy.suspend = true;
        let p = plan(&suspended, &[pod(1, Some("a"), "Running", None)], &[]);
        assert_eq!(p.status.phase, Some(TrainingPhase::Suspended));
        assert_eq!(p.delete.len(), 1);
        assert_eq!(p.create_attempt, None);

        let done = TrainingJobStatus {
            phase: Some(TrainingPhase::Succeeded),
            ..TrainingJobStatus::default()
        };
        let p = plan(&with_status(job(), &done), &[], &[]);
        assert_eq!(p.create_attempt, None);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn resume_starts_a_new_attempt_and_fences_the_suspended_one() {
        let mut suspended = job();
        suspended.spec.run_policy.suspend = true;
        let stopped = plan(&suspended, &[pod(1, Some("a"), "Running", None)], &[]).status;
        let resumed = with_status(job(), &stopped);
        // The suspended worker still lives (say, on a partitioned node).
        let p = plan(&resumed, &[pod(1, Some("a"), "Running", None)], &[]);
        assert_eq!(p.status.attempt, Some(2));
        assert_eq!(p.create_attempt, Some(2));
        assert_eq!(p.delete.len(), 1, "the attempt-1 worker is fenced");
        assert_eq!(
            p.status.restarts, stopped.restarts,
            "a resume is no restart"
        );
        let suspended_condition = p
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Suspended")
            .unwrap();
        assert_eq!(suspended_condition.status, "False");
        assert_eq!(p.status.phase, Some(TrainingPhase::Pending));
    }

    #[test]
    fn steady_state_yields_the_same_status() {
        let first = plan(&job(), &[pod(1, Some("a"), "Running", None)], &[]).status;
        let job = with_status(job(), &first);
        let again = decide(
            &job,
            &Observed {
                pods: &[pod(1, Some("a"), "Running", None)],
                failed_nodes: &BTreeMap::new(),
                now: Timestamp::from_second(2000).unwrap(),
            },
        );
        assert_eq!(again.status, first, "no change, no write");
        assert!(again.notices.is_empty());
    }
}
