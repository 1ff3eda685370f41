//! Opening a dataset through its sample lookup (`index/samples.lookup`), as a training worker does: what the
//! first batch costs in requests and bytes does not grow with the dataset, no sample shard, volume index or
//! shard list is read, the records and volumes are those the whole-table path serves, the rows of a split and
//! task are the ranges the manifest lists, and a corrupted block is an error naming the object and the block.

use std::collections::HashMap;

use m3d_data::loader::{LoaderOptions, ShardLoader, VolumeReaders};
use m3d_shards::{
    ForeignVolumes, ImageDtype, Manifest, SampleRecord, Store, Task, VolumeRecord, WriteOptions,
    INDEX_KEY, LOOKUP_KEY, SHARD_LIST_KEY,
};

const SHAPE: [u32; 4] = [1, 2, 4, 4];

fn volume(v: usize) -> VolumeRecord {
    let n: usize = SHAPE.iter().map(|&x| x as usize).product();
    let image: Vec<f32> = (0..n)
        .map(|i| ((i * 7 + v * 29) % 31) as f32 / 30.0)
        .collect();
    let bytes = m3d_shards::encode::encode_image(&image, ImageDtype::U8);
    VolumeRecord {
        volume_id: format!("case_{v:06}"),
        dataset: "cap".into(),
        source: format!("synthetic/{v}"),
        shape: SHAPE,
        dtype: ImageDtype::U8,
        image_crc32: VolumeRecord::crc32(&bytes),
        image: bytes.into(),
        masks: Vec::new(),
    }
}

/// Two samples per volume: a caption (train for 3 volumes in 4, else test) and a closed VQA question (train),
/// interleaved in the sample shard, so that the lookup has to regroup them.
fn samples(volumes: usize) -> Vec<SampleRecord> {
    let mut out = Vec::new();
    for v in 0..volumes {
        for (k, task) in [Task::Caption, Task::VqaClosed].into_iter().enumerate() {
            let split = if task == Task::Caption && v % 4 == 3 {
                "test"
            } else {
                "train"
            };
            out.push(SampleRecord {
                sample_id: format!("s{v:06}-{k}"),
                dataset: "cap".into(),
                task,
                split: split.into(),
                volume_id: format!("case_{v:06}"),
                mask_index: None,
                question: (k == 1).then(|| format!("question {v}?")),
                answer: (k == 1).then(|| "A".to_string()),
                answer_choice: None,
                question_type: None,
                class_name: None,
                bbox: None,
                report: (k == 0).then(|| format!("report of case {v}: ").repeat(3)),
                source_row: Some(format!("M3D_Cap.json:{v}")),
            });
        }
    }
    out
}

/// A dataset of `volumes` volumes, one shard each (so at least 200 shards for 200 volumes).
fn write(dir: &std::path::Path, volumes: usize) -> String {
    let url = dir.to_str().unwrap_or_default().to_string();
    let shards: Vec<Vec<VolumeRecord>> = (0..volumes).map(|v| vec![volume(v)]).collect();
    m3d_shards::write_dataset(
        &Store::open(&url).unwrap(),
        Manifest::new("cap", "m3d-data tests"),
        &shards,
        &samples(volumes),
        &WriteOptions::default(),
    )
    .unwrap();
    url
}

fn opts() -> LoaderOptions {
    LoaderOptions {
        cache_bytes: 1 << 20,
        prefetch_depth: 0,
    }
}

/// Opens `url` through its lookup with an I/O log, loads rows `picks`; returns (requests, bytes, keys read).
fn first_batch(url: &str, picks: &[u64]) -> (usize, u64, Vec<String>) {
    let (store, log) = Store::open_existing(url).unwrap().with_io_log();
    let loader = ShardLoader::open_lookup_in(store, &[], opts(), &mut VolumeReaders::default())
        .unwrap()
        .expect("the dataset has a lookup");
    let got = loader.load(picks).unwrap();
    assert_eq!(got.len(), picks.len());
    let (requests, bytes) = log.totals("");
    let keys: Vec<String> = log.events().into_iter().map(|e| e.key).collect();
    (requests, bytes, keys)
}

