//! Oracle tests: the transforms of `m3d-volume` against MONAI 1.6.1 / torch (CPU) run by
//! `tests/oracle/volume_oracle.py` on the same random inputs.
//!
//! Images must agree within 1e-5 absolute; masks, labels and crops exactly. With
//! `M3D_ORACLE_BITEXACT=1` images must agree bit for bit (true where torch runs its FMA kernels,
//! i.e. AVX2/AVX-512 machines). The interpreter is `$M3D_PYTHON` or `<workspace>/.venv/bin/python`;
//! if it is missing the tests fail.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use m3d_formats::npy::{read_npy, write_npy, NpyArray, NpyData};
use m3d_volume::augment::{augment_image, augment_mask, AugmentParams};
use m3d_volume::transforms::{
    crop, foreground_bbox, min_max_normalise, permute_spatial, prepare_cap_u8, resize_area,
    resize_nearest, resize_trilinear, scale_intensity_range_percentiles,
    scale_intensity_range_percentiles_f64,
};
use m3d_volume::Volume;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const IMAGE_TOL: f32 = 1e-5;

use m3d_testkit::python;

/// What Python's output is compared with.
enum Expect {
    /// Float image, within IMAGE_TOL (or bit-exact with M3D_ORACLE_BITEXACT=1).
    Image(Volume<f32>),
    /// Integer-valued data (masks, labels): exact.
    Exact(Volume<f64>),
}

/// One oracle run: inputs written to a temp dir, one job line per reference computation.
struct Oracle {
    dir: tempfile::TempDir,
    jobs: String,
    expect: Vec<(String, PathBuf, Expect)>,
    counter: usize,
}

impl Oracle {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            jobs: String::new(),
            expect: Vec::new(),
            counter: 0,
        }
    }

    fn path(&mut self, stem: &str) -> PathBuf {
        self.counter += 1;
        self.dir.path().join(format!("{}_{stem}.npy", self.counter))
    }

    fn input_f32(&mut self, v: &Volume<f32>) -> PathBuf {
        let p = self.path("in");
        write_npy(&p, &NpyArray::f32(v.shape().to_vec(), v.data().to_vec())).unwrap();
        p
    }

    fn input_raw(&mut self, shape: Vec<usize>, data: NpyData) -> PathBuf {
        let p = self.path("in");
        write_npy(&p, &NpyArray::new(shape, data).unwrap()).unwrap();
        p
    }

    fn input_i32(&mut self, v: &Volume<i32>) -> PathBuf {
        self.input_raw(v.shape().to_vec(), NpyData::I32(v.data().to_vec()))
    }

    /// Registers a job (`op` with `args`, where `{out}` placeholders are output paths in order).
    fn job(&mut self, name: &str, op: &str, args: &[String], expects: Vec<Expect>) {
        let mut line = op.to_string();
        let mut outs = Vec::new();
        for _ in 0..expects.len() {
            outs.push(self.path("out"));
        }
        let mut next_out = outs.iter();
        for a in args {
            line.push(' ');
            if a == "{out}" {
                line.push_str(&next_out.next().unwrap().display().to_string());
            } else {
                line.push_str(a);
            }
        }
        self.jobs.push_str(&line);
        self.jobs.push('\n');
        for (i, (e, o)) in expects.into_iter().zip(outs).enumerate() {
            self.expect.push((format!("{name}[{i}]"), o, e));
        }
    }

    /// Runs Python once for all jobs and compares every output; panics listing all mismatches.
    fn run(self) {
        let jobs = self.dir.path().join("jobs.txt");
        std::fs::write(&jobs, &self.jobs).unwrap();
        let script = m3d_testkit::package_dir().join("tests/oracle/volume_oracle.py");
        let out = Command::new(python())
            .arg(&script)
            .arg(&jobs)
            .output()
            .expect("failed to start the oracle interpreter");
        assert!(
            out.status.success(),
            "oracle script failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let bitexact = std::env::var("M3D_ORACLE_BITEXACT").is_ok_and(|v| v == "1");
        let mut failures = String::new();
        for (name, path, expect) in &self.expect {
            let got = read_npy(path).unwrap_or_else(|e| panic!("{name}: {e}"));
            match compare(&got, expect, bitexact) {
                Ok(summary) => eprintln!("{name}: {summary}"),
                Err(msg) => writeln!(failures, "{name}: {msg}").unwrap(),
            }
        }
        assert!(failures.is_empty(), "oracle mismatches:\n{failures}");
    }
}

