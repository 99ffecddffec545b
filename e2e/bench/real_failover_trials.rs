//! Fail-over trials between real nodes, for `e2e/bench/real-failover.sh` (the node tier's cluster, the
//! operator in-cluster from the chart).
//!
//! Each trial: a fresh TrainingJob (the pipeline's model, 2,000 steps, a checkpoint every 100 on a volume both
//! real nodes mount, any GPU type) runs on one real node; once its first checkpoint is committed the fault comes:
//! `partition` (the node's kubelet and containerd SIGKILLed, e2e/cluster/node-partition.sh; the node is brought
//! back and Ready before the next trial) or `device` (the container ends with exit 75: the test image
//! anneal-runtime-gpufault). Measured from the fault (wall clock): the replacement worker created, Running, its
//! `resumed` line and its first `step` line (the runtime prints progress every 10 steps).
//!
//! `cargo run -p anneal-e2e --example real-failover-trials -- TRIALS [partition|device]...`: one tab-separated
//! line per trial, then a Markdown table: p50 and max (nearest rank) of each time, per fault.

use std::time::Duration;

use anneal_crds::TrainingJob;
use anneal_e2e::client;
use anneal_e2e::real_failover::{
    Failover, Fault, Stage, fail_over, image_ref, movable_job, percentile, start,
};
use anneal_e2e::trainingjob::no_workers;
use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::DeleteParams;

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let trials: usize = args
        .next()
        .context("usage: real-failover-trials TRIALS [partition|device]...")?
        .parse()?;
    let mut faults = Vec::new();
    for arg in args {
        faults.push(match arg.as_str() {
            "partition" => Fault::Partition,
            "device" => Fault::DeviceFault,
            other => bail!("unknown fault {other}: partition or device"),
        });
    }
    if faults.is_empty() {
        faults = vec![Fault::Partition, Fault::DeviceFault];
    }
    let client = client().await?;
    let stage = Stage::create(&client, "bench-real-failover").await?;
    let (ns, checkpoints) = (stage.ns(), &stage.checkpoints);
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);

    println!(
        "fault\ttrial\tnode\tnew node\treason\tresumed from\tcreated s\tRunning s\tresumed s\tfirst step s"
    );
    let mut results: Vec<Failover> = Vec::new();
    for fault in &faults {
        for trial in 0..trials {
            let name = match fault {
                Fault::Partition => format!("partition-{trial}"),
                Fault::DeviceFault => format!("device-{trial}"),
            };
            let mut job = movable_job(&name, 2000, 100)?;
            if *fault == Fault::DeviceFault {
                job.spec.image = Some(image_ref("anneal-runtime-gpufault")?);
            }
            let started = start(&client, ns, &job).await?;
            let mut failover = fail_over(&client, checkpoints.dir(), started, *fault).await?;
            println!(
                "{:?}\t{trial}\t{}\t{}\t{:?}\t{}\t{:.2}\t{:.2}\t{:.2}\t{:.2}",
                fault,
                failover.node,
                failover.new_node,
                failover.reason,
                failover.resumed_from,
                failover.created_s,
                failover.running_s,
                failover.resumed_s,
                failover.first_step_s
            );
            jobs.delete(&name, &DeleteParams::default()).await?;
            if let Some(back) = failover.node_back.take() {
                back.restore(&client).await?;
            }
            tokio::time::timeout(Duration::from_secs(120), no_workers(&pods, &name))
                .await
                .context("the job's pods to go")??;
            results.push(failover);
        }
    }

    println!();
    println!(
        "| fault | trials | reasons | fault → replacement created (p50 / max) | → Running | → resumed | → first step |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for fault in &faults {
        let of: Vec<&Failover> = results.iter().filter(|r| r.fault == *fault).collect();
        let stat = |f: fn(&Failover) -> f64| {
            let values: Vec<f64> = of.iter().map(|r| f(r)).collect();
            format!(
                "{:.1} / {:.1} s",
                percentile(&values, 50.0),
                percentile(&values, 100.0)
            )
        };
        let mut reasons: Vec<String> = of.iter().map(|r| format!("{:?}", r.reason)).collect();
        reasons.sort();
        reasons.dedup_by(|a, b| a == b);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            fault.name(),
            of.len(),
            reasons.join(", "),
            stat(|r| r.created_s),
            stat(|r| r.running_s),
            stat(|r| r.resumed_s),
            stat(|r| r.first_step_s)
        );
    }
    Ok(())
}
