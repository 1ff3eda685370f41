//! pyarrow (the Python oracle) reads shards written by this crate and sees the documented columns,
//! metadata and values: images decoded with numpy match the source values within the dtype's precision,
//! crc32s match zlib's, masks unpacked with numpy equal the source masks.
mod common;

use std::process::Command;

use m3d_shards::{
    write_sample_shard, write_volume_shard, ImageDtype, SampleRecord, Task, WriteOptions,
};
use serde_json::Value;

fn tolerance(dtype: ImageDtype, v: f32) -> f32 {
    match dtype {
        ImageDtype::U8 => 0.5 / 255.0 + 1e-7,
        ImageDtype::F16 => (v.abs() * 2f32.powi(-11)).max(2f32.powi(-25)),
        ImageDtype::F32 => 0.0,
    }
}

fn opt_str(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

#[test]
fn pyarrow_reads_our_shards() {
    let python = common::python();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = common::rng(20);
    let dtypes = [ImageDtype::U8, ImageDtype::F16, ImageDtype::F32];
    let synth: Vec<common::Synthetic> = (0..5)
        .map(|i| {
            common::synthetic_volume(
                &mut rng,
                &format!("ct_case/{i:06}/Axial"),
                [1, 4, 6, 5],
                dtypes[i % 3],
                3,
            )
        })
        .collect();
    let records: Vec<_> = synth.iter().map(|s| s.record.clone()).collect();
    let opts = WriteOptions {
        rows_per_row_group: 2,
        zstd_level: 5,
        ..Default::default()
    };
    let vol_path = dir.path().join("volumes.parquet");
    std::fs::write(&vol_path, write_volume_shard(&records, &opts).unwrap()).unwrap();
    let tasks = [
        Task::Caption,
        Task::VqaClosed,
        Task::VqaOpen,
        Task::VqaYesNo,
        Task::Rec,
        Task::Reg,
        Task::Seg,
        Task::RefSeg,
    ];
    let samples: Vec<SampleRecord> = (0..16)
        .map(|i| common::sample(i, &records[i % 5].volume_id, tasks[i % 8]))
        .collect();
    let smp_path = dir.path().join("samples.parquet");
    std::fs::write(&smp_path, write_sample_shard(&samples, &opts).unwrap()).unwrap();

    let out = Command::new(&python)
        .arg(common::oracle_script("read_shards.py"))
        .arg(&vol_path)
        .arg(&smp_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();

    // --- volume shard ---
    let vol = &v["volumes"];
    let cols: Vec<&str> = vol["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        cols,
        [
            "volume_id",
            "dataset",
            "source",
            "shape",
            "dtype",
            "image",
            "image_crc32",
            "masks"
        ]
    );
    let ty = |c: &str| vol["types"][c].as_str().unwrap().to_string();
    assert_eq!(ty("volume_id"), "string");
    assert_eq!(ty("image"), "large_binary");
    assert_eq!(ty("image_crc32"), "uint32");
    assert!(
        ty("shape").starts_with("fixed_size_list<item: uint32") && ty("shape").ends_with("[4]"),
        "{}",
        ty("shape")
    );
    assert!(
        ty("masks").starts_with("list<item: struct<class_index: uint32"),
        "{}",
        ty("masks")
    );
    assert_eq!(vol["metadata"]["m3d.format"], "m3d-shards");
    assert_eq!(vol["metadata"]["m3d.shard_schema_version"], "1");
    assert_eq!(vol["metadata"]["m3d.shard_kind"], "volumes");
    assert_eq!(vol["num_row_groups"], 3);
    let rows = vol["rows"].as_array().unwrap();
    assert_eq!(rows.len(), synth.len());
    for (row, s) in rows.iter().zip(&synth) {
        let r = &s.record;
        assert_eq!(row["volume_id"], r.volume_id.as_str());
        assert_eq!(row["dataset"], r.dataset.as_str());
        assert_eq!(row["source"], r.source.as_str());
        assert_eq!(row["dtype"], r.dtype.as_str());
        let shape: Vec<u32> = row["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(shape, r.shape);
        assert_eq!(row["crc_ok"], true, "zlib crc32 of {}", r.volume_id);
        let image = row["image"].as_array().unwrap();
        assert_eq!(image.len(), s.image.len());
        for (py, &src) in image.iter().zip(&s.image) {
            let py = py.as_f64().unwrap() as f32;
            assert!(
                (py - src).abs() <= tolerance(r.dtype, src),
                "{}: {src} decoded by numpy as {py}",
                r.volume_id
            );
        }
        let masks = row["masks"].as_array().unwrap();
        assert_eq!(masks.len(), s.masks.len());
        for ((pm, src), rm) in masks.iter().zip(&s.masks).zip(&r.masks) {
            let unpacked: Vec<u8> = pm["mask"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u8)
                .collect();
            assert_eq!(&unpacked, src, "mask {} of {}", rm.class_index, r.volume_id);
            let ones = src.iter().filter(|&&m| m != 0).count() as u64;
            assert_eq!(pm["ones"], ones);
            assert_eq!(pm["voxels"], ones);
            assert_eq!(pm["class_index"], rm.class_index);
            assert_eq!(pm["label"], rm.label.as_str());
        }
    }

    // --- sample shard ---
    let smp = &v["samples"];
    let cols: Vec<&str> = smp["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        cols,
        [
            "sample_id",
            "dataset",
            "task",
            "split",
            "volume_id",
            "mask_index",
            "question",
            "answer",
            "answer_choice",
            "question_type",
            "class_name",
            "bbox",
            "report",
            "source_row"
        ]
    );
    assert_eq!(smp["metadata"]["m3d.shard_kind"], "samples");
    assert_eq!(smp["types"]["mask_index"], "uint32");
    let rows = smp["rows"].as_array().unwrap();
    assert_eq!(rows.len(), samples.len());
    for (row, s) in rows.iter().zip(&samples) {
        assert_eq!(row["sample_id"], s.sample_id.as_str());
        assert_eq!(row["dataset"], s.dataset.as_str());
        assert_eq!(row["task"], s.task.to_string().as_str());
        assert_eq!(row["split"], s.split.as_str());
        assert_eq!(row["volume_id"], s.volume_id.as_str());
        assert_eq!(row["mask_index"].as_u64().map(|x| x as u32), s.mask_index);
        assert_eq!(opt_str(&row["question"]), s.question);
        assert_eq!(opt_str(&row["answer"]), s.answer);
        assert_eq!(opt_str(&row["answer_choice"]), s.answer_choice);
        assert_eq!(opt_str(&row["question_type"]), s.question_type);
        assert_eq!(opt_str(&row["class_name"]), s.class_name);
        assert_eq!(opt_str(&row["report"]), s.report);
        assert_eq!(opt_str(&row["source_row"]), s.source_row);
        let bbox = row["bbox"].as_array().map(|b| {
            let mut a = [0f32; 6];
            for (o, x) in a.iter_mut().zip(b) {
                *o = x.as_f64().unwrap() as f32;
            }
            a
        });
        assert_eq!(bbox, s.bbox);
    }
}
