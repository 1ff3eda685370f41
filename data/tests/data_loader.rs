//! `ShardLoader` on a tiny synthetic dataset written with `m3d-shards` directly: same values as the shard
//! crate's own decoding, store reads bounded by distinct volumes (ranged reads through the volume index), eviction
//! under a small cache, errors that name the sample or volume, and read-ahead observed through the loader's counters.

use m3d_data::loader::{LoadError, LoaderOptions, ShardLoader, VolumeReaders};
use m3d_shards::encode::{encode_image, pack_mask};
use m3d_shards::manifest::volume_shard_key;
use m3d_shards::{
    decode_sample_into, ImageDtype, Manifest, MaskRecord, SampleRecord, ShardDataset, Store, Task,
    VolumeRecord, WriteOptions,
};

const SHAPE: [u32; 4] = [1, 2, 4, 4];
const SHARDS: usize = 3;
const PER_SHARD: usize = 2;

fn volume(s: usize, v: usize) -> VolumeRecord {
    let n: usize = SHAPE.iter().map(|&x| x as usize).product();
    let spatial = n;
    let image: Vec<f32> = (0..n)
        .map(|i| ((i * 7 + s * 13 + v * 29) % 31) as f32 / 30.0)
        .collect();
    let dtype = if s % 2 == 0 {
        ImageDtype::F16
    } else {
        ImageDtype::U8
    };
    let bytes = encode_image(&image, dtype);
    let masks = (0..2)
        .map(|k| {
            let m: Vec<u8> = (0..spatial)
                .map(|i| u8::from((i + k + s + v) % 3 == 0))
                .collect();
            let (bits, voxels) = pack_mask(&m);
            MaskRecord {
                class_index: k as u32 + 1,
                label: format!("class {k}"),
                voxels,
                bits,
            }
        })
        .collect();
    VolumeRecord {
        volume_id: format!("{s:03}/case_{v}"),
        dataset: "seg".into(),
        source: format!("synthetic/{s}/{v}"),
        shape: SHAPE,
        dtype,
        image_crc32: VolumeRecord::crc32(&bytes),
        image: bytes.into(),
        masks,
    }
}

fn sample(i: usize, volume_id: &str) -> SampleRecord {
    SampleRecord {
        sample_id: format!("s{i:03}"),
        dataset: "seg".into(),
        task: Task::Seg,
        split: "train".into(),
        volume_id: volume_id.to_string(),
        mask_index: (i % 2 == 0).then_some((i as u32 / 2) % 2),
        question: None,
        answer: Some(format!("answer {i}")),
        answer_choice: None,
        question_type: None,
        class_name: Some("liver".into()),
        bbox: None,
        report: None,
        source_row: None,
    }
}

