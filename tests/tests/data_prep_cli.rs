//! `m3d data-prep` as a user runs it: the whole flow on synthetic data, counts that add up, inspection and
//! rendering, resume after an interruption, and every kind of bad input named in the error (or skipped and
//! reported under --skip-bad, never silently replaced).

mod common;

use std::path::{Path, PathBuf};

use common::{m3d, m3d_err, m3d_ok, s, synth_small};
use m3d_shards::dataset::ShardDataset;

fn find(root: &Path, pred: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if pred(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn convert(ds: &str, src: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["data-prep", ds, "--src", s(src), "--out", s(out)];
    args.extend_from_slice(extra);
    m3d(&args)
}

#[test]
fn full_flow_counts_add_up_and_inspect_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    let out = tmp.path().join("shards");
    synth_small(&raw);
    for (ds, sub) in [
        ("cap", "M3D_Cap"),
        ("seg", "M3D_Seg"),
        ("refseg", "M3D_RefSeg"),
    ] {
        m3d_ok(&[
            "data-prep",
            ds,
            "--src",
            s(&raw.join(sub)),
            "--out",
            s(&out.join(ds)),
            "--json",
        ]);
    }
    m3d_ok(&[
        "data-prep",
        "vqa",
        "--src",
        s(&raw.join("M3D_VQA")),
        "--out",
        s(&out.join("vqa")),
        "--cap",
        s(&out.join("cap")),
    ]);

    // Cap: one volume per distinct series in the split file, one caption per (split, entry).
    let split: serde_json::Value =
        serde_json::from_slice(&std::fs::read(raw.join("M3D_Cap/M3D_Cap.json")).unwrap()).unwrap();
    let entries: usize = split
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_array().unwrap().len())
        .sum();
    let mut images: Vec<&str> = split
        .as_object()
        .unwrap()
        .values()
        .flat_map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|e| e["image"].as_str().unwrap())
        })
        .collect();
    images.sort();
    images.dedup();
    let cap = ShardDataset::open(s(&out.join("cap"))).unwrap();
    assert_eq!(cap.manifest().totals.volumes as usize, images.len());
    assert_eq!(cap.samples().len(), entries);
    for (task, by_split) in &cap.manifest().counts {
        assert_eq!(task, "caption");
        for (sp, n) in by_split {
            assert_eq!(
                *n as usize,
                split[sp].as_array().unwrap().len(),
                "split {sp}"
            );
        }
    }

    // VQA: each multiple-choice row gives a closed and an open sample, each yes/no row one sample.
    let vqa = ShardDataset::open(s(&out.join("vqa"))).unwrap();
    let mut rows = 0usize;
    let mut yn_rows = 0usize;
    for p in find(&raw.join("M3D_VQA"), &|p| {
        p.extension().is_some_and(|e| e == "csv")
    }) {
        let n = csv::Reader::from_path(&p).unwrap().records().count();
        if p.file_name().unwrap().to_string_lossy().contains("_yn_") {
            yn_rows += n;
        } else {
            rows += n;
        }
    }
    assert!(rows > 0 && yn_rows > 0);
    assert_eq!(vqa.samples().len(), 2 * rows + yn_rows);
    let total: u64 = vqa
        .manifest()
        .counts
        .values()
        .flat_map(|m| m.values())
        .sum();
    assert_eq!(total, vqa.manifest().totals.samples);
    assert_eq!(
        vqa.manifest().totals.volumes,
        0,
        "VQA references Cap volumes, never copies them"
    );
    // Converted with `--cap`, its sample lookup locates every row's volume in Cap's index.
    let cap_index = ShardDataset::open_for_volumes(s(&out.join("cap")))
        .unwrap()
        .manifest()
        .volume_index
        .clone()
        .unwrap();
    let lookup = vqa.manifest().sample_lookup.clone().unwrap();
    assert_eq!(lookup.volumes_index_sha256, Some(cap_index.sha256));
    let reader = m3d_shards::LookupReader::new(vqa.store().clone(), lookup);
    let rows: Vec<u64> = (0..reader.len()).collect();
    for row in reader.get_many(&rows).unwrap() {
        let v = row.volume.unwrap();
        assert!(v.foreign && v.location.volume_id == row.record.volume_id);
    }
    let closed = vqa
        .samples()
        .iter()
        .find(|s| s.task.to_string() == "vqa_closed")
        .unwrap();
    let q = closed.question.as_deref().unwrap();
    assert!(
        q.contains(" Choices: A. ") && q.contains(" B. ") && q.contains(" D. "),
        "{q}"
    );
    let choice = closed.answer_choice.as_deref().unwrap();
    assert!(closed
        .answer
        .as_deref()
        .unwrap()
        .starts_with(&format!("{choice}. ")));

    // Seg and RefSeg: per non-empty class a seg, rec and reg sample; every RefSeg row a sample.
    let seg = ShardDataset::open(s(&out.join("seg"))).unwrap();
    let counts = &seg.manifest().counts;
    let n = |t: &str| counts.get(t).map(|m| m.values().sum::<u64>()).unwrap_or(0);
    assert!(n("seg") > 0);
    assert_eq!(n("seg"), n("rec"));
    assert_eq!(n("seg"), n("reg"));
    let refseg = ShardDataset::open(s(&out.join("refseg"))).unwrap();
    let ref_rows: usize = find(&raw.join("M3D_RefSeg"), &|p| {
        p.extension().is_some_and(|e| e == "csv")
    })
    .iter()
    .map(|p| csv::Reader::from_path(p).unwrap().records().count())
    .sum();
    assert_eq!(refseg.samples().len(), ref_rows);
    for ds in [&cap, &seg, &refseg] {
        let total: u64 = ds.manifest().counts.values().flat_map(|m| m.values()).sum();
        assert_eq!(total, ds.manifest().totals.samples);
    }

    // Inspect: verification passes, the PNG is a real image with three panels.
    let text = m3d_ok(&[
        "data-prep",
        "inspect",
        s(&out.join("seg")),
        "--verify",
        "--png",
        s(&tmp.path().join("seg.png")),
    ]);
    assert!(text.contains("verified"), "{text}");
    let png = image::open(tmp.path().join("seg.png")).unwrap();
    assert_eq!((png.width(), png.height()), (768, 256));
    // Instruction-response pairs are derived at load time: every shown sample has a question and an answer, REC
    // answers carry the box text, segmentation answers the [SEG] token.
    let shown = m3d_ok(&[
        "data-prep",
        "inspect",
        s(&out.join("seg")),
        "--show-samples",
        "12",
        "--seed",
        "3",
    ]);
    assert_eq!(shown.matches("\n  Q: ").count(), 12, "{shown}");
    assert_eq!(shown.matches("\n  A: ").count(), 12, "{shown}");
    assert!(
        shown.contains("<bx_start>[") && shown.contains("[SEG]"),
        "{shown}"
    );
    let json = m3d_ok(&["data-prep", "inspect", s(&out.join("cap")), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["volumes"].as_u64().unwrap() as usize, images.len());
}

