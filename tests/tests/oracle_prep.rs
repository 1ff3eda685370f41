//! The converters against the reference preprocessing: the same raw synthetic inputs go through `m3d data-prep`
//! (images stored as f32, so nothing is quantised) and through the reference steps in Python (PIL, numpy, scipy,
//! nibabel, MONAI — tests/oracle/reference_prep.py). Images must agree within 1e-5, masks exactly, caption texts and
//! positioning boxes exactly.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{m3d_ok, oracle, s, synth_small};
use m3d_shards::dataset::ShardDataset;
use m3d_shards::encode::{decode_image_into, unpack_mask_u8_into};
use m3d_shards::schema::{Task, VolumeRecord};

const IMAGE_TOL: f32 = 1e-5;

fn volumes(url: &Path) -> Vec<VolumeRecord> {
    let ds = ShardDataset::open(s(url)).unwrap();
    let mut out = Vec::new();
    for shard in 0..ds.manifest().volume_shards.len() {
        for rec in ds.stream_volumes(shard).unwrap() {
            out.push(rec.unwrap());
        }
    }
    out
}

fn expected_npy(dir: &Path, dataset: &str, vid: &str, kind: &str) -> (Vec<usize>, Vec<f32>) {
    let path = dir
        .join(dataset)
        .join(format!("{}.{kind}.npy", vid.replace('/', "__")));
    let arr = m3d_formats::npy::read_npy(&path).unwrap_or_else(|e| panic!("{e}"));
    (arr.shape.clone(), arr.to_f32())
}

fn image_of(rec: &VolumeRecord) -> Vec<f32> {
    let n: usize = rec.shape.iter().map(|&d| d as usize).product();
    let mut buf = vec![0f32; n];
    decode_image_into(&rec.image, rec.dtype, &mut buf).unwrap();
    buf
}

/// `preprocessing.resize.mode` of a converted Cap dataset's manifest.
fn resize_mode(url: &Path) -> String {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(url.join("manifest.json")).unwrap()).unwrap();
    m["preprocessing"]["resize"]["mode"]
        .as_str()
        .unwrap_or_else(|| panic!("no preprocessing.resize.mode in {m}"))
        .to_string()
}

