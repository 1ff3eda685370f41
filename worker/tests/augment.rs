//! Training-time augmentation (`m3d_worker::augment`) against MONAI: fixed choices through MONAI's
//! deterministic transforms (`Rotate90(k, spatial_axes=(1, 2))`, `Flip(spatial_axis=i)`,
//! `ScaleIntensity(factor)`, `ShiftIntensity(offset)`), MONAI's random transforms with the values they drew, the
//! determinism and dependence of the per-sample stream, its empirical rates, and masks following the image.

use m3d_worker::augment::AugmentParams;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

/// The oracle: reads `in.safetensors` and `cases.json` from the folder in argv[1], writes `out.safetensors`
/// (one output per case, plus the `rand*` outputs of MONAI's random transforms) and `drawn.json` (what those
/// random transforms drew; floats as IEEE-754 bit patterns so they cross exactly).
const ORACLE: &str = r#"
import json, struct, sys
import torch
from safetensors.torch import load_file, save_file
from monai.transforms import (Flip, RandFlip, RandRotate90, RandScaleIntensity, RandShiftIntensity, Rotate90,
                              ScaleIntensity, ShiftIntensity)

d = sys.argv[1]
inp = load_file(f"{d}/in.safetensors")
cases = json.load(open(f"{d}/cases.json"))

def plain(t):
    t = t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)
    return t.contiguous()

def geometry(x, k, flip):
    if k:
        x = Rotate90(k=k, spatial_axes=(1, 2))(x)
    for i, f in enumerate(flip):
        if f:
            x = Flip(spatial_axis=i)(x)
    return x

out = {}
for c in cases:
    x = inp[c["input"]].clone()
    if c["mask"]:
        x = x[None]  # MONAI wants channel-first; the mask has no channel
    x = geometry(x, c["k"], c["flip"])
    # A mask takes the geometry only: the intensity choices in its case must not reach it.
    if c["scale"] is not None and not c["mask"]:
        x = ScaleIntensity(minv=None, maxv=None, factor=c["scale"])(x)
    if c["shift"] is not None and not c["mask"]:
        x = ShiftIntensity(offset=c["shift"])(x)
    x = plain(x)
    out[c["name"]] = x[0].contiguous() if c["mask"] else x

bits = lambda v: struct.unpack("<Q", struct.pack("<d", float(v)))[0]
drawn = []
for s in range(12):
    x = inp["x2"].clone()
    rot = RandRotate90(prob=1.0, max_k=3, spatial_axes=(1, 2))
    rot.set_random_state(seed=s)
    x = rot(x)
    flips = []
    for i in range(3):
        fl = RandFlip(prob=0.5, spatial_axis=i)
        fl.set_random_state(seed=10 * s + i)
        x = fl(x)
        flips.append(bool(fl._do_transform))
    sc = RandScaleIntensity(factors=0.1, prob=1.0)
    sc.set_random_state(seed=1000 + s)
    x = sc(x)
    sh = RandShiftIntensity(offsets=0.1, prob=1.0)
    sh.set_random_state(seed=2000 + s)
    x = sh(x)
    name = f"rand{s}"
    out[name] = plain(x)
    drawn.append({"name": name, "k": int(rot._rand_k), "flip": flips, "scale": bits(sc.factor),
                  "shift": bits(sh._offset)})
json.dump(drawn, open(f"{d}/drawn.json", "w"))
save_file(out, f"{d}/out.safetensors")
"#;

