//! [`VolumeReader`]: one volume at a time by ranged reads, through the dataset's volume index.
//!
//! A read fetches the volume's row group (its own compressed bytes: shards hold one volume per row group) with one
//! ranged request, checks it against the index's crc32 and decodes it. The Parquet decoder also needs the shard's
//! footer, fetched (one ranged request, crc-checked) the first time a shard is read and kept in a small LRU of
//! parsed footers. Volumes are never located by downloading shards.
//!
//! Several volumes wanted at once (a step's, or a read-ahead's) are planned into [`ReadSpan`]s: the volumes of
//! one shard whose bytes are close together come with one request, each still checked on its own range. On
//! object storage a request costs about as much as a megabyte of transfer, so this is what makes a block
//! shuffle (whose windows draw whole runs of a shard's rows) cost about one request per block.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use parquet::arrow::arrow_reader::ArrowReaderMetadata;

use crate::dataset::ShardDataset;
use crate::index::{ByteRange, VolumeIndex, VolumeLocation};
use crate::manifest::ShardEntry;
use crate::parquet_io::{read_volume_row_group, volume_footer};
use crate::schema::VolumeRecord;
use crate::ShardError;
use m3d_store::Store;

/// Parsed footers kept per reader: each is tens of KiB in memory, and a step under a global shuffle touches a
/// different shard per sample, so this bounds memory rather than promising hits.
const FOOTER_CACHE: usize = 256;

/// Largest gap between two volumes' byte ranges in one shard that a single request reads through rather than
/// making two: object_store's own `get_ranges` coalesces at the same 1 MiB, about what an object store's
/// per-request latency is worth in transferred bytes.
pub const COALESCE_GAP: u64 = 1 << 20;

/// Largest request a coalesced read makes (bounds the memory one read holds while it decodes).
pub const COALESCE_MAX: u64 = 64 << 20;

/// Volumes read by one ranged request: nearby row groups of one shard (see [`VolumeReader::spans`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadSpan {
    /// Index into the manifest's `volume_shards`.
    pub shard: u32,
    /// The bytes of the shard the request fetches.
    pub range: std::ops::Range<u64>,
    /// The volumes (positions in the index) it covers, by offset.
    pub volumes: Vec<usize>,
}

#[derive(Default)]
struct Footers {
    map: HashMap<u32, (ArrowReaderMetadata, u64)>,
    tick: u64,
}

/// Where the reader finds volumes and shards.
enum Places {
    /// The whole volume index and the manifest's shard list, read at open.
    Index {
        entries: Vec<ShardEntry>,
        index: VolumeIndex,
        /// Positions in `index.volumes` ordered by volume id (first occurrence of a repeated id first),
        /// searched by [`VolumeReader::locate`]: 4 bytes a volume where a map by id held a second copy of
        /// every id.
        by_id: Vec<u32>,
    },
    /// Learned volume by volume from the sample lookup ([`VolumeReader::learn`]) as samples are looked up:
    /// opening reads nothing, and memory grows with the volumes a run has touched.
    Learned {
        volumes: usize,
        known: Mutex<Learned>,
    },
}

#[derive(Default)]
struct Learned {
    volumes: HashMap<usize, VolumeLocation>,
    /// Per shard: its footer and its size.
    shards: HashMap<u32, (ByteRange, u64)>,
}

/// Reads volumes of one dataset by ranged requests (see the module docs). Cheap to share between threads.
pub struct VolumeReader {
    store: Store,
    places: Places,
    footers: Mutex<Footers>,
}

impl std::fmt::Debug for VolumeReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeReader")
            .field("store", &self.store)
            .field("volumes", &self.len())
            .finish_non_exhaustive()
    }
}

