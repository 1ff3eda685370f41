//! Dataset-level integrity on a local store: a clean dataset reads back and verifies; a flipped byte in a
//! shard, a corrupted image inside a valid shard and a newer manifest are each refused with an error
//! that names the culprit.
mod common;

use m3d_shards::dataset::ShardKind;
use m3d_shards::{Manifest, ShardDataset, ShardError, Store, VolumeRecord};

#[test]
fn clean_dataset_reads_back_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    let (shards, samples) = common::small_dataset(30);
    let manifest = common::write_dataset(&store, &shards, &samples);
    assert_eq!(manifest.totals.volumes, 6);
    assert_eq!(manifest.totals.samples, 12);
    let listed = store.list("").unwrap();
    assert_eq!(
        manifest.totals.bytes,
        listed
            .iter()
            .filter(|(k, _)| {
                ![
                    Manifest::KEY,
                    m3d_shards::INDEX_KEY,
                    m3d_shards::SHARD_LIST_KEY,
                    m3d_shards::LOOKUP_KEY,
                ]
                .contains(&k.as_str())
            })
            .map(|(_, n)| n)
            .sum::<u64>(),
        "totals count the shards (the index, lookup and shard list are listed on their own)"
    );

    let ds = ShardDataset::open(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(ds.manifest(), &manifest);
    assert_eq!(ds.samples(), samples.as_slice());
    for (n, expected) in shards.iter().enumerate() {
        let got: Vec<VolumeRecord> = ds.stream_volumes(n).unwrap().map(Result::unwrap).collect();
        assert_eq!(&got, expected);
    }
    assert!(ds.stream_volumes(2).is_err());
    let by_volume = ds.samples_by_volume();
    assert_eq!(
        by_volume.values().map(Vec::len).sum::<usize>(),
        samples.len()
    );
    let report = ds.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(
        report.shards.len(),
        4,
        "2 volume shards, 1 sample shard, the lookup"
    );
    assert_eq!(
        manifest.counts["seg"]["train"] + manifest.counts["seg"]["test"],
        6
    );
}

#[test]
fn flipped_shard_byte_is_a_checksum_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    let (shards, samples) = common::small_dataset(31);
    common::write_dataset(&store, &shards, &samples);
    let key = "volumes/part-00001.parquet";
    let path = dir.path().join(key);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();

    let ds = ShardDataset::open(dir.path().to_str().unwrap()).unwrap();
    assert!(ds.stream_volumes(0).is_ok());
    let err = ds.stream_volumes(1).unwrap_err();
    assert!(matches!(err, ShardError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains(key), "{err}");

    let report = ds.verify().unwrap();
    assert!(!report.is_ok());
    let bad: Vec<_> = report.failures().collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].key, key);
    assert_eq!(bad[0].kind, ShardKind::Volumes);
    assert!(!bad[0].sha256_ok);

    // A corrupted sample shard already fails opening.
    let spath = dir.path().join("samples/part-00000.parquet");
    let mut sb = std::fs::read(&spath).unwrap();
    sb[10] ^= 0x80;
    std::fs::write(&spath, sb).unwrap();
    let err = ShardDataset::open(dir.path().to_str().unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("samples/part-00000.parquet"),
        "{err}"
    );
}

#[test]
fn verify_reports_a_corrupted_sample_lookup_and_a_corrupted_shard_list_fails_loading() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    let (shards, samples) = common::small_dataset(35);
    common::write_dataset(&store, &shards, &samples);
    let ds = ShardDataset::open(dir.path().to_str().unwrap()).unwrap();
    let report = ds.verify().unwrap();
    assert!(report.is_ok());
    let lookup = report
        .shards
        .iter()
        .find(|c| c.kind == ShardKind::Lookup)
        .expect("verify checks the lookup");
    assert_eq!(lookup.rows, samples.len() as u64);

    let path = dir.path().join(m3d_shards::LOOKUP_KEY);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[5] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let report = ds.verify().unwrap();
    let bad: Vec<_> = report.failures().collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(
        (bad[0].kind, bad[0].key.as_str(), bad[0].sha256_ok),
        (ShardKind::Lookup, m3d_shards::LOOKUP_KEY, false)
    );
    assert!(
        bad[0].errors.iter().any(|e| e.contains("(block 0)")),
        "{:?}",
        bad[0].errors
    );

    let list = dir.path().join(m3d_shards::SHARD_LIST_KEY);
    let mut bytes = std::fs::read(&list).unwrap();
    bytes[3] ^= 0x01;
    std::fs::write(&list, bytes).unwrap();
    let err = ShardDataset::open(dir.path().to_str().unwrap()).unwrap_err();
    assert!(matches!(err, ShardError::Checksum { .. }), "{err}");
    assert!(
        err.to_string().contains(m3d_shards::SHARD_LIST_KEY),
        "{err}"
    );
}

