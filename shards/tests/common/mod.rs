//! Shared helpers for the integration tests: synthetic volumes and samples, and the Python oracle.
#![allow(dead_code)]

use std::path::PathBuf;

use m3d_shards::encode::{encode_image, pack_mask};
use m3d_shards::{ImageDtype, MaskRecord, SampleRecord, Task, VolumeRecord};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A synthetic volume: the source f32 image, the source 0/1 masks and the encoded record.
pub struct Synthetic {
    pub image: Vec<f32>,
    pub masks: Vec<Vec<u8>>,
    pub record: VolumeRecord,
}

/// Builds a volume of `shape` with random values in [0, 1] and `n_masks` masks; mask 1 (if present) is
/// left empty so that empty-mask handling is exercised.
pub fn synthetic_volume(
    rng: &mut ChaCha8Rng,
    id: &str,
    shape: [u32; 4],
    dtype: ImageDtype,
    n_masks: usize,
) -> Synthetic {
    let n: usize = shape.iter().map(|&s| s as usize).product();
    let spatial: usize = shape[1..].iter().map(|&s| s as usize).product();
    let image: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
    let masks: Vec<Vec<u8>> = (0..n_masks)
        .map(|k| {
            if k == 1 {
                vec![0u8; spatial]
            } else {
                (0..spatial)
                    .map(|_| u8::from(rng.random::<f32>() < 0.3))
                    .collect()
            }
        })
        .collect();
    let bytes = encode_image(&image, dtype);
    let record = VolumeRecord {
        volume_id: id.to_string(),
        dataset: "seg".into(),
        source: format!("src/{id}/image.npy"),
        shape,
        dtype,
        image_crc32: crc32fast::hash(&bytes),
        image: bytes.into(),
        masks: masks
            .iter()
            .enumerate()
            .map(|(k, m)| {
                let (bits, voxels) = pack_mask(m);
                MaskRecord {
                    class_index: k as u32 + 1,
                    label: format!("class {k}"),
                    voxels,
                    bits: if voxels == 0 { Vec::new() } else { bits },
                }
            })
            .collect(),
    };
    Synthetic {
        image,
        masks,
        record,
    }
}

pub fn sample(i: usize, volume_id: &str, task: Task) -> SampleRecord {
    SampleRecord {
        sample_id: format!("s{i:04}"),
        dataset: "seg".into(),
        task,
        split: if i % 3 == 0 {
            "test".into()
        } else {
            "train".into()
        },
        volume_id: volume_id.to_string(),
        mask_index: (i % 2 == 0).then_some(i as u32 % 3),
        question: (i % 3 == 1).then(|| format!("Where is thing {i}? «ü»")),
        answer: Some(format!("answer {i}")),
        answer_choice: (i % 4 == 0).then(|| "B".to_string()),
        question_type: (i % 5 == 0).then(|| "3".to_string()),
        class_name: (i % 2 == 0).then(|| "liver".to_string()),
        bbox: (i % 2 == 1).then(|| [0.1, 0.2, 0.3, 0.4 + i as f32 / 1000.0, 0.5, 0.625]),
        report: (i % 7 == 0).then(|| "Findings: none.\nMore text".to_string()),
        source_row: Some(format!("file.csv:{i}")),
    }
}

#[allow(unused_imports)] // not every test binary that includes this module calls it
pub use m3d_testkit::python;

pub fn oracle_script(name: &str) -> PathBuf {
    m3d_testkit::package_dir().join("tests/oracle").join(name)
}

/// Writes a dataset (volume shards, one sample shard, the volume index, manifest last) into `store`.
pub fn write_dataset(
    store: &m3d_shards::Store,
    volume_shards: &[Vec<VolumeRecord>],
    samples: &[SampleRecord],
) -> m3d_shards::Manifest {
    use m3d_shards::{Manifest, WriteOptions};
    let opts = WriteOptions {
        rows_per_row_group: 2,
        zstd_level: 3,
        ..Default::default()
    };
    let mut manifest = Manifest::new("seg", "m3d-shards tests");
    manifest.source = serde_json::json!({"root": "/synthetic"});
    manifest.preprocessing = serde_json::json!({"shape": [1, 32, 256, 256]});
    m3d_shards::write_dataset(store, manifest, volume_shards, samples, &opts).unwrap()
}

/// Two shards of small volumes and samples referencing them.
pub fn small_dataset(seed: u64) -> (Vec<Vec<VolumeRecord>>, Vec<SampleRecord>) {
    let mut r = rng(seed);
    let shards: Vec<Vec<VolumeRecord>> = (0..2)
        .map(|s| {
            (0..3)
                .map(|i| {
                    synthetic_volume(
                        &mut r,
                        &format!("00{s}/case_{i}"),
                        [1, 2, 4, 4],
                        ImageDtype::F16,
                        2,
                    )
                    .record
                })
                .collect()
        })
        .collect();
    let samples = (0..12)
        .map(|i| {
            sample(
                i,
                &shards[i % 2][i % 3].volume_id,
                if i % 2 == 0 { Task::Seg } else { Task::Rec },
            )
        })
        .collect();
    (shards, samples)
}