impl VolumeReader {
    /// The reader of `dataset`'s volumes: reads its index ([`ShardError::NoIndex`] without one), no shard.
    pub fn open(dataset: &ShardDataset) -> Result<VolumeReader, ShardError> {
        let index = dataset.volume_index()?;
        let n = u32::try_from(index.volumes.len()).map_err(|_| {
            ShardError::Invalid(format!(
                "{} volumes in `{}`: more than a reader indexes",
                index.volumes.len(),
                dataset.store().url()
            ))
        })?;
        let mut by_id: Vec<u32> = (0..n).collect();
        // Stable: among equal ids the first position stays first, which `locate` returns.
        by_id.sort_by(|&a, &b| {
            index.volumes[a as usize]
                .volume_id
                .cmp(&index.volumes[b as usize].volume_id)
        });
        Ok(VolumeReader {
            store: dataset.store().clone(),
            places: Places::Index {
                entries: dataset.manifest().volume_shards.clone(),
                index,
                by_id,
            },
            footers: Mutex::new(Footers::default()),
        })
    }

    /// The reader of the `volumes` volumes of the dataset in `store` whose places come from its sample lookup
    /// ([`VolumeReader::learn`]): opening reads nothing. Its shards are at their standard keys
    /// ([`crate::manifest::volume_shard_key`]), the ones every writer of this crate uses.
    pub fn learning(store: Store, volumes: usize) -> VolumeReader {
        VolumeReader {
            store,
            places: Places::Learned {
                volumes,
                known: Mutex::new(Learned::default()),
            },
            footers: Mutex::new(Footers::default()),
        }
    }

    /// Records where volume `v` is, as the sample lookup gives it (a no-op for a reader of the whole index).
    pub fn learn(&self, v: &crate::lookup::LookedUpVolume) {
        if let Places::Learned { known, .. } = &self.places {
            let mut k = known.lock().unwrap_or_else(|e| e.into_inner());
            k.shards.insert(v.location.shard, (v.footer, v.shard_bytes));
            k.volumes
                .entry(v.position as usize)
                .or_insert_with(|| v.location.clone());
        }
    }

    /// The number of volumes.
    pub fn len(&self) -> usize {
        match &self.places {
            Places::Index { index, .. } => index.volumes.len(),
            Places::Learned { volumes, .. } => *volumes,
        }
    }

    /// Whether the dataset has no volumes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The position of volume `id` (for [`VolumeReader::read`]); `None` for a reader that learns places from
    /// the sample lookup, which looks volumes up by sample, not by id.
    pub fn locate(&self, id: &str) -> Option<usize> {
        let Places::Index { index, by_id, .. } = &self.places else {
            return None;
        };
        let id_at = |p: u32| index.volumes[p as usize].volume_id.as_str();
        let first = by_id.partition_point(|&p| id_at(p) < id);
        let p = *by_id.get(first)?;
        (id_at(p) == id).then_some(p as usize)
    }

    /// Where volume number `i` is.
    pub fn location(&self, i: usize) -> Option<VolumeLocation> {
        match &self.places {
            Places::Index { index, .. } => index.volumes.get(i).cloned(),
            Places::Learned { known, .. } => known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .volumes
                .get(&i)
                .cloned(),
        }
    }

    /// Shard `shard`'s key, size and footer range.
    fn shard(&self, shard: u32) -> Result<(String, u64, ByteRange), ShardError> {
        let missing = |n: usize| {
            ShardError::Invalid(format!(
                "volume shard {shard} out of range ({n} shards in `{}`)",
                self.store.url()
            ))
        };
        match &self.places {
            Places::Index { entries, index, .. } => {
                let e = entries
                    .get(shard as usize)
                    .ok_or_else(|| missing(entries.len()))?;
                let footer = index
                    .footers
                    .get(shard as usize)
                    .ok_or_else(|| ShardError::Invalid(format!("no footer for shard {shard}")))?;
                Ok((e.key.clone(), e.bytes, *footer))
            }
            Places::Learned { known, .. } => {
                let k = known.lock().unwrap_or_else(|e| e.into_inner());
                let &(footer, bytes) = k
                    .shards
                    .get(&shard)
                    .ok_or_else(|| missing(k.shards.len()))?;
                Ok((
                    crate::manifest::volume_shard_key(shard as usize),
                    bytes,
                    footer,
                ))
            }
        }
    }

