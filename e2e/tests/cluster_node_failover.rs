//! The node tier's fail-over: a TrainingJob's worker runs in a real container on one real node, with its
//! checkpoints on a volume both real nodes mount, and is taken away by a real fault; the operator (installed by
//! Helm, in-cluster) starts the next attempt on the other real node, which resumes from the last checkpoint.
//!
//! - Partition (`e2e/cluster/node-partition.sh`): the node's kubelet and containerd are SIGKILLed, its container
//!   runs on and still reaches the volume and the API server. The old attempt is fenced: once the new attempt
//!   has claimed the checkpoint directory, the old process's next checkpoint is refused and it ends, saying so
//!   (read from its container's FIFOs). The job's model is bitwise the model of the same spec trained without
//!   a fault, at the same time, on the other node. The node is brought back afterwards (`nodes-up.sh`).
//! - Device fault: the worker's container ends with exit code 75 (the test image `anneal-runtime-gpufault`,
//!   whose "GPU" fails when the test says); the job moves to the other node and finishes.
//!
//! Each prints its times from the fault (the bench `e2e/bench/real-failover.sh` takes several trials).
//! Node tier: `e2e/test-nodes.sh` (or `e2e/cluster/nodes-up.sh && cargo test -p anneal-e2e --test
//! cluster_node_failover -- --include-ignored`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anneal_crds::trainingjob::FailoverReason;
use anneal_e2e::client;
use anneal_e2e::nodes::{sha256_of, succeeded};
use anneal_e2e::real_failover::{
    Failover, Fault, Stage, checkpoint_dir, committed_steps, fail_over, fence, image_ref,
    movable_job, start,
};
use anneal_e2e::wait::poll_until;
use anyhow::{Context, Result, ensure};
use tokio::sync::{Mutex, MutexGuard};

/// The faults of this binary's tests take nodes and their pods away: one at a time.
async fn one_fault_at_a_time() -> MutexGuard<'static, ()> {
    static FAULTS: Mutex<()> = Mutex::const_new(());
    FAULTS.lock().await
}

fn report(f: &Failover) {
    eprintln!(
        "{}: {} -> {} ({:?}), resumed from step {} (checkpoints at the fault: {:?}); from the fault: \
         replacement created {:.2} s, Running {:.2} s, resumed {:.2} s, first step {:.2} s",
        f.fault.name(),
        f.node,
        f.new_node,
        f.reason,
        f.resumed_from,
        f.checkpoints_at_fault,
        f.created_s,
        f.running_s,
        f.resumed_s,
        f.first_step_s
    );
}