#[test]
fn flipped_image_byte_inside_a_valid_shard_is_a_crc_error_naming_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    let (mut shards, samples) = common::small_dataset(32);
    // The crc was computed when the image was encoded; flip one image byte afterwards, then write a
    // well-formed shard (and manifest sha256) around the corrupted image.
    let victim = shards[0][1].volume_id.clone();
    let mut image = shards[0][1].image.to_vec();
    image[17] ^= 0x04;
    shards[0][1].image = image.into();
    common::write_dataset(&store, &shards, &samples);

    let ds = ShardDataset::open(dir.path().to_str().unwrap()).unwrap();
    let results: Vec<_> = ds.stream_volumes(0).unwrap().collect();
    assert_eq!(
        results.len(),
        3,
        "rows after the corrupted one are still returned"
    );
    assert!(results[0].is_ok() && results[2].is_ok());
    let err = results[1].as_ref().unwrap_err();
    assert!(matches!(err, ShardError::ImageCrc { row: 1, .. }), "{err}");
    assert!(err.to_string().contains(&victim), "{err}");

    // A ranged read of the volume (the worker's path) checks the same crc.
    let reader = m3d_shards::VolumeReader::open(&ds).unwrap();
    let err = reader
        .read(reader.locate(&victim).unwrap(), true, false)
        .unwrap_err();
    assert!(matches!(err, ShardError::ImageCrc { row: 1, .. }), "{err}");
    assert!(err.to_string().contains(&victim), "{err}");

    // Without images there is nothing to check, so the row reads.
    assert!(ds
        .stream_volumes(0)
        .unwrap()
        .with_images(false)
        .all(|r| r.is_ok()));

    let report = ds.verify().unwrap();
    let bad: Vec<_> = report.failures().collect();
    assert_eq!(bad.len(), 1);
    assert!(bad[0].sha256_ok);
    assert_eq!(bad[0].bad_volumes, vec![victim]);
}

#[test]
fn newer_manifest_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    let (shards, samples) = common::small_dataset(33);
    let manifest = common::write_dataset(&store, &shards, &samples);
    let mut json: serde_json::Value = serde_json::from_slice(&manifest.to_json().unwrap()).unwrap();
    json["schema_version"] = serde_json::json!(m3d_shards::MANIFEST_VERSION + 1);
    // A newer version may also change fields; the version must be reported, not a field mismatch.
    json["volume_shards"] = serde_json::json!("a future layout");
    store
        .put(Manifest::KEY, serde_json::to_vec(&json).unwrap().into())
        .unwrap();
    let err = ShardDataset::open(dir.path().to_str().unwrap()).unwrap_err();
    assert!(
        matches!(
            err,
            ShardError::SchemaVersion {
                found: 3,
                supported: 2,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("manifest.json") && msg.contains("version 3") && msg.contains("upgrade"),
        "{msg}"
    );

    json["schema_version"] = serde_json::json!(1);
    json["format"] = serde_json::json!("something-else");
    store
        .put(Manifest::KEY, serde_json::to_vec(&json).unwrap().into())
        .unwrap();
    let err = ShardDataset::open(dir.path().to_str().unwrap()).unwrap_err();
    assert!(err.to_string().contains("something-else"), "{err}");

    store.delete(Manifest::KEY).unwrap();
    let err = ShardDataset::open(dir.path().to_str().unwrap()).unwrap_err();
    assert!(
        matches!(
            err,
            ShardError::Store(m3d_store::StoreError::NotFound { .. })
        ) && err.to_string().contains("manifest.json"),
        "{err}"
    );
}
