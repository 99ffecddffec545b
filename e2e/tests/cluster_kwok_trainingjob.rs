//! The TrainingJob controller against the real API server, with the real operator binary; nodes and
//! pod execution simulated by kwok. The tests play the runtime's part (status patches through the
//! job's own ServiceAccount, exit codes through kwok).
//!
//! Cluster tier: `e2e/cluster/up.sh && cargo test -p anneal-e2e -- --include-ignored`.

use std::path::Path;
use std::time::{Duration, Instant};

use anneal_crds::TrainingJob;
use anneal_crds::contract::EXIT_DEVICE_FAULT;
use anneal_crds::trainingjob::{FailoverReason, TrainingPhase};
use anneal_e2e::cluster::client_as;
use anneal_e2e::faults::{self, RestoreOnDrop};
use anneal_e2e::operator::OperatorProcess;
use anneal_e2e::tools::{kubectl, run};
use anneal_e2e::trainingjob::{example_job, node_of, restricted_namespace, running_worker};
use anneal_e2e::wait::{wait_for, wait_for_matching};
use anneal_e2e::{TestNamespace, client, crds};
use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::Mutex;

/// Tests of this file fail nodes that the others' workers may run on: one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

const H100: &str = "NVIDIA-H100-80GB-HBM3";
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);

async fn product_of(client: &Client, node: &str) -> Result<String> {
    let node = Api::<Node>::all(client.clone()).get(node).await?;
    Ok(node
        .labels()
        .get("nvidia.com/gpu.product")
        .cloned()
        .unwrap_or_default())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_trainingjob_example_runs_on_requested_gpu_type_under_restricted_pod_security()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-run").await?;
    let ns = namespace.name();
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/trainingjob.yaml");
    run(kubectl()?.args(["apply", "-n", ns, "-f"]).arg(&example)).await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let worker = running_worker(&pods, "arith", 1, Duration::from_secs(60)).await?;
    let node = node_of(&worker)?;
    ensure!(
        product_of(&client, &node).await? == H100,
        "worker on {node}, not an H100 node"
    );

    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let job = wait_for(
        &jobs,
        "arith",
        Duration::from_secs(30),
        |j: Option<&TrainingJob>| {
            j.and_then(|j| j.status.as_ref())
                .is_some_and(|s| s.phase == Some(TrainingPhase::Running))
        },
    )
    .await?
    .context("job gone")?;
    let status = job.status.context("status")?;
    ensure!(
        status.nodes == [node.clone()],
        "status.nodes {:?}",
        status.nodes
    );
    ensure!(status.attempt == Some(1));
    ensure!(status.observed_generation == job.metadata.generation);
    let running = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Running")
        .context("Running condition")?;
    ensure!(running.status == "True" && running.observed_generation == job.metadata.generation);
    for kind in ["serviceaccount", "role", "rolebinding", "configmap"] {
        let name = if kind == "configmap" {
            "arith-config"
        } else {
            "arith-trainer"
        };
        run(kubectl()?.args(["get", kind, name, "-n", ns])).await?;
    }
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_trainingjob_service_account_may_only_patch_its_own_status() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-rbac").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    for name in ["mine", "other"] {
        jobs.create(&PostParams::default(), &example_job(name)?)
            .await?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    running_worker(&pods, "mine", 1, Duration::from_secs(60)).await?;
    let account = format!("system:serviceaccount:{ns}:mine-trainer");

    let can_i = |verb: &'static str, resource: &'static str, extra: Vec<String>| {
        let account = account.clone();
        async move {
            let mut command = kubectl()?;
            command
                .args(["auth", "can-i", verb, resource, "-n", ns, "--as", &account])
                .args(extra);
            let out = command.output().await?;
            Ok::<bool, anyhow::Error>(String::from_utf8_lossy(&out.stdout).trim() == "yes")
        }
    };
    let status = || vec!["--subresource=status".to_string()];
    ensure!(
        can_i("patch", "trainingjobs.anneal.dev/mine", status()).await?,
        "own status"
    );
    ensure!(
        !can_i("patch", "trainingjobs.anneal.dev/other", status()).await?,
        "another job's status"
    );
    ensure!(
        !can_i("patch", "trainingjobs.anneal.dev/mine", vec![]).await?,
        "own spec"
    );
    ensure!(!can_i("get", "secrets", vec![]).await?, "secrets");
    ensure!(!can_i("create", "pods", vec![]).await?, "pods");

    // Real requests, as the runtime makes them: a merge patch of the status subresource.
    let as_trainer = client_as(Some(&account)).await?;
    let trainer_jobs: Api<TrainingJob> = Api::namespaced(as_trainer.clone(), ns);
    let progress = json!({"status": {"progress": {"step": 10, "totalSteps": 600, "stepOfTotal": "10/600", "loss": 2.5}}});
    let params = PatchParams::default();
    trainer_jobs
        .patch_status("mine", &params, &Patch::Merge(&progress))
        .await
        .context("the trainer patching its own job's status")?;
    let stored = jobs
        .get("mine")
        .await?
        .status
        .and_then(|s| s.progress)
        .context("progress stored")?;
    ensure!(stored.step == 10 && stored.step_of_total.as_deref() == Some("10/600"));
    let refused = trainer_jobs
        .patch_status("other", &params, &Patch::Merge(&progress))
        .await;
    ensure!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 403),
        "other job's status: {refused:?}"
    );
    let refused = trainer_jobs
        .patch(
            "mine",
            &params,
            &Patch::Merge(&json!({"spec": {"workers": 2}})),
        )
        .await;
    ensure!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 403),
        "own spec: {refused:?}"
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(as_trainer.clone(), ns);
    let refused = secrets.list(&Default::default()).await;
    ensure!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 403),
        "secrets: {refused:?}"
    );
    let refused = Api::<Pod>::namespaced(as_trainer, ns)
        .create(&PostParams::default(), &Pod::default())
        .await;
    ensure!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 403),
        "pods: {refused:?}"
    );
    Ok(())
}