/// `got` (stored as u8, decoded) equals the reference's float32 `want` quantised the same way
/// (`round(v * 255)`), except where `want` lies within [`IMAGE_TOL`] of a rounding boundary: there a
/// difference in the last bits of the float (another CPU's kernels) may round either way, by one level.
fn assert_quantised_equal(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len());
    let mut ambiguous = 0usize;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let q = (w.clamp(0.0, 1.0) * 255.0).round_ties_even();
        let g = g * 255.0;
        if (g - q).abs() < 1e-3 {
            continue;
        }
        let frac = (w * 255.0).fract();
        let near_boundary = ((frac - 0.5).abs() / 255.0) <= IMAGE_TOL;
        assert!(
            near_boundary && (g - q).abs() < 1.0 + 1e-3,
            "{what}: voxel {i} stored {} but the reference {w} quantises to {}",
            g / 255.0,
            q / 255.0
        );
        ambiguous += 1;
    }
    assert!(
        ambiguous * 1000 < got.len(),
        "{what}: {ambiguous} voxels near a boundary"
    );
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn converters_match_the_reference_preprocessing() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    let exp = tmp.path().join("expected");
    let shards = tmp.path().join("shards");
    synth_small(&raw);
    oracle("reference_prep.py", &[s(&raw), s(&exp)]);
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(exp.join("expected.json")).unwrap()).unwrap();

    for (ds, sub) in [
        ("cap", "M3D_Cap"),
        ("seg", "M3D_Seg"),
        ("refseg", "M3D_RefSeg"),
    ] {
        let (src, out) = (raw.join(sub), shards.join(ds));
        let mut args = vec![
            "data-prep",
            ds,
            "--src",
            s(&src),
            "--out",
            s(&out),
            "--dtype",
            "f32",
            "--shard-volumes",
            "3",
        ];
        if ds == "refseg" {
            // The oracle runs the reference script, so compare with its (quirky) axis order.
            args.extend(["--axis-order", "reference"]);
        }
        m3d_ok(&args);
    }
    // RefSeg's default order is the reference's with the in-plane axes swapped (D, H, W) -> (D, W, H).
    let consistent_out = shards.join("refseg_consistent");
    m3d_ok(&[
        "data-prep",
        "refseg",
        "--src",
        s(&raw.join("M3D_RefSeg")),
        "--out",
        s(&consistent_out),
        "--dtype",
        "f32",
    ]);

    // M3D-Cap: images and caption texts.
    let cap = volumes(&shards.join("cap"));
    assert_eq!(cap.len(), expected["cap_text"].as_object().unwrap().len());
    for rec in &cap {
        let (shape, want) = expected_npy(&exp, "cap", &rec.volume_id, "image");
        assert_eq!(
            shape,
            rec.shape.iter().map(|&d| d as usize).collect::<Vec<_>>(),
            "{}",
            rec.volume_id
        );
        let diff = max_abs_diff(&image_of(rec), &want);
        assert!(
            diff <= IMAGE_TOL,
            "cap {}: max |diff| {diff}",
            rec.volume_id
        );
    }
    let cap_ds = ShardDataset::open(s(&shards.join("cap"))).unwrap();
    for sample in cap_ds.samples() {
        assert_eq!(sample.task, Task::Caption);
        let want = expected["cap_text"][&sample.volume_id].as_str().unwrap();
        assert_eq!(
            sample.report.as_deref(),
            Some(want),
            "caption of {}",
            sample.volume_id
        );
    }

    // Default settings (u8 storage, trilinear) as a new user converts: the reference's values after u8 quantisation.
    let default_out = shards.join("cap_default");
    m3d_ok(&[
        "data-prep",
        "cap",
        "--src",
        s(&raw.join("M3D_Cap")),
        "--out",
        s(&default_out),
    ]);
    assert_eq!(resize_mode(&default_out), "trilinear");
    for rec in &volumes(&default_out) {
        let (_, want) = expected_npy(&exp, "cap", &rec.volume_id, "image");
        assert_quantised_equal(&image_of(rec), &want, &rec.volume_id);
    }

    // The reference's prepared tree (M3D_Cap_npy: float32 .npy + extracted text) converts to the same volumes,
    // value for value, and the same captions.
    m3d_ok(&[
        "data-prep",
        "cap",
        "--src",
        s(&exp.join("M3D_Cap_npy")),
        "--out",
        s(&shards.join("cap_npy")),
        "--dtype",
        "f32",
    ]);
    let prepared = volumes(&shards.join("cap_npy"));
    assert_eq!(prepared.len(), cap.len());
    for rec in &prepared {
        let (_, want) = expected_npy(&exp, "cap", &rec.volume_id, "image");
        assert!(
            image_of(rec) == want,
            "prepared {} must be stored exactly",
            rec.volume_id
        );
    }
    let prepared_ds = ShardDataset::open(s(&shards.join("cap_npy"))).unwrap();
    for (a, b) in prepared_ds.samples().iter().zip(cap_ds.samples()) {
        assert_eq!(
            (&a.volume_id, &a.split, &a.report),
            (&b.volume_id, &b.split, &b.report)
        );
    }

    // M3D-Seg: images, every mask channel exactly, and the REC/REG boxes.
    let seg = volumes(&shards.join("seg"));
    assert_eq!(seg.len(), expected["seg_boxes"].as_object().unwrap().len());
    for rec in &seg {
        let (_, want) = expected_npy(&exp, "seg", &rec.volume_id, "image");
        let diff = max_abs_diff(&image_of(rec), &want);
        assert!(
            diff <= IMAGE_TOL,
            "seg {}: max |diff| {diff}",
            rec.volume_id
        );
        let (mshape, masks) = expected_npy(&exp, "seg", &rec.volume_id, "mask");
        assert_eq!(mshape[0], rec.masks.len(), "channels of {}", rec.volume_id);
        let per = masks.len() / mshape[0];
        for (c, m) in rec.masks.iter().enumerate() {
            let want: Vec<u8> = masks[c * per..(c + 1) * per]
                .iter()
                .map(|&v| v as u8)
                .collect();
            let mut got = vec![0u8; per];
            if m.voxels > 0 {
                unpack_mask_u8_into(&m.bits, &mut got).unwrap();
            }
            assert!(got == want, "seg {} mask {c} differs", rec.volume_id);
        }
    }
    let seg_ds = ShardDataset::open(s(&shards.join("seg"))).unwrap();
    let mut boxes_checked = 0;
    for sample in seg_ds.samples() {
        if matches!(sample.task, Task::Rec | Task::Reg) {
            let c = sample.mask_index.unwrap().to_string();
            let want: Vec<f32> = expected["seg_boxes"][&sample.volume_id][&c]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(
                sample.bbox.unwrap().to_vec(),
                want,
                "box of {} class {c}",
                sample.volume_id
            );
            boxes_checked += 1;
        }
    }
    assert!(boxes_checked > 0);

    // M3D-RefSeg: images and each region's mask against the reference id map.
    let refseg = volumes(&shards.join("refseg"));
    assert!(!refseg.is_empty());
    for rec in &refseg {
        let (_, want) = expected_npy(&exp, "refseg", &rec.volume_id, "image");
        let diff = max_abs_diff(&image_of(rec), &want);
        assert!(
            diff <= IMAGE_TOL,
            "refseg {}: max |diff| {diff}",
            rec.volume_id
        );
        let (_, ids) = expected_npy(&exp, "refseg", &rec.volume_id, "mask");
        let mut by_id: BTreeMap<u32, usize> = BTreeMap::new();
        for v in &ids {
            if *v > 0.0 {
                *by_id.entry(v.round() as u32).or_default() += 1;
            }
        }
        for m in &rec.masks {
            let want: Vec<u8> = ids
                .iter()
                .map(|&v| u8::from(v.round() as u32 == m.class_index))
                .collect();
            let mut got = vec![0u8; ids.len()];
            if m.voxels > 0 {
                unpack_mask_u8_into(&m.bits, &mut got).unwrap();
            }
            assert!(
                got == want,
                "refseg {} region {} differs",
                rec.volume_id,
                m.class_index
            );
            assert_eq!(
                m.voxels as usize,
                by_id.get(&m.class_index).copied().unwrap_or(0)
            );
        }
    }
    let consistent = volumes(&consistent_out);
    assert_eq!(consistent.len(), refseg.len());
    for (c, r) in consistent.iter().zip(&refseg) {
        assert_eq!(c.volume_id, r.volume_id);
        let [_, d, h, w] = r.shape.map(|v| v as usize);
        let (ci, ri) = (image_of(c), image_of(r));
        let transposed: Vec<f32> = (0..d * w * h)
            .map(|i| {
                let (z, rest) = (i / (w * h), i % (w * h));
                let (x, y) = (rest / h, rest % h);
                ri[(z * h + y) * w + x]
            })
            .collect();
        let diff = max_abs_diff(&ci, &transposed);
        assert!(
            diff <= IMAGE_TOL,
            "refseg consistent order {}: max |diff| {diff}",
            c.volume_id
        );
    }
}

