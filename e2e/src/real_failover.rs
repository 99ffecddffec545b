//! Fail-over between real nodes (the node tier): a TrainingJob whose checkpoints live on a volume both real nodes
//! mount runs on one of them; a fault takes its worker away; the operator starts the next attempt on the other
//! node, which resumes from the last checkpoint. Two faults:
//!
//! - [`Fault::Partition`]: `e2e/cluster/node-partition.sh` SIGKILLs the node's kubelet and containerd. Its Lease
//!   and status stop; its containers keep running (their shims outlive containerd), so the old attempt's
//!   process lives on as on a partitioned node: a [`Zombie`], whose output the test reads from the FIFOs the
//!   dead containerd no longer drains. It still reaches the API server and the volume (nothing here cuts the
//!   network), which is what fencing has to stop.
//! - [`Fault::DeviceFault`]: the job runs the test image `anneal-runtime-gpufault`, whose entrypoint ends the
//!   container with the runtime's device-fault exit code (75) when `.gpu-fault` appears in the checkpoint
//!   directory (`images/anneal-runtime-gpufault/gpu-fault.sh`).
//!
//! Times are taken against the wall clock (the nodes, their containerd's log timestamps and the test share this
//! machine's clock): from the fault to the replacement worker created and Running, to the runtime's `resumed`
//! line and to its first `step` line (the first progress line of the new attempt, printed every 10 steps).
//! Shared by `tests/cluster_node_failover.rs` and the bench `e2e/bench/real-failover.sh`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anneal_crds::TrainingJob;
use anneal_crds::common::GpuType;
use anneal_crds::trainingjob::{CheckpointStorage, FailoverReason};
use anyhow::{Context, Result, bail, ensure};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::watcher;
use kube::{Api, Client, ResourceExt};
use serde::Deserialize;

use crate::TestNamespace;
use crate::cluster::cluster_dir;
use crate::nodes::{NodeVolume, install_operator, real_node_names, restrict, state_dir};
use crate::tools::{kubectl, run, run_cleanup};
use crate::trainingjob::{attempt_label, is_live_running, node_of, running_worker, selector};
use crate::wait::{conditions, poll_until, wait_for};

/// The claim the node tier's jobs write their models to.
pub const CLAIM: &str = "anneal-models";
/// The claim they keep checkpoints on, apart from [`CLAIM`] as a cluster with a volume for checkpoints
/// has it. (A pod whose two volumes named one claim never started: "unmounted volumes=[checkpoints]";
/// the operator now mounts one volume for both, `operator/src/trainingjob/build.rs`, unit-tested, not
/// yet on this tier.)
pub const CHECKPOINT_CLAIM: &str = "anneal-checkpoints";
/// The file whose appearance in the checkpoint directory fails the "GPU" of the test image.
pub const GPU_FAULT_TRIGGER: &str = ".gpu-fault";

/// What takes the worker away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The worker's node is partitioned: its kubelet and containerd are killed, its containers run on.
    Partition,
    /// The worker's container ends with the device-fault exit code (75).
    DeviceFault,
}

impl Fault {
    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Partition => "node partitioned (kubelet + containerd killed)",
            Self::DeviceFault => "device fault (container exit 75)",
        }
    }
}

/// The TrainingJob of `manifests/examples/pipeline.yaml`.
pub fn pipeline_job() -> Result<TrainingJob> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/pipeline.yaml");
    let text = std::fs::read_to_string(path)?;
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(document)?;
        if value.get("kind").and_then(|k| k.as_str()) == Some("TrainingJob") {
            return Ok(serde_yaml::from_value(value)?);
        }
    }
    bail!("no TrainingJob in pipeline.yaml")
}

/// The pipeline's model as job `name`: `steps` steps, a checkpoint every `every` on claim
/// [`CHECKPOINT_CLAIM`] (which every real node mounts), its model at `pvc://anneal-models/<name>`, on any GPU
/// type, so that both real nodes (one A100-, one H100-labelled) can run it.
pub fn movable_job(name: &str, steps: u64, every: u64) -> Result<TrainingJob> {
    let mut job = pipeline_job()?;
    job.metadata.name = Some(name.to_string());
    job.spec.hyperparameters.steps = steps;
    job.spec.hyperparameters.warmup_steps = (steps / 10).max(1);
    job.spec.checkpoint.every_steps = every;
    job.spec.checkpoint.storage = Some(CheckpointStorage {
        pvc: Some(CHECKPOINT_CLAIM.to_string()),
        uri: None,
    });
    job.spec.output.uri.0 = format!("pvc://{CLAIM}/{name}");
    job.spec.resources.gpu_type = GpuType::Any;
    Ok(job)
}

