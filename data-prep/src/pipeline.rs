//! The conversion engine shared by every dataset: plans volumes into shards, converts them in parallel,
//! writes each shard and then its completion record, resumes from those records, and finally writes the sample
//! shards and the manifest.
//!
//! Visibility rules (what makes a re-run safe):
//! - a volume shard is complete only once `_progress/<shard>.json` exists; a shard without it is redone;
//! - the manifest is written last, so a dataset without `manifest.json` is never read as complete;
//! - the completion record carries a fingerprint of the shard's plan (item ids and preprocessing parameters):
//!   a record from a different plan is ignored and the shard is redone.
//!
//! Memory is bounded by one shard's encoded volumes plus one working volume per thread, whatever the dataset size.
//!
//! With [`ConvertOptions::part`] only that part's contiguous range of shard numbers is converted and, instead of
//! the sample shards and manifest, a part record is written (see [`crate::parts`]); `finalize` then merges the parts
//! through the same [`finish`] as a single run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use m3d_shards::encode::ImageDtype;
use m3d_shards::manifest::{sample_shard_key, volume_shard_key, Manifest, ShardEntry, Totals};
use m3d_shards::parquet_io::{write_sample_shard, write_volume_shard, ImageCodec, WriteOptions};
use m3d_shards::schema::{MaskRecord, SampleRecord, VolumeRecord};
use m3d_shards::ForeignVolumes;
use m3d_shards::{sha256_hex, SHARD_SCHEMA_VERSION};
use m3d_shards::{shard_layout, write_index, ShardLayout, VolumeIndex};
use m3d_store::Store;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{PrepError, Result};
use crate::parts::{Part, PartRecord, PART_FORMAT};

/// Options common to every converter.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Output location: a path, `file://` or `s3://` URL.
    pub out: String,
    /// Volumes per Parquet shard.
    pub shard_volumes: usize,
    /// Samples per sample shard.
    pub shard_samples: usize,
    /// Continue past bad items, listing each in `skipped.json`; the default is to stop at the first.
    pub skip_bad: bool,
    /// Convert only the first N volumes (quick looks at a large source).
    pub limit: Option<usize>,
    /// Redo every shard even if a completion record exists.
    pub force: bool,
    /// Draw a progress bar (only on a terminal).
    pub progress: bool,
    /// Convert only this part of the shards and record it for `finalize` (see [`crate::parts`]).
    pub part: Option<Part>,
}

impl ConvertOptions {
    pub fn new(out: impl Into<String>) -> Self {
        ConvertOptions {
            out: out.into(),
            shard_volumes: 32,
            shard_samples: 200_000,
            skip_bad: false,
            limit: None,
            force: false,
            progress: false,
            part: None,
        }
    }
}

/// One input that failed and was skipped under `--skip-bad`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Skipped {
    pub item: String,
    pub error: String,
}

/// What one volume item turns into.
pub struct Converted {
    pub volume: VolumeRecord,
    pub samples: Vec<SampleRecord>,
}

/// A dataset whose volumes are converted item by item.
pub trait VolumeSource: Sync {
    type Item: Sync;
    /// Dataset name in the manifest ("cap", "seg", "refseg").
    fn dataset(&self) -> &'static str;
    /// The items in a deterministic order.
    fn items(&self) -> &[Self::Item];
    /// The volume id an item becomes (unique).
    fn item_id(&self, item: &Self::Item) -> String;
    /// Converts one item. Errors name the source file.
    fn convert(&self, item: &Self::Item) -> Result<Converted>;
    /// Preprocessing parameters, recorded in the manifest and in each shard's fingerprint.
    fn preprocessing(&self) -> serde_json::Value;
    /// Provenance of the source (root, split files and their checksums).
    fn source(&self) -> serde_json::Value;
    /// Samples that do not come from a volume item (none for most datasets).
    fn extra_samples(&self) -> Result<Vec<SampleRecord>> {
        Ok(Vec::new())
    }
    /// Inputs already rejected while planning (bad table rows under `--skip-bad`).
    fn planning_skipped(&self) -> Vec<Skipped> {
        Vec::new()
    }
}

