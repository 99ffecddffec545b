//! The contract between the operator and the runtime pods it launches: exit codes, environment
//! variables and file paths. Both binaries read these constants so that they cannot drift apart.

/// The run finished; for `train`, the model is written to the output location.
pub const EXIT_OK: i32 = 0;
/// Unexpected internal error (a bug or a transient failure): the operator retries with backoff.
pub const EXIT_INTERNAL: i32 = 1;
/// Bad configuration, missing or malformed data or model file (sysexits `EX_DATAERR`).
/// Retrying cannot help: the operator fails the job without consuming restarts.
pub const EXIT_USER_ERROR: i32 = 65;
/// The accelerator failed (a CUDA error, lost device, ECC fault; sysexits `EX_TEMPFAIL`).
/// The operator fails over: it excludes the node and resumes from the last checkpoint elsewhere.
pub const EXIT_DEVICE_FAULT: i32 = 75;
/// A peer of a data-parallel gang vanished, refused the handshake or aborted a collective
/// (sysexits `EX_PROTOCOL`). The worker itself is healthy: its node is not excluded. The gang
/// cannot go on without the peer, so the attempt ends; where another worker of the attempt shows
/// the cause (its node failed, it exited 75), that cause decides the replacement, else it is
/// retried like an internal error.
pub const EXIT_PEER_LOST: i32 = 76;

/// Env: name of the TrainingJob (or EvalGate) the pod works for.
pub const ENV_JOB_NAME: &str = "ANNEAL_JOB_NAME";
/// Env: namespace of that object.
pub const ENV_JOB_NAMESPACE: &str = "ANNEAL_JOB_NAMESPACE";
/// Env: UID of that object: checkpoints record it, so that a job never resumes another's (one
/// deleted and created again under the same name is another job).
pub const ENV_JOB_UID: &str = "ANNEAL_JOB_UID";
/// Env: name of the pod, unique among the writers of a checkpoint directory (temporary files
/// are named by it, never by process id: every container's first process is pid 1).
pub const ENV_POD_NAME: &str = "ANNEAL_POD_NAME";
/// Env: attempt number of this worker; checkpoints are fenced by it.
pub const ENV_ATTEMPT: &str = "ANNEAL_ATTEMPT";
/// Env: directory where checkpoints are written and resumed from.
pub const ENV_CHECKPOINT_DIR: &str = "ANNEAL_CHECKPOINT_DIR";
/// Env: rank of this worker in its gang, `0..world size` (the `i` of pod `<job>-a<attempt>-w<i>`).
pub const ENV_RANK: &str = "ANNEAL_RANK";
/// Env: number of workers of the gang (`spec.workers`).
pub const ENV_WORLD_SIZE: &str = "ANNEAL_WORLD_SIZE";
/// Env: `host:port` of rank 0's rendezvous, where the other ranks get the peer list.
pub const ENV_RENDEZVOUS: &str = "ANNEAL_RENDEZVOUS";
/// Env: where a gang's gradient sums run: `auto` (NCCL on CUDA, else the TCP ring), `ring` or
/// `nccl`.
pub const ENV_COLLECTIVE: &str = "ANNEAL_COLLECTIVE";
/// The port rank 0 listens on for the rendezvous and for its ring neighbour.
pub const RENDEZVOUS_PORT: u16 = 29500;

/// Where a `pvc://CLAIM/PATH` URI is found in a pod: the operator mounts claim `CLAIM` at
/// `PVC_ROOT/CLAIM`, and the runtime reads `PVC_ROOT/CLAIM/PATH`.
pub const PVC_ROOT: &str = "/mnt/pvc";

/// Where the runtime writes its result JSON for the operator (the container's termination message).
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// Env: another path for [`TERMINATION_LOG`] (outside a pod: the demo, tests).
pub const ENV_TERMINATION_LOG: &str = "ANNEAL_TERMINATION_LOG";

/// Where the result JSON goes: [`ENV_TERMINATION_LOG`], else [`TERMINATION_LOG`]. It is written
/// only where that file exists.
pub fn termination_log() -> std::path::PathBuf {
    std::env::var_os(ENV_TERMINATION_LOG)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| TERMINATION_LOG.into())
}

/// The termination message is cut by the kubelet at 4096 bytes; results must fit.
pub const TERMINATION_MESSAGE_MAX_BYTES: usize = 4096;

/// What `anneal-runtime eval` writes to its termination message, as far as an EvalGate reads
/// it. A value that is not finite is written as JSON `null` (and read as missing): a gate
/// never passes on NaN or infinity.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalMessage {
    /// sha256 of the weights evaluated (hex).
    pub model_sha256: String,
    /// Examples evaluated.
    #[serde(default)]
    pub examples: usize,
    /// Mean next-token cross-entropy.
    #[serde(default)]
    pub loss: Option<f64>,
    /// exp(loss).
    #[serde(default)]
    pub perplexity: Option<f64>,
    /// Teacher-forced next-token accuracy.
    #[serde(default)]
    pub token_accuracy: Option<f64>,
    /// Exact match of greedy responses; null for free-text data.
    #[serde(default)]
    pub exact_match: Option<f64>,
    /// Share of preference pairs ranked right; null for data without pairs.
    #[serde(default)]
    pub preference_accuracy: Option<f64>,
    /// The same for the baseline model, when one was asked for.
    #[serde(default)]
    pub baseline: Option<Box<EvalMessage>>,
}

impl EvalMessage {
    /// The finite value of `metric`, if reported.
    pub fn value(&self, metric: crate::evalgate::Metric) -> Option<f64> {
        use crate::evalgate::Metric;
        let v = match metric {
            Metric::Loss => self.loss,
            Metric::Perplexity => self.perplexity,
            Metric::Accuracy => self.exact_match,
            Metric::TokenAccuracy => self.token_accuracy,
            Metric::PreferenceAccuracy => self.preference_accuracy,
        };
        v.filter(|x| x.is_finite())
    }
}
