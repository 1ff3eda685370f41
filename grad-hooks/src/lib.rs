//! The autograd pieces `tch` does not expose: post-accumulate-grad hooks on libtorch parameters (what overlapping
//! the gradient all-reduce with the backward pass needs) and activation checkpointing ([`checkpoint`]).
//!
//! DDP's `Reducer` learns that a parameter's gradient is final from a hook on its gradient accumulator and starts
//! reducing a bucket as soon as its last gradient is in, while the backward pass still computes earlier layers.
//! `tch` (0.24 and 0.26) has no tensor or autograd hooks, so this crate compiles a small C++ shim (`src/hooks.cpp`)
//! against the headers of the libtorch that `torch-sys` links and registers
//! `torch::autograd::impl::set_post_acc_grad_hooks` hooks (what `Tensor.register_post_accumulate_grad_hook` uses)
//! that call back into Rust.
//!
//! [`GradReadyHooks`] owns the hooks of a list of parameters. While armed, each parameter's first accumulation
//! sends its index on a channel (the order in which the gradients became final); disarmed, the hooks do nothing.
//! A second accumulation of the same parameter while armed is recorded ([`GradReadyHooks::disarm`] reports it): it
//! would change a gradient that may already have been reduced. [`GradReadyHooks::unreached_by`] walks a loss's
//! autograd graph for the parameters its backward pass will not reach (DDP's unused-parameter search), so that
//! their (zero) gradients can be made ready first rather than last.
//!
//! [`checkpoint`] (module `recompute`) is activation checkpointing: a block re-run in the backward pass by an
//! autograd node of the shim.
//!
//! On a GPU the hook runs when the accumulation has been *queued*: work queued after it on the same stream (the
//! default stream, which libtorch's autograd and `m3d-collectives` use) sees the final values.

// FFI into the shim: every call passes a live `at::Tensor*` from a `tch::Tensor` this crate holds, and a context
// pointer whose allocation outlives the hooks (they are removed in `Drop` before it is freed).
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void, CStr};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, MutexGuard};

use tch::Tensor;

mod recompute;
pub use recompute::{checkpoint, MAX_OUTPUTS};

/// Errors of installing hooks.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot hook tensor {index}: {detail}")]
    Install { index: usize, detail: String },
    #[error("walking the autograd graph: {0}")]
    Graph(String),
    #[error("activation checkpoint: {0}")]
    Checkpoint(String),
}

type ReadyFn = extern "C" fn(ctx: *const c_void, index: usize);

extern "C" {
    fn m3d_set_grad_ready_hook(
        tensor: *mut c_void,
        f: ReadyFn,
        ctx: *const c_void,
        index: usize,
    ) -> *mut c_char;
    fn m3d_clear_grad_ready_hook(tensor: *mut c_void) -> *mut c_char;
    fn m3d_reached_params(
        root: *mut c_void,
        params: *const *mut c_void,
        n: usize,
        reached: *mut u8,
    ) -> *mut c_char;
    fn m3d_grad_hooks_free(message: *mut c_char);
}

/// Takes a message the shim allocated (null: success).
fn message(ptr: *mut c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: a non-null result is a NUL-terminated string the shim malloc'ed for us; freed right after copying.
    let s = unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned();
    unsafe { m3d_grad_hooks_free(ptr) };
    Some(s)
}

#[derive(Default)]
struct State {
    tx: Option<Sender<usize>>,
    fired: Vec<bool>,
    order: Vec<usize>,
    repeated: Option<usize>,
}

/// What the hooks see; boxed so that its address (the hooks' context) never moves.
struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere while holding it; the state stays consistent (plain pushes).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

extern "C" fn on_ready(ctx: *const c_void, index: usize) {
    // SAFETY: ctx is the `Shared` of a live `GradReadyHooks` (its hooks are removed before it is dropped).
    let shared = unsafe { &*(ctx as *const Shared) };
    let mut st = shared.lock();
    let State {
        tx,
        fired,
        order,
        repeated,
    } = &mut *st;
    let Some(tx) = tx else { return };
    match fired.get_mut(index) {
        Some(f) if !*f => {
            *f = true;
            order.push(index);
            // A receiver that has gone away (a failed reduction) no longer cares.
            let _ = tx.send(index);
        }
        Some(_) => {
            repeated.get_or_insert(index);
        }
        None => {}
    }
}

/// The post-accumulate-grad hooks of a list of parameters (see the crate docs). Dropping it removes them.
pub struct GradReadyHooks {
    tensors: Vec<Tensor>,
    shared: Box<Shared>,
}