fn compare(got: &NpyArray, expect: &Expect, bitexact: bool) -> Result<String, String> {
    let (shape, n) = match expect {
        Expect::Image(v) => (v.shape(), v.len()),
        Expect::Exact(v) => (v.shape(), v.len()),
    };
    if got.shape != shape.to_vec() {
        return Err(format!("shape: MONAI {:?}, ours {:?}", got.shape, shape));
    }
    match expect {
        Expect::Image(v) => {
            let py = got.to_f32();
            let mut max = 0f32;
            let mut differ = 0usize;
            for (&a, &b) in py.iter().zip(v.data()) {
                if a.to_bits() != b.to_bits() {
                    differ += 1;
                    let d = if a.is_nan() || b.is_nan() {
                        f32::INFINITY
                    } else {
                        (a - b).abs()
                    };
                    max = max.max(d);
                }
            }
            let summary = format!("max |diff| {max:e}, {differ} of {n} values not bit-identical");
            if max > IMAGE_TOL || (bitexact && differ > 0) {
                Err(summary)
            } else {
                Ok(summary)
            }
        }
        Expect::Exact(v) => {
            let py = got.data.to_f64().ok_or("non-numeric output")?;
            let differ = py.iter().zip(v.data()).filter(|(a, b)| a != b).count();
            if differ > 0 {
                Err(format!("{differ} of {n} values differ"))
            } else {
                Ok(format!("all {n} values equal"))
            }
        }
    }
}

fn s<T: ToString>(x: T) -> String {
    x.to_string()
}

fn out() -> String {
    "{out}".to_string()
}

fn random_f32(rng: &mut ChaCha8Rng, shape: [usize; 4]) -> Volume<f32> {
    let n = shape.iter().product();
    Volume::new(shape, (0..n).map(|_| rng.random::<f32>()).collect()).unwrap()
}

fn random_labels(rng: &mut ChaCha8Rng, shape: [usize; 4], classes: i32) -> Volume<i32> {
    let n = shape.iter().product();
    Volume::new(
        shape,
        (0..n).map(|_| rng.random_range(0..classes)).collect(),
    )
    .unwrap()
}

fn to_f64<T: Copy + Into<f64>>(v: &Volume<T>) -> Volume<f64> {
    v.map(|x| x.into())
}

