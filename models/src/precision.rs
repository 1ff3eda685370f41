//! Numeric precision of a model, in the three modes PyTorch users know:
//!
//! - [`Precision::F32`]: everything in f32 (the CPU default, and what the parity tests use).
//! - [`Precision::Bf16`]: bf16 parameters and activations, with the fragile steps (norms, softmax, losses) in
//!   f32 — DeepSpeed's bf16 mode, which the reference trains with (its optimizer keeps f32 master weights).
//! - [`Precision::Bf16Autocast`]: f32 parameters and gradients, with the matrix products of every
//!   [`Linear`](crate::layers::Linear) (and so attention, which consumes their outputs) in bf16 — what
//!   `torch.autocast(dtype=torch.bfloat16)` / accelerate's `mixed_precision="bf16"` do.
//!
//! The autocast region is ours, not libtorch's: `tch` 0.26 can switch libtorch's autocast on but not choose
//! its dtype, which on CUDA defaults to fp16 and would not match the reference. [`autocast`] sets a
//! thread-local compute kind that `Linear` reads; norms cast their input to their parameters' kind, so they
//! run in f32 as under torch's autocast.

use std::cell::Cell;

use tch::nn::VarStore;
use tch::{Device, Kind};

use crate::error::{ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
    #[serde(rename = "bf16-autocast")]
    Bf16Autocast,
}

impl Precision {
    /// bf16 on CUDA devices, f32 on the CPU (where bf16 kernels are slower than f32 and parity tests need f32).
    pub fn default_for(device: Device) -> Self {
        if device.is_cuda() {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }

    /// The kind of the parameters.
    pub fn kind(self) -> Kind {
        match self {
            Precision::F32 | Precision::Bf16Autocast => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }

    /// Runs `f` (a forward pass) in this precision's compute mode.
    pub fn run<T>(self, f: impl FnOnce() -> T) -> T {
        match self {
            Precision::Bf16Autocast => autocast(Some(Kind::BFloat16), f),
            Precision::F32 | Precision::Bf16 => f(),
        }
    }

    /// Casts every floating-point parameter of `vs` (and the kind of parameters created later).
    pub fn apply(self, vs: &mut VarStore) -> Result<()> {
        if self == Precision::Bf16 && vs.device() == Device::Mps {
            return Err(ModelError::Config(
                "bf16 is not supported on MPS; use f32".into(),
            ));
        }
        vs.set_kind(self.kind());
        Ok(())
    }
}

impl std::str::FromStr for Precision {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "bf16-autocast" => Ok(Precision::Bf16Autocast),
            other => Err(ModelError::Config(format!(
                "precision `{other}`: expected f32, bf16 or bf16-autocast"
            ))),
        }
    }
}

thread_local! {
    static AUTOCAST: Cell<Option<Kind>> = const { Cell::new(None) };
}

/// Restores the previous compute kind when dropped (also when `f` panics).
struct Restore(Option<Kind>);

impl Drop for Restore {
    fn drop(&mut self) {
        AUTOCAST.with(|c| c.set(self.0));
    }
}

/// Runs `f` with `Linear` layers computing in `kind` (`None`: in their parameters' kind). Nests; the
/// setting is per thread, like torch's autocast.
pub fn autocast<T>(kind: Option<Kind>, f: impl FnOnce() -> T) -> T {
    let _restore = Restore(AUTOCAST.with(|c| c.replace(kind)));
    f()
}

/// The compute kind of the enclosing [`autocast`] region, if any.
pub fn autocast_kind() -> Option<Kind> {
    AUTOCAST.with(|c| c.get())
}

/// `a.matmul(b)` as torch's autocast runs it: both operands in the autocast kind inside a region; outside,
/// a mixed-kind product is computed in the wider kind (libtorch refuses mixed kinds).
pub fn matmul(a: &tch::Tensor, b: &tch::Tensor) -> tch::Tensor {
    let kind = match autocast_kind() {
        Some(k) => k,
        None if a.kind() == b.kind() => return a.matmul(b),
        None => wider(a.kind(), b.kind()),
    };
    let cast = |t: &tch::Tensor| {
        if t.kind() == kind {
            t.shallow_clone()
        } else {
            t.to_kind(kind)
        }
    };
    cast(a).matmul(&cast(b))
}

fn wider(a: Kind, b: Kind) -> Kind {
    let rank = |k: Kind| match k {
        Kind::Double => 3,
        Kind::Float => 2,
        _ => 1,
    };
    if rank(a) >= rank(b) {
        a
    } else {
        b
    }
}
