//! The sample lookup (`index/samples.lookup`): every sample record with its volume's location, in blocks that
//! a reader fetches by ranged requests, so that opening a dataset for training reads a constant number of bytes
//! however many samples it has, and a step reads only its samples' blocks.
//!
//! Layout of the object: zstd blocks of [`LOOKUP_BLOCK_ROWS`] records back to back, then the directory, one
//! [`DIR_ENTRY`]-byte entry per block (offset u64, compressed length u32, decoded length u32, crc32 of the
//! compressed bytes u32, reserved u32; little-endian), at the offset the manifest gives. A record is the
//! [`crate::records`] form of the [`SampleRecord`] followed by its volume's place: a tag (0: none known; 1: in
//! this dataset; 2: in the dataset whose volumes this one's samples name, e.g. M3D-Cap's for M3D-VQA, identified
//! by the sha256 of its volume index, [`LookupEntry::volumes_index_sha256`]) and, unless 0, the volume's row in
//! that dataset's volume index, its shard, row group, byte range and crc32, its shard's footer range and crc32,
//! and the shard's size.
//!
//! Rows are grouped by (split, task), in the order of the sample shards within a group, and the manifest lists
//! the groups ([`LookupEntry::groups`]): a training set selects its samples by split and task, so its samples
//! are a few contiguous ranges of rows known before any row is read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::index::{ByteRange, VolumeIndex, VolumeLocation};
use crate::manifest::{Manifest, ShardEntry};
use crate::records::{decode_record, encode_record, get_varint, put_varint};
use crate::schema::SampleRecord;
use crate::ShardError;
use m3d_store::Store;

/// Key of the lookup in a dataset.
pub const LOOKUP_KEY: &str = "index/samples.lookup";

/// Records per block: a step under the global shuffle fetches one block per sample, so blocks are kept small
/// (a few KiB compressed for M3D's reports) at some cost in compression.
pub const LOOKUP_BLOCK_ROWS: u32 = 32;

/// Bytes of one directory entry.
pub const DIR_ENTRY: u64 = 24;

/// Directory entries fetched together (1.5 KiB): under a global shuffle a run soon holds most of the directory
/// in a few requests, and a first batch still costs a constant number of bytes.
const DIR_PAGE: u64 = 64;

/// Largest gap, in blocks (~2 KiB each for M3D's texts), that one request reads through rather than making two:
/// like the volumes' `COALESCE_GAP`, a request costs about what tens of KiB of transfer do.
const GAP_BLOCKS: u64 = 32;

/// Ranged requests a lookup makes at the same time (each mostly waits on the store).
const PARALLEL: usize = 8;

/// Decoded blocks a reader keeps (~16 KiB each for M3D's texts): a block shuffle's window touches a few; under
/// a global shuffle the read-ahead decodes a step's blocks and the step's load finds them here.
const BLOCK_CACHE: usize = 1024;

/// zstd level of the blocks.
const LEVEL: i32 = 3;

/// A contiguous range of lookup rows sharing a split and a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupGroup {
    pub split: String,
    /// The task's name as in the manifest's `counts`.
    pub task: String,
    /// First row.
    pub start: u64,
    pub rows: u64,
}

/// The manifest's description of the lookup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupEntry {
    /// The object (`rows` = samples), checked whole by `verify`; readers check each block's crc32.
    pub file: ShardEntry,
    pub block_rows: u32,
    pub blocks: u64,
    /// Where the directory starts.
    pub directory_offset: u64,
    pub groups: Vec<LookupGroup>,
    /// For rows whose volumes are in another dataset (tag 2): the sha256 of that dataset's
    /// `index/volumes.parquet` when the lookup was written. A reader uses those places only for a volumes
    /// dataset whose manifest lists the same index (else the places could point at other bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes_index_sha256: Option<String>,
}

/// The volume index of the dataset whose volumes another dataset's samples name (M3D-Cap's, for M3D-VQA), for
/// writing that dataset's lookup.
#[derive(Clone, Debug)]
pub struct ForeignVolumes {
    pub index: VolumeIndex,
    /// Each volume shard's size.
    pub shard_bytes: Vec<u64>,
    /// sha256 of its `index/volumes.parquet`.
    pub index_sha256: String,
}

impl ForeignVolumes {
    /// Those of the dataset at `url` (its manifest and volume index: no shard).
    pub fn open(url: &str) -> Result<ForeignVolumes, ShardError> {
        Self::of(&crate::ShardDataset::open_for_volumes(url)?)
    }

