//! Decoding one sample's volume (and optionally one of its masks) into caller-owned f32 buffers,
//! with the training augmentation applied on the way.

use m3d_volume::augment::{
    augment_image_into, augment_mask_into, augment_u8_image_into, AugmentParams,
};

use crate::encode::{decode_image_into, unpack_mask_into, ImageDtype};
use crate::schema::VolumeRecord;
use crate::ShardError;

/// Adds the volume id to a decoding error.
fn in_volume(vol: &VolumeRecord, what: &str, e: ShardError) -> ShardError {
    ShardError::Invalid(format!("volume `{}`: {what}: {e}", vol.volume_id))
}

/// Decodes `vol`'s image into `image_out` (`prod(shape)` f32 values, layout C, D, H, W) and, when
/// `mask_out` is given, mask `mask_index` of `vol` into it (`prod(shape[1..])` values, 0.0 / 1.0; all
/// zeros when that mask is empty). `augment`, if any, is applied with the same parameters to both, so
/// the mask stays aligned with the image. Returns the output shape (H and W swap under odd rotations).
///
/// Without augmentation the bytes decode straight into the outputs; with it, each is decoded into
/// `scratch` (resized as needed and reused by the caller across samples) and augmented from there, so
/// no other full-volume buffer is allocated.
///
/// `mask_out` without `mask_index` is an error, since the caller asked for a mask it did not name; a
/// `mask_index` without `mask_out` is ignored.
pub fn decode_sample_into(
    vol: &VolumeRecord,
    mask_index: Option<u32>,
    augment: Option<&AugmentParams>,
    scratch: &mut Vec<f32>,
    image_out: &mut [f32],
    mask_out: Option<&mut [f32]>,
) -> Result<[usize; 4], ShardError> {
    let shape = vol.shape_usize();
    let n = vol.numel();
    if image_out.len() != n {
        return Err(ShardError::Length {
            what: format!(
                "image buffer for volume `{}` of shape {:?}",
                vol.volume_id, vol.shape
            ),
            expected: n,
            actual: image_out.len(),
            unit: "values",
        });
    }
    if vol.image.is_empty() && n > 0 {
        return Err(ShardError::Invalid(format!(
            "volume `{}` was read without its image (with_images(false))",
            vol.volume_id
        )));
    }
    let out_shape = match augment {
        None => {
            decode_image_into(&vol.image, vol.dtype, image_out)
                .map_err(|e| in_volume(vol, "image", e))?;
            shape
        }
        // 8-bit storage: decode and augment in one pass, no intermediate float volume.
        Some(p) if vol.dtype == ImageDtype::U8 && vol.image.len() == n => {
            augment_u8_image_into(p, &vol.image, shape, image_out)
        }
        Some(p) => {
            scratch.resize(n, 0.0);
            decode_image_into(&vol.image, vol.dtype, scratch)
                .map_err(|e| in_volume(vol, "image", e))?;
            augment_image_into(p, scratch, shape, image_out)
        }
    };

    let Some(mask_out) = mask_out else {
        return Ok(out_shape);
    };
    let Some(index) = mask_index else {
        return Err(ShardError::Invalid(format!(
            "volume `{}`: a mask buffer was given without a mask index",
            vol.volume_id
        )));
    };
    let spatial = vol.spatial_numel();
    if mask_out.len() != spatial {
        return Err(ShardError::Length {
            what: format!(
                "mask buffer for volume `{}` of shape {:?}",
                vol.volume_id, vol.shape
            ),
            expected: spatial,
            actual: mask_out.len(),
            unit: "values",
        });
    }
    let mask = vol.masks.get(index as usize).ok_or_else(|| {
        ShardError::Invalid(format!(
            "volume `{}` has {} masks, mask index {index} requested{}",
            vol.volume_id,
            vol.masks.len(),
            if vol.masks.is_empty() {
                " (was it read with with_masks(false)?)"
            } else {
                ""
            }
        ))
    })?;
    if mask.voxels == 0 {
        // Rotations and flips of an all-zero mask are all zeros.
        mask_out.fill(0.0);
        return Ok(out_shape);
    }
    let mask_shape = [1, shape[1], shape[2], shape[3]];
    match augment {
        None => unpack_mask_into(&mask.bits, mask_out).map_err(|e| in_volume(vol, "mask", e))?,
        Some(p) => {
            scratch.resize(spatial, 0.0);
            unpack_mask_into(&mask.bits, scratch).map_err(|e| in_volume(vol, "mask", e))?;
            augment_mask_into(p, scratch, mask_shape, mask_out);
        }
    }
    Ok(out_shape)
}
