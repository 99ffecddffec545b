//! A healthy node whose Lease is renewed every 10 s, as a stock kubelet renews it, is never taken
//! for a dead one: a TrainingJob with the default `nodeLeaseTimeoutSeconds` runs on it for two
//! minutes without a failover. The Lease is renewed by the test with real PATCH requests
//! (`anneal_e2e::node_lease`), not by kwok, which renews every 2.5 s on the test cluster.
//!
//! Cluster tier: `e2e/cluster/up.sh && cargo test -p anneal-e2e -- --include-ignored`.

use std::time::Duration;

use anneal_crds::TrainingJob;
use anneal_crds::trainingjob::{FailoverPolicy, TrainingPhase};
use anneal_e2e::client;
use anneal_e2e::node_lease::{KUBELET_RENEW_INTERVAL, KubeletLease, NODE_LEASE_NAMESPACE};
use anneal_e2e::trainingjob::{
    TIMEOUT, example_job, job_where, node_of, restricted_namespace, running_worker, selector,
};
use anneal_e2e::wait::conditions::node_ready_status;
use anneal_e2e::wait::wait_for;
use anyhow::{Context, Result, bail, ensure};
use futures::TryStreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, watch_object, watcher};
use kube::{Api, ResourceExt};

const JOB: &str = "steady";
/// How long the node is watched with 10 s renewals.
const WINDOW: Duration = Duration::from_secs(120);

/// The first sign of a failover of the job: a failover record, another attempt, or a phase that
/// is not Running.
async fn job_failover(jobs: &Api<TrainingJob>) -> Result<String> {
    let mut events = std::pin::pin!(watch_object(jobs.clone(), JOB));
    while let Some(job) = events.try_next().await? {
        let Some(status) = job.and_then(|j| j.status) else {
            return Ok("the job or its status is gone".into());
        };
        if !status.failovers.is_empty()
            || status.attempt != Some(1)
            || status.phase != Some(TrainingPhase::Running)
        {
            return Ok(format!(
                "phase {:?}, attempt {:?}, failovers {:?}",
                status.phase, status.attempt, status.failovers
            ));
        }
    }
    bail!("the watch of the job ended")
}

/// The first change of the job's pods other than the worker running on: a pod deleted, being
/// deleted, not Running, or another pod.
async fn worker_disturbed(pods: &Api<Pod>, worker_uid: &str) -> Result<String> {
    let mut events = std::pin::pin!(watcher(pods.clone(), selector(JOB)));
    while let Some(event) = events.try_next().await? {
        match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                let running =
                    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                if pod.uid().as_deref() != Some(worker_uid)
                    || pod.metadata.deletion_timestamp.is_some()
                    || !running
                {
                    return Ok(format!("pod {} changed: {:?}", pod.name_any(), pod.status));
                }
            }
            watcher::Event::Delete(pod) => return Ok(format!("pod {} deleted", pod.name_any())),
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
    bail!("the watch of the job's pods ended")
}

/// The node's Ready condition leaving True (kube-controller-manager judging it dead).
async fn node_not_ready(nodes: &Api<Node>, node: &str) -> Result<String> {
    let mut events = std::pin::pin!(watch_object(nodes.clone(), node));
    while let Some(n) = events.try_next().await? {
        let ready = n.as_ref().and_then(node_ready_status).map(str::to_owned);
        if ready.as_deref() != Some("True") {
            return Ok(format!("node {node} Ready is {ready:?}"));
        }
    }
    bail!("the watch of node {node} ended")
}

