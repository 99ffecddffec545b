//! The TrainingJob controller: read the job's pods and the health of their nodes, [`decide`],
//! apply the [`build`] output, write status once when it changed.

pub mod build;
pub mod decide;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anneal_crds::TrainingJob;
use anneal_crds::common::{StorageUri, set_condition};
use anneal_crds::trainingjob::{BaseModelRecord, TrainingJobStatus, TrainingPhase};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Node, PersistentVolumeClaim, Pod, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};

use crate::FIELD_MANAGER;
use crate::config::OperatorConfig;
use crate::labels::{ATTEMPT, TRAININGJOB};
use crate::leader::WriteGate;
use crate::metrics::{FailoverLabels, Metrics};
use crate::node_health::{NodeView, gpus_lost, lease_deadline, node_failure, pod_gpus};
use crate::reconcile::{
    Applied, Backoff, Error, Writer, apply_child, apply_status, condition, delete_child,
    ensure_created, is_newest, owned_by_operator, retry_after, scoped, watched_store,
};

/// Condition of a job with `spec.model.fromTrainingJob`: whether its base model exists.
pub const BASE_MODEL_READY: &str = "BaseModelReady";
/// Condition of a gang (`workers` > 1): whether every claim its workers mount can be mounted on
/// several nodes at once.
pub const STORAGE_SHARED: &str = "StorageShared";
use decide::{Observed, Plan, decide};

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
    /// Fenced, counted writes and Events.
    pub writer: Writer,
    /// Consecutive failures per job, for exponential backoff.
    pub failures: Backoff<DeserializeGuard<TrainingJob>>,
}

impl From<build::BuildError> for Error {
    fn from(e: build::BuildError) -> Self {
        Error::Build(e.to_string())
    }
}

/// Runs the TrainingJob controller until a shutdown signal; with `namespace`, only for the
/// TrainingJobs of that namespace (nodes are always watched cluster-wide).
pub async fn run(
    client: Client,
    config: OperatorConfig,
    namespace: Option<&str>,
    metrics: Arc<Metrics>,
    gate: WriteGate,
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
        writer: Writer {
            gate,
            metrics,
            recorder,
        },
        failures: Default::default(),
    });
    let owned = owned_by_operator();
    // A stored object the types cannot read (written under an older schema, say) must not stall
    // the watch of all the others: it is reconciled as an error of its own (style.md #6).
    let controller = Controller::new(
        scoped::<DeserializeGuard<TrainingJob>>(&client, namespace),
        watcher::Config::default(),
    )
    .owns(scoped::<Pod>(&client, namespace), owned.clone())
    // Drift of what the workers need (a Role edited, a ConfigMap deleted) wakes the job.
    .owns(scoped::<ServiceAccount>(&client, namespace), owned.clone())
    .owns(scoped::<Role>(&client, namespace), owned.clone())
    .owns(scoped::<RoleBinding>(&client, namespace), owned.clone())
    .owns(scoped::<ConfigMap>(&client, namespace), owned.clone())
    // A gang's headless Service deleted or edited wakes the job.
    .owns(scoped::<Service>(&client, namespace), owned);
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
                    .filter(|guard| {
                        guard.0.as_ref().is_ok_and(|job| {
                            job.status.as_ref().is_some_and(|s| s.nodes.contains(&name))
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
                crate::reconcile::log_controller_error("trainingjobs", &err);
            }
        })
        .await;
}

async fn reconcile_counted(
    guard: Arc<DeserializeGuard<TrainingJob>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let result = match &guard.0 {
        Ok(job) => reconcile(Arc::new(job.clone()), ctx.clone()).await,
        Err(invalid) => crate::reconcile::report_invalid(&*guard, invalid, &ctx.writer).await,
    };
    ctx.writer.metrics.reconciled(
        "trainingjob",
        result.as_ref().map_or_else(Error::category, |_| "ok"),
    );
    result
}

fn error_policy(job: Arc<DeserializeGuard<TrainingJob>>, err: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.failures.failed(ObjectRef::from_obj(&*job));
    tracing::warn!(job = %job.name_any(), category = err.category(), error = %err, failures, "reconcile failed");
    retry_after(err, failures)
}

