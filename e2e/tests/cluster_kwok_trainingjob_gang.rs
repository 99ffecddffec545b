//! Data-parallel TrainingJobs (`workers: N`) against the real API server, scheduler and
//! controller-manager with the real operator binary; nodes and pod execution simulated by kwok
//! (e2e/cluster/kwok/nodes.yaml: gpu-a100-0/1, gpu-h100-0/1, cpu-0).
//!
//! - A gang of 2 is placed on two distinct GPU nodes, with rank, world size and rendezvous in
//!   its env, host names under a headless Service that publishes not-ready addresses (its
//!   EndpointSlice names both workers), and status.gang showing each worker's node.
//! - One worker's node dies: both workers of the attempt are deleted, attempt 2 starts both
//!   again on healthy distinct nodes away from the dead one, and a status report of attempt 1
//!   is refused by the API server (fenced).
//! - A gang of 3 that asks for H100 nodes (there are 2) releases its workers after its
//!   placement timeout and says why in the GangPlaced condition.
//! - A gang whose checkpoint claim is ReadWriteOnce is held Pending with no worker, says why in
//!   StorageShared and an Event, and starts once its spec names a ReadWriteMany claim.
//!
//! Cluster tier: `e2e/cluster/up.sh && cargo test -p anneal-e2e --test cluster_kwok_trainingjob_gang -- --include-ignored`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anneal_crds::TrainingJob;
use anneal_crds::common::GpuType;
use anneal_crds::contract;
use anneal_crds::trainingjob::{
    CheckpointRecord, CheckpointStorage, GangState, TrainingPhase, TrainingProgress,
};
use anneal_e2e::client;
use anneal_e2e::cluster::client_as;
use anneal_e2e::faults::{self, RestoreOnDrop};
use anneal_e2e::trainingjob::{
    MODELS_CLAIM, TIMEOUT, attempt_label, condition, event_seen, example_job, is_live_running,
    job_where, node_of, restricted_namespace, selector,
};
use anneal_e2e::wait::wait_for_set;
use anneal_runtime::train::status::{PatchOutcome, send_status_patch, status_patch};
use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio::sync::Mutex;

/// A test of this file kills a node: one at a time in this binary.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// The example job as a gang of `workers`, its checkpoints on the namespace's ReadWriteMany
/// models claim (a gang needs a claim every worker resumes from).
fn gang_job(name: &str, workers: u32, gpu_type: GpuType) -> Result<TrainingJob> {
    let mut job = example_job(name)?;
    job.spec.workers = workers;
    job.spec.resources.gpu_type = gpu_type;
    job.spec.checkpoint.storage = Some(CheckpointStorage {
        pvc: Some(MODELS_CLAIM.into()),
        uri: None,
    });
    Ok(job)
}

/// Waits until `job` has exactly `count` live Running workers, all of `attempt` and no other pod;
/// returns them by rank.
async fn gang_running(pods: &Api<Pod>, job: &str, attempt: u32, count: usize) -> Result<Vec<Pod>> {
    let what = format!("{job}: {count} Running workers of attempt {attempt}, no other pod");
    let set = wait_for_set(pods, selector(job), &what, TIMEOUT, |set: &[Arc<Pod>]| {
        set.len() == count
            && set
                .iter()
                .all(|p| is_live_running(p) && attempt_label(p) == Some(attempt))
    })
    .await?;
    let mut workers: Vec<Pod> = set.iter().map(|p| Pod::clone(p)).collect();
    workers.sort_by_key(|p| p.name_any());
    Ok(workers)
}