#[test]
fn rerun_resumes_and_redoes_only_incomplete_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    let out = tmp.path().join("cap");
    synth_small(&raw);
    let src = raw.join("M3D_Cap");
    let first = m3d_ok(&[
        "data-prep",
        "cap",
        "--src",
        s(&src),
        "--out",
        s(&out),
        "--shard-volumes",
        "2",
        "--json",
    ]);
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    let shards = first["shards_written"].as_u64().unwrap();
    assert!(shards >= 3, "want several shards, got {shards}");
    let manifest_before = std::fs::read(out.join("manifest.json")).unwrap();

    // Simulate a run killed while writing shard 1: its completion record is gone and the shard is half there.
    std::fs::remove_file(out.join("_progress/part-00001.json")).unwrap();
    std::fs::write(out.join("volumes/part-00001.parquet"), b"PAR1 half written").unwrap();
    std::fs::remove_file(out.join("manifest.json")).unwrap();
    assert!(
        ShardDataset::open(s(&out)).is_err(),
        "no manifest: the dataset must not open"
    );

    let second = m3d_ok(&[
        "data-prep",
        "cap",
        "--src",
        s(&src),
        "--out",
        s(&out),
        "--shard-volumes",
        "2",
        "--json",
    ]);
    let second: serde_json::Value = serde_json::from_str(&second).unwrap();
    assert_eq!(second["shards_written"].as_u64().unwrap(), 1);
    assert_eq!(second["shards_reused"].as_u64().unwrap(), shards - 1);
    let before: serde_json::Value = serde_json::from_slice(&manifest_before).unwrap();
    let after: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        before["volume_shards"], after["volume_shards"],
        "same bytes, same checksums"
    );
    m3d_ok(&["data-prep", "inspect", s(&out), "--verify"]);
}

