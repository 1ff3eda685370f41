//! `Nccl`: the GPU backend.
//!
//! **Loading.** The crate links no CUDA library: the CUDA driver is opened by `cudarc` (dynamic loading) and NCCL by
//! m3d itself, from the file libtorch uses (`M3D_NCCL_LIB`, else the `libnccl.so.2` libtorch loaded or that lies
//! next to it, else the system's; see [`crate::libnccl`] for why `cudarc`'s NCCL loader cannot be used). So m3d
//! builds and runs on machines without GPUs; every entry point checks [`nccl_available`] first and returns
//! [`CollectiveError::NcclUnavailable`], naming every place tried, instead of panicking.
//!
//! **Ids.** Rank 0's [`NcclId`] (its 128 bytes travel to the other ranks through the coordinator) belongs to one
//! communicator: creating it starts a bootstrap thread and socket in this process that serve that communicator.
//!
//! **Timeouts.** The communicator is non-blocking (`ncclConfig_t.blocking = 0`, `ncclCommInitRankConfig`). Its
//! creation and every operation are waited for by a [`Watchdog`] with the communicator's timeout, polling
//! `ncclCommGetAsyncError` (an error, e.g. a peer's connection closing, fails at once) and, for operations, a CUDA
//! event recorded after the kernel. A timeout, an error or a raised [`AbortSignal`] (the coordinator ended the
//! round) aborts the communicator (`ncclCommAbort`, which also stops kernels that wait for a dead peer) and poisons
//! it: later calls fail with [`CollectiveError::Poisoned`]. So a dead peer costs the survivors an error within the
//! timeout (or as soon as the round is ended), never a hang, and dropping a broken communicator does not wait for
//! its pending work. Cost: each operation returns only when its kernel finished (the host waits, yielding at first
//! and then sleeping at most 1 ms), so the calling thread does not queue the next kernels meanwhile.
//!
//! **Streams.** libtorch queues its kernels on the legacy default stream. NCCL's kernels run on a stream of their
//! own (non-blocking, so not implicitly synchronised with the default one): each operation first makes it wait
//! for an event recorded on the default stream, so the collective reads what the kernels queued before it wrote
//! (the bucket copies, the gradients), and returns after its own kernel completed, so whatever is queued after
//! the call sees the result. Meanwhile other threads' kernels on the default stream (the backward pass, while a
//! communication thread reduces the buckets already complete) run beside the collective on the GPU — the overlap
//! DDP gets from its side stream.
//!
//! **Host tensors.** NCCL reads and writes only its own GPU's memory. A tensor there (contiguous) is used in place;
//! a host tensor is staged: copied to the GPU, reduced there, copied back (see [`on_device`]). That costs a device
//! allocation and two synchronous copies over PCIe per call — nothing for the few scalars a step reduces (bytes,
//! tens of microseconds), wasteful for large tensors: build those on [`Collective::device`] (small values with
//! [`Collective::scalars`]). A tensor on another GPU is refused.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use tch::{Device, Tensor};

use crate::error::CollectiveError;
use crate::raw::nccl::{CallWait, Comm, Stream};
use crate::watchdog::{AbortSignal, Status, WaitError, Watchdog, Watched};
use crate::{finish_reduce, Collective, ReduceOp, Result};

/// Ok when the CUDA driver and NCCL libraries can be loaded; otherwise says which is missing, where NCCL was
/// looked for, and how to fix it.
pub fn nccl_available() -> Result<()> {
    if !crate::raw::cuda_driver_present() {
        return Err(CollectiveError::NcclUnavailable(
            "the CUDA driver library (libcuda.so.1) could not be loaded: no NVIDIA driver on this machine".into(),
        ));
    }
    nccl_library().map(|_| ())
}

/// The NCCL library in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclLibrary {
    /// The file opened (a path, or a bare name the dynamic linker resolved).
    pub path: String,
    /// `major.minor.patch`.
    pub version: String,
}

/// Loads NCCL if needed (no GPU needed) and says which file and version are used; the error names every place
/// tried.
pub fn nccl_library() -> Result<NcclLibrary> {
    let api = crate::raw::nccl::api().map_err(CollectiveError::NcclUnavailable)?;
    Ok(NcclLibrary {
        path: api.path.clone(),
        version: crate::raw::nccl::version_string(api.version),
    })
}

