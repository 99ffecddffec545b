//! `anneal-runtime train --config FILE` (or `--job-spec FILE`, a TrainingJob's spec): trains a model, checkpointing every N steps and
//! resuming exactly from the newest valid checkpoint, then writes the model directory.

pub mod base;
pub mod config;
pub mod dpo;
pub mod fused;
pub mod gang;
pub mod job_spec;
pub mod lora;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod progress;
pub mod resume;
pub mod status;
pub mod tensorboard;
pub mod trainer;

use crate::checkpoint::{CheckpointDir, CheckpointError, model_dir};
use crate::data::DataError;
use crate::dist::{Collective, GangSpec, Placement, Timeouts};
use crate::error::RuntimeError;
use anneal_crds::contract;
use config::TrainConfig;
use progress::{Reporter, StepReport};
use std::path::{Path, PathBuf};
use std::time::Instant;
use trainer::Trainer;

/// Arguments of `anneal-runtime train`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Training configuration (YAML or JSON), mirroring the TrainingJob spec.
    #[arg(
        long,
        required_unless_present = "job_spec",
        conflicts_with = "job_spec"
    )]
    pub config: Option<PathBuf>,
    /// A TrainingJob's spec (JSON or YAML), as the operator mounts it into worker pods.
    #[arg(long)]
    pub job_spec: Option<PathBuf>,
    /// Attempt number of this worker; checkpoints of newer attempts are never overwritten.
    #[arg(long, env = contract::ENV_ATTEMPT, default_value_t = 0)]
    pub attempt: u64,
    /// Checkpoint directory (overrides the config's `checkpoint.dir`).
    #[arg(long, env = contract::ENV_CHECKPOINT_DIR)]
    pub checkpoint_dir: Option<String>,
    /// Device: auto, cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Serve Prometheus `/metrics` of the run on this address (e.g. `0.0.0.0:9090`).
    #[arg(long, env = "ANNEAL_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Write a TensorBoard event file of the logged steps into this directory.
    #[arg(long, env = "ANNEAL_TENSORBOARD_DIR")]
    pub tensorboard_dir: Option<PathBuf>,
    /// Rank of this worker in a data-parallel gang.
    #[arg(long, env = contract::ENV_RANK, default_value_t = 0)]
    pub rank: usize,
    /// Workers in the gang; each trains on its shard of every global batch of
    /// `world size x batchSize` samples.
    #[arg(long, env = contract::ENV_WORLD_SIZE, default_value_t = 1)]
    pub world_size: usize,
    /// `host:port` of rank 0's rendezvous (rank 0 listens on its port).
    #[arg(long, env = contract::ENV_RENDEZVOUS)]
    pub rendezvous: Option<String>,
    /// A peer silent this long (not even a heartbeat) is lost, and the attempt with it.
    #[arg(long, env = "ANNEAL_PEER_TIMEOUT_SECONDS", default_value_t = 10.0)]
    pub peer_timeout_seconds: f64,
    /// How long the ranks wait for each other to start.
    #[arg(
        long,
        env = "ANNEAL_RENDEZVOUS_TIMEOUT_SECONDS",
        default_value_t = 300.0
    )]
    pub rendezvous_timeout_seconds: f64,
    /// Where gradient sums run: auto (NCCL for a gang on CUDA, else the TCP ring), ring, or nccl
    /// (even for a lone worker).
    #[arg(long, env = contract::ENV_COLLECTIVE, value_enum, default_value_t = Collective::Auto)]
    pub collective: Collective,
}

impl Args {
    /// The gang settings of this run (world size 1: a lone worker).
    pub fn placement(&self) -> Result<(Placement, Timeouts), RuntimeError> {
        let placement = Placement {
            rank: self.rank,
            world: self.world_size,
            rendezvous: self.rendezvous.clone(),
        };
        placement
            .validate()
            .map_err(|e| RuntimeError::User(e.to_string()))?;
        let secs = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(std::time::Duration::from_secs_f64(v))
            } else {
                Err(RuntimeError::User(format!("--{name} must be positive")))
            }
        };
        let peer = secs("peer-timeout-seconds", self.peer_timeout_seconds)?;
        let timeouts = Timeouts {
            rendezvous: secs(
                "rendezvous-timeout-seconds",
                self.rendezvous_timeout_seconds,
            )?,
            peer,
            heartbeat: (peer / 10).max(std::time::Duration::from_millis(10)),
        };
        Ok((placement, timeouts))
    }
}