    /// The store the volumes are read from.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The shard key of volume number `i`.
    pub fn shard_key(&self, i: usize) -> Option<String> {
        let loc = self.location(i)?;
        self.shard(loc.shard).ok().map(|(key, _, _)| key)
    }

    fn lock(&self) -> MutexGuard<'_, Footers> {
        // Only a cache: a panic elsewhere leaves it consistent.
        self.footers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The parsed footer of `shard`: cached, else sliced from `whole` (the shard's bytes, when the caller has
    /// them) or fetched, and checked against the index either way.
    fn footer(&self, shard: u32, whole: Option<&Bytes>) -> Result<ArrowReaderMetadata, ShardError> {
        {
            let mut f = self.lock();
            f.tick += 1;
            let tick = f.tick;
            if let Some((meta, last)) = f.map.get_mut(&shard) {
                *last = tick;
                return Ok(meta.clone());
            }
        }
        let (key, _, range) = self.shard(shard)?;
        let within = whole.and_then(|w| {
            let (start, end) = (
                usize::try_from(range.offset).ok()?,
                usize::try_from(range.offset + range.length).ok()?,
            );
            (end <= w.len()).then(|| w.slice(start..end))
        });
        let bytes = match within {
            Some(b) => b,
            None => self.store.get_range(&key, range.range())?,
        };
        range.check(&key, &bytes)?;
        let meta = volume_footer(&bytes, &key)?;
        let mut f = self.lock();
        f.tick += 1;
        let tick = f.tick;
        if f.map.len() >= FOOTER_CACHE {
            if let Some(victim) = f.map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) {
                f.map.remove(&victim);
            }
        }
        f.map.insert(shard, (meta.clone(), tick));
        Ok(meta)
    }

    /// Reads volume number `i` (with its image and masks when asked): its footer (once per shard) and its own
    /// bytes, each checked against the index.
    pub fn read(&self, i: usize, images: bool, masks: bool) -> Result<VolumeRecord, ShardError> {
        let mut spans = self.spans(&[i])?;
        let span = spans
            .pop()
            .ok_or_else(|| ShardError::Invalid(format!("volume {i}: no read planned")))?;
        let (_, record) = self
            .read_span(&span, images, masks)?
            .pop()
            .ok_or_else(|| ShardError::Invalid(format!("volume {i}: nothing read")))?;
        record
    }

    /// Plans the reads of volumes `volumes` (positions, as [`VolumeReader::locate`] gives them): volumes of one
    /// shard whose byte ranges lie within [`COALESCE_GAP`] of each other are read by one request of at most
    /// [`COALESCE_MAX`] bytes. Every volume is in exactly one span, in shard and offset order; repeats are
    /// read once.
    pub fn spans(&self, volumes: &[usize]) -> Result<Vec<ReadSpan>, ShardError> {
        let mut located = Vec::with_capacity(volumes.len());
        for &v in volumes {
            let loc = self.location(v).ok_or_else(|| {
                ShardError::Invalid(format!("volume {v} out of range ({} volumes)", self.len()))
            })?;
            located.push((loc.shard, loc.bytes.offset, loc.bytes.length, v));
        }
        Ok(plan_spans(located, COALESCE_GAP, COALESCE_MAX))
    }

    /// Reads the volumes of `span` with one ranged request (plus the shard's footer, once per shard) and
    /// decodes each, in the span's order. The outer error is the request's (it concerns every volume); a
    /// volume whose bytes fail their checksum or do not decode gets its own error and the others still serve.
    #[allow(clippy::type_complexity)]
    pub fn read_span(
        &self,
        span: &ReadSpan,
        images: bool,
        masks: bool,
    ) -> Result<Vec<(usize, Result<VolumeRecord, ShardError>)>, ShardError> {
        let (key, _, _) = self.shard(span.shard)?;
        let meta = self.footer(span.shard, None)?;
        let bytes = self.store.get_range(&key, span.range.clone())?;
        Ok(self.decode_span(span, &meta, &bytes, span.range.start, images, masks))
    }

