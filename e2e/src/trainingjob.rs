//! TrainingJob helpers shared by the cluster tests: the example job, a restricted namespace with
//! its own operator, and waiting for a job's workers.

use std::path::Path;
use std::time::Duration;

use std::sync::Arc;

use anneal_crds::TrainingJob;
use anneal_crds::trainingjob::{TrainingJobStatus, TrainingPhase};
use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::operator::OperatorProcess;
use crate::wait::{wait_for, wait_for_matching, wait_for_set};

/// How long the TrainingJob tests wait for one thing to happen.
pub const TIMEOUT: Duration = Duration::from_secs(60);
use crate::{TestNamespace, crds};

/// `manifests/examples/trainingjob.yaml` named `name`, with room for many fail-overs.
pub fn example_job(name: &str) -> Result<TrainingJob> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/trainingjob.yaml");
    let mut job: TrainingJob = serde_yaml::from_str(&std::fs::read_to_string(path)?)?;
    job.metadata.name = Some(name.to_string());
    job.spec.failover_policy.max_restarts = 20;
    Ok(job)
}

/// The claim the example jobs write their model to (`pvc://anneal-models/...`).
pub const MODELS_CLAIM: &str = "anneal-models";

/// Creates claim [`MODELS_CLAIM`] in `namespace`, bound to a PersistentVolume of its own (the
/// local cluster has no provisioner; kwok never mounts it). The volume is owned by the namespace,
/// so the garbage collector removes it with the namespace.
pub async fn models_claim(client: &Client, namespace: &str) -> Result<()> {
    let ns = Api::<Namespace>::all(client.clone()).get(namespace).await?;
    let volume_name = format!("{MODELS_CLAIM}-{namespace}");
    let volume: PersistentVolume = serde_json::from_value(json!({
        "metadata": {
            "name": volume_name,
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Namespace", "name": namespace,
                "uid": ns.metadata.uid.context("namespace uid")?,
            }],
        },
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": format!("/tmp/anneal-kwok/{namespace}")},
            "claimRef": {"namespace": namespace, "name": MODELS_CLAIM},
        },
    }))?;
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &volume)
        .await
        .context("creating the models volume")?;
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": MODELS_CLAIM},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "volumeName": volume_name,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }))?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    claims
        .create(&PostParams::default(), &claim)
        .await
        .context("creating the models claim")?;
    wait_for(
        &claims,
        MODELS_CLAIM,
        Duration::from_secs(60),
        |c: Option<&PersistentVolumeClaim>| {
            c.and_then(|c| c.status.as_ref())
                .and_then(|s| s.phase.as_deref())
                == Some("Bound")
        },
    )
    .await
    .context("the models claim never bound")?;
    Ok(())
}

/// A test namespace that enforces the Pod Security "restricted" profile, with the models claim
/// (no operator).
pub async fn restricted_namespace_only(client: &Client, test: &str) -> Result<TestNamespace> {
    crds::install().await?;
    let namespace = TestNamespace::create(client, test).await?;
    let label =
        json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}});
    Api::<Namespace>::all(client.clone())
        .patch(
            namespace.name(),
            &PatchParams::default(),
            &Patch::Merge(&label),
        )
        .await?;
    models_claim(client, namespace.name()).await?;
    Ok(namespace)
}

/// A test namespace that enforces the Pod Security "restricted" profile, with an operator for it.
pub async fn restricted_namespace(
    client: &Client,
    test: &str,
) -> Result<(TestNamespace, OperatorProcess)> {
    let namespace = restricted_namespace_only(client, test).await?;
    let operator = OperatorProcess::start(namespace.name()).await?;
    Ok((namespace, operator))
}

/// Whether `pod` is Running and not being deleted.
pub fn is_live_running(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// Waits for a Running worker of `job` with attempt `attempt`; returns it.
pub async fn running_worker(
    pods: &Api<Pod>,
    job: &str,
    attempt: u32,
    timeout: Duration,
) -> Result<Pod> {
    let selector = format!("anneal.dev/trainingjob={job},anneal.dev/attempt={attempt}");
    let what = format!("a Running worker of {job}, attempt {attempt}");
    wait_for_matching(
        pods,
        watcher::Config::default().labels(&selector),
        &what,
        timeout,
        is_live_running,
    )
    .await
}

/// The node a pod was scheduled to.
pub fn node_of(pod: &Pod) -> Result<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .context("worker not scheduled")
}

/// Selects the pods of TrainingJob `job`.
pub fn selector(job: &str) -> watcher::Config {
    watcher::Config::default().labels(&format!("anneal.dev/trainingjob={job}"))
}

/// The attempt a worker pod belongs to.
pub fn attempt_label(pod: &Pod) -> Option<u32> {
    pod.labels().get("anneal.dev/attempt")?.parse().ok()
}

/// The phase of a status.
pub fn phase(status: &TrainingJobStatus) -> Option<TrainingPhase> {
    status.phase
}

/// The condition of `type_` in a status.
pub fn condition<'a>(
    status: &'a TrainingJobStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// Waits until the job's status satisfies `predicate`; returns the job.
pub async fn job_where(
    jobs: &Api<TrainingJob>,
    name: &str,
    what: &str,
    predicate: impl Fn(&TrainingJobStatus) -> bool,
) -> Result<TrainingJob> {
    wait_for(jobs, name, TIMEOUT, |job: Option<&TrainingJob>| {
        job.and_then(|j| j.status.as_ref()).is_some_and(&predicate)
    })
    .await
    .with_context(|| format!("{name}: {what}"))?
    .with_context(|| format!("{name} is gone"))
}

/// Waits until `job` has exactly `count` live Running workers, all of attempt `attempt`, and no
/// other pod at all (older attempts deleted, nothing duplicated).
pub async fn workers_settle(pods: &Api<Pod>, job: &str, attempt: u32, count: usize) -> Result<()> {
    let what =
        format!("{job}: exactly {count} Running worker(s) of attempt {attempt}, no other pod");
    wait_for_set(pods, selector(job), &what, TIMEOUT, |set: &[Arc<Pod>]| {
        set.len() == count
            && set
                .iter()
                .all(|p| is_live_running(p) && attempt_label(p) == Some(attempt))
    })
    .await?;
    Ok(())
}

/// Waits until `job` has no pod left.
pub async fn no_workers(pods: &Api<Pod>, job: &str) -> Result<()> {
    let what = format!("{job}: no pod left");
    wait_for_set(pods, selector(job), &what, TIMEOUT, <[Arc<Pod>]>::is_empty).await?;
    Ok(())
}

/// Waits for an Event of `reason` about job `name`; returns it.
pub async fn event_seen(client: &Client, ns: &str, name: &str, reason: &str) -> Result<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let what = format!("a {reason} Event about {name}");
    let matches = |e: &Event| {
        e.reason.as_deref() == Some(reason)
            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
    };
    let set = wait_for_set(
        &events,
        watcher::Config::default(),
        &what,
        TIMEOUT,
        |set: &[Arc<Event>]| set.iter().any(|e| matches(e)),
    )
    .await?;
    set.iter()
        .find(|e| matches(e))
        .map(|e| Event::clone(e))
        .context("event vanished")
}

/// Name of the single worker of `attempt`.
pub fn worker(job: &str, attempt: u32) -> String {
    format!("{job}-a{attempt}-w0")
}
