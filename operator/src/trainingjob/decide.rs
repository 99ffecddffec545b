//! The TrainingJob state machine: from the job and what its workers and their nodes look like now,
//! decide what to delete, what to create and what the status is. Pure: no client, no clock.

use std::collections::BTreeMap;

use anneal_crds::TrainingJob;
use anneal_crds::common::set_condition;
use anneal_crds::contract;
use anneal_crds::trainingjob::{
    FailoverReason, FailoverRecord, GangState, GangStatus, ModelArtifact, TrainingJobStatus,
    TrainingPhase, WorkerStatus,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use crate::labels::{ATTEMPT, WORKER};
use crate::pod;
use crate::reconcile::condition;
use crate::trainingjob::build::CONTAINER;

/// A pod to delete; `force` skips the grace period (its node is gone and will never confirm).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deletion {
    /// Pod name.
    pub pod: String,
    /// Delete with grace period 0.
    pub force: bool,
}

pub use crate::reconcile::Notice;

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
    /// Look again at this time even if nothing changes (a retry's backoff ends, a node's
    /// exclusion expires, a pod of a deleted namespace-mate is still being collected).
    pub requeue_at: Option<Timestamp>,
}

impl Plan {
    fn look_again_at(&mut self, at: Timestamp) {
        self.requeue_at = Some(self.requeue_at.map_or(at, |t| t.min(at)));
    }
}

/// What was observed about the job's world.
pub struct Observed<'a> {
    /// Every pod labelled with this job (including pods of an earlier job of the same name, which
    /// are told apart by their owner's UID).
    pub pods: &'a [Pod],
    /// Nodes that cannot run workers, and why.
    pub failed_nodes: &'a BTreeMap<String, FailoverReason>,
    /// How long a node that failed under the job is kept out of its new workers' placement.
    pub exclusion: SignedDuration,
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
    pod::phase_of(pod)
}

/// UID of the object that controls `pod`.
pub fn controller_uid(pod: &Pod) -> Option<&str> {
    pod.owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// How the worker container ended, once it did.
fn exit_of(pod: &Pod) -> Option<pod::Exit> {
    pod::exit_of(pod, CONTAINER)
}

/// Why a pod that failed without its worker ever ending failed.
fn failed_before_start(pod: &Pod) -> Option<String> {
    pod::failed_before_start(pod, CONTAINER)
}

/// Nodes a pod was told to avoid (its affinity's `metadata.name NotIn` list).
fn avoided_nodes(pod: &Pod) -> Vec<&str> {
    let terms = pod
        .spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| r.node_selector_terms.as_slice())
        .unwrap_or_default();
    terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .filter(|f| f.key == "metadata.name" && f.operator == "NotIn")
        .flat_map(|f| f.values.iter().flatten().map(String::as_str))
        .collect()
}

/// A retried worker waits 10 s, then twice as long after every further retry, at most 5 min
/// (the Kubernetes Job controller's pod-failure backoff).
pub fn retry_backoff(retries: u32) -> SignedDuration {
    SignedDuration::from_secs(10 * 2i64.pow(retries.min(5))).min(SignedDuration::from_secs(300))
}

fn is_terminal(phase: Option<TrainingPhase>) -> bool {
    matches!(
        phase,
        Some(TrainingPhase::Succeeded | TrainingPhase::Failed)
    )
}

/// Node failures that cannot be confirmed by the node itself: its pods are deleted with grace
/// period 0. Where the kubelet still answers (a GPU fault, a lost GPU), deletion is graceful.
fn node_unreachable(reason: FailoverReason) -> bool {
    matches!(
        reason,
        FailoverReason::NodeNotReady
            | FailoverReason::NodeLeaseExpired
            | FailoverReason::NodeDeleted
    )
}

/// The artifact a successful worker reports in its termination message (`{"artifact": {...}}`).
fn artifact_from(message: &str) -> Option<ModelArtifact> {
    let value: serde_json::Value = serde_json::from_str(message).ok()?;
    serde_json::from_value(value.get("artifact")?.clone()).ok()
}