/// Writes 3 volume shards of 2 volumes and 12 samples (2 per volume); returns the dataset URL.
fn write_dataset(dir: &std::path::Path) -> String {
    let url = dir.to_str().unwrap_or_default().to_string();
    let shards: Vec<Vec<VolumeRecord>> = (0..SHARDS)
        .map(|s| (0..PER_SHARD).map(|v| volume(s, v)).collect())
        .collect();
    let mut samples = Vec::new();
    for v in shards.iter().flatten() {
        for _ in 0..2 {
            samples.push(sample(samples.len(), &v.volume_id));
        }
    }
    let opts = WriteOptions {
        rows_per_row_group: 1,
        ..Default::default()
    };
    let manifest = Manifest::new("seg", "m3d-worker tests");
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

/// Volumes in the dataset (two samples each).
const VOLUMES: u64 = (SHARDS * PER_SHARD) as u64;

/// The reference: decode sample `i` through `ShardDataset` alone.
fn reference(ds: &ShardDataset, i: usize) -> (Vec<f32>, Option<Vec<f32>>) {
    let s = &ds.samples()[i];
    let vol = (0..ds.num_volume_shards())
        .flat_map(|k| ds.stream_volumes(k).unwrap())
        .map(|r| r.unwrap())
        .find(|r| r.volume_id == s.volume_id)
        .unwrap();
    let mut image = vec![0.0; vol.numel()];
    let mut mask = s.mask_index.map(|_| vec![0.0; vol.spatial_numel()]);
    decode_sample_into(
        &vol,
        s.mask_index,
        None,
        &mut Vec::new(),
        &mut image,
        mask.as_deref_mut(),
    )
    .unwrap();
    (image, mask)
}

fn opts(cache_bytes: usize, prefetch_depth: usize) -> LoaderOptions {
    LoaderOptions {
        cache_bytes,
        prefetch_depth,
    }
}

#[test]
fn matches_shard_dataset_decoding_with_one_read_per_distinct_volume() {
    let dir = tempfile::tempdir().unwrap();
    let url = write_dataset(dir.path());
    let ds = ShardDataset::open(&url).unwrap();
    let loader = ShardLoader::open(&url, opts(1 << 20, 0)).unwrap();
    assert_eq!(loader.len(), SHARDS * PER_SHARD * 2);
    assert_eq!(loader.stats().volume_reads, 0, "opening reads no volume");

    // Every sample, shuffled, with a repeat: every volume, each read once.
    let indices: Vec<u64> = vec![11, 0, 5, 6, 1, 10, 3, 2, 9, 4, 8, 7, 0];
    let got = loader.load(&indices).unwrap();
    assert_eq!(got.len(), indices.len());
    for (g, &i) in got.iter().zip(&indices) {
        assert_eq!(g.index, i);
        assert_eq!(&g.sample, &ds.samples()[i as usize]);
        assert_eq!(g.shape, [1, 2, 4, 4]);
        let (image, mask) = reference(&ds, i as usize);
        assert_eq!(g.image, image, "image of sample {i}");
        assert_eq!(g.mask, mask, "mask of sample {i}");
    }
    assert!(got.iter().any(|g| g.mask.is_some()) && got.iter().any(|g| g.mask.is_none()));
    let st = loader.stats();
    assert_eq!(st.volume_reads, VOLUMES);
    assert_eq!(st.cache_misses, VOLUMES);
    // The volumes of a shard are adjacent row groups: one request each shard brings all of them.
    assert_eq!(st.requests, SHARDS as u64, "{st:?}");

    // Again: all from the cache, identical output.
    let again = loader.load(&indices).unwrap();
    assert_eq!(again, got);
    let st = loader.stats();
    assert_eq!(st.volume_reads, VOLUMES);
    assert_eq!(st.cache_hits, VOLUMES);
    assert_eq!(st.evictions, 0);
}

#[test]
fn a_cache_smaller_than_the_working_set_evicts_and_stays_correct() {
    let dir = tempfile::tempdir().unwrap();
    let url = write_dataset(dir.path());
    let big = ShardLoader::open(&url, opts(1 << 20, 0)).unwrap();
    let all: Vec<u64> = (0..big.len() as u64).collect();
    let expected = big.load(&all).unwrap();
    let one_volume = big.cached_bytes() / VOLUMES as usize;
    assert!(one_volume > 0);

    // Room for about one volume (volumes with masks are larger than those without, so two small ones may fit).
    let cap = one_volume + one_volume / 2;
    let small = ShardLoader::open(&url, opts(cap, 0)).unwrap();
    // Within one call each volume is still read only once.
    assert_eq!(small.load(&all).unwrap(), expected);
    assert_eq!(small.stats().volume_reads, VOLUMES);
    assert!(small.cached_bytes() <= cap);
    assert!((1..=2).contains(&small.cached_volumes().len()));
    assert!(small.stats().evictions >= VOLUMES - 2);
    // Per-sample calls over the whole dataset twice: volumes are evicted and re-read, values unchanged.
    for _ in 0..2 {
        for &i in &all {
            let got = small.load(&[i]).unwrap();
            assert_eq!(got[0], expected[i as usize], "sample {i}");
        }
    }
    let st = small.stats();
    assert!(st.volume_reads > VOLUMES + 1, "expected re-reads, {st:?}");
    assert!(small.cached_bytes() <= one_volume + one_volume / 2);

    // A zero-byte cache keeps nothing but still serves.
    let none = ShardLoader::open(&url, opts(0, 0)).unwrap();
    assert_eq!(none.load(&all).unwrap(), expected);
    assert!(none.cached_volumes().is_empty());
}

#[test]
fn a_missing_sample_index_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = write_dataset(dir.path());
    let loader = ShardLoader::open(&url, opts(1 << 20, 1)).unwrap();
    let err = loader.load(&[0, 1, 12]).unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::SampleOutOfRange {
                index: 12,
                len: 12,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("sample index 12"), "{err}");
    // Nothing was read for the failed batch.
    assert_eq!(loader.stats().volume_reads, 0);
    assert!(loader.prefetch(&[u64::MAX]).is_err());
}

