//! `m3d data-prep ... --part I/N` + `m3d data-prep finalize` as separate processes (the parts running at the same
//! time into one location, as on N machines): the result is the single conversion's, object for object and byte
//! for byte (the manifest up to its `created_unix` timestamp); missing, duplicated, differently split or
//! differently configured parts are refused naming the part; the finalized dataset opens and reads.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{m3d, m3d_bin, m3d_err, m3d_ok, s, synth_small};
use m3d_shards::dataset::ShardDataset;

/// Every file under `root`, by path relative to it, with its bytes.
fn objects(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The manifest without its creation time (the one field that differs between two conversions).
fn manifest_sans_time(bytes: &[u8]) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
    let t = v.as_object_mut().unwrap().remove("created_unix");
    assert!(t.is_some(), "manifest has created_unix");
    v
}

fn convert_args<'a>(ds: &'a str, src: &'a Path, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "data-prep",
        ds,
        "--src",
        s(src),
        "--out",
        out,
        "--shard-volumes",
        "1",
    ];
    args.extend_from_slice(extra);
    args
}

/// Runs parts `parts` of `n` as concurrent `m3d` processes and requires each to succeed.
fn run_parts(ds: &str, src: &Path, out: &str, n: usize, parts: &[usize], extra: &[&str]) {
    let children: Vec<_> = parts
        .iter()
        .map(|i| {
            let part = format!("{i}/{n}");
            let mut args = convert_args(ds, src, out, extra);
            args.extend(["--part", &part, "--threads", "1"]);
            let child = std::process::Command::new(m3d_bin())
                .args(&args)
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (part, child)
        })
        .collect();
    for (part, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{ds} part {part} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("part {part}")), "{stdout}");
        assert!(stdout.contains("finalize"), "{stdout}");
    }
}

/// Rewrites one cell (0-based data row, column by name) of a CSV file, keeping everything else.
fn set_csv_cell(path: &Path, row: usize, column: &str, value: &str) {
    let mut rdr = csv::Reader::from_path(path).unwrap();
    let headers = rdr.headers().unwrap().clone();
    let col = headers.iter().position(|h| h == column).unwrap();
    let mut rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    let mut rec: Vec<String> = rows[row].iter().map(str::to_string).collect();
    rec[col] = value.to_string();
    rows[row] = csv::StringRecord::from(rec);
    let mut w = csv::Writer::from_path(path).unwrap();
    w.write_record(&headers).unwrap();
    for r in &rows {
        w.write_record(r).unwrap();
    }
    w.flush().unwrap();
}

fn first_file(root: &Path, ext: &str) -> PathBuf {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == ext) {
                found.push(p);
            }
        }
    }
    found.sort();
    found.into_iter().next().unwrap()
}

/// Asserts that `parts` (converted in parts and finalized) holds exactly the objects of `single` plus the part
/// records, with the same bytes, and that it opens and reads the same samples and volumes.
fn assert_same_dataset(single: &Path, parts: &Path, n: usize) {
    let a = objects(single);
    let b = objects(parts);
    let records: Vec<&String> = b.keys().filter(|k| k.starts_with("parts/")).collect();
    let want: Vec<String> = (1..=n)
        .map(|i| format!("parts/part-{i}-of-{n}.json"))
        .collect();
    assert_eq!(records, want.iter().collect::<Vec<_>>());
    let b_keys: Vec<&String> = b.keys().filter(|k| !k.starts_with("parts/")).collect();
    assert_eq!(a.keys().collect::<Vec<_>>(), b_keys, "same objects");
    assert!(a.keys().any(|k| k.starts_with("volumes/")));
    assert!(a.contains_key("index/volumes.parquet"));
    for (key, bytes) in &a {
        if key == "manifest.json" {
            assert_eq!(
                manifest_sans_time(bytes),
                manifest_sans_time(&b[key]),
                "manifest"
            );
        } else {
            assert!(bytes == &b[key], "{key} differs");
        }
    }
    let da = ShardDataset::open(s(single)).unwrap();
    let db = ShardDataset::open(s(parts)).unwrap();
    assert_eq!(da.samples(), db.samples());
    assert_eq!(da.manifest().counts, db.manifest().counts);
    assert_eq!(da.manifest().totals, db.manifest().totals);
    assert_eq!(da.volume_index().unwrap(), db.volume_index().unwrap());
    assert!(db.verify().unwrap().is_ok());
    for v in db.volume_index().unwrap().volumes {
        let rec = db.find_volume(&v.volume_id).unwrap().unwrap();
        assert_eq!(rec, da.find_volume(&v.volume_id).unwrap().unwrap());
    }
}