/// Records every renewal of the node's Lease seen, (renewTime, holder), until the watch fails.
async fn record_renewals(
    leases: &Api<Lease>,
    node: &str,
    seen: &mut Vec<(Timestamp, Option<String>)>,
) -> Result<String> {
    let mut events = std::pin::pin!(watch_object(leases.clone(), node));
    while let Some(lease) = events.try_next().await? {
        let spec = lease.and_then(|l| l.spec).unwrap_or_default();
        let Some(renewed) = spec.renew_time.map(|t| t.0) else {
            continue;
        };
        if seen.last().is_none_or(|(last, _)| *last != renewed) {
            seen.push((renewed, spec.holder_identity));
        }
    }
    bail!("the watch of the Lease of {node} ended")
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_healthy_node_renewing_its_lease_every_10s_is_not_failed_over_in_2_minutes()
-> Result<()> {
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-lease-10s").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), NODE_LEASE_NAMESPACE);

    // The example job without nodeLeaseTimeoutSeconds: the default applies.
    let mut job = serde_json::to_value(example_job(JOB)?)?;
    job["spec"]["failoverPolicy"]
        .as_object_mut()
        .context("failoverPolicy")?
        .remove("nodeLeaseTimeoutSeconds");
    jobs.patch(JOB, &PatchParams::apply("anneal-e2e"), &Patch::Apply(&job))
        .await?;
    let timeout = jobs
        .get(JOB)
        .await?
        .spec
        .failover_policy
        .node_lease_timeout_seconds;
    ensure!(
        timeout == FailoverPolicy::default().node_lease_timeout_seconds,
        "nodeLeaseTimeoutSeconds {timeout} is not the default"
    );
    ensure!(
        u64::from(timeout) > KUBELET_RENEW_INTERVAL.as_secs(),
        "the default lease timeout {timeout} s is not longer than a kubelet's renewal"
    );
    let worker = running_worker(&pods, JOB, 1, TIMEOUT).await?;
    let node = node_of(&worker)?;
    let worker_uid = worker.uid().context("worker uid")?;
    job_where(&jobs, JOB, "Running", |s| {
        s.phase == Some(TrainingPhase::Running)
    })
    .await?;

    let lease = KubeletLease::take_over(&client, &node, KUBELET_RENEW_INTERVAL).await?;
    let mut renewals = Vec::new();
    // Each watch runs for the whole window, unless it sees what must not happen.
    let watching = async {
        tokio::select! {
            seen = job_failover(&jobs) => seen,
            seen = worker_disturbed(&pods, &worker_uid) => seen,
            seen = node_not_ready(&nodes, &node) => seen,
            ended = record_renewals(&leases, &node, &mut renewals) => ended,
        }
    };
    if let Ok(seen) = tokio::time::timeout(WINDOW, watching).await {
        bail!(
            "within {WINDOW:?} of 10 s Lease renewals on {node}: {}",
            seen?
        );
    }
    let errors = lease.errors();
    ensure!(
        errors.is_empty(),
        "renewing the Lease of {node}: {errors:?}"
    );

    // The Lease really was renewed every 10 s, by the test's holder alone (kwok renewing in
    // between would make the test pointless).
    ensure!(
        renewals
            .iter()
            .all(|(_, holder)| holder.as_deref() == Some(node.as_str())),
        "another holder renewed the Lease of {node}: {renewals:?}"
    );
    let gaps: Vec<f64> = renewals
        .windows(2)
        .map(|w| w[1].0.duration_since(w[0].0).as_secs_f64())
        .collect();
    println!(
        "Lease of {node} renewed {} times, gaps {gaps:.2?} s",
        renewals.len()
    );
    ensure!(
        gaps.len() >= 10 && gaps.iter().all(|g| (9.5..11.0).contains(g)),
        "the Lease of {node} was not renewed every 10 s: gaps {gaps:?}"
    );

    // And the job ran on, untouched.
    let status = jobs.get(JOB).await?.status.context("status")?;
    ensure!(
        status.failovers.is_empty(),
        "failovers {:?}",
        status.failovers
    );
    ensure!(status.attempt == Some(1) && status.restarts.unwrap_or(0) == 0);
    ensure!(
        status.excluded_nodes.is_empty(),
        "excluded {:?}",
        status.excluded_nodes
    );
    let now = pods.get(&worker.name_any()).await?;
    ensure!(now.uid().as_deref() == Some(worker_uid.as_str()));

    // kwok takes the Lease (and the node) back.
    lease.hand_back().await?;
    wait_for(&leases, &node, TIMEOUT, |l: Option<&Lease>| {
        l.and_then(|l| l.spec.as_ref())
            .and_then(|s| s.holder_identity.as_deref())
            .is_some_and(|h| h != node)
    })
    .await
    .context("kwok did not take the Lease back")?;
    Ok(())
}