/// The record of a converted volume: `image` encoded as `dtype`, its crc32 computed once here.
pub fn volume_record(
    volume_id: &str,
    dataset: &str,
    source: String,
    image: &m3d_volume::Volume<f32>,
    dtype: ImageDtype,
    masks: Vec<MaskRecord>,
) -> VolumeRecord {
    let encoded = m3d_shards::encode::encode_image(image.data(), dtype);
    VolumeRecord {
        volume_id: volume_id.to_string(),
        dataset: dataset.to_string(),
        source,
        shape: image.shape().map(|d| d as u32),
        dtype,
        image_crc32: crc32fast::hash(&encoded),
        image: encoded.into(),
        masks,
    }
}

/// A bit-packed binary mask (nonzero = inside); an empty mask stores no bits.
pub fn mask_record(class_index: u32, label: String, mask: &[u8]) -> MaskRecord {
    let (bits, voxels) = m3d_shards::encode::pack_mask(mask);
    MaskRecord {
        class_index,
        label,
        voxels,
        bits: if voxels == 0 { Vec::new() } else { bits },
    }
}

/// The completion record of one volume shard.
#[derive(Serialize, Deserialize)]
pub(crate) struct ShardProgress {
    pub fingerprint: String,
    pub shard: ShardEntry,
    /// The shard's rows of the volume index (absent in records written before the index existed: the shard is
    /// then read once to derive them).
    #[serde(default)]
    pub layout: Option<ShardLayout>,
    pub samples: Vec<SampleRecord>,
    pub skipped: Vec<Skipped>,
}

/// Result of a conversion.
#[derive(Debug, Serialize)]
pub struct ConvertReport {
    pub dataset: String,
    pub out: String,
    pub volumes: u64,
    pub samples: u64,
    pub bytes: u64,
    pub shards_written: usize,
    pub shards_reused: usize,
    pub skipped: Vec<Skipped>,
    pub counts: BTreeMap<String, BTreeMap<String, u64>>,
    /// The part converted (`--part I/N`): the numbers above are that part's, and the dataset is complete only once
    /// `finalize` has merged every part.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part: Option<Part>,
}

fn progress_key(shard: usize) -> String {
    format!("_progress/part-{shard:05}.json")
}

