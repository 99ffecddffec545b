//! The TrainingJob controller: read the job's pods and the health of their nodes, [`decide`],
//! apply the [`build`] output, write status once when it changed.

pub mod build;
pub mod decide;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anneal_crds::TrainingJob;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::FIELD_MANAGER;
use crate::config::OperatorConfig;
use crate::labels::{ATTEMPT, MANAGED_BY, TRAININGJOB};
use crate::metrics::{FailoverLabels, Metrics};
use crate::node_health::{lease_deadline, node_failure};
use decide::{Observed, Plan, decide};

/// Errors of one reconcile; the category names are metric and log labels.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request (transient: retried with backoff).
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The job cannot be turned into children (waits for a change).
    #[error("invalid TrainingJob: {0}")]
    Build(#[from] build::BuildError),
}

impl Error {
    /// Short stable category for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Build(_) => "build",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    /// Client with the operator's identity.
    pub client: Client,
    /// Operator settings.
    pub config: OperatorConfig,
    /// Every node, kept current by a watch.
    pub nodes: Store<Node>,
    /// Node leases (`kube-node-lease`), kept current by a watch.
    pub leases: Store<Lease>,
    /// Event recorder.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per job, for exponential backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<ObjectRef<TrainingJob>, u32>>,
}

/// Keeps a store of `K` current from a watch; returns the store once it holds the first listing.
async fn watched_store<K>(api: Api<K>) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    tokio::spawn(stream.for_each(|_| async {}));
    // The operator must not judge nodes from an empty cache.
    let _ = reader.wait_until_ready().await;
    reader
}

/// `Api` over all namespaces, or over `namespace` only.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the TrainingJob controller until a shutdown signal; with `namespace`, only for the
/// TrainingJobs of that namespace (nodes are always watched cluster-wide).
pub async fn run(
    client: Client,
    config: OperatorConfig,
    namespace: Option<&str>,
    metrics: Arc<Metrics>,
) {
    let nodes = watched_store(Api::<Node>::all(client.clone())).await;
    let leases = watched_store(Api::<Lease>::namespaced(client.clone(), "kube-node-lease")).await;
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let ctx = Arc::new(Context {
        client: client.clone(),
        config,
        nodes,
        leases,
        recorder,
        failures: Default::default(),
        metrics: metrics.clone(),
    });
    // Caches are filled: from here on the operator judges nodes from real data.
    metrics.set_ready(true);

    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let controller = Controller::new(
        scoped::<TrainingJob>(&client, namespace),
        watcher::Config::default(),
    )
    .owns(scoped::<Pod>(&client, namespace), owned.clone())
    .owns(scoped::<ServiceAccount>(&client, namespace), owned);
    let jobs = controller.store();
    controller
        // A node going bad wakes the jobs running on it at once.
        .watches(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            move |node: Node| {
                let name = node.name_any();
                jobs.state()
                    .into_iter()
                    .filter(|job| job.status.as_ref().is_some_and(|s| s.nodes.contains(&name)))
                    .map(|job| ObjectRef::from_obj(&*job))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(reconcile_counted, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "reconcile stream");
            }
        })
        .await;
}

async fn reconcile_counted(job: Arc<TrainingJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let result = reconcile(job, ctx.clone()).await;
    ctx.metrics
        .reconciled(result.as_ref().map_or_else(Error::category, |_| "ok"));
    result
}

fn error_policy(job: Arc<TrainingJob>, err: &Error, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(&*job);
    let failures = {
        let mut map = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key).or_insert(0);
        *n += 1;
        *n
    };
    tracing::warn!(job = %job.name_any(), category = err.category(), error = %err, failures, "reconcile failed");
    match err {
        // An object the operator cannot build waits for the user to change it.
        Error::Build(_) => Action::await_change(),
        Error::Kube(_) => Action::requeue(Duration::from_millis(
            250 * 2u64.saturating_pow(failures.min(8)),
        )),
    }
}

/// Applies `obj` only when it does not exist yet, so that a steady state makes no writes.
async fn ensure<K>(api: &Api<K>, obj: &K, metrics: &Metrics) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    if api.get_opt(&name).await?.is_none() {
        metrics.wrote(&K::plural(&()), "apply");
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?;
    }
    Ok(())
}