#[test]
fn killed_conversion_leaves_no_manifest_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    let out = tmp.path().join("cap");
    synth_small(&raw);
    let mut child = std::process::Command::new(common::m3d_bin())
        .args([
            "data-prep",
            "cap",
            "--src",
            s(&raw.join("M3D_Cap")),
            "--out",
            s(&out),
            "--shard-volumes",
            "1",
            "--threads",
            "1",
        ])
        .spawn()
        .unwrap();
    // Kill as soon as the first shard is committed (or give up waiting after 60 s and kill anyway).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !out.join("_progress/part-00000.json").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    if !status.success() {
        assert!(
            !out.join("manifest.json").exists(),
            "a killed run must not publish a manifest"
        );
    }
    m3d_ok(&[
        "data-prep",
        "cap",
        "--src",
        s(&raw.join("M3D_Cap")),
        "--out",
        s(&out),
        "--shard-volumes",
        "1",
    ]);
    m3d_ok(&["data-prep", "inspect", s(&out), "--verify"]);
}

/// Each bad input: the run fails naming the file (and row); with --skip-bad it completes, reports the item in
/// skipped.json, and the volume is absent rather than replaced.
struct Case {
    name: &'static str,
    dataset: &'static str,
    sub: &'static str,
    /// Breaks the raw tree; returns the text the error must contain.
    breaks: fn(&Path) -> String,
    skippable: bool,
}