/// An NCCL unique id: created by the rank that will be rank 0, passed as bytes to every other rank, used for one
/// communicator.
#[derive(Clone, PartialEq, Eq)]
pub struct NcclId([u8; 128]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// Creates a new id (`ncclGetUniqueId`: a bootstrap thread and listening socket in this process that serve the
    /// one communicator created from the id). Fails with `NcclUnavailable` where NCCL cannot be loaded.
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

/// Where a collective finds a tensor, relative to the device its communicator works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// On the communicator's device.
    Home,
    /// In host memory: staged through the device.
    Host,
    /// On another device: refused.
    Foreign,
}

pub(crate) fn placement(tensor: Device, home: Device) -> Placement {
    if tensor == home {
        Placement::Home
    } else if tensor == Device::Cpu {
        Placement::Host
    } else {
        Placement::Foreign
    }
}

/// `t` itself (`None`) if it is contiguous on `home`; otherwise a contiguous copy of it on `home` — for a host
/// tensor and a GPU communicator, an allocation on the device and a synchronous copy. A tensor on a device other
/// than `home` and the host is refused: mixing GPUs is a bug, not something to paper over with copies.
pub(crate) fn staged(
    t: &Tensor,
    home: Device,
    rank: usize,
    op: &'static str,
) -> Result<Option<Tensor>> {
    if !t.defined() {
        return Err(CollectiveError::UnsupportedTensor {
            rank,
            op,
            detail: "undefined tensor".into(),
        });
    }
    match placement(t.device(), home) {
        Placement::Home if t.is_contiguous() => Ok(None),
        Placement::Home | Placement::Host => t
            .f_to_device(home)
            .and_then(|s| s.f_contiguous())
            .map(Some)
            .map_err(|source| CollectiveError::Torch { rank, op, source }),
        Placement::Foreign => Err(CollectiveError::UnsupportedTensor {
            rank,
            op,
            detail: format!(
                "tensor on {:?}, but this communicator works on {home:?} (host tensors are staged through it; \
                 tensors on other devices are refused)",
                t.device()
            ),
        }),
    }
}

/// Runs `f` on a contiguous tensor on `home` holding `t`'s values, and leaves `f`'s result in `t`: `t` itself
/// where it is contiguous on `home`, else through [`staged`] and a copy back into `t` (whatever its device and
/// strides; for a host tensor, a second synchronous copy). An error of `f` leaves `t` as it was.
pub(crate) fn on_device(
    t: &mut Tensor,
    home: Device,
    rank: usize,
    op: &'static str,
    f: impl FnOnce(&mut Tensor) -> Result<()>,
) -> Result<()> {
    match staged(t, home, rank, op)? {
        None => f(t),
        Some(mut s) => {
            f(&mut s)?;
            t.f_copy_(&s)
                .map_err(|source| CollectiveError::Torch { rank, op, source })
        }
    }
}

/// An NCCL communicator for one rank on one CUDA device. See the module docs for timeouts and host tensors.
pub struct Nccl {
    rank: usize,
    world: usize,
    device: usize,
    timeout: Duration,
    signal: AbortSignal,
    poisoned: Option<String>,
    // Dropped in this order: the communicator (finalized or already aborted) before the CUDA objects.
    comm: Comm,
    /// Recorded on the default stream before each operation; NCCL's stream waits for it.
    queued: CudaEvent,
    /// Recorded on NCCL's stream after each operation; the host waits for it.
    done: CudaEvent,
    /// libtorch's stream (the legacy default stream).
    torch_stream: Arc<CudaStream>,
    /// Where NCCL's kernels run.
    stream: Arc<CudaStream>,
    /// Keeps the device's primary context (the one libtorch uses) retained; bound to the calling thread before
    /// every NCCL call.
    ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Waiting for an enqueued operation: NCCL accepted it (`ncclCommGetAsyncError` no longer in progress), then its
/// kernel finished (the event recorded after it completed); an asynchronous error at any point fails it.
struct OpWait<'a> {
    comm: &'a mut Comm,
    done: &'a CudaEvent,
    stream: &'a CudaStream,
    recorded: bool,
    call: &'static str,
    rank: usize,
}

impl OpWait<'_> {
    fn cuda(&self, call: &'static str, e: cudarc::driver::DriverError) -> CollectiveError {
        CollectiveError::Nccl {
            rank: self.rank,
            call,
            detail: format!("CUDA: {e:?}"),
        }
    }
}