/// Nodes excluded now: those a failover of this job happened on within `exclusion`; and when
/// the first of them expires.
fn active_exclusions(
    failovers: &[FailoverRecord],
    now: Timestamp,
    exclusion: SignedDuration,
) -> (Vec<String>, Option<Timestamp>) {
    let mut nodes = Vec::new();
    let mut next_expiry: Option<Timestamp> = None;
    for record in failovers.iter().filter(|r| !r.node.is_empty()) {
        let Ok(until) = record.detected_at.0.checked_add(exclusion) else {
            continue;
        };
        if until > now {
            if !nodes.contains(&record.node) {
                nodes.push(record.node.clone());
            }
            next_expiry = Some(next_expiry.map_or(until, |t| t.min(until)));
        }
    }
    (nodes, next_expiry)
}

/// Decides the next step of `job` given what was observed. A job that ends (Succeeded or
/// Failed) has every worker pod deleted: none keeps holding a GPU.
pub fn decide(job: &TrainingJob, observed: &Observed<'_>) -> Plan {
    let uid = job.metadata.uid.as_deref();
    // Only pods this very object controls are its workers: a job deleted and created again
    // under the same name must not adopt the old one's pods (their owner has another UID).
    let (owned, foreign): (Vec<Pod>, Vec<Pod>) = observed
        .pods
        .iter()
        .cloned()
        .partition(|p| uid.is_some() && controller_uid(p) == uid);
    let mut plan = decide_owned(job, &owned, observed);
    if job.spec.workers > 1 {
        gang_status(job, &owned, &mut plan, observed.now);
    }
    if is_terminal(plan.status.phase) {
        for pod in owned
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
        {
            if !plan.delete.iter().any(|d| d.pod == pod.name_any()) {
                plan.delete.push(Deletion {
                    pod: pod.name_any(),
                    force: false,
                });
            }
        }
    }
    // Pods of an earlier job of this name (orphaned, or not collected yet) hold the names of
    // their attempts: this job's attempts skip past them instead of waiting for a name.
    if let Some(attempt) = plan.create_attempt
        && let Some(taken) = foreign.iter().filter_map(attempt_of).max()
        && taken >= attempt
    {
        plan.create_attempt = Some(taken + 1);
        plan.status.attempt = Some(taken + 1);
    }
    plan
}

/// How long a gang may take to be placed (`failoverPolicy.gangPlacementTimeoutSeconds`).
pub fn gang_placement_timeout(job: &TrainingJob) -> SignedDuration {
    let secs = job
        .spec
        .failover_policy
        .gang_placement_timeout_seconds
        .unwrap_or(GANG_PLACEMENT_TIMEOUT_SECONDS);
    SignedDuration::from_secs(i64::from(secs))
}

/// The default of `failoverPolicy.gangPlacementTimeoutSeconds`: long enough for a scheduler to
/// place N pods and for a cluster autoscaler to add a node, short enough that GPUs held by a gang
/// that cannot run are given back within minutes.
pub const GANG_PLACEMENT_TIMEOUT_SECONDS: u32 = 120;

/// `status.gang` and the `GangPlaced` condition from the live workers of the plan's attempt.
fn gang_status(job: &TrainingJob, owned: &[Pod], plan: &mut Plan, now: Timestamp) {
    let status = &mut plan.status;
    if is_terminal(status.phase) || status.phase == Some(TrainingPhase::Suspended) {
        status.gang = None;
        return;
    }
    let attempt = status.attempt.unwrap_or(1);
    let mut workers: Vec<WorkerStatus> = owned
        .iter()
        .filter(|p| attempt_of(p) == Some(attempt) && p.metadata.deletion_timestamp.is_none())
        .filter(|p| !plan.delete.iter().any(|d| d.pod == p.name_any()))
        .map(|p| WorkerStatus {
            rank: p
                .labels()
                .get(WORKER)
                .and_then(|w| w.parse().ok())
                .unwrap_or_default(),
            pod: p.name_any(),
            node: node_of(p).map(str::to_string),
            phase: p.status.as_ref().and_then(|s| s.phase.clone()),
        })
        .collect();
    let released = status
        .gang
        .as_ref()
        .is_some_and(|g| g.state == GangState::Released);
    if workers.is_empty() && released && plan.create_attempt.is_none() {
        return;
    }
    workers.sort_by_key(|w| w.rank);
    let placed = workers.iter().filter(|w| w.node.is_some()).count() as u32;
    let state = if placed == job.spec.workers {
        GangState::Placed
    } else {
        GangState::Placing
    };
    if state == GangState::Placed {
        let nodes: Vec<&str> = workers.iter().filter_map(|w| w.node.as_deref()).collect();
        set_condition(
            &mut status.conditions,
            condition(
                "GangPlaced",
                true,
                "GangPlaced",
                &format!(
                    "the {placed} workers of attempt {attempt} are on distinct nodes: {}",
                    nodes.join(", ")
                ),
                job.metadata.generation,
                now,
            ),
        );
    }
    status.gang = Some(GangStatus {
        state,
        placed,
        workers,
    });
}

