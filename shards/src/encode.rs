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

/// 2^23: adding it to a float32 in `[0, 2^23)` leaves no fraction bits, so the addition itself rounds to an
/// integer, to nearest with ties to even (the only rounding mode Rust code runs in), and subtracting it again
/// is exact.
const ROUND_MAGIC: f32 = 8_388_608.0;

#[inline]
fn quantize_u8(v: f32) -> u8 {
    // `round_ties_even` of the scaled value, written as `+ 2^23 - 2^23` because on baseline x86-64 (no SSE4.1
    // `roundss`) `round_ties_even` is a libm call per voxel, which kept this loop from vectorising (6 % of a
    // conversion). `as` saturates and maps NaN to 0, so only the clamp is needed for the documented range.
    let y = v.clamp(0.0, 1.0) * 255.0;
    ((y + ROUND_MAGIC) - ROUND_MAGIC) as u8
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

#[cfg(test)]
mod tests {
    use super::quantize_u8;
    use rand::{Rng, SeedableRng};

    /// The reference: float32 `round(clamp(v) * 255)` with ties to even, as numpy's `np.round` does.
    fn reference(v: f32) -> u8 {
        (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8
    }

    #[test]
    fn quantize_rounds_like_round_ties_even() {
        // Every value whose scaled form is a tie or next to one (k + 0.5 and its float32 neighbours), where the
        // two roundings could differ; then random values and the edges.
        for k in 0..255u32 {
            let tie = k as f32 + 0.5;
            for bits in tie.to_bits() - 3..=tie.to_bits() + 3 {
                let y = f32::from_bits(bits);
                let v = y / 255.0;
                for v in [
                    v,
                    f32::from_bits(v.to_bits() - 1),
                    f32::from_bits(v.to_bits() + 1),
                ] {
                    assert_eq!(quantize_u8(v), reference(v), "{v:e}");
                }
            }
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..2_000_000 {
            let v: f32 = rng.random_range(-0.1..1.1);
            assert_eq!(quantize_u8(v), reference(v), "{v:e}");
        }
        for v in [
            0.0,
            -0.0,
            1.0,
            f32::MIN_POSITIVE,
            f32::EPSILON,
            1.0 - f32::EPSILON,
            -1.0,
            2.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ] {
            assert_eq!(quantize_u8(v), reference(v), "{v:e}");
        }
    }
}