/// Converts every volume of `src` into shards under `opts.out`, resuming where a previous run stopped.
pub fn convert_volumes<S: VolumeSource>(src: &S, opts: &ConvertOptions) -> Result<ConvertReport> {
    if opts.shard_volumes == 0 || opts.shard_samples == 0 {
        return Err(PrepError::Options(
            "shard sizes must be at least 1".to_string(),
        ));
    }
    let store = Store::open(&opts.out)?;
    let mut items: Vec<&S::Item> = src.items().iter().collect();
    if let Some(limit) = opts.limit {
        items.truncate(limit);
    }
    let preprocessing = src.preprocessing();
    let n_shards = items.len().div_ceil(opts.shard_volumes);
    let shard_range = opts.part.map_or(0..n_shards, |p| p.shards(n_shards));
    if let Some(part) = opts.part {
        // The dataset is incomplete until finalize: a manifest from an earlier conversion would list shards this
        // part is about to replace.
        if store.size(Manifest::KEY)?.is_some() {
            tracing::info!(part = %part, "removing manifest.json: the dataset is incomplete until `finalize`");
            store.delete(Manifest::KEY)?;
        }
        crate::parts::warn_other_counts(&store, part)?;
    }
    let part_items = shard_range.start * opts.shard_volumes
        ..(shard_range.end * opts.shard_volumes).min(items.len());
    let bar = crate::progress::bar(part_items.len() as u64, src.dataset(), opts.progress);
    let write_opts = WriteOptions::default();

    // Every shard's completion record, its index rows always filled in.
    let mut done_shards: Vec<ShardProgress> = Vec::with_capacity(shard_range.len());
    let (mut written, mut reused) = (0usize, 0usize);
    for shard in shard_range.clone() {
        let chunk =
            &items[shard * opts.shard_volumes..((shard + 1) * opts.shard_volumes).min(items.len())];
        let ids: Vec<String> = chunk.iter().map(|it| src.item_id(it)).collect();
        let fingerprint = sha256_hex(
            serde_json::json!({
                "schema": SHARD_SCHEMA_VERSION,
                "dataset": src.dataset(),
                "preprocessing": preprocessing,
                "ids": ids,
            })
            .to_string()
            .as_bytes(),
        );
        if !opts.force {
            if let Some(done) = load_progress(&store, shard, &fingerprint)? {
                bar.inc(chunk.len() as u64);
                let layout = match done.layout {
                    Some(l) => l,
                    None => {
                        let bytes = m3d_shards::fetch_checked(&store, &done.shard)?;
                        shard_layout(&bytes, &done.shard.key, shard as u32)?
                    }
                };
                reused += 1;
                done_shards.push(ShardProgress {
                    layout: Some(layout),
                    ..done
                });
                continue;
            }
        }
        let (records, shard_samples, shard_skipped) = convert_chunk(src, chunk, opts, &bar)?;
        // LZ4 where it pays: 8-bit images decompress 3-4x faster for ~1.3x the bytes; half-float CT volumes
        // compress poorly with it (about 1.3x zstd's size for little read gain), so they keep zstd.
        let shard_opts = WriteOptions {
            image_codec: match records.first().map(|r| r.dtype) {
                Some(ImageDtype::U8) => ImageCodec::Lz4,
                _ => ImageCodec::Zstd,
            },
            ..write_opts.clone()
        };
        let bytes = write_volume_shard(&records, &shard_opts)?;
        let entry = ShardEntry::describe(&volume_shard_key(shard), records.len() as u64, &bytes);
        drop(records);
        let layout = shard_layout(&bytes, &entry.key, shard as u32)?;
        store.put(&entry.key, bytes)?;
        let record = ShardProgress {
            fingerprint,
            shard: entry,
            layout: Some(layout),
            samples: shard_samples,
            skipped: shard_skipped,
        };
        let json = serde_json::to_vec(&record).map_err(|e| PrepError::Options(e.to_string()))?;
        store.put(&progress_key(shard), Bytes::from(json))?;
        tracing::debug!(shard, rows = record.shard.rows, "shard committed");
        written += 1;
        done_shards.push(record);
    }
    bar.finish_and_clear();
    if let Some(part) = opts.part {
        let settings = part_settings(src, &items, n_shards, opts);
        return finish_part(
            &store,
            src,
            part,
            settings,
            shard_range.start,
            done_shards,
            (written, reused),
        );
    }
    let (entries, layouts, mut samples, mut skipped) = unpack(done_shards)?;
    samples.extend(src.extra_samples()?);
    skipped.extend(src.planning_skipped());
    let volumes: u64 = entries.iter().map(|e| e.rows).sum();
    finish(
        &store,
        src.dataset(),
        src.source(),
        preprocessing,
        (entries, layouts),
        samples,
        skipped,
        opts.shard_samples,
        (written, reused, volumes),
        None,
    )
}

/// The parts of the shards' completion records that [`finish`] takes, in shard order.
pub(crate) type Unpacked = (
    Vec<ShardEntry>,
    Vec<ShardLayout>,
    Vec<SampleRecord>,
    Vec<Skipped>,
);

/// Splits completion records (in shard order, index rows filled in) into what [`finish`] takes.
pub(crate) fn unpack(shards: Vec<ShardProgress>) -> Result<Unpacked> {
    let mut out: Unpacked = Default::default();
    for s in shards {
        let layout = s.layout.ok_or_else(|| {
            PrepError::Options(format!(
                "completion record of `{}` has no index rows",
                s.shard.key
            ))
        })?;
        out.0.push(s.shard);
        out.1.push(layout);
        out.2.extend(s.samples);
        out.3.extend(s.skipped);
    }
    Ok(out)
}

/// Everything the merged output of a split conversion depends on; `finalize` requires every part to agree on it
/// exactly. The item ids stand for the whole plan (a different source, `--limit` or split file changes them).
fn part_settings<S: VolumeSource>(
    src: &S,
    items: &[&S::Item],
    n_shards: usize,
    opts: &ConvertOptions,
) -> serde_json::Value {
    let mut ids = String::new();
    for it in items {
        ids.push_str(&src.item_id(it));
        ids.push('\n');
    }
    serde_json::json!({
        "schema_version": SHARD_SCHEMA_VERSION,
        "created_by": created_by(),
        "dataset": src.dataset(),
        "source": src.source(),
        "preprocessing": src.preprocessing(),
        "shard_volumes": opts.shard_volumes,
        "shard_samples": opts.shard_samples,
        "skip_bad": opts.skip_bad,
        "volumes_planned": items.len(),
        "shards": n_shards,
        "plan_sha256": sha256_hex(ids.as_bytes()),
    })
}

