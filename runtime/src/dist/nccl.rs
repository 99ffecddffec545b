//! Gradient sums on CUDA through NCCL (cudarc's bindings): a gang on GPUs all-reduces its
//! gradients where they are, device to device, instead of through the host and the TCP ring.
//!
//! The TCP ring stays the gang's control plane: the rendezvous (rank 0 admits the others and
//! checks their starting state), the step's small sums and the barriers. NCCL's unique id, which
//! every rank needs to join the communicator, travels over that ring from rank 0.
//!
//! A failure of NCCL (a peer gone) is reported as a lost peer, like the ring's.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::{DeviceReduce, DistError, Ring};

/// This rank's NCCL communicator.
pub struct Nccl {
    comm: Arc<Comm>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as no two threads use it at
// once (NCCL's thread-safety rules); `Nccl` is not `Sync` and is used only by the trainer thread
// that owns it.
unsafe impl Send for Nccl {}

impl Nccl {
    /// Joins the communicator of `ring`'s gang on `device` (a CUDA device): rank 0 makes the
    /// unique id and the ring carries it to every rank (the others add zeros); then every rank
    /// initialises its communicator, which returns once all have.
    pub fn join(ring: &mut Ring, device: &Device) -> Result<Self, DistError> {
        let cuda = device
            .as_cuda_device()
            .map_err(|e| DistError::Config(format!("NCCL needs a CUDA device: {e}")))?;
        let mut bytes = [0f64; 128];
        if ring.rank() == 0 {
            let id = Id::new().map_err(|e| DistError::Config(format!("ncclGetUniqueId: {e:?}")))?;
            for (b, c) in bytes.iter_mut().zip(id.internal()) {
                *b = f64::from(*c as u8);
            }
        }
        ring.all_reduce_sum(&mut bytes)?;
        let mut internal = [0; 128];
        for (c, b) in internal.iter_mut().zip(bytes) {
            *c = b as u8 as _;
        }
        let comm = Comm::from_rank(
            cuda.cuda_stream(),
            ring.rank(),
            ring.world(),
            Id::uninit(internal),
        )
        .map_err(|e| DistError::PeerLost(format!("ncclCommInitRank: {e:?}")))?;
        Ok(Self {
            comm: Arc::new(comm),
        })
    }
}

impl DeviceReduce for Nccl {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, DistError> {
        t.contiguous()
            .and_then(|t| t.apply_op1_no_bwd(&AllReduceSum(self)))
            .map_err(|e| DistError::PeerLost(format!("NCCL all-reduce: {e}")))
    }
}

/// The sum over the gang of a contiguous CUDA tensor, as a candle op (a new tensor).
struct AllReduceSum<'a>(&'a Nccl);

impl AllReduceSum<'_> {
    fn reduce(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<CudaStorage> {
        let Some((from, to)) = l.contiguous_offsets() else {
            candle_core::bail!("all-reduce: contiguous input only");
        };
        let src = s.as_cuda_slice::<f32>()?.slice(from..to);
        let device = s.device().clone();
        // SAFETY: every element is written by the all-reduce before it is read.
        let mut dst: CudaSlice<f32> = unsafe { device.alloc::<f32>(to - from) }?;
        self.0
            .comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, device))
    }
}

impl CustomOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("an NCCL all-reduce needs CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        // Gradients are f32 whatever the compute dtype (they come back through the casts).
        let out = match s.dtype() {
            DType::F32 => self.reduce(s, l)?,
            other => candle_core::bail!("NCCL all-reduce of {other:?} gradients"),
        };
        Ok((out, l.shape().clone()))
    }
}