/// Top-level spec fields that differ between two renderings of the workers' configuration.
fn changed_spec_fields(old: &ConfigMap, new: &ConfigMap) -> Vec<String> {
    let parse = |cm: &ConfigMap| -> serde_json::Value {
        cm.data
            .as_ref()
            .and_then(|d| d.get(build::CONFIG_FILE))
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or_default()
    };
    let (old, new) = (parse(old), parse(new));
    let keys: std::collections::BTreeSet<&String> = old
        .as_object()
        .into_iter()
        .chain(new.as_object())
        .flat_map(|o| o.keys())
        .collect();
    keys.into_iter()
        .filter(|k| old.get(k.as_str()) != new.get(k.as_str()))
        .cloned()
        .collect()
}

/// GPUs held on `node` by live pods other than the workers of the job with `uid`.
async fn gpus_held_by_others(
    client: &Client,
    node: &str,
    uid: Option<&str>,
) -> Result<u32, kube::Error> {
    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await?;
    Ok(pods
        .items
        .iter()
        .filter(|p| {
            uid.is_none()
                || !p
                    .owner_references()
                    .iter()
                    .any(|o| Some(o.uid.as_str()) == uid)
        })
        .map(pod_gpus)
        .sum())
}

/// Where a job that names its base model through `spec.model.fromTrainingJob` stands.
enum BaseModel {
    /// The model, recorded in status (or about to be).
    Ready(BaseModelRecord),
    /// Why the job waits.
    Waiting(String),
}

/// The base model of a job with `spec.model.fromTrainingJob`: the one its status recorded, or
/// the other job's artifact once it has succeeded. `None` for other jobs.
async fn resolve_base(job: &TrainingJob, client: &Client) -> Result<Option<BaseModel>, Error> {
    let Some(from) = &job.spec.model.from_training_job else {
        return Ok(None);
    };
    if let Some(recorded) = job.status.as_ref().and_then(|s| s.base_model.clone()) {
        return Ok(Some(BaseModel::Ready(recorded)));
    }
    let namespace = job.namespace().unwrap_or_default();
    let name = &from.name;
    let other = Api::<TrainingJob>::namespaced(client.clone(), &namespace)
        .get_opt(name)
        .await?;
    let status = other.and_then(|o| o.status);
    Ok(Some(match status {
        Some(s) if s.phase == Some(TrainingPhase::Succeeded) && s.artifact.is_some() => {
            let artifact = s.artifact.unwrap_or_default();
            BaseModel::Ready(BaseModelRecord {
                training_job: name.clone(),
                uri: artifact.uri,
                sha256: artifact.sha256.to_lowercase(),
            })
        }
        Some(s) => BaseModel::Waiting(format!(
            "waiting for TrainingJob {name} to succeed (phase {})",
            s.phase
                .map_or_else(|| "Pending".to_string(), |p| format!("{p:?}"))
        )),
        None => BaseModel::Waiting(format!(
            "waiting for TrainingJob {name}, which does not exist (yet)"
        )),
    }))
}

/// Keeps `job` Pending with condition `type_` False (`reason`, `message`): status written and a
/// Warning Event published when that changes what the status says.
async fn hold(
    job: &TrainingJob,
    ctx: &Context,
    type_: &str,
    reason: &str,
    message: String,
) -> Result<(), Error> {
    let mut status = job.status.clone().unwrap_or_default();
    status.phase = Some(TrainingPhase::Pending);
    set_condition(
        &mut status.conditions,
        condition(
            type_,
            false,
            reason,
            &message,
            job.metadata.generation,
            Timestamp::now(),
        ),
    );
    if job.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<TrainingJob> =
        Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    apply_status(&api, job, &status, &ctx.writer).await?;
    ctx.writer
        .event(&job.object_ref(&()), true, reason, message)
        .await
}