fn env_of(pod: &Pod, name: &str) -> Option<String> {
    pod.spec.as_ref()?.containers[0]
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

/// Checks the workers of `attempt` of gang `job` in `ns`: names, env, host names, distinct nodes;
/// returns their nodes by rank.
fn check_gang(workers: &[Pod], job: &str, ns: &str, attempt: u32) -> Result<Vec<String>> {
    let mut nodes = Vec::new();
    for (rank, pod) in workers.iter().enumerate() {
        ensure!(
            pod.name_any() == format!("{job}-a{attempt}-w{rank}"),
            "{}",
            pod.name_any()
        );
        ensure!(env_of(pod, contract::ENV_RANK) == Some(rank.to_string()));
        ensure!(env_of(pod, contract::ENV_WORLD_SIZE) == Some(workers.len().to_string()));
        ensure!(
            env_of(pod, contract::ENV_RENDEZVOUS)
                == Some(format!("a{attempt}-w0.{job}-workers.{ns}.svc:29500")),
            "rendezvous {:?}",
            env_of(pod, contract::ENV_RENDEZVOUS)
        );
        let spec = pod.spec.as_ref().context("pod spec")?;
        ensure!(spec.hostname.as_deref() == Some(&*format!("a{attempt}-w{rank}")));
        ensure!(spec.subdomain.as_deref() == Some(&*format!("{job}-workers")));
        nodes.push(node_of(pod)?);
    }
    let distinct: BTreeSet<&String> = nodes.iter().collect();
    ensure!(
        distinct.len() == nodes.len(),
        "workers share a node: {nodes:?}"
    );
    Ok(nodes)
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_gang_runs_on_distinct_nodes_with_its_headless_service_and_env() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-gang").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &gang_job("dp", 2, GpuType::Any)?)
        .await
        .context("the API server accepts workers: 2")?;

    let workers = gang_running(&pods, "dp", 1, 2).await?;
    let nodes = check_gang(&workers, "dp", ns, 1)?;
    // A gang's name leaves room for its Service's: refused by the API server when it does not.
    let long = "g".repeat(56);
    let refused = jobs
        .create(&PostParams::default(), &gang_job(&long, 2, GpuType::Any)?)
        .await;
    ensure!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains("at most 55 characters")),
        "a 56-character gang name: {refused:?}"
    );

    let service = Api::<Service>::namespaced(client.clone(), ns)
        .get("dp-workers")
        .await?;
    let spec = service.spec.context("service spec")?;
    ensure!(
        spec.cluster_ip.as_deref() == Some("None"),
        "{:?}",
        spec.cluster_ip
    );
    ensure!(spec.publish_not_ready_addresses == Some(true));
    ensure!(
        service.metadata.owner_references.unwrap_or_default()[0].kind == "TrainingJob",
        "the Service is owned by its job"
    );
    // What cluster DNS serves: both workers, under their host names.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let what = "the gang's EndpointSlice naming both workers";
    let hostnames_of = |slices: &[Arc<EndpointSlice>]| -> BTreeSet<String> {
        slices
            .iter()
            .flat_map(|s| s.endpoints.iter().filter_map(|e| e.hostname.clone()))
            .collect()
    };
    let seen = wait_for_set(
        &slices,
        watcher::Config::default().labels("kubernetes.io/service-name=dp-workers"),
        what,
        Duration::from_secs(30),
        |set| hostnames_of(set).len() == 2,
    )
    .await?;
    let hostnames = hostnames_of(&seen);
    ensure!(
        hostnames == BTreeSet::from(["a1-w0".to_string(), "a1-w1".to_string()]),
        "{what}: {hostnames:?}"
    );

    let job = job_where(&jobs, "dp", "Running with both workers placed", |s| {
        s.phase == Some(TrainingPhase::Running)
            && s.gang
                .as_ref()
                .is_some_and(|g| g.state == GangState::Placed)
    })
    .await?;
    let status = job.status.context("status")?;
    let gang = status.gang.clone().context("status.gang")?;
    ensure!(gang.placed == 2);
    let reported: Vec<String> = gang.workers.iter().filter_map(|w| w.node.clone()).collect();
    ensure!(
        reported == nodes,
        "status.gang {reported:?}, pods on {nodes:?}"
    );
    let mut sorted = nodes.clone();
    sorted.sort();
    ensure!(status.nodes == sorted, "status.nodes {:?}", status.nodes);
    let placed = condition(&status, "GangPlaced").context("GangPlaced")?;
    ensure!(placed.status == "True", "{placed:?}");
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_gang_worker_node_dies_whole_gang_is_replaced_and_fenced() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-gang-fail").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &gang_job("dp", 2, GpuType::Any)?)
        .await?;
    let first = gang_running(&pods, "dp", 1, 2).await?;
    let nodes = check_gang(&first, "dp", ns, 1)?;
    let uid = jobs.get("dp").await?.uid().context("job uid")?;
    let trainer = client_as(Some(&format!("system:serviceaccount:{ns}:dp-trainer"))).await?;
    let report = |attempt: u32, step: u64| {
        status_patch(
            attempt.into(),
            Some(&uid),
            Some(&TrainingProgress::at(step, 600)),
            Some(&CheckpointRecord {
                step,
                attempt,
                uri: format!("file:///checkpoints/step-{step:08}"),
                time: None,
            }),
        )
    };
    ensure!(
        send_status_patch(trainer.clone(), ns, "dp", &report(1, 10)).await?
            == PatchOutcome::Applied
    );

    // Rank 1's node dies.
    let dead = nodes[1].clone();
    let _restore = RestoreOnDrop::new(&dead);
    faults::fail_node(&client, &dead).await?;

    // Both workers of attempt 1 go (rank 0's node is healthy: it is deleted all the same), and
    // attempt 2 runs both ranks, away from the dead node.
    let second = gang_running(&pods, "dp", 2, 2).await?;
    let new_nodes = check_gang(&second, "dp", ns, 2)?;
    ensure!(
        !new_nodes.contains(&dead),
        "attempt 2 on the dead node {dead}: {new_nodes:?}"
    );
    let job = job_where(&jobs, "dp", "attempt 2 running, fail-over recorded", |s| {
        s.attempt == Some(2)
            && s.phase == Some(TrainingPhase::Running)
            && s.failovers
                .first()
                .is_some_and(|f| f.recovered_at.is_some())
    })
    .await?;
    let status = job.status.context("status")?;
    ensure!(status.restarts == Some(1), "restarts {:?}", status.restarts);
    let record = &status.failovers[0];
    ensure!(record.node == dead && record.attempt == 1, "{record:?}");
    ensure!(status.excluded_nodes.contains(&dead));
    let gang = status.gang.context("status.gang")?;
    ensure!(gang.state == GangState::Placed && gang.workers[0].pod == "dp-a2-w0");

    // Attempt 1's rank 0 still runs on its partitioned-off healthy node and reports: fenced.
    match send_status_patch(trainer.clone(), ns, "dp", &report(1, 20)).await? {
        PatchOutcome::Fenced(_) => {}
        PatchOutcome::Applied => {
            bail!("a status report of attempt 1 applied after attempt 2 started")
        }
    }
    ensure!(send_status_patch(trainer, ns, "dp", &report(2, 20)).await? == PatchOutcome::Applied);
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_gang_that_cannot_be_placed_releases_its_workers_and_says_why() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-gang-wide").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    // Three workers on distinct H100 nodes: the cluster has two.
    let mut job = gang_job("wide", 3, GpuType::H100)?;
    job.spec.failover_policy.gang_placement_timeout_seconds = Some(10);
    jobs.create(&PostParams::default(), &job).await?;

    let job = job_where(&jobs, "wide", "the gang released", |s| {
        s.gang
            .as_ref()
            .is_some_and(|g| g.state == GangState::Released)
    })
    .await?;
    let status = job.status.context("status")?;
    let placed = condition(&status, "GangPlaced").context("GangPlaced")?;
    ensure!(
        placed.status == "False" && placed.reason == "GangUnplaceable",
        "{placed:?}"
    );
    ensure!(
        placed
            .message
            .contains("2 of 3 workers of attempt 1 were placed within 10s"),
        "{}",
        placed.message
    );
    ensure!(status.attempt == Some(2) && status.restarts.is_none());
    // Nothing of attempt 1 holds a GPU any more.
    wait_for_set(
        &pods,
        selector("wide"),
        "attempt 1 released",
        TIMEOUT,
        |set: &[Arc<Pod>]| set.iter().all(|p| attempt_label(p) != Some(1)),
    )
    .await?;
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_gang_on_a_read_write_once_claim_waits_with_a_reason_until_its_claim_is_shared()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-gang-rwo").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    // A claim one node at a time can mount (left unbound: the operator reads only its spec).
    let rwo: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "scratch"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }))?;
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &rwo)
        .await?;
    let mut job = gang_job("rwo", 2, GpuType::Any)?;
    job.spec.checkpoint.storage = Some(CheckpointStorage {
        pvc: Some("scratch".into()),
        uri: None,
    });
    jobs.create(&PostParams::default(), &job).await?;

    let held = job_where(&jobs, "rwo", "held on its ReadWriteOnce claim", |s| {
        condition(s, "StorageShared").is_some_and(|c| c.status == "False")
    })
    .await?;
    let status = held.status.context("status")?;
    let shared = condition(&status, "StorageShared").context("StorageShared")?;
    ensure!(
        shared.reason == "ClaimNotShared"
            && shared.message.contains("scratch")
            && shared.message.contains("ReadWriteMany"),
        "{shared:?}"
    );
    ensure!(status.phase == Some(TrainingPhase::Pending), "{status:?}");
    let event = event_seen(&client, ns, "rwo", "ClaimNotShared").await?;
    ensure!(event.type_.as_deref() == Some("Warning"), "{event:?}");
    // The operator decided, and created no worker: none ever sits in ContainerCreating on a
    // claim its node cannot attach.
    let listed = pods.list(&selector_params("rwo")).await?;
    ensure!(
        listed.items.is_empty(),
        "workers created: {:?}",
        names(&listed.items)
    );

    // The user points the job at the shared claim; the gang starts.
    let patch = serde_json::json!({"spec": {"checkpoint": {"storage": {"pvc": MODELS_CLAIM}}}});
    jobs.patch("rwo", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    gang_running(&pods, "rwo", 1, 2).await?;
    let job = job_where(&jobs, "rwo", "StorageShared", |s| {
        condition(s, "StorageShared").is_some_and(|c| c.status == "True")
    })
    .await?;
    let shared = condition(job.status.as_ref().context("status")?, "StorageShared")
        .context("StorageShared")?;
    ensure!(shared.message.contains(MODELS_CLAIM), "{shared:?}");
    Ok(())
}

fn selector_params(job: &str) -> kube::api::ListParams {
    kube::api::ListParams::default().labels(&format!("anneal.dev/trainingjob={job}"))
}

fn names(pods: &[Pod]) -> Vec<String> {
    pods.iter().map(ResourceExt::name_any).collect()
}