#[test]
fn the_first_batch_costs_the_same_at_200_and_at_2000_shards_and_reads_no_table() {
    let (small, large) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (small, large) = (write(small.path(), 200), write(large.path(), 2000));
    // Eight rows spread over the small dataset's 400, each in a lookup block of its own.
    let picks: Vec<u64> = (0..8).map(|k| k * 47 + 3).collect();
    let (req_s, bytes_s, keys_s) = first_batch(&small, &picks);
    let (req_l, bytes_l, keys_l) = first_batch(&large, &picks);
    for keys in [&keys_s, &keys_l] {
        for k in keys {
            assert!(
                !k.starts_with("samples/") && k != INDEX_KEY && k != SHARD_LIST_KEY,
                "opening through the lookup read `{k}`: {keys:?}"
            );
        }
    }
    // The manifest, then per sample: a directory entry, a block, its shard's footer, its volume.
    assert_eq!(keys_s[0], Manifest::KEY);
    assert!(req_s <= 1 + 4 * picks.len(), "{req_s} requests: {keys_s:?}");
    assert!(req_s.abs_diff(req_l) <= 2, "{keys_s:?}\n{keys_l:?}");
    // The same rows hold other samples at the two sizes (the groups' boundaries move), so their blocks compress
    // to a few percent more or less and a run of adjacent blocks may share a directory request; nothing read
    // grows with the dataset, which is 10x larger here.
    let diff = bytes_s.abs_diff(bytes_l);
    assert!(
        diff * 10 <= bytes_s,
        "{bytes_s} bytes at 200 shards, {bytes_l} at 2,000"
    );
}

#[test]
fn the_lookup_serves_the_records_and_volumes_of_the_whole_table() {
    let dir = tempfile::tempdir().unwrap();
    let url = write(dir.path(), 200);
    let lazy = ShardLoader::open_lookup(&url, &[], opts(), &mut VolumeReaders::default())
        .unwrap()
        .unwrap();
    let eager = ShardLoader::open(&url, opts()).unwrap();
    assert_eq!(lazy.len(), eager.len());
    let by_id: HashMap<String, u64> = (0..eager.len() as u64)
        .map(|i| (eager.sample(i).unwrap().sample_id, i))
        .collect();
    let rows: Vec<u64> = (0..lazy.len() as u64).collect();
    let got = lazy.load(&rows).unwrap();
    let mut seen = std::collections::HashSet::new();
    for g in &got {
        let i = by_id[&g.sample.sample_id];
        assert!(seen.insert(i), "sample {} twice", g.sample.sample_id);
        let want = eager.load(&[i]).unwrap().remove(0);
        assert_eq!(g.sample, want.sample);
        assert_eq!((g.shape, &g.image), (want.shape, &want.image));
    }
    assert_eq!(seen.len(), eager.len());
    // The groups cover every row once, each row in its group's split and task.
    let groups = lazy.lookup_groups().unwrap();
    assert_eq!(
        groups.iter().map(|g| g.rows).sum::<u64>(),
        lazy.len() as u64
    );
    let mut next = 0;
    for g in groups {
        assert_eq!(g.start, next);
        next += g.rows;
        for r in lazy.records(g.start..g.start + g.rows).unwrap() {
            assert_eq!(
                (r.split.as_str(), r.task.to_string()),
                (g.split.as_str(), g.task.clone())
            );
        }
    }
    let splits: Vec<(&str, &str)> = groups
        .iter()
        .map(|g| (g.split.as_str(), g.task.as_str()))
        .collect();
    assert_eq!(
        splits,
        [
            ("test", "caption"),
            ("train", "caption"),
            ("train", "vqa_closed")
        ]
    );
    assert_eq!(groups[0].rows, 50);
    // Past the end: the error names the index.
    let err = lazy.load(&[lazy.len() as u64]).unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
}

#[test]
fn a_corrupted_lookup_block_is_an_error_naming_the_object_and_the_block() {
    let dir = tempfile::tempdir().unwrap();
    let url = write(dir.path(), 200);
    let path = dir.path().join(LOOKUP_KEY);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let lazy = ShardLoader::open_lookup(&url, &[], opts(), &mut VolumeReaders::default())
        .unwrap()
        .unwrap();
    let err = lazy.load(&[0]).unwrap_err().to_string();
    assert!(
        err.contains(LOOKUP_KEY) && err.contains("block 0") && err.contains("crc32"),
        "{err}"
    );
    // Rows of other blocks still serve.
    assert_eq!(lazy.load(&[399]).unwrap().len(), 1);
}

#[test]
fn a_dataset_without_a_lookup_opens_the_whole_table_way() {
    let dir = tempfile::tempdir().unwrap();
    let url = write(dir.path(), 4);
    let store = Store::open(&url).unwrap();
    let mut manifest = Manifest::load(&store).unwrap();
    manifest.sample_lookup = None;
    manifest.save(&store).unwrap();
    assert!(
        ShardLoader::open_lookup(&url, &[], opts(), &mut VolumeReaders::default())
            .unwrap()
            .is_none()
    );
}