/// Where a run's figures go besides stdout.
#[derive(Default)]
pub struct Observers {
    /// Prometheus metrics, when served.
    pub metrics: Option<std::sync::Arc<metrics::TrainMetrics>>,
    /// TensorBoard event directory.
    pub tensorboard_dir: Option<PathBuf>,
}

/// Why training stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(String),
    /// The data is missing or malformed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The base model directory cannot be loaded.
    #[error("base model: {0}")]
    Base(CheckpointError),
    /// Checkpoint or output I/O failed, or this attempt is fenced.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    /// The checkpoint directory holds another job's or another run's checkpoints.
    #[error("cannot resume: {0}")]
    Resume(String),
    /// The loss or gradients became NaN or infinite.
    #[error("training diverged at step {step}: non-finite gradient norm (lower the learning rate)")]
    Diverged {
        /// The step.
        step: u64,
    },
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The data-parallel gang failed (a peer lost, ranks that disagree).
    #[error("gang: {0}")]
    Gang(#[from] crate::dist::DistError),
    /// A bug.
    #[error("{0}")]
    Internal(String),
}

impl From<TrainError> for RuntimeError {
    fn from(e: TrainError) -> Self {
        let msg = e.to_string();
        match e {
            TrainError::Config(_)
            | TrainError::Data(_)
            | TrainError::Base(_)
            | TrainError::Resume(_)
            | TrainError::Diverged { .. } => RuntimeError::User(msg),
            // A stale attempt must not be retried: the newer attempt owns the job now.
            TrainError::Checkpoint(CheckpointError::Fenced { .. }) => RuntimeError::User(msg),
            // CUDA faults fail over (75); out of GPU memory is the job's size (65); else 1.
            TrainError::Tensor(e) => crate::error::from_tensor_error(&e),
            TrainError::Gang(e) => match e.exit_code() {
                contract::EXIT_PEER_LOST => RuntimeError::PeerLost(msg),
                contract::EXIT_USER_ERROR => RuntimeError::User(msg),
                _ => RuntimeError::Internal(msg),
            },
            _ => RuntimeError::Internal(msg),
        }
    }
}

/// Runs `anneal-runtime train`.
pub fn run(args: Args) -> crate::error::Result<()> {
    let (placement, timeouts) = args.placement()?;
    let mut config = match (&args.config, &args.job_spec) {
        (Some(path), _) => TrainConfig::from_file(path),
        (None, Some(path)) => job_spec::from_file(path),
        (None, None) => Err("give --config or --job-spec".to_string()),
    }
    .map_err(RuntimeError::User)?;
    if let Some(dir) = args.checkpoint_dir {
        config.checkpoint.dir = Some(dir);
    }
    let threads = config.hyperparameters.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
    });
    crate::device::set_cpu_threads(threads);
    crate::device::keep_freed_memory();
    crate::device::serial_elementwise();
    let device = crate::device::parse_device(&args.device)?;
    let mut observers = Observers {
        tensorboard_dir: args.tensorboard_dir,
        ..Observers::default()
    };
    if let Some(addr) = args.metrics_addr {
        let m = std::sync::Arc::new(metrics::TrainMetrics::default());
        metrics::serve(addr, m.clone())
            .map_err(|e| RuntimeError::User(format!("--metrics-addr {addr}: {e}")))?;
        observers.metrics = Some(m);
    }
    let gang = GangSpec {
        placement,
        job_uid: String::new(),
        attempt: args.attempt,
        timeouts,
        collective: args.collective,
    };
    train(config, &gang, device, &observers).map_err(RuntimeError::from)
}

