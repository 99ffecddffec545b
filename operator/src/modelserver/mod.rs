//! The ModelServer controller: resolve the model to serve (pinned, or what its EvalGate last
//! promoted), [`decide`] the roll-out, apply the Deployment, Service, PodDisruptionBudget and
//! ServiceAccount that [`build`] makes, write status once per change. The user's `spec` is
//! never written: promotion and roll-back live in status and in the children (GitOps).

pub mod build;
pub mod decide;

use std::sync::Arc;
use std::time::Duration;

use anneal_crds::evalgate::ResolvedModel;
use anneal_crds::{EvalGate, ModelServer};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};

use crate::FIELD_MANAGER;
use crate::config::OperatorConfig;
use crate::leader::WriteGate;
use crate::metrics::Metrics;
use crate::reconcile::{
    Backoff, Error, Writer, apply_child, apply_status, delete_child, owned_by_operator,
    retry_after, scoped,
};
use decide::{Desired, decide};

/// What every reconcile shares.
pub struct Context {
    /// Client with the operator's identity.
    pub client: Client,
    /// Operator settings.
    pub config: OperatorConfig,
    /// Fenced, counted writes and Events.
    pub writer: Writer,
    /// Consecutive failures per server, for exponential backoff.
    pub failures: Backoff<DeserializeGuard<ModelServer>>,
}