fn first(root: &Path, pred: &dyn Fn(&Path) -> bool) -> PathBuf {
    find(root, pred)
        .into_iter()
        .next()
        .expect("a matching file in the synthetic data")
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "corrupt PNG",
            dataset: "cap",
            sub: "M3D_Cap",
            breaks: |r| {
                let p = first(r, &|p| p.extension().is_some_and(|e| e == "png"));
                std::fs::write(&p, b"\x89PNG\r\n\x1a\nnot really").unwrap();
                p.file_name().unwrap().to_string_lossy().into_owned()
            },
            skippable: true,
        },
        Case {
            name: "truncated JPEG",
            dataset: "cap",
            sub: "M3D_Cap",
            breaks: |r| {
                let p = first(r, &|p| p.extension().is_some_and(|e| e == "jpeg"));
                let bytes = std::fs::read(&p).unwrap();
                std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
                p.file_name().unwrap().to_string_lossy().into_owned()
            },
            skippable: true,
        },
        Case {
            name: "empty series",
            dataset: "cap",
            sub: "M3D_Cap",
            breaks: |r| {
                let p = first(r, &|p| p.extension().is_some_and(|e| e == "png"));
                let dir = p.parent().unwrap().to_path_buf();
                for f in std::fs::read_dir(&dir).unwrap() {
                    std::fs::remove_file(f.unwrap().path()).unwrap();
                }
                dir.file_name().unwrap().to_string_lossy().into_owned()
            },
            skippable: true,
        },
        Case {
            name: "split file path escaping the root",
            dataset: "cap",
            sub: "M3D_Cap",
            breaks: |r| {
                let p = r.join("M3D_Cap.json");
                let text = std::fs::read_to_string(&p).unwrap();
                let i = text.find("ct_").unwrap();
                std::fs::write(&p, format!("{}../../etc/{}", &text[..i], &text[i..])).unwrap();
                "..".to_string()
            },
            skippable: false,
        },
        Case {
            name: "truncated .npy",
            dataset: "seg",
            sub: "M3D_Seg",
            breaks: |r| {
                let p = first(r, &|p| p.file_name().is_some_and(|n| n == "image.npy"));
                let bytes = std::fs::read(&p).unwrap();
                std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
                p.parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            },
            skippable: true,
        },
        Case {
            name: ".npz whose data disagree with the shape in its name",
            dataset: "seg",
            sub: "M3D_Seg",
            breaks: |r| {
                let p = first(r, &|p| p.extension().is_some_and(|e| e == "npz"));
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                // Claim one more channel than the CSR matrix holds.
                let open = name.find('(').unwrap() + 1;
                let comma = name.find(',').unwrap();
                let c: usize = name[open..comma].parse().unwrap();
                let wrong = format!("{}{}{}", &name[..open], c + 1, &name[comma..]);
                std::fs::rename(&p, p.with_file_name(&wrong)).unwrap();
                // Point the dataset JSON at the renamed file.
                let code_dir = p.parent().unwrap().parent().unwrap();
                let code = code_dir.file_name().unwrap().to_string_lossy().into_owned();
                let json = code_dir.join(format!("{code}.json"));
                let case = p
                    .parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                let text = std::fs::read_to_string(&json)
                    .unwrap()
                    .replace(&format!("{case}/{name}"), &format!("{case}/{wrong}"));
                std::fs::write(&json, text).unwrap();
                wrong
            },
            skippable: true,
        },
        Case {
            name: "broken NIfTI header",
            dataset: "refseg",
            sub: "M3D_RefSeg",
            breaks: |r| {
                let p = first(r, &|p| p.file_name().is_some_and(|n| n == "ct.nii.gz"));
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                std::io::Write::write_all(&mut enc, &[7u8; 200]).unwrap();
                std::fs::write(&p, enc.finish().unwrap()).unwrap();
                "ct.nii.gz".to_string()
            },
            skippable: true,
        },
        Case {
            name: "CSV with a missing column",
            dataset: "vqa",
            sub: "M3D_VQA",
            breaks: |r| {
                let p = r.join("M3D_VQA_train.csv");
                let text = std::fs::read_to_string(&p).unwrap().replacen(
                    "Answer Choice",
                    "AnswerChoice",
                    1,
                );
                std::fs::write(&p, text).unwrap();
                "Answer Choice".to_string()
            },
            skippable: false,
        },
        Case {
            name: "CSV row with an unparsable Question Type",
            dataset: "vqa",
            sub: "M3D_VQA",
            breaks: |r| {
                set_csv_cell(&r.join("M3D_VQA_val.csv"), 1, "Question Type", "seven");
                "M3D_VQA_val.csv, row 2".to_string()
            },
            skippable: true,
        },
        Case {
            name: "CSV image path that is absolute",
            dataset: "vqa",
            sub: "M3D_VQA",
            breaks: |r| {
                set_csv_cell(
                    &r.join("M3D_VQA_test.csv"),
                    0,
                    "Image Path",
                    "/etc/passwd.npy",
                );
                "M3D_VQA_test.csv, row 1".to_string()
            },
            skippable: true,
        },
    ]
}

#[test]
fn bad_inputs_are_named_and_skippable_without_substitution() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    synth_small(&pristine);
    for (i, case) in cases().into_iter().enumerate() {
        let raw = tmp.path().join(format!("case{i}"));
        copy_dir(&pristine, &raw);
        let src = raw.join(case.sub);
        let clean_out = tmp.path().join(format!("clean{i}"));
        let clean = convert(case.dataset, &src, &clean_out, &["--json"]);
        assert!(
            clean.status.success(),
            "{}: pristine data must convert",
            case.name
        );
        let clean: serde_json::Value = serde_json::from_slice(&clean.stdout).unwrap();

        let needle = (case.breaks)(&src);
        let out = tmp.path().join(format!("out{i}"));
        let stderr = m3d_err(&[
            "data-prep",
            case.dataset,
            "--src",
            s(&src),
            "--out",
            s(&out),
        ]);
        assert!(
            stderr.contains(&needle),
            "{}: error should name {needle:?}:\n{stderr}",
            case.name
        );
        assert!(
            !out.join("manifest.json").exists(),
            "{}: no manifest after a failed run",
            case.name
        );

        let skipped = convert(case.dataset, &src, &out, &["--skip-bad", "--json"]);
        if !case.skippable {
            assert!(
                !skipped.status.success(),
                "{}: not skippable, must still fail",
                case.name
            );
            continue;
        }
        assert!(
            skipped.status.success(),
            "{}: --skip-bad must complete: {}",
            case.name,
            String::from_utf8_lossy(&skipped.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&skipped.stdout).unwrap();
        let list = report["skipped"].as_array().unwrap();
        assert_eq!(
            list.len(),
            1,
            "{}: exactly the broken item is skipped: {list:?}",
            case.name
        );
        let on_disk: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("skipped.json")).unwrap()).unwrap();
        assert_eq!(on_disk.as_array().unwrap().len(), 1);
        // Nothing substituted: one volume (or one row's samples) fewer than the clean run, never the same count.
        if case.dataset == "vqa" {
            assert!(
                report["samples"].as_u64() < clean["samples"].as_u64(),
                "{}",
                case.name
            );
        } else {
            assert_eq!(
                report["volumes"].as_u64().unwrap() + 1,
                clean["volumes"].as_u64().unwrap(),
                "{}",
                case.name
            );
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["skipped"].as_u64(), Some(1));
    }
}

