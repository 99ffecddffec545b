//! The ModelServer roll-out state machine: from the server, the model it should serve and its
//! Deployment as it is, decide the status and the model the Deployment runs. Pure: no client,
//! no clock. A model whose pods are not all Ready within `rollbackDeadlineSeconds` is rolled back
//! in one step to the last model every replica served, and not tried again until the model to
//! serve changes.

use anneal_crds::ModelServer;
use anneal_crds::common::set_condition;
use anneal_crds::evalgate::ResolvedModel;
use anneal_crds::modelserver::{ModelServerStatus, RolloutOutcome, RolloutRecord, ServerPhase};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::labels::{MODEL_SHA256, MODEL_URI};
use crate::reconcile::condition;

/// Roll-outs kept in `status.history`.
pub const HISTORY: usize = 10;

/// What the server should serve, as its source says now.
#[derive(Clone, Debug, PartialEq)]
pub enum Desired {
    /// Nothing yet (the gate has promoted nothing, or does not exist); why.
    Waiting {
        /// CamelCase reason.
        reason: String,
        /// For people.
        message: String,
    },
    /// This model.
    Model(ResolvedModel),
}

pub use crate::reconcile::Notice;

/// What the reconciler must do.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The status to write (when it differs from the stored one).
    pub status: ModelServerStatus,
    /// The model the Deployment must run; `None`: make no children yet.
    pub deploy: Option<ResolvedModel>,
    /// Events.
    pub notices: Vec<Notice>,
    /// A roll-back was decided now.
    pub rolled_back: bool,
    /// A roll-out completed now, after this many seconds.
    pub rollout_seconds: Option<f64>,
    /// Look again at this time even if nothing changes (the roll-out deadline).
    pub requeue_at: Option<Timestamp>,
}

/// How far the Deployment is with `model`: (every replica runs it and is Ready, replicas Ready
/// with it).
pub fn rollout_state(
    dep: Option<&Deployment>,
    model: &ResolvedModel,
    replicas: u32,
) -> (bool, u32) {
    let Some(dep) = dep else {
        return (false, 0);
    };
    let annotations = dep
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref());
    let runs_model = annotations.is_some_and(|a| {
        a.get(MODEL_URI) == Some(&model.uri) && a.get(MODEL_SHA256) == model.sha256.as_ref()
    });
    let Some(status) = dep.status.as_ref() else {
        return (false, 0);
    };
    let observed = status.observed_generation.unwrap_or(0) >= dep.metadata.generation.unwrap_or(0);
    let count = |v: Option<i32>| u32::try_from(v.unwrap_or(0)).unwrap_or(0);
    let (total, updated, ready) = (
        count(status.replicas),
        count(status.updated_replicas),
        count(status.ready_replicas),
    );
    if !runs_model || !observed {
        return (false, 0);
    }
    let ready_with_model = ready.min(updated);
    let complete = total == replicas && updated == replicas && ready == replicas;
    (complete, ready_with_model)
}

fn describe(model: &ResolvedModel) -> String {
    match &model.sha256 {
        Some(sha) => format!("{} (sha256 {})", model.source, sha.get(..12).unwrap_or(sha)),
        None => model.source.clone(),
    }
}

