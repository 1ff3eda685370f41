//! The data plan's block shuffle seen from the loader: with a cache that holds one window's volumes, a
//! `ShardLoader` fed the plan's batches reads each volume exactly once per epoch, where the global shuffle with
//! the same cache reads volumes again; and the recipe's `data.shuffle` reaches the plan and the run identity.

use m3d_coordinator::plan::{PlanSpec, Shuffle};
use m3d_data::loader::{LoaderOptions, ShardLoader};
use m3d_shards::encode::encode_image;
use m3d_shards::{ImageDtype, Manifest, SampleRecord, Store, Task, VolumeRecord, WriteOptions};
use m3d_worker::checkpoint::SHUFFLE_GLOBAL;

const SHAPE: [u32; 4] = [1, 2, 4, 4];
const SHARDS: usize = 6;
const PER_SHARD: usize = 4;
const SAMPLES_PER_VOLUME: usize = 2;
const VOLUMES: u64 = (SHARDS * PER_SHARD) as u64;
const SAMPLES: u64 = VOLUMES * SAMPLES_PER_VOLUME as u64;
/// One block = one volume shard's samples; a window = 2 shards = 8 volumes.
const BLOCK: u64 = (PER_SHARD * SAMPLES_PER_VOLUME) as u64;
const WINDOW: u64 = 2;
const WINDOW_VOLUMES: usize = 2 * PER_SHARD;

fn volume(s: usize, v: usize) -> VolumeRecord {
    let n: usize = SHAPE.iter().map(|&x| x as usize).product();
    let image: Vec<f32> = (0..n)
        .map(|i| ((i * 7 + s * 13 + v * 29) % 31) as f32 / 30.0)
        .collect();
    // One dtype, no masks: every volume takes the same bytes in the cache.
    let bytes = encode_image(&image, ImageDtype::U8);
    VolumeRecord {
        volume_id: format!("{s:03}/case_{v}"),
        dataset: "cap".into(),
        source: format!("synthetic/{s}/{v}"),
        shape: SHAPE,
        dtype: ImageDtype::U8,
        image_crc32: VolumeRecord::crc32(&bytes),
        image: bytes.into(),
        masks: Vec::new(),
    }
}

fn sample(i: usize, volume_id: &str) -> SampleRecord {
    SampleRecord {
        sample_id: format!("s{i:03}"),
        dataset: "cap".into(),
        task: Task::Caption,
        split: "train".into(),
        volume_id: volume_id.to_string(),
        mask_index: None,
        question: None,
        answer: None,
        answer_choice: None,
        question_type: None,
        class_name: None,
        bbox: None,
        report: Some(format!("report {i}")),
        source_row: None,
    }
}

/// Writes `SHARDS` volume shards of `PER_SHARD` volumes, their samples in shard order (as conversion writes
/// them), with the volume index; returns the dataset URL.
fn write_dataset(dir: &std::path::Path) -> String {
    let url = dir.to_str().unwrap_or_default().to_string();
    let shards: Vec<Vec<VolumeRecord>> = (0..SHARDS)
        .map(|s| (0..PER_SHARD).map(|v| volume(s, v)).collect())
        .collect();
    let mut samples = Vec::new();
    for v in shards.iter().flatten() {
        for _ in 0..SAMPLES_PER_VOLUME {
            samples.push(sample(samples.len(), &v.volume_id));
        }
    }
    let opts = WriteOptions {
        rows_per_row_group: 1,
        ..Default::default()
    };
    let manifest = Manifest::new("cap", "m3d-worker tests");
    m3d_shards::write_dataset(
        &Store::open(&url).unwrap(),
        manifest,
        &shards,
        &samples,
        &opts,
    )
    .unwrap();
    url
}

fn plan(shuffle: Shuffle) -> PlanSpec {
    PlanSpec {
        kind: m3d_coordinator::PlanKind::Train,
        samples: SAMPLES,
        global_batch: 4,
        seed: 3,
        epochs: 2,
        max_steps: None,
        shuffle,
    }
}

/// Bytes of one decoded volume in the loader's cache.
fn volume_bytes(url: &str) -> usize {
    let probe = ShardLoader::open(url, LoaderOptions::default()).unwrap();
    probe.load(&[0]).unwrap();
    probe.cached_bytes()
}

/// A loader (no read-ahead, so the counts are exact) whose cache holds one window's volumes and not one more.
fn loader(url: &str) -> ShardLoader {
    let one = volume_bytes(url);
    assert!(one > 0);
    let opts = LoaderOptions {
        cache_bytes: WINDOW_VOLUMES * one + one / 2,
        prefetch_depth: 0,
    };
    ShardLoader::open(url, opts).unwrap()
}

