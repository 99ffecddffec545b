//! What breaks a TrainingJob on a real cluster, against the real API server and the real operator
//! binary; nodes and pod execution simulated by kwok: a pod the kubelet refuses, a job created again
//! under a deleted one's name, a failed job's workers, children edited or deleted by hand, a spec
//! changed while running, and a stored object the operator cannot read.
//!
//! Cluster tier: `e2e/cluster/up.sh && cargo test -p anneal-e2e -- --include-ignored`.

use anneal_crds::TrainingJob;
use anneal_crds::contract::EXIT_OK;
use anneal_crds::trainingjob::{FailoverReason, TrainingPhase};
use anneal_e2e::client;
use anneal_e2e::faults::{self, RestoreOnDrop, exit_pod};
use anneal_e2e::trainingjob::{
    TIMEOUT, condition, event_seen, example_job, job_where, no_workers, node_of, phase,
    restricted_namespace, running_worker, worker,
};
use anneal_e2e::wait::wait_for;
use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::Role;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::Mutex;

/// Tests of this file that fault nodes run one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_pod_refused_by_the_kubelet_at_admission_starts_a_new_attempt_with_the_reason()
-> Result<()> {
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-admission").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &example_job("refused")?)
        .await?;
    let first = running_worker(&pods, "refused", 1, TIMEOUT).await?;
    let node = node_of(&first)?;
    // As the kubelet leaves a pod its device manager could not admit: phase Failed, a reason and
    // a message, no container that ever ran. (The pod IP that kwok gave it stays, so that kwok
    // does not start the pod again.)
    let status = json!({"status": {
        "phase": "Failed",
        "reason": "UnexpectedAdmissionError",
        "message": "Allocate failed due to requested number of devices unavailable for nvidia.com/gpu. Requested: 1, Available: 0, which is unexpected",
        "conditions": null,
        "containerStatuses": null,
    }});
    pods.patch_status(
        &worker("refused", 1),
        &PatchParams::default(),
        &Patch::Merge(&status),
    )
    .await?;

    // On 303cac8 the job stayed Pending forever here: nothing acted on such a pod.
    running_worker(&pods, "refused", 2, TIMEOUT).await?;
    let job = job_where(&jobs, "refused", "running attempt 2", |s| {
        s.attempt == Some(2) && phase(s) == Some(TrainingPhase::Running)
    })
    .await?;
    let status = job.status.context("status")?;
    let record = status.failovers.first().context("a failover record")?;
    ensure!(
        record.reason == FailoverReason::PodFailed && record.node == node,
        "{record:?}"
    );
    ensure!(status.restarts == Some(1), "counted: {:?}", status.restarts);
    let event = event_seen(&client, ns, "refused", "FailingOver").await?;
    let note = event.note.unwrap_or_default();
    ensure!(
        note.contains("UnexpectedAdmissionError") && note.contains("devices unavailable"),
        "the Event names the kubelet's reason and message: {note}"
    );
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_job_created_again_under_a_deleted_ones_name_does_not_adopt_its_pods() -> Result<()> {
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-twin").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &example_job("twin")?)
        .await?;
    running_worker(&pods, "twin", 1, TIMEOUT).await?;
    // The first job goes, its worker stays (orphaned): it still carries the job's labels.
    jobs.delete("twin", &DeleteParams::orphan()).await?;
    wait_for(&jobs, "twin", TIMEOUT, |j: Option<&TrainingJob>| {
        j.is_none()
    })
    .await?;
    let second = jobs
        .create(&PostParams::default(), &example_job("twin")?)
        .await?;
    let uid = second.uid().context("uid")?;
    // The old worker finishes and reports its model.
    let old =
        json!({"artifact": {"uri": "pvc://anneal-models/old-run", "sha256": "0ld".repeat(20)}});
    exit_pod(&client, ns, &worker("twin", 1), EXIT_OK, &old.to_string()).await?;

    // The new job runs a worker of its own, past the old one's attempt number.
    let own = running_worker(&pods, "twin", 2, TIMEOUT).await?;
    ensure!(
        own.owner_references().iter().any(|o| o.uid == uid),
        "the new worker belongs to the new job"
    );
    let job = job_where(&jobs, "twin", "running its own worker", |s| {
        phase(s) == Some(TrainingPhase::Running)
    })
    .await?;
    let status = job.status.context("status")?;
    // On 303cac8 the new job adopted the old worker and was Succeeded with its artifact.
    ensure!(
        status.artifact.is_none(),
        "the old job's artifact was adopted: {:?}",
        status.artifact
    );
    ensure!(status.attempt == Some(2), "attempt {:?}", status.attempt);
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_failed_job_deletes_its_running_workers_and_what_they_needed() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-cleanup").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut job = example_job("doomed")?;
    job.spec.failover_policy.max_restarts = 0;
    jobs.create(&PostParams::default(), &job).await?;
    let worker_pod = running_worker(&pods, "doomed", 1, TIMEOUT).await?;
    let node = node_of(&worker_pod)?;
    let _restore = RestoreOnDrop::new(&node);
    faults::mark_gpus_unhealthy(&client, &node).await?;

    let failed = job_where(&jobs, "doomed", "Failed", |s| {
        phase(s) == Some(TrainingPhase::Failed)
    })
    .await?
    .status
    .context("status")?;
    let why = condition(&failed, "Failed").context("Failed condition")?;
    ensure!(why.reason == "FailoverLimitReached", "{why:?}");
    // On 303cac8 the worker kept running (and holding its GPU) after the job failed.
    no_workers(&pods, "doomed").await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    wait_for(
        &accounts,
        "doomed-trainer",
        TIMEOUT,
        |a: Option<&ServiceAccount>| a.is_none(),
    )
    .await
    .context("the failed job's ServiceAccount stayed")?;
    faults::restore_node(&client, &node).await?;
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_children_are_repaired_and_follow_a_changed_spec() -> Result<()> {
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-drift").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let roles: Api<Role> = Api::namespaced(client.clone(), ns);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &example_job("drift")?)
        .await?;
    running_worker(&pods, "drift", 1, TIMEOUT).await?;
    let original = roles.get("drift-trainer").await?;

    // Someone widens the workers' Role: it is put back.
    let widened = json!({"rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]});
    roles
        .patch(
            "drift-trainer",
            &PatchParams::default(),
            &Patch::Merge(&widened),
        )
        .await?;
    wait_for(&roles, "drift-trainer", TIMEOUT, |r: Option<&Role>| {
        r.is_some_and(|r| r.rules == original.rules)
    })
    .await
    .context("the edited Role was not repaired")?;
    // Someone deletes it: it comes back.
    roles
        .delete("drift-trainer", &DeleteParams::default())
        .await?;
    wait_for(&roles, "drift-trainer", TIMEOUT, |r: Option<&Role>| {
        r.is_some_and(|r| r.rules == original.rules && r.uid() != original.uid())
    })
    .await
    .context("the deleted Role was not made again")?;
    event_seen(&client, ns, "drift", "Repaired").await?;

    // A hyperparameter edit reaches the workers' configuration (on 303cac8 it kept the first spec).
    let patch = json!({"spec": {"hyperparameters": {"learningRate": 0.0005}}});
    jobs.patch("drift", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_for(&maps, "drift-config", TIMEOUT, |m: Option<&ConfigMap>| {
        m.and_then(|m| m.data.as_ref())
            .and_then(|d| d.get("trainingjob.json"))
            .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
            .is_some_and(|spec| spec["hyperparameters"]["learningRate"] == json!(0.0005))
    })
    .await
    .context("the configuration kept the old learning rate")?;
    let event = event_seen(&client, ns, "drift", "SpecChanged").await?;
    let note = event.note.unwrap_or_default();
    ensure!(note.contains("spec.hyperparameters"), "{note}");
    Ok(())
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_a_stored_job_the_operator_cannot_read_does_not_stall_the_others() -> Result<()> {
    let client = client().await?;
    let (namespace, operator) = restricted_namespace(&client, "tj-unreadable").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    // The operator is stopped while the bad object is written, so that its first listing
    // already holds it (the case of an operator starting on a cluster with such an object).
    operator.kill().await?;
    jobs.create(&PostParams::default(), &example_job("unreadable")?)
        .await?;
    // The schema allows any non-negative integer; the operator's type holds 32 bits.
    let bad = json!({"status": {"restarts": 5_000_000_000u64}});
    // The answer is the stored object, which this test's type cannot read either.
    match jobs
        .patch_status("unreadable", &PatchParams::default(), &Patch::Merge(&bad))
        .await
    {
        Ok(_) | Err(kube::Error::SerdeError(_)) => {}
        Err(err) => return Err(err.into()),
    }
    jobs.create(&PostParams::default(), &example_job("readable")?)
        .await?;
    let _operator = anneal_e2e::operator::OperatorProcess::start(ns).await?;

    // On 303cac8 the listing failed as a whole and no job of the namespace was reconciled.
    running_worker(&pods, "readable", 1, TIMEOUT).await?;
    let event = event_seen(&client, ns, "unreadable", "InvalidObject").await?;
    ensure!(
        event
            .note
            .as_deref()
            .unwrap_or_default()
            .contains("cannot read"),
        "{event:?}"
    );
    // The unreadable job got no worker.
    let listed = pods
        .list(&kube::api::ListParams::default().labels("anneal.dev/trainingjob=unreadable"))
        .await?;
    ensure!(listed.items.is_empty(), "a worker for an unreadable job");
    Ok(())
}