/// Decides what to do.
pub fn decide(
    server: &ModelServer,
    desired: &Desired,
    deployment: Option<&Deployment>,
    endpoint: &str,
    now: Timestamp,
) -> Plan {
    let generation = server.metadata.generation;
    let replicas = server.spec.replicas;
    let deadline = SignedDuration::from_secs(i64::from(server.spec.rollback_deadline_seconds));
    let mut st = server.status.clone().unwrap_or_default();
    st.observed_generation = generation;
    st.replicas = Some(replicas);
    let mut plan = Plan::default();
    let mut note = |warning: bool, reason: &str, message: String| {
        plan.notices.push(Notice {
            warning,
            reason: reason.into(),
            message,
        })
    };

    let mut target = match desired {
        Desired::Model(m) => m.clone(),
        Desired::Waiting { reason, message } => match st.current_model.clone() {
            // The source has nothing now (a gate deleted, say): keep serving what runs.
            Some(current) => current,
            None => {
                st.phase = Some(ServerPhase::Pending);
                st.ready_replicas = Some(0);
                for (type_, status) in [("Ready", false), ("Progressing", false)] {
                    set_condition(
                        &mut st.conditions,
                        condition(type_, status, reason, message, generation, now),
                    );
                }
                plan.status = st;
                return plan;
            }
        },
    };
    if let Some(bad) = st.rolled_back_from.clone() {
        if bad.same_model(&target) {
            // Not tried again until the model to serve changes.
            target = st.current_model.clone().unwrap_or(target);
        } else {
            st.rolled_back_from = None;
        }
    }
    let restoring = st.rolled_back_from.is_some();
    if !st
        .current_model
        .as_ref()
        .is_some_and(|c| c.same_model(&target))
    {
        // A new roll-out. The roll-back target is the last model every replica served: the
        // current one if its roll-out completed, else the one before it.
        if st.rollout_started_at.is_none()
            && let Some(current) = st.current_model.take()
        {
            st.previous_model = Some(current);
        }
        note(
            false,
            "RollingOut",
            format!(
                "rolling out {}{}",
                describe(&target),
                st.previous_model
                    .as_ref()
                    .map(|p| format!(" (replacing {})", describe(p)))
                    .unwrap_or_default()
            ),
        );
        st.current_model = Some(target.clone());
        st.rollout_started_at = Some(Time(now));
    }
    let (complete, ready) = rollout_state(deployment, &target, replicas);
    st.ready_replicas = Some(ready);
    st.endpoint = Some(endpoint.to_string());

    match st.rollout_started_at.as_ref().map(|t| t.0) {
        Some(started) if complete => {
            st.rollout_started_at = None;
            let seconds = started.duration_until(now).as_secs_f64().max(0.0);
            plan.rollout_seconds = Some(seconds);
            if !restoring {
                push_history(&mut st, &target, RolloutOutcome::Served, started, now);
            }
            note(
                false,
                "RolledOut",
                format!(
                    "{} serves on {replicas} replica(s), {seconds:.0} s after the roll-out started",
                    describe(&target)
                ),
            );
        }
        Some(started) if started.checked_add(deadline).is_ok_and(|d| now >= d) => {
            st.rollout_started_at = None;
            let previous = st.previous_model.clone().filter(|_| !restoring);
            match previous {
                Some(previous) => {
                    // One step back, in this reconcile: the Deployment runs the previous model.
                    st.rolled_back_from = Some(target.clone());
                    st.current_model = Some(previous.clone());
                    st.previous_model = None;
                    st.rollout_started_at = Some(Time(now));
                    push_history(&mut st, &target, RolloutOutcome::RolledBack, started, now);
                    plan.rolled_back = true;
                    note(
                        true,
                        "RolledBack",
                        format!(
                            "{} was not Ready on all {replicas} replica(s) within {} s ({ready} ready); rolled back to {}",
                            describe(&target),
                            server.spec.rollback_deadline_seconds,
                            describe(&previous)
                        ),
                    );
                    plan.requeue_at = now.checked_add(deadline).ok();
                }
                None => {
                    push_history(
                        &mut st,
                        &target,
                        RolloutOutcome::DeadlineExceeded,
                        started,
                        now,
                    );
                    note(
                        true,
                        "ProgressDeadlineExceeded",
                        format!(
                            "{} was not Ready on all {replicas} replica(s) within {} s ({ready} ready), and there is no earlier model to roll back to",
                            describe(&target),
                            server.spec.rollback_deadline_seconds
                        ),
                    );
                }
            }
        }
        Some(started) => {
            plan.requeue_at = started.checked_add(deadline).ok();
        }
        None => {}
    }

    let restoring = st.rolled_back_from.is_some();
    let current = st.current_model.clone().unwrap_or_default();
    let rolling = st.rollout_started_at.is_some();
    let all_ready = !rolling && complete;
    st.phase = Some(if rolling {
        if restoring {
            ServerPhase::RolledBack
        } else {
            ServerPhase::RollingOut
        }
    } else if !all_ready {
        ServerPhase::Degraded
    } else if restoring {
        ServerPhase::RolledBack
    } else {
        ServerPhase::Ready
    });
    let ready_message = if all_ready {
        format!("{} serves on {replicas} replica(s)", describe(&current))
    } else {
        format!(
            "{ready} of {replicas} replica(s) Ready with {}",
            describe(&current)
        )
    };
    set_condition(
        &mut st.conditions,
        condition(
            "Ready",
            all_ready,
            if all_ready { "Serving" } else { "NotReady" },
            &ready_message,
            generation,
            now,
        ),
    );
    let (progressing, reason, message) = if rolling {
        (
            true,
            if restoring {
                "RollingBack"
            } else {
                "RollingOut"
            },
            format!("rolling out {}", describe(&current)),
        )
    } else if all_ready {
        (
            false,
            "RolloutComplete",
            format!("{} is rolled out", describe(&current)),
        )
    } else {
        (
            false,
            "ProgressDeadlineExceeded",
            format!(
                "{} is not Ready on every replica after {} s",
                describe(&current),
                server.spec.rollback_deadline_seconds
            ),
        )
    };
    set_condition(
        &mut st.conditions,
        condition(
            "Progressing",
            progressing,
            reason,
            &message,
            generation,
            now,
        ),
    );
    let rolled_back = match &st.rolled_back_from {
        Some(bad) => condition(
            "RolledBack",
            true,
            "RolloutDeadlineExceeded",
            &format!(
                "{} missed its roll-out deadline; {} serves instead, and the failed model is not tried again until the model to serve changes",
                describe(bad),
                describe(&current)
            ),
            generation,
            now,
        ),
        None => condition(
            "RolledBack",
            false,
            "NoRollback",
            "the model to serve is the one rolled out",
            generation,
            now,
        ),
    };
    set_condition(&mut st.conditions, rolled_back);
    plan.deploy = Some(current);
    plan.status = st;
    plan
}

