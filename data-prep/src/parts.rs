//! Conversion split across machines: `--part I/N` converts the I-th of N deterministic parts of a dataset into the
//! shared output location, and [`finalize`] merges the parts into the dataset's sample shards, volume index and
//! manifest, byte-identical to a single process's conversion.
//!
//! How the split works (what makes the result identical):
//! - the plan (items, their order, shard boundaries) is the single run's: part I takes the contiguous shard numbers
//!   `[(I-1)·S/N, I·S/N)` of the S shards, so every volume shard keeps its key, bytes and completion record;
//! - a part writes its volume shards and their `_progress/` records exactly as a single run does (so a re-run part
//!   resumes), then `parts/part-I-of-N.json` ([`PartRecord`]) last: its shards' entries, index rows, samples and
//!   skipped items, and the conversion settings;
//! - a part deletes any `manifest.json` when it starts, so the dataset is visibly incomplete until [`finalize`]
//!   has checked that parts 1..N are each there once, with the same N and settings, and written the sample shards,
//!   `index/volumes.parquet`, `skipped.json` and, last, `manifest.json` (through the single run's code path).
//!
//! Samples that do not come from a volume (a source's extra samples, table rows rejected while planning) are
//! recorded by part 1 only, and placed after the volumes' samples as a single run places them.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use bytes::Bytes;
use m3d_shards::schema::SampleRecord;
use m3d_store::Store;
use serde::{Deserialize, Serialize};

use crate::error::{PrepError, Result};
use crate::pipeline::{ConvertReport, ShardProgress, Skipped};

/// Folder of the part records in a dataset.
pub const PARTS_PREFIX: &str = "parts/";

/// One of `count` parts of a conversion (`index` counts from 1, as `--part I/N` does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Part {
    pub index: usize,
    pub count: usize,
}

impl Part {
    /// Part `index` (1-based) of `count`; refuses `0`, and an index past the count.
    pub fn new(index: usize, count: usize) -> Result<Part> {
        if count == 0 || index == 0 || index > count {
            return Err(PrepError::Options(format!(
                "part {index}/{count}: want I/N with 1 <= I <= N"
            )));
        }
        Ok(Part { index, count })
    }

    /// The shard numbers this part converts out of `shards`: a contiguous range, a pure function of
    /// (index, count, shards), so the parts together cover `0..shards` exactly once (a part may get none when
    /// there are fewer shards than parts).
    pub fn shards(&self, shards: usize) -> Range<usize> {
        (self.index - 1) * shards / self.count..self.index * shards / self.count
    }

    /// Key of this part's record: `parts/part-I-of-N.json`.
    pub fn key(&self) -> String {
        format!("{PARTS_PREFIX}part-{}-of-{}.json", self.index, self.count)
    }