/// Rewrites one cell (0-based data row, column by name) of a CSV file, keeping everything else.
fn set_csv_cell(path: &Path, row: usize, column: &str, value: &str) {
    let mut rdr = csv::Reader::from_path(path).unwrap();
    let headers = rdr.headers().unwrap().clone();
    let mut rows: Vec<Vec<String>> = rdr
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect();
    let col = headers.iter().position(|h| h == column).unwrap();
    rows[row][col] = value.to_string();
    let mut w = csv::Writer::from_path(path).unwrap();
    w.write_record(&headers).unwrap();
    for r in &rows {
        w.write_record(r).unwrap();
    }
    w.flush().unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}

/// Caption text of every Cap sample, by sample id.
fn cap_reports(url: &Path) -> std::collections::BTreeMap<String, (String, String)> {
    let ds = ShardDataset::open(s(url)).unwrap();
    ds.samples()
        .iter()
        .map(|x| {
            (
                x.sample_id.clone(),
                (x.volume_id.clone(), x.report.clone().unwrap_or_default()),
            )
        })
        .collect()
}

/// HEAD's Cap script names a series `unidecode(folder).npy` (Python `Unidecode`): a folder whose name NFD
/// cannot reduce to ASCII ("Straße_Øre") is found under the split file's `Strasse_Ore` entry. Reports are read
/// with universal newlines, so CRLF and CR `text.txt` give the captions of LF ones.
#[test]
fn cap_series_names_follow_unidecode_and_reports_read_with_universal_newlines() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    synth_small(&pristine);
    let clean = cap_reports(&{
        let out = tmp.path().join("clean");
        let o = convert("cap", &pristine.join("M3D_Cap"), &out, &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    });
    for (i, eol) in ["\r\n", "\r"].into_iter().enumerate() {
        let raw = tmp.path().join(format!("raw{i}"));
        copy_dir(&pristine, &raw);
        let cap = raw.join("M3D_Cap");
        // The synthetic diacritic series ("..._Pöschl_...") renamed to one that only unidecode makes ASCII.
        let mut dirs = vec![cap.clone()];
        let mut renamed = None;
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    if name.contains("Pöschl") {
                        let to = p.with_file_name(name.replace("Pöschl", "Straße_Øre"));
                        std::fs::rename(&p, &to).unwrap();
                        renamed = Some(name);
                    } else {
                        dirs.push(p);
                    }
                }
            }
        }
        let renamed = renamed.expect("the synthetic Cap data has a Pöschl series");
        let split = cap.join("M3D_Cap.json");
        let text = std::fs::read_to_string(&split).unwrap();
        assert!(text.contains("Poschl"), "{renamed}");
        std::fs::write(&split, text.replace("Poschl", "Strasse_Ore")).unwrap();
        for p in find(&cap, &|p| p.file_name().is_some_and(|n| n == "text.txt")) {
            let t = std::fs::read_to_string(&p).unwrap();
            assert!(t.contains('\n') && !t.contains('\r'));
            std::fs::write(&p, t.replace('\n', eol)).unwrap();
        }

        let out = tmp.path().join(format!("out{i}"));
        let o = convert("cap", &cap, &out, &[]);
        assert!(
            o.status.success(),
            "eol {eol:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let got = cap_reports(&out);
        assert_eq!(got.len(), clean.len());
        let mut renamed_seen = 0;
        for (id, (vid, report)) in &got {
            let (clean_vid, clean_report) = &clean[id];
            assert_eq!(report, clean_report, "eol {eol:?}: caption of {id}");
            assert_eq!(*vid, clean_vid.replace("Poschl", "Strasse_Ore"));
            renamed_seen += usize::from(vid.contains("Strasse_Ore"));
        }
        assert!(renamed_seen > 0);
    }
}

