//! `decode_sample_into`: plain decoding equals the codec output, augmented decoding equals decoding then
//! augmenting with m3d-volume's allocating functions, the geometry matches a hand-derived flip, and bad
//! arguments are refused.
mod common;

use m3d_shards::encode::decode_image_into;
use m3d_shards::{decode_sample_into, ImageDtype};
use m3d_volume::augment::{augment_image, augment_mask, AugmentParams};
use m3d_volume::Volume;

#[test]
fn plain_decode_matches_codec_and_source_mask() {
    let mut rng = common::rng(50);
    let s = common::synthetic_volume(&mut rng, "v", [1, 3, 4, 6], ImageDtype::F16, 3);
    let n = 72;
    let mut expected = vec![0f32; n];
    decode_image_into(&s.record.image, ImageDtype::F16, &mut expected).unwrap();
    let mut scratch = Vec::new();
    let mut image = vec![f32::NAN; n];
    let mut mask = vec![f32::NAN; n];
    let shape = decode_sample_into(
        &s.record,
        Some(2),
        None,
        &mut scratch,
        &mut image,
        Some(&mut mask),
    )
    .unwrap();
    assert_eq!(shape, [1, 3, 4, 6]);
    assert_eq!(image, expected);
    assert_eq!(
        mask,
        s.masks[2].iter().map(|&m| f32::from(m)).collect::<Vec<_>>()
    );
    assert!(scratch.is_empty(), "no scratch needed without augmentation");

    // Mask 1 is empty (stored without bits): all zeros.
    let mut mask = vec![f32::NAN; n];
    decode_sample_into(
        &s.record,
        Some(1),
        None,
        &mut scratch,
        &mut image,
        Some(&mut mask),
    )
    .unwrap();
    assert!(mask.iter().all(|&x| x == 0.0));
}

#[test]
fn augmented_decode_equals_decode_then_augment() {
    let mut rng = common::rng(51);
    let s = common::synthetic_volume(&mut rng, "v", [1, 3, 4, 6], ImageDtype::U8, 2);
    let mut decoded = vec![0f32; 72];
    decode_image_into(&s.record.image, ImageDtype::U8, &mut decoded).unwrap();
    let p = AugmentParams {
        rot90_k: 1,
        flip: [true, false, true],
        scale: Some(0.05),
        shift: Some(-0.02),
    };
    let want_img = augment_image(&p, &Volume::new([1, 3, 4, 6], decoded).unwrap());
    let src_mask: Vec<f32> = s.masks[0].iter().map(|&m| f32::from(m)).collect();
    let want_mask = augment_mask(&p, &Volume::new([1, 3, 4, 6], src_mask).unwrap());

    let mut scratch = Vec::new();
    let mut image = vec![0f32; 72];
    let mut mask = vec![0f32; 72];
    let shape = decode_sample_into(
        &s.record,
        Some(0),
        Some(&p),
        &mut scratch,
        &mut image,
        Some(&mut mask),
    )
    .unwrap();
    assert_eq!(shape, [1, 3, 6, 4], "a quarter turn swaps H and W");
    assert_eq!(shape, want_img.shape());
    assert_eq!(image, want_img.data());
    assert_eq!(mask, want_mask.data());
}

#[test]
fn flip_geometry_matches_the_definition() {
    let mut rng = common::rng(52);
    let s = common::synthetic_volume(&mut rng, "v", [1, 2, 3, 5], ImageDtype::F32, 1);
    let p = AugmentParams {
        rot90_k: 0,
        flip: [false, false, true],
        scale: None,
        shift: None,
    };
    let mut scratch = Vec::new();
    let mut image = vec![0f32; 30];
    let mut mask = vec![0f32; 30];
    decode_sample_into(
        &s.record,
        Some(0),
        Some(&p),
        &mut scratch,
        &mut image,
        Some(&mut mask),
    )
    .unwrap();
    for d in 0..2 {
        for h in 0..3 {
            for w in 0..5 {
                let out = (d * 3 + h) * 5 + w;
                let src = (d * 3 + h) * 5 + (4 - w);
                assert_eq!(image[out], s.image[src]);
                assert_eq!(mask[out], f32::from(s.masks[0][src]));
            }
        }
    }
}

#[test]
fn bad_arguments_are_refused() {
    let mut rng = common::rng(53);
    let s = common::synthetic_volume(&mut rng, "case/7", [1, 2, 2, 2], ImageDtype::F16, 1);
    let mut scratch = Vec::new();
    let mut small = vec![0f32; 7];
    let mut image = vec![0f32; 8];
    let mut mask = vec![0f32; 8];
    let err =
        decode_sample_into(&s.record, None, None, &mut scratch, &mut small, None).unwrap_err();
    assert!(err.to_string().contains("case/7"), "{err}");
    let err = decode_sample_into(
        &s.record,
        Some(5),
        None,
        &mut scratch,
        &mut image,
        Some(&mut mask),
    )
    .unwrap_err();
    assert!(err.to_string().contains("mask index 5"), "{err}");
    assert!(decode_sample_into(
        &s.record,
        None,
        None,
        &mut scratch,
        &mut image,
        Some(&mut mask)
    )
    .is_err());
    assert!(decode_sample_into(
        &s.record,
        Some(0),
        None,
        &mut scratch,
        &mut image,
        Some(&mut small)
    )
    .is_err());
    let mut no_image = s.record.clone();
    no_image.image.clear();
    assert!(decode_sample_into(&no_image, None, None, &mut scratch, &mut image, None).is_err());
}