impl Watched for OpWait<'_> {
    type Output = ();
    type Error = CollectiveError;

    fn poll(&mut self) -> Status<(), CollectiveError> {
        match self.comm.status(self.call) {
            Status::Done(()) => {}
            other => return other,
        }
        // The kernel is on the stream only once NCCL is no longer in progress with the call: record after that.
        if !self.recorded {
            if let Err(e) = self.done.record(self.stream) {
                return Status::Failed(self.cuda("cuEventRecord", e));
            }
            self.recorded = true;
        }
        match self.done.try_is_complete() {
            Ok(true) => Status::Done(()),
            Ok(false) => Status::Pending,
            Err(e) => Status::Failed(self.cuda("cuEventQuery", e)),
        }
    }

    fn abort(&mut self) {
        self.comm.abort();
    }
}

/// How long a drop waits for `ncclCommFinalize` at most before aborting instead.
const MAX_CLOSE: Duration = Duration::from_secs(30);

impl Nccl {
    /// Joins the communicator `id` as `rank` of `world` on CUDA device `device`. Waits until every rank joined, at
    /// most `timeout` (also the timeout of every later operation), or until `signal` is raised; either aborts the
    /// half-made communicator and returns an error.
    pub fn new(
        rank: usize,
        world: usize,
        id: &NcclId,
        device: usize,
        timeout: Duration,
        signal: &AbortSignal,
    ) -> Result<Nccl> {
        if world == 0 {
            return Err(CollectiveError::InvalidWorld { world });
        }
        if rank >= world {
            return Err(CollectiveError::InvalidRank { rank, world });
        }
        nccl_available()?;
        // NCCL binds the communicator to the current device: make the device's primary context current.
        let cuda = |call: &'static str| {
            move |e: cudarc::driver::DriverError| CollectiveError::Nccl {
                rank,
                call,
                detail: format!("CUDA device {device}: {e:?}"),
            }
        };
        let ctx = CudaContext::new(device).map_err(cuda("cuDevicePrimaryCtxRetain"))?;
        let queued = ctx.new_event(None).map_err(cuda("cuEventCreate"))?;
        let done = ctx.new_event(None).map_err(cuda("cuEventCreate"))?;
        let torch_stream = ctx.default_stream();
        let stream = ctx.new_stream().map_err(cuda("cuStreamCreate"))?;
        let mut comm = Comm::start(rank, world, &id.0, timeout.min(MAX_CLOSE))?;
        let dog = Watchdog::new("NCCL communicator setup", timeout)
            .with_signal(signal)
            .sleeps(Duration::from_millis(1), Duration::from_millis(20));
        let mut wait = CallWait {
            comm: &mut comm,
            call: "ncclCommInitRankConfig",
        };
        dog.wait(&mut wait).map_err(|e| wait_error(rank, e))?;
        tracing::debug!(rank, world, device, "NCCL communicator ready");
        Ok(Nccl {
            rank,
            world,
            device,
            timeout,
            signal: signal.clone(),
            poisoned: None,
            comm,
            queued,
            done,
            torch_stream,
            stream,
            ctx,
        })
    }

    /// The timeout of every operation (also the setup's).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A handle that, raised from any thread, aborts the operation this communicator is waiting for.
    pub fn abort_signal(&self) -> AbortSignal {
        self.signal.clone()
    }

    fn fail(&mut self, e: CollectiveError) -> CollectiveError {
        self.comm.abort();
        tracing::warn!(rank = self.rank, error = %e, "NCCL collective failed; communicator aborted");
        self.poisoned = Some(e.to_string());
        e
    }

    /// Launches an operation through `launch` and waits for it to finish on the GPU (see the module docs).
    fn run(
        &mut self,
        op: &'static str,
        launch: impl FnOnce(&mut Comm, Stream) -> Result<()>,
    ) -> Result<()> {
        if let Some(cause) = &self.poisoned {
            return Err(CollectiveError::Poisoned {
                rank: self.rank,
                cause: cause.clone(),
            });
        }
        if self.comm.is_aborted() {
            let e = CollectiveError::Aborted {
                rank: self.rank,
                op,
                reason: "the communicator was aborted".into(),
            };
            return Err(self.fail(e));
        }
        if let Err(e) = self.ctx.bind_to_thread() {
            let e = CollectiveError::Nccl {
                rank: self.rank,
                call: "cuCtxSetCurrent",
                detail: format!("{e:?}"),
            };
            return Err(self.fail(e));
        }
        // NCCL's stream starts the operation once the default stream's work queued so far is done.
        let fence = self
            .queued
            .record(&self.torch_stream)
            .and_then(|()| self.stream.wait(&self.queued));
        if let Err(e) = fence {
            let e = CollectiveError::Nccl {
                rank: self.rank,
                call: "cuEventRecord/cuStreamWaitEvent",
                detail: format!("{e:?}"),
            };
            return Err(self.fail(e));
        }
        match launch(&mut self.comm, self.stream.cu_stream() as Stream) {
            Ok(()) => {}
            // Nothing was launched: the caller's mistake, the communicator is fine.
            Err(e @ CollectiveError::UnsupportedTensor { .. }) => return Err(e),
            Err(e) => return Err(self.fail(e)),
        }
        let dog = Watchdog::new(op, self.timeout)
            .with_signal(&self.signal)
            .spin(Duration::from_millis(2))
            .sleeps(Duration::from_micros(20), Duration::from_millis(1));
        let mut wait = OpWait {
            comm: &mut self.comm,
            done: &self.done,
            stream: &self.stream,
            recorded: false,
            call: op,
            rank: self.rank,
        };
        match dog.wait(&mut wait) {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = wait_error(self.rank, e);
                Err(self.fail(e))
            }
        }
    }
}

