//! The accelerators `m3d plan --gpu` knows: usable memory and dense peak throughput, from the vendors' data
//! sheets (SXM parts). Memory is what the device reports as total, of which the CUDA context and the
//! caching allocator's fragmentation take some: the planner keeps [`Gpu::reserve_bytes`] aside.

use serde::Serialize;

/// One accelerator model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Gpu {
    pub name: &'static str,
    /// Device memory in bytes.
    pub memory_bytes: f64,
    /// Dense bf16 tensor-core peak, FLOP/s.
    pub peak_bf16: f64,
    /// Dense f32 peak (TF32 off), FLOP/s.
    pub peak_f32: f64,
}

const GIB: f64 = (1u64 << 30) as f64;

/// Every known accelerator.
pub const GPUS: [Gpu; 5] = [
    Gpu {
        name: "h100-80gb",
        memory_bytes: 80.0 * GIB,
        peak_bf16: 989e12,
        peak_f32: 67e12,
    },
    Gpu {
        name: "h200-141gb",
        memory_bytes: 141.0 * GIB,
        peak_bf16: 989e12,
        peak_f32: 67e12,
    },
    Gpu {
        name: "a100-80gb",
        memory_bytes: 80.0 * GIB,
        peak_bf16: 312e12,
        peak_f32: 19.5e12,
    },
    Gpu {
        name: "a100-40gb",
        memory_bytes: 40.0 * GIB,
        peak_bf16: 312e12,
        peak_f32: 19.5e12,
    },
    Gpu {
        name: "l40s-48gb",
        memory_bytes: 48.0 * GIB,
        peak_bf16: 362e12,
        peak_f32: 91.6e12,
    },
];

impl Gpu {
    /// The accelerator called `name`.
    pub fn named(name: &str) -> Option<Gpu> {
        GPUS.iter().copied().find(|g| g.name == name)
    }

    /// Names of every known accelerator, for error messages.
    pub fn names() -> Vec<&'static str> {
        GPUS.iter().map(|g| g.name).collect()
    }

    /// Memory kept aside for the CUDA context, NCCL's buffers and allocator fragmentation: 3 GiB plus 5 %.
    pub fn reserve_bytes(&self) -> f64 {
        3.0 * GIB + 0.05 * self.memory_bytes
    }
}
