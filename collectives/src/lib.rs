//! Collective communication for data-parallel training.
//!
//! This crate owns the [`Collective`] trait (all-reduce, all-gather, broadcast, barrier over `tch` tensors),
//! its two backends and gradient bucketing:
//!
//! - [`RingTcp`]: a ring all-reduce (reduce-scatter then all-gather, chunked and pipelined) over TCP between
//!   processes, for CPU training, tests and laptops. Results are bit-identical on every rank and depend only on
//!   the world size, never on timing: each element is summed in one fixed order around the ring on one rank and
//!   then copied to the others.
//! - [`Nccl`]: NCCL for GPUs, opened at run time (the `libnccl.so.2` libtorch uses, or `M3D_NCCL_LIB`) with the
//!   CUDA driver through `cudarc`, so the crate builds and links on machines without CUDA; every entry point checks
//!   that the libraries can be loaded and fails with [`CollectiveError::NcclUnavailable`] instead of panicking.
//!   Non-blocking communicators: setup and every operation have a deadline, and a broken one is aborted.
//! - [`Bucketer`]: flattens a list of tensors (the gradients) into flat buffers of at most N MiB, all-reduces
//!   each bucket and copies the results back, in a deterministic order.
//!
//! Every rank must call the same collectives in the same order with the same sizes; [`RingTcp`] checks this
//! with a small header per operation and returns [`CollectiveError::Mismatch`] instead of exchanging garbage.
//! A dead or silent peer gives a typed error naming the rank within the configured timeout, never a hang: the
//! deadline, poll and abort decision is one watchdog shared by both backends (an [`AbortSignal`] cuts NCCL waits short).
//!
//! Knows nothing about the coordinator, recipes or models: whoever starts a worker passes the peers' addresses
//! (ring) or the NCCL unique id bytes (GPU).

mod bucket;
mod element;
mod error;
mod libnccl;
mod nccl;
mod raw;
mod ring;
mod watchdog;

pub use bucket::Bucketer;
pub use element::{DType, Element};
pub use error::CollectiveError;
pub use nccl::{nccl_available, nccl_library, Nccl, NcclId, NcclLibrary};
pub use ring::{RingListener, RingTcp, DEFAULT_CHUNK_BYTES};
pub use watchdog::AbortSignal;

use tch::{Device, Tensor};

/// Result of a collective operation.
pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

/// The reduction of [`Collective::all_reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum over the ranks.
    Sum,
    /// The sum divided by the world size (in the tensor's dtype), as DDP averages gradients.
    Mean,
}

/// Collective operations of one rank in a group of `world_size` ranks.
///
/// Calls are collective: every rank calls the same operation, in the same order, with tensors of the same
/// dtype and element count (and the same root for `broadcast`). Tensors are reduced in place.
pub trait Collective: Send {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Where this communicator works: `Cpu` for the TCP ring, `Cuda(d)` for NCCL. Tensors there are reduced in
    /// place; a backend may stage host tensors through its device (NCCL does, at the cost of two copies), so build
    /// what is reduced here — small values with [`Collective::scalars`].
    fn device(&self) -> Device;

    /// `values` as a 1-d f64 tensor on [`Collective::device`], ready for [`Collective::all_reduce`]: how a caller
    /// builds the few host values it reduces (counts, loss parts), so that they reach the collective on its device.
    fn scalars(&self, values: &[f64]) -> Result<Tensor> {
        let rank = self.rank();
        Tensor::f_from_slice(values)
            .and_then(|t| t.f_to_device(self.device()))
            .map_err(|source| CollectiveError::Torch {
                rank,
                op: "scalars",
                source,
            })
    }

    /// Reduces `tensor` over all ranks in place; afterwards every rank holds the same values.
    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()>;

    /// Concatenates every rank's `tensor` along dimension 0 in rank order (a 0-d tensor gives shape `[world]`).
    /// All ranks must pass tensors of the same shape and dtype.
    fn all_gather(&mut self, tensor: &Tensor) -> Result<Tensor>;

    /// Overwrites `tensor` on every rank with the values of rank `root`.
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()>;

    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<()>;
}

/// Turns an all-reduced sum into the mean for [`ReduceOp::Mean`] (in the tensor's dtype, as DDP averages).
pub(crate) fn finish_reduce(t: &mut Tensor, op: ReduceOp, world: usize, rank: usize) -> Result<()> {
    if op == ReduceOp::Mean && world > 1 {
        let _ = t
            .f_div_scalar_(world as f64)
            .map_err(|source| CollectiveError::Torch {
                rank,
                op: "all_reduce",
                source,
            })?;
    }
    Ok(())
}