impl std::fmt::Debug for GradReadyHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradReadyHooks")
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

/// What an armed period saw ([`GradReadyHooks::disarm`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// Indices in the order their gradients became final.
    pub order: Vec<usize>,
    /// The first index whose gradient was accumulated a second time while armed, if any.
    pub repeated: Option<usize>,
}

impl GradReadyHooks {
    /// Hooks every tensor of `params` (leaves that require a gradient; index = position), replacing any
    /// post-accumulate-grad hook they had. Disarmed until [`GradReadyHooks::arm`].
    pub fn install(params: &[Tensor]) -> Result<GradReadyHooks, HookError> {
        let shared = Box::new(Shared {
            state: Mutex::new(State {
                fired: vec![false; params.len()],
                ..State::default()
            }),
        });
        let mut hooks = GradReadyHooks {
            tensors: Vec::with_capacity(params.len()),
            shared,
        };
        let ctx = &*hooks.shared as *const Shared as *const c_void;
        for (index, p) in params.iter().enumerate() {
            let mut t = p.shallow_clone();
            // SAFETY: `t` is a live tensor; `ctx` outlives the hook (removed in Drop, which runs on every exit
            // from here on since `t` is pushed first).
            let ptr = t.as_mut_ptr() as *mut c_void;
            hooks.tensors.push(t);
            if let Some(detail) =
                message(unsafe { m3d_set_grad_ready_hook(ptr, on_ready, ctx, index) })
            {
                return Err(HookError::Install { index, detail });
            }
        }
        Ok(hooks)
    }

    /// The number of hooked tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether no tensor is hooked.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The indices of the hooked tensors that the backward pass of `loss` will not reach (no path from `loss`
    /// to their gradient accumulator): they get no gradient from it, so a caller that needs one for each (every
    /// rank reduces every parameter) can give them theirs before the pass instead of after it.
    pub fn unreached_by(&self, loss: &Tensor) -> Result<Vec<usize>, HookError> {
        let mut root = loss.shallow_clone();
        let mut tensors: Vec<Tensor> = self.tensors.iter().map(Tensor::shallow_clone).collect();
        let ptrs: Vec<*mut c_void> = tensors
            .iter_mut()
            .map(|t| t.as_mut_ptr() as *mut c_void)
            .collect();
        let mut reached = vec![0u8; ptrs.len()];
        // SAFETY: live tensors (held by `root` and `tensors` for the call); `reached` has one byte per pointer.
        let r = unsafe {
            m3d_reached_params(
                root.as_mut_ptr() as *mut c_void,
                ptrs.as_ptr(),
                ptrs.len(),
                reached.as_mut_ptr(),
            )
        };
        if let Some(detail) = message(r) {
            return Err(HookError::Graph(detail));
        }
        Ok(reached
            .iter()
            .enumerate()
            .filter(|(_, &r)| r == 0)
            .map(|(i, _)| i)
            .collect())
    }

    /// Starts an armed period: from now on each hooked parameter's first gradient accumulation sends its index on
    /// the returned channel. The channel closes at [`GradReadyHooks::disarm`].
    pub fn arm(&self) -> Receiver<usize> {
        let (tx, rx) = channel();
        let mut st = self.shared.lock();
        st.tx = Some(tx);
        st.fired.iter_mut().for_each(|f| *f = false);
        st.order.clear();
        st.repeated = None;
        rx
    }

    /// The indices that have not fired in this armed period (parameters the backward pass did not reach).
    pub fn not_fired(&self) -> Vec<usize> {
        let st = self.shared.lock();
        st.fired
            .iter()
            .enumerate()
            .filter(|(_, f)| !**f)
            .map(|(i, _)| i)
            .collect()
    }

    /// Ends the armed period (closing its channel) and says what fired.
    pub fn disarm(&self) -> Fired {
        let mut st = self.shared.lock();
        st.tx = None;
        Fired {
            order: std::mem::take(&mut st.order),
            repeated: st.repeated.take(),
        }
    }
}

impl Drop for GradReadyHooks {
    fn drop(&mut self) {
        self.disarm();
        for t in &mut self.tensors {
            // SAFETY: a live tensor; removing its hook before `shared` is freed.
            let ptr = t.as_mut_ptr() as *mut c_void;
            if let Some(detail) = message(unsafe { m3d_clear_grad_ready_hook(ptr) }) {
                // Cannot happen for a tensor we hooked; if it did, the hook would outlive its context: stop.
                eprintln!("m3d-grad-hooks: removing a hook failed: {detail}");
                std::process::abort();
            }
        }
    }
}
