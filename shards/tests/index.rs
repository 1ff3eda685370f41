//! The volume index: opening a dataset reads no volume shard, one volume costs its own bytes (plus its shard's
//! footer once), datasets without an index are named with the command that fixes them, and `reindex` rebuilds
//! exactly the index a conversion writes. Reads are counted with the store's I/O log.

mod common;

use m3d_shards::manifest::{sample_shard_key, volume_shard_key};
use m3d_shards::{
    reindex, ImageDtype, Manifest, SampleRecord, ShardDataset, ShardError, Store, Task,
    VolumeReader, VolumeRecord, WriteOptions, INDEX_KEY,
};

/// Writes `shards` volume shards of `per_shard` volumes of `shape` (u8, random: compresses poorly, as CT
/// does under LZ4), two samples per volume, with the index unless `index` is false. Returns the volumes.
fn write(
    store: &Store,
    shards: usize,
    per_shard: usize,
    shape: [u32; 4],
    index: bool,
) -> Vec<VolumeRecord> {
    let mut rng = common::rng(7);
    let volume_shards: Vec<Vec<VolumeRecord>> = (0..shards)
        .map(|s| {
            (0..per_shard)
                .map(|v| {
                    let id = format!("vol-{s:04}-{v}");
                    common::synthetic_volume(&mut rng, &id, shape, ImageDtype::U8, 0).record
                })
                .collect()
        })
        .collect();
    let mut samples: Vec<SampleRecord> = Vec::new();
    for v in volume_shards.iter().flatten() {
        for _ in 0..2 {
            samples.push(common::sample(samples.len(), &v.volume_id, Task::Caption));
        }
    }
    let manifest = Manifest::new("cap", "m3d-shards index tests");
    let mut manifest = m3d_shards::write_dataset(
        store,
        manifest,
        &volume_shards,
        &samples,
        &WriteOptions::default(),
    )
    .unwrap();
    if !index {
        // As a dataset converted before the index existed.
        manifest.volume_index = None;
        manifest.sample_lookup = None;
        manifest.save(store).unwrap();
        store.delete(INDEX_KEY).unwrap();
        store.delete(m3d_shards::LOOKUP_KEY).unwrap();
    }
    volume_shards.into_iter().flatten().collect()
}

#[test]
fn opening_reads_no_volume_shard_and_a_volume_costs_its_own_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().to_str().unwrap();
    let vols = write(&Store::open(url).unwrap(), 200, 1, [1, 4, 32, 32], true);

    let (store, log) = Store::open_existing(url).unwrap().with_io_log();
    let ds = ShardDataset::open_store(store).unwrap();
    let reader = VolumeReader::open(&ds).unwrap();
    assert_eq!(reader.len(), 200);
    let events = log.events();
    assert!(
        events.iter().all(|e| !e.key.starts_with("volumes/")),
        "opening read a volume shard: {events:?}"
    );
    let keys: Vec<&str> = events.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "manifest.json",
            m3d_shards::SHARD_LIST_KEY,
            &sample_shard_key(0),
            INDEX_KEY
        ]
    );

    // A volume: one ranged read of its footer (first use of its shard), one of its own bytes.
    log.clear();
    let i = reader.locate("vol-0123-0").unwrap();
    let got = reader.read(i, true, true).unwrap();
    assert_eq!(got, vols[123]);
    let events = log.events();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events
        .iter()
        .all(|e| e.op == "get_range" && e.key == volume_shard_key(123)));
    // Its shard again: the footer is kept.
    log.clear();
    reader.read(i, true, true).unwrap();
    assert_eq!(log.events().len(), 1);
}

