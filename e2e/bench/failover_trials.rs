//! Node-down failover trials on the local cluster, for `e2e/bench/failover-profiles.sh`.
//!
//! Each trial: a fresh TrainingJob (the example: one H100 worker, `nodeLeaseTimeoutSeconds` 15, the
//! default) runs; at a random point of its node's Lease cycle (a uniform wait of up to one renew
//! interval, a quarter of the Lease's duration) the node dies (`faults::fail_node`: kwok stops
//! renewing its Lease and reporting its status); the trial ends when the replacement worker
//! (attempt 2) is Running on another node. The node is then restored and Ready before the next.
//!
//! `cargo run -p anneal-e2e --example failover-trials -- TRIALS` against the cluster the tests use
//! (`ANNEAL_KUBECONFIG`, ...). One tab-separated line per trial on stdout:
//! trial, seconds from the fault to the replacement Running, to the replacement created (the
//! operator's detection and decision), the failover reason, the Lease's age at the fault (s), the
//! node, the replacement's node; then summary lines `= TITLE<TAB>VALUE` (p50, p95, max by nearest
//! rank, the reasons seen).

use std::hash::{BuildHasher, RandomState};
use std::io::Write;
use std::time::{Duration, Instant};

use anneal_crds::TrainingJob;
use anneal_e2e::faults::{self, RestoreOnDrop};
use anneal_e2e::node_lease::NODE_LEASE_NAMESPACE;
use anneal_e2e::trainingjob::{
    TIMEOUT, attempt_label, example_job, is_live_running, no_workers, node_of,
    restricted_namespace, running_worker, selector,
};
use anneal_e2e::wait::conditions::node_ready_status;
use anneal_e2e::wait::wait_for;
use anneal_e2e::{client, operator::OperatorProcess};
use anyhow::{Context, Result, bail, ensure};
use futures::TryStreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::watcher;
use kube::{Api, Client};

/// The longest a trial waits for the replacement: past a stock controller-manager's 50 s grace
/// period, so a trial the operator's own detection misses still ends (and shows it).
const REPLACEMENT_TIMEOUT: Duration = Duration::from_secs(120);

/// One trial's measurements.
struct Trial {
    running_s: f64,
    created_s: f64,
    reason: String,
    lease_age_s: f64,
    node: String,
    new_node: String,
}

/// A uniformly distributed duration in `[0, max)`.
fn uniform(max: Duration) -> Duration {
    let random = RandomState::new().hash_one(Instant::now());
    max.mul_f64((random >> 11) as f64 / (1u64 << 53) as f64)
}

/// Seconds from `fault` until the first pod of attempt 2 of the job is seen, and until one is
/// Running.
async fn replacement(pods: &Api<Pod>, job: &str, fault: Instant) -> Result<(f64, f64)> {
    let mut created = None;
    let mut events = std::pin::pin!(watcher(pods.clone(), selector(job)).applied_objects());
    while let Some(pod) = events.try_next().await? {
        if attempt_label(&pod) != Some(2) {
            continue;
        }
        let now = fault.elapsed().as_secs_f64();
        let created = *created.get_or_insert(now);
        if is_live_running(&pod) {
            return Ok((now, created));
        }
    }
    bail!("the watch of {job}'s pods ended")
}