fn push_history(
    st: &mut ModelServerStatus,
    model: &ResolvedModel,
    outcome: RolloutOutcome,
    started: Timestamp,
    now: Timestamp,
) {
    st.history.push(RolloutRecord {
        model: model.clone(),
        outcome,
        started_at: Time(started),
        finished_at: Time(now),
    });
    let excess = st.history.len().saturating_sub(HISTORY);
    st.history.drain(..excess);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OperatorConfig;
    use crate::modelserver::build::deployment;
    use serde_json::json;

    fn server() -> ModelServer {
        let text = include_str!("../../../manifests/examples/modelserver.yaml");
        let mut server: ModelServer = serde_yaml::from_str(text).unwrap();
        server.metadata.namespace = Some("ml".into());
        server.metadata.uid = Some("server-uid".into());
        server.metadata.generation = Some(1);
        server.spec.rollback_deadline_seconds = 60;
        server
    }

    fn model(n: u8) -> ResolvedModel {
        ResolvedModel {
            source: "trainingjob/arith".into(),
            uri: format!("pvc://anneal-models/v{n}"),
            sha256: Some(format!("{n}").repeat(64)),
            gate: Some("arith".into()),
            reference: None,
        }
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    /// The Deployment running `m` with `ready` of its replicas Ready.
    fn running(server: &ModelServer, m: &ResolvedModel, ready: i32) -> Deployment {
        let mut d = deployment(server, m, &OperatorConfig::default()).unwrap();
        d.metadata.generation = Some(1);
        let r = server.spec.replicas as i32;
        d.status = Some(serde_json::from_value(json!({"observedGeneration": 1, "replicas": r, "updatedReplicas": r, "readyReplicas": ready})).unwrap());
        d
    }

    fn step(
        server: &mut ModelServer,
        desired: &Desired,
        dep: Option<&Deployment>,
        now: Timestamp,
    ) -> Plan {
        let plan = decide(server, desired, dep, "http://x", now);
        server.status = Some(plan.status.clone());
        plan
    }

    fn cond<'a>(plan: &'a Plan, type_: &str) -> &'a anneal_crds::Condition {
        plan.status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap()
    }

    #[test]
    fn nothing_is_deployed_before_the_gate_promotes_a_model() {
        let mut s = server();
        let waiting = Desired::Waiting {
            reason: "NoPromotedModel".into(),
            message: "EvalGate arith has promoted no model yet".into(),
        };
        let plan = step(&mut s, &waiting, None, t(0));
        assert_eq!(plan.deploy, None);
        assert_eq!(plan.status.phase, Some(ServerPhase::Pending));
    }

    #[test]
    fn a_model_rolls_out_then_a_bad_one_is_rolled_back_in_one_step_and_not_retried() {
        let mut s = server();
        let (v1, v2) = (model(1), model(2));
        let plan = step(&mut s, &Desired::Model(v1.clone()), None, t(0));
        assert_eq!(plan.deploy, Some(v1.clone()));
        assert_eq!(plan.status.phase, Some(ServerPhase::RollingOut));
        assert_eq!(plan.requeue_at, Some(t(60)));
        let plan = step(
            &mut s,
            &Desired::Model(v1.clone()),
            Some(&running(&server(), &v1, 2)),
            t(20),
        );
        assert_eq!(plan.status.phase, Some(ServerPhase::Ready));
        assert_eq!(plan.rollout_seconds, Some(20.0));
        assert_eq!(cond(&plan, "Ready").status, "True");
        // Steady: the same status, so no write.
        let again = decide(
            &s,
            &Desired::Model(v1.clone()),
            Some(&running(&server(), &v1, 2)),
            "http://x",
            t(30),
        );
        assert_eq!(Some(again.status), s.status.clone());
        // The gate promotes v2, whose pods never become Ready.
        let plan = step(
            &mut s,
            &Desired::Model(v2.clone()),
            Some(&running(&server(), &v1, 2)),
            t(100),
        );
        assert_eq!(plan.deploy, Some(v2.clone()));
        assert_eq!(plan.status.previous_model, Some(v1.clone()));
        let stuck = running(&server(), &v2, 0);
        let plan = step(&mut s, &Desired::Model(v2.clone()), Some(&stuck), t(159));
        assert_eq!(plan.status.phase, Some(ServerPhase::RollingOut));
        let plan = step(&mut s, &Desired::Model(v2.clone()), Some(&stuck), t(160));
        assert!(plan.rolled_back);
        assert_eq!(
            plan.deploy,
            Some(v1.clone()),
            "one step back to the last Ready model"
        );
        assert_eq!(plan.status.phase, Some(ServerPhase::RolledBack));
        assert_eq!(cond(&plan, "RolledBack").status, "True");
        assert_eq!(plan.status.rolled_back_from, Some(v2.clone()));
        // v1 Ready again; v2 is still what the gate promoted, and is not tried again.
        let plan = step(
            &mut s,
            &Desired::Model(v2.clone()),
            Some(&running(&server(), &v1, 2)),
            t(170),
        );
        assert_eq!(plan.deploy, Some(v1.clone()));
        assert_eq!(plan.status.phase, Some(ServerPhase::RolledBack));
        assert!(!plan.rolled_back);
        let outcomes: Vec<_> = plan.status.history.iter().map(|h| h.outcome).collect();
        assert_eq!(
            outcomes,
            [RolloutOutcome::Served, RolloutOutcome::RolledBack]
        );
        // A new model (v3) clears the roll-back and rolls out.
        let v3 = model(3);
        let plan = step(
            &mut s,
            &Desired::Model(v3.clone()),
            Some(&running(&server(), &v1, 2)),
            t(200),
        );
        assert_eq!(plan.deploy, Some(v3));
        assert_eq!(plan.status.rolled_back_from, None);
        assert_eq!(plan.status.previous_model, Some(v1));
        assert_eq!(cond(&plan, "RolledBack").status, "False");
    }

    #[test]
    fn a_first_model_that_misses_its_deadline_has_nothing_to_roll_back_to() {
        let mut s = server();
        let v1 = model(1);
        step(&mut s, &Desired::Model(v1.clone()), None, t(0));
        let plan = step(
            &mut s,
            &Desired::Model(v1.clone()),
            Some(&running(&server(), &v1, 0)),
            t(61),
        );
        assert!(!plan.rolled_back);
        assert_eq!(plan.deploy, Some(v1.clone()));
        assert_eq!(plan.status.phase, Some(ServerPhase::Degraded));
        assert_eq!(
            cond(&plan, "Progressing").reason,
            "ProgressDeadlineExceeded"
        );
        // When its pods come up after all, it serves.
        let plan = step(
            &mut s,
            &Desired::Model(v1.clone()),
            Some(&running(&server(), &v1, 2)),
            t(90),
        );
        assert_eq!(plan.status.phase, Some(ServerPhase::Ready));
    }
}
