//! Round trips of the image and mask encodings.
mod common;

use m3d_shards::encode::{
    decode_image_into, encode_image, pack_mask, unpack_mask_into, unpack_mask_u8_into,
};
use m3d_shards::{ImageDtype, ShardError};
use rand::Rng;

#[test]
fn u8_round_trip_error_is_at_most_half_a_step() {
    let mut rng = common::rng(1);
    let data: Vec<f32> = (0..10_000).map(|_| rng.random::<f32>()).collect();
    let bytes = encode_image(&data, ImageDtype::U8);
    assert_eq!(bytes.len(), data.len());
    let mut out = vec![0f32; data.len()];
    decode_image_into(&bytes, ImageDtype::U8, &mut out).unwrap();
    for (a, b) in data.iter().zip(&out) {
        assert!((a - b).abs() <= 0.5 / 255.0 + 1e-7, "{a} -> {b}");
    }
    // Exact 8-bit levels (as in 8-bit PNG sources) survive exactly.
    let levels: Vec<f32> = (0..=255u8).map(|q| f32::from(q) / 255.0).collect();
    let mut back = vec![0f32; 256];
    decode_image_into(
        &encode_image(&levels, ImageDtype::U8),
        ImageDtype::U8,
        &mut back,
    )
    .unwrap();
    assert_eq!(levels, back);
}

#[test]
fn u8_clamps_out_of_range_values() {
    let bytes = encode_image(&[-3.0, 1.7, f32::NAN, 0.0, 1.0], ImageDtype::U8);
    assert_eq!(bytes, vec![0, 255, 0, 0, 255]);
}

#[test]
fn f16_round_trip_within_half_precision() {
    let mut rng = common::rng(2);
    let data: Vec<f32> = (0..10_000)
        .map(|_| rng.random::<f32>() * 2.0 - 0.5)
        .collect();
    let bytes = encode_image(&data, ImageDtype::F16);
    assert_eq!(bytes.len(), data.len() * 2);
    let mut out = vec![0f32; data.len()];
    decode_image_into(&bytes, ImageDtype::F16, &mut out).unwrap();
    for (a, b) in data.iter().zip(&out) {
        // Half precision has an 11-bit significand: relative error <= 2^-11 for normal numbers,
        // and absolute error <= 2^-25 (half the smallest subnormal step) near zero.
        let tol = (a.abs() * 2f32.powi(-11)).max(2f32.powi(-25));
        assert!((a - b).abs() <= tol, "{a} -> {b}");
    }
    // Little-endian IEEE half: 1.0 is 0x3C00.
    assert_eq!(encode_image(&[1.0], ImageDtype::F16), vec![0x00, 0x3C]);
}

#[test]
fn f32_round_trip_is_exact() {
    let data = [0.0f32, -1.5, 1e-30, 3.25e7, f32::MIN_POSITIVE];
    let bytes = encode_image(&data, ImageDtype::F32);
    assert_eq!(&bytes[4..8], &(-1.5f32).to_le_bytes());
    let mut out = [0f32; 5];
    decode_image_into(&bytes, ImageDtype::F32, &mut out).unwrap();
    assert_eq!(data, out);
}

#[test]
fn decode_checks_length() {
    let bytes = encode_image(&[0.5; 10], ImageDtype::F16);
    let mut out = vec![0f32; 11];
    let err = decode_image_into(&bytes, ImageDtype::F16, &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            ShardError::Length {
                expected: 22,
                actual: 20,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn mask_bits_are_lsb_first() {
    // Voxel 0 -> bit 0 of byte 0; voxel 9 -> bit 1 of byte 1; any nonzero value counts as set.
    let mut mask = vec![0u8; 10];
    mask[0] = 1;
    mask[9] = 200;
    let (bits, ones) = pack_mask(&mask);
    assert_eq!(bits, vec![0b0000_0001, 0b0000_0010]);
    assert_eq!(ones, 2);
}

#[test]
fn masks_round_trip_losslessly() {
    let mut rng = common::rng(3);
    for len in [1usize, 7, 8, 9, 64, 1000, 4099] {
        let mask: Vec<u8> = (0..len)
            .map(|_| u8::from(rng.random::<f32>() < 0.4))
            .collect();
        let (bits, ones) = pack_mask(&mask);
        assert_eq!(bits.len(), len.div_ceil(8));
        assert_eq!(ones, mask.iter().filter(|&&v| v != 0).count() as u64);
        let mut f = vec![7f32; len];
        unpack_mask_into(&bits, &mut f).unwrap();
        let mut u = vec![7u8; len];
        unpack_mask_u8_into(&bits, &mut u).unwrap();
        assert_eq!(u, mask);
        assert!(f.iter().zip(&mask).all(|(&a, &m)| a == f32::from(m)));
    }
}

#[test]
fn unpack_checks_length_and_padding() {
    let (bits, _) = pack_mask(&[1, 1, 1]);
    let mut out = vec![0f32; 9];
    assert!(matches!(
        unpack_mask_into(&bits, &mut out),
        Err(ShardError::Length { .. })
    ));
    // A mask of 3 voxels must not have bits set beyond voxel 2.
    let mut out = vec![0f32; 3];
    assert!(unpack_mask_into(&[0b0000_1111], &mut out).is_err());
    unpack_mask_into(&bits, &mut out).unwrap();
    assert_eq!(out, vec![1.0; 3]);
}

#[test]
fn dtype_names() {
    for (d, s) in [
        (ImageDtype::U8, "\"u8\""),
        (ImageDtype::F16, "\"f16\""),
        (ImageDtype::F32, "\"f32\""),
    ] {
        assert_eq!(serde_json::to_string(&d).unwrap(), s);
        assert_eq!(serde_json::from_str::<ImageDtype>(s).unwrap(), d);
        assert_eq!(format!("\"{d}\""), s);
    }
}