    /// Those of `dataset` (its manifest and volume index: no shard).
    pub fn of(dataset: &crate::ShardDataset) -> Result<ForeignVolumes, ShardError> {
        let m = dataset.manifest();
        let index_sha256 = m
            .volume_index
            .as_ref()
            .map(|e| e.sha256.clone())
            .ok_or_else(|| ShardError::NoIndex {
                url: dataset.store().url().to_string(),
            })?;
        Ok(ForeignVolumes {
            index: dataset.volume_index()?,
            shard_bytes: m.volume_shards.iter().map(|e| e.bytes).collect(),
            index_sha256,
        })
    }
}

/// Where a sample's volume is: what a ranged read needs, without the volume index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookedUpVolume {
    /// In the volumes dataset (tag 2), not in the lookup's own.
    pub foreign: bool,
    /// The volume's row in the dataset's volume index.
    pub position: u64,
    pub location: VolumeLocation,
    /// Its shard's footer.
    pub footer: ByteRange,
    /// Its shard's size in bytes.
    pub shard_bytes: u64,
}

/// One row of the lookup.
#[derive(Clone, Debug, PartialEq)]
pub struct LookupRow {
    pub record: SampleRecord,
    /// `None` when the volume is not in this dataset.
    pub volume: Option<LookedUpVolume>,
}

fn put_crc(out: &mut Vec<u8>, c: u32) {
    out.extend_from_slice(&c.to_le_bytes());
}

fn get_crc(rest: &mut &[u8]) -> Option<u32> {
    let (c, tail) = rest.split_first_chunk::<4>()?;
    *rest = tail;
    Some(u32::from_le_bytes(*c))
}

fn encode_volume(out: &mut Vec<u8>, v: Option<&LookedUpVolume>) {
    let Some(v) = v else {
        out.push(0);
        return;
    };
    out.push(if v.foreign { 2 } else { 1 });
    put_varint(out, v.position);
    put_varint(out, u64::from(v.location.shard));
    put_varint(out, u64::from(v.location.row_group));
    put_varint(out, v.location.bytes.offset);
    put_varint(out, v.location.bytes.length);
    put_crc(out, v.location.bytes.crc32);
    put_varint(out, v.footer.offset);
    put_varint(out, v.footer.length);
    put_crc(out, v.footer.crc32);
    put_varint(out, v.shard_bytes);
}

fn decode_volume(rest: &mut &[u8], volume_id: &str) -> Option<Option<LookedUpVolume>> {
    let (&tag, tail) = rest.split_first()?;
    *rest = tail;
    let foreign = match tag {
        0 => return Some(None),
        1 => false,
        2 => true,
        _ => return None,
    };
    let position = get_varint(rest)?;
    let shard = u32::try_from(get_varint(rest)?).ok()?;
    let row_group = u32::try_from(get_varint(rest)?).ok()?;
    let (offset, length) = (get_varint(rest)?, get_varint(rest)?);
    let crc32 = get_crc(rest)?;
    let (foffset, flength) = (get_varint(rest)?, get_varint(rest)?);
    let fcrc = get_crc(rest)?;
    let shard_bytes = get_varint(rest)?;
    Some(Some(LookedUpVolume {
        foreign,
        position,
        location: VolumeLocation {
            volume_id: volume_id.to_string(),
            shard,
            row_group,
            bytes: ByteRange {
                offset,
                length,
                crc32,
            },
        },
        footer: ByteRange {
            offset: foffset,
            length: flength,
            crc32: fcrc,
        },
        shard_bytes,
    }))
}