/// HEAD's training reads the RefSeg train split from `M3D_RefSeg.csv`: accepted; both it and
/// `M3D_RefSeg_train.csv` are refused, naming both; a missing test table is converted without that split but
/// reported on stderr and in the manifest; no table at all is an error naming what was looked for.
#[test]
fn refseg_tables_are_found_by_either_train_name_and_a_missing_one_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    synth_small(&pristine);
    let table_rows = |p: &Path| csv::Reader::from_path(p).unwrap().records().count() as u64;
    let src0 = pristine.join("M3D_RefSeg");
    let train_rows = table_rows(&src0.join("M3D_RefSeg_train.csv"));
    let test_rows = table_rows(&src0.join("M3D_RefSeg_test.csv"));
    assert!(train_rows > 0 && test_rows > 0);

    // M3D_RefSeg.csv as the train table.
    let raw = tmp.path().join("renamed");
    copy_dir(&pristine, &raw);
    let src = raw.join("M3D_RefSeg");
    std::fs::rename(src.join("M3D_RefSeg_train.csv"), src.join("M3D_RefSeg.csv")).unwrap();
    let out = tmp.path().join("out_renamed");
    let o = convert("refseg", &src, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ds = ShardDataset::open(s(&out)).unwrap();
    let counts = &ds.manifest().counts["refseg"];
    assert_eq!(counts.get("train").copied(), Some(train_rows));
    assert_eq!(counts.get("test").copied(), Some(test_rows));
    let tables = ds.manifest().source["tables"].as_array().unwrap().clone();
    assert!(
        tables
            .iter()
            .any(|t| t["file"] == "M3D_RefSeg.csv" && t["split"] == "train"),
        "{tables:?}"
    );
    assert_eq!(
        ds.manifest().source["missing_tables"],
        serde_json::json!([])
    );

    // Both train names: refused, naming both.
    std::fs::copy(src.join("M3D_RefSeg.csv"), src.join("M3D_RefSeg_train.csv")).unwrap();
    let err = m3d_err(&[
        "data-prep",
        "refseg",
        "--src",
        s(&src),
        "--out",
        s(&tmp.path().join("out_both")),
    ]);
    assert!(
        err.contains("M3D_RefSeg_train.csv") && err.contains("M3D_RefSeg.csv"),
        "{err}"
    );

    // No test table: converted, and said so.
    std::fs::remove_file(src.join("M3D_RefSeg.csv")).unwrap();
    std::fs::remove_file(src.join("M3D_RefSeg_test.csv")).unwrap();
    let out = tmp.path().join("out_no_test");
    let o = convert("refseg", &src, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("M3D_RefSeg_test.csv") && stderr.contains("test"),
        "a missing test table must be reported: {stderr}"
    );
    let ds = ShardDataset::open(s(&out)).unwrap();
    assert_eq!(
        ds.manifest().source["missing_tables"],
        serde_json::json!([{"split": "test", "looked_for": ["M3D_RefSeg_test.csv"]}])
    );
    assert_eq!(ds.manifest().counts["refseg"].get("test"), None);
    assert_eq!(ds.manifest().totals.samples, train_rows);

    // No table at all: an error naming every name looked for.
    std::fs::remove_file(src.join("M3D_RefSeg_train.csv")).unwrap();
    let err = m3d_err(&[
        "data-prep",
        "refseg",
        "--src",
        s(&src),
        "--out",
        s(&tmp.path().join("out_none")),
    ]);
    for name in [
        "M3D_RefSeg_train.csv",
        "M3D_RefSeg.csv",
        "M3D_RefSeg_test.csv",
    ] {
        assert!(err.contains(name), "{name} not named: {err}");
    }
}