    /// The part a record key names (`parts/part-2-of-3.json`), or `None` for another name.
    fn from_key(key: &str) -> Option<(usize, usize)> {
        let name = key.strip_prefix(PARTS_PREFIX)?;
        let (i, n) = name
            .strip_prefix("part-")?
            .strip_suffix(".json")?
            .split_once("-of-")?;
        Some((i.parse().ok()?, n.parse().ok()?))
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Part {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Part, String> {
        let parsed = s
            .split_once('/')
            .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        let (i, n) = parsed.ok_or_else(|| format!("{s:?}: expected I/N, e.g. 2/8"))?;
        Part::new(i, n).map_err(|e| e.to_string())
    }
}

/// What a part leaves for [`finalize`] at [`Part::key`].
#[derive(Serialize, Deserialize)]
pub(crate) struct PartRecord {
    /// Always `"m3d-data-prep-part"`.
    pub format: String,
    pub part: Part,
    /// Everything the merged output depends on (see [`crate::pipeline`]); parts must agree on it exactly.
    pub settings: serde_json::Value,
    /// First shard number of [`PartRecord::shards`].
    pub first_shard: usize,
    pub shards: Vec<ShardProgress>,
    /// Samples not derived from a volume (part 1 only).
    pub extra_samples: Vec<SampleRecord>,
    /// Inputs rejected while planning (part 1 only).
    pub planning_skipped: Vec<Skipped>,
}

pub(crate) const PART_FORMAT: &str = "m3d-data-prep-part";

/// Writes `record` as its part's record (write-then-rename on a folder, one PUT on S3: never seen half written).
pub(crate) fn save(store: &Store, record: &PartRecord) -> Result<()> {
    let json = serde_json::to_vec(record).map_err(|e| PrepError::Options(e.to_string()))?;
    store.put(&record.part.key(), Bytes::from(json))?;
    Ok(())
}

/// Records of other part counts left by an earlier split: reported at the start of a part, refused by finalize.
pub(crate) fn warn_other_counts(store: &Store, part: Part) -> Result<()> {
    for (key, _) in store.list(PARTS_PREFIX)? {
        if let Some((_, n)) = Part::from_key(&key) {
            if n != part.count {
                tracing::warn!(%key, part = %part, "a part record of another split is here; finalize will refuse it until it is deleted");
            }
        }
    }
    Ok(())
}

/// The first setting (as a dotted path into nested objects) whose value differs between part `a` and part `b`,
/// for error messages.
fn first_difference(
    (pa, a): (Part, &serde_json::Value),
    (pb, b): (Part, &serde_json::Value),
) -> String {
    fn walk<'v>(
        path: String,
        a: Option<&'v serde_json::Value>,
        b: Option<&'v serde_json::Value>,
    ) -> Option<(
        String,
        Option<&'v serde_json::Value>,
        Option<&'v serde_json::Value>,
    )> {
        if a == b {
            return None;
        }
        if let (Some(serde_json::Value::Object(ma)), Some(serde_json::Value::Object(mb))) = (a, b) {
            let mut keys: Vec<&String> = ma.keys().chain(mb.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if let Some(found) = walk(sub, ma.get(k), mb.get(k)) {
                    return Some(found);
                }
            }
        }
        Some((path, a, b))
    }
    let show = |v: Option<&serde_json::Value>| {
        let s = v.map_or_else(|| "absent".to_string(), |v| v.to_string());
        if s.chars().count() > 200 {
            format!("{}...", s.chars().take(200).collect::<String>())
        } else {
            s
        }
    };
    match walk(String::new(), Some(a), Some(b)) {
        Some((path, va, vb)) => format!(
            "`{path}` is {} in part {pa} but {} in part {pb}",
            show(va),
            show(vb)
        ),
        None => "the settings differ".to_string(),
    }
}

/// Waits until every part of the split recorded under `url` has its record (`parts/part-I-of-N.json` for
/// I = 1..N, N read from the first record seen), polling every few seconds for up to `limit`: a finalize pod
/// started beside the part pods (a plain Indexed Job has no ordering between Jobs) waits here.
pub fn wait_for_parts(url: &str, limit: std::time::Duration) -> Result<()> {
    let started = std::time::Instant::now();
    let mut missing = String::from("no part record yet");
    loop {
        if let Ok(store) = Store::open_existing(url) {
            let found: Vec<(usize, usize)> = store
                .list(PARTS_PREFIX)?
                .iter()
                .filter_map(|(k, _)| Part::from_key(k))
                .collect();
            if let Some(&(_, n)) = found.first() {
                let absent: Vec<String> = (1..=n)
                    .filter(|i| !found.contains(&(*i, n)))
                    .map(|i| format!("{i}/{n}"))
                    .collect();
                if absent.is_empty() {
                    return Ok(());
                }
                missing = format!("parts {} missing", absent.join(", "));
            }
        }
        if started.elapsed() >= limit {
            return Err(PrepError::Parts(format!(
                "{url}: gave up after {:.0} s: {missing}",
                limit.as_secs_f64()
            )));
        }
        tracing::info!(%url, %missing, "waiting for the parts");
        std::thread::sleep(std::time::Duration::from_secs(5).min(limit));
    }
}

/// Merges the part records under `url` into the dataset: checks that parts 1..N are each there exactly once, were
/// written with the same N and the same settings, and that their shards are in place; then writes the sample
/// shards, the volume index, `skipped.json` and, last, `manifest.json`, exactly as a single conversion does.
/// Running it again rewrites the same objects (only the manifest's `created_unix` changes).
pub fn finalize(url: &str) -> Result<ConvertReport> {
    let store = Store::open_existing(url)?;
    let url = store.url().to_string();
    let mut found: Vec<(String, usize, usize)> = Vec::new();
    for (key, _) in store.list(PARTS_PREFIX)? {
        match Part::from_key(&key) {
            Some((i, n)) => found.push((key, i, n)),
            None => tracing::warn!(%key, "not a part record; ignored"),
        }
    }
    if found.is_empty() {
        return Err(PrepError::Parts(format!(
            "no part records under {url}/{PARTS_PREFIX}: convert with `--part I/N` first (a dataset converted \
             without --part needs no finalize)"
        )));
    }
    found.sort_by_key(|(_, i, n)| (*n, *i));
    let mut counts: Vec<usize> = found.iter().map(|(_, _, n)| *n).collect();
    counts.dedup();
    if counts.len() > 1 {
        let keys: Vec<&str> = found.iter().map(|(k, _, _)| k.as_str()).collect();
        return Err(PrepError::Parts(format!(
            "part records of different splits (N = {counts:?}) under {url}: {}; delete the records of the split \
             you abandoned",
            keys.join(", ")
        )));
    }
    let count = counts[0];
    for (key, i, n) in &found {
        if *i == 0 || *i > *n {
            return Err(PrepError::Parts(format!(
                "{url}/{key} names part {i} of {n}, which does not exist"
            )));
        }
    }
    let mut records: Vec<PartRecord> = Vec::with_capacity(count);
    for index in 1..=count {
        let part = Part { index, count };
        let key = part.key();
        let Some(bytes) = store.get_opt(&key)? else {
            return Err(PrepError::Parts(format!(
                "part {part} is missing: no completion record for it under {url} (expected {key}); run that \
                 part (`--part {part}`), then finalize again"
            )));
        };
        let record: PartRecord = serde_json::from_slice(&bytes).map_err(|e| {
            PrepError::Parts(format!("{url}/{key}: not a readable part record: {e}"))
        })?;
        if record.format != PART_FORMAT {
            return Err(PrepError::Parts(format!(
                "{url}/{key}: `format` is {:?}, expected {PART_FORMAT:?}",
                record.format
            )));
        }
        if record.part != part {
            return Err(PrepError::Parts(format!(
                "{url}/{key} holds the record of part {} (a copy?): part {} would be counted twice and part \
                 {part} not at all",
                record.part, record.part
            )));
        }
        if let Some(first) = records.first() {
            if record.settings != first.settings {
                return Err(PrepError::Parts(format!(
                    "part {part} was converted with other settings than part {} under {url}: {}; \
                     convert every part with the same source, options and m3d version",
                    first.part,
                    first_difference((first.part, &first.settings), (part, &record.settings))
                )));
            }
        }
        let shards = record.settings["shards"].as_u64().ok_or_else(|| {
            PrepError::Parts(format!("{url}/{key}: settings lack the shard count"))
        })? as usize;
        let want = part.shards(shards);
        let have = record.first_shard..record.first_shard + record.shards.len();
        if have != want {
            return Err(PrepError::Parts(format!(
                "{url}/{key} covers shards {have:?}, but part {part} of {shards} shards is {want:?}"
            )));
        }
        for s in &record.shards {
            let size = store.size(&s.shard.key)?;
            if size != Some(s.shard.bytes) {
                return Err(PrepError::Parts(format!(
                    "part {part} lists {url}/{} of {} bytes, but it is {}; run that part again",
                    s.shard.key,
                    s.shard.bytes,
                    size.map_or("missing".to_string(), |b| format!("{b} bytes"))
                )));
            }
        }
        records.push(record);
    }
    let settings = records[0].settings.clone();
    let text = |name: &str| -> Result<String> {
        settings[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| PrepError::Parts(format!("part settings lack `{name}`")))
    };
    let dataset = text("dataset")?;
    let shard_samples = settings["shard_samples"]
        .as_u64()
        .filter(|n| *n > 0)
        .ok_or_else(|| PrepError::Parts("part settings lack `shard_samples`".to_string()))?
        as usize;
    let mut shards = Vec::new();
    let mut tail_samples = Vec::new();
    let mut tail_skipped = Vec::new();
    for record in records {
        shards.extend(record.shards);
        tail_samples.extend(record.extra_samples);
        tail_skipped.extend(record.planning_skipped);
    }
    let (entries, layouts, mut samples, mut skipped) = crate::pipeline::unpack(shards)?;
    samples.extend(tail_samples);
    skipped.extend(tail_skipped);
    let volumes: u64 = entries.iter().map(|e| e.rows).sum();
    let shards = entries.len();
    crate::pipeline::finish(
        &store,
        &dataset,
        settings["source"].clone(),
        settings["preprocessing"].clone(),
        (entries, layouts),
        samples,
        skipped,
        shard_samples,
        (0, shards, volumes),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_every_shard_once_in_order() {
        for shards in 0..40 {
            for count in 1..9 {
                let mut next = 0;
                for index in 1..=count {
                    let r = Part::new(index, count).unwrap().shards(shards);
                    assert_eq!(r.start, next, "{index}/{count} of {shards}");
                    assert!(r.len() <= shards.div_ceil(count));
                    next = r.end;
                }
                assert_eq!(next, shards);
            }
        }
    }

    #[test]
    fn settings_differences_are_named_by_path() {
        let a = serde_json::json!({"shards": 4, "preprocessing": {"resize": [32], "storage": {"dtype": "f16"}}});
        let b = serde_json::json!({"shards": 4, "preprocessing": {"resize": [32], "storage": {"dtype": "f32"}}});
        let (p1, p2) = (Part::new(1, 2).unwrap(), Part::new(2, 2).unwrap());
        assert_eq!(
            first_difference((p1, &a), (p2, &b)),
            "`preprocessing.storage.dtype` is \"f16\" in part 1/2 but \"f32\" in part 2/2"
        );
        let c = serde_json::json!({"shards": 5});
        assert_eq!(
            first_difference((p1, &a), (p2, &c)),
            "`preprocessing` is {\"resize\":[32],\"storage\":{\"dtype\":\"f16\"}} in part 1/2 but absent in part 2/2"
        );
    }

    #[test]
    fn part_syntax() {
        assert_eq!("2/3".parse::<Part>().unwrap(), Part { index: 2, count: 3 });
        assert_eq!(Part { index: 2, count: 3 }.key(), "parts/part-2-of-3.json");
        assert_eq!(Part::from_key("parts/part-2-of-3.json"), Some((2, 3)));
        assert_eq!(Part::from_key("parts/other.json"), None);
        for bad in ["0/3", "4/3", "1/0", "3", "a/b", ""] {
            assert!(bad.parse::<Part>().is_err(), "{bad}");
        }
    }
}
