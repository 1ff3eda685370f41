//! `Nccl`: the GPU backend, NCCL through `cudarc` with dynamic loading.
//!
//! The crate links no CUDA library: `cudarc` opens `libcuda` and `libnccl` on first use, so m3d builds and runs
//! on machines without GPUs. A call into a library that could not be opened panics inside `cudarc`, so every entry
//! point here checks [`nccl_available`] first and returns [`CollectiveError::NcclUnavailable`].
//!
//! Rank 0 creates the [`NcclId`]; its 128 bytes travel to the other ranks through the coordinator.

use std::sync::Arc;

use tch::{Device, Tensor};

use crate::error::CollectiveError;
use crate::raw::nccl::Comm;
use crate::{Collective, ReduceOp, Result};

/// Ok when the CUDA driver and NCCL libraries can be loaded; otherwise says which is missing and how to fix it.
pub fn nccl_available() -> Result<()> {
    let (driver, nccl) = crate::raw::nccl::libraries_present();
    if !driver {
        return Err(CollectiveError::NcclUnavailable(
            "the CUDA driver library (libcuda.so) could not be loaded: no NVIDIA driver on this machine".into(),
        ));
    }
    if !nccl {
        return Err(CollectiveError::NcclUnavailable(
            "libnccl.so could not be loaded: the torch wheel ships nvidia/nccl/lib/libnccl.so.2 only; create a \
             libnccl.so link next to it and put that folder on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    Ok(())
}

/// An NCCL unique id: created once by rank 0, passed as bytes to every other rank.
#[derive(Clone, PartialEq, Eq)]
pub struct NcclId([u8; 128]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// Creates a new id (rank 0 only). Fails with `NcclUnavailable` where NCCL cannot be loaded.
    pub fn new() -> Result<NcclId> {
        nccl_available()?;
        crate::raw::nccl::unique_id().map(NcclId)
    }

    /// The id's bytes, to send to the other ranks.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Rebuilds an id from the bytes rank 0 exported; they must be exactly 128.
    pub fn from_bytes(bytes: &[u8]) -> Result<NcclId> {
        let arr: [u8; 128] = bytes.try_into().map_err(|_| {
            CollectiveError::NcclUnavailable(format!(
                "an NCCL unique id is 128 bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(NcclId(arr))
    }
}

/// An NCCL communicator for one rank on one CUDA device.
pub struct Nccl {
    rank: usize,
    world: usize,
    device: usize,
    comm: Comm,
    /// Keeps the device's primary context (the one libtorch uses) retained and current.
    _ctx: Arc<cudarc::driver::CudaContext>,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Nccl {
    /// Joins the communicator `id` as `rank` of `world` on CUDA device `device`. Blocks until all ranks joined.
    pub fn new(rank: usize, world: usize, id: &NcclId, device: usize) -> Result<Nccl> {
        if world == 0 {
            return Err(CollectiveError::InvalidWorld { world });
        }
        if rank >= world {
            return Err(CollectiveError::InvalidRank { rank, world });
        }
        nccl_available()?;
        // NCCL binds the communicator to the current device: make the device's primary context current.
        let ctx = cudarc::driver::CudaContext::new(device).map_err(|e| CollectiveError::Nccl {
            rank,
            call: "cuDevicePrimaryCtxRetain",
            detail: format!("CUDA device {device}: {e:?}"),
        })?;
        let comm = Comm::init(rank, world, &id.0)?;
        Ok(Nccl {
            rank,
            world,
            device,
            comm,
            _ctx: ctx,
        })
    }

    fn torch(&self, op: &'static str) -> impl Fn(tch::TchError) -> CollectiveError {
        let rank = self.rank;
        move |source| CollectiveError::Torch { rank, op, source }
    }

    /// Runs `f` on `t`, through a contiguous copy if it is not contiguous.
    fn on_contiguous(
        &mut self,
        t: &mut Tensor,
        op: &'static str,
        f: impl FnOnce(&mut Comm, &mut Tensor) -> Result<()>,
    ) -> Result<()> {
        if t.is_contiguous() {
            return f(&mut self.comm, t);
        }
        let mut c = t.f_contiguous().map_err(self.torch(op))?;
        f(&mut self.comm, &mut c)?;
        t.f_copy_(&c).map_err(self.torch(op))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.on_contiguous(tensor, "all_reduce", |c, t| c.all_reduce_sum(t))?;
        if op == ReduceOp::Mean && self.world > 1 {
            let _ = tensor
                .f_div_scalar_(self.world as f64)
                .map_err(self.torch("all_reduce"))?;
        }
        Ok(())
    }

    fn all_gather(&mut self, tensor: &Tensor) -> Result<Tensor> {
        let mut shape = tensor.size();
        if shape.is_empty() {
            shape.push(1);
        }
        shape[0] *= self.world as i64;
        let input = tensor.f_contiguous().map_err(self.torch("all_gather"))?;
        let mut out = Tensor::f_empty(shape.as_slice(), (tensor.kind(), tensor.device()))
            .map_err(self.torch("all_gather"))?;
        self.comm.all_gather(&input, &mut out)?;
        Ok(out)
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        if root >= self.world {
            return Err(CollectiveError::InvalidRoot {
                root,
                world: self.world,
            });
        }
        self.on_contiguous(tensor, "broadcast", |c, t| c.broadcast(t, root))
    }

    fn barrier(&mut self) -> Result<()> {
        let mut t = Tensor::f_zeros([1], (tch::Kind::Float, Device::Cuda(self.device)))
            .map_err(self.torch("barrier"))?;
        self.comm.all_reduce_sum(&mut t)?;
        // Wait for the reduction itself, not just its launch.
        tch::Cuda::synchronize(self.device as i64);
        Ok(())
    }
}
