//! The plan's size of a training set, read from the datasets' manifests alone
//! (`m3d_coordinator::TrainingSet`), equals what the loader's index holds after reading every sample table
//! (`TrainData::open`), across task filters, splits, weights and several datasets per task — and the
//! fingerprint changes with what the sample sequence depends on.

use m3d_coordinator::TrainingSet;
use m3d_data::TrainData;
use m3d_shards::encode::encode_image;
use m3d_shards::{write_dataset, ImageDtype, Manifest, SampleRecord, Store, Task, VolumeRecord};

fn volume(name: &str, v: usize) -> VolumeRecord {
    let image: Vec<f32> = (0..32).map(|i| ((i + v) % 7) as f32 / 6.0).collect();
    let bytes = encode_image(&image, ImageDtype::U8);
    VolumeRecord {
        volume_id: format!("{name}/{v}"),
        dataset: name.into(),
        source: format!("synthetic/{name}/{v}"),
        shape: [1, 2, 4, 4],
        dtype: ImageDtype::U8,
        image_crc32: VolumeRecord::crc32(&bytes),
        image: bytes.into(),
        masks: Vec::new(),
    }
}

fn sample(name: &str, i: usize, task: Task, split: &str, volume_id: &str) -> SampleRecord {
    SampleRecord {
        sample_id: format!("{name}-{i}"),
        dataset: name.into(),
        task,
        split: split.into(),
        volume_id: volume_id.to_string(),
        mask_index: None,
        question: Some("q".into()),
        answer: Some("a".into()),
        answer_choice: None,
        question_type: None,
        class_name: None,
        bbox: None,
        report: Some("r".into()),
        source_row: None,
    }
}

/// A dataset of 4 volumes with `per_task` samples of each of `tasks` per volume, alternating train/test.
fn dataset(dir: &std::path::Path, name: &str, tasks: &[Task], per_task: usize) -> String {
    let url = dir.join(name).to_str().unwrap().to_string();
    let volumes: Vec<VolumeRecord> = (0..4).map(|v| volume(name, v)).collect();
    let mut samples = Vec::new();
    for v in &volumes {
        for &task in tasks {
            for _ in 0..per_task {
                let split = if samples.len() % 3 == 2 {
                    "test"
                } else {
                    "train"
                };
                samples.push(sample(name, samples.len(), task, split, &v.volume_id));
            }
        }
    }
    let store = Store::open(&url).unwrap();
    write_dataset(
        &store,
        Manifest::new(name, "test"),
        &[volumes[..2].to_vec(), volumes[2..].to_vec()],
        &samples,
        &Default::default(),
    )
    .unwrap();
    url
}

fn recipe(yaml_data: &str) -> m3d_recipes::Recipe {
    // LaMed trains on every task (CLIP only on captions); the model does not matter to sizing.
    let yaml =
        format!("model:\n  kind: lamed\n  preset: tiny\n  segmentation: true\ndata:\n{yaml_data}");
    m3d_recipes::Recipe::from_yaml_str(&yaml, "r.yaml").unwrap()
}

#[test]
fn manifest_counts_size_the_plan_as_the_loader_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let cap = dataset(dir.path(), "cap", &[Task::Caption], 1);
    let cap2 = dataset(dir.path(), "cap2", &[Task::Caption], 2);
    let vqa = dataset(
        dir.path(),
        "vqa",
        &[Task::VqaClosed, Task::VqaOpen, Task::VqaYesNo],
        1,
    );
    let seg = dataset(
        dir.path(),
        "seg",
        &[Task::Seg, Task::Rec, Task::Reg, Task::RefSeg],
        1,
    );
    let cases = [
        format!("  tasks:\n    - task: cap\n      shards: [{cap}]\n"),
        format!("  tasks:\n    - task: cap\n      shards: [{cap}, {cap2}]\n      weight: 1.5\n"),
        format!(
            "  split: test\n  tasks:\n    - task: vqa\n      shards: [{vqa}]\n      volumes: [{cap}]\n    - task: seg\n      shards: [{seg}]\n      weight: 0.3\n"
        ),
        format!(
            "  tasks:\n    - task: refseg\n      shards: [{seg}]\n    - task: seg\n      shards: [{seg}]\n      weight: 2.0\n    - task: cap\n      shards: [{cap2}]\n"
        ),
    ];
    for yaml in &cases {
        let r = recipe(yaml);
        let set = TrainingSet::of(&r).unwrap();
        let data = TrainData::open(&r).unwrap();
        assert_eq!(set.samples, data.len(), "{yaml}");
        assert!(set.samples > 0);
    }

    // A task with no sample of the split is refused by both, naming the task.
    let r = recipe(&format!(
        "  split: val\n  tasks:\n    - task: cap\n      shards: [{cap}]\n"
    ));
    let e = TrainingSet::of(&r).unwrap_err().to_string();
    assert!(e.contains("data.tasks.0") && e.contains("`val`"), "{e}");
    assert!(TrainData::open(&r).is_err());
}

#[test]
fn the_fingerprint_follows_the_data_the_tasks_and_the_split() {
    let dir = tempfile::tempdir().unwrap();
    let cap = dataset(dir.path(), "cap", &[Task::Caption], 1);
    let cap2 = dataset(dir.path(), "cap2", &[Task::Caption], 2);
    let base = format!("  tasks:\n    - task: cap\n      shards: [{cap}]\n");
    let fp = |yaml: &str| TrainingSet::of(&recipe(yaml)).unwrap().fingerprint;
    let a = fp(&base);
    assert_eq!(a, fp(&base), "the fingerprint is a function of the inputs");
    assert_ne!(
        a,
        fp(&format!(
            "  tasks:\n    - task: cap\n      shards: [{cap2}]\n"
        ))
    );
    assert_ne!(a, fp(&format!("{base}      weight: 2.0\n")));
    assert_ne!(a, fp(&format!("  split: test\n{base}")));
    // Not the global batch, seed or shuffle: those are the run identity's own fields.
    assert_eq!(a, fp(&format!("{base}  shuffle: blocks\n")));
}

/// Sizing opens no sample table, index or volume shard: only the manifests.
#[test]
fn sizing_reads_only_the_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let cap = dataset(dir.path(), "cap", &[Task::Caption], 1);
    for key in ["samples", "volumes", "index"] {
        std::fs::rename(
            std::path::Path::new(&cap).join(key),
            std::path::Path::new(&cap).join(format!("{key}.moved")),
        )
        .unwrap();
    }
    let r = recipe(&format!(
        "  tasks:\n    - task: cap\n      shards: [{cap}]\n"
    ));
    // 4 caption samples, every third one in `test`: 3 in `train`.
    assert_eq!(TrainingSet::of(&r).unwrap().samples, 3);
}
