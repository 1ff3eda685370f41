//! Rough single-process timings of the hot transforms (not a test): the M3D-Cap preparation chain
//! after decoding, trilinear resizing and the fused training augmentation.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release -p m3d-volume --example transforms_bench` gives the
//! per-core numbers to hold against `tests/oracle/reference_bench.py`.

use std::time::Instant;

use m3d_volume::augment::{augment_image_into, AugmentParams};
use m3d_volume::transforms::{
    crop, foreground_bbox, foreground_bbox_by, min_max_normalise, prepare_cap_u8, resize_area,
    resize_trilinear, try_resize_area_box, BBox,
};
use m3d_volume::Volume;
use rand::{Rng, SeedableRng};

/// Best of `reps` runs: the build machine is shared, the minimum is the least disturbed.
fn time<T>(label: &str, reps: usize, mut f: impl FnMut() -> T) {
    let _ = f();
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        std::hint::black_box(f());
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{label:<52} {:8.2} ms", best * 1e3);
}

fn main() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let [d, h, w] = [100usize, 512, 512];
    let slices: Vec<f32> = (0..d * h * w)
        .map(|i| {
            let (hi, wi) = ((i / w) % h, i % w);
            if (40..480).contains(&hi) && (30..490).contains(&wi) {
                f32::from(rng.random::<u8>()) / 255.0
            } else {
                0.0
            }
        })
        .collect();
    let vol = Volume::new([1, d, h, w], slices).unwrap();
    time("cap chain 1x100x512x512 -> 32x256x256 (area)", 5, || {
        let mut v = vol.clone();
        min_max_normalise(&mut v);
        let b = foreground_bbox(&v).unwrap();
        resize_area(&crop(&v, &b), [32, 256, 256])
    });
    let u8vol = vol.map(|x| (x * 255.0).round() as u8);
    time("cap chain fused from u8 (prepare_cap_u8)", 5, || {
        prepare_cap_u8(&u8vol, [32, 256, 256])
    });
    time("  u8 min+max", 5, || {
        (
            u8vol.data().iter().copied().min(),
            u8vol.data().iter().copied().max(),
        )
    });
    time("  u8 bbox", 5, || foreground_bbox_by(&u8vol, |x| x > 0));
    let lut: Vec<f32> = (0..256).map(|x| x as f32 / 255.0).collect();
    let lut: [f32; 256] = std::array::from_fn(|i| lut[i]);
    time("  u8 area box via lut", 5, || {
        try_resize_area_box(
            &u8vol,
            &BBox {
                start: [0, 40, 30],
                end: [100, 480, 490],
            },
            [32, 256, 256],
            |x| lut[usize::from(x)],
        )
    });
    time("  u8 area box via arithmetic", 5, || {
        try_resize_area_box(
            &u8vol,
            &BBox {
                start: [0, 40, 30],
                end: [100, 480, 490],
            },
            [32, 256, 256],
            |x| (f32::from(x) / 255.0 - 0.0) / 1.0,
        )
    });
    time("  f32 area box (identity)", 5, || {
        try_resize_area_box(
            &vol,
            &BBox {
                start: [0, 40, 30],
                end: [100, 480, 490],
            },
            [32, 256, 256],
            |x| x,
        )
    });
    time(
        "  f32 area box 100x440x460 -> 100x440x230 (W only)",
        5,
        || {
            try_resize_area_box(
                &vol,
                &BBox {
                    start: [0, 40, 30],
                    end: [100, 480, 490],
                },
                [100, 440, 256],
                |x| x,
            )
        },
    );
    time("  resize_area only", 5, || {
        resize_area(&vol, [32, 256, 256])
    });
    time("  min_max + bbox + crop only", 5, || {
        let mut v = vol.clone();
        min_max_normalise(&mut v);
        let b = foreground_bbox(&v).unwrap();
        crop(&v, &b)
    });
    time("  clone only", 5, || vol.clone());
    time("  min_max only (on a clone)", 5, || {
        let mut v = vol.clone();
        min_max_normalise(&mut v);
        v
    });
    time("  bbox only", 5, || foreground_bbox(&vol));
    let b = foreground_bbox(&vol).unwrap();
    time("  crop only", 5, || crop(&vol, &b));
    time("resize_trilinear 1x100x512x512 -> 32x256x256", 5, || {
        resize_trilinear(&vol, [32, 256, 256])
    });

    let img = resize_area(&vol, [32, 256, 256]);
    let mut dst = vec![0f32; img.len()];
    for (label, k, flip) in [
        ("augment k=0 no flip", 0, [false; 3]),
        ("augment k=1 flips", 1, [true, true, false]),
        ("augment k=3 flip W", 3, [false, false, true]),
    ] {
        let p = AugmentParams {
            rot90_k: k,
            flip,
            scale: Some(0.05),
            shift: Some(0.01),
        };
        time(label, 50, || {
            augment_image_into(&p, img.data(), img.shape(), &mut dst)
        });
    }
}