/// Where fail-over trials run: a restricted namespace with claims [`CLAIM`] and [`CHECKPOINT_CLAIM`] on volumes
/// every real node mounts, and the operator installed; dropped in reverse order of creation.
#[derive(Debug)]
pub struct Stage {
    /// The volume of [`CHECKPOINT_CLAIM`].
    pub checkpoints: NodeVolume,
    /// The volume of [`CLAIM`].
    pub models: NodeVolume,
    /// The namespace.
    pub namespace: TestNamespace,
    /// The real nodes (at least two).
    pub nodes: Vec<String>,
}

impl Stage {
    /// Installs the operator (once per process) and makes the namespace `e2e-<test>-...` and its volumes.
    pub async fn create(client: &Client, test: &str) -> Result<Self> {
        let nodes = real_node_names(client).await?;
        ensure!(nodes.len() >= 2, "two real nodes expected: {nodes:?}");
        install_operator().await?;
        let namespace = TestNamespace::create(client, test).await?;
        let ns = namespace.name().to_string();
        restrict(client, &ns).await?;
        let models = NodeVolume::create(client, &ns, CLAIM).await?;
        let checkpoints = NodeVolume::create(client, &ns, CHECKPOINT_CLAIM).await?;
        Ok(Self {
            checkpoints,
            models,
            namespace,
            nodes,
        })
    }

    /// The namespace's name.
    pub fn ns(&self) -> &str {
        self.namespace.name()
    }
}

/// The reference of the images built by `images/build.sh` (`<image>.ref` in its archive directory).
pub fn image_ref(image: &str) -> Result<String> {
    let dir = match std::env::var_os("ANNEAL_IMAGES_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(std::env::var_os("HOME").context("HOME")?).join(".cache/anneal/images")
        }
    };
    let path = dir.join(format!("{image}.ref"));
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("{} (run images/build.sh {image})", path.display()))?
        .trim()
        .to_string())
}

/// Seconds since the epoch, now.
fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// The directory of the job's checkpoints on this machine: `<volume>/<namespace>/<name>/<uid>`.
pub fn checkpoint_dir(volume: &Path, job: &TrainingJob) -> Result<PathBuf> {
    Ok(volume
        .join(job.namespace().context("namespace")?)
        .join(job.name_any())
        .join(job.uid().context("uid")?))
}

/// Steps of the committed checkpoints (`step-N`) in `dir`.
pub fn committed_steps(dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps
}

/// The attempt that last claimed the checkpoint directory (its `FENCE` file).
pub fn fence(dir: &Path) -> Option<u64> {
    std::fs::read_to_string(dir.join("FENCE"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The old attempt's process on a partitioned node: its pid, and what it writes to stdout and stderr (read from
/// the FIFOs of its container, which the killed containerd no longer drains).
#[derive(Debug)]
pub struct Zombie {
    /// The runtime process of the old attempt.
    pub pid: u32,
    output: Arc<Mutex<String>>,
}

impl Zombie {
    /// The `anneal-runtime` process of `pod` (found by the pod's UID in its cgroup path).
    pub fn find(pod: &Pod) -> Result<Self> {
        let uid = pod.uid().context("pod uid")?;
        let kubelet_form = uid.replace('-', "_");
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.trim() != "anneal-runtime" {
                continue;
            }
            let cgroup = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
            if cgroup.contains(&uid) || cgroup.contains(&kubelet_form) {
                return Ok(Self {
                    pid,
                    output: Arc::default(),
                });
            }
        }
        bail!(
            "no anneal-runtime process of pod {} ({uid})",
            pod.name_any()
        )
    }

    /// Whether the process still runs (a zombie of the process table counts as ended).
    pub fn alive(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => !stat.contains(") Z "),
            Err(_) => false,
        }
    }

    /// Starts reading the container's stdout and stderr FIFOs of node `node` (after its containerd is gone).
    pub fn drain(&self, node: &str, pod: &Pod) -> Result<()> {
        let id = container_id(pod)?;
        let root = state_dir()?
            .join("nodes")
            .join(node)
            .join("containerd/state");
        let mut fifos = Vec::new();
        find_files(
            &root,
            &[format!("{id}-stdout"), format!("{id}-stderr")],
            &mut fifos,
        );
        ensure!(
            !fifos.is_empty(),
            "no FIFOs of container {id} under {}",
            root.display()
        );
        for fifo in fifos {
            let output = self.output.clone();
            std::thread::spawn(move || {
                let Ok(file) = std::fs::File::open(&fifo) else {
                    return;
                };
                for line in BufReader::new(file).lines() {
                    let Ok(line) = line else { break };
                    let mut out = output.lock().unwrap_or_else(|e| e.into_inner());
                    out.push_str(&line);
                    out.push('\n');
                }
            });
        }
        Ok(())
    }

    /// What the process wrote since [`Zombie::drain`].
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The containerd ID of the pod's first container.
fn container_id(pod: &Pod) -> Result<String> {
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|s| s.first())
        .and_then(|c| c.container_id.as_deref())
        .context("no container ID")?;
    Ok(id.trim_start_matches("containerd://").to_string())
}

fn find_files(dir: &Path, names: &[String], found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => find_files(&path, names, found),
            Ok(_) if names.iter().any(|n| entry.file_name().to_str() == Some(n)) => {
                found.push(path)
            }
            _ => {}
        }
    }
}