/// The lookup of `samples` (in sample-shard order) whose volumes are located through `index` (the dataset's
/// own; `shard_bytes[s]` is volume shard `s`'s size), else through `foreign`: the object and its manifest entry.
pub fn build_lookup(
    samples: &[SampleRecord],
    index: &VolumeIndex,
    shard_bytes: &[u64],
    foreign: Option<&ForeignVolumes>,
) -> Result<(Bytes, LookupEntry), ShardError> {
    let by_id = index.by_id();
    let foreign_by_id = foreign.map(|f| f.index.by_id()).unwrap_or_default();
    // Stable: within a group, rows keep the sample shards' order.
    let mut order: Vec<usize> = (0..samples.len()).collect();
    let key = |i: &usize| (samples[*i].split.as_str(), samples[*i].task.to_string());
    order.sort_by_key(key);
    let mut groups: Vec<LookupGroup> = Vec::new();
    for (row, &i) in order.iter().enumerate() {
        let (split, task) = key(&i);
        match groups.last_mut() {
            Some(g) if g.split == split && g.task == task => g.rows += 1,
            _ => groups.push(LookupGroup {
                split: split.to_string(),
                task,
                start: row as u64,
                rows: 1,
            }),
        }
    }
    let mut out = Vec::new();
    let mut directory = Vec::new();
    let mut block = Vec::new();
    let seal =
        |block: &mut Vec<u8>, out: &mut Vec<u8>, dir: &mut Vec<u8>| -> Result<(), ShardError> {
            let compressed = zstd::bulk::compress(block, LEVEL).map_err(|e| {
                ShardError::Invalid(format!("{LOOKUP_KEY}: compressing a block: {e}"))
            })?;
            let too_big = |_| ShardError::Invalid(format!("{LOOKUP_KEY}: a block over 4 GiB"));
            dir.extend_from_slice(&(out.len() as u64).to_le_bytes());
            dir.extend_from_slice(
                &u32::try_from(compressed.len())
                    .map_err(too_big)?
                    .to_le_bytes(),
            );
            dir.extend_from_slice(&u32::try_from(block.len()).map_err(too_big)?.to_le_bytes());
            dir.extend_from_slice(&crc32fast::hash(&compressed).to_le_bytes());
            dir.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&compressed);
            block.clear();
            Ok(())
        };
    for (row, &i) in order.iter().enumerate() {
        let s = &samples[i];
        encode_record(&mut block, s);
        let own = by_id
            .get(s.volume_id.as_str())
            .map(|&p| (false, p, index, shard_bytes));
        let other = || {
            let f = foreign?;
            let p = *foreign_by_id.get(s.volume_id.as_str())?;
            Some((true, p, &f.index, f.shard_bytes.as_slice()))
        };
        let volume = match own.or_else(other) {
            Some((foreign, p, index, shard_bytes)) => {
                let location = index.volumes[p].clone();
                let shard = location.shard as usize;
                let (footer, bytes) = index
                    .footers
                    .get(shard)
                    .zip(shard_bytes.get(shard))
                    .ok_or_else(|| {
                        ShardError::Invalid(format!(
                            "volume `{}`: shard {shard} has no footer or size",
                            location.volume_id
                        ))
                    })?;
                Some(LookedUpVolume {
                    foreign,
                    position: p as u64,
                    location,
                    footer: *footer,
                    shard_bytes: *bytes,
                })
            }
            None => None,
        };
        encode_volume(&mut block, volume.as_ref());
        if (row + 1) % LOOKUP_BLOCK_ROWS as usize == 0 {
            seal(&mut block, &mut out, &mut directory)?;
        }
    }
    if !block.is_empty() {
        seal(&mut block, &mut out, &mut directory)?;
    }
    let directory_offset = out.len() as u64;
    let blocks = directory.len() as u64 / DIR_ENTRY;
    out.extend_from_slice(&directory);
    let file = ShardEntry::describe(LOOKUP_KEY, samples.len() as u64, &out);
    Ok((
        Bytes::from(out),
        LookupEntry {
            file,
            block_rows: LOOKUP_BLOCK_ROWS,
            blocks,
            directory_offset,
            groups,
            volumes_index_sha256: foreign.map(|f| f.index_sha256.clone()),
        },
    ))
}

/// Builds the lookup of `samples` (see [`build_lookup`]; `manifest` lists the volume shards, `foreign` locates
/// the volumes of another dataset the samples name), stores it and records it in `manifest` (which the caller
/// saves after).
pub fn write_lookup(
    store: &Store,
    manifest: &mut Manifest,
    samples: &[SampleRecord],
    index: &VolumeIndex,
    foreign: Option<&ForeignVolumes>,
) -> Result<(), ShardError> {
    let shard_bytes: Vec<u64> = manifest.volume_shards.iter().map(|e| e.bytes).collect();
    let (bytes, entry) = build_lookup(samples, index, &shard_bytes, foreign)?;
    store.put(LOOKUP_KEY, bytes)?;
    manifest.sample_lookup = Some(entry);
    Ok(())
}

#[derive(Default)]
struct Cache {
    /// Directory entries read so far: (offset, compressed length, decoded length, crc32).
    directory: HashMap<u64, (u64, u32, u32, u32)>,
    /// Decoded blocks, with the tick of their last use.
    blocks: HashMap<u64, (Arc<Vec<LookupRow>>, u64)>,
    tick: u64,
}

/// Reads rows of a stored lookup by ranged requests (see the module docs). Opening makes no request.
pub struct LookupReader {
    store: Store,
    entry: LookupEntry,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for LookupReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LookupReader")
            .field("store", &self.store)
            .field("rows", &self.entry.file.rows)
            .finish_non_exhaustive()
    }
}