/// Writes the record of a converted part (its shards were committed already) and reports the part.
fn finish_part<S: VolumeSource>(
    store: &Store,
    src: &S,
    part: Part,
    settings: serde_json::Value,
    first_shard: usize,
    shards: Vec<ShardProgress>,
    (written, reused): (usize, usize),
) -> Result<ConvertReport> {
    // Part 1 carries what does not belong to a volume shard, so it is counted once.
    let (extra_samples, planning_skipped) = if part.index == 1 {
        (src.extra_samples()?, src.planning_skipped())
    } else {
        (Vec::new(), Vec::new())
    };
    let record = PartRecord {
        format: PART_FORMAT.to_string(),
        part,
        settings,
        first_shard,
        shards,
        extra_samples,
        planning_skipped,
    };
    crate::parts::save(store, &record)?;
    let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let samples = record
        .shards
        .iter()
        .flat_map(|s| &s.samples)
        .chain(&record.extra_samples);
    let mut n_samples = 0u64;
    for s in samples {
        n_samples += 1;
        *counts
            .entry(s.task.to_string())
            .or_default()
            .entry(s.split.clone())
            .or_default() += 1;
    }
    let skipped: Vec<Skipped> = record
        .shards
        .iter()
        .flat_map(|s| s.skipped.iter().cloned())
        .chain(record.planning_skipped.iter().cloned())
        .collect();
    tracing::info!(part = %part, key = %part.key(), "part recorded; run `m3d data-prep finalize` once every part is done");
    Ok(ConvertReport {
        dataset: src.dataset().to_string(),
        out: store.url().to_string(),
        volumes: record.shards.iter().map(|s| s.shard.rows).sum(),
        samples: n_samples,
        bytes: record.shards.iter().map(|s| s.shard.bytes).sum(),
        shards_written: written,
        shards_reused: reused,
        skipped,
        counts,
        part: Some(part),
    })
}

fn created_by() -> String {
    format!("m3d {}", env!("CARGO_PKG_VERSION"))
}

/// Writes a dataset that has samples only (M3D-VQA references M3D-Cap volumes).
pub fn convert_samples_only(
    dataset: &'static str,
    source: serde_json::Value,
    preprocessing: serde_json::Value,
    samples: Vec<SampleRecord>,
    skipped: Vec<Skipped>,
    opts: &ConvertOptions,
    volumes_from: Option<&ForeignVolumes>,
) -> Result<ConvertReport> {
    if let Some(part) = opts.part {
        return Err(PrepError::Options(format!(
            "--part {part}: {dataset} has no volumes to split (its samples reference another dataset's volumes \
             and convert in seconds); convert it in one process, without --part"
        )));
    }
    let store = Store::open(&opts.out)?;
    finish(
        &store,
        dataset,
        source,
        preprocessing,
        (Vec::new(), Vec::new()),
        samples,
        skipped,
        opts.shard_samples,
        (0, 0, 0),
        volumes_from,
    )
}

fn load_progress(store: &Store, shard: usize, fingerprint: &str) -> Result<Option<ShardProgress>> {
    let Some(bytes) = store.get_opt(&progress_key(shard))? else {
        return Ok(None);
    };
    let Ok(progress) = serde_json::from_slice::<ShardProgress>(&bytes) else {
        tracing::warn!(shard, "unreadable completion record; redoing the shard");
        return Ok(None);
    };
    if progress.fingerprint != fingerprint {
        tracing::info!(shard, "shard was planned differently before; redoing it");
        return Ok(None);
    }
    // The record is written after the shard, so the shard must be there with the recorded size.
    if store.size(&progress.shard.key)? != Some(progress.shard.bytes) {
        tracing::warn!(shard, key = %progress.shard.key, "shard missing or changed; redoing it");
        return Ok(None);
    }
    Ok(Some(progress))
}

type ChunkOutput = (Vec<VolumeRecord>, Vec<SampleRecord>, Vec<Skipped>);