    /// The size of shard `shard` in bytes.
    /// `None` for a shard a reader that learns places from the sample lookup has not seen a volume of yet.
    pub fn shard_bytes(&self, shard: u32) -> Option<u64> {
        match &self.places {
            Places::Index { entries, .. } => entries.get(shard as usize).map(|e| e.bytes),
            Places::Learned { known, .. } => known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .shards
                .get(&shard)
                .map(|&(_, bytes)| bytes),
        }
    }

    /// Fetches the whole of shard `shard` with one request, checked against the manifest (sha256 or crc32,
    /// and its size; through the sample lookup, its size): for read-ahead of a shard so small that reading it whole costs what one request costs.
    pub fn fetch_shard(&self, shard: u32) -> Result<Bytes, ShardError> {
        match &self.places {
            Places::Index { entries, .. } => {
                let entry = entries.get(shard as usize).ok_or_else(|| {
                    ShardError::Invalid(format!("volume shard {shard} out of range"))
                })?;
                crate::dataset::fetch_checked(&self.store, entry)
            }
            // The lookup carries no whole-object checksum; the size is checked here, and the footer and each
            // volume's range are crc-checked as they are decoded from these bytes (`read_span_from`).
            Places::Learned { .. } => {
                let (key, bytes, _) = self.shard(shard)?;
                let got = self.store.get(&key)?;
                if got.len() as u64 != bytes {
                    return Err(ShardError::Invalid(format!(
                        "`{key}` has {} bytes, the sample lookup says {bytes}",
                        got.len()
                    )));
                }
                Ok(got)
            }
        }
    }

    /// [`VolumeReader::read_span`] from `whole`, the shard's bytes as [`VolumeReader::fetch_shard`] returned
    /// them: no request (but the footer's, when `whole` does not hold it and it is not cached).
    #[allow(clippy::type_complexity)]
    pub fn read_span_from(
        &self,
        span: &ReadSpan,
        whole: &Bytes,
        images: bool,
        masks: bool,
    ) -> Result<Vec<(usize, Result<VolumeRecord, ShardError>)>, ShardError> {
        let meta = self.footer(span.shard, Some(whole))?;
        Ok(self.decode_span(span, &meta, whole, 0, images, masks))
    }

    /// Decodes the volumes of `span` from `bytes`, which hold the shard's bytes from offset `base` on.
    #[allow(clippy::type_complexity)]
    fn decode_span(
        &self,
        span: &ReadSpan,
        meta: &ArrowReaderMetadata,
        bytes: &Bytes,
        base: u64,
        images: bool,
        masks: bool,
    ) -> Vec<(usize, Result<VolumeRecord, ShardError>)> {
        let got = bytes.len() as u64;
        span.volumes
            .iter()
            .map(|&v| {
                let record = self.location(v).ok_or_else(|| {
                    ShardError::Invalid(format!("volume {v} out of range ({} volumes)", self.len()))
                });
                let record = record.and_then(|loc| {
                    let (key, shard_bytes, _) = self.shard(loc.shard)?;
                    let start = loc.bytes.offset.saturating_sub(base);
                    let end = start + loc.bytes.length;
                    if loc.shard != span.shard || loc.bytes.offset < base || end > got {
                        return Err(ShardError::Invalid(format!(
                            "volume `{}` (bytes {:?}) is not within the read of `{}` bytes {base}..{} ",
                            loc.volume_id,
                            loc.bytes.range(),
                            key,
                            base + got
                        )));
                    }
                    // Bounds checked above; `slice` shares the request's buffer.
                    let own = bytes.slice(start as usize..end as usize);
                    self.decode(meta, (&key, shard_bytes), &loc, own, images, masks)
                });
                (v, record)
            })
            .collect()
    }