/// Trains to the configured number of steps and writes the model directory: as a lone worker,
/// or as one rank of `gang` (its attempt fences checkpoints; its `job_uid` is filled in from
/// the job's identity). Only rank 0 claims the checkpoint directory and writes checkpoints,
/// status and the model; the others resume read-only from the same checkpoint.
pub fn train(
    config: TrainConfig,
    gang: &GangSpec,
    device: candle_core::Device,
    observers: &Observers,
) -> Result<(), TrainError> {
    let attempt = gang.attempt;
    let rank = gang.placement.rank;
    let leader = rank == 0;
    let reporter = Reporter::default();
    let job = resume::JobIdentity::from_env();
    let output = trainer::resolve(&config.output.path)?;
    let ckpt_root = match &config.checkpoint.dir {
        Some(uri) => Some(trainer::resolve(uri)?),
        None => None,
    };
    let mut t = Trainer::new(config, device)?;
    t.job = job.clone();
    let ckpt_dir = match &ckpt_root {
        // Before claiming: a claim fences the directory's writers and removes their
        // unfinished checkpoints, which must not happen to another job's.
        Some(root) => {
            resume::check_directory(root, &job, &t.config, &t.model_config)?;
            // Only rank 0 writes; the others read.
            leader
                .then(|| CheckpointDir::open(root, attempt))
                .transpose()?
        }
        None => None,
    };
    let latest = match (&ckpt_dir, &ckpt_root) {
        (Some(dir), _) => dir.latest_valid(|w| reporter.warn(w))?,
        (None, Some(root)) => crate::checkpoint::latest_valid(root, |w| reporter.warn(w))?,
        (None, None) => None,
    };
    let mut resumed = None;
    if let Some((step, path)) = latest {
        let accepted = t.restore(&path)?;
        if accepted.unrecorded_job {
            reporter.warn(&format!(
                "checkpoint {} records no job (written by an older runtime): resuming it as {job}'s",
                path.display()
            ));
        }
        if !accepted.changes.is_empty() {
            reporter.warn(&format!(
                "resuming checkpoint {} with changed settings: {}",
                path.display(),
                accepted.changes.join(", ")
            ));
        }
        reporter.event(&serde_json::json!({
            "event": "resumed", "step": step, "checkpoint": path.display().to_string(), "attempt": attempt,
            "changed": accepted.changes,
        }));
        resumed = Some(serde_json::json!({
            "step": step, "checkpoint": path.display().to_string(), "changed": accepted.changes,
        }));
    }
    if let Some(kind) = t.base_kind {
        reporter.event(&serde_json::json!({
            "event": "base", "model": t.config.model.base, "kind": kind,
            "parameters": t.model_config.param_count(),
        }));
    }
    let started = Instant::now();
    let scored = t.compute_reference()?;
    if scored > 0 {
        reporter.event(&serde_json::json!({
            "event": "reference", "pairs": scored,
            "seconds": (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        }));
    }
    if gang.placement.world > 1 {
        let spec = GangSpec {
            job_uid: job.uid.clone().unwrap_or_else(|| "local".into()),
            ..gang.clone()
        };
        let digest = gang::state_digest(&t)?;
        t.gang = crate::dist::tcp::join(&spec, &digest, None)?;
        reporter.event(&serde_json::json!({
            "event": "gang", "rank": rank, "world": gang.placement.world, "state": digest,
        }));
    }
    if let Some(transport) = device_collective(&mut t, gang.collective)? {
        reporter.event(&serde_json::json!({
            "event": "collective", "gradients": transport, "world": t.gang.world(),
        }));
    }
    reporter.event(&serde_json::json!({
        "event": "start", "step": t.step, "attempt": attempt,
        "parameters": t.model_config.param_count(), "train_samples": t.data.len(),
    }));
    let h = t.config.hyperparameters.clone();
    let reporter_k8s = match (&job.name, &job.namespace) {
        (Some(name), Some(ns)) if leader => {
            Some(status::StatusReporter::start(status::StatusTarget {
                name: name.clone(),
                namespace: ns.clone(),
                uid: job.uid.clone(),
                attempt,
            }))
        }
        _ => None,
    };
    let mut events = match &observers.tensorboard_dir {
        Some(dir) if leader => Some(tensorboard::EventWriter::create(dir).map_err(|e| {
            TrainError::Config(format!("--tensorboard-dir {}: {e}", dir.display()))
        })?),
        _ => None,
    };
    let (mut window_start, mut window_tokens) = (Instant::now(), 0usize);
    while t.step < h.steps {
        let stats = t.train_step()?;
        window_tokens += stats.tokens;
        if t.step % h.log_every.max(1) == 0 || t.step == h.steps {
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let report = StepReport {
                event: "step",
                step: t.step,
                total_steps: h.steps,
                loss: stats.loss,
                lr: stats.lr,
                grad_norm: stats.grad_norm,
                tokens_per_sec: window_tokens as f64 / secs,
                epoch: t.data.cursor().epoch,
                preference: stats.preference,
            };
            reporter.step(&report);
            if let Some(m) = &observers.metrics {
                m.step(&report, window_tokens as u64);
            }
            if let Some(w) = &mut events {
                let mut scalars = vec![
                    ("train/loss", report.loss),
                    ("train/learning_rate", report.lr),
                    ("train/grad_norm", report.grad_norm),
                    ("train/tokens_per_second", report.tokens_per_sec),
                ];
                if let Some(p) = &report.preference {
                    scalars.extend([
                        ("train/rewards/chosen", p.rewards_chosen),
                        ("train/rewards/rejected", p.rewards_rejected),
                        ("train/rewards/margins", p.rewards_margins),
                        ("train/rewards/accuracies", p.rewards_accuracies),
                    ]);
                }
                if let Err(e) = w.scalars(report.step, &scalars) {
                    reporter.warn(&format!("tensorboard: {e}"));
                    events = None;
                }
            }
            if let Some(k8s) = &reporter_k8s {
                let mut p =
                    anneal_crds::trainingjob::TrainingProgress::at(report.step, report.total_steps);
                p.loss = Some(report.loss);
                p.learning_rate = Some(report.lr);
                p.tokens_per_second = Some(report.tokens_per_sec);
                p.rewards =
                    report
                        .preference
                        .map(|r| anneal_crds::trainingjob::PreferenceRewards {
                            chosen: r.rewards_chosen,
                            rejected: r.rewards_rejected,
                            margins: r.rewards_margins,
                            accuracies: r.rewards_accuracies,
                        });
                k8s.report(p);
            }
            (window_start, window_tokens) = (Instant::now(), 0);
        }
        let every = t.config.checkpoint.every_steps;
        if let Some(dir) = &ckpt_dir
            && ((every > 0 && t.step % every == 0) || t.step == h.steps)
        {
            let path = t.save_checkpoint(dir)?;
            reporter.event(&serde_json::json!({
                "event": "checkpoint", "step": t.step, "path": path.display().to_string(),
            }));
            if let Some(m) = &observers.metrics {
                m.checkpoint();
            }
            if let Some(k8s) = &reporter_k8s {
                k8s.checkpoint(anneal_crds::trainingjob::CheckpointRecord {
                    step: t.step,
                    attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                    uri: format!("file://{}", path.display()),
                    time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::jiff::Timestamp::now(),
                    )),
                });
            }
        }
    }
    if !leader {
        // Rank 0 writes the model; the others end with it, so that a failure to write it
        // ends the whole attempt.
        t.gang.barrier()?;
        reporter.event(&serde_json::json!({ "event": "done", "step": t.step, "rank": rank }));
        return Ok(());
    }
    let sha256 =
        model_dir::save_with(
            &output,
            &t.model_config,
            &t.tensors()?,
            &t.text,
            |dir| match &t.lora {
                Some(lora) => lora.write_peft(
                    dir,
                    &t.model_config,
                    t.config.model.base.as_deref().unwrap_or_default(),
                ),
                None => Ok(()),
            },
        )?;
    let gguf = match t.config.output.gguf {
        Some(q) => Some(crate::checkpoint::gguf_export::export(&output, q)?),
        None => None,
    };
    reporter.event(&serde_json::json!({
        "event": "done", "step": t.step, "model": { "path": output.display().to_string(), "sha256": sha256 },
        "gguf": gguf.as_ref().map(|g| serde_json::json!({"path": g.path.display().to_string(), "sha256": g.sha256})),
    }));
    let artifact = anneal_crds::trainingjob::ModelArtifact {
        uri: t.config.output.path.clone(),
        sha256,
        gguf_uri: t.config.output.gguf.map(|q| {
            format!(
                "{}/{}",
                t.config.output.path.trim_end_matches('/'),
                crate::checkpoint::gguf_export::file_name(q)
            )
        }),
    };
    write_termination_message(
        &contract::termination_log(),
        &termination_message(&artifact, resumed),
    );
    t.gang.barrier()?;
    Ok(())
}