fn convert_chunk<S: VolumeSource>(
    src: &S,
    chunk: &[&S::Item],
    opts: &ConvertOptions,
    bar: &indicatif::ProgressBar,
) -> Result<ChunkOutput> {
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<PrepError>> = Mutex::new(None);
    let results: Vec<Option<std::result::Result<Converted, Skipped>>> = chunk
        .par_iter()
        .map(|item| {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            let out = match src.convert(item) {
                Ok(c) => Ok(c),
                Err(e) if opts.skip_bad => {
                    tracing::warn!(item = %src.item_id(item), error = %e, "skipping bad item");
                    Err(Skipped {
                        item: src.item_id(item),
                        error: e.to_string(),
                    })
                }
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    if let Ok(mut slot) = first_error.lock() {
                        slot.get_or_insert(e);
                    }
                    return None;
                }
            };
            bar.inc(1);
            Some(out)
        })
        .collect();
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    let mut records = Vec::with_capacity(chunk.len());
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    for r in results.into_iter().flatten() {
        match r {
            Ok(c) => {
                records.push(c.volume);
                samples.extend(c.samples);
            }
            Err(s) => skipped.push(s),
        }
    }
    Ok((records, samples, skipped))
}

/// Writes the sample shards, removes stale shards, writes `skipped.json`, the volume index, the sample lookup and,
/// last, the manifest:
/// the end of a single conversion and of `finalize` alike.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish(
    store: &Store,
    dataset: &str,
    source: serde_json::Value,
    preprocessing: serde_json::Value,
    (volume_shards, layouts): (Vec<ShardEntry>, Vec<ShardLayout>),
    samples: Vec<SampleRecord>,
    skipped: Vec<Skipped>,
    shard_samples: usize,
    (written, reused, volumes): (usize, usize, u64),
    volumes_from: Option<&ForeignVolumes>,
) -> Result<ConvertReport> {
    let write_opts = WriteOptions::default();
    let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for s in &samples {
        *counts
            .entry(s.task.to_string())
            .or_default()
            .entry(s.split.clone())
            .or_default() += 1;
    }
    let mut sample_shards = Vec::new();
    for (i, chunk) in samples.chunks(shard_samples).enumerate() {
        let bytes = write_sample_shard(chunk, &write_opts)?;
        let entry = ShardEntry::describe(&sample_shard_key(i), chunk.len() as u64, &bytes);
        store.put(&entry.key, bytes)?;
        sample_shards.push(entry);
    }
    remove_stale(store, "volumes/", &volume_shards)?;
    remove_stale(store, "samples/", &sample_shards)?;
    if !skipped.is_empty() {
        let json =
            serde_json::to_vec_pretty(&skipped).map_err(|e| PrepError::Options(e.to_string()))?;
        store.put("skipped.json", Bytes::from(json))?;
    }
    let bytes: u64 = volume_shards
        .iter()
        .chain(&sample_shards)
        .map(|e| e.bytes)
        .sum();
    let mut manifest = Manifest {
        format: "m3d-shards".to_string(),
        schema_version: SHARD_SCHEMA_VERSION,
        dataset: dataset.to_string(),
        created_by: created_by(),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        source,
        preprocessing,
        volume_shards,
        sample_shards,
        volume_index: None,
        shard_list: None,
        sample_lookup: None,
        totals: Totals {
            volumes,
            samples: samples.len() as u64,
            bytes,
        },
        counts: counts.clone(),
        skipped: skipped.len() as u64,
    };
    let index = VolumeIndex::from_layouts(&layouts);
    write_index(store, &mut manifest, &index)?;
    m3d_shards::lookup::write_lookup(store, &mut manifest, &samples, &index, volumes_from)?;
    manifest.save(store)?;
    Ok(ConvertReport {
        dataset: dataset.to_string(),
        out: store.url().to_string(),
        volumes,
        samples: samples.len() as u64,
        bytes,
        shards_written: written,
        shards_reused: reused,
        skipped,
        counts,
        part: None,
    })
}

/// Deletes shards left by an earlier, differently planned run, so the folder holds exactly what the manifest lists.
fn remove_stale(store: &Store, prefix: &str, keep: &[ShardEntry]) -> Result<()> {
    for (key, _) in store.list(prefix)? {
        if !keep.iter().any(|e| e.key == key) {
            tracing::info!(%key, "removing shard from an earlier plan");
            store.delete(&key)?;
        }
    }
    Ok(())
}