fn p(k: u8, flip: [bool; 3], scale: Option<f64>, shift: Option<f64>) -> AugmentParams {
    AugmentParams {
        rot90_k: k,
        flip,
        scale,
        shift,
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Equal shape and values (a shape change counts as different).
fn same(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && max_abs_diff(a, b) == 0.0
}

struct Oracle {
    _dir: tempfile::TempDir,
    inputs: Vec<(String, Tensor)>,
    out: Vec<(String, Tensor)>,
    drawn: Vec<Value>,
}

impl Oracle {
    fn input(&self, name: &str) -> &Tensor {
        find(&self.inputs, name)
    }
    fn output(&self, name: &str) -> &Tensor {
        find(&self.out, name)
    }
}

fn find<'a>(v: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    v.iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("no tensor `{name}`"))
}

/// (name, input, is_mask, params) for every fixed case.
fn cases() -> Vec<(String, &'static str, bool, AugmentParams)> {
    let none = [false; 3];
    let mut c = Vec::new();
    for input in ["x1", "x2", "x3"] {
        for k in 0..=3u8 {
            c.push((
                format!("{input}.rot{k}"),
                input,
                false,
                p(k, none, None, None),
            ));
        }
        for axis in 0..3 {
            let mut flip = none;
            flip[axis] = true;
            c.push((
                format!("{input}.flip{axis}"),
                input,
                false,
                p(0, flip, None, None),
            ));
        }
        c.push((
            format!("{input}.combo"),
            input,
            false,
            p(1, [true, false, true], Some(-0.083_17), Some(0.042_9)),
        ));
        c.push((
            format!("{input}.combo3"),
            input,
            false,
            p(3, [false, true, true], Some(0.099_9), Some(-0.099_9)),
        ));
    }
    c.push((
        "x1.scale".into(),
        "x1",
        false,
        p(0, none, Some(0.073_4), None),
    ));
    c.push((
        "x1.shift".into(),
        "x1",
        false,
        p(0, none, None, Some(-0.056_7)),
    ));
    c.push((
        "x2.scale_shift".into(),
        "x2",
        false,
        p(0, none, Some(-0.031_3), Some(0.018_1)),
    ));
    // Masks (D x H x W): MONAI moves them with the same geometry, on a channel added for it.
    for (i, (k, flip)) in [
        (1, [false, true, false]),
        (3, [true, true, true]),
        (2, none),
    ]
    .into_iter()
    .enumerate()
    {
        c.push((
            format!("mask.{i}"),
            "mask",
            true,
            p(k, flip, Some(0.05), Some(0.05)),
        ));
    }
    c
}

fn run_oracle() -> Oracle {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(20_251_129);
    let opts = (Kind::Float, Device::Cpu);
    let inputs = vec![
        ("x1".to_string(), Tensor::randn([1, 4, 6, 6], opts)),
        ("x2".to_string(), Tensor::randn([2, 3, 5, 5], opts)),
        // H != W: an odd k swaps them (MONAI and torch.rot90 do the same), and the direction shows in the shape.
        ("x3".to_string(), Tensor::randn([1, 3, 4, 5], opts)),
        (
            "mask".to_string(),
            Tensor::arange(4 * 6 * 6, opts).reshape([4, 6, 6]),
        ),
    ];
    Tensor::write_safetensors(&inputs, dir.path().join("in.safetensors")).unwrap();
    let cases: Vec<Value> = cases()
        .iter()
        .map(|(name, input, mask, p)| {
            json!({"name": name, "input": input, "mask": mask, "k": p.rot90_k, "flip": p.flip,
                   "scale": p.scale, "shift": p.shift})
        })
        .collect();
    std::fs::write(
        dir.path().join("cases.json"),
        serde_json::to_string(&cases).unwrap(),
    )
    .unwrap();
    let script = dir.path().join("augment_oracle.py");
    std::fs::write(&script, ORACLE).unwrap();
    m3d_testkit::run_python(&script, &[dir.path().to_str().unwrap()]);
    let out = Tensor::read_safetensors(dir.path().join("out.safetensors")).unwrap();
    let drawn: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("drawn.json")).unwrap())
            .unwrap();
    Oracle {
        _dir: dir,
        inputs,
        out,
        drawn,
    }
}

#[test]
fn augment_matches_monai_deterministic_transforms() {
    let o = run_oracle();
    let mut worst_geom = 0f64;
    let mut worst_arith = 0f64;
    for (name, input, mask, params) in cases() {
        let x = o.input(input);
        let ours = if mask {
            params.apply_mask(x)
        } else {
            params.apply(x)
        };
        let theirs = o.output(&name);
        assert_eq!(ours.size(), theirs.size(), "{name}: shape");
        assert_eq!(ours.kind(), Kind::Float, "{name}: kind");
        let d = max_abs_diff(&ours, theirs);
        let arithmetic = !mask && (params.scale.is_some() || params.shift.is_some());
        if arithmetic {
            assert!(d <= 1e-6, "{name}: max abs diff {d:e}");
            worst_arith = worst_arith.max(d);
        } else {
            assert_eq!(d, 0.0, "{name}: geometry must be exact, max abs diff {d:e}");
            worst_geom = worst_geom.max(d);
        }
    }
    eprintln!("geometry max abs diff {worst_geom:e}, arithmetic max abs diff {worst_arith:e}");

    // The comparisons above could fail: each geometric choice changes the volume, and the two rotation
    // directions differ (a k = 1 / k = 3 mix-up would show).
    for input in ["x1", "x2", "x3"] {
        let rot0 = o.output(&format!("{input}.rot0"));
        assert!(same(rot0, o.input(input)));
        for k in 1..=3 {
            assert!(
                !same(o.output(&format!("{input}.rot{k}")), rot0),
                "{input} rot{k}"
            );
        }
        for axis in 0..3 {
            assert!(!same(o.output(&format!("{input}.flip{axis}")), rot0));
        }
        let (r1, r3) = (
            o.output(&format!("{input}.rot1")),
            o.output(&format!("{input}.rot3")),
        );
        assert!(!same(r1, r3), "{input}: rot k=1 and k=3 agree");
        assert!(!same(
            &p(3, [false; 3], None, None).apply(o.input(input)),
            r1
        ));
    }
    // Scaling then shifting is not shifting then scaling.
    let x = o.input("x2");
    let wrong_order = (x + 0.018_1) * (1.0 - 0.031_3);
    assert!(max_abs_diff(&wrong_order, o.output("x2.scale_shift")) > 1e-4);
}

