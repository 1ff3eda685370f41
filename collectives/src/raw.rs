//! The crate's only unsafe code: viewing tensor memory without copying, and the raw NCCL calls.
//!
//! Why unsafe is needed here: `tch` has no safe borrowed view of a tensor's storage. Copying every gradient bucket
//! out of and back into libtorch would add two memory passes to each all-reduce (the benchmark's hot path), and NCCL
//! is a C library that takes device pointers. Everything here is checked before the pointer is used (device,
//! contiguity, dtype, alignment), and nothing else in the crate touches raw pointers.
#![allow(unsafe_code)]

use tch::{Device, Tensor};

use crate::element::{DType, Element};
use crate::error::CollectiveError;
use crate::Result;

/// Checks that `t` is a defined CPU tensor.
pub(crate) fn check_cpu(t: &Tensor, rank: usize, op: &'static str) -> Result<()> {
    if !t.defined() {
        return Err(CollectiveError::UnsupportedTensor {
            rank,
            op,
            detail: "undefined tensor".into(),
        });
    }
    if t.device() != Device::Cpu {
        return Err(CollectiveError::UnsupportedTensor {
            rank,
            op,
            detail: format!(
                "tensor on {:?}; the TCP ring takes CPU tensors (use Nccl for CUDA)",
                t.device()
            ),
        });
    }
    Ok(())
}

/// Calls `f` with the elements of the contiguous CPU tensor `t` as `&mut [T]`.
pub(crate) fn with_cpu_slice_mut<T: Element, R>(
    t: &mut Tensor,
    rank: usize,
    op: &'static str,
    f: impl FnOnce(&mut [T]) -> R,
) -> Result<R> {
    check_cpu(t, rank, op)?;
    let bad = |detail: String| CollectiveError::UnsupportedTensor { rank, op, detail };
    if DType::of_kind(t.kind()) != Some(T::DTYPE) {
        return Err(bad(format!(
            "dtype {:?} where {:?} was expected",
            t.kind(),
            T::DTYPE
        )));
    }
    if !t.is_contiguous() {
        return Err(bad("tensor is not contiguous".into()));
    }
    let len = t.numel();
    if len == 0 {
        return Ok(f(&mut []));
    }
    let ptr = t.data_ptr() as *mut T;
    if ptr.is_null() || (ptr as usize) % std::mem::align_of::<T>() != 0 {
        return Err(bad("tensor storage is null or misaligned".into()));
    }
    // SAFETY: `t` is a defined, contiguous CPU tensor whose dtype is `T` (checked above), so its `numel` elements
    // lie consecutively from `data_ptr` (which includes the storage offset), aligned for `T`. The slice lives only
    // for the call of `f`, during which we hold `&mut Tensor`. Other tensor handles sharing the storage
    // (views, `shallow_clone`) are the caller's to leave alone during a collective, as with any in-place libtorch op.
    let slice = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    Ok(f(slice))
}

/// Raw NCCL communicator calls. Every caller has checked [`crate::nccl_available`] first: a call into a library
/// that dynamic loading did not find panics inside `cudarc`.
pub(crate) mod nccl {
    use cudarc::nccl::{result, sys};
    use tch::{Device, Kind, Tensor};

    use crate::error::CollectiveError;
    use crate::Result;

    fn err(rank: usize, call: &'static str) -> impl Fn(result::NcclError) -> CollectiveError {
        move |e| CollectiveError::Nccl {
            rank,
            call,
            detail: format!("{:?}", e.0),
        }
    }

