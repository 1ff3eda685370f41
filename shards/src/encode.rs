//! Byte encodings of volume images and masks inside a shard: images as u8 / f16 / f32 little-endian
//! arrays, masks bit-packed one bit per voxel.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ShardError;

/// Storage type of a volume image.
///
/// * `u8`: `q = round(clamp(v, 0, 1) * 255)` (round half to even; NaN stores as 0), decoded as `q / 255`.
///   Lossless for 8-bit sources such as the M3D-Cap slices (max error 0.5/255 otherwise).
/// * `f16`: IEEE 754 half precision (round to nearest even), for CT intensities already normalised to [0, 1].
/// * `f32`: the raw values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageDtype {
    U8,
    F16,
    F32,
}

impl ImageDtype {
    /// Bytes per voxel.
    pub fn size(self) -> usize {
        match self {
            ImageDtype::U8 => 1,
            ImageDtype::F16 => 2,
            ImageDtype::F32 => 4,
        }
    }

    /// The name stored in shards and manifests: `"u8"`, `"f16"` or `"f32"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageDtype::U8 => "u8",
            ImageDtype::F16 => "f16",
            ImageDtype::F32 => "f32",
        }
    }
}

impl fmt::Display for ImageDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ImageDtype {
    type Err = ShardError;
    fn from_str(s: &str) -> Result<Self, ShardError> {
        match s {
            "u8" => Ok(ImageDtype::U8),
            "f16" => Ok(ImageDtype::F16),
            "f32" => Ok(ImageDtype::F32),
            other => Err(ShardError::Invalid(format!(
                "unknown image dtype `{other}` (expected u8, f16 or f32)"
            ))),
        }
    }
}

fn quantize_u8(v: f32) -> u8 {
    // `as` saturates and maps NaN to 0, so only the clamp is needed for the documented range.
    (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8
}

/// Encodes `data` as little-endian bytes of `dtype` (see [`ImageDtype`] for the rules).
pub fn encode_image(data: &[f32], dtype: ImageDtype) -> Vec<u8> {
    match dtype {
        ImageDtype::U8 => data.iter().map(|&v| quantize_u8(v)).collect(),
        ImageDtype::F16 => {
            let mut out = Vec::with_capacity(data.len() * 2);
            for &v in data {
                out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
            out
        }
        ImageDtype::F32 => {
            let mut out = Vec::with_capacity(data.len() * 4);
            for &v in data {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out
        }
    }
}

/// Decodes bytes written by [`encode_image`] into `out`; `bytes.len()` must be `out.len() * dtype.size()`.
pub fn decode_image_into(
    bytes: &[u8],
    dtype: ImageDtype,
    out: &mut [f32],
) -> Result<(), ShardError> {
    let expected = out.len() * dtype.size();
    if bytes.len() != expected {
        return Err(ShardError::Length {
            what: format!("{dtype} image for {} voxels", out.len()),
            expected,
            actual: bytes.len(),
            unit: "bytes",
        });
    }
    match dtype {
        ImageDtype::U8 => {
            for (o, &q) in out.iter_mut().zip(bytes) {
                *o = f32::from(q) / 255.0;
            }
        }
        ImageDtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        ImageDtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
    Ok(())
}

/// Number of bytes of a packed mask of `voxels` voxels.
pub fn packed_len(voxels: usize) -> usize {
    voxels.div_ceil(8)
}

/// Packs a mask one bit per voxel, least significant bit first (voxel `i` is bit `i % 8` of byte `i / 8`);
/// any nonzero input is 1 and the padding bits of the last byte are 0. Returns the bits and the count of ones.
pub fn pack_mask(mask: &[u8]) -> (Vec<u8>, u64) {
    let mut bits = vec![0u8; packed_len(mask.len())];
    let mut ones = 0u64;
    for (byte, chunk) in bits.iter_mut().zip(mask.chunks(8)) {
        let mut b = 0u8;
        for (i, &v) in chunk.iter().enumerate() {
            if v != 0 {
                b |= 1 << i;
            }
        }
        ones += u64::from(b.count_ones());
        *byte = b;
    }
    (bits, ones)
}

fn check_packed(bits: &[u8], voxels: usize) -> Result<(), ShardError> {
    let expected = packed_len(voxels);
    if bits.len() != expected {
        return Err(ShardError::Length {
            what: format!("packed mask for {voxels} voxels"),
            expected,
            actual: bits.len(),
            unit: "bytes",
        });
    }
    let tail = voxels % 8;
    if tail != 0 {
        if let Some(&last) = bits.last() {
            if last >> tail != 0 {
                return Err(ShardError::Invalid(format!(
                    "packed mask for {voxels} voxels has nonzero padding bits; the mask is corrupted or has another size"
                )));
            }
        }
    }
    Ok(())
}

fn unpack_with<T: Copy>(bits: &[u8], out: &mut [T], zero: T, one: T) -> Result<(), ShardError> {
    check_packed(bits, out.len())?;
    for (chunk, &b) in out.chunks_mut(8).zip(bits) {
        for (i, o) in chunk.iter_mut().enumerate() {
            *o = if (b >> i) & 1 == 1 { one } else { zero };
        }
    }
    Ok(())
}

/// Unpacks a mask written by [`pack_mask`] into 0.0 / 1.0 values; `bits` must hold exactly
/// `ceil(out.len() / 8)` bytes.
pub fn unpack_mask_into(bits: &[u8], out: &mut [f32]) -> Result<(), ShardError> {
    unpack_with(bits, out, 0.0, 1.0)
}

/// Unpacks a mask written by [`pack_mask`] into 0 / 1 bytes.
pub fn unpack_mask_u8_into(bits: &[u8], out: &mut [u8]) -> Result<(), ShardError> {
    unpack_with(bits, out, 0, 1)
}