fn decide_owned(job: &TrainingJob, pods: &[Pod], observed: &Observed<'_>) -> Plan {
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
    // A node stays out of this job's placement only for a while after it failed under it.
    let (excluded, next_expiry) = active_exclusions(&status.failovers, now, observed.exclusion);
    status.excluded_nodes = excluded;
    if let Some(at) = next_expiry {
        plan.look_again_at(at);
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
    for pod in pods.iter().filter(|p| attempt_of(p) != Some(attempt)) {
        let force = node_of(pod)
            .and_then(|n| observed.failed_nodes.get(n))
            .is_some_and(|r| node_unreachable(*r));
        if pod.metadata.deletion_timestamp.is_none() || force {
            plan.delete.push(Deletion {
                pod: pod.name_any(),
                force,
            });
        }
    }
    let current: Vec<&Pod> = pods
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
    // A worker that ended with a retryable code: (pod, code, exit). A gang's peer-lost exit is
    // kept apart: it is the consequence of another worker's end, which decides when it is seen.
    let mut retryable: Option<(String, i32, pod::Exit)> = None;
    let mut peer_lost: Option<(String, i32, pod::Exit)> = None;
    let mut succeeded = 0;
    let mut artifact = None;
    for pod in &current {
        if let Some(exit) = exit_of(pod) {
            let message = &exit.message;
            match exit.code {
                contract::EXIT_OK => {
                    succeeded += 1;
                    artifact = artifact.or_else(|| artifact_from(message));
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
                contract::EXIT_PEER_LOST => {
                    peer_lost.get_or_insert((pod.name_any(), exit.code, exit));
                }
                other => {
                    retryable.get_or_insert((pod.name_any(), other, exit));
                }
            }
        } else if let Some(why) = failed_before_start(pod) {
            // The kubelet refused or evicted the pod before the worker ran: an infrastructure
            // failure of that node, handled like any other node failure.
            let node = node_of(pod).unwrap_or_default().to_string();
            broken = Some((
                FailoverReason::PodFailed,
                node,
                format!("pod {} failed before its worker ran: {why}", pod.name_any()),
            ));
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

    if broken.is_none()
        && let Some((pod_name, code, exit)) = retryable.or(peer_lost)
    {
        let message = &exit.message;
        let retries = status
            .restarts
            .unwrap_or(0)
            .saturating_sub(status.failovers.len() as u32);
        if retries >= job.spec.run_policy.backoff_limit {
            let why =
                format!("{pod_name} exited with code {code} after {retries} retries: {message}");
            return fail(status, plan, "BackoffLimitExceeded", &why, generation, now);
        }
        // A retry waits out its backoff, counted from the worker's end (in the pod, so that an
        // operator restart keeps the same deadline). A gang's other workers go on until then;
        // a cause found meanwhile (a node failed) takes over.
        let due = exit
            .finished_at
            .and_then(|t| t.checked_add(retry_backoff(retries)).ok())
            .unwrap_or(now);
        if now < due {
            let message = format!(
                "{pod_name} exited with code {code}; retry {} of {} at {due}",
                retries + 1,
                job.spec.run_policy.backoff_limit
            );
            let already = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Running" && c.reason == "BackingOff");
            if !already {
                plan.notices.push(Notice {
                    warning: true,
                    reason: "BackingOff".into(),
                    message: message.clone(),
                });
            }
            status.phase = Some(TrainingPhase::Restarting);
            status.nodes.clear();
            set(&mut status, "Running", false, "BackingOff", &message);
            plan.look_again_at(due);
            plan.status = status;
            return plan;
        }
        plan.notices.push(Notice {
            warning: true,
            reason: "Retrying".into(),
            message: format!(
                "{pod_name} exited with code {code}; starting attempt {}",
                attempt + 1
            ),
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

    if let Some((reason, node, message)) = broken {
        let restarts = status.restarts.unwrap_or(0);
        if restarts >= job.spec.failover_policy.max_restarts {
            let why = format!("{message}; failoverPolicy.maxRestarts ({restarts}) reached");
            return fail(status, plan, "FailoverLimitReached", &why, generation, now);
        }
        // A gang's workers on healthy nodes end gracefully; only a dead node's are forced.
        for pod in &current {
            let force = node_of(pod)
                .and_then(|n| observed.failed_nodes.get(n))
                .is_some_and(|r| node_unreachable(*r))
                || (node_unreachable(reason) && node_of(pod) == Some(node.as_str()));
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
        let reason_name = format!("{reason:?}");
        set(&mut status, "Running", false, &reason_name, &message);
        plan.notices.push(Notice {
            warning: true,
            reason: "FailingOver".into(),
            message: format!(
                "attempt {} on {}: {message}; starting attempt {attempt}",
                attempt - 1,
                if node.is_empty() { "no node" } else { &node }
            ),
        });
        plan.failover = Some(reason);
        plan.create_attempt = Some(attempt);
        plan.look_again_at(now.checked_add(observed.exclusion).unwrap_or(now));
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

    // A gang holds nodes only when it gets all it needs: one not fully placed in time releases
    // its workers, and the next attempt waits as long again before it asks anew.
    if workers > 1 {
        let timeout = gang_placement_timeout(job);
        let live: Vec<&&Pod> = current
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let placed = live.iter().filter(|p| node_of(p).is_some()).count();
        if live.len() == workers as usize && placed < workers as usize {
            let created = live
                .iter()
                .filter_map(|p| p.metadata.creation_timestamp.as_ref())
                .map(|t| t.0)
                .min()
                .unwrap_or(now);
            let deadline = created.checked_add(timeout).unwrap_or(now);
            if now < deadline {
                plan.look_again_at(deadline);
            } else {
                for pod in &current {
                    plan.delete.push(Deletion {
                        pod: pod.name_any(),
                        force: false,
                    });
                }
                let message = format!(
                    "{placed} of {workers} workers of attempt {attempt} were placed within {}s \
                     (each needs a node of its own{}); released them, attempt {} asks again in {}s",
                    timeout.as_secs(),
                    match job.spec.resources.gpus {
                        0 => String::new(),
                        n => format!(" with {n} free GPU(s) of the requested type"),
                    },
                    attempt + 1,
                    timeout.as_secs()
                );
                attempt += 1;
                status.attempt = Some(attempt);
                status.phase = Some(TrainingPhase::Pending);
                status.nodes.clear();
                status.gang = Some(GangStatus {
                    state: GangState::Released,
                    ..GangStatus::default()
                });
                set(
                    &mut status,
                    "GangPlaced",
                    false,
                    "GangUnplaceable",
                    &message,
                );
                set(&mut status, "Running", false, "GangUnplaceable", &message);
                plan.notices.push(Notice {
                    warning: true,
                    reason: "GangUnplaceable".into(),
                    message,
                });
                plan.look_again_at(now.checked_add(timeout).unwrap_or(now));
                plan.status = status;
                return plan;
            }
        }
        let released_at = status
            .gang
            .as_ref()
            .filter(|g| g.state == GangState::Released)
            .and_then(|_| status.conditions.iter().find(|c| c.type_ == "GangPlaced"))
            .map(|c| c.last_transition_time.0);
        if live.is_empty()
            && let Some(retry) = released_at.and_then(|t| t.checked_add(timeout).ok())
            && now < retry
        {
            status.attempt = Some(attempt);
            plan.look_again_at(retry);
            plan.status = status;
            return plan;
        }
    }

    // Workers still waiting for a node keep the placement they were made with; when a node they
    // avoid is no longer excluded, they are replaced by a new attempt that may use it (not a
    // restart: nothing failed).
    let unplaced = !current.is_empty()
        && current
            .iter()
            .all(|p| node_of(p).is_none() && p.metadata.deletion_timestamp.is_none());
    let released: Vec<String> = current
        .iter()
        .flat_map(|p| avoided_nodes(p))
        .filter(|n| !status.excluded_nodes.iter().any(|e| e == n))
        .map(str::to_string)
        .collect();
    if unplaced && !released.is_empty() {
        for pod in &current {
            plan.delete.push(Deletion {
                pod: pod.name_any(),
                force: false,
            });
        }
        attempt += 1;
        status.attempt = Some(attempt);
        status.phase = Some(TrainingPhase::Pending);
        plan.notices.push(Notice {
            warning: false,
            reason: "NodeExclusionExpired".into(),
            message: format!(
                "{} may run this job again; attempt {attempt} replaces the unplaced workers",
                released.join(", ")
            ),
        });
        plan.create_attempt = Some(attempt);
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
        job.metadata.uid = Some(UID.into());
        job
    }

    const UID: &str = "uid-of-this-job";
    const EXCLUSION: SignedDuration = SignedDuration::from_secs(600);

    fn pod(attempt: u32, node: Option<&str>, phase: &str, exit: Option<(i32, &str)>) -> Pod {
        let state = match exit {
            Some((code, msg)) => json!({"terminated": {"exitCode": code, "message": msg}}),
            None => json!({"running": {}}),
        };
        serde_json::from_value(json!({
            "metadata": {
                "name": format!("arith-a{attempt}-w0"),
                "labels": {ATTEMPT: attempt.to_string()},
                "ownerReferences": [{"apiVersion": "anneal.dev/v1alpha1", "kind": "TrainingJob", "name": "arith", "uid": UID, "controller": true}],
            },
            "spec": {"nodeName": node, "containers": [{"name": CONTAINER}]},
            "status": {"phase": phase, "containerStatuses": [{"name": CONTAINER, "state": state, "ready": false, "restartCount": 0, "image": "", "imageID": ""}]},
        }))
        .unwrap()
    }

    fn plan_at(
        job: &TrainingJob,
        pods: &[Pod],
        failed: &[(&str, FailoverReason)],
        now: i64,
    ) -> Plan {
        let failed_nodes = failed.iter().map(|(n, r)| (n.to_string(), *r)).collect();
        decide(
            job,
            &Observed {
                pods,
                failed_nodes: &failed_nodes,
                exclusion: EXCLUSION,
                now: Timestamp::from_second(now).unwrap(),
            },
        )
    }

    fn plan(job: &TrainingJob, pods: &[Pod], failed: &[(&str, FailoverReason)]) -> Plan {
        plan_at(job, pods, failed, 1000)
    }

    fn with_status(mut job: TrainingJob, status: &TrainingJobStatus) -> TrainingJob {
        job.status = Some(status.clone());
        job
    }

    fn gang_job(workers: u32) -> TrainingJob {
        let mut job = job();
        job.spec.workers = workers;
        job
    }

    /// Worker `rank` of `attempt`, created at second 1000.
    fn worker(
        attempt: u32,
        rank: u32,
        node: Option<&str>,
        phase: &str,
        exit: Option<(i32, &str)>,
    ) -> Pod {
        let mut p = pod(attempt, node, phase, exit);
        p.metadata.name = Some(format!("arith-a{attempt}-w{rank}"));
        p.metadata
            .labels
            .get_or_insert_default()
            .insert(WORKER.into(), rank.to_string());
        p.metadata.creation_timestamp = Some(Time(Timestamp::from_second(1000).unwrap()));
        p
    }

    #[test]
    fn a_gang_reports_each_workers_node_and_runs_when_all_run() {
        let job = gang_job(2);
        let p = plan(&job, &[], &[]);
        assert_eq!(p.create_attempt, Some(1));
        assert_eq!(p.status.gang.as_ref().unwrap().state, GangState::Placing);

        let pods = [
            worker(1, 0, Some("n-a"), "Running", None),
            worker(1, 1, None, "Pending", None),
        ];
        let p = plan(&with_status(job.clone(), &p.status), &pods, &[]);
        let gang = p.status.gang.clone().unwrap();
        assert_eq!((gang.state, gang.placed), (GangState::Placing, 1));
        assert_eq!(gang.workers[1].pod, "arith-a1-w1");
        assert_eq!(gang.workers[1].node, None);
        assert_eq!(p.status.phase, Some(TrainingPhase::Pending));
        // The placement deadline is when the operator looks again.
        assert_eq!(
            p.requeue_at,
            Some(Timestamp::from_second(1000 + i64::from(GANG_PLACEMENT_TIMEOUT_SECONDS)).unwrap())
        );

        let pods = [
            worker(1, 0, Some("n-a"), "Running", None),
            worker(1, 1, Some("n-b"), "Running", None),
        ];
        let p = plan(&with_status(job, &p.status), &pods, &[]);
        let gang = p.status.gang.unwrap();
        assert_eq!((gang.state, gang.placed), (GangState::Placed, 2));
        assert_eq!(
            gang.workers
                .iter()
                .map(|w| w.node.as_deref())
                .collect::<Vec<_>>(),
            [Some("n-a"), Some("n-b")]
        );
        assert_eq!(p.status.phase, Some(TrainingPhase::Running));
        assert_eq!(p.status.nodes, ["n-a", "n-b"]);
        let placed = p
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "GangPlaced")
            .unwrap();
        assert_eq!(placed.status, "True");
    }

    #[test]
    fn a_gang_not_placed_in_time_is_released_and_asks_again_later() {
        let job = gang_job(3);
        let pods = [
            worker(1, 0, Some("n-a"), "Running", None),
            worker(1, 1, Some("n-b"), "Running", None),
            worker(1, 2, None, "Pending", None),
        ];
        let timeout = i64::from(GANG_PLACEMENT_TIMEOUT_SECONDS);
        let before = plan_at(&job, &pods, &[], 1000 + timeout - 1);
        assert!(before.delete.is_empty());

        let p = plan_at(&job, &pods, &[], 1000 + timeout);
        assert_eq!(p.delete.len(), 3, "every worker of the attempt is released");
        assert!(p.delete.iter().all(|d| !d.force));
        assert_eq!(p.create_attempt, None, "not at once");
        assert_eq!(p.status.attempt, Some(2));
        assert_eq!(p.status.restarts, None, "a release is no failure");
        assert_eq!(p.status.gang.as_ref().unwrap().state, GangState::Released);
        let c = p
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "GangPlaced")
            .unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "GangUnplaceable")
        );
        assert!(
            c.message.contains("2 of 3 workers of attempt 1"),
            "{}",
            c.message
        );
        assert_eq!(p.notices[0].reason, "GangUnplaceable");

        // While the old pods go, and until the timeout passed again, nothing is created.
        let job = with_status(job, &p.status);
        let later = plan_at(&job, &pods, &[], 1000 + timeout + 5);
        assert_eq!(later.create_attempt, None);
        assert_eq!(
            later.status.gang.as_ref().unwrap().state,
            GangState::Released
        );
        let retry = plan_at(&job, &[], &[], 1000 + 2 * timeout);
        assert_eq!(retry.create_attempt, Some(2));
        assert_eq!(retry.status.gang.unwrap().state, GangState::Placing);
    }

    #[test]
    fn a_lost_worker_ends_the_whole_attempt_and_only_its_dead_node_is_forced() {
        let job = gang_job(2);
        let pods = [
            worker(1, 0, Some("n-a"), "Running", None),
            worker(1, 1, Some("n-b"), "Running", None),
        ];
        let running = plan(&job, &pods, &[]).status;
        let job = with_status(job, &running);
        let p = plan(&job, &pods, &[("n-b", FailoverReason::NodeLeaseExpired)]);
        assert_eq!(p.failover, Some(FailoverReason::NodeLeaseExpired));
        assert_eq!(
            p.delete,
            [
                Deletion {
                    pod: "arith-a1-w0".into(),
                    force: false
                },
                Deletion {
                    pod: "arith-a1-w1".into(),
                    force: true
                },
            ]
        );
        assert_eq!(p.create_attempt, Some(2));
        assert_eq!(p.status.excluded_nodes, ["n-b"]);
        assert_eq!(p.status.gang.unwrap().state, GangState::Placing);
    }

    #[test]
    fn a_peer_lost_exit_yields_to_the_cause_when_one_is_seen() {
        let job = gang_job(2);
        let pods = [
            worker(
                1,
                0,
                Some("n-a"),
                "Failed",
                Some((contract::EXIT_PEER_LOST, "peer lost")),
            ),
            worker(1, 1, Some("n-b"), "Running", None),
        ];
        let running = {
            let ok = [
                worker(1, 0, Some("n-a"), "Running", None),
                worker(1, 1, Some("n-b"), "Running", None),
            ];
            plan(&job, &ok, &[]).status
        };
        let job = with_status(job, &running);
        // The peer's node is known dead: a fail-over excluding it, not a retry.
        let p = plan(&job, &pods, &[("n-b", FailoverReason::NodeNotReady)]);
        assert_eq!(p.failover, Some(FailoverReason::NodeNotReady));
        assert_eq!(p.status.excluded_nodes, ["n-b"]);
        // A device fault of the peer: the same, on the peer's node, never the healthy one's.
        let faulted = [
            worker(
                1,
                0,
                Some("n-a"),
                "Failed",
                Some((contract::EXIT_PEER_LOST, "peer lost")),
            ),
            worker(
                1,
                1,
                Some("n-b"),
                "Failed",
                Some((contract::EXIT_DEVICE_FAULT, "CUDA")),
            ),
        ];
        let p = plan(&job, &faulted, &[]);
        assert_eq!(p.failover, Some(FailoverReason::DeviceFault));
        assert_eq!(p.status.excluded_nodes, ["n-b"]);
        // No cause seen: retried like an internal error (after its backoff), nothing excluded.
        let p = plan(&job, &pods, &[]);
        assert_eq!(p.failover, None);
        assert!(p.status.excluded_nodes.is_empty());
        assert_eq!(p.create_attempt, Some(2));
        assert_eq!(p.status.restarts, Some(1));
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
                exclusion: EXCLUSION,
                now: Timestamp::from_second(2000).unwrap(),
            },
        );
        assert_eq!(again.status, first, "no change, no write");
        assert!(again.notices.is_empty());
    }

    /// A pod as the kubelet leaves one it refused at admission: phase Failed, a reason and a
    /// message, and no container that ever ran.
    fn rejected_pod(attempt: u32, node: &str) -> Pod {
        let mut p = pod(attempt, Some(node), "Failed", None);
        let status = p.status.as_mut().unwrap();
        status.container_statuses = None;
        status.reason = Some("UnexpectedAdmissionError".into());
        status.message = Some(
            "Allocate failed due to requested number of devices unavailable for nvidia.com/gpu"
                .into(),
        );
        p
    }

    #[test]
    fn a_pod_rejected_at_admission_is_an_infrastructure_failure_not_a_hang() {
        let p = plan(&job(), &[rejected_pod(1, "gpu-h100-0")], &[]);
        assert_eq!(p.failover, Some(FailoverReason::PodFailed));
        assert_eq!(p.create_attempt, Some(2));
        assert_eq!(p.status.restarts, Some(1), "counted against maxRestarts");
        assert_eq!(p.status.excluded_nodes, ["gpu-h100-0"]);
        let running = p
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Running")
            .unwrap();
        assert_eq!(running.reason, "PodFailed");
        assert!(running.message.contains("UnexpectedAdmissionError"));
        assert!(p.notices[0].message.contains("requested number of devices"));
        assert_eq!(
            p.delete,
            [Deletion {
                pod: "arith-a1-w0".into(),
                force: false
            }],
            "the kubelet answers: no force"
        );
    }

    #[test]
    fn pods_of_a_deleted_job_with_the_same_name_are_not_adopted() {
        // The old job succeeded; a new one of the same name meets its pod before the garbage
        // collector removed it.
        let mut old = pod(
            1,
            Some("a"),
            "Succeeded",
            Some((
                0,
                r#"{"artifact": {"uri": "pvc://m/old", "sha256": "01d"}}"#,
            )),
        );
        old.metadata.owner_references.as_mut().unwrap()[0].uid = "uid-of-the-old-job".into();
        let p = plan(&job(), &[old], &[]);
        assert_eq!(p.status.phase, Some(TrainingPhase::Pending));
        assert_eq!(
            p.status.artifact, None,
            "the old job's artifact is not reported"
        );
        assert_eq!(p.create_attempt, Some(2), "attempt 1's name is taken");
        assert_eq!(p.status.attempt, Some(2));
        assert!(
            p.delete.is_empty(),
            "the old pod is not this job's to delete"
        );
    }

    #[test]
    fn a_failed_job_deletes_every_worker_still_holding_a_gpu() {
        let mut job = job();
        job.spec.failover_policy.max_restarts = 0;
        let pods = [pod(1, Some("a"), "Running", None)];
        let p = plan(&job, &pods, &[("a", FailoverReason::GpuUnhealthy)]);
        assert_eq!(p.status.phase, Some(TrainingPhase::Failed));
        assert_eq!(
            p.delete,
            [Deletion {
                pod: "arith-a1-w0".into(),
                force: false
            }]
        );
        // And a job that is already Failed cleans up whatever is left (a crash in between).
        let failed = with_status(job.clone(), &p.status);
        assert_eq!(plan(&failed, &pods, &[]).delete.len(), 1);
        let success = plan(
            &job,
            &[pod(1, Some("a"), "Succeeded", Some((0, "{}")))],
            &[],
        );
        assert_eq!(success.status.phase, Some(TrainingPhase::Succeeded));
        assert_eq!(success.delete.len(), 1);
    }

    #[test]
    fn gpu_faults_delete_gracefully_and_dead_nodes_forcibly() {
        let pods = [pod(1, Some("a"), "Running", None)];
        for (reason, force) in [
            (FailoverReason::GpuUnhealthy, false),
            (FailoverReason::GpuCapacityLost, false),
            (FailoverReason::NodeNotReady, true),
            (FailoverReason::NodeLeaseExpired, true),
            (FailoverReason::NodeDeleted, true),
        ] {
            let p = plan(&job(), &pods, &[("a", reason)]);
            assert_eq!(p.delete[0].force, force, "{reason:?}");
        }
    }

    #[test]
    fn a_node_exclusion_expires_and_unplaced_workers_may_use_the_node_again() {
        let running = plan(&job(), &[pod(1, Some("a"), "Running", None)], &[]).status;
        let failed_over = plan(
            &with_status(job(), &running),
            &[pod(1, Some("a"), "Running", None)],
            &[("a", FailoverReason::NodeNotReady)],
        );
        assert_eq!(failed_over.status.excluded_nodes, ["a"]);
        assert_eq!(
            failed_over.requeue_at,
            Some(Timestamp::from_second(1600).unwrap()),
            "looks again when the exclusion ends"
        );
        let job = with_status(job(), &failed_over.status);
        // Attempt 2 waits for a node: "a" was its only choice.
        let mut waiting = pod(2, None, "Pending", None);
        waiting.spec.as_mut().unwrap().affinity = Some(
            serde_json::from_value(json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["a"]}]}]}}}))
                .unwrap(),
        );
        waiting.status.as_mut().unwrap().container_statuses = None;
        let before = plan_at(&job, std::slice::from_ref(&waiting), &[], 1599);
        assert_eq!(before.status.excluded_nodes, ["a"]);
        assert_eq!(before.create_attempt, None);
        let after = plan_at(&job, &[waiting], &[], 1600);
        assert!(after.status.excluded_nodes.is_empty());
        assert_eq!(after.create_attempt, Some(3));
        assert_eq!(after.status.restarts, Some(1), "not a restart");
        assert_eq!(after.status.failovers.len(), 1, "history kept");
        assert_eq!(after.delete[0].pod, "arith-a2-w0");
    }

    #[test]
    fn an_internal_error_is_retried_after_its_backoff() {
        let mut failed = pod(1, Some("n"), "Failed", Some((1, "panic")));
        let state = &mut failed
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0];
        state
            .state
            .as_mut()
            .unwrap()
            .terminated
            .as_mut()
            .unwrap()
            .finished_at = Some(Time(Timestamp::from_second(1000).unwrap()));
        let waiting = plan_at(&job(), std::slice::from_ref(&failed), &[], 1005);
        assert_eq!(waiting.create_attempt, None);
        assert!(waiting.delete.is_empty());
        assert_eq!(waiting.status.phase, Some(TrainingPhase::Restarting));
        assert_eq!(
            waiting.requeue_at,
            Some(Timestamp::from_second(1010).unwrap())
        );
        assert_eq!(waiting.notices[0].reason, "BackingOff");
        // The same observation again says nothing new.
        let again = plan_at(
            &with_status(job(), &waiting.status),
            std::slice::from_ref(&failed),
            &[],
            1006,
        );
        assert!(again.notices.is_empty());
        assert_eq!(again.status, waiting.status, "no change, no write");
        let due = plan_at(&with_status(job(), &waiting.status), &[failed], &[], 1010);
        assert_eq!(due.create_attempt, Some(2));
        assert_eq!(retry_backoff(1), SignedDuration::from_secs(20));
        assert_eq!(retry_backoff(9), SignedDuration::from_secs(300));
    }
}
