//! The EvalGate controller: resolve the candidate (a TrainingJob's artifact, or a URI) and the
//! baseline, [`decide`], run the evaluation pod [`build`] makes, write the verdict once.
//!
//! The gate does not know who serves its model: ModelServers follow it
//! (`spec.model.fromEvalGate`) and read `status.promoted`.

pub mod build;
pub mod decide;

use std::sync::Arc;
use std::time::Duration;

use anneal_crds::evalgate::{GatePhase, ResolvedModel};
use anneal_crds::trainingjob::TrainingPhase;
use anneal_crds::{EvalGate, ModelServer, TrainingJob};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};

use crate::FIELD_MANAGER;
use crate::config::OperatorConfig;
use crate::labels::EVALGATE;
use crate::leader::WriteGate;
use crate::metrics::{Metrics, VerdictLabels};
use crate::reconcile::{
    Backoff, Error, Writer, apply_child, apply_status, ensure_created, is_newest,
    owned_by_operator, retry_after, scoped,
};
use decide::{Baseline, Candidate, decide};

/// What every reconcile shares.
pub struct Context {
    /// Client with the operator's identity.
    pub client: Client,
    /// Operator settings.
    pub config: OperatorConfig,
    /// Fenced, counted writes and Events.
    pub writer: Writer,
    /// Consecutive failures per gate, for exponential backoff.
    pub failures: Backoff<DeserializeGuard<EvalGate>>,
}

/// Runs the EvalGate controller until a shutdown signal; with `namespace`, only for that
/// namespace.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    namespace: Option<&str>,
    metrics: Arc<Metrics>,
    gate: WriteGate,
) {
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        config,
        writer: Writer {
            gate,
            metrics,
            recorder: Recorder::new(client.clone(), reporter),
        },
        failures: Default::default(),
    });
    let controller = Controller::new(
        scoped::<DeserializeGuard<EvalGate>>(&client, namespace),
        watcher::Config::default(),
    )
    .owns(scoped::<Pod>(&client, namespace), owned_by_operator())
    .owns(
        scoped::<ServiceAccount>(&client, namespace),
        owned_by_operator(),
    );
    let gates = controller.store();
    controller
        // A TrainingJob that succeeds (or runs again) wakes the gates that evaluate it.
        .watches(
            scoped::<TrainingJob>(&client, namespace),
            watcher::Config::default(),
            move |job: TrainingJob| {
                let (name, ns) = (job.name_any(), job.namespace());
                gates
                    .state()
                    .into_iter()
                    .filter(|guard| {
                        guard.0.as_ref().is_ok_and(|g| {
                            g.namespace() == ns
                                && g.spec
                                    .candidate
                                    .training_job
                                    .as_ref()
                                    .is_some_and(|r| r.name == name)
                        })
                    })
                    .map(|guard| ObjectRef::from_obj(&*guard))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(reconcile_counted, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                crate::reconcile::log_controller_error("evalgates", &err);
            }
        })
        .await;
}

async fn reconcile_counted(
    guard: Arc<DeserializeGuard<EvalGate>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let result = match &guard.0 {
        Ok(gate) => reconcile(gate, &ctx).await,
        Err(invalid) => crate::reconcile::report_invalid(&*guard, invalid, &ctx.writer).await,
    };
    if result.is_ok() {
        ctx.failures.succeeded(&ObjectRef::from_obj(&*guard));
    }
    ctx.writer.metrics.reconciled(
        "evalgate",
        result.as_ref().map_or_else(Error::category, |_| "ok"),
    );
    result
}

fn error_policy(gate: Arc<DeserializeGuard<EvalGate>>, err: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.failures.failed(ObjectRef::from_obj(&*gate));
    tracing::warn!(gate = %gate.name_any(), category = err.category(), error = %err, failures, "reconcile failed");
    retry_after(err, failures)
}

/// What the gate's candidate is now.
async fn resolve_candidate(gate: &EvalGate, client: &Client) -> Result<Candidate, Error> {
    if let Some(uri) = &gate.spec.candidate.uri {
        return Ok(Candidate::Ready(ResolvedModel {
            source: uri.0.clone(),
            uri: uri.0.clone(),
            sha256: None,
            gate: None,
            reference: None,
        }));
    }
    let Some(reference) = &gate.spec.candidate.training_job else {
        return Err(Error::Build(
            "spec.candidate names neither a trainingJob nor a uri".into(),
        ));
    };
    let ns = gate.namespace().unwrap_or_default();
    let Some(job) = Api::<TrainingJob>::namespaced(client.clone(), &ns)
        .get_opt(&reference.name)
        .await?
    else {
        return Ok(Candidate::Gone);
    };
    // A DPO model is ranked against what it was aligned from: its job's base model.
    let aligned_against = (job.spec.stage == anneal_crds::trainingjob::Stage::Dpo)
        .then(|| {
            job.status
                .as_ref()
                .and_then(|s| s.base_model.as_ref())
                .map(|b| b.uri.clone())
                .or_else(|| job.spec.model.base_model.as_ref().map(|u| u.0.clone()))
        })
        .flatten();
    let status = job.status.unwrap_or_default();
    let name = &reference.name;
    Ok(match (status.phase, status.artifact) {
        (Some(TrainingPhase::Succeeded), Some(artifact)) => Candidate::Ready(ResolvedModel {
            source: format!("trainingjob/{name}"),
            uri: artifact.uri,
            sha256: Some(artifact.sha256.to_lowercase()),
            gate: None,
            reference: aligned_against,
        }),
        (Some(TrainingPhase::Failed), _) => {
            let why = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Failed" || c.type_ == "Succeeded")
                .map(|c| format!(": {}", c.message))
                .unwrap_or_default();
            Candidate::Unusable {
                reason: "CandidateFailed".into(),
                message: format!("TrainingJob {name} failed{why}"),
            }
        }
        (phase, _) => {
            let step = status
                .progress
                .as_ref()
                .and_then(|p| p.step_of_total.clone())
                .map(|s| format!(", step {s}"))
                .unwrap_or_default();
            Candidate::Waiting {
                reason: "WaitingForTraining".into(),
                message: format!(
                    "waiting for TrainingJob {name} to succeed (phase {}{step})",
                    phase.map_or("Pending".to_string(), |p| format!("{p:?}"))
                ),
            }
        }
    })
}