/// How a trial breaks the worker's node or device.
#[derive(Clone, Copy, Debug)]
enum Fault {
    NodeDown,
    GpuUnhealthy,
    DeviceFaultExit,
}

impl Fault {
    fn reason(self) -> FailoverReason {
        match self {
            // The lease may go stale (15 s) before the node controller marks it NotReady, or not.
            Fault::NodeDown => FailoverReason::NodeNotReady,
            Fault::GpuUnhealthy => FailoverReason::GpuUnhealthy,
            Fault::DeviceFaultExit => FailoverReason::DeviceFault,
        }
    }
}

/// One trial: a fresh job runs on an H100 node; the fault hits it; the replacement must run on
/// another H100 node. Returns the seconds from the fault to the replacement Running.
async fn failover_trial(client: &Client, ns: &str, trial: usize, fault: Fault) -> Result<f64> {
    let name = format!("failover-{trial}");
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &example_job(&name)?)
        .await?;
    let first = running_worker(&pods, &name, 1, Duration::from_secs(60)).await?;
    let node = node_of(&first)?;
    let _restore = RestoreOnDrop::new(&node);
    let started = Instant::now();
    match fault {
        Fault::NodeDown => faults::fail_node(client, &node).await?,
        Fault::GpuUnhealthy => faults::mark_gpus_unhealthy(client, &node).await?,
        Fault::DeviceFaultExit => {
            faults::exit_pod(
                client,
                ns,
                &first.name_any(),
                EXIT_DEVICE_FAULT,
                "CUDA error: an illegal memory access",
            )
            .await?
        }
    }
    let second = running_worker(&pods, &name, 2, FAILOVER_LIMIT + Duration::from_secs(30)).await?;
    let seconds = started.elapsed().as_secs_f64();
    let new_node = node_of(&second)?;
    ensure!(new_node != node, "replacement on the failed node {node}");
    ensure!(
        product_of(client, &new_node).await? == H100,
        "replacement on {new_node}, not H100"
    );

    let job = wait_for(
        &jobs,
        &name,
        Duration::from_secs(30),
        |j: Option<&TrainingJob>| {
            j.and_then(|j| j.status.as_ref())
                .and_then(|s| s.failovers.first())
                .is_some_and(|f| f.recovered_at.is_some())
        },
    )
    .await?
    .context("job gone")?;
    let status = job.status.context("status")?;
    let record = &status.failovers[0];
    ensure!(record.node == node && record.attempt == 1, "{record:?}");
    if !matches!(fault, Fault::NodeDown) {
        ensure!(
            record.reason == fault.reason(),
            "reason {:?} for {fault:?}",
            record.reason
        );
    }
    ensure!(status.excluded_nodes.contains(&node), "{node} not excluded");
    ensure!(status.attempt == Some(2) && status.restarts == Some(1));
    // The old worker is fenced off: gone.
    let old = first.name_any();
    wait_for(&pods, &old, Duration::from_secs(30), |p: Option<&Pod>| {
        p.is_none()
    })
    .await?;
    jobs.delete(&name, &Default::default()).await?;
    Ok(seconds)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_failover_replacement_runs_on_another_gpu_node_under_30s() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let trials: usize = std::env::var("ANNEAL_FAILOVER_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-failover").await?;
    let mut report = Vec::new();
    let mut trial = 0;
    for fault in [Fault::NodeDown, Fault::GpuUnhealthy, Fault::DeviceFaultExit] {
        let mut times = Vec::new();
        for _ in 0..trials {
            trial += 1;
            let seconds = failover_trial(&client, namespace.name(), trial, fault)
                .await
                .with_context(|| format!("{fault:?} trial {trial}"))?;
            times.push(seconds);
        }
        times.sort_by(f64::total_cmp);
        let (p50, max) = (percentile(&times, 0.5), times[times.len() - 1]);
        report.push(format!(
            "{fault:?}: {} trials, p50 {p50:.1} s, max {max:.1} s",
            times.len()
        ));
        ensure!(
            max < FAILOVER_LIMIT.as_secs_f64(),
            "{fault:?}: failover took {max:.1} s: {times:?}"
        );
    }
    println!(
        "failover from the fault to the replacement Running:\n{}",
        report.join("\n")
    );
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_two_operator_replicas_one_leads_and_the_other_takes_over_when_it_dies() -> Result<()>
{
    use k8s_openapi::api::coordination::v1::Lease;
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    crds::install().await?;
    let namespace = TestNamespace::create(&client, "tj-leader").await?;
    let ns = namespace.name();
    anneal_e2e::trainingjob::models_claim(&client, ns).await?;
    let elect = ["--leader-elect", "--lease-namespace", ns];
    let first = OperatorProcess::start_with(ns, &elect).await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let holder = |l: Option<&Lease>| {
        l.and_then(|l| l.spec.as_ref())
            .and_then(|s| s.holder_identity.clone())
    };
    let lease = wait_for(
        &leases,
        "anneal-operator",
        Duration::from_secs(30),
        |l: Option<&Lease>| holder(l).is_some(),
    )
    .await?;
    let leader = holder(lease.as_ref()).context("holder")?;
    let second = OperatorProcess::start_with(ns, &elect).await?;

    // The first replica reconciles.
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &example_job("before")?)
        .await?;
    running_worker(&pods, "before", 1, Duration::from_secs(60)).await?;
    let still = holder(leases.get_opt("anneal-operator").await?.as_ref());
    ensure!(
        still.as_deref() == Some(leader.as_str()),
        "the lease moved while its holder lived: {still:?}"
    );

    // The leader dies (SIGKILL): the other takes the lease once it expires, and reconciles.
    first.kill().await?;
    let taken = wait_for(
        &leases,
        "anneal-operator",
        Duration::from_secs(40),
        |l: Option<&Lease>| holder(l).is_some_and(|h| h != leader),
    )
    .await?;
    let transitions = taken.and_then(|l| l.spec).and_then(|s| s.lease_transitions);
    ensure!(transitions == Some(1), "lease transitions {transitions:?}");
    jobs.create(&PostParams::default(), &example_job("after")?)
        .await?;
    running_worker(&pods, "after", 1, Duration::from_secs(60)).await?;
    drop(second);
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_deleted_worker_and_service_account_are_recreated() -> Result<()> {
    use k8s_openapi::api::core::v1::ServiceAccount;
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-recreate").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &example_job("owned")?)
        .await?;
    let worker = running_worker(&pods, "owned", 1, Duration::from_secs(60)).await?;

    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let old_uid = accounts.get("owned-trainer").await?.metadata.uid;
    accounts
        .delete("owned-trainer", &Default::default())
        .await?;
    wait_for(
        &accounts,
        "owned-trainer",
        Duration::from_secs(30),
        |sa: Option<&ServiceAccount>| sa.is_some_and(|sa| sa.metadata.uid != old_uid),
    )
    .await
    .context("the ServiceAccount was not recreated")?;

    let old_uid = worker.metadata.uid.clone();
    pods.delete(&worker.name_any(), &Default::default()).await?;
    let again = wait_for_matching(
        &pods,
        watcher::Config::default().labels("anneal.dev/trainingjob=owned"),
        "a recreated worker",
        Duration::from_secs(60),
        |p: &Pod| {
            p.metadata.uid != old_uid
                && p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        },
    )
    .await?;
    let listed = pods
        .list(&kube::api::ListParams::default().labels("anneal.dev/trainingjob=owned"))
        .await?;
    let live = listed
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .count();
    ensure!(live == 1, "expected exactly one worker, found {live}");
    ensure!(
        again
            .labels()
            .get("anneal.dev/trainingjob")
            .map(String::as_str)
            == Some("owned")
    );
    Ok(())
}
