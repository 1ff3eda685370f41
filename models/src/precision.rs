//! Numeric precision of a model: f32, or bf16 parameters and activations with f32 islands.
//!
//! The reference trains in DeepSpeed's bf16 mode: weights and activations in bf16, with the numerically
//! fragile steps (RMSNorm, softmax, the losses) computed in f32, and f32 master weights in the optimizer.
//! We do the same: [`Precision::Bf16`] casts the parameters, and the layers upcast where the reference does.
//! (`tch` 0.26 exposes libtorch's autocast only with its CUDA default dtype, fp16, which would not match the
//! reference, so bf16 is a parameter dtype here, not an autocast region.)

use tch::nn::VarStore;
use tch::{Device, Kind};

use crate::error::{ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
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

    pub fn kind(self) -> Kind {
        match self {
            Precision::F32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
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
            other => Err(ModelError::Config(format!(
                "precision `{other}`: expected f32 or bf16"
            ))),
        }
    }
}
