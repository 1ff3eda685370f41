//! The allocator policy shared by the m3d binaries (`m3d`, `m3d-data-prep`): mimalloc as the global allocator
//! (each binary declares `#[global_allocator] static ALLOC: m3d_allocator::MiMalloc = m3d_allocator::MiMalloc;`),
//! how long freed memory stays with the process ([`configure`]), handing it back at once after a phase that
//! freed a lot ([`release_freed_memory`]), and small pages for a process that only streams volumes through
//! memory ([`disable_transparent_huge_pages`]).

pub use mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v2 and v3 alike; `libmimalloc-sys` names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays with the process before mimalloc hands it back, unless `MIMALLOC_PURGE_DELAY`
/// says otherwise. With mimalloc's 10 ms, memory a decoding step freed was often returned before the next step
/// asked for it again, and paid an `madvise` and a page fault per 4 KiB once more. Measured on a CPU `eval bench`
/// (docs/benchmarks.md): 3.0M page faults and 7 s of 22 s in the kernel through glibc; with mimalloc, 340K
/// at 10 ms, ~120K at 250 ms, ~82K at 1 s (1.3-1.5 s in the kernel, 20-30 MB more resident). A phase's memory
/// (opening a dataset) still goes back a second after it ends, or at once through [`release_freed_memory`].
const PURGE_DELAY_MS: std::ffi::c_long = 1000;

/// Sets the purge delay (above); call it first thing in `main`.
pub fn configure() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: `mi_option_set` takes plain integers and may be called at any time; options are atomics.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
        }
    }
}

/// Hands the memory mimalloc holds freed back to the system now rather than after its purge delay (which only
/// runs when the allocator is next busy). A worker calls it once after opening its training set, which
/// decodes every sample shard through buffers freed right after: measured ~85 MiB of a 120K-volume /
/// 662K-sample set's RSS (docs/benchmarks.md).
pub fn release_freed_memory() {
    // SAFETY: `mi_collect` takes no pointer and may be called at any time from any thread; it only returns
    // free pages of mimalloc's own heaps to the system.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

/// Asks the kernel to back this process's memory with 4 KiB pages only (`PR_SET_THP_DISABLE`), where the system
/// enables transparent huge pages for every mapping (`always`, the default of many distributions). A conversion
/// streams each series through buffers of a few MiB that mimalloc hands back and takes again at 64 KiB
/// granularity; with huge pages every touch of such a range zeroed a fresh 2 MiB page. Measured on `m3d-data-prep
/// cap --threads 1` (docs/benchmarks.md): 22 % of the time in the kernel's `clear_page_erms` with huge pages,
/// under 1 % without, and the conversion 15 % faster. Not for the trainer: libtorch's large, long-lived tensors
/// are what huge pages are for. Fails only on kernels without the call (before Linux 3.15), which changes nothing.
pub fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: `prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)` takes plain integers and only sets a flag of this process.
    #[allow(unsafe_code)]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