impl LookupReader {
    /// The reader of the lookup `entry` describes, in `store`.
    pub fn new(store: Store, entry: LookupEntry) -> LookupReader {
        LookupReader {
            store,
            entry,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Rows (samples).
    pub fn len(&self) -> u64 {
        self.entry.file.rows
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The (split, task) groups.
    pub fn groups(&self) -> &[LookupGroup] {
        &self.entry.groups
    }

    /// See [`LookupEntry::volumes_index_sha256`].
    pub fn volumes_index_sha256(&self) -> Option<&str> {
        self.entry.volumes_index_sha256.as_deref()
    }

    /// The store the lookup (and the dataset) is in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn lock(&self) -> MutexGuard<'_, Cache> {
        // Only caches: a panic elsewhere leaves them consistent.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn corrupt(&self, block: u64, reason: impl std::fmt::Display) -> ShardError {
        ShardError::Invalid(format!(
            "`{}` in `{}`, block {block}: {reason}",
            LOOKUP_KEY,
            self.store.url()
        ))
    }

    /// Runs of consecutive numbers in sorted, deduplicated `items`.
    fn runs(items: &[u64]) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &b in items {
            match runs.last_mut() {
                Some((_, end)) if *end == b => *end += 1,
                _ => runs.push((b, b + 1)),
            }
        }
        runs
    }

    /// Fetches `ranges` of the lookup, up to [`PARALLEL`] at a time, in order.
    fn fetch(&self, ranges: &[std::ops::Range<u64>]) -> Vec<Result<Bytes, ShardError>> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let out: Mutex<Vec<Option<Result<Bytes, ShardError>>>> =
            Mutex::new((0..ranges.len()).map(|_| None).collect());
        let work = || loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(r) = ranges.get(i) else { break };
            let got = self
                .store
                .get_range(LOOKUP_KEY, r.clone())
                .map_err(ShardError::from);
            out.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(got);
        };
        std::thread::scope(|scope| {
            for _ in 1..PARALLEL.min(ranges.len()) {
                scope.spawn(work);
            }
            work();
        });
        out.into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ShardError::Invalid("a request was not made".into()))))
            .collect()
    }

    /// The directory entries of `blocks` (sorted, deduplicated), fetched for those not read before: the
    /// aligned pages of [`DIR_PAGE`] entries that hold them, a request per run of pages, runs concurrently.
    fn directory(&self, blocks: &[u64]) -> Result<Vec<(u64, u32, u32, u32)>, ShardError> {
        let mut pages: Vec<u64> = {
            let c = self.lock();
            blocks
                .iter()
                .filter(|b| !c.directory.contains_key(b))
                .map(|b| b / DIR_PAGE)
                .collect()
        };
        pages.dedup();
        let runs: Vec<(u64, u64)> = Self::runs(&pages)
            .into_iter()
            .map(|(a, b)| (a * DIR_PAGE, (b * DIR_PAGE).min(self.entry.blocks)))
            .collect();
        let ranges: Vec<std::ops::Range<u64>> = runs
            .iter()
            .map(|&(start, end)| {
                let base = self.entry.directory_offset + start * DIR_ENTRY;
                base..base + end.saturating_sub(start) * DIR_ENTRY
            })
            .collect();
        for (&(start, end), bytes) in runs.iter().zip(self.fetch(&ranges)) {
            let bytes = bytes?;
            if bytes.len() as u64 != end.saturating_sub(start) * DIR_ENTRY {
                return Err(self.corrupt(start, "the directory is cut short"));
            }
            let mut c = self.lock();
            for (k, e) in bytes.chunks_exact(DIR_ENTRY as usize).enumerate() {
                let u64_at =
                    |o: usize| u64::from_le_bytes(e[o..o + 8].try_into().unwrap_or([0; 8]));
                let u32_at =
                    |o: usize| u32::from_le_bytes(e[o..o + 4].try_into().unwrap_or([0; 4]));
                c.directory.insert(
                    start + k as u64,
                    (u64_at(0), u32_at(8), u32_at(12), u32_at(16)),
                );
            }
        }
        let c = self.lock();
        blocks
            .iter()
            .map(|b| {
                c.directory
                    .get(b)
                    .copied()
                    .ok_or_else(|| self.corrupt(*b, "no directory entry"))
            })
            .collect()
    }

    /// The decoded blocks `blocks` (sorted, deduplicated): cached, else fetched (adjacent blocks with one
    /// request), crc-checked and decompressed.
    fn blocks(&self, blocks: &[u64]) -> Result<HashMap<u64, Arc<Vec<LookupRow>>>, ShardError> {
        let mut got = HashMap::new();
        let mut missing = Vec::new();
        {
            let mut c = self.lock();
            c.tick += 1;
            let tick = c.tick;
            for &b in blocks {
                match c.blocks.get_mut(&b) {
                    Some((block, last)) => {
                        *last = tick;
                        got.insert(b, Arc::clone(block));
                    }
                    None => missing.push(b),
                }
            }
        }
        // Blocks between two wanted ones at most GAP_BLOCKS apart come with the same request (and are kept):
        // a small lookup is then read in a few requests, while a large one's random blocks stay requests of
        // their own.
        let mut filled: Vec<u64> = Vec::with_capacity(missing.len());
        for &b in &missing {
            if let Some(&prev) = filled.last() {
                if b > prev + 1 && b - prev <= GAP_BLOCKS {
                    filled.extend(prev + 1..b);
                }
            }
            filled.push(b);
        }
        let missing = filled;
        let dir = self.directory(&missing)?;
        let places: HashMap<u64, (u64, u32, u32, u32)> = missing.iter().copied().zip(dir).collect();
        let runs = Self::runs(&missing);
        let mut ranges = Vec::with_capacity(runs.len());
        for &(start, end) in &runs {
            let first = places[&start].0;
            let last = places[&(end - 1)];
            let stop = last.0 + u64::from(last.1);
            if stop < first || stop > self.entry.directory_offset {
                return Err(self.corrupt(start, "the directory points outside the blocks"));
            }
            ranges.push(first..stop);
        }
        for ((&(start, end), range), bytes) in runs.iter().zip(&ranges).zip(self.fetch(&ranges)) {
            let (first, bytes) = (range.start, bytes?);
            for b in start..end {
                let (offset, len, size, crc) = places[&b];
                let from = offset.checked_sub(first).map(|o| o as usize);
                let compressed = from
                    .and_then(|f| bytes.get(f..f + len as usize))
                    .ok_or_else(|| self.corrupt(b, "the directory points outside the read"))?;
                let actual = crc32fast::hash(compressed);
                if actual != crc {
                    return Err(ShardError::Checksum {
                        key: format!("{LOOKUP_KEY} (block {b})"),
                        expected: format!("crc32 {crc:08x}"),
                        actual: format!("crc32 {actual:08x}"),
                    });
                }
                let block = zstd::bulk::decompress(compressed, size as usize)
                    .map_err(|e| self.corrupt(b, format!("does not decompress: {e}")))?;
                got.insert(b, Arc::new(self.decode_block(b, &block)?));
            }
        }
        let mut c = self.lock();
        c.tick += 1;
        let tick = c.tick;
        for b in missing {
            if c.blocks.len() >= BLOCK_CACHE {
                if let Some(victim) = c
                    .blocks
                    .iter()
                    .min_by_key(|(_, (_, t))| *t)
                    .map(|(k, _)| *k)
                {
                    c.blocks.remove(&victim);
                }
            }
            if let Some(block) = got.get(&b) {
                c.blocks.insert(b, (Arc::clone(block), tick));
            }
        }
        Ok(got)
    }

    /// The rows of block `b` from its decompressed bytes.
    fn decode_block(&self, b: u64, block: &[u8]) -> Result<Vec<LookupRow>, ShardError> {
        let per = u64::from(self.entry.block_rows.max(1));
        let n = self.len().saturating_sub(b * per).min(per);
        let mut rest = block;
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let record = decode_record(&mut rest)
                .ok_or_else(|| self.corrupt(b, "a record does not decode"))?;
            let volume = decode_volume(&mut rest, &record.volume_id)
                .ok_or_else(|| self.corrupt(b, "a volume place does not decode"))?;
            out.push(LookupRow { record, volume });
        }
        Ok(out)
    }

    /// Rows `rows` (in that order, repeats allowed), each block fetched and decoded once (and kept decoded).
    pub fn get_many(&self, rows: &[u64]) -> Result<Vec<LookupRow>, ShardError> {
        if let Some(&r) = rows.iter().find(|&&r| r >= self.len()) {
            return Err(ShardError::Invalid(format!(
                "sample {r} out of range ({} samples in `{}`)",
                self.len(),
                self.store.url()
            )));
        }
        let per = u64::from(self.entry.block_rows.max(1));
        let mut wanted: Vec<u64> = rows.iter().map(|r| r / per).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let decoded = self.blocks(&wanted)?;
        rows.iter()
            .map(|&r| {
                decoded
                    .get(&(r / per))
                    .and_then(|rows| rows.get((r % per) as usize))
                    .cloned()
                    .ok_or_else(|| self.corrupt(r / per, "a row is missing"))
            })
            .collect()
    }
}