#[test]
fn parts_and_finalize_equal_a_single_conversion() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    synth_small(&raw);
    // A bad slice (skipped with its volume) and a bad RefSeg table row (rejected while planning): skipped.json and
    // the counts must merge to the single run's.
    std::fs::write(
        first_file(&raw.join("M3D_Cap"), "png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    set_csv_cell(
        &raw.join("M3D_RefSeg/M3D_RefSeg_train.csv"),
        0,
        "Mask_ID",
        "x",
    );
    for (ds, sub, n) in [
        ("cap", "M3D_Cap", 3),
        ("seg", "M3D_Seg", 3),
        // Two volumes in three parts: one part converts no shard.
        ("refseg", "M3D_RefSeg", 3),
    ] {
        let src = raw.join(sub);
        let single = tmp.path().join(format!("single-{ds}"));
        let parts = tmp.path().join(format!("parts-{ds}"));
        m3d_ok(&convert_args(ds, &src, s(&single), &["--skip-bad"]));
        run_parts(ds, &src, s(&parts), n, &[1, 2, 3], &["--skip-bad"]);
        assert!(
            !parts.join("manifest.json").exists(),
            "{ds}: no manifest before finalize"
        );
        assert!(ShardDataset::open(s(&parts)).is_err());
        let report: serde_json::Value =
            serde_json::from_str(&m3d_ok(&["data-prep", "finalize", s(&parts), "--json"])).unwrap();
        let single_manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(single.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(report["volumes"], single_manifest["totals"]["volumes"]);
        assert_eq!(report["counts"], single_manifest["counts"]);
        assert_eq!(
            report["skipped"].as_array().unwrap().len() as u64,
            single_manifest["skipped"].as_u64().unwrap()
        );
        if ds != "seg" {
            assert_eq!(
                single_manifest["skipped"].as_u64(),
                Some(1),
                "{ds}: the broken input is skipped"
            );
        }
        assert_same_dataset(&single, &parts, n);
    }
}

#[test]
fn finalize_names_missing_duplicated_and_mismatched_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    synth_small(&raw);
    let src = raw.join("M3D_Seg");
    let out = tmp.path().join("seg");
    let url = s(&out);

    let none = m3d_err(&["data-prep", "finalize", url]);
    assert!(none.contains(url), "{none}");

    // Part 2 of 3 not converted yet.
    run_parts("seg", &src, url, 3, &[1, 3], &[]);
    let missing = m3d_err(&["data-prep", "finalize", url]);
    assert!(
        missing.contains(&format!(
            "part 2/3 is missing: no completion record for it under {url}"
        )),
        "{missing}"
    );
    assert!(!out.join("manifest.json").exists());

    // A copy of part 1's record standing in for part 2 would count part 1 twice.
    std::fs::copy(
        out.join("parts/part-1-of-3.json"),
        out.join("parts/part-2-of-3.json"),
    )
    .unwrap();
    let dup = m3d_err(&["data-prep", "finalize", url]);
    assert!(
        dup.contains("parts/part-2-of-3.json holds the record of part 1/3"),
        "{dup}"
    );

    // Part 2 converted with other settings.
    run_parts("seg", &src, url, 3, &[2], &["--dtype", "f32"]);
    let settings = m3d_err(&["data-prep", "finalize", url]);
    assert!(
        settings.contains("part 2/3 was converted with other settings than part 1/3")
            && settings.contains(
                "`preprocessing.storage.dtype` is \"f16\" in part 1/3 but \"f32\" in part 2/3"
            ),
        "{settings}"
    );

    // A record of another split in the same place.
    run_parts("seg", &src, url, 3, &[2], &[]);
    run_parts("seg", &src, url, 2, &[1], &[]);
    let mixed = m3d_err(&["data-prep", "finalize", url]);
    assert!(
        mixed.contains("different splits") && mixed.contains("parts/part-1-of-2.json"),
        "{mixed}"
    );
    std::fs::remove_file(out.join("parts/part-1-of-2.json")).unwrap();

    // --part does not apply to VQA (samples only).
    let vqa = m3d_err(&[
        "data-prep",
        "vqa",
        "--src",
        s(&raw.join("M3D_VQA")),
        "--out",
        s(&tmp.path().join("vqa")),
        "--part",
        "1/2",
    ]);
    assert!(
        vqa.contains("--part 1/2") && vqa.contains("without --part"),
        "{vqa}"
    );
    let bad = m3d_err(&[
        "data-prep",
        "seg",
        "--src",
        s(&src),
        "--out",
        url,
        "--part",
        "4/3",
    ]);
    assert!(bad.contains("4/3"), "{bad}");

    // Now complete: finalize, and finalize again (harmless: the same objects, a new timestamp).
    m3d_ok(&["data-prep", "finalize", url]);
    let first = objects(&out);
    let again = m3d(&["data-prep", "finalize", url]);
    assert!(again.status.success());
    let second = objects(&out);
    assert_eq!(
        first.keys().collect::<Vec<_>>(),
        second.keys().collect::<Vec<_>>()
    );
    for (key, bytes) in &first {
        if key == "manifest.json" {
            assert_eq!(manifest_sans_time(bytes), manifest_sans_time(&second[key]));
        } else {
            assert!(bytes == &second[key], "{key} changed");
        }
    }
    let single = tmp.path().join("single");
    m3d_ok(&convert_args("seg", &src, s(&single), &[]));
    assert_same_dataset(&single, &out, 3);

    // Re-running a part makes the dataset incomplete again until the next finalize.
    run_parts("seg", &src, url, 3, &[3], &[]);
    assert!(!out.join("manifest.json").exists());
    m3d_ok(&["data-prep", "finalize", url]);
    assert_same_dataset(&single, &out, 3);
}