/// Runs the ModelServer controller until a shutdown signal; with `namespace`, only for that
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
        scoped::<DeserializeGuard<ModelServer>>(&client, namespace),
        watcher::Config::default(),
    )
    .owns(
        scoped::<Deployment>(&client, namespace),
        owned_by_operator(),
    )
    .owns(scoped::<Service>(&client, namespace), owned_by_operator())
    .owns(
        scoped::<PodDisruptionBudget>(&client, namespace),
        owned_by_operator(),
    )
    .owns(
        scoped::<ServiceAccount>(&client, namespace),
        owned_by_operator(),
    );
    let servers = controller.store();
    controller
        // A gate promoting a model wakes the servers that follow it.
        .watches(
            scoped::<EvalGate>(&client, namespace),
            watcher::Config::default(),
            move |gate: EvalGate| {
                let (name, ns) = (gate.name_any(), gate.namespace());
                servers
                    .state()
                    .into_iter()
                    .filter(|guard| {
                        guard.0.as_ref().is_ok_and(|s| {
                            s.namespace() == ns
                                && s.spec
                                    .model
                                    .from_eval_gate
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
                crate::reconcile::log_controller_error("modelservers", &err);
            }
        })
        .await;
}

async fn reconcile_counted(
    guard: Arc<DeserializeGuard<ModelServer>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let result = match &guard.0 {
        Ok(server) => reconcile(server, &ctx).await,
        Err(invalid) => crate::reconcile::report_invalid(&*guard, invalid, &ctx.writer).await,
    };
    if result.is_ok() {
        ctx.failures.succeeded(&ObjectRef::from_obj(&*guard));
    }
    ctx.writer.metrics.reconciled(
        "modelserver",
        result.as_ref().map_or_else(Error::category, |_| "ok"),
    );
    result
}

fn error_policy(
    server: Arc<DeserializeGuard<ModelServer>>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    let failures = ctx.failures.failed(ObjectRef::from_obj(&*server));
    tracing::warn!(server = %server.name_any(), category = err.category(), error = %err, failures, "reconcile failed");
    retry_after(err, failures)
}

/// What the server's source says it should serve now.
async fn resolve(server: &ModelServer, client: &Client) -> Result<Desired, Error> {
    let source = &server.spec.model;
    if let Some(uri) = &source.uri {
        return Ok(Desired::Model(ResolvedModel {
            source: uri.0.clone(),
            uri: uri.0.clone(),
            sha256: None,
            gate: None,
            reference: None,
        }));
    }
    let Some(reference) = &source.from_eval_gate else {
        return Err(Error::Build(
            "spec.model names neither a uri nor fromEvalGate".into(),
        ));
    };
    let ns = server.namespace().unwrap_or_default();
    let name = &reference.name;
    let gate = Api::<EvalGate>::namespaced(client.clone(), &ns)
        .get_opt(name)
        .await?;
    Ok(match gate.and_then(|g| g.status).and_then(|s| s.promoted) {
        // Only a model pinned by the digest its gate measured is served.
        Some(model) if model.sha256.is_some() => Desired::Model(model),
        _ => Desired::Waiting {
            reason: "NoPromotedModel".into(),
            message: format!("EvalGate {name} has promoted no model yet"),
        },
    })
}

async fn reconcile(server: &ModelServer, ctx: &Context) -> Result<Action, Error> {
    if server.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let client = &ctx.client;
    let name = server.name_any();
    let ns = server.namespace().unwrap_or_default();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let child = build::child_name(&name);
    let deployment = deployments
        .get_opt(&child)
        .await?
        .filter(|d| crate::reconcile::controlled_by(d, server.meta().uid.as_deref()));
    let desired = resolve(server, client).await?;
    let now = Timestamp::now();
    let plan = decide(
        server,
        &desired,
        deployment.as_ref(),
        &build::endpoint(server),
        now,
    );

    // Status first: the roll-out (and a roll-back) is recorded before the Deployment changes.
    if server.status.as_ref() != Some(&plan.status) {
        let api: Api<ModelServer> = Api::namespaced(client.clone(), &ns);
        apply_status(&api, server, &plan.status, &ctx.writer).await?;
    }
    if let Some(model) = &plan.deploy {
        let w = &ctx.writer;
        let mut repaired = Vec::new();
        let started = server
            .status
            .as_ref()
            .is_some_and(|s| s.current_model.is_some());
        let sa = apply_child(
            &Api::<ServiceAccount>::namespaced(client.clone(), &ns),
            &build::service_account(server)?,
            w,
        )
        .await?;
        if sa.drifted(started) {
            repaired.push("ServiceAccount");
        }
        let dep = apply_child(
            &deployments,
            &build::deployment(server, model, &ctx.config)?,
            w,
        )
        .await?;
        // A Deployment that differs only because the model changed is a roll-out, not drift.
        let model_changed = server
            .status
            .as_ref()
            .and_then(|s| s.current_model.as_ref())
            .is_none_or(|c| !c.same_model(model));
        if dep.drifted(started) && !model_changed {
            repaired.push("Deployment");
        }
        let svc = apply_child(
            &Api::<Service>::namespaced(client.clone(), &ns),
            &build::service(server)?,
            w,
        )
        .await?;
        if svc.drifted(started) {
            repaired.push("Service");
        }
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
        if server.spec.replicas > 1 {
            if apply_child(&pdbs, &build::disruption_budget(server)?, w)
                .await?
                .drifted(started)
            {
                repaired.push("PodDisruptionBudget");
            }
        } else {
            delete_child::<PodDisruptionBudget>(&pdbs, &child, w).await?;
        }
        if !repaired.is_empty() {
            w.event(
                &server.object_ref(&()),
                true,
                "Repaired",
                format!(
                    "{} differed from what the operator made (edited or deleted); applied again",
                    repaired.join(", ")
                ),
            )
            .await?;
        }
    }
    let reference = server.object_ref(&());
    ctx.writer.notices(&reference, &plan.notices).await?;
    let metrics = &ctx.writer.metrics;
    if plan.rolled_back {
        metrics.rollbacks.inc();
    }
    if let Some(seconds) = plan.rollout_seconds {
        metrics.rollout_seconds.observe(seconds);
    }
    Ok(match plan.requeue_at {
        Some(at) => Action::requeue(Duration::from_secs_f64(
            now.duration_until(at).as_secs_f64().clamp(0.5, 300.0),
        )),
        None => Action::await_change(),
    })
}