#[test]
fn a_corrupted_volume_is_an_error_naming_it_and_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    let url = write_dataset(dir.path());
    let loader = ShardLoader::open(&url, opts(1 << 20, 0)).unwrap();
    // Flip a byte inside volume 2's own bytes (shard 1, samples 4 and 5).
    let index = ShardDataset::open(&url).unwrap().volume_index().unwrap();
    let loc = index.volumes[2].clone();
    let key = volume_shard_key(1);
    let path = dir.path().join(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(loc.bytes.offset + loc.bytes.length / 2) as usize] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    // Other volumes, of the same shard too, still serve: each is checked on its own.
    assert_eq!(loader.load(&[0, 1, 6]).unwrap().len(), 3);
    let err = loader.load(&[4]).unwrap_err();
    assert!(
        matches!(&err, LoadError::Volume { key: k, volume_id, .. } if *k == key && *volume_id == loc.volume_id),
        "{err:?}"
    );
    assert!(err.to_string().contains(&key), "{err}");
    assert!(err.to_string().contains("checksum"), "{err}");
}

fn plain_load(url: &str, indices: &[u64]) -> Vec<m3d_data::loader::LoadedSample> {
    ShardLoader::open(url, opts(1 << 20, 0))
        .unwrap()
        .load(indices)
        .unwrap()
}

#[test]
fn prefetch_fills_the_cache_so_the_next_load_hits() {
    let dir = tempfile::tempdir().unwrap();
    let url = write_dataset(dir.path());
    let loader = ShardLoader::open(&url, opts(1 << 20, 2)).unwrap();
    // Step 0 touches volumes 0 and 1; step 1 (announced ahead) touches volumes 2 and 4.
    let step0 = [0u64, 3];
    let step1 = [4u64, 9, 5];
    assert!(loader.prefetch(&step1).unwrap());
    let first = loader.load(&step0).unwrap();
    assert_eq!(first.len(), 2);
    loader.wait_prefetched();
    assert_eq!(loader.last_prefetch_error(), None);
    let before = loader.stats();
    assert_eq!(before.prefetch_reads, 2);
    let second = loader.load(&step1).unwrap();
    let after = loader.stats();
    assert_eq!(after.volume_reads, before.volume_reads, "{after:?}");
    assert_eq!(after.cache_misses, before.cache_misses);
    assert_eq!(after.cache_hits, before.cache_hits + 2);
    // A request touching every volume of a new loader (a cold start) reads them concurrently, each once.
    let cold = ShardLoader::open(&url, opts(1 << 20, 2)).unwrap();
    let all: Vec<u64> = (0..cold.len() as u64).rev().collect();
    assert!(cold.prefetch(&all).unwrap());
    cold.wait_prefetched();
    assert_eq!(cold.last_prefetch_error(), None);
    let volumes = cold.num_volumes() as u64;
    assert_eq!(volumes, VOLUMES);
    let st = cold.stats();
    assert_eq!(
        (st.prefetch_reads, st.volume_reads),
        (volumes, volumes),
        "{st:?}"
    );
    assert_eq!(cold.load(&all).unwrap(), plain_load(&url, &all));
    assert_eq!(cold.stats().cache_misses, 0);
    // Same values as a loader that never prefetched.
    let plain = ShardLoader::open(&url, opts(1 << 20, 0)).unwrap();
    assert_eq!(plain.load(&step1).unwrap(), second);
    assert_eq!(plain.load(&step0).unwrap(), first);
    // Read-ahead disabled: requests are dropped, counted.
    assert!(!plain.prefetch(&step1).unwrap());
    assert_eq!(plain.stats().prefetch_dropped, 1);
}