    /// Checks one volume's own bytes against the index and decodes them.
    fn decode(
        &self,
        meta: &ArrowReaderMetadata,
        (key, shard_bytes): (&str, u64),
        loc: &VolumeLocation,
        bytes: Bytes,
        images: bool,
        masks: bool,
    ) -> Result<VolumeRecord, ShardError> {
        loc.bytes.check(key, &bytes)?;
        let rows = read_volume_row_group(
            meta,
            key,
            shard_bytes,
            loc.bytes.offset,
            bytes,
            loc.row_group as usize,
            images,
            masks,
        )?;
        rows.into_iter()
            .find(|r| r.volume_id == loc.volume_id)
            .ok_or_else(|| {
                ShardError::schema(
                    key,
                    format!(
                        "volume `{}` is not in row group {} (the index does not match the shard)",
                        loc.volume_id, loc.row_group
                    ),
                )
            })
    }
}

/// Groups `(shard, offset, length, volume)` reads into spans: sorted by shard and offset, a read joins the
/// previous span when it is in the same shard, starts at most `gap` bytes after the span's end, and keeps the
/// span within `max` bytes (a single read larger than `max` is a span of its own). Repeated volumes are read
/// once.
fn plan_spans(mut located: Vec<(u32, u64, u64, usize)>, gap: u64, max: u64) -> Vec<ReadSpan> {
    located.sort_unstable();
    let mut seen = std::collections::HashSet::new();
    located.retain(|l| seen.insert(l.3));
    let mut spans: Vec<ReadSpan> = Vec::new();
    for (shard, offset, length, v) in located {
        let end = offset + length;
        match spans.last_mut() {
            Some(s)
                if s.shard == shard
                    && offset <= s.range.end.saturating_add(gap)
                    && end.max(s.range.end) - s.range.start <= max =>
            {
                s.range.end = s.range.end.max(end);
                s.volumes.push(v);
            }
            _ => spans.push(ReadSpan {
                shard,
                range: offset..end,
                volumes: vec![v],
            }),
        }
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(shard: u32, range: std::ops::Range<u64>, volumes: &[usize]) -> ReadSpan {
        ReadSpan {
            shard,
            range,
            volumes: volumes.to_vec(),
        }
    }

    #[test]
    fn nearby_reads_of_a_shard_share_a_span_and_far_or_other_shards_do_not() {
        // Shard 0: volumes at 0..10, 10..20 (adjacent), 25..30 (gap 5 = the limit), 36..40 (gap 6: too far).
        // Shard 1: 0..10, which must not join shard 0's span. Given out of order, with a repeat.
        let located = vec![
            (0, 36, 4, 3),
            (1, 0, 10, 4),
            (0, 10, 10, 1),
            (0, 0, 10, 0),
            (0, 25, 5, 2),
            (0, 10, 10, 1),
        ];
        assert_eq!(
            plan_spans(located, 5, 1000),
            vec![
                span(0, 0..30, &[0, 1, 2]),
                span(0, 36..40, &[3]),
                span(1, 0..10, &[4]),
            ]
        );
    }

    #[test]
    fn a_span_never_grows_past_its_limit_and_shared_row_groups_are_read_once() {
        // Two volumes in one row group (same range), then reads that would make the span 25 bytes > 20.
        let located = vec![
            (0, 0, 10, 0),
            (0, 0, 10, 1),
            (0, 10, 10, 2),
            (0, 20, 5, 3),
            (0, 25, 30, 4),
        ];
        assert_eq!(
            plan_spans(located, 1 << 20, 20),
            vec![
                span(0, 0..20, &[0, 1, 2]),
                span(0, 20..25, &[3]),
                span(0, 25..55, &[4]),
            ]
        );
    }
}
