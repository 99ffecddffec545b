//! Data-parallel training on the node tier's real nodes: a TrainingJob with `workers: 2` runs one
//! worker on each real node, in real containers; rank 1 finds rank 0 through the gang's headless
//! Service by DNS (`a1-w0.<job>-workers.<namespace>.svc`, answered by the tier's cluster DNS) and
//! they all-reduce gradients over TCP between the nodes' pod networks. The model they train is the
//! model one worker trains with twice the batch, from the same seed and data.
//!
//! Node tier: `e2e/test-nodes.sh cluster_node_gang`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use anneal_crds::TrainingJob;
use anneal_crds::trainingjob::{GangState, TrainingPhase};
use anneal_e2e::client;
use anneal_e2e::nodes::succeeded;
use anneal_e2e::real_failover::{Stage, movable_job};
use anneal_e2e::trainingjob::job_where;
use anyhow::{Context, Result, ensure};
use kube::Api;
use kube::api::PostParams;

/// Tensors of a model directory's `model.safetensors`, by name.
fn weights(dir: &Path) -> Result<Vec<(String, Vec<f32>)>> {
    let path = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (name, t) in tensors {
        let values = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        out.push((name, values));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[tokio::test]
#[ignore = "node tier: needs e2e/cluster/nodes-up.sh"]
async fn real_node_two_workers_on_two_nodes_train_the_model_of_one_worker_with_twice_the_batch()
-> Result<()> {
    let begin = Instant::now();
    let client = client().await?;
    let stage = Stage::create(&client, "node-gang").await?;
    let ns = stage.ns();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);

    // The same run twice: two workers of batch 16, one worker of batch 32.
    let steps = 48;
    let mut gang = movable_job("gang", steps, 16)?;
    gang.spec.workers = 2;
    gang.spec.hyperparameters.batch_size = 16;
    let mut solo = movable_job("solo", steps, 16)?;
    solo.spec.hyperparameters.batch_size = 32;
    jobs.create(&PostParams::default(), &gang).await?;
    jobs.create(&PostParams::default(), &solo).await?;

    let placed = job_where(&jobs, "gang", "both workers placed and running", |s| {
        s.phase == Some(TrainingPhase::Running)
            && s.gang.as_ref().is_some_and(|g| {
                g.state == GangState::Placed && g.workers.iter().all(|w| w.node.is_some())
            })
    })
    .await;
    let placed = match placed {
        Ok(job) => job,
        Err(e) => return Err(e.context(anneal_e2e::nodes::diagnose(ns).await)),
    };
    let gang_status = placed.status.and_then(|s| s.gang).context("status.gang")?;
    let nodes: BTreeSet<String> = gang_status
        .workers
        .iter()
        .filter_map(|w| w.node.clone())
        .collect();
    let real: BTreeSet<String> = stage.nodes.iter().cloned().collect();
    ensure!(
        nodes.len() == 2 && nodes.is_subset(&real),
        "the two workers run on the two real nodes {real:?}: {:?}",
        gang_status.workers
    );

    let gang = succeeded(&client, ns, "gang").await?;
    let solo = succeeded(&client, ns, "solo").await?;
    let trained = begin.elapsed();
    let loss = |job: &TrainingJob| {
        job.status
            .as_ref()
            .and_then(|s| s.progress.as_ref())
            .and_then(|p| p.loss)
            .context("final loss in status.progress")
    };
    let (gang_loss, solo_loss) = (loss(&gang)?, loss(&solo)?);
    let relative = (gang_loss - solo_loss).abs() / solo_loss.abs();

    let gang_weights = weights(&stage.models.dir().join("gang"))?;
    let solo_weights = weights(&stage.models.dir().join("solo"))?;
    ensure!(
        gang_weights
            .iter()
            .map(|w| &w.0)
            .eq(solo_weights.iter().map(|w| &w.0)),
        "the same tensors"
    );
    let mut max_diff = 0f32;
    for ((name, a), (_, b)) in gang_weights.iter().zip(&solo_weights) {
        ensure!(a.len() == b.len(), "{name}: shapes differ");
        for (x, y) in a.iter().zip(b) {
            max_diff = max_diff.max((x - y).abs());
        }
    }
    eprintln!(
        "gang on {nodes:?}: final loss {gang_loss:.9} vs one worker {solo_loss:.9} \
         (relative {relative:.2e}); weights differ by at most {max_diff:.2e}; \
         both trained {steps} steps in {trained:?}"
    );
    // Not bitwise: one batch of 32 sums its gradient in one product, the gang in two and an
    // all-reduce (runtime/tests/train_dist.rs measures the same on one machine).
    ensure!(
        relative < 1e-5,
        "final losses agree: {gang_loss} vs {solo_loss}"
    );
    ensure!(
        max_diff < 1e-5,
        "the models agree: weights differ by {max_diff}"
    );
    Ok(())
}
