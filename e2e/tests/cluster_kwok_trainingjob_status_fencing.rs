//! The runtime's status reports are fenced by the API server: the real reporter code
//! (`anneal_runtime::train::status`) sends its JSON patches, as the worker's own ServiceAccount, to
//! a TrainingJob run by the real operator binary (nodes and pods simulated by kwok). A patch from a
//! stale attempt (a worker on a partitioned node that still runs) or for a job deleted and created
//! again under the same name is refused, and what the current attempt reported stays.
//!
//! Cluster tier: `e2e/cluster/up.sh && cargo test -p anneal-e2e -- --include-ignored`.

use anneal_crds::TrainingJob;
use anneal_crds::contract::EXIT_DEVICE_FAULT;
use anneal_crds::trainingjob::{CheckpointRecord, TrainingProgress};
use anneal_e2e::client;
use anneal_e2e::cluster::client_as;
use anneal_e2e::faults::exit_pod;
use anneal_e2e::trainingjob::{
    TIMEOUT, example_job, job_where, restricted_namespace, running_worker, worker,
};
use anneal_e2e::wait::wait_for;
use anneal_runtime::train::status::{PatchOutcome, send_status_patch, status_patch};
use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client, ResourceExt};

const JOB: &str = "fenced";

/// What attempt `attempt` of the job reports at `step`: its progress and the checkpoint it wrote.
fn report(attempt: u32, step: u64) -> (TrainingProgress, CheckpointRecord) {
    let progress = TrainingProgress::at(step, 600);
    let checkpoint = CheckpointRecord {
        step,
        attempt,
        uri: format!("file:///checkpoints/step-{step:08}"),
        time: None,
    };
    (progress, checkpoint)
}

/// Sends the runtime's fenced status patch for (`attempt`, `uid`) reporting `step`, as the worker
/// does; what the API server did with it.
async fn send(
    trainer: &Client,
    ns: &str,
    attempt: u32,
    uid: &str,
    step: u64,
) -> Result<PatchOutcome> {
    let (progress, checkpoint) = report(attempt, step);
    let patch = status_patch(
        attempt.into(),
        Some(uid),
        Some(&progress),
        Some(&checkpoint),
    );
    send_status_patch(trainer.clone(), ns, JOB, &patch)
        .await
        .with_context(|| format!("status patch of attempt {attempt} (uid {uid}) at step {step}"))
}

/// The job's reported (step of progress, step and attempt of lastCheckpoint), as stored.
async fn stored_report(jobs: &Api<TrainingJob>) -> Result<(Option<u64>, Option<(u64, u32)>)> {
    let status = jobs.get(JOB).await?.status.unwrap_or_default();
    Ok((
        status.progress.map(|p| p.step),
        status.last_checkpoint.map(|c| (c.step, c.attempt)),
    ))
}

fn ensure_fenced(outcome: &PatchOutcome, what: &str) -> Result<()> {
    match outcome {
        PatchOutcome::Fenced(message) => {
            println!("{what}: refused: {message}");
            Ok(())
        }
        PatchOutcome::Applied => anyhow::bail!("{what}: the API server applied it"),
    }
}

#[tokio::test]
#[ignore = "cluster tier: needs e2e/cluster/up.sh"]
async fn kwok_api_server_refuses_status_patches_of_a_stale_attempt_or_a_recreated_job() -> Result<()>
{
    let client = client().await?;
    let (namespace, _operator) = restricted_namespace(&client, "tj-fencing").await?;
    let ns = namespace.name();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &example_job(JOB)?)
        .await?;
    let first = running_worker(&pods, JOB, 1, TIMEOUT).await?;
    let uid = jobs.get(JOB).await?.uid().context("job uid")?;
    // The worker's identity: the ServiceAccount the operator made for the job, allowed to patch
    // this job's status and nothing else.
    let trainer = client_as(Some(&format!("system:serviceaccount:{ns}:{JOB}-trainer"))).await?;

    // Attempt 1 reports while it is the current attempt.
    let outcome = send(&trainer, ns, 1, &uid, 10).await?;
    ensure!(
        outcome == PatchOutcome::Applied,
        "attempt 1, current: {outcome:?}"
    );
    ensure!(stored_report(&jobs).await? == (Some(10), Some((10, 1))));

    // A device fault ends attempt 1; the operator starts attempt 2.
    exit_pod(
        &client,
        ns,
        &first.name_any(),
        EXIT_DEVICE_FAULT,
        "CUDA error: an illegal memory access",
    )
    .await?;
    running_worker(&pods, JOB, 2, TIMEOUT).await?;
    job_where(&jobs, JOB, "status.attempt 2", |s| s.attempt == Some(2)).await?;

    // Attempt 2 reports; it applies.
    let outcome = send(&trainer, ns, 2, &uid, 20).await?;
    ensure!(
        outcome == PatchOutcome::Applied,
        "attempt 2, current: {outcome:?}"
    );
    ensure!(stored_report(&jobs).await? == (Some(20), Some((20, 2))));

    // Attempt 1 still runs somewhere (a partitioned node) and reports a later step: refused by the
    // API server's `test` of status.attempt; attempt 2's report stays.
    let outcome = send(&trainer, ns, 1, &uid, 30).await?;
    ensure_fenced(&outcome, "attempt 1 after attempt 2 started")?;
    ensure!(
        stored_report(&jobs).await? == (Some(20), Some((20, 2))),
        "attempt 1's refused patch changed the status: {:?}",
        stored_report(&jobs).await?
    );

    // The right attempt number, but another job's UID: refused too.
    let outcome = send(&trainer, ns, 2, "00000000-0000-0000-0000-000000000000", 40).await?;
    ensure_fenced(&outcome, "attempt 2 with another job's UID")?;
    ensure!(stored_report(&jobs).await? == (Some(20), Some((20, 2))));

    // The current attempt goes on reporting.
    let outcome = send(&trainer, ns, 2, &uid, 50).await?;
    ensure!(
        outcome == PatchOutcome::Applied,
        "attempt 2, later: {outcome:?}"
    );
    ensure!(stored_report(&jobs).await? == (Some(50), Some((50, 2))));

    // The job is deleted and created again under the same name: its attempts count from 1 again,
    // so only the UID tells the old job's attempt 1 from the new job's.
    jobs.delete(JOB, &DeleteParams::default()).await?;
    wait_for(&jobs, JOB, TIMEOUT, |j: Option<&TrainingJob>| j.is_none()).await?;
    wait_for(&pods, &worker(JOB, 2), TIMEOUT, |p: Option<&Pod>| {
        p.is_none()
    })
    .await?;
    jobs.create(&PostParams::default(), &example_job(JOB)?)
        .await?;
    running_worker(&pods, JOB, 1, TIMEOUT).await?;
    job_where(&jobs, JOB, "status.attempt 1", |s| s.attempt == Some(1)).await?;
    let new_uid = jobs.get(JOB).await?.uid().context("job uid")?;
    ensure!(new_uid != uid, "the recreated job kept the UID {uid}");

    let outcome = send(&trainer, ns, 1, &uid, 60).await?;
    ensure_fenced(&outcome, "the deleted job's attempt 1")?;
    ensure!(
        stored_report(&jobs).await? == (None, None),
        "the deleted job's attempt wrote into the new job: {:?}",
        stored_report(&jobs).await?
    );
    let outcome = send(&trainer, ns, 1, &new_uid, 5).await?;
    ensure!(
        outcome == PatchOutcome::Applied,
        "the new job's attempt 1: {outcome:?}"
    );
    ensure!(stored_report(&jobs).await? == (Some(5), Some((5, 1))));
    Ok(())
}