/// A sample-only dataset whose samples name the volumes of `cap` (as M3D-VQA's name M3D-Cap's), its lookup
/// written with Cap's volume places (as `m3d data-prep vqa --cap` writes it).
fn write_vqa(dir: &std::path::Path, cap: &str, volumes: usize) -> String {
    let url = dir.to_str().unwrap_or_default().to_string();
    let store = Store::open(&url).unwrap();
    let samples: Vec<SampleRecord> = samples(volumes)
        .into_iter()
        .filter(|s| s.task == Task::VqaClosed)
        .map(|mut s| {
            s.sample_id = format!("vqa-{}", s.sample_id);
            s.dataset = "vqa".into();
            s
        })
        .collect();
    let mut manifest = m3d_shards::write_dataset(
        &store,
        Manifest::new("vqa", "m3d-data tests"),
        &[],
        &samples,
        &WriteOptions::default(),
    )
    .unwrap();
    let foreign = ForeignVolumes::open(cap).unwrap();
    m3d_shards::lookup::write_lookup(
        &store,
        &mut manifest,
        &samples,
        &m3d_shards::VolumeIndex::default(),
        Some(&foreign),
    )
    .unwrap();
    manifest.save(&store).unwrap();
    url
}

#[test]
fn samples_naming_another_datasets_volumes_open_through_the_lookup_while_its_index_is_the_same() {
    let (cap_dir, vqa_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cap = write(cap_dir.path(), 200);
    let vqa = write_vqa(vqa_dir.path(), &cap, 200);
    let volumes = [cap.clone()];

    let (store, log) = Store::open_existing(&vqa).unwrap().with_io_log();
    let lazy = ShardLoader::open_lookup_in(store, &volumes, opts(), &mut VolumeReaders::default())
        .unwrap()
        .expect("the lookup locates Cap's volumes");
    let rows: Vec<u64> = (0..lazy.len() as u64).collect();
    let got = lazy.load(&rows).unwrap();
    // Nothing of VQA but its manifest and lookup; Cap's manifest is read through another store handle.
    let keys: Vec<String> = log.events().into_iter().map(|e| e.key).collect();
    assert!(
        keys.iter()
            .all(|k| k == Manifest::KEY || k == LOOKUP_KEY || k.starts_with("volumes/")),
        "{keys:?}"
    );
    let eager = ShardLoader::open_with_volumes(&vqa, &volumes, opts()).unwrap();
    let by_id: HashMap<String, u64> = (0..eager.len() as u64)
        .map(|i| (eager.sample(i).unwrap().sample_id, i))
        .collect();
    assert_eq!(got.len(), eager.len());
    for g in &got {
        let want = eager.load(&[by_id[&g.sample.sample_id]]).unwrap().remove(0);
        assert_eq!(g.sample, want.sample);
        assert_eq!((g.shape, &g.image), (want.shape, &want.image));
    }

    // Without the volumes dataset, a sample's volume is named as not found.
    let alone = ShardLoader::open_lookup(&vqa, &[], opts(), &mut VolumeReaders::default())
        .unwrap()
        .unwrap();
    let err = alone.load(&[0]).unwrap_err().to_string();
    assert!(
        err.contains("case_") && err.contains("no volume shard"),
        "{err}"
    );

    // Cap converted again (another index): the places may point elsewhere, so the lookup is not used.
    std::fs::remove_dir_all(cap_dir.path()).unwrap();
    write(cap_dir.path(), 201);
    assert!(
        ShardLoader::open_lookup(&vqa, &volumes, opts(), &mut VolumeReaders::default())
            .unwrap()
            .is_none()
    );
}

#[test]
fn read_ahead_resolves_lookup_rows_off_the_callers_thread_and_the_load_then_reads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let url = write(dir.path(), 200);
    let (store, log) = Store::open_existing(&url).unwrap().with_io_log();
    let opts = LoaderOptions {
        cache_bytes: 1 << 20,
        prefetch_depth: 2,
    };
    let loader = ShardLoader::open_lookup_in(store, &[], opts, &mut VolumeReaders::default())
        .unwrap()
        .unwrap();
    let rows: Vec<u64> = (0..8).map(|k| k * 47 + 3).collect();
    log.clear();
    assert!(loader.prefetch(&rows).unwrap());
    loader.wait_prefetched();
    assert_eq!(loader.last_prefetch_error(), None);
    let read_ahead = log.events().len();
    assert!(read_ahead > 0);
    log.clear();
    let got = loader.load(&rows).unwrap();
    assert_eq!(got.len(), rows.len());
    assert_eq!(
        log.events().len(),
        0,
        "the load read again: {:?}",
        log.events()
    );
    // An index past the end is refused when queued.
    assert!(loader.prefetch(&[400]).is_err());
}