#[tokio::test]
#[ignore = "node tier: needs e2e/cluster/nodes-up.sh"]
async fn real_node_partitioned_node_fails_over_fenced_and_the_model_is_bitwise_unchanged()
-> Result<()> {
    let _one = one_fault_at_a_time().await;
    let begin = Instant::now();
    let client = client().await?;
    let stage = Stage::create(&client, "node-partition").await?;
    let (ns, nodes, volume, checkpoints) =
        (stage.ns(), &stage.nodes, &stage.models, &stage.checkpoints);

    // 1,000 steps, a checkpoint every 100: the old attempt trains on long enough after the fault to reach a
    // checkpoint after the new attempt has claimed the directory.
    let moving = start(&client, ns, &movable_job("moving", 1000, 100)?).await?;
    let node = moving.node.clone();
    let other = nodes
        .iter()
        .find(|n| **n != node)
        .context("another real node")?
        .clone();
    // The same spec without a fault, on the other node, at the same time.
    let mut steady = movable_job("steady", 1000, 100)?;
    steady.spec.resources.node_selector =
        BTreeMap::from([("kubernetes.io/hostname".to_string(), other.clone())]);
    let steady = start(&client, ns, &steady).await?;
    ensure!(steady.node == other, "steady runs on {other}");

    let mut failover = fail_over(&client, checkpoints.dir(), moving, Fault::Partition).await?;
    report(&failover);
    ensure!(
        failover.new_node == other,
        "attempt 2 runs on the other real node {other}, not {}",
        failover.new_node
    );
    ensure!(
        matches!(
            failover.reason,
            FailoverReason::NodeNotReady | FailoverReason::NodeLeaseExpired
        ),
        "a partitioned node fails over as NotReady or Lease expired, not {:?}",
        failover.reason
    );
    ensure!(
        failover
            .checkpoints_at_fault
            .first()
            .is_some_and(|first| failover.resumed_from >= *first),
        "attempt 2 resumed from a checkpoint (step {}), checkpoints at the fault {:?}",
        failover.resumed_from,
        failover.checkpoints_at_fault
    );

    // Fencing: attempt 2 claimed the directory; the old process, which kept training on the partitioned node,
    // is refused its next checkpoint and ends.
    let dir = checkpoint_dir(checkpoints.dir(), &failover.job)?;
    ensure!(fence(&dir) == Some(2), "FENCE is 2: {:?}", fence(&dir));
    let zombie = failover.zombie.as_ref().context("the old process")?;
    poll_until(
        "the old attempt's process to be fenced and end",
        Duration::from_secs(180),
        Duration::from_millis(250),
        || {
            let ended = !zombie.alive();
            async move { Ok(ended.then_some(())) }
        },
    )
    .await
    .with_context(|| format!("its output:\n{}", zombie.output()))?;
    let output = zombie.output();
    ensure!(
        output.contains("fenced: attempt 1 is stale, attempt 2 owns the checkpoint directory"),
        "the old attempt ended because it was fenced; its output since the partition:\n{output}"
    );
    let zombie_checkpoints: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("\"event\":\"checkpoint\""))
        .collect();
    eprintln!(
        "old attempt fenced and ended; after the partition it committed {} checkpoint(s) before attempt 2 \
         claimed the directory: {zombie_checkpoints:?}",
        zombie_checkpoints.len()
    );

    let moved = succeeded(&client, ns, "moving").await?;
    let unmoved = succeeded(&client, ns, "steady").await?;
    let moved_status = moved.status.context("status")?;
    let artifact = moved_status.artifact.context("moving: artifact")?;
    let reference = unmoved
        .status
        .and_then(|s| s.artifact)
        .context("steady: artifact")?;
    ensure!(
        artifact.sha256 == reference.sha256,
        "the model trained across the fail-over ({}) is bitwise the one trained without a fault ({})",
        artifact.sha256,
        reference.sha256
    );
    let on_volume = sha256_of(&volume.dir().join("moving/model.safetensors")).await?;
    ensure!(
        on_volume == artifact.sha256,
        "the weights on the volume ({on_volume}) are the artifact ({})",
        artifact.sha256
    );
    let record = moved_status.failovers.first().context("failover record")?;
    ensure!(
        record.node == node && record.attempt == 1 && record.recovered_at.is_some(),
        "status.failovers records attempt 1 on {node}, recovered: {record:?}"
    );
    ensure!(
        committed_steps(&dir).last() == Some(&1000),
        "the last checkpoint is step 1000: {:?}",
        committed_steps(&dir)
    );

    let back = Instant::now();
    failover
        .node_back
        .take()
        .context("node guard")?
        .restore(&client)
        .await?;
    eprintln!(
        "sha256 {} both ways; {node} back and Ready in {:?}; test {:?}",
        artifact.sha256,
        back.elapsed(),
        begin.elapsed()
    );
    Ok(())
}

#[tokio::test]
#[ignore = "node tier: needs e2e/cluster/nodes-up.sh"]
async fn real_node_device_fault_exit_75_moves_the_job_to_the_other_node() -> Result<()> {
    let _one = one_fault_at_a_time().await;
    let begin = Instant::now();
    let client = client().await?;
    let stage = Stage::create(&client, "node-device-fault").await?;
    let (ns, checkpoints) = (stage.ns(), &stage.checkpoints);

    let mut job = movable_job("faulty", 600, 100)?;
    job.spec.image = Some(image_ref("anneal-runtime-gpufault")?);
    let started = start(&client, ns, &job).await?;
    let failover = fail_over(&client, checkpoints.dir(), started, Fault::DeviceFault).await?;
    report(&failover);
    ensure!(
        failover.reason == FailoverReason::DeviceFault,
        "exit 75 fails over as DeviceFault, not {:?}",
        failover.reason
    );
    ensure!(
        failover.new_node != failover.node,
        "the job left {} (its device failed)",
        failover.node
    );
    if let Some(code) = failover.old_exit_code {
        ensure!(
            code == 75,
            "attempt 1's container ended with 75, not {code}"
        );
    }
    let done = succeeded(&client, ns, "faulty").await?;
    let status = done.status.context("status")?;
    ensure!(
        status.excluded_nodes.contains(&failover.node) || status.failovers.len() == 1,
        "one fail-over: {:?}",
        status.failovers
    );
    ensure!(status.artifact.is_some(), "a model at the end");
    eprintln!(
        "device fault: attempt 1 exit code {:?}; done in {:?}",
        failover.old_exit_code,
        begin.elapsed()
    );
    Ok(())
}