#[test]
fn a_volume_read_fetches_at_most_a_tenth_more_than_its_compressed_bytes() {
    // 8 volumes of 1x16x64x64 per shard: a shard is 8 volumes, a read should be one of them.
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().to_str().unwrap();
    let vols = write(&Store::open(url).unwrap(), 4, 8, [1, 16, 64, 64], true);
    let (store, log) = Store::open_existing(url).unwrap().with_io_log();
    let ds = ShardDataset::open_store(store).unwrap();
    let reader = VolumeReader::open(&ds).unwrap();
    let shard_bytes = ds.manifest().volume_shards[2].bytes;
    log.clear();
    for v in 0..8 {
        let i = reader.locate(&format!("vol-0002-{v}")).unwrap();
        assert_eq!(reader.read(i, true, true).unwrap(), vols[16 + v]);
    }
    // The volume's compressed bytes: its image column chunk and the few small columns of its row.
    let compressed: u64 = (0..8)
        .map(|v| {
            reader
                .location(reader.locate(&format!("vol-0002-{v}")).unwrap())
                .unwrap()
                .bytes
                .length
        })
        .sum();
    let (requests, fetched) = log.totals(&volume_shard_key(2));
    assert_eq!(requests, 9, "one footer, eight volumes");
    assert!(
        fetched as f64 <= 1.1 * compressed as f64,
        "fetched {fetched} bytes for volumes of {compressed} compressed bytes"
    );
    // And the range is the volume, not the shard.
    let one = reader.location(0).unwrap().bytes.length;
    assert!(
        one * 6 < shard_bytes,
        "one volume {one} of a {shard_bytes}-byte shard"
    );
}

#[test]
fn a_dataset_without_an_index_names_reindex_and_reindex_restores_the_conversion_index() {
    let dir = tempfile::tempdir().unwrap();
    let with = dir.path().join("with");
    let without = dir.path().join("without");
    let (with, without) = (with.to_str().unwrap(), without.to_str().unwrap());
    write(&Store::open(with).unwrap(), 3, 4, [1, 4, 16, 16], true);
    let vols = write(&Store::open(without).unwrap(), 3, 4, [1, 4, 16, 16], false);

    let ds = ShardDataset::open(without).unwrap();
    let err = VolumeReader::open(&ds).unwrap_err();
    assert!(matches!(err, ShardError::NoIndex { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("m3d data-prep reindex {without}")),
        "{err}"
    );

    let report = reindex(&Store::open_existing(without).unwrap()).unwrap();
    assert_eq!(
        (report.shards, report.volumes, report.replaced),
        (3, 12, false)
    );
    let rebuilt = ShardDataset::open(without).unwrap().volume_index().unwrap();
    let converted = ShardDataset::open(with).unwrap().volume_index().unwrap();
    assert_eq!(rebuilt, converted);
    let ds = ShardDataset::open(without).unwrap();
    let reader = VolumeReader::open(&ds).unwrap();
    for (i, v) in vols.iter().enumerate() {
        assert_eq!(
            &reader
                .read(reader.locate(&v.volume_id).unwrap(), true, true)
                .unwrap(),
            v,
            "volume {i}"
        );
    }

    // A damaged index is refused by its checksum, naming it.
    let path = dir.path().join("without").join(INDEX_KEY);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    let err = ShardDataset::open(without)
        .unwrap()
        .volume_index()
        .unwrap_err();
    assert!(matches!(err, ShardError::Checksum { .. }), "{err:?}");
    assert!(err.to_string().contains(INDEX_KEY), "{err}");
}

#[test]
fn a_shard_of_no_volumes_opens_and_a_shard_short_of_rows_is_named() {
    // A conversion under --skip-bad whose skipped volume was alone in its shard writes a shard of no rows.
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().to_str().unwrap();
    let store = Store::open(url).unwrap();
    let mut rng = common::rng(3);
    let vol = |id: &str, rng: &mut _| {
        common::synthetic_volume(rng, id, [1, 4, 8, 8], ImageDtype::U8, 0).record
    };
    let shards = vec![
        Vec::new(),
        vec![vol("a", &mut rng)],
        vec![vol("b", &mut rng)],
    ];
    let samples = vec![
        common::sample(0, "a", Task::Caption),
        common::sample(1, "b", Task::Caption),
    ];
    let mut manifest = m3d_shards::write_dataset(
        &store,
        Manifest::new("cap", "m3d-shards index tests"),
        &shards,
        &samples,
        &WriteOptions::default(),
    )
    .unwrap();
    let ds = ShardDataset::open(url).unwrap();
    let index = ds.volume_index().unwrap();
    assert_eq!(index.volumes.len(), 2);
    assert_eq!(ds.find_volume("b").unwrap().unwrap(), shards[2][0]);

    // The manifest claiming a volume in the empty shard: the index disagrees, naming the shard.
    manifest.volume_shards[0].rows = 1;
    manifest.save(&store).unwrap();
    let err = ShardDataset::open(url)
        .unwrap()
        .volume_index()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("volume shard 0 has 0 rows in the index, the manifest says 1"),
        "{err}"
    );
}