/// Brings a partitioned node back when dropped (`nodes-up.sh`, idempotent, with the images already imported),
/// and waits for it to be Ready: the other tests need both nodes.
#[derive(Debug)]
pub struct NodeBack {
    node: String,
}

impl NodeBack {
    /// Arms the guard for `node`.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_string(),
        }
    }

    /// Brings the node back now and waits until it is Ready.
    pub async fn restore(self, client: &Client) -> Result<()> {
        let node = self.node.clone();
        drop(self);
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        wait_for(
            &nodes,
            &node,
            Duration::from_secs(120),
            conditions::node_ready(),
        )
        .await
        .with_context(|| format!("{node} Ready again"))?;
        Ok(())
    }
}

impl Drop for NodeBack {
    fn drop(&mut self) {
        let mut command = std::process::Command::new(cluster_dir().join("nodes-up.sh"));
        command.env("ANNEAL_SKIP_IMAGE_BUILD", "1");
        run_cleanup(
            command,
            &format!("bringing {} back (nodes-up.sh)", self.node),
        );
    }
}

/// One fail-over, as measured.
#[derive(Debug)]
pub struct Failover {
    /// The fault.
    pub fault: Fault,
    /// The node of attempt 1.
    pub node: String,
    /// The node of attempt 2.
    pub new_node: String,
    /// The reason the operator recorded.
    pub reason: FailoverReason,
    /// The checkpoint step attempt 2 resumed from.
    pub resumed_from: u64,
    /// Committed checkpoints when the fault came.
    pub checkpoints_at_fault: Vec<u64>,
    /// The exit code of attempt 1's container, when the watch saw it (a device fault: 75).
    pub old_exit_code: Option<i32>,
    /// Seconds from the fault to the replacement pod created.
    pub created_s: f64,
    /// ... to the replacement Running.
    pub running_s: f64,
    /// ... to its `resumed` line.
    pub resumed_s: f64,
    /// ... to its first `step` line.
    pub first_step_s: f64,
    /// The job (with uid and namespace, as created).
    pub job: TrainingJob,
    /// The old attempt's worker pod.
    pub old_pod: Pod,
    /// The old attempt's process, for [`Fault::Partition`].
    pub zombie: Option<Zombie>,
    /// For [`Fault::Partition`]: brings the node back when dropped or restored.
    pub node_back: Option<NodeBack>,
}

/// A job whose worker of attempt 1 runs.
#[derive(Debug)]
pub struct Started {
    /// The job as created (with its uid).
    pub job: TrainingJob,
    /// Its worker of attempt 1, Running.
    pub pod: Pod,
    /// The node that worker runs on.
    pub node: String,
}

/// Creates `job` in `namespace` and waits for its worker of attempt 1 to run.
pub async fn start(client: &Client, namespace: &str, job: &TrainingJob) -> Result<Started> {
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let job = jobs.create(&PostParams::default(), job).await?;
    let pod = running_worker(&pods, &job.name_any(), 1, Duration::from_secs(120)).await?;
    let node = node_of(&pod)?;
    Ok(Started { job, pod, node })
}