impl Drop for Nccl {
    /// A broken communicator (an operation failed, or the [`AbortSignal`] was raised: the round is over) is
    /// aborted, never finalized: finalizing would wait for work that involves peers which may be gone. A healthy
    /// one is finalized (at most 30 s, then aborted) and destroyed when its `Comm` drops.
    fn drop(&mut self) {
        if self.poisoned.is_some() || self.signal.reason().is_some() {
            self.comm.abort();
        }
    }
}

fn wait_error(rank: usize, e: WaitError<CollectiveError>) -> CollectiveError {
    match e {
        WaitError::Failed(e) => e,
        WaitError::TimedOut { op, timeout } => CollectiveError::OpTimeout {
            rank,
            op,
            timeout,
            detail: String::new(),
        },
        WaitError::Cancelled { op, reason } => CollectiveError::Aborted { rank, op, reason },
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn device(&self) -> Device {
        Device::Cuda(self.device)
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        let (home, world, rank) = (self.device(), self.world, self.rank);
        on_device(tensor, home, rank, "all_reduce", |t| {
            self.run("all_reduce", |c, s| c.all_reduce_sum(t, s))?;
            finish_reduce(t, op, world, rank)
        })
    }

    fn all_gather(&mut self, tensor: &Tensor) -> Result<Tensor> {
        let (home, rank, op) = (self.device(), self.rank, "all_gather");
        let torch = |source| CollectiveError::Torch { rank, op, source };
        let mut shape = tensor.size();
        if shape.is_empty() {
            shape.push(1);
        }
        shape[0] *= self.world as i64;
        // The input is only read: staged without a copy back.
        let copy = staged(tensor, home, rank, op)?;
        let input = copy.as_ref().unwrap_or(tensor);
        let mut out = Tensor::f_empty(shape.as_slice(), (tensor.kind(), home)).map_err(torch)?;
        self.run(op, |c, s| c.all_gather(input, &mut out, s))?;
        if tensor.device() != home {
            out = out.f_to_device(tensor.device()).map_err(torch)?;
        }
        Ok(out)
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        if root >= self.world {
            return Err(CollectiveError::InvalidRoot {
                root,
                world: self.world,
            });
        }
        let (home, rank) = (self.device(), self.rank);
        on_device(tensor, home, rank, "broadcast", |t| {
            self.run("broadcast", |c, s| c.broadcast(t, root, s))
        })
    }

    fn barrier(&mut self) -> Result<()> {
        let rank = self.rank;
        let mut t = Tensor::f_zeros([1], (tch::Kind::Float, self.device())).map_err(|source| {
            CollectiveError::Torch {
                rank,
                op: "barrier",
                source,
            }
        })?;
        // `run` returns once the reduction finished on the GPU of every rank's stream: a barrier.
        self.run("barrier", |c, s| c.all_reduce_sum(&mut t, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn host_tensors_are_staged_other_devices_refused() {
        let gpu = Device::Cuda(0);
        assert_eq!(placement(gpu, gpu), Placement::Home);
        assert_eq!(placement(Device::Cpu, gpu), Placement::Host);
        assert_eq!(placement(Device::Cuda(1), gpu), Placement::Foreign);
        assert_eq!(placement(Device::Cpu, Device::Cpu), Placement::Home);
        assert_eq!(placement(Device::Cuda(0), Device::Cpu), Placement::Foreign);
    }

    /// A fake sum over `world` ranks that each hold the same values, with NCCL's own checks on what it is given.
    fn fake_sum(home: Device, world: f64) -> impl FnOnce(&mut Tensor) -> Result<()> {
        move |t: &mut Tensor| {
            assert_eq!(
                t.device(),
                home,
                "the operation runs on the communicator's device"
            );
            assert!(t.is_contiguous(), "the operation gets a contiguous tensor");
            let _ = t.f_mul_scalar_(world).unwrap();
            Ok(())
        }
    }

    #[test]
    fn a_contiguous_tensor_on_the_device_is_reduced_in_place() {
        let home = Device::Cpu;
        let mut t = Tensor::from_slice(&[1.0f64, 2.0, 3.0]);
        let ptr = t.data_ptr();
        on_device(&mut t, home, 0, "all_reduce", |s| {
            assert_eq!(s.data_ptr(), ptr, "no copy");
            fake_sum(home, 4.0)(s)?;
            finish_reduce(s, ReduceOp::Mean, 4, 0)
        })
        .unwrap();
        assert_eq!(Vec::<f64>::try_from(&t).unwrap(), [1.0, 2.0, 3.0]);
        on_device(&mut t, home, 0, "all_reduce", |s| {
            fake_sum(home, 4.0)(s)?;
            finish_reduce(s, ReduceOp::Sum, 4, 0)
        })
        .unwrap();
        assert_eq!(Vec::<f64>::try_from(&t).unwrap(), [4.0, 8.0, 12.0]);
        // 0-d and empty tensors too.
        let mut s = Tensor::scalar_tensor(3.0, (Kind::Float, home));
        on_device(&mut s, home, 0, "all_reduce", fake_sum(home, 2.0)).unwrap();
        assert_eq!(s.double_value(&[]), 6.0);
        let mut e = Tensor::zeros([0], (Kind::Float, home));
        on_device(&mut e, home, 0, "all_reduce", fake_sum(home, 2.0)).unwrap();
    }

    /// The staging path (copy in, operation, Mean, copy back) on the host: with a GPU communicator, the same
    /// code copies across PCIe instead. What only a GPU can show is the copy between devices itself.
    #[test]
    fn a_strided_tensor_is_staged_and_the_result_copied_back() {
        let home = Device::Cpu;
        let base = Tensor::arange(6, (Kind::Float, home)).view([2, 3]);
        let mut t = base.tr(); // 3 x 2, not contiguous, a view of `base`
        assert!(!t.is_contiguous());
        let ptr = t.data_ptr();
        on_device(&mut t, home, 1, "all_reduce", |s| {
            assert_ne!(s.data_ptr(), ptr, "a contiguous copy");
            fake_sum(home, 2.0)(s)?;
            finish_reduce(s, ReduceOp::Mean, 2, 1)?;
            let _ = s.f_add_scalar_(10.0).unwrap();
            Ok(())
        })
        .unwrap();
        // Written back through the view, in the caller's layout.
        assert_eq!(t.size(), [3, 2]);
        assert_eq!(
            Vec::<f32>::try_from(&base.flatten(0, -1)).unwrap(),
            [10.0, 11.0, 12.0, 13.0, 14.0, 15.0]
        );
        // An error of the operation leaves the caller's tensor as it was.
        let mut t = base.tr();
        let err = on_device(&mut t, home, 1, "all_reduce", |_| {
            Err(CollectiveError::Poisoned {
                rank: 1,
                cause: "test".into(),
            })
        })
        .unwrap_err();
        assert!(matches!(err, CollectiveError::Poisoned { .. }));
        assert_eq!(
            Vec::<f32>::try_from(&base.flatten(0, -1)).unwrap(),
            [10.0, 11.0, 12.0, 13.0, 14.0, 15.0]
        );
    }

    #[test]
    fn undefined_tensors_are_refused() {
        let mut t = Tensor::new();
        let err = on_device(&mut t, Device::Cpu, 2, "broadcast", |_| Ok(())).unwrap_err();
        assert!(
            matches!(
                err,
                CollectiveError::UnsupportedTensor {
                    rank: 2,
                    op: "broadcast",
                    ..
                }
            ),
            "{err}"
        );
    }
}
