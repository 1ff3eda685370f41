//! M3D-RefSeg intensity scaling runs in float64, as the reference runs MONAI's
//! ScaleIntensityRangePercentiles on nibabel's `get_fdata()` (float64): `preprocess_case` equals the chain on a
//! float64 copy of the CT bit for bit, and (on CT-like values with fractions) differs from the float32 chain.

use std::path::Path;

use m3d_data_prep::cap::TARGET;
use m3d_data_prep::refseg::{preprocess_case, AxisOrder};
use m3d_volume::transforms::{
    foreground_bbox, permute_spatial, scale_intensity_range_percentiles,
    scale_intensity_range_percentiles_f64, try_resize_trilinear_box,
};
use m3d_volume::Volume;

fn ct_like(shape: [usize; 4]) -> Volume<f32> {
    let mut state = 0x853c_49e6_748f_ea9bu64;
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            match state % 4 {
                0 => -1024.0,
                _ => (state >> 40) as f32 / (1u64 << 24) as f32 * 3900.0 - 900.0,
            }
        })
        .collect();
    Volume::new(shape, data).unwrap()
}

fn bits(v: &Volume<f32>) -> Vec<u32> {
    v.data().iter().map(|x| x.to_bits()).collect()
}

#[test]
fn refseg_percentile_scaling_is_float64() {
    let shape = [1, 40, 36, 22];
    let image = ct_like(shape);
    let ids = Volume::filled(shape, 0f32);
    for axes in [AxisOrder::Consistent, AxisOrder::Reference] {
        let (got, _) =
            preprocess_case(image.clone(), ids.clone(), axes, Path::new("ct.nii.gz")).unwrap();
        let perm = match axes {
            AxisOrder::Consistent => [2, 1, 0],
            AxisOrder::Reference => [2, 0, 1],
        };
        let permuted = permute_spatial(&image, perm);
        let chain = |scaled: &Volume<f32>| {
            let b = foreground_bbox(scaled).unwrap();
            try_resize_trilinear_box(scaled, &b, TARGET, |x| x).unwrap()
        };
        let as_f64 = permuted.map(f64::from);
        let want = chain(&scale_intensity_range_percentiles_f64(
            &as_f64, 0.5, 99.5, 0.0, 1.0, true,
        ));
        assert_eq!(got.shape(), want.shape());
        assert!(bits(&got) == bits(&want), "{axes:?}: not the float64 chain");
        let mut f32_scaled = permuted.clone();
        scale_intensity_range_percentiles(&mut f32_scaled, 0.5, 99.5, 0.0, 1.0, true);
        assert!(
            bits(&chain(&f32_scaled)) != bits(&want),
            "{axes:?}: the data should tell the float32 and float64 chains apart"
        );
    }
}