/// Errors show each level of their cause chain once (a corrupted shard found by a worker of `m3d train`, whose
/// error the supervisor quotes: it sizes the plan from the manifest and never reads the sample table itself), and
/// a dataset path that does not exist is named as missing — and not created by looking for it.
#[test]
fn errors_show_each_cause_once_and_name_a_missing_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    synth_small(&raw);
    let cap = tmp.path().join("cap");
    let out = convert("cap", &raw.join("M3D_Cap"), &cap, &[]);
    assert!(out.status.success());
    // Training reads its samples through the sample lookup: a byte of its first block flipped.
    let lookup = cap.join("index/samples.lookup");
    let mut bytes = std::fs::read(&lookup).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&lookup, bytes).unwrap();
    let recipe = m3d_testkit::workspace_root().join("recipes/clip-tiny.yaml");
    let err = m3d_err(&[
        "train",
        s(&recipe),
        "--set",
        &format!("data.tasks.0.shards=[{}]", cap.display()),
        "--set",
        "train.global_batch=2",
        "--set",
        "workers.max=2",
        "--set",
        &format!("output.run={}", tmp.path().join("run").display()),
    ]);
    assert!(err.contains("index/samples.lookup (block 0)"), "{err}");
    assert_eq!(err.matches("checksum mismatch").count(), 1, "{err}");
    assert_eq!(err.matches("the shard is corrupted").count(), 1, "{err}");

    let typo = tmp.path().join("cap-typo");
    let err = m3d_err(&["data-prep", "inspect", s(&typo)]);
    assert!(
        err.contains(&format!("{} does not exist", typo.display())),
        "{err}"
    );
    assert!(!typo.exists(), "looking for a dataset created its folder");
}

/// `m3d data-prep` runs as `m3d-data-prep`, the binary beside `m3d` that links no libtorch (none of its start-up
/// or resident memory in a conversion), with transparent huge pages off for the process; and that binary takes
/// the same arguments. A `finalize --wait` on a folder with no parts keeps the process alive to be looked at.
#[test]
fn data_prep_runs_in_the_lean_binary_without_libtorch_or_huge_pages() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let lean = common::m3d_bin().with_file_name("m3d-data-prep");
    assert!(lean.is_file(), "{} not built", lean.display());
    for via_m3d in [true, false] {
        let out = dir.path().join(format!("empty-{via_m3d}"));
        std::fs::create_dir_all(&out).unwrap();
        let mut cmd = if via_m3d {
            let mut c = Command::new(common::m3d_bin());
            // Global flags on both sides of the subcommand reach the lean binary once each.
            c.args(["-v", "data-prep", "--log-format", "json"]);
            c
        } else {
            Command::new(&lean)
        };
        let mut child = cmd
            .args(["finalize", s(&out), "--wait", "60s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        // The exec happens right after argument parsing; wait until the process image is the lean one (or give
        // up and let the assertion say what it runs as).
        let exe = |pid: u32| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .unwrap_or_else(|e| panic!("via m3d: {via_m3d}: the process ended early: {e}"))
        };
        let t0 = Instant::now();
        while !exe(pid).ends_with("m3d-data-prep") && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Past start-up (mappings and the THP flag are set before the wait loop begins).
        std::thread::sleep(Duration::from_millis(500));
        let running = exe(pid);
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            running.ends_with("m3d-data-prep"),
            "via m3d: {via_m3d}: data-prep runs as {}",
            running.display()
        );
        assert!(
            !maps.contains("libtorch"),
            "via m3d: {via_m3d}: libtorch is mapped into the conversion"
        );
        // Kernels since 5.0 report the flag; older ones have no such line, and nothing to check.
        if let Some(thp) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
            assert!(thp.ends_with('0'), "via m3d: {via_m3d}: {thp}");
        }
    }
    // The same subcommands and flags: a bad one is refused by name either way.
    let bad = common::m3d_err(&["data-prep", "cap", "--no-such-flag"]);
    assert!(bad.contains("--no-such-flag"), "{bad}");
    let out = Command::new(&lean)
        .args(["cap", "--no-such-flag"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
}
