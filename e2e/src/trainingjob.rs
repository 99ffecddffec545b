//! TrainingJob helpers shared by the cluster tests: the example job, a restricted namespace with
//! its own operator, and waiting for a job's workers.

use std::path::Path;
use std::time::Duration;

use anneal_crds::TrainingJob;
use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;

use crate::operator::OperatorProcess;
use crate::wait::wait_for_matching;
use crate::{TestNamespace, crds};

/// `manifests/examples/trainingjob.yaml` named `name`, with room for many fail-overs.
pub fn example_job(name: &str) -> Result<TrainingJob> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/trainingjob.yaml");
    let mut job: TrainingJob = serde_yaml::from_str(&std::fs::read_to_string(path)?)?;
    job.metadata.name = Some(name.to_string());
    job.spec.failover_policy.max_restarts = 20;
    Ok(job)
}

/// A test namespace that enforces the Pod Security "restricted" profile (no operator).
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