/// The termination message: the artifact, and the resume with the settings that changed since
/// the checkpoint was written (status has no field for them yet). The resume is left out when
/// the message would not fit, so that the artifact always does.
fn termination_message(
    artifact: &anneal_crds::trainingjob::ModelArtifact,
    resumed: Option<serde_json::Value>,
) -> serde_json::Value {
    let without = serde_json::json!({ "artifact": artifact });
    let Some(resumed) = resumed else {
        return without;
    };
    let with = serde_json::json!({ "artifact": artifact, "resumed": resumed });
    if with.to_string().len() <= contract::TERMINATION_MESSAGE_MAX_BYTES {
        with
    } else {
        without
    }
}

/// Tells the operator what was produced: the termination message of the worker container,
/// which it copies into `status.artifact`. Only where the file exists (in a pod); a failure to
/// write it is a warning, the model itself is safely written.
fn write_termination_message(path: &Path, message: &serde_json::Value) {
    if !path.exists() {
        return;
    }
    let text = message.to_string();
    if text.len() > contract::TERMINATION_MESSAGE_MAX_BYTES {
        eprintln!("anneal-runtime: warning: termination message over 4 KB, not written");
        return;
    }
    if let Err(e) = std::fs::write(path, text) {
        eprintln!("anneal-runtime: warning: {}: {e}", path.display());
    }
}

