//! The API write cost of a worker heartbeat, for `e2e/bench/heartbeat-budget.sh`: N Leases
//! (coordination.k8s.io, one per simulated TrainingJob worker) renewed every interval, each by its
//! own task with a random phase (as workers started at different times would), with a merge PATCH
//! of `renewTime` (one request, no read). For each interval it reports the writes per second the
//! API server took, the request latency seen by the client (p50, p99, max), failed requests, and the
//! CPU seconds kube-apiserver and etcd consumed (`/proc/<pid>/stat`), next to an idle window of the
//! same length (the cluster's own background: kwok's node Leases, the controllers).
//!
//! `heartbeat-budget LEASES DURATION_S INTERVAL_S...` against the cluster the tests use; the
//! components' pids are read from `$ANNEAL_CLUSTER_DIR/pids/`. Prints a Markdown table.

use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anneal_e2e::{TestNamespace, client};
use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

/// The components whose CPU time a heartbeat costs.
const COMPONENTS: [&str; 2] = ["kube-apiserver", "etcd"];

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32, ticks_per_second: f64) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / ticks_per_second)
}

fn ticks_per_second() -> Result<f64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()?;
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

/// The pids of [`COMPONENTS`], from the cluster's pid files.
fn component_pids(cluster_dir: &Path) -> Result<Vec<u32>> {
    COMPONENTS
        .iter()
        .map(|c| {
            let file = cluster_dir.join("pids").join(format!("{c}.pid"));
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            Ok(text.trim().parse()?)
        })
        .collect()
}

/// CPU seconds of each component.
fn cpu_now(pids: &[u32], tck: f64) -> Result<Vec<f64>> {
    pids.iter().map(|&p| cpu_seconds(p, tck)).collect()
}

fn random_fraction() -> f64 {
    let random = RandomState::new().hash_one(Instant::now());
    (random >> 11) as f64 / (1u64 << 53) as f64
}

/// What one window measured.
struct Window {
    writes: usize,
    errors: usize,
    latencies_ms: Vec<f64>,
    cpu: Vec<f64>,
}

/// Renews every Lease every `interval` for `duration`; each task starts at a random phase.
async fn heartbeat(
    leases: &Api<Lease>,
    names: &[String],
    interval: Duration,
    duration: Duration,
) -> (usize, usize, Vec<f64>) {
    let end = tokio::time::Instant::now() + duration;
    let tasks = names.iter().map(|name| {
        let leases = leases.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let first = tokio::time::Instant::now() + interval.mul_f64(random_fraction());
            let mut ticks = tokio::time::interval_at(first, interval);
            loop {
                let at = ticks.tick().await;
                if at >= end {
                    break;
                }
                let patch = json!({"spec": {"renewTime": MicroTime(Timestamp::now())}});
                let sent = Instant::now();
                match leases
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => latencies.push(sent.elapsed().as_secs_f64() * 1e3),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        })
    });
    let results = futures::future::join_all(tasks).await;
    let mut all = Vec::new();
    let mut errors = 0;
    for (latencies, e) in results.into_iter().flatten() {
        all.extend(latencies);
        errors += e;
    }
    (all.len(), errors, all)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        bail!("usage: heartbeat-budget LEASES DURATION_S INTERVAL_S...");
    }
    let count: usize = args[0].parse()?;
    let duration = Duration::from_secs(args[1].parse()?);
    let intervals: Vec<f64> = args[2..]
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let cluster_dir = PathBuf::from(
        std::env::var_os("ANNEAL_CLUSTER_DIR").context("ANNEAL_CLUSTER_DIR is not set")?,
    );
    let pids = component_pids(&cluster_dir)?;
    let tck = ticks_per_second()?;

    let client: Client = client().await?;
    let namespace = TestNamespace::create(&client, "heartbeat").await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace.name());
    let names: Vec<String> = (0..count).map(|i| format!("job-{i}-worker")).collect();
    futures::stream::iter(names.iter())
        .map(|name| {
            let leases = leases.clone();
            async move {
                let lease: Lease = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {"holderIdentity": name, "renewTime": MicroTime(Timestamp::now())},
                }))?;
                leases.create(&PostParams::default(), &lease).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<()>()
        .await
        .context("creating the Leases")?;

    let mut windows = Vec::new();
    // The idle window first: what the cluster costs without heartbeats.
    let before = cpu_now(&pids, tck)?;
    tokio::time::sleep(duration).await;
    let after = cpu_now(&pids, tck)?;
    let idle: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    for &interval in &intervals {
        let before = cpu_now(&pids, tck)?;
        let (writes, errors, mut latencies_ms) =
            heartbeat(&leases, &names, Duration::from_secs_f64(interval), duration).await;
        let after = cpu_now(&pids, tck)?;
        latencies_ms.sort_by(f64::total_cmp);
        windows.push((
            interval,
            Window {
                writes,
                errors,
                latencies_ms,
                cpu: after.iter().zip(&before).map(|(a, b)| a - b).collect(),
            },
        ));
    }

    let secs = duration.as_secs_f64();
    println!(
        "| heartbeat interval | Leases | writes/s | latency p50 / p99 / max (ms) | failed | kube-apiserver CPU s (idle) | etcd CPU s (idle) | CPU, both, % of a core above idle |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (interval, w) in &windows {
        let above: f64 = w.cpu.iter().zip(&idle).map(|(c, i)| c - i).sum();
        println!(
            "| {interval} s | {count} | {:.1} | {:.1} / {:.1} / {:.1} | {} | {:.1} ({:.1}) | {:.1} ({:.1}) | {:.0} % |",
            w.writes as f64 / secs,
            percentile(&w.latencies_ms, 0.5),
            percentile(&w.latencies_ms, 0.99),
            w.latencies_ms.last().copied().unwrap_or(f64::NAN),
            w.errors,
            w.cpu[0],
            idle[0],
            w.cpu[1],
            idle[1],
            100.0 * above / secs,
        );
    }
    println!(
        "\n({}-s windows; idle: the same cluster with no heartbeat)",
        duration.as_secs()
    );
    Ok(())
}