#[test]
fn parts_through_s3_equal_a_local_single_conversion() {
    let tmp = tempfile::tempdir().unwrap();
    let server = m3d_testkit::S3Server::start(&tmp.path().join("moto.log"));
    server.create_bucket("m3d-data");
    let raw = tmp.path().join("raw");
    synth_small(&raw);
    let src = raw.join("M3D_Seg");
    let single = tmp.path().join("single");
    m3d_ok(&convert_args("seg", &src, s(&single), &[]));

    let url = "s3://m3d-data/shards/seg";
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIAM3DTEST"),
        ("AWS_SECRET_ACCESS_KEY", "m3d-test-secret"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", &server.endpoint()),
        ("RUST_LOG", "warn"),
    ];
    let run = |args: Vec<&str>| {
        let out = std::process::Command::new(m3d_bin())
            .args(&args)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "m3d {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for part in ["1/2", "2/2"] {
        let mut args = convert_args("seg", &src, url, &[]);
        args.extend(["--part", part]);
        run(args);
    }
    assert!(server
        .keys("m3d-data", "shards/seg/manifest.json")
        .is_empty());
    run(vec!["data-prep", "finalize", url]);

    let keys: Vec<String> = server
        .keys("m3d-data", "shards/seg/")
        .into_iter()
        .map(|k| k["shards/seg/".len()..].to_string())
        .filter(|k| !k.starts_with("parts/"))
        .collect();
    let local = objects(&single);
    assert_eq!(keys, local.keys().cloned().collect::<Vec<_>>());
    // Every object's bytes, read back through the store (credentials and endpoint from the same variables).
    for (k, v) in &env {
        std::env::set_var(k, v);
    }
    let store = m3d_shards::Store::open(url).unwrap();
    for (key, bytes) in &local {
        let remote = store.get(key).unwrap();
        if key == "manifest.json" {
            assert_eq!(manifest_sans_time(bytes), manifest_sans_time(&remote));
        } else {
            assert!(bytes[..] == remote[..], "{key} differs");
        }
    }
    let ds = ShardDataset::open(url).unwrap();
    assert!(ds.verify().unwrap().is_ok());
    assert_eq!(
        ds.samples(),
        ShardDataset::open(s(&single)).unwrap().samples()
    );
}