async fn trial(client: &Client, ns: &str, index: usize) -> Result<Trial> {
    let name = format!("bench-{index}");
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), NODE_LEASE_NAMESPACE);
    jobs.create(&PostParams::default(), &example_job(&name)?)
        .await?;
    let first = running_worker(&pods, &name, 1, TIMEOUT).await?;
    let node = node_of(&first)?;
    let _restore = RestoreOnDrop::new(&node);

    let duration = leases
        .get(&node)
        .await?
        .spec
        .and_then(|s| s.lease_duration_seconds)
        .context("the node's Lease has no duration")?;
    let renew_interval = Duration::from_secs(duration.unsigned_abs().into()) / 4;
    tokio::time::sleep(uniform(renew_interval)).await;
    let renewed = leases
        .get(&node)
        .await?
        .spec
        .and_then(|s| s.renew_time)
        .context("the node's Lease was never renewed")?;
    let lease_age_s = Timestamp::now().duration_since(renewed.0).as_secs_f64();
    let fault = Instant::now();
    faults::fail_node(client, &node).await?;
    let (running_s, created_s) =
        tokio::time::timeout(REPLACEMENT_TIMEOUT, replacement(&pods, &name, fault))
            .await
            .with_context(|| format!("no replacement Running within {REPLACEMENT_TIMEOUT:?}"))??;

    let second = running_worker(&pods, &name, 2, TIMEOUT).await?;
    let new_node = node_of(&second)?;
    ensure!(new_node != node, "replacement on the failed node {node}");
    let job = wait_for(&jobs, &name, TIMEOUT, |j: Option<&TrainingJob>| {
        j.and_then(|j| j.status.as_ref())
            .is_some_and(|s| !s.failovers.is_empty())
    })
    .await?
    .context("job gone")?;
    let record = &job.status.context("status")?.failovers[0];
    ensure!(record.node == node, "failover of {} recorded", record.node);
    let reason = format!("{:?}", record.reason);

    // Back to a healthy cluster: the job and its pods gone, the node Ready and untainted.
    jobs.delete(&name, &DeleteParams::default()).await?;
    faults::restore_node(client, &node).await?;
    wait_for(&nodes, &node, TIMEOUT, |n: Option<&Node>| {
        n.is_some_and(|n| {
            let tainted = n
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.key.starts_with("node.kubernetes.io/")));
            node_ready_status(n) == Some("True") && !tainted
        })
    })
    .await
    .with_context(|| format!("node {node} not Ready again after the trial"))?;
    no_workers(&pods, &name).await?;
    Ok(Trial {
        running_s,
        created_s,
        reason,
        lease_age_s,
        node,
        new_node,
    })
}

/// The value of nearest rank `p` (0..=1) of `sorted`.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The summary lines `= TITLE<TAB>VALUE` that `failover-profiles.sh` puts side by side.
fn summary(trials: &[Trial]) -> Vec<(String, String)> {
    let sorted = |f: fn(&Trial) -> f64| {
        let mut v: Vec<f64> = trials.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let running = sorted(|t| t.running_s);
    let created = sorted(|t| t.created_s);
    let age = sorted(|t| t.lease_age_s);
    let mut reasons = std::collections::BTreeMap::<&str, usize>::new();
    for t in trials {
        *reasons.entry(&t.reason).or_default() += 1;
    }
    let reasons: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} ×{n}")).collect();
    let last = |v: &[f64]| v[v.len() - 1];
    vec![
        ("trials".into(), trials.len().to_string()),
        (
            "fault → replacement Running, p50".into(),
            format!("{:.1} s", percentile(&running, 0.5)),
        ),
        ("p95".into(), format!("{:.1} s", percentile(&running, 0.95))),
        ("max".into(), format!("{:.1} s", last(&running))),
        ("min".into(), format!("{:.1} s", running[0])),
        (
            "fault → replacement created, p50 / max".into(),
            format!("{:.1} / {:.1} s", percentile(&created, 0.5), last(&created)),
        ),
        (
            "Lease age at the fault, min–max".into(),
            format!("{:.1}–{:.1} s", age[0], last(&age)),
        ),
        ("failover reasons".into(), reasons.join(", ")),
    ]
}

#[tokio::main]
async fn main() -> Result<()> {
    let count: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().context("TRIALS must be a number")?,
        None => 10,
    };
    ensure!(count > 0, "no trials asked for");
    let client = client().await?;
    let (namespace, operator) = restricted_namespace(&client, "bench-failover").await?;
    println!("# trial\trunning_s\tcreated_s\treason\tlease_age_s\tnode\treplacement_node");
    let mut trials = Vec::new();
    for index in 1..=count {
        let t = trial(&client, namespace.name(), index)
            .await
            .with_context(|| format!("trial {index}"))?;
        println!(
            "{index}\t{:.2}\t{:.2}\t{}\t{:.2}\t{}\t{}",
            t.running_s, t.created_s, t.reason, t.lease_age_s, t.node, t.new_node
        );
        std::io::stdout().flush()?;
        trials.push(t);
    }
    for (title, value) in summary(&trials) {
        println!("= {title}\t{value}");
    }
    OperatorProcess::kill(operator).await?;
    Ok(())
}