/// `--resize-mode area` reproduces the first release of the reference Cap script (no mode: MONAI's "area"),
/// the manifest says which mode made the shards, and the two modes give different volumes (so the default
/// test above can tell them apart).
#[test]
fn cap_area_mode_matches_the_first_release_of_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let (raw, exp, shards) = (
        tmp.path().join("raw"),
        tmp.path().join("expected"),
        tmp.path().join("shards"),
    );
    synth_small(&raw);
    oracle(
        "reference_prep.py",
        &[s(&raw), s(&exp), "--cap-resize", "area"],
    );
    let src = raw.join("M3D_Cap");
    let (area, trilinear) = (shards.join("area"), shards.join("trilinear"));
    for (out, mode) in [(&area, "area"), (&trilinear, "trilinear")] {
        m3d_ok(&[
            "data-prep",
            "cap",
            "--src",
            s(&src),
            "--out",
            s(out),
            "--dtype",
            "f32",
            "--resize-mode",
            mode,
        ]);
        assert_eq!(resize_mode(out), mode);
    }
    let mut mode_matters = 0f32;
    for (a, t) in volumes(&area).iter().zip(&volumes(&trilinear)) {
        let (_, want) = expected_npy(&exp, "cap", &a.volume_id, "image");
        let diff = max_abs_diff(&image_of(a), &want);
        assert!(
            diff <= IMAGE_TOL,
            "cap {} (area): max |diff| {diff}",
            a.volume_id
        );
        mode_matters = mode_matters.max(max_abs_diff(&image_of(t), &want));
    }
    assert!(
        mode_matters > 0.01,
        "area and trilinear differ by only {mode_matters}"
    );
}