async fn reconcile(job: Arc<TrainingJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = job.name_any();
    let namespace = job.namespace().unwrap_or_default();
    let client = &ctx.client;
    let now = Timestamp::now();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pods = pods_api
        .list(&ListParams::default().labels(&format!("{TRAININGJOB}={name}")))
        .await?
        .items;

    // A worker newer than the status says exists: this copy of the job is older than a decision
    // already carried out. Act only on a fresh copy.
    let recorded = job.status.as_ref().and_then(|s| s.attempt).unwrap_or(1);
    let newest = pods
        .iter()
        .filter_map(|p| p.labels().get(ATTEMPT)?.parse::<u32>().ok())
        .max();
    if newest.is_some_and(|n| n > recorded) {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }

    let timeout = SignedDuration::from_secs(i64::from(
        job.spec.failover_policy.node_lease_timeout_seconds,
    ));
    let mut failed_nodes = BTreeMap::new();
    let mut next_look: Option<Timestamp> = None;
    for node_name in pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
    {
        let lease = ctx
            .leases
            .get(&ObjectRef::new(&node_name).within("kube-node-lease"));
        let failure = match ctx.nodes.get(&ObjectRef::new(&node_name)) {
            Some(node) => node_failure(
                &node,
                lease.as_deref(),
                job.spec.resources.gpus,
                timeout,
                now,
            ),
            None => Some(anneal_crds::trainingjob::FailoverReason::NodeDeleted),
        };
        match failure {
            Some(reason) => {
                failed_nodes.insert(node_name, reason);
            }
            None => {
                let deadline = lease_deadline(lease.as_deref(), timeout);
                next_look = match (next_look, deadline) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
    }

    let plan = decide(
        &job,
        &Observed {
            pods: &pods,
            failed_nodes: &failed_nodes,
            now,
        },
    );
    execute(&job, &plan, &pods_api, &ctx).await?;
    // Success: the next failure of this job starts the backoff from the beginning.
    ctx.failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&ObjectRef::from_obj(&*job));

    // A TTL on a finished job: delete it when due.
    if let (Some(ttl), Some(done)) = (
        job.spec.run_policy.ttl_seconds_after_finished,
        plan.status.completion_time.as_ref(),
    ) {
        let due = done
            .0
            .checked_add(SignedDuration::from_secs(i64::from(ttl)))
            .unwrap_or(done.0);
        if due <= now {
            ctx.metrics.wrote("trainingjobs", "delete");
            Api::<TrainingJob>::namespaced(client.clone(), &namespace)
                .delete(&name, &DeleteParams::background())
                .await?;
            return Ok(Action::await_change());
        }
        return Ok(Action::requeue(Duration::from_secs_f64(
            now.duration_until(due).as_secs_f64().max(1.0),
        )));
    }

    // A lease going stale produces no event: look again when it would be.
    Ok(match next_look {
        Some(at) => Action::requeue(Duration::from_secs_f64(
            now.duration_until(at).as_secs_f64().clamp(0.5, 60.0),
        )),
        None => Action::await_change(),
    })
}

async fn execute(
    job: &TrainingJob,
    plan: &Plan,
    pods_api: &Api<Pod>,
    ctx: &Context,
) -> Result<(), Error> {
    let client = &ctx.client;
    let namespace = job.namespace().unwrap_or_default();
    // Status first: the next attempt and the excluded node are recorded before any pod is
    // touched, so that a crash in between resumes the same decision.
    let mut current = job.status.clone().unwrap_or_default();
    current.progress = None;
    current.last_checkpoint = None;
    if current != plan.status {
        let api: Api<TrainingJob> = Api::namespaced(client.clone(), &namespace);
        let body = serde_json::json!({
            "apiVersion": format!("{}/{}", anneal_crds::GROUP, anneal_crds::VERSION),
            "kind": "TrainingJob",
            // Optimistic concurrency: a decision made from a stale copy of the job fails here
            // (409) instead of overwriting newer status, and nothing of it is carried out.
            "metadata": {"resourceVersion": job.resource_version()},
            "status": plan.status,
        });
        ctx.metrics.wrote("trainingjobs/status", "apply");
        api.patch_status(
            &job.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await?;
    }
    for deletion in &plan.delete {
        let params = if deletion.force {
            DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::background()
            }
        } else {
            DeleteParams::background()
        };
        ctx.metrics.wrote("pods", "delete");
        match pods_api.delete(&deletion.pod, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let running = !matches!(
        plan.status.phase,
        Some(
            anneal_crds::trainingjob::TrainingPhase::Succeeded
                | anneal_crds::trainingjob::TrainingPhase::Failed
                | anneal_crds::trainingjob::TrainingPhase::Suspended
        )
    );
    if running {
        ensure(
            &Api::namespaced(client.clone(), &namespace),
            &build::service_account(job)?,
            &ctx.metrics,
        )
        .await?;
        ensure::<Role>(
            &Api::namespaced(client.clone(), &namespace),
            &build::role(job)?,
            &ctx.metrics,
        )
        .await?;
        ensure::<RoleBinding>(
            &Api::namespaced(client.clone(), &namespace),
            &build::role_binding(job)?,
            &ctx.metrics,
        )
        .await?;
        ensure::<ConfigMap>(
            &Api::namespaced(client.clone(), &namespace),
            &build::config_map(job)?,
            &ctx.metrics,
        )
        .await?;
    }
    if let Some(attempt) = plan.create_attempt {
        let excluded = &plan.status.excluded_nodes;
        for worker in 0..job.spec.workers {
            let pod = build::worker_pod(job, attempt, worker, excluded, &ctx.config)?;
            ensure(pods_api, &pod, &ctx.metrics).await?;
        }
    }
    let reference = job.object_ref(&());
    for notice in &plan.notices {
        let event = Event {
            type_: if notice.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: notice.reason.clone(),
            note: Some(notice.message.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        ctx.metrics.wrote("events", "create");
        if let Err(err) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %err, "recording an event");
        }
    }
    record_failover_metrics(job, plan, &ctx.metrics);
    if let Some(reason) = plan.failover {
        tracing::info!(job = %job.name_any(), ?reason, attempt = ?plan.status.attempt, "failing over");
    }
    Ok(())
}

/// Counts a failover when it starts, and observes its duration when its replacement runs.
fn record_failover_metrics(job: &TrainingJob, plan: &Plan, metrics: &Metrics) {
    if let Some(reason) = plan.failover {
        let labels = FailoverLabels {
            reason: format!("{reason:?}"),
        };
        metrics.failovers.get_or_create(&labels).inc();
    }
    let before = job
        .status
        .as_ref()
        .map(|s| s.failovers.as_slice())
        .unwrap_or_default();
    for (i, record) in plan.status.failovers.iter().enumerate() {
        let was_open = before.get(i).is_some_and(|r| r.recovered_at.is_none());
        if let (true, Some(recovered)) = (was_open, &record.recovered_at) {
            let seconds = recovered
                .0
                .duration_since(record.detected_at.0)
                .as_secs_f64();
            metrics.failover_seconds.observe(seconds.max(0.0));
        }
    }
}
