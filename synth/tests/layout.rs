//! The written files have exactly the published names, keys and columns, and the quirks the brief asks
//! for (checked on the files, not on the plan that produced them).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use m3d_synth::{write_all, SynthConfig, SynthError, SynthSummary};
use serde_json::Value;

fn dataset() -> (&'static Path, &'static SynthSummary) {
    // One dataset for all tests of this file run in one process, in cargo's per-target scratch folder, named per
    // process: nextest runs each test in its own process, concurrently.
    static DATA: OnceLock<(PathBuf, SynthSummary)> = OnceLock::new();
    let (p, s) = DATA.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Folders of earlier runs whose process is gone are removed so they do not pile up.
        for e in std::fs::read_dir(root).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("m3d-synth-layout-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = root.join(format!("m3d-synth-layout-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        let summary = write_all(&dir, &SynthConfig::default()).unwrap();
        (dir, summary)
    });
    (p.as_path(), s)
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn csv_rows(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let mut r = csv::Reader::from_path(path).unwrap();
    let header = r.headers().unwrap().iter().map(String::from).collect();
    let rows = r
        .records()
        .map(|rec| rec.unwrap().iter().map(String::from).collect())
        .collect();
    (header, rows)
}

fn subdirs(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// image path -> split, from the Cap JSON.
fn cap_splits(root: &Path) -> BTreeMap<String, String> {
    let j = json(&root.join("M3D_Cap/M3D_Cap.json"));
    let mut out = BTreeMap::new();
    for split in ["train", "validation", "test"] {
        for e in j[split].as_array().unwrap() {
            let prev = out.insert(e["image"].as_str().unwrap().to_string(), split.to_string());
            assert!(prev.is_none(), "{e} listed twice");
        }
    }
    out
}

#[test]
fn cap_json_splits_partition_the_series_on_disk() {
    let (root, summary) = dataset();
    let j = json(&root.join("M3D_Cap/M3D_Cap.json"));
    assert_eq!(
        keys(&j).into_iter().collect::<BTreeSet<_>>(),
        ["hard_test", "test", "train", "validation"]
            .map(String::from)
            .into()
    );
    let splits = cap_splits(root);
    // Series folders on disk, named as the reference names the .npy (diacritics dropped by hand here).
    let mut on_disk = BTreeSet::new();
    let mut diacritic = 0;
    for coll in ["ct_case", "ct_quizze"] {
        for case in subdirs(&root.join("M3D_Cap").join(coll)) {
            assert_eq!(name(&case).len(), 6, "{}", case.display());
            assert!(case.join("text.txt").is_file());
            for series in subdirs(&case) {
                let n = name(&series);
                if !n.is_ascii() {
                    diacritic += 1;
                }
                let folded = n.replace('ö', "o");
                on_disk.insert(format!("{coll}/{}/{folded}.npy", name(&case)));
            }
        }
    }
    assert!(diacritic >= 1, "no series name with a diacritic");
    assert_eq!(on_disk, splits.keys().cloned().collect(), "JSON vs folders");
    assert_eq!(summary.cap_volumes, on_disk.len());
    for split in ["train", "validation", "test", "hard_test"] {
        assert!(!j[split].as_array().unwrap().is_empty(), "{split} is empty");
        for e in j[split].as_array().unwrap() {
            assert_eq!(keys(e), ["image", "text"]);
            let image = e["image"].as_str().unwrap();
            assert!(image.is_ascii() && image.ends_with(".npy"));
            let text = e["text"].as_str().unwrap();
            assert_eq!(Path::new(image).parent(), Path::new(text).parent());
            assert!(root.join("M3D_Cap").join(text).is_file(), "{text}");
        }
    }
    for e in j["hard_test"].as_array().unwrap() {
        assert_eq!(
            splits[e["image"].as_str().unwrap()],
            "test",
            "hard_test outside test"
        );
    }
}

#[test]
fn cap_slices_and_texts_exercise_every_quirk() {
    let (root, _) = dataset();
    let (mut jpeg, mut rgb, mut stray, mut png) = (0, 0, 0, 0);
    let mut branches = BTreeMap::new();
    for coll in ["ct_case", "ct_quizze"] {
        for case in subdirs(&root.join("M3D_Cap").join(coll)) {
            let raw = std::fs::read_to_string(case.join("text.txt")).unwrap();
            let branch = match raw.find("study_findings:") {
                None if !raw.contains("discussion:") => "plain",
                None => "no findings",
                Some(i)
                    if raw[i + 15..]
                        .chars()
                        .filter(|c| *c != ' ' && *c != '\n')
                        .count()
                        < 5 =>
                {
                    "discussion"
                }
                Some(_) => "findings",
            };
            *branches.entry(branch).or_insert(0) += 1;
            for series in subdirs(&case) {
                let mut numbers = Vec::new();
                let mut dims = BTreeMap::new();
                for f in std::fs::read_dir(&series).unwrap() {
                    let p = f.unwrap().path();
                    let n = name(&p);
                    let (stem, ext) = n.split_once('.').unwrap();
                    numbers.push(stem.parse::<usize>().unwrap());
                    match ext {
                        "png" => png += 1,
                        "jpeg" => jpeg += 1,
                        other => panic!("unexpected slice extension {other}"),
                    }
                    let img = image::open(&p).unwrap();
                    if img.color().channel_count() == 3 {
                        rgb += 1;
                    }
                    *dims.entry((img.width(), img.height())).or_insert(0) += 1;
                }
                numbers.sort();
                assert_eq!(
                    numbers,
                    (1..=numbers.len()).collect::<Vec<_>>(),
                    "{}",
                    series.display()
                );
                assert!(numbers.len() >= 10, "lexical and numeric order coincide");
                if dims.len() > 1 {
                    stray += 1;
                    assert_eq!(dims.values().filter(|&&c| c == 1).count(), 1);
                }
            }
        }
    }
    assert!(
        jpeg > 0 && png > 0 && rgb > 0 && stray > 0,
        "jpeg {jpeg} png {png} rgb {rgb} stray {stray}"
    );
    for b in ["findings", "discussion", "plain"] {
        assert!(
            branches.get(b).copied().unwrap_or(0) > 0,
            "text branch {b} missing: {branches:?}"
        );
    }
}

const VQA_COLS: [&str; 10] = [
    "Image Path",
    "Text",
    "Question Type",
    "Question",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer",
    "Answer Choice",
];

#[test]
fn vqa_csvs_have_published_columns_and_matching_splits() {
    let (root, summary) = dataset();
    let splits = cap_splits(root);
    for (file, split, note, yn) in [
        ("M3D_VQA_train.csv", "train", false, false),
        ("M3D_VQA_val.csv", "validation", false, false),
        ("M3D_VQA_test.csv", "test", true, false),
        ("M3D_VQA_test5k.csv", "test", false, false),
        ("M3D_VQA_yn_train.csv", "train", false, true),
    ] {
        let (header, rows) = csv_rows(&root.join("M3D_VQA").join(file));
        let mut want: Vec<&str> = VQA_COLS.to_vec();
        if note {
            want.push("Note");
        }
        assert_eq!(header, want, "{file}");
        assert!(!rows.is_empty(), "{file} empty");
        assert_eq!(summary.vqa_rows[file], rows.len());
        let mut types = BTreeSet::new();
        for r in &rows {
            assert_eq!(
                splits.get(&r[0]).map(String::as_str),
                Some(split),
                "{file}: {}",
                r[0]
            );
            assert!(!r[1].is_empty());
            let t: u8 = r[2].parse().unwrap();
            assert!((1..=5).contains(&t));
            types.insert(t);
            if yn {
                assert!(r[8] == "Yes" || r[8] == "No");
                assert!(r[4..8].iter().all(String::is_empty) && r[9].is_empty());
            } else {
                let i = ["A", "B", "C", "D"]
                    .iter()
                    .position(|l| *l == r[9])
                    .unwrap();
                assert_eq!(r[4 + i], r[8], "{file}: answer is not the chosen choice");
            }
        }
        if file == "M3D_VQA_train.csv" {
            assert_eq!(types, (1..=5).collect());
        }
    }
    let raw = std::fs::read_to_string(root.join("M3D_VQA/M3D_VQA_train.csv")).unwrap();
    assert!(raw.contains("\"\""), "no quoted quote in any field");
}

#[test]
fn seg_json_and_files_follow_the_published_layout() {
    let (root, summary) = dataset();
    let mut cases = 0;
    for ds in subdirs(&root.join("M3D_Seg")) {
        let code = name(&ds);
        let j = json(&ds.join(format!("{code}.json")));
        assert_eq!(
            keys(&j).into_iter().collect::<BTreeSet<_>>(),
            [
                "description",
                "labels",
                "modality",
                "name",
                "numTest",
                "numTrain",
                "tensorImageSize",
                "test",
                "train"
            ]
            .map(String::from)
            .into()
        );
        assert_eq!(j["tensorImageSize"], "4D");
        assert_eq!(j["modality"]["0"], "CT");
        assert_eq!(j["labels"]["0"], "background");
        let c = j["labels"].as_object().unwrap().len() - 1;
        let (ntr, nte) = (
            j["numTrain"].as_u64().unwrap() as usize,
            j["numTest"].as_u64().unwrap() as usize,
        );
        assert_eq!((ntr, nte), (4, 1), "8:2 split of 5 cases");
        for pair in j["train"]
            .as_array()
            .unwrap()
            .iter()
            .chain(j["test"].as_array().unwrap())
        {
            assert_eq!(keys(pair), ["image", "label"]);
            let image = pair["image"].as_str().unwrap();
            let label = pair["label"].as_str().unwrap();
            assert!(image.starts_with(&format!("{code}/")) && image.ends_with("/image.npy"));
            let file = Path::new(label)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            assert_eq!(file, format!("mask_({c}, 80, 80, 40).npz"));
            let case_dir = root
                .join("M3D_Seg")
                .join(Path::new(image).parent().unwrap());
            for f in [
                "image.npy",
                file.as_str(),
                "source/image.nii.gz",
                "source/label.nii.gz",
            ] {
                assert!(case_dir.join(f).is_file(), "{}/{f}", case_dir.display());
            }
            cases += 1;
        }
    }
    assert_eq!(cases, summary.seg_cases);
    assert_eq!(cases, 10);
}

#[test]
fn refseg_csvs_and_cases_follow_the_published_layout() {
    let (root, summary) = dataset();
    let base = root.join("M3D_RefSeg");
    let mut total = 0;
    let mut types = BTreeSet::new();
    for file in ["M3D_RefSeg_train.csv", "M3D_RefSeg_test.csv"] {
        let (header, rows) = csv_rows(&base.join(file));
        assert_eq!(
            header,
            [
                "Image",
                "Mask",
                "Mask_ID",
                "Question_Type",
                "Question",
                "Answer"
            ]
        );
        assert!(!rows.is_empty(), "{file}");
        for r in &rows {
            let case = r[0].split('/').next().unwrap();
            assert_eq!(r[0], format!("{case}/ct.nii.gz"));
            assert_eq!(r[1], format!("{case}/mask.nii.gz"));
            assert!(base.join(&r[0]).is_file() && base.join(&r[1]).is_file());
            let text = json(&base.join(case).join("text.json"));
            assert!(
                text.get(&r[2]).is_some(),
                "Mask_ID {} not in {case}/text.json",
                r[2]
            );
            types.insert(r[3].clone());
            assert!(r[5].contains("[SEG]"), "{}", r[5]);
        }
        total += rows.len();
    }
    assert_eq!(types, ["0", "1"].map(String::from).into());
    assert_eq!(total, summary.refseg_rows);
    assert_eq!(subdirs(&base).len(), summary.refseg_cases);
    assert!(root.join("synth_truth.json").is_file());
}

#[test]
fn invalid_config_is_rejected_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        slices: (5, 8),
        ..SynthConfig::default()
    };
    match write_all(dir.path(), &cfg) {
        Err(SynthError::Config { field, .. }) => assert_eq!(field, "slices"),
        other => panic!("expected a config error, got {other:?}"),
    }
    let cfg = SynthConfig {
        seg_datasets: 26,
        ..SynthConfig::default()
    };
    assert!(matches!(
        write_all(dir.path(), &cfg),
        Err(SynthError::Config {
            field: "seg_datasets",
            ..
        })
    ));
}
