//! Decoding one sample's volume (and optionally one mask) into caller-owned buffers, with augmentation.
use crate::schema::VolumeRecord;
use crate::ShardError;
pub fn decode_sample_into(
    _vol: &VolumeRecord,
    _mask_index: Option<u32>,
    _scratch: &mut Vec<f32>,
    _image_out: &mut [f32],
    _mask_out: Option<&mut [f32]>,
) -> Result<[usize; 4], ShardError> {
    Err(ShardError::Invalid("todo".into()))
}
