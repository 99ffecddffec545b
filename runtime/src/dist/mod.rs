//! Data-parallel collectives on the CPU: a ring all-reduce ([`ring`]) over TCP between the
//! workers of a gang ([`tcp`], rank 0 is the rendezvous) or over channels between threads of
//! one process ([`local`], for tests).
//!
//! The sum is computed in a fixed order (each chunk along the ring, starting at the same rank
//! every time), so the result depends only on the inputs, never on timing, and every rank ends
//! with the same bits: the replicas of the model stay identical without a broadcast.
//!
//! Failure is collective: a rank whose link breaks (the peer closed it, sent nothing, not even a
//! heartbeat, for the peer timeout, or aborted) tells its right neighbour to abort and returns an
//! error; the abort travels around the ring, so every rank ends within a few seconds.

pub mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;
pub mod tcp;
mod wire;

pub use ring::{Elem, Link, Ring};
pub use tcp::{GangSpec, Timeouts};

/// Where a gang's gradient sums run (`--collective`, env `ANNEAL_COLLECTIVE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Collective {
    /// NCCL when the gang trains on CUDA, else the TCP ring.
    #[default]
    Auto,
    /// Always the TCP ring (through the host).
    Ring,
    /// NCCL, even for a lone worker (a world of one: what the GPU check script runs on one GPU).
    Nccl,
}

/// A sum over the gang of tensors that live on an accelerator, computed there (NCCL on CUDA,
/// [`nccl`]) rather than through the host and the ring. Attached to a [`Ring`], which stays
/// the gang's control plane.
pub trait DeviceReduce: Send {
    /// The transport's name, for the logs.
    fn name(&self) -> &'static str;
    /// The element-wise sum of `t` over every rank (the same shape, dtype and device).
    fn all_reduce_sum(&self, t: &candle_core::Tensor) -> Result<candle_core::Tensor, DistError>;
}

/// Why a collective or the rendezvous failed.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A peer vanished (its connection closed or stayed silent past the timeout), aborted, or
    /// never arrived at the rendezvous: the gang cannot go on.
    #[error("peer lost: {0}")]
    PeerLost(String),
    /// A peer belongs to another job, attempt or gang size.
    #[error("peer refused: {0}")]
    Refused(String),
    /// The ranks do not start from the same state (weights, optimizer, step, data position).
    #[error("ranks disagree on the starting state: {0}")]
    StateMismatch(String),
    /// A frame out of sequence or malformed: a bug or a foreign connection.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The gang's settings are invalid.
    #[error("gang settings: {0}")]
    Config(String),
}

impl DistError {
    /// The process exit code of this failure ([`anneal_crds::contract`]): a lost or refusing
    /// peer is [`EXIT_PEER_LOST`](anneal_crds::contract::EXIT_PEER_LOST) (this worker is fine, the
    /// attempt is over); ranks that resumed different states or bad settings are the user's
    /// (a checkpoint volume not shared by all workers); a protocol error is internal.
    pub fn exit_code(&self) -> i32 {
        use anneal_crds::contract;
        match self {
            Self::PeerLost(_) | Self::Refused(_) => contract::EXIT_PEER_LOST,
            Self::StateMismatch(_) | Self::Config(_) => contract::EXIT_USER_ERROR,
            Self::Protocol(_) => contract::EXIT_INTERNAL,
        }
    }
}

/// Where this worker stands in its gang (`anneal-runtime train` reads it from the environment
/// the operator sets: `ANNEAL_RANK`, `ANNEAL_WORLD_SIZE`, `ANNEAL_RENDEZVOUS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// This worker's rank.
    pub rank: usize,
    /// Workers in the gang.
    pub world: usize,
    /// `host:port` of rank 0's rendezvous (unused at world size 1).
    pub rendezvous: Option<String>,
}

impl Placement {
    /// A single worker.
    pub fn solo() -> Self {
        Self {
            rank: 0,
            world: 1,
            rendezvous: None,
        }
    }

    /// Checks rank < world and that a gang has a rendezvous.
    pub fn validate(&self) -> Result<(), DistError> {
        if self.world == 0 || self.rank >= self.world {
            return Err(DistError::Config(format!(
                "rank {} is not below world size {}",
                self.rank, self.world
            )));
        }
        if self.world > 1 && self.rendezvous.is_none() {
            return Err(DistError::Config(format!(
                "world size {} needs {}",
                self.world,
                anneal_crds::contract::ENV_RENDEZVOUS
            )));
        }
        Ok(())
    }
}
