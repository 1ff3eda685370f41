//! Element types the ring can reduce, and how they add.

use half::{bf16, f16};
use tch::Kind;

/// The dtype of a buffer, as carried in the per-operation header (so mismatched ranks are detected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DType {
    U8 = 1,
    F16 = 2,
    BF16 = 3,
    F32 = 4,
    F64 = 5,
}

impl DType {
    pub(crate) fn from_u8(v: u8) -> Option<DType> {
        Some(match v {
            1 => DType::U8,
            2 => DType::F16,
            3 => DType::BF16,
            4 => DType::F32,
            5 => DType::F64,
            _ => return None,
        })
    }

    /// The libtorch kind of this dtype.
    pub fn kind(self) -> Kind {
        match self {
            DType::U8 => Kind::Uint8,
            DType::F16 => Kind::Half,
            DType::BF16 => Kind::BFloat16,
            DType::F32 => Kind::Float,
            DType::F64 => Kind::Double,
        }
    }

    /// The dtype of a libtorch kind, if the collectives support it.
    pub fn of_kind(kind: Kind) -> Option<DType> {
        Some(match kind {
            Kind::Uint8 => DType::U8,
            Kind::Half => DType::F16,
            Kind::BFloat16 => DType::BF16,
            Kind::Float => DType::F32,
            Kind::Double => DType::F64,
            _ => return None,
        })
    }
}

/// A plain element type the ring can send as bytes and add.
pub trait Element: bytemuck::Pod + Send + Sync {
    /// The header tag of this type.
    const DTYPE: DType;

    /// `acc[i] += x[i]`. Every rank adds in the same order, so sums are identical everywhere; half types add
    /// in f32 and round once per step (as gloo and NCCL do).
    fn add_into(acc: &mut [Self], x: &[Self]);
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn add_into(acc: &mut [f32], x: &[f32]) {
        for (a, b) in acc.iter_mut().zip(x) {
            *a += *b;
        }
    }
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
    fn add_into(acc: &mut [f64], x: &[f64]) {
        for (a, b) in acc.iter_mut().zip(x) {
            *a += *b;
        }
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn add_into(acc: &mut [bf16], x: &[bf16]) {
        for (a, b) in acc.iter_mut().zip(x) {
            *a = bf16::from_f32(a.to_f32() + b.to_f32());
        }
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn add_into(acc: &mut [f16], x: &[f16]) {
        for (a, b) in acc.iter_mut().zip(x) {
            *a = f16::from_f32(a.to_f32() + b.to_f32());
        }
    }
}

impl Element for u8 {
    const DTYPE: DType = DType::U8;
    fn add_into(acc: &mut [u8], x: &[u8]) {
        for (a, b) in acc.iter_mut().zip(x) {
            *a = a.wrapping_add(*b);
        }
    }
}