/// The model `noRegression` compares with: what the named ModelServer serves now, or the model
/// the named TrainingJob wrote.
async fn resolve_baseline(gate: &EvalGate, client: &Client) -> Result<Baseline, Error> {
    let Some(nr) = &gate.spec.no_regression else {
        return Ok(Baseline::NotAsked);
    };
    let ns = gate.namespace().unwrap_or_default();
    if let Some(job) = &nr.training_job {
        let name = &job.name;
        let status = Api::<TrainingJob>::namespaced(client.clone(), &ns)
            .get_opt(name)
            .await?
            .and_then(|j| j.status)
            .unwrap_or_default();
        return Ok(match (status.phase, status.artifact) {
            (Some(TrainingPhase::Succeeded), Some(artifact)) => Baseline::Model(ResolvedModel {
                source: format!("trainingjob/{name}"),
                uri: artifact.uri,
                sha256: Some(artifact.sha256.to_lowercase()),
                gate: None,
                reference: None,
            }),
            _ => Baseline::NothingServed(format!("TrainingJob {name} has no model yet")),
        });
    }
    let Some(server) = &nr.model_server else {
        return Err(Error::Build(
            "spec.noRegression names neither a modelServer nor a trainingJob".into(),
        ));
    };
    let name = &server.name;
    let Some(server) = Api::<ModelServer>::namespaced(client.clone(), &ns)
        .get_opt(name)
        .await?
    else {
        return Ok(Baseline::NothingServed(format!(
            "ModelServer {name} does not exist"
        )));
    };
    let status = server.status.unwrap_or_default();
    // While a roll-out is under way the model that serves is the previous one.
    let serving = if status.rollout_started_at.is_some() {
        status.previous_model.or(status.current_model)
    } else {
        status.current_model
    };
    Ok(match serving {
        Some(model) => Baseline::Model(model),
        None => Baseline::NothingServed(format!("ModelServer {name} serves no model yet")),
    })
}

async fn reconcile(gate: &EvalGate, ctx: &Context) -> Result<Action, Error> {
    if gate.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let client = &ctx.client;
    let name = gate.name_any();
    let ns = gate.namespace().unwrap_or_default();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pods = pods_api
        .list(&ListParams::default().labels(&format!("{EVALGATE}={name}")))
        .await?
        .items;
    let candidate = resolve_candidate(gate, client).await?;
    let baseline = resolve_baseline(gate, client).await?;
    let now = Timestamp::now();
    let plan = decide(gate, &candidate, &baseline, &pods, now);
    let api: Api<EvalGate> = Api::namespaced(client.clone(), &ns);
    let unchanged = gate.status.as_ref() == Some(&plan.status);
    // A pod is created from a fresh copy only (see `is_newest`): the gate's own pod deletion
    // after a verdict can arrive before the verdict, and a stale copy would start the decided
    // round's pod again. The pods were listed before this read, so they are no newer than it.
    if plan.create_try.is_some() && unchanged && !is_newest(&api, gate).await? {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }

    // Status first: the round and its try are recorded before the pod exists, and the verdict
    // before the pod that produced it goes.
    if !unchanged {
        apply_status(&api, gate, &plan.status, &ctx.writer).await?;
    }
    if plan.status.phase == Some(GatePhase::Evaluating) || plan.create_try.is_some() {
        apply_child(
            &Api::<ServiceAccount>::namespaced(client.clone(), &ns),
            &build::service_account(gate)?,
            &ctx.writer,
        )
        .await?;
    }
    for pod in &plan.delete {
        ctx.writer.writing("pods", "delete")?;
        match pods_api.delete(pod, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let (Some(try_), Some(round), Some(model)) = (
        plan.create_try,
        plan.status.round.as_deref(),
        plan.status.candidate.as_ref(),
    ) {
        let pod = build::eval_pod(
            gate,
            round,
            try_,
            model,
            plan.status.baseline.as_ref(),
            &ctx.config,
        )?;
        if ensure_created(&pods_api, &pod, &ctx.writer).await? {
            tracing::info!(gate = %name, round, try_, "evaluation pod created");
        }
    }
    let reference = gate.object_ref(&());
    ctx.writer.notices(&reference, &plan.notices).await?;
    if let Some((phase, reason)) = &plan.verdict {
        let metrics = &ctx.writer.metrics;
        metrics
            .verdicts
            .get_or_create(&VerdictLabels {
                result: format!("{phase:?}"),
                reason: reason.clone(),
            })
            .inc();
        if *phase == GatePhase::Passed {
            metrics.promotions.inc();
        }
        tracing::info!(gate = %name, ?phase, reason, "verdict");
    }
    Ok(match plan.requeue_at {
        Some(at) => Action::requeue(Duration::from_secs_f64(
            now.duration_until(at).as_secs_f64().clamp(0.5, 300.0),
        )),
        None => Action::await_change(),
    })
}
