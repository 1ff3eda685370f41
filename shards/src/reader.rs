//! [`VolumeReader`]: one volume at a time by ranged reads, through the dataset's volume index.
//!
//! A read fetches the volume's row group (its own compressed bytes: shards hold one volume per row group) with one
//! ranged request, checks it against the index's crc32 and decodes it. The Parquet decoder also needs the shard's
//! footer, fetched (one ranged request, crc-checked) the first time a shard is read and kept in a small LRU of
//! parsed footers. Volumes are never located by downloading shards.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use parquet::arrow::arrow_reader::ArrowReaderMetadata;

use crate::dataset::ShardDataset;
use crate::index::{VolumeIndex, VolumeLocation};
use crate::manifest::ShardEntry;
use crate::parquet_io::{read_volume_row_group, volume_footer};
use crate::schema::VolumeRecord;
use crate::ShardError;
use m3d_store::Store;

/// Parsed footers kept per reader: each is tens of KiB in memory, and a step under a global shuffle touches a
/// different shard per sample, so this bounds memory rather than promising hits.
const FOOTER_CACHE: usize = 256;

#[derive(Default)]
struct Footers {
    map: HashMap<u32, (ArrowReaderMetadata, u64)>,
    tick: u64,
}

/// Reads volumes of one dataset by ranged requests (see the module docs). Cheap to share between threads.
pub struct VolumeReader {
    store: Store,
    entries: Vec<ShardEntry>,
    index: VolumeIndex,
    by_id: HashMap<String, usize>,
    footers: Mutex<Footers>,
}

impl std::fmt::Debug for VolumeReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeReader")
            .field("store", &self.store)
            .field("volumes", &self.index.volumes.len())
            .finish_non_exhaustive()
    }
}

impl VolumeReader {
    /// The reader of `dataset`'s volumes: reads its index ([`ShardError::NoIndex`] without one), no shard.
    pub fn open(dataset: &ShardDataset) -> Result<VolumeReader, ShardError> {
        let index = dataset.volume_index()?;
        let by_id = index
            .by_id()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        Ok(VolumeReader {
            store: dataset.store().clone(),
            entries: dataset.manifest().volume_shards.clone(),
            index,
            by_id,
            footers: Mutex::new(Footers::default()),
        })
    }

    /// The number of volumes.
    pub fn len(&self) -> usize {
        self.index.volumes.len()
    }

    /// Whether the dataset has no volumes.
    pub fn is_empty(&self) -> bool {
        self.index.volumes.is_empty()
    }

    /// The position of volume `id` (for [`VolumeReader::read`]).
    pub fn locate(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    /// Where volume number `i` is.
    pub fn location(&self, i: usize) -> Option<&VolumeLocation> {
        self.index.volumes.get(i)
    }

    /// The store the volumes are read from.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The shard key of volume number `i`.
    pub fn shard_key(&self, i: usize) -> Option<&str> {
        let loc = self.index.volumes.get(i)?;
        self.entries.get(loc.shard as usize).map(|e| e.key.as_str())
    }

    fn lock(&self) -> MutexGuard<'_, Footers> {
        // Only a cache: a panic elsewhere leaves it consistent.
        self.footers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn footer(&self, shard: u32) -> Result<ArrowReaderMetadata, ShardError> {
        {
            let mut f = self.lock();
            f.tick += 1;
            let tick = f.tick;
            if let Some((meta, last)) = f.map.get_mut(&shard) {
                *last = tick;
                return Ok(meta.clone());
            }
        }
        let entry = self.entry(shard)?;
        let range = self
            .index
            .footers
            .get(shard as usize)
            .ok_or_else(|| ShardError::Invalid(format!("no footer for shard {shard}")))?;
        let bytes = self.store.get_range(&entry.key, range.range())?;
        range.check(&entry.key, &bytes)?;
        let meta = volume_footer(&bytes, &entry.key)?;
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

    fn entry(&self, shard: u32) -> Result<&ShardEntry, ShardError> {
        self.entries.get(shard as usize).ok_or_else(|| {
            ShardError::Invalid(format!(
                "volume shard {shard} out of range ({} shards in `{}`)",
                self.entries.len(),
                self.store.url()
            ))
        })
    }

    /// Reads volume number `i` (with its image and masks when asked): its footer (once per shard) and its own
    /// bytes, each checked against the index.
    pub fn read(&self, i: usize, images: bool, masks: bool) -> Result<VolumeRecord, ShardError> {
        let loc = self.index.volumes.get(i).ok_or_else(|| {
            ShardError::Invalid(format!("volume {i} out of range ({} volumes)", self.len()))
        })?;
        let entry = self.entry(loc.shard)?;
        let meta = self.footer(loc.shard)?;
        let bytes = self.store.get_range(&entry.key, loc.bytes.range())?;
        loc.bytes.check(&entry.key, &bytes)?;
        let rows = read_volume_row_group(
            &meta,
            &entry.key,
            entry.bytes,
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
                    &entry.key,
                    format!(
                        "volume `{}` is not in row group {} (the index does not match the shard)",
                        loc.volume_id, loc.row_group
                    ),
                )
            })
    }
}