/// Store reads of volumes in each epoch when rank `rank` of `world` loads its slice of every step.
fn reads_per_epoch(url: &str, p: &PlanSpec, rank: u32, world: u32) -> Vec<u64> {
    let l = loader(url);
    let mut out = Vec::new();
    let spe = p.steps_per_epoch();
    for epoch in 0..p.epochs {
        let before = l.stats().volume_reads;
        for step in epoch * spe..(epoch + 1) * spe {
            let indices = p.rank_slice(step, rank, world).unwrap();
            let got = l.load(&indices).unwrap();
            assert_eq!(got.len(), indices.len());
        }
        out.push(l.stats().volume_reads - before);
    }
    out
}

#[test]
fn block_shuffle_reads_each_volume_once_per_epoch_with_a_one_window_cache() {
    let dir = tempfile::tempdir().unwrap();
    let url = write_dataset(dir.path());
    let blocks = plan(Shuffle::Blocks {
        block: BLOCK,
        window: WINDOW,
    });
    assert_eq!(blocks.steps_per_epoch() * blocks.global_batch, SAMPLES);
    // One rank: from a cold cache every volume exactly once in the first epoch; later epochs at most once
    // each (the previous epoch's last window may still be cached when the next one needs it).
    let reads = reads_per_epoch(&url, &blocks, 0, 1);
    assert_eq!(reads[0], VOLUMES, "{reads:?}");
    assert!(reads.iter().all(|&r| r <= VOLUMES), "{reads:?}");
    // Every epoch, from a cold cache: exactly once each.
    for epoch in 0..blocks.epochs {
        let l = loader(&url);
        let spe = blocks.steps_per_epoch();
        for step in epoch * spe..(epoch + 1) * spe {
            l.load(&blocks.global_batch_at(step).unwrap()).unwrap();
        }
        assert_eq!(l.stats().volume_reads, VOLUMES, "epoch {epoch}");
    }
    // Two ranks, each with its own loader: a rank reads each volume at most once per epoch.
    for rank in 0..2 {
        let reads = reads_per_epoch(&url, &blocks, rank, 2);
        assert!(
            reads.iter().all(|&r| r <= VOLUMES),
            "rank {rank}: {reads:?}"
        );
    }

    // A step of one whole window: its volumes are whole shards, each brought by one request, so an epoch
    // costs one request per shard. The global shuffle's steps scatter over every shard.
    let wide = |shuffle| PlanSpec {
        kind: m3d_coordinator::PlanKind::Train,
        global_batch: BLOCK * WINDOW,
        ..plan(shuffle)
    };
    let requests = |p: &PlanSpec| {
        let l = loader(&url);
        for step in 0..p.steps_per_epoch() {
            l.load(&p.global_batch_at(step).unwrap()).unwrap();
        }
        (l.stats().requests, l.stats().volume_reads)
    };
    let blocks_wide = wide(Shuffle::Blocks {
        block: BLOCK,
        window: WINDOW,
    });
    assert_eq!(requests(&blocks_wide), (SHARDS as u64, VOLUMES));
    let (global_requests, _) = requests(&wide(Shuffle::Global));
    assert!(global_requests > SHARDS as u64, "{global_requests}");

    let global = plan(Shuffle::Global);
    let reads = reads_per_epoch(&url, &global, 0, 1);
    eprintln!("global shuffle, volume reads per epoch: {reads:?} ({VOLUMES} volumes)");
    assert!(
        reads.iter().all(|&r| r > VOLUMES),
        "the global shuffle re-reads volumes with the same cache: {reads:?}"
    );
}

#[test]
fn the_recipe_shuffle_reaches_the_plan_and_the_run_identity() {
    let base = "model:\n  kind: clip\ndata:\n  tasks:\n    - task: cap\n      shards: [s]\n";
    let r = m3d_recipes::Recipe::from_yaml_str(base, "r.yaml").unwrap();
    assert_eq!(Shuffle::of_recipe(&r.data), Shuffle::Global);
    // Checkpoints written before block shuffles recorded this string: they still match a global run.
    assert_eq!(Shuffle::of_recipe(&r.data).to_string(), SHUFFLE_GLOBAL);

    let blocks = format!("{base}  shuffle: blocks\n  shuffle_window: 4\n");
    let r = m3d_recipes::Recipe::from_yaml_str(&blocks, "r.yaml").unwrap();
    assert_eq!(
        Shuffle::of_recipe(&r.data),
        Shuffle::Blocks {
            block: 32,
            window: 4
        }
    );
    assert_eq!(Shuffle::of_recipe(&r.data).to_string(), "blocks:32x4");

    for key in ["shuffle_block", "shuffle_window"] {
        let bad = format!("{base}  shuffle: blocks\n  {key}: 0\n");
        let e = m3d_recipes::Recipe::from_yaml_str(&bad, "r.yaml").unwrap_err();
        assert!(e.to_string().contains(&format!("data.{key}")), "{e}");
    }
}