/// For a gang (`workers` > 1) about to place workers (none live, not finished): whether every
/// claim its pods mount can be mounted on several nodes at once. ReadWriteMany for a writable
/// mount (the checkpoints every worker resumes from, the output), ReadWriteMany or ReadOnlyMany
/// for a read-only one (data, base model). A ReadWriteOnce claim would hold the second worker in
/// ContainerCreating (multi-attach) until the gang's placement timeout, without saying why.
/// `None` when there is nothing to check, `Ok(message)` when all are shared, `Err((reason,
/// message))` when not.
async fn gang_storage(
    job: &TrainingJob,
    pods: &[Pod],
    ctx: &Context,
) -> Result<Option<Result<String, (&'static str, String)>>, Error> {
    let finished = job
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| matches!(p, TrainingPhase::Succeeded | TrainingPhase::Failed));
    let live = pods.iter().any(|p| p.metadata.deletion_timestamp.is_none());
    if job.spec.workers <= 1 || finished || live {
        return Ok(None);
    }
    let namespace = job.namespace().unwrap_or_default();
    let attempt = job.status.as_ref().and_then(|s| s.attempt).unwrap_or(1);
    let pod = build::worker_pod(job, attempt, 0, &[], &ctx.config)?;
    let claims = build::claims_of(&pod);
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut shared = Vec::new();
    for (claim, read_only) in claims {
        let Some(pvc) = api.get_opt(&claim).await? else {
            return Ok(Some(Err((
                "ClaimNotFound",
                format!(
                    "PersistentVolumeClaim {claim} does not exist; the {} workers wait for it",
                    job.spec.workers
                ),
            ))));
        };
        let modes = pvc.spec.and_then(|s| s.access_modes).unwrap_or_default();
        let ok = modes
            .iter()
            .any(|m| m == "ReadWriteMany" || (read_only && m == "ReadOnlyMany"));
        if !ok {
            let wanted = if read_only {
                "ReadWriteMany or ReadOnlyMany"
            } else {
                "ReadWriteMany"
            };
            return Ok(Some(Err((
                "ClaimNotShared",
                format!(
                    "PersistentVolumeClaim {claim} has access modes {modes:?}; the {} workers of \
                     a gang run on distinct nodes and all mount it, so it must be {wanted} \
                     (recreate the claim, or train with workers: 1)",
                    job.spec.workers
                ),
            ))));
        }
        shared.push(claim);
    }
    Ok(Some(Ok(format!(
        "every worker's node can mount the gang's claims ({})",
        shared.join(", ")
    ))))
}