#[test]
fn augment_matches_monai_random_transforms_given_their_draws() {
    let o = run_oracle();
    assert_eq!(o.drawn.len(), 12);
    let mut ks = [0usize; 4];
    let mut worst = 0f64;
    for d in &o.drawn {
        let name = d["name"].as_str().unwrap();
        let k = d["k"].as_u64().unwrap() as u8;
        assert!((1..=3).contains(&k), "{name}: MONAI drew k = {k}");
        ks[k as usize] += 1;
        let flip: Vec<bool> = d["flip"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_bool().unwrap())
            .collect();
        let f = f64::from_bits(d["scale"].as_u64().unwrap());
        let off = f64::from_bits(d["shift"].as_u64().unwrap());
        assert!((-0.1..0.1).contains(&f) && (-0.1..0.1).contains(&off));
        let params = p(k, [flip[0], flip[1], flip[2]], Some(f), Some(off));
        let diff = max_abs_diff(&params.apply(o.input("x2")), o.output(name));
        assert!(diff <= 1e-6, "{name} ({params:?}): max abs diff {diff:e}");
        worst = worst.max(diff);
    }
    eprintln!("random transforms: k counts {ks:?}, max abs diff {worst:e}");
    // Seeds 0..12 make MONAI draw every k (k = 3 at seed 9), so each rotation is checked here too.
    assert!(ks[1..].iter().all(|&n| n > 0), "k counts {ks:?}");
}

/// The choices for indices 0..n.
fn draws(seed: u64, epoch: u64, n: u64) -> Vec<AugmentParams> {
    (0..n)
        .map(|i| AugmentParams::draw(seed, epoch, i))
        .collect()
}

#[test]
fn augment_draw_is_deterministic_and_keyed_by_seed_epoch_index() {
    let base = draws(42, 3, 64);
    assert_eq!(base, draws(42, 3, 64));
    assert_ne!(base, draws(43, 3, 64), "seed ignored");
    assert_ne!(base, draws(42, 4, 64), "epoch ignored");
    let shifted: Vec<_> = (1..65).map(|i| AugmentParams::draw(42, 3, i)).collect();
    assert_ne!(base, shifted, "index ignored");
    // Swapping the roles of the key parts gives another stream.
    let swapped: Vec<_> = (0..64).map(|i| AugmentParams::draw(42, i, 3)).collect();
    let direct: Vec<_> = (0..64).map(|i| AugmentParams::draw(42, 3, i)).collect();
    assert_ne!(swapped, direct);
    // The continuous draws are (almost surely) all distinct between samples.
    let scales: Vec<u64> = base
        .iter()
        .filter_map(|p| p.scale)
        .map(f64::to_bits)
        .collect();
    let mut uniq = scales.clone();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq.len(), scales.len());
    assert_eq!(
        AugmentParams::identity(),
        p(0, [false; 3], None, None),
        "identity"
    );
}