    /// Whether the CUDA driver and NCCL shared libraries can be loaded.
    pub(crate) fn libraries_present() -> (bool, bool) {
        // SAFETY: these only try to dlopen the candidate library names and drop the handles.
        unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                sys::is_culib_present(),
            )
        }
    }

    /// A new NCCL unique id, as bytes.
    pub(crate) fn unique_id() -> Result<[u8; 128]> {
        let id = result::get_uniqueid().map_err(err(0, "ncclGetUniqueId"))?;
        Ok(id.internal.map(|c| c as u8))
    }

    /// An initialised communicator. Destroyed on drop.
    pub(crate) struct Comm {
        comm: sys::ncclComm_t,
        rank: usize,
    }

    // SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not concurrent; `Comm`
    // is only reachable through `&mut` (see `Nccl`), which guarantees that.
    unsafe impl Send for Comm {}

    impl Comm {
        /// `ncclCommInitRank` on the current CUDA device (the caller made it current).
        pub(crate) fn init(rank: usize, world: usize, id: &[u8; 128]) -> Result<Comm> {
            let mut uid = sys::ncclUniqueId { internal: [0; 128] };
            for (d, s) in uid.internal.iter_mut().zip(id) {
                *d = *s as core::ffi::c_char;
            }
            let mut comm: sys::ncclComm_t = std::ptr::null_mut();
            // SAFETY: `comm` is a valid out-pointer; the library is present (checked by the caller); the id is
            // 128 bytes as NCCL defines it.
            unsafe { result::comm_init_rank(&mut comm, world as i32, uid, rank as i32) }
                .map_err(err(rank, "ncclCommInitRank"))?;
            Ok(Comm { comm, rank })
        }

        fn dtype(&self, t: &Tensor, call: &'static str) -> Result<sys::ncclDataType_t> {
            let bad = |detail: String| CollectiveError::UnsupportedTensor {
                rank: self.rank,
                op: call,
                detail,
            };
            if !matches!(t.device(), Device::Cuda(_)) {
                return Err(bad(format!(
                    "tensor on {:?}; NCCL takes CUDA tensors",
                    t.device()
                )));
            }
            if !t.is_contiguous() {
                return Err(bad("tensor is not contiguous".into()));
            }
            Ok(match t.kind() {
                Kind::Float => sys::ncclDataType_t::ncclFloat32,
                Kind::Double => sys::ncclDataType_t::ncclFloat64,
                Kind::Half => sys::ncclDataType_t::ncclFloat16,
                Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
                Kind::Uint8 => sys::ncclDataType_t::ncclUint8,
                k => {
                    return Err(bad(format!(
                        "dtype {k:?} (supported: f32, f64, f16, bf16, u8)"
                    )))
                }
            })
        }

        /// In-place sum over the ranks, on the legacy default stream (the one libtorch uses unless told otherwise,
        /// so libtorch's later kernels are ordered after it).
        pub(crate) fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
            let dt = self.dtype(t, "all_reduce")?;
            let ptr = t.data_ptr();
            // SAFETY: `t` is a contiguous CUDA tensor of `numel` elements of `dt`; send and receive buffers are the
            // same (in-place is allowed by NCCL); `comm` is initialised.
            unsafe {
                result::all_reduce(
                    ptr,
                    ptr,
                    t.numel(),
                    dt,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    std::ptr::null_mut(),
                )
            }
            .map_err(err(self.rank, "ncclAllReduce"))?;
            Ok(())
        }

        /// `out` (contiguous, `world` times the elements of `input`, same dtype) receives every rank's `input`.
        pub(crate) fn all_gather(&mut self, input: &Tensor, out: &mut Tensor) -> Result<()> {
            let dt = self.dtype(input, "all_gather")?;
            if self.dtype(out, "all_gather")? != dt {
                return Err(CollectiveError::UnsupportedTensor {
                    rank: self.rank,
                    op: "all_gather",
                    detail: "output dtype differs from the input's".into(),
                });
            }
            // SAFETY: both are contiguous CUDA tensors of dtype `dt`; `out` holds world x numel(input) elements
            // (allocated so by the caller).
            unsafe {
                result::all_gather(
                    input.data_ptr(),
                    out.data_ptr(),
                    input.numel(),
                    dt,
                    self.comm,
                    std::ptr::null_mut(),
                )
            }
            .map_err(err(self.rank, "ncclAllGather"))?;
            Ok(())
        }

        /// In-place broadcast from `root`.
        pub(crate) fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
            let dt = self.dtype(t, "broadcast")?;
            let ptr = t.data_ptr();
            // SAFETY: a contiguous CUDA tensor of `numel` elements of `dt`, used as both buffers (allowed).
            unsafe {
                result::broadcast(
                    ptr,
                    ptr,
                    t.numel(),
                    dt,
                    root as i32,
                    self.comm,
                    std::ptr::null_mut(),
                )
            }
            .map_err(err(self.rank, "ncclBroadcast"))?;
            Ok(())
        }
    }

    impl Drop for Comm {
        fn drop(&mut self) {
            // SAFETY: `comm` was initialised by `ncclCommInitRank` and is destroyed once.
            let _ = unsafe { result::comm_destroy(self.comm) };
        }
    }
}