async fn reconcile(job: Arc<TrainingJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // The status as stored: what a decision is compared with before it is written (the job
    // below may carry conditions added on the way, not stored yet).
    let stored = job.status.clone();
    // A job fine-tuning another job's model starts once that model exists, and from then on
    // trains as if `spec.model.baseModel` named it (never written into the spec: the spec is
    // the user's).
    let job = match resolve_base(&job, &ctx.client).await? {
        None => job,
        Some(BaseModel::Ready(record)) => {
            let mut effective = (*job).clone();
            effective.spec.model.base_model = Some(StorageUri(record.uri.clone()));
            effective.spec.model.from_training_job = None;
            let status = effective.status.get_or_insert_with(Default::default);
            set_condition(
                &mut status.conditions,
                condition(
                    BASE_MODEL_READY,
                    true,
                    "Resolved",
                    &format!(
                        "fine-tunes the model of TrainingJob {} ({}, sha256 {})",
                        record.training_job, record.uri, record.sha256
                    ),
                    job.metadata.generation,
                    Timestamp::now(),
                ),
            );
            status.base_model = Some(record);
            Arc::new(effective)
        }
        Some(BaseModel::Waiting(message)) => {
            hold(
                &job,
                &ctx,
                BASE_MODEL_READY,
                "WaitingForTrainingJob",
                message,
            )
            .await?;
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
    };
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
    let uid = job.uid();
    let newest = pods
        .iter()
        .filter(|p| decide::controller_uid(p) == uid.as_deref())
        .filter_map(|p| p.labels().get(ATTEMPT)?.parse::<u32>().ok())
        .max();
    if newest.is_some_and(|n| n > recorded) {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    // A gang starts only on claims that every worker's node can mount at once.
    let job = match gang_storage(&job, &pods, &ctx).await? {
        None => job,
        Some(Ok(message)) => {
            let mut effective = (*job).clone();
            let status = effective.status.get_or_insert_with(Default::default);
            set_condition(
                &mut status.conditions,
                condition(
                    STORAGE_SHARED,
                    true,
                    "ClaimsShared",
                    &message,
                    job.metadata.generation,
                    Timestamp::now(),
                ),
            );
            Arc::new(effective)
        }
        Some(Err((reason, message))) => {
            hold(&job, &ctx, STORAGE_SHARED, reason, message).await?;
            return Ok(Action::requeue(Duration::from_secs(15)));
        }
    };

    let timeout = SignedDuration::from_secs(i64::from(
        job.spec.failover_policy.node_lease_timeout_seconds,
    ));
    let mut failed_nodes = BTreeMap::new();
    let mut next_look: Option<Timestamp> = None;
    let mut judged = std::collections::BTreeSet::new();
    for node_name in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
    {
        if !judged.insert(node_name.clone()) {
            continue;
        }
        let lease = ctx
            .leases
            .get(&ObjectRef::new(&node_name).within("kube-node-lease"));
        let node = match ctx.nodes.get(&ObjectRef::new(&node_name)) {
            Some(node) => Some(node),
            // The cache may not have seen a node that just joined: ask before judging it gone.
            None => Api::<Node>::all(client.clone())
                .get_opt(&node_name)
                .await?
                .map(Arc::new),
        };
        let failure = match node {
            Some(node) => {
                let gpus_held_by_others = if job.spec.resources.gpus > 0 && gpus_lost(&node) {
                    Some(gpus_held_by_others(client, &node_name, uid.as_deref()).await?)
                } else {
                    None
                };
                let view = NodeView {
                    lease: lease.as_deref(),
                    gpus_held_by_others,
                    gpu_health_conditions: &ctx.config.gpu_health_conditions,
                };
                node_failure(&node, &view, job.spec.resources.gpus, timeout, now)
            }
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
            exclusion: SignedDuration::from_secs(ctx.config.node_exclusion_seconds),
            now,
        },
    );
    if let Some(at) = plan.requeue_at {
        next_look = Some(next_look.map_or(at, |t| t.min(at)));
    }
    if !execute(&job, stored.as_ref(), &plan, &pods_api, &ctx).await? {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    // Success: the next failure of this job starts the backoff from the beginning.
    ctx.failures
        .succeeded(&ObjectRef::new(&name).within(&namespace));

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
            ctx.writer.writing("trainingjobs", "delete")?;
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

/// Carries out `plan`: status first, then pods and children. False when the plan would create
/// workers from a copy of the job older than the API server's, and nothing was done.
async fn execute(
    job: &TrainingJob,
    stored: Option<&TrainingJobStatus>,
    plan: &Plan,
    pods_api: &Api<Pod>,
    ctx: &Context,
) -> Result<bool, Error> {
    let client = &ctx.client;
    let namespace = job.namespace().unwrap_or_default();
    // Status first: the next attempt and the excluded node are recorded before any pod is
    // touched, so that a crash in between resumes the same decision.
    let mut current = stored.cloned().unwrap_or_default();
    current.progress = None;
    current.last_checkpoint = None;
    let api: Api<TrainingJob> = Api::namespaced(client.clone(), &namespace);
    if current != plan.status {
        apply_status(&api, job, &plan.status, &ctx.writer).await?;
    } else if plan.create_attempt.is_some() && !is_newest(&api, job).await? {
        // Workers are created from a fresh copy only (see `is_newest`): a finished job's
        // workers are deleted after its status says so, and a copy older than that status
        // would start them again. The next reconcile has the newer copy.
        return Ok(false);
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
        ctx.writer.writing("pods", "delete")?;
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
    let mut notices = plan.notices.clone();
    if running {
        apply_workers_children(job, plan, ctx, &mut notices).await?;
    } else if matches!(
        plan.status.phase,
        Some(
            anneal_crds::trainingjob::TrainingPhase::Succeeded
                | anneal_crds::trainingjob::TrainingPhase::Failed
        )
    ) {
        // A finished job's workers are gone: what they needed goes too.
        let account = build::trainer_account(&job.name_any());
        let w = &ctx.writer;
        delete_child::<RoleBinding>(&Api::namespaced(client.clone(), &namespace), &account, w)
            .await?;
        delete_child::<Role>(&Api::namespaced(client.clone(), &namespace), &account, w).await?;
        delete_child::<ServiceAccount>(&Api::namespaced(client.clone(), &namespace), &account, w)
            .await?;
        delete_child::<ConfigMap>(
            &Api::namespaced(client.clone(), &namespace),
            &build::config_map_name(&job.name_any()),
            w,
        )
        .await?;
        delete_child::<Service>(
            &Api::namespaced(client.clone(), &namespace),
            &build::gang_service_name(&job.name_any()),
            w,
        )
        .await?;
    }
    if let Some(attempt) = plan.create_attempt {
        let excluded = &plan.status.excluded_nodes;
        for worker in 0..job.spec.workers {
            let pod = build::worker_pod(job, attempt, worker, excluded, &ctx.config)?;
            ensure_created(pods_api, &pod, &ctx.writer).await?;
        }
    }
    let reference = job.object_ref(&());
    ctx.writer.notices(&reference, &notices).await?;
    record_failover_metrics(job, plan, &ctx.writer.metrics);
    if let Some(reason) = plan.failover {
        tracing::info!(job = %job.name_any(), ?reason, attempt = ?plan.status.attempt, "failing over");
    }
    Ok(true)
}

/// Applies what the workers need (ServiceAccount, Role, RoleBinding, the configuration), repairs
/// drift, and says in an Event what changed.
async fn apply_workers_children(
    job: &TrainingJob,
    plan: &Plan,
    ctx: &Context,
    notices: &mut Vec<decide::Notice>,
) -> Result<(), Error> {
    let namespace = job.namespace().unwrap_or_default();
    let client = &ctx.client;
    // Before the first status write nothing was made yet: a missing child is no drift then.
    let started = job.status.as_ref().and_then(|s| s.phase).is_some();
    let mut repaired = Vec::new();
    let mut note = |kind: &'static str, applied: bool| {
        if applied {
            repaired.push(kind);
        }
    };
    let ns = || namespace.as_str();
    let sa = apply_child(
        &Api::namespaced(client.clone(), ns()),
        &build::service_account(job)?,
        &ctx.writer,
    )
    .await?;
    note("ServiceAccount", sa.drifted(started));
    let role = apply_child(
        &Api::<Role>::namespaced(client.clone(), ns()),
        &build::role(job)?,
        &ctx.writer,
    )
    .await?;
    note("Role", role.drifted(started));
    let binding = apply_child(
        &Api::<RoleBinding>::namespaced(client.clone(), ns()),
        &build::role_binding(job)?,
        &ctx.writer,
    )
    .await?;
    note("RoleBinding", binding.drifted(started));
    if job.spec.workers > 1 {
        let service = apply_child(
            &Api::<Service>::namespaced(client.clone(), ns()),
            &build::gang_service(job)?,
            &ctx.writer,
        )
        .await?;
        note("Service", service.drifted(started));
    }
    let config = build::config_map(job)?;
    let applied = apply_child(
        &Api::<ConfigMap>::namespaced(client.clone(), ns()),
        &config,
        &ctx.writer,
    )
    .await?;
    if let Applied::Repaired(old) = &applied {
        let fields = changed_spec_fields(old, &config);
        if fields.is_empty() {
            note("ConfigMap", true);
        } else {
            let attempt = plan.status.attempt.unwrap_or(1);
            notices.push(decide::Notice {
                warning: false,
                reason: "SpecChanged".into(),
                message: format!(
                    "spec.{} changed: workers started from now on run it (a running attempt {attempt} keeps the spec it started with)",
                    fields.join(", spec.")
                ),
            });
        }
    } else {
        note("ConfigMap", applied.drifted(started));
    }
    if !repaired.is_empty() {
        notices.push(decide::Notice {
            warning: true,
            reason: "Repaired".into(),
            message: format!(
                "{} of the workers differed from what the operator made (edited or deleted); applied again",
                repaired.join(", ")
            ),
        });
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
