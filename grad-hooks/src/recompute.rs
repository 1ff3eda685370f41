//! Activation checkpointing ([`checkpoint`]): a block runs without keeping its activations, and the backward
//! pass re-runs it (torch.utils.checkpoint's reentrant form). `tch` has no custom autograd function, so the node
//! that re-runs the block lives in the C++ shim (`src/recompute.cpp`) and calls back into the Rust closure.
//!
//! What the backward pass of a checkpointed block gives is what the plain block gives: the recomputation sees
//! the same inputs, the same RNG state (dropout draws the same masks) and, since the closure re-establishes
//! whatever thread-local settings it captured (m3d's autocast kind), the same kernels. Parameters inside the
//! block receive their gradients while the node runs, so their post-accumulate-grad hooks fire then
//! ([`crate::GradReadyHooks`] sees them as usual); [`crate::GradReadyHooks::unreached_by`] cannot see through a
//! checkpoint and then counts every parameter as reached.

use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

use crate::{message, HookError};

/// The most tensors a checkpointed block may return.
pub const MAX_OUTPUTS: usize = 8;

type BlockFn = extern "C" fn(
    ctx: *mut c_void,
    inputs: *const *mut c_void,
    n: usize,
    out: *mut c_void,
) -> *mut c_char;
type DropFn = extern "C" fn(ctx: *mut c_void);

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn m3d_recompute(
        inputs: *const *mut c_void,
        n: usize,
        call: BlockFn,
        drop: DropFn,
        ctx: *mut c_void,
        outputs: *mut *mut c_void,
        cap: usize,
        n_out: *mut usize,
    ) -> *mut c_char;
    fn m3d_recompute_push(out: *mut c_void, tensor: *mut c_void);
    fn m3d_recompute_message(s: *const c_char) -> *mut c_char;
}

/// A checkpointed block's body: the block's inputs in, its outputs out.
type Body = Box<dyn Fn(&[Tensor]) -> Result<Vec<Tensor>, String>>;

/// Runs `block` on `inputs` as an activation checkpoint: the forward pass keeps only the inputs (and the RNG
/// state), and the backward pass runs `block` again with gradients on to back-propagate through it. The
/// outputs' values are `block`'s; floating outputs require a gradient whenever grad mode is on (also when no
/// input does: the block's own parameters still get theirs). Outside grad mode this is `block(inputs)`.
///
/// `block` must compute the same function each time it is called. At most [`MAX_OUTPUTS`] outputs.
///
/// # Safety
/// libtorch's engine calls `block` on the thread that runs the node: the caller of `backward` on a CPU, a
/// device thread on a GPU, while the caller waits in `backward`. So what `block` captures (model layers, whose
/// `tch::Tensor`s are `Send` but not `Sync`) is used from another thread than the one that made it: the caller
/// must make sure nothing else uses those values concurrently while a backward pass through this graph runs
/// (model weights that are only read qualify: libtorch's reference counts are atomic).
pub unsafe fn checkpoint<F>(inputs: &[&Tensor], block: F) -> Result<Vec<Tensor>, HookError>
where
    F: Fn(&[Tensor]) -> Result<Vec<Tensor>, String> + 'static,
{
    let ctx = Box::into_raw(Box::new(Box::new(block) as Body)) as *mut c_void;
    let mut held: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
    let ptrs: Vec<*mut c_void> = held
        .iter_mut()
        .map(|t| t.as_mut_ptr() as *mut c_void)
        .collect();
    let mut outs = [std::ptr::null_mut::<c_void>(); MAX_OUTPUTS];
    let mut n_out = 0usize;
    // SAFETY: `ptrs` are live tensors held by `held` for the call; `ctx` is a leaked `Box<Body>` whose ownership
    // passes to the shim, which frees it through `drop_body` exactly once; `outs` has room for `MAX_OUTPUTS`.
    let r = unsafe {
        m3d_recompute(
            ptrs.as_ptr(),
            ptrs.len(),
            call_body,
            drop_body,
            ctx,
            outs.as_mut_ptr(),
            MAX_OUTPUTS,
            &mut n_out,
        )
    };
    // SAFETY: the first `n_out` entries are new `at::Tensor*` the shim handed over.
    let tensors: Vec<Tensor> = outs[..n_out.min(MAX_OUTPUTS)]
        .iter()
        .map(|&p| unsafe { Tensor::from_ptr(p.cast()) })
        .collect();
    match message(r) {
        Some(detail) => Err(HookError::Checkpoint(detail)),
        None => Ok(tensors),
    }
}

extern "C" fn call_body(
    ctx: *mut c_void,
    inputs: *const *mut c_void,
    n: usize,
    out: *mut c_void,
) -> *mut c_char {
    // SAFETY: `ctx` is the `Box<Body>` of `checkpoint`, alive until `drop_body`; `inputs` holds `n` new
    // `at::Tensor*` whose ownership passes to us.
    let body = unsafe { &*(ctx as *const Body) };
    let inputs: Vec<Tensor> = (0..n)
        .map(|i| unsafe { Tensor::from_ptr((*inputs.add(i)).cast()) })
        .collect();
    let result = catch_unwind(AssertUnwindSafe(|| body(&inputs)));
    let text = match result {
        Ok(Ok(outputs)) => {
            for mut t in outputs {
                // SAFETY: `out` is the shim's output vector; the shim copies the tensor, we keep ours.
                unsafe { m3d_recompute_push(out, t.as_mut_ptr() as *mut c_void) };
            }
            return std::ptr::null_mut();
        }
        Ok(Err(e)) => e,
        Err(_) => "the checkpointed block panicked".to_string(),
    };
    let c = CString::new(text.replace('\0', " ")).unwrap_or_default();
    // SAFETY: a NUL-terminated string; the shim copies it into memory it frees itself.
    unsafe { m3d_recompute_message(c.as_ptr()) }
}

extern "C" fn drop_body(ctx: *mut c_void) {
    // SAFETY: called once by the shim, with the pointer `checkpoint` leaked.
    drop(unsafe { Box::from_raw(ctx as *mut Body) });
}