/// Read-ahead fetches a small shard (under 1 MiB) whole with one request and keeps its bytes: the loads of
/// the shard's other volumes then decode from them without a request. Loads alone read only their own bytes.
#[test]
fn read_ahead_reads_a_small_shard_whole_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = write_dataset(dir.path());
    // Samples 0..4 are shard 0's two volumes (two samples each).
    let loader = ShardLoader::open(&url, opts(1 << 20, 2)).unwrap();
    assert!(loader.prefetch(&[0]).unwrap());
    loader.wait_prefetched();
    assert_eq!(loader.last_prefetch_error(), None);
    assert_eq!(loader.stats().requests, 1);
    let got = loader.load(&[3, 1, 2]).unwrap();
    let st = loader.stats();
    assert_eq!(
        st.requests, 1,
        "the second volume came from the kept shard: {st:?}"
    );
    assert_eq!(st.volume_reads, 2, "{st:?}");
    assert_eq!(got, plain_load(&url, &[3, 1, 2]));
    // The other shards were never fetched: loading them costs a request each (their two volumes adjacent).
    loader.load(&[4, 6, 8, 10]).unwrap();
    assert_eq!(loader.stats().requests, 3);

    // Measured in bytes on the store: the whole shard once, nothing more for its other volume.
    let (store, log) = Store::open(&url).unwrap().with_io_log();
    let ds = ShardDataset::open_store(store).unwrap();
    let reader = m3d_shards::VolumeReader::open(&ds).unwrap();
    let whole = reader.fetch_shard(0).unwrap();
    assert_eq!(whole.len() as u64, reader.shard_bytes(0).unwrap());
    let before = log.events().len();
    let span = reader.spans(&[0, 1]).unwrap().remove(0);
    let records = reader.read_span_from(&span, &whole, true, true).unwrap();
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|(_, r)| r.is_ok()));
    assert_eq!(
        log.events().len(),
        before,
        "decoded from the whole shard, no request"
    );
}

/// A sample-only dataset whose volumes are in another (M3D-VQA's on M3D-Cap's): the samples decode as the
/// volume dataset's own samples of the same volume do, and the volume dataset is opened for its index alone
/// (`ShardDataset::open_for_volumes`: its sample table, which would only take memory, is not read — a corrupt
/// one does not stop the loader).
#[test]
fn volumes_from_another_dataset_are_read_without_its_sample_table() {
    let dir = tempfile::tempdir().unwrap();
    let cap = write_dataset(&dir.path().join("cap"));
    let reference_ds = ShardDataset::open(&cap).unwrap();
    let vqa = dir.path().join("vqa").to_str().unwrap().to_string();
    let samples: Vec<SampleRecord> = reference_ds
        .samples()
        .iter()
        .map(|s| SampleRecord {
            dataset: "vqa".into(),
            task: Task::VqaOpen,
            question: Some("where?".into()),
            answer: Some("here".into()),
            mask_index: None,
            ..s.clone()
        })
        .collect();
    m3d_shards::write_dataset(
        &Store::open(&vqa).unwrap(),
        Manifest::new("vqa", "m3d-data tests"),
        &[],
        &samples,
        &WriteOptions::default(),
    )
    .unwrap();

    let for_volumes = ShardDataset::open_for_volumes(&cap).unwrap();
    assert!(for_volumes.samples().is_empty());
    assert_eq!(
        for_volumes.volume_index().unwrap().volumes.len() as u64,
        VOLUMES
    );
    // The cap dataset's sample shard garbled: opening it for its samples fails, for its volumes does not.
    let manifest = reference_ds.manifest();
    let key = &manifest.sample_shards[0].key;
    std::fs::write(dir.path().join("cap").join(key), b"not parquet").unwrap();
    assert!(ShardDataset::open(&cap).is_err());

    let loader =
        ShardLoader::open_with_volumes(&vqa, std::slice::from_ref(&cap), opts(1 << 20, 0)).unwrap();
    let table: Vec<SampleRecord> = loader.samples().iter().map(Result::unwrap).collect();
    assert_eq!(table, samples);
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(&loader.sample(i as u64).unwrap(), s);
    }
    let indices: Vec<u64> = (0..samples.len() as u64).collect();
    for g in loader.load(&indices).unwrap() {
        let (image, _) = reference(&reference_ds, g.index as usize);
        assert_eq!(g.image, image, "image of sample {}", g.index);
        assert_eq!(g.mask, None);
    }
    assert_eq!(loader.stats().volume_reads, VOLUMES);

    // Loaders of one training set share the volume readers: cap's index is held once for both.
    let mut readers = VolumeReaders::default();
    let vqa_loader = ShardLoader::open_sharing(
        &vqa,
        std::slice::from_ref(&cap),
        opts(1 << 20, 0),
        &mut readers,
    )
    .unwrap();
    assert_eq!(readers.len(), 2, "vqa's (empty) index and cap's");
    std::fs::write(dir.path().join("cap").join(key), b"still not parquet").unwrap();
    // Cap's own loader would need its (garbled) sample table; its volume index is taken from `readers`.
    assert!(ShardLoader::open_sharing(&cap, &[], opts(1 << 20, 0), &mut readers).is_err());
    assert_eq!(readers.len(), 2);
    let got = vqa_loader.load(&[0, 5]).unwrap();
    assert_eq!(got.len(), 2);
}