/// A random image with a zero border of the given widths (per spatial axis, both sides).
fn with_zero_border(v: &mut Volume<f32>, border: [usize; 3]) {
    let [c, d, h, w] = v.shape();
    let data = v.data_mut();
    for ci in 0..c {
        for di in 0..d {
            for hi in 0..h {
                for wi in 0..w {
                    let inside = [(di, d), (hi, h), (wi, w)]
                        .iter()
                        .zip(border)
                        .all(|(&(i, n), b)| i >= b && i + b < n);
                    if !inside {
                        data[((ci * d + di) * h + hi) * w + wi] = 0.0;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

const RESIZE_CASES: &[([usize; 4], [usize; 3])] = &[
    ([1, 7, 37, 29], [4, 16, 16]),       // down-sampling, odd sizes
    ([1, 3, 5, 6], [8, 16, 16]),         // up-sampling, odd sizes
    ([2, 9, 13, 11], [5, 26, 3]),        // multi-channel, mixed directions, exact 2x along H
    ([1, 16, 128, 96], [8, 64, 48]),     // exact factor 2 (uniform windows)
    ([1, 12, 96, 90], [4, 32, 30]),      // exact factor 3
    ([1, 40, 300, 280], [32, 256, 256]), // realistic M3D-Cap series
];

#[test]
fn resize_matches_monai() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut o = Oracle::new();
    for &(shape, size) in RESIZE_CASES {
        let v = random_f32(&mut rng, shape);
        let p = o.input_f32(&v);
        let [d, h, w] = size;
        let args = |mode: &str| vec![s(p.display()), out(), s(mode), s(d), s(h), s(w)];
        o.job(
            &format!("area {shape:?}->{size:?}"),
            "resize",
            &args("area"),
            vec![Expect::Image(resize_area(&v, size))],
        );
        o.job(
            &format!("trilinear {shape:?}->{size:?}"),
            "resize",
            &args("trilinear"),
            vec![Expect::Image(resize_trilinear(&v, size))],
        );
        // Nearest on labels, with an extra channel to cover multi-channel masks.
        let labels = random_labels(&mut rng, [shape[0] + 1, shape[1], shape[2], shape[3]], 50);
        let lp = o.input_i32(&labels);
        o.job(
            &format!("nearest {shape:?}->{size:?}"),
            "resize",
            &[s(lp.display()), out(), s("nearest"), s(d), s(h), s(w)],
            vec![Expect::Exact(to_f64(&resize_nearest(&labels, size)))],
        );
    }
    o.run();
}

#[test]
fn crop_foreground_matches_monai() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut o = Oracle::new();
    // Two channels with foreground in different places: the box is their union.
    let mut v = random_f32(&mut rng, [2, 12, 30, 25]);
    for x in v.data_mut() {
        *x -= 0.3; // negative values are background too
    }
    with_zero_border(&mut v, [2, 5, 3]);
    let plane = 12 * 30 * 25;
    for x in &mut v.data_mut()[plane..] {
        *x = x.min(0.0);
    }
    v.data_mut()[plane + (11 * 30 + 29) * 25 + 24] = 0.5; // a lone voxel in channel 1's corner
    let mask = random_labels(&mut rng, [3, 12, 30, 25], 4);
    let b = foreground_bbox(&v).unwrap();
    let (pi, pm) = (o.input_f32(&v), o.input_i32(&mask));
    o.job(
        "crop image only",
        "crop_foreground",
        &[s(pi.display()), out()],
        vec![Expect::Image(crop(&v, &b))],
    );
    o.job(
        "crop image + mask",
        "crop_foreground",
        &[s(pi.display()), out(), s(pm.display()), out()],
        vec![
            Expect::Image(crop(&v, &b)),
            Expect::Exact(to_f64(&crop(&mask, &b))),
        ],
    );
    // Single-channel image whose foreground is an interior block.
    let mut w = random_f32(&mut rng, [1, 9, 17, 21]);
    with_zero_border(&mut w, [1, 4, 6]);
    let bw = foreground_bbox(&w).unwrap();
    assert_eq!(bw.start, [1, 4, 6]);
    let p = o.input_f32(&w);
    o.job(
        "crop interior block",
        "crop_foreground",
        &[s(p.display()), out()],
        vec![Expect::Image(crop(&w, &bw))],
    );
    o.run();
}

#[test]
fn intensity_transforms_match_monai() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let mut o = Oracle::new();
    // min-max as the scripts do it in numpy float32.
    let mut v = random_f32(&mut rng, [1, 6, 20, 30]);
    for x in v.data_mut() {
        *x = *x * 3.7 - 1.2;
    }
    let p = o.input_f32(&v);
    let mut mm = v.clone();
    min_max_normalise(&mut mm);
    o.job(
        "min_max",
        "min_max",
        &[s(p.display()), out()],
        vec![Expect::Image(mm)],
    );

    // Percentile scaling: torch.quantile path (<= 1e6 voxels) and numpy path (> 1e6), f32 and f64.
    let ct_like = |rng: &mut ChaCha8Rng, n: usize| -> Vec<f64> {
        (0..n)
            .map(|_| {
                if rng.random::<f32>() < 0.3 {
                    -1024.0
                } else {
                    rng.random_range(-1000..3000) as f64
                }
            })
            .collect()
    };
    let settings: &[(f64, f64, f32, f32, bool)] = &[
        (0.5, 99.5, 0.0, 1.0, true),
        (2.0, 98.0, -1.0, 2.0, false),
        (1.0, 97.3, 0.0, 1.0, true),
    ];
    for &shape in &[[1usize, 10, 50, 40], [1, 20, 256, 200]] {
        let n: usize = shape.iter().product();
        let f32_img = random_f32(&mut rng, shape).map(|x| x * 100.0 - 20.0);
        let f64_img = Volume::new(shape, ct_like(&mut rng, n)).unwrap();
        let p32 = o.input_f32(&f32_img);
        let p64 = o.input_raw(shape.to_vec(), NpyData::F64(f64_img.data().to_vec()));
        for &(lo, hi, bmin, bmax, clip) in settings {
            let args = |p: &Path| {
                vec![
                    s(p.display()),
                    out(),
                    s(lo),
                    s(hi),
                    s(bmin),
                    s(bmax),
                    s(if clip { 1 } else { 0 }),
                ]
            };
            let mut ours = f32_img.clone();
            scale_intensity_range_percentiles(&mut ours, lo, hi, bmin, bmax, clip);
            o.job(
                &format!("percentiles f32 n={n} {lo}/{hi}"),
                "percentiles",
                &args(&p32),
                vec![Expect::Image(ours)],
            );
            let ours64 = scale_intensity_range_percentiles_f64(
                &f64_img,
                lo,
                hi,
                f64::from(bmin),
                f64::from(bmax),
                clip,
            );
            o.job(
                &format!("percentiles f64 n={n} {lo}/{hi}"),
                "percentiles",
                &args(&p64),
                vec![Expect::Image(ours64)],
            );
        }
    }
    // Equal percentiles (mostly constant image): MONAI shifts by b_min - a_min and does not clip.
    let mut flat = Volume::filled([1, 4, 10, 10], 3.0f32);
    flat.data_mut()[..20].iter_mut().for_each(|x| *x = 9.0);
    let p = o.input_f32(&flat);
    let mut ours = flat.clone();
    scale_intensity_range_percentiles(&mut ours, 10.0, 60.0, 0.5, 1.0, true);
    assert!(ours.data().contains(&6.5), "unclipped shift expected");
    o.job(
        "percentiles equal",
        "percentiles",
        &[
            s(p.display()),
            out(),
            s(10.0),
            s(60.0),
            s(0.5),
            s(1.0),
            s(1),
        ],
        vec![Expect::Image(ours)],
    );
    o.run();
}

#[test]
fn augmentations_match_monai_for_every_geometric_combination() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let mut o = Oracle::new();
    let v = random_f32(&mut rng, [2, 5, 7, 9]);
    let labels = random_labels(&mut rng, [2, 5, 7, 9], 7);
    let (pv, pl) = (o.input_f32(&v), o.input_i32(&labels));
    let intensities = [
        (None, None),
        (Some(0.0731f32), None),
        (None, Some(-0.0423f32)),
        (Some(-0.0999f32), Some(0.0999f32)),
    ];
    let opt = |x: Option<f32>| x.map_or("none".to_string(), |f| format!("{:?}", f64::from(f)));
    let b = |x: bool| s(u8::from(x));
    for k in 0..4u8 {
        for bits in 0..8u8 {
            let flip = [bits & 1 != 0, bits & 2 != 0, bits & 4 != 0];
            let (scale, shift) = intensities[usize::from(bits) % intensities.len()];
            let p = AugmentParams {
                rot90_k: k,
                flip,
                scale,
                shift,
            };
            let geo = [s(k), b(flip[0]), b(flip[1]), b(flip[2])];
            let mut args = vec![s(pv.display()), out()];
            args.extend(geo.iter().cloned());
            args.extend([opt(scale), opt(shift)]);
            o.job(
                &format!("augment image {p:?}"),
                "augment",
                &args,
                vec![Expect::Image(augment_image(&p, &v))],
            );
            let mut args = vec![s(pl.display()), out()];
            args.extend(geo.iter().cloned());
            args.extend([s("none"), s("none")]);
            o.job(
                &format!("augment mask {p:?}"),
                "augment",
                &args,
                vec![Expect::Exact(to_f64(&augment_mask(&p, &labels)))],
            );
        }
    }
    // One model-sized volume through the full chain.
    let big = random_f32(&mut rng, [1, 32, 256, 256]);
    let p = AugmentParams {
        rot90_k: 1,
        flip: [true, false, true],
        scale: Some(0.05),
        shift: Some(-0.02),
    };
    let pb = o.input_f32(&big);
    o.job(
        "augment 1x32x256x256",
        "augment",
        &[
            s(pb.display()),
            out(),
            s(1),
            s(1),
            s(0),
            s(1),
            opt(p.scale),
            opt(p.shift),
        ],
        vec![Expect::Image(augment_image(&p, &big))],
    );
    o.run();
}

#[test]
fn reference_preparation_chains_match_monai() {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let mut o = Oracle::new();

    // M3D-Cap: 8-bit slices / 255 with a dark border, min-max, CropForeground, Resize area.
    let [d, h, w] = [40usize, 300, 280];
    let levels: Vec<u8> = (0..d * h * w)
        .map(|i| {
            let (di, hi, wi) = (i / (h * w), (i / w) % h, i % w);
            let inside = (3..d - 2).contains(&di)
                && (20..h - 11).contains(&hi)
                && (17..w - 30).contains(&wi);
            if inside {
                rng.random_range(3..=250)
            } else {
                3
            }
        })
        .collect();
    let levels = Volume::new([1, d, h, w], levels).unwrap();
    let cap = levels.map(|x| f32::from(x) / 255.0);
    let p = o.input_f32(&cap);
    let mut ours = cap.clone();
    min_max_normalise(&mut ours);
    let b = foreground_bbox(&ours).unwrap();
    let ours = resize_area(&crop(&ours, &b), [32, 256, 256]);
    o.job(
        "M3D-Cap chain",
        "cap_chain",
        &[s(p.display()), out()],
        vec![Expect::Image(ours)],
    );
    let fused = prepare_cap_u8(&levels, [32, 256, 256]).unwrap();
    o.job(
        "M3D-Cap chain fused from u8",
        "cap_chain",
        &[s(p.display()), out()],
        vec![Expect::Image(fused)],
    );

    // M3D-Seg: image 1xHxWxD and one-hot mask CxHxWxD, swapaxes to (C, D, W, H), min-max,
    // CropForegroundd on the image, Resized trilinear / nearest.
    let mut img = random_f32(&mut rng, [1, 40, 36, 22]).map(|x| x * 2.0 - 1.5);
    with_zero_border(&mut img, [4, 2, 3]);
    let mask = random_labels(&mut rng, [3, 40, 36, 22], 2);
    let (pi, pm) = (o.input_f32(&img), o.input_i32(&mask));
    let mut im = permute_spatial(&img, [2, 1, 0]);
    let mk = permute_spatial(&mask, [2, 1, 0]);
    min_max_normalise(&mut im);
    let b = foreground_bbox(&im).unwrap();
    let size = [16, 24, 24];
    o.job(
        "M3D-Seg chain",
        "seg_chain",
        &[
            s(pi.display()),
            s(pm.display()),
            out(),
            out(),
            s(size[0]),
            s(size[1]),
            s(size[2]),
        ],
        vec![
            Expect::Image(resize_trilinear(&crop(&im, &b), size)),
            Expect::Exact(to_f64(&resize_nearest(&crop(&mk, &b), size))),
        ],
    );

    // M3D-RefSeg: float64 CT (H, W, D) from get_fdata, transpose (2, 0, 1), percentiles in f64,
    // CropForegroundd, Resized trilinear / nearest.
    let [h, w, d] = [60usize, 50, 24];
    let ct: Vec<f64> = (0..h * w * d)
        .map(|_| {
            if rng.random::<f32>() < 0.4 {
                -1024.0
            } else {
                f64::from(rng.random_range(-900..2500))
            }
        })
        .collect();
    let seg: Vec<f64> = (0..h * w * d)
        .map(|_| f64::from(rng.random_range(0..4)))
        .collect();
    let pc = o.input_raw(vec![h, w, d], NpyData::F64(ct.clone()));
    let ps = o.input_raw(vec![h, w, d], NpyData::F64(seg.clone()));
    let ct = permute_spatial(&Volume::new([1, h, w, d], ct).unwrap(), [2, 0, 1]);
    let seg = permute_spatial(&Volume::new([1, h, w, d], seg).unwrap(), [2, 0, 1]);
    let scaled = scale_intensity_range_percentiles_f64(&ct, 0.5, 99.5, 0.0, 1.0, true);
    let b = foreground_bbox(&scaled).unwrap();
    let size = [32, 64, 48];
    o.job(
        "M3D-RefSeg chain",
        "refseg_chain",
        &[
            s(pc.display()),
            s(ps.display()),
            out(),
            out(),
            s(size[0]),
            s(size[1]),
            s(size[2]),
        ],
        vec![
            Expect::Image(resize_trilinear(&crop(&scaled, &b), size)),
            Expect::Exact(resize_nearest(&crop(&seg, &b), size)),
        ],
    );
    o.run();
}