#[test]
fn augment_empirical_rates_match_the_reference_probabilities() {
    const N: u64 = 20_000;
    for (label, all) in [
        ("indices", draws(7, 11, N)),
        (
            "epochs",
            (0..N).map(|e| AugmentParams::draw(7, e, 123)).collect(),
        ),
    ] {
        let n = all.len() as f64;
        let rate =
            |f: &dyn Fn(&AugmentParams) -> bool| all.iter().filter(|p| f(p)).count() as f64 / n;
        let rot = rate(&|p| p.rot90_k != 0);
        let flips: Vec<f64> = (0..3).map(|a| rate(&|p| p.flip[a])).collect();
        let scale = rate(&|p| p.scale.is_some());
        let shift = rate(&|p| p.shift.is_some());
        let rotated = all.iter().filter(|p| p.rot90_k != 0).count() as f64;
        let k: Vec<f64> = (1..=3u8)
            .map(|k| all.iter().filter(|p| p.rot90_k == k).count() as f64 / rotated)
            .collect();
        eprintln!(
            "{label}: rot {rot:.4} flips {flips:.4?} scale {scale:.4} shift {shift:.4} k {k:.4?}"
        );
        assert!(all.iter().all(|p| p.rot90_k <= 3));
        for (what, got, want) in [
            ("rot", rot, 0.5),
            ("flip D", flips[0], 0.1),
            ("flip H", flips[1], 0.1),
            ("flip W", flips[2], 0.1),
            ("scale", scale, 0.5),
            ("shift", shift, 0.5),
            ("k=1", k[0], 1.0 / 3.0),
            ("k=2", k[1], 1.0 / 3.0),
            ("k=3", k[2], 1.0 / 3.0),
        ] {
            assert!(
                (got - want).abs() < 0.02,
                "{label} {what}: {got:.4} vs {want}"
            );
        }
        // The amounts are U[-0.1, 0.1): inside the range, reaching near both ends, mean about 0.
        for (what, v) in [
            (
                "scale",
                all.iter().filter_map(|p| p.scale).collect::<Vec<_>>(),
            ),
            ("shift", all.iter().filter_map(|p| p.shift).collect()),
        ] {
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            assert!(lo >= -0.1 && hi < 0.1, "{label} {what}: [{lo}, {hi}]");
            assert!(lo < -0.099 && hi > 0.099, "{label} {what}: [{lo}, {hi}]");
            assert!(mean.abs() < 0.003, "{label} {what}: mean {mean}");
        }
    }
}

#[test]
fn augment_mask_follows_the_image_geometry() {
    tch::manual_seed(7);
    let opts = (Kind::Float, Device::Cpu);
    // A mask whose every voxel is distinct, so any misplacement shows.
    let mask = Tensor::arange(4 * 6 * 6, (Kind::Int64, Device::Cpu)).reshape([4, 6, 6]);
    let image = Tensor::randn([2, 4, 6, 6], opts);
    let mut seen_change = 0;
    for i in 0..200 {
        let params = AugmentParams::draw(1, 2, i);
        let m3 = params.apply_mask(&mask);
        let m4 = params.apply_mask(&mask.unsqueeze(0));
        assert_eq!(
            m3.kind(),
            Kind::Int64,
            "mask values are moved, not converted"
        );
        assert!(same(&m3, &m4.squeeze_dim(0)), "{params:?}: 3-d and 1x mask");
        // The mask, carried as an image channel, lands where the image's voxels land.
        let geometric = AugmentParams {
            scale: None,
            shift: None,
            ..params
        };
        let stacked = Tensor::cat(
            &[
                image.shallow_clone(),
                mask.to_kind(Kind::Float).unsqueeze(0),
            ],
            0,
        );
        let moved = geometric.apply(&stacked);
        assert!(same(
            &moved.narrow(0, 2, 1).squeeze_dim(0),
            &m3.to_kind(Kind::Float)
        ));
        assert!(same(&moved.narrow(0, 0, 2), &geometric.apply(&image)));
        // And the image's intensity change does not touch the geometry.
        let full = params.apply(&image);
        let expect = {
            let mut t = geometric.apply(&image);
            if let Some(f) = params.scale {
                t = &t * (1.0 + f);
            }
            if let Some(o) = params.shift {
                t = &t + o;
            }
            t
        };
        assert!(max_abs_diff(&full, &expect) == 0.0);
        if !same(&m3, &mask) {
            seen_change += 1;
        }
    }
    assert!(seen_change > 50, "too few geometric changes: {seen_change}");
    // Applying never writes into the caller's tensors (identity geometry shares storage).
    let before = image.copy();
    let out = p(0, [false; 3], Some(0.05), Some(0.05)).apply(&image);
    assert!(same(&image, &before), "apply changed its input");
    assert!(!same(&out, &before));
}