/// Attaches the device transport `choice` asks for ([`Collective`]) to the trainer's gang; its
/// name, if any.
fn device_collective(
    t: &mut trainer::Trainer,
    choice: Collective,
) -> Result<Option<&'static str>, TrainError> {
    let wanted = match choice {
        Collective::Auto => t.device().is_cuda() && t.gang.world() > 1,
        Collective::Ring => false,
        Collective::Nccl => true,
    };
    if !wanted {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        let device = t.device().clone();
        let nccl = crate::dist::nccl::Nccl::join(&mut t.gang, &device)?;
        t.gang.attach(Box::new(nccl));
        Ok(Some("nccl"))
    }
    #[cfg(not(feature = "cuda"))]
    Err(TrainError::Config(
        "--collective nccl: this anneal-runtime was built without the cuda feature".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anneal_crds::trainingjob::ModelArtifact;

    #[test]
    fn the_termination_message_says_a_resume_and_always_fits_the_artifact() {
        let artifact = ModelArtifact {
            uri: "pvc://models/arith".into(),
            sha256: "ab12".into(),
            gguf_uri: None,
        };
        let plain = termination_message(&artifact, None);
        assert_eq!(plain, serde_json::json!({ "artifact": artifact }));
        let resumed = serde_json::json!({
            "step": 20, "checkpoint": "/checkpoints/step-00000020",
            "changed": ["hyperparameters.learningRate 0.003 -> 0.001"],
        });
        let message = termination_message(&artifact, Some(resumed.clone()));
        assert_eq!(message["resumed"], resumed);
        assert_eq!(message["artifact"]["sha256"], "ab12");
        let long =
            serde_json::json!({ "changed": ["x".repeat(contract::TERMINATION_MESSAGE_MAX_BYTES)] });
        assert_eq!(termination_message(&artifact, Some(long)), plain);
    }
}