/// Waits for the started job's first committed checkpoint, applies `fault` to its worker, and measures the
/// fail-over up to the replacement's first step. `volume` is the directory of claim [`CHECKPOINT_CLAIM`] on
/// this machine.
pub async fn fail_over(
    client: &Client,
    volume: &Path,
    started: Started,
    fault: Fault,
) -> Result<Failover> {
    let Started {
        job,
        pod: old_pod,
        node,
    } = started;
    let namespace = job.namespace().context("namespace")?;
    let name = job.name_any();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let dir = checkpoint_dir(volume, &job)?;
    let checkpoints_at_fault = poll_until(
        "the first checkpoint of attempt 1",
        Duration::from_secs(120),
        Duration::from_millis(100),
        || {
            let steps = committed_steps(&dir);
            async move { Ok((!steps.is_empty()).then_some(steps)) }
        },
    )
    .await?;

    // The replacement's watch starts before the fault, so that nothing it does is missed.
    let replacement = tokio::spawn(replacement(pods.clone(), name.clone()));
    let (fault_s, zombie, node_back) = match fault {
        Fault::Partition => {
            let zombie = Zombie::find(&old_pod)?;
            let node_back = NodeBack::new(&node);
            let out = run(
                tokio::process::Command::new(cluster_dir().join("node-partition.sh")).arg(&node),
            )
            .await?;
            let fault_s: f64 = out.trim().parse().context("node-partition.sh's time")?;
            zombie.drain(&node, &old_pod)?;
            (fault_s, Some(zombie), Some(node_back))
        }
        Fault::DeviceFault => {
            let at = now_s();
            std::fs::write(dir.join(GPU_FAULT_TRIGGER), b"")?;
            (at, None, None)
        }
    };
    let seen = tokio::time::timeout(Duration::from_secs(120), replacement)
        .await
        .context("no Running replacement (attempt 2) within 120 s of the fault")???;
    let new_node = node_of(&seen.pod)?;
    let (resumed_at, step_at, resumed_from) = poll_until(
        "the replacement's first step",
        Duration::from_secs(120),
        Duration::from_millis(250),
        || first_step(&namespace, seen.pod.name_any()),
    )
    .await?;
    let status = jobs.get(&name).await?.status.context("status")?;
    let reason = status
        .failovers
        .first()
        .map(|f| f.reason)
        .context("no failover recorded in status")?;
    Ok(Failover {
        fault,
        node,
        new_node,
        reason,
        resumed_from,
        checkpoints_at_fault,
        old_exit_code: seen.old_exit_code,
        created_s: seen.created_at - fault_s,
        running_s: seen.running_at - fault_s,
        resumed_s: resumed_at - fault_s,
        first_step_s: step_at - fault_s,
        job,
        old_pod,
        zombie,
        node_back,
    })
}

/// What the watch of a job's pods saw until its replacement ran.
struct Seen {
    /// Wall-clock seconds when the replacement was first seen, and when it was Running.
    created_at: f64,
    running_at: f64,
    /// The replacement.
    pod: Pod,
    /// The exit code of attempt 1's container, if the watch saw it end.
    old_exit_code: Option<i32>,
}

/// Watches the job's pods until one of attempt 2 is Running.
async fn replacement(pods: Api<Pod>, job: String) -> Result<Seen> {
    let mut created = None;
    let mut old_exit_code = None;
    let mut events = std::pin::pin!(watcher(pods, selector(&job)).applied_objects());
    while let Some(pod) = events.try_next().await? {
        match attempt_label(&pod) {
            Some(1) => {
                let code = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .and_then(|s| s.first())
                    .and_then(|c| c.state.as_ref()?.terminated.as_ref())
                    .map(|t| t.exit_code);
                old_exit_code = old_exit_code.or(code);
            }
            Some(2) => {
                let now = now_s();
                let created_at = *created.get_or_insert(now);
                if is_live_running(&pod) {
                    return Ok(Seen {
                        created_at,
                        running_at: now,
                        pod,
                        old_exit_code,
                    });
                }
            }
            _ => {}
        }
    }
    bail!("the watch of {job}'s pods ended")
}

/// From the pod's log (with containerd's timestamps): when it printed `resumed` and its first `step` after it,
/// and the step it resumed from; `None` until both are there.
async fn first_step(namespace: &str, pod: String) -> Result<Option<(f64, f64, u64)>> {
    let log = run(kubectl()?
        .args(["logs", "--timestamps", "-n", namespace])
        .arg(&pod))
    .await?;
    let mut resumed = None;
    for line in log.lines() {
        let Some((stamp, text)) = line.split_once(' ') else {
            continue;
        };
        let Ok(event) = serde_json::from_str::<serde_json::Value>(text) else {
            continue;
        };
        let at = || -> Result<f64> {
            let t: Timestamp = stamp
                .parse()
                .with_context(|| format!("timestamp {stamp}"))?;
            Ok(t.as_nanosecond() as f64 / 1e9)
        };
        match (event["event"].as_str(), resumed) {
            (Some("resumed"), None) => {
                resumed = Some((at()?, event["step"].as_u64().context("resumed step")?));
            }
            (Some("step"), Some((resumed_at, from))) => {
                return Ok(Some((resumed_at, at()?, from)));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// `p`-th percentile (nearest rank) of `values`.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}
