//! The crate's only unsafe code: viewing tensor memory without copying, loading NCCL, and the raw NCCL calls.
//!
//! Why unsafe is needed here: `tch` has no safe borrowed view of a tensor's storage. Copying every gradient bucket
//! out of and back into libtorch would add two memory passes to each all-reduce (the benchmark's hot path), and NCCL
//! is a C library, opened at run time, that takes device pointers. Everything here is checked before the pointer is
//! used (device, contiguity, dtype, alignment, a live communicator), and nothing else in the crate touches raw
//! pointers.
#![allow(unsafe_code)]

use tch::{Device, Tensor};

use crate::element::{DType, Element};
use crate::error::CollectiveError;
use crate::Result;

/// Whether the CUDA driver library (`libcuda.so.1`) can be loaded (through `cudarc`, which also calls it).
pub(crate) fn cuda_driver_present() -> bool {
    // SAFETY: this only tries to dlopen the candidate library names and drops the handles.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

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

/// NCCL, opened from the file that [`crate::libnccl`] finds and called through a table of its entry points (see
/// that module for why not through `cudarc`'s loader), and the raw communicator calls. Every entry goes through
/// [`api`], which fails with a message instead of panicking where NCCL cannot be loaded.
pub(crate) mod nccl {
    use std::ffi::{c_char, c_int, c_void, CStr};
    use std::ptr::{null, null_mut};
    use std::sync::OnceLock;
    use std::time::Duration;

    use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
    use tch::{Device, Kind, Tensor};

    use crate::error::CollectiveError;
    use crate::libnccl::{self, Candidate};
    use crate::watchdog::{Status, Watchdog, Watched};
    use crate::Result;

    // ncclResult_t values, taken as `int` so that a code this build does not know is not an invalid enum.
    const SUCCESS: c_int = 0;
    const IN_PROGRESS: c_int = 7;
    const CONFIG_MAGIC: u32 = 0xcafe_beef;
    const CONFIG_UNDEF_INT: c_int = c_int::MIN;
    /// `ncclCommInitRankConfig` and non-blocking communicators exist from NCCL 2.14.
    const MIN_VERSION: c_int = 21_400;

    /// A `CUstream` / `cudaStream_t` (the same handle); null is the legacy default stream.
    pub(crate) type Stream = *mut c_void;
    type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
    type GetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> c_int;
    type InitRankConfig = unsafe extern "C" fn(
        *mut ncclComm_t,
        c_int,
        ncclUniqueId,
        c_int,
        *mut ncclConfig_t,
    ) -> c_int;
    type GetAsyncError = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int;
    type CommCall = unsafe extern "C" fn(ncclComm_t) -> c_int;
    type AllReduce = unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclRedOp_t,
        ncclComm_t,
        Stream,
    ) -> c_int;
    type AllGather = unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclComm_t,
        Stream,
    ) -> c_int;
    type Broadcast = unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        c_int,
        ncclComm_t,
        Stream,
    ) -> c_int;
    type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
    type LastError = unsafe extern "C" fn(ncclComm_t) -> *const c_char;

    /// The NCCL entry points m3d uses, from one loaded library.
    pub(crate) struct Api {
        pub(crate) path: String,
        pub(crate) version: c_int,
        get_unique_id: GetUniqueId,
        init_rank_config: InitRankConfig,
        get_async_error: GetAsyncError,
        abort: CommCall,
        finalize: CommCall,
        destroy: CommCall,
        all_reduce: AllReduce,
        all_gather: AllGather,
        broadcast: Broadcast,
        error_string: ErrorString,
        last_error: LastError,
        /// Keeps the entry points valid. Never unloaded: the table lives in a static.
        _lib: libloading::Library,
    }

    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();

    /// The NCCL library, loaded on first use; the error lists every place tried.
    pub(crate) fn api() -> std::result::Result<&'static Api, String> {
        API.get_or_init(load).as_ref().map_err(Clone::clone)
    }

    fn load() -> std::result::Result<Api, String> {
        let explicit = std::env::var_os(libnccl::ENV).filter(|v| !v.is_empty());
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let mut tried = Vec::new();
        for c in libnccl::candidates(explicit.as_deref(), &maps) {
            match open(&c) {
                Ok(api) => {
                    tracing::debug!(library = %api.path, version = %version_string(api.version), "NCCL loaded");
                    return Ok(api);
                }
                Err(why) => tried.push((c, why)),
            }
        }
        Err(libnccl::not_found(explicit.is_some(), &tried))
    }

    /// `2.29.7` from NCCL's version code (major * 10000 + minor * 100 + patch since 2.9).
    pub(crate) fn version_string(v: c_int) -> String {
        format!("{}.{}.{}", v / 10_000, (v % 10_000) / 100, v % 100)
    }

    fn open(c: &Candidate) -> std::result::Result<Api, String> {
        if c.target.is_absolute() && !c.target.exists() {
            return Err("no such file".into());
        }
        // SAFETY: loading a shared library runs its initialisers; NCCL's set up only its own state, and a file
        // libtorch already loaded is only referenced again (same inode: the dynamic linker returns that object).
        let lib = unsafe { libloading::Library::new(&c.target) }.map_err(|e| e.to_string())?;
        macro_rules! entry {
            ($ty:ty, $name:literal) => {
                // SAFETY: the symbol is NCCL's C function of that name and `$ty` its prototype from nccl.h (results
                // and result out-parameters as `int`). The copied pointer stays valid while `lib` is loaded, which
                // the returned table guarantees by owning it.
                *unsafe { lib.get::<$ty>($name) }.map_err(|e| {
                    format!("{e} (not an NCCL library, or one older than 2.14)")
                })?
            };
        }
        let get_version = entry!(GetVersion, b"ncclGetVersion\0");
        let mut version: c_int = 0;
        // SAFETY: `version` is a valid out-pointer, which ncclGetVersion only writes.
        let r = unsafe { get_version(&mut version) };
        if r != SUCCESS {
            return Err(format!("ncclGetVersion returned {r}"));
        }
        if version < MIN_VERSION {
            return Err(format!(
                "NCCL {} is too old: m3d needs 2.14 or newer (non-blocking communicators)",
                version_string(version)
            ));
        }
        let get_unique_id = entry!(GetUniqueId, b"ncclGetUniqueId\0");
        let init_rank_config = entry!(InitRankConfig, b"ncclCommInitRankConfig\0");
        let get_async_error = entry!(GetAsyncError, b"ncclCommGetAsyncError\0");
        let abort = entry!(CommCall, b"ncclCommAbort\0");
        let finalize = entry!(CommCall, b"ncclCommFinalize\0");
        let destroy = entry!(CommCall, b"ncclCommDestroy\0");
        let all_reduce = entry!(AllReduce, b"ncclAllReduce\0");
        let all_gather = entry!(AllGather, b"ncclAllGather\0");
        let broadcast = entry!(Broadcast, b"ncclBroadcast\0");
        let error_string = entry!(ErrorString, b"ncclGetErrorString\0");
        let last_error = entry!(LastError, b"ncclGetLastError\0");
        Ok(Api {
            path: c.target.display().to_string(),
            version,
            get_unique_id,
            init_rank_config,
            get_async_error,
            abort,
            finalize,
            destroy,
            all_reduce,
            all_gather,
            broadcast,
            error_string,
            last_error,
            _lib: lib,
        })
    }

    fn result_name(code: c_int) -> &'static str {
        match code {
            0 => "ncclSuccess",
            1 => "ncclUnhandledCudaError",
            2 => "ncclSystemError",
            3 => "ncclInternalError",
            4 => "ncclInvalidArgument",
            5 => "ncclInvalidUsage",
            6 => "ncclRemoteError",
            7 => "ncclInProgress",
            8 => "ncclTimeout",
            _ => "unknown NCCL result",
        }
    }

    impl Api {
        /// `ncclRemoteError (6): remote process exited or there was a network error (last error: …)`.
        fn describe(&self, code: c_int, comm: ncclComm_t) -> String {
            let text = |p: *const c_char| {
                // SAFETY: NCCL returns null or a NUL-terminated string it owns (static, or per communicator and
                // valid until its next call on it); it is copied at once.
                (!p.is_null())
                    .then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
                    .filter(|t| !t.is_empty())
            };
            let mut s = format!("{} ({code})", result_name(code));
            // SAFETY: ncclGetErrorString takes any result code.
            if let Some(t) = text(unsafe { (self.error_string)(code) }) {
                s.push_str(": ");
                s.push_str(&t);
            }
            if !comm.is_null() {
                // SAFETY: `comm` is a live communicator (callers pass null otherwise).
                if let Some(t) = text(unsafe { (self.last_error)(comm) }) {
                    s.push_str(&format!(" (last error: {t})"));
                }
            }
            s
        }
    }

    /// NCCL_CONFIG_INITIALIZER (size, magic, version, every attribute left to NCCL) with `blocking = 0`.
    ///
    /// `version` is the loaded library's and `size` this struct's (cudarc's NCCL 2.30 layout): NCCL copies
    /// `min(size, its own size)` bytes, so an older library reads the fields it knows and a newer one keeps its
    /// defaults for fields this layout lacks.
    pub(crate) fn non_blocking_config(version: c_int) -> ncclConfig_t {
        let undef = CONFIG_UNDEF_INT;
        ncclConfig_t {
            size: std::mem::size_of::<ncclConfig_t>(),
            magic: CONFIG_MAGIC,
            version: version as u32,
            blocking: 0,
            cgaClusterSize: undef,
            minCTAs: undef,
            maxCTAs: undef,
            netName: null(),
            splitShare: undef,
            trafficClass: undef,
            commName: null(),
            collnetEnable: undef,
            CTAPolicy: undef,
            shrinkShare: undef,
            nvlsCTAs: undef,
            nChannelsPerNetPeer: undef,
            nvlinkCentricSched: undef,
            graphUsageMode: undef,
            numRmaCtx: undef,
            maxP2pPeers: undef,
        }
    }

    /// A new NCCL unique id, as bytes. Each one starts a bootstrap thread and listening socket in this process
    /// that serve the one communicator created from it.
    pub(crate) fn unique_id() -> Result<[u8; 128]> {
        let api = api().map_err(CollectiveError::NcclUnavailable)?;
        let mut id = ncclUniqueId { internal: [0; 128] };
        // SAFETY: `id` is a valid out-pointer of NCCL's id type.
        let r = unsafe { (api.get_unique_id)(&mut id) };
        if r != SUCCESS {
            return Err(CollectiveError::Nccl {
                rank: 0,
                call: "ncclGetUniqueId",
                detail: api.describe(r, null_mut()),
            });
        }
        Ok(id.internal.map(|c| c as u8))
    }

    /// A non-blocking NCCL communicator: every call may return before NCCL is done with it, and [`Comm::status`]
    /// says when it is (or what went wrong). [`Comm::abort`] frees it at once, stopping kernels that wait for a
    /// dead peer; dropping a communicator that was not aborted finalizes it (with a deadline, aborting it if
    /// that does not finish) and destroys it, so a drop never hangs on a broken round.
    pub(crate) struct Comm {
        api: &'static Api,
        /// Null once aborted or destroyed.
        comm: ncclComm_t,
        rank: usize,
        /// How long a drop waits for `ncclCommFinalize`.
        close_timeout: Duration,
    }

    // SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not concurrent; `Comm`
    // is only reachable through `&mut` (see `Nccl`), which guarantees that.
    unsafe impl Send for Comm {}

    impl Comm {
        /// Starts `ncclCommInitRankConfig` (non-blocking) on the current CUDA device (the caller made it current).
        /// The communicator is ready once [`Comm::status`] is done; wait with [`CallWait`].
        pub(crate) fn start(
            rank: usize,
            world: usize,
            id: &[u8; 128],
            close_timeout: Duration,
        ) -> Result<Comm> {
            let api = api().map_err(CollectiveError::NcclUnavailable)?;
            let mut uid = ncclUniqueId { internal: [0; 128] };
            for (d, s) in uid.internal.iter_mut().zip(id) {
                *d = *s as c_char;
            }
            let mut config = non_blocking_config(api.version);
            let mut comm: ncclComm_t = null_mut();
            // SAFETY: `comm` and `config` are valid pointers (NCCL copies the config); the id is 128 bytes as NCCL
            // defines it; the library is loaded.
            let r = unsafe {
                (api.init_rank_config)(&mut comm, world as c_int, uid, rank as c_int, &mut config)
            };
            let mut c = Comm {
                api,
                comm,
                rank,
                close_timeout,
            };
            if r != SUCCESS && r != IN_PROGRESS {
                let detail = api.describe(r, null_mut());
                c.abort();
                return Err(CollectiveError::Nccl {
                    rank,
                    call: "ncclCommInitRankConfig",
                    detail,
                });
            }
            if c.comm.is_null() {
                return Err(CollectiveError::Nccl {
                    rank,
                    call: "ncclCommInitRankConfig",
                    detail: "NCCL returned no communicator".into(),
                });
            }
            Ok(c)
        }

        fn error(&self, call: &'static str, code: c_int) -> CollectiveError {
            CollectiveError::Nccl {
                rank: self.rank,
                call,
                detail: self.api.describe(code, self.comm),
            }
        }

        fn aborted(&self, call: &'static str) -> CollectiveError {
            CollectiveError::Nccl {
                rank: self.rank,
                call,
                detail: "the communicator was aborted".into(),
            }
        }

        /// `ncclCommGetAsyncError`: pending while NCCL still works on the last call (`ncclInProgress`), done when
        /// it finished with no error, failed with the error (a peer's connection closed, a CUDA error, …).
        pub(crate) fn status(&self, call: &'static str) -> Status<(), CollectiveError> {
            if self.comm.is_null() {
                return Status::Failed(self.aborted(call));
            }
            let mut state: c_int = SUCCESS;
            // SAFETY: `comm` is live (not null: neither aborted nor destroyed); `state` is a valid out-pointer.
            let r = unsafe { (self.api.get_async_error)(self.comm, &mut state) };
            if r != SUCCESS {
                return Status::Failed(self.error("ncclCommGetAsyncError", r));
            }
            match state {
                SUCCESS => Status::Done(()),
                IN_PROGRESS => Status::Pending,
                code => Status::Failed(self.error(call, code)),
            }
        }

        /// `ncclCommAbort`: frees the communicator now, whatever it is doing. Idempotent.
        pub(crate) fn abort(&mut self) {
            if self.comm.is_null() {
                return;
            }
            // SAFETY: `comm` is live; ncclCommAbort frees it, so the handle is cleared and never used again.
            let _ = unsafe { (self.api.abort)(self.comm) };
            self.comm = null_mut();
        }

        pub(crate) fn is_aborted(&self) -> bool {
            self.comm.is_null()
        }

        fn launched(&self, call: &'static str, r: c_int) -> Result<()> {
            match r {
                SUCCESS | IN_PROGRESS => Ok(()),
                code => Err(self.error(call, code)),
            }
        }

        fn dtype(&self, t: &Tensor, call: &'static str) -> Result<ncclDataType_t> {
            let bad = |detail: String| CollectiveError::UnsupportedTensor {
                rank: self.rank,
                op: call,
                detail,
            };
            if self.comm.is_null() {
                return Err(self.aborted(call));
            }
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
                Kind::Float => ncclDataType_t::ncclFloat32,
                Kind::Double => ncclDataType_t::ncclFloat64,
                Kind::Half => ncclDataType_t::ncclFloat16,
                Kind::BFloat16 => ncclDataType_t::ncclBfloat16,
                Kind::Uint8 => ncclDataType_t::ncclUint8,
                k => {
                    return Err(bad(format!(
                        "dtype {k:?} (supported: f32, f64, f16, bf16, u8)"
                    )))
                }
            })
        }

        /// Enqueues an in-place sum on `stream` (the caller orders it after the work that wrote `t`). Returns once
        /// NCCL accepted the call; the caller waits for [`Comm::status`] and then for the stream.
        pub(crate) fn all_reduce_sum(&mut self, t: &mut Tensor, stream: Stream) -> Result<()> {
            let dt = self.dtype(t, "ncclAllReduce")?;
            let ptr = t.data_ptr();
            // SAFETY: `t` is a contiguous CUDA tensor of `numel` elements of `dt`; send and receive buffers are the
            // same (in-place is allowed by NCCL); `comm` is live. The caller keeps `t` alive and untouched until
            // the operation completed or the communicator was aborted.
            let r = unsafe {
                (self.api.all_reduce)(
                    ptr,
                    ptr,
                    t.numel(),
                    dt,
                    ncclRedOp_t::ncclSum,
                    self.comm,
                    stream,
                )
            };
            self.launched("ncclAllReduce", r)
        }

        /// Enqueues: `out` (contiguous, `world` times the elements of `input`, same dtype) receives every rank's
        /// `input`.
        pub(crate) fn all_gather(
            &mut self,
            input: &Tensor,
            out: &mut Tensor,
            stream: Stream,
        ) -> Result<()> {
            let dt = self.dtype(input, "ncclAllGather")?;
            if self.dtype(out, "ncclAllGather")? != dt {
                return Err(CollectiveError::UnsupportedTensor {
                    rank: self.rank,
                    op: "all_gather",
                    detail: "output dtype differs from the input's".into(),
                });
            }
            // SAFETY: both are contiguous CUDA tensors of dtype `dt`; `out` holds world x numel(input) elements
            // (allocated so by the caller, who keeps both alive until the operation completed or was aborted).
            let r = unsafe {
                (self.api.all_gather)(
                    input.data_ptr(),
                    out.data_ptr(),
                    input.numel(),
                    dt,
                    self.comm,
                    stream,
                )
            };
            self.launched("ncclAllGather", r)
        }

        /// Enqueues an in-place broadcast from `root`.
        pub(crate) fn broadcast(
            &mut self,
            t: &mut Tensor,
            root: usize,
            stream: Stream,
        ) -> Result<()> {
            let dt = self.dtype(t, "ncclBroadcast")?;
            let ptr = t.data_ptr();
            // SAFETY: a contiguous CUDA tensor of `numel` elements of `dt`, used as both buffers (allowed), kept
            // alive by the caller until the operation completed or was aborted.
            let r = unsafe {
                (self.api.broadcast)(ptr, ptr, t.numel(), dt, root as c_int, self.comm, stream)
            };
            self.launched("ncclBroadcast", r)
        }
    }

    /// Waiting for a non-blocking call of a communicator (its init, its finalize) to finish; aborting it on failure.
    pub(crate) struct CallWait<'a> {
        pub(crate) comm: &'a mut Comm,
        pub(crate) call: &'static str,
    }

    impl Watched for CallWait<'_> {
        type Output = ();
        type Error = CollectiveError;

        fn poll(&mut self) -> Status<(), CollectiveError> {
            self.comm.status(self.call)
        }

        fn abort(&mut self) {
            self.comm.abort();
        }
    }

    impl Drop for Comm {
        fn drop(&mut self) {
            if self.comm.is_null() {
                return;
            }
            // SAFETY: `comm` is live.
            let r = unsafe { (self.api.finalize)(self.comm) };
            if r != SUCCESS && r != IN_PROGRESS {
                self.abort();
                return;
            }
            let dog = Watchdog::new("ncclCommFinalize", self.close_timeout)
                .sleeps(Duration::from_micros(100), Duration::from_millis(10));
            let mut wait = CallWait {
                comm: self,
                call: "ncclCommFinalize",
            };
            // Failure and timeout abort the communicator (and clear it).
            if dog.wait(&mut wait).is_ok() && !self.comm.is_null() {
                // SAFETY: `comm` is live and finalized; destroyed once, then cleared.
                let _ = unsafe { (self.api.destroy)(self.comm) };
                self.comm = null_mut();
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_config_is_nccls_initializer_with_blocking_off() {
            let c = non_blocking_config(22_907);
            assert_eq!(c.size, std::mem::size_of::<ncclConfig_t>());
            assert_eq!((c.magic, c.version, c.blocking), (0xcafe_beef, 22_907, 0));
            assert_eq!((c.cgaClusterSize, c.maxP2pPeers), (c_int::MIN, c_int::MIN));
            assert!(c.netName.is_null() && c.commName.is_null());
            assert_eq!(version_string(22_907), "2.29.7");
            assert_eq!(result_name(6), "ncclRemoteError");
        }

        /// Where libtorch brought an NCCL (the CUDA torch wheel links `libtorch_cuda.so` against
        /// `nvidia/nccl/lib/libnccl.so.2`), that very file is the one opened — on any machine, GPU or not: loading
        /// it and reading its version needs no GPU. (A CPU-only libtorch maps none; then there is nothing to check.)
        #[test]
        fn the_nccl_libtorch_loaded_is_the_one_opened() {
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
            let mapped = libnccl::mapped_files(&maps);
            let Some(torch_nccl) = mapped.iter().find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libnccl.so"))
            }) else {
                eprintln!("no NCCL mapped into this process (CPU-only libtorch): nothing to check");
                return;
            };
            if std::env::var_os(libnccl::ENV).is_some_and(|v| !v.is_empty()) {
                eprintln!("{} is set: the search is not the default one", libnccl::ENV);
                return;
            }
            let api = api().unwrap();
            assert_eq!(api.path, torch_nccl.display().to_string());
            assert!(
                api.version >= MIN_VERSION,
                "{}",
                version_string(api.version)
            );
            eprintln!("NCCL {} from {}", version_string(api.version), api.path);
        }
    }
}
