//! The worker's sample loader: [`ShardLoader`] opens a converted dataset — through its sample lookup
//! ([`ShardLoader::open_lookup`]: `manifest.json` alone, the records and volume places then fetched a lookup
//! block at a time, by the read-ahead thread for queued steps), or the whole-table way (manifest, volume index
//! and sample tables) for datasets without one; never a volume shard — and serves batches of global sample indices (as the coordinator's plan hands
//! them to a rank) as decoded f32 images (and masks). Volumes are read with ranged requests
//! (`m3d_shards::VolumeReader`: their row groups' bytes and, once per shard, the shard's footer, each volume
//! checked against the index on its own), decoded once and kept in a byte-bounded LRU cache, so a batch costs at
//! most one read per distinct volume it needs. The volumes one call needs are planned per shard: nearby ones
//! come with one request (`VolumeReader::spans`), which is what makes a block shuffle cheap on object storage.
//! A read-ahead thread reads the volumes of the next steps' index lists ([`ShardLoader::prefetch`]; requests
//! that queued up are read together), several requests at a time; a shard of at most 1 MiB it fetches whole
//! (checked against the manifest) and keeps, compressed, for the loads of the shard's other volumes, so small
//! volumes under a global shuffle cost a request per shard rather than per sample. A load reads only its own
//! volumes' bytes.
//!
//! Output depends only on the indices asked for, never on what happens to be cached.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use m3d_shards::{
    decode_sample_into, LookupReader, Manifest, SampleRecord, ShardDataset, ShardError, Store,
    VolumeReader, VolumeRecord,
};

use crate::samples::{SampleTable, SampleTableBuilder, SampleTableError};
use m3d_volume::augment::AugmentParams;

/// Errors of the loader; each names the dataset URL, shard key or sample it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The dataset could not be opened (manifest, volume index or sample shards).
    #[error("dataset `{url}`: {source}")]
    Open {
        url: String,
        #[source]
        source: ShardError,
    },
    /// The read-ahead thread could not be started.
    #[error("dataset `{url}`: starting the read-ahead thread: {source}")]
    Thread {
        url: String,
        #[source]
        source: std::io::Error,
    },
    /// A global sample index past the end of the dataset.
    #[error("dataset `{url}`: sample index {index} out of range ({len} samples)")]
    SampleOutOfRange { url: String, index: u64, len: usize },
    /// A sample references a volume that no volume shard holds.
    #[error("sample {index} (`{sample_id}`): volume `{volume_id}` is in no volume shard")]
    VolumeNotIndexed {
        index: u64,
        sample_id: String,
        volume_id: String,
    },
    /// Fetching, checking or reading one volume failed.
    #[error("volume `{volume_id}` in shard `{key}`: {source}")]
    Volume {
        volume_id: String,
        key: String,
        #[source]
        source: Box<ShardError>,
    },
    /// The compact sample table failed (see [`SampleTableError`]).
    #[error("dataset `{url}`: {source}")]
    Samples {
        url: String,
        #[source]
        source: SampleTableError,
    },
    /// Decoding one sample's image or mask failed.
    #[error("sample {index} (`{sample_id}`): {source}")]
    Decode {
        index: u64,
        sample_id: String,
        #[source]
        source: ShardError,
    },
}

/// Volumes of one read-ahead request read at the same time: on an object store each read is mostly waiting.
const READ_AHEAD_THREADS: usize = 8;

/// A shard of at most this many bytes is fetched whole by read-ahead (one request costs about what a megabyte
/// of transfer does on object storage, `m3d_shards::COALESCE_GAP`) and kept, as fetched, for the loads of its
/// other volumes: with small volumes a global shuffle then costs a request per shard, not per sample. Loads
/// themselves read only their own bytes.
const WHOLE_SHARD_MAX: u64 = m3d_shards::COALESCE_GAP;

/// Bytes of whole shards kept (compressed, as fetched), least recently used dropped first.
const RAW_SHARD_BYTES: usize = 64 << 20;

/// Whole small shards read-ahead fetched, by (reader, shard).
type RawShards = Lru<(usize, u32), bytes::Bytes>;

/// Loader settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Upper bound on the decoded bytes (images + mask bits) of the volumes kept in the cache. A volume larger
    /// than this on its own is used for the request that read it and not kept.
    pub cache_bytes: usize,
    /// Number of [`ShardLoader::prefetch`] requests that may wait for the read-ahead thread; further
    /// requests are dropped (counted in [`LoaderStats::prefetch_dropped`]) rather than blocking the caller.
    /// 0 disables read-ahead.
    pub prefetch_depth: usize,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            cache_bytes: 2 << 30,
            prefetch_depth: 2,
        }
    }
}

/// One loaded sample.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedSample {
    /// Global sample index.
    pub index: u64,
    pub sample: SampleRecord,
    /// (C, D, H, W) of `image`.
    pub shape: [usize; 4],
    /// Decoded image, `prod(shape)` values in C order.
    pub image: Vec<f32>,
    /// The sample's mask (`prod(shape[1..])` values of 0.0 / 1.0) when it has a `mask_index`.
    pub mask: Option<Vec<f32>>,
}

/// Counters since the loader was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoaderStats {
    /// Volume reads from the store (by `load` and by read-ahead).
    pub volume_reads: u64,
    /// Of `volume_reads`, those made by the read-ahead thread.
    pub prefetch_reads: u64,
    /// Volume lookups by `load` served from the cache (or from a read already in flight).
    pub cache_hits: u64,
    /// Volume lookups by `load` that had to read the store.
    pub cache_misses: u64,
    /// Volumes dropped from the cache to stay within `cache_bytes`.
    pub evictions: u64,
    /// Prefetch requests dropped because `prefetch_depth` requests were already waiting.
    pub prefetch_dropped: u64,
    /// Ranged requests made for volumes (a request may bring several volumes of one shard; footers, read
    /// once per shard, are not counted).
    pub requests: u64,
}

/// A volume: which dataset's reader, which volume of it.
type VolumeKey = (usize, usize);

/// A request to the read-ahead thread.
enum Prefetch {
    Keys(Vec<VolumeKey>),
    /// Rows of the sample lookup, resolved to volumes by the thread.
    Rows(Vec<u64>),
}

/// A sample whose volume is in no shard, in [`ShardLoader`]'s packed per-sample volumes.
const NO_VOLUME: u64 = u64::MAX;

/// A volume key in 8 bytes (reader in the high half): a worker keeps one per sample of its training set.
fn pack((reader, volume): VolumeKey) -> u64 {
    ((reader as u64) << 32) | (volume as u64 & 0xffff_ffff)
}

fn unpack(packed: u64) -> VolumeKey {
    ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize)
}

/// The outcome of looking one volume up.
type Lookup = Result<Arc<CachedVolume>, LoadError>;

/// A decoded volume and its size in the cache.
struct CachedVolume {
    record: VolumeRecord,
    bytes: usize,
}

/// Values with a size in bytes, the least recently used dropped once they hold more than a budget: the
/// loader's decoded volumes and read-ahead's whole small shards.
struct Lru<K, V> {
    map: HashMap<K, (V, u64)>,
    held: usize,
    tick: u64,
}

impl<K, V> Default for Lru<K, V> {
    fn default() -> Self {
        Lru {
            map: HashMap::new(),
            held: 0,
            tick: 0,
        }
    }
}

impl<K: std::hash::Hash + Eq + Copy, V> Lru<K, V> {
    /// The value of `key`, now the most recently used.
    fn get(&mut self, key: &K) -> Option<&V> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(key).map(|(v, last)| {
            *last = tick;
            &*v
        })
    }

    fn contains(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// Inserts `value` of `size` bytes and drops the least recently used others until at most `budget` bytes
    /// are held (the value just inserted stays: it alone fits, callers check). Returns how many it dropped.
    fn insert(&mut self, key: K, value: V, size: impl Fn(&V) -> usize, budget: usize) -> u64 {
        self.tick += 1;
        self.held += size(&value);
        if let Some((old, _)) = self.map.insert(key, (value, self.tick)) {
            self.held -= size(&old);
        }
        let mut dropped = 0;
        while self.held > budget {
            let Some(victim) = self
                .map
                .iter()
                .filter(|(k, _)| **k != key)
                .min_by_key(|(_, (_, last))| *last)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some((v, _)) = self.map.remove(&victim) {
                self.held -= size(&v);
                dropped += 1;
            }
        }
        dropped
    }
}

#[derive(Default)]
struct CacheState {
    /// Cached volumes.
    volumes: Lru<VolumeKey, Arc<CachedVolume>>,
    /// Volumes being read right now (by `load` or read-ahead), so a second reader waits instead of re-reading.
    loading: HashSet<VolumeKey>,
    /// Prefetch requests queued or being worked on.
    pending_prefetch: usize,
    /// Message of the last read-ahead failure (the `load` that needs the volume re-reads it and reports it).
    last_prefetch_error: Option<String>,
}

#[derive(Default)]
struct Counters {
    volume_reads: AtomicU64,
    prefetch_reads: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    evictions: AtomicU64,
    prefetch_dropped: AtomicU64,
    requests: AtomicU64,
}

/// What the loader and its read-ahead thread share.
struct Shared {
    url: String,
    /// One reader per dataset the volumes come from.
    readers: Vec<Arc<VolumeReader>>,
    /// Set for a loader opened through the dataset's sample lookup ([`ShardLoader::open_lookup`]): samples
    /// and their volumes' places come from it, a block at a time (the loader's table and per-sample volumes
    /// are then empty).
    lookup: Option<LookupReader>,
    cache_bytes: usize,
    state: Mutex<CacheState>,
    cv: Condvar,
    counters: Counters,
    raw: Mutex<RawShards>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // A panic while holding the lock leaves only counters and an LRU map behind; both stay usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn volume_error(&self, (r, v): VolumeKey, source: ShardError) -> LoadError {
        let reader = self.readers.get(r);
        LoadError::Volume {
            volume_id: reader
                .and_then(|x| x.location(v))
                .map_or_else(|| format!("#{v}"), |l| l.volume_id),
            key: reader
                .and_then(|x| x.shard_key(v))
                .unwrap_or_else(|| "<no shard>".to_string()),
            source: Box::new(source),
        }
    }

    /// The decoded volume `key`: from the cache, from a read in flight, or read now.
    fn get(&self, key: VolumeKey, by_prefetch: bool) -> Lookup {
        let mut st = self.lock();
        loop {
            if let Some(vol) = st.volumes.get(&key) {
                if !by_prefetch {
                    self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(Arc::clone(vol));
            }
            if !st.loading.contains(&key) {
                break;
            }
            // Another thread is reading it: wait, then look again (it may have failed or not been kept).
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.loading.insert(key);
        drop(st);
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let result = self.read_volume(key);
        self.settle(key, &result, by_prefetch);
        result
    }

    /// Each of `keys` (from the cache, from a read in flight, or read now), in order. The volumes read now are
    /// planned into ranged requests per shard (`VolumeReader::spans`: nearby volumes of one shard in one
    /// request), up to [`READ_AHEAD_THREADS`] requests at a time.
    fn get_many(&self, keys: &[VolumeKey], by_prefetch: bool) -> Vec<Lookup> {
        // Claim the volumes nobody has or is reading; the rest are served (or waited for) by `get` below.
        let mut claimed: Vec<Vec<usize>> = vec![Vec::new(); self.readers.len()];
        let mut foreign = Vec::new();
        {
            let mut st = self.lock();
            for &key in keys {
                if key.0 < claimed.len() && !st.volumes.contains(&key) && !st.loading.contains(&key)
                {
                    st.loading.insert(key);
                    claimed[key.0].push(key.1);
                } else {
                    foreign.push(key);
                }
            }
        }
        let mut done: HashMap<VolumeKey, Lookup> = HashMap::new();
        let mut jobs = Vec::new();
        for (r, volumes) in claimed.into_iter().enumerate() {
            if volumes.is_empty() {
                continue;
            }
            match self.readers[r].spans(&volumes) {
                Ok(spans) => jobs.extend(spans.into_iter().map(|s| (r, s))),
                Err(e) => {
                    let msg = e.to_string();
                    for v in volumes {
                        let err = self.volume_error((r, v), ShardError::Invalid(msg.clone()));
                        let err = Err(err);
                        self.settle((r, v), &err, by_prefetch);
                        done.insert((r, v), err);
                    }
                }
            }
        }
        let done = Mutex::new(done);
        let next = AtomicUsize::new(0);
        let work = || {
            while let Some((r, span)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                let mut results = self.read_span(*r, span, by_prefetch);
                let mut done = done.lock().unwrap_or_else(|p| p.into_inner());
                for (key, result) in results.drain(..) {
                    self.settle(key, &result, by_prefetch);
                    done.insert(key, result);
                }
            }
        };
        let helpers = READ_AHEAD_THREADS.min(jobs.len()).saturating_sub(1);
        std::thread::scope(|scope| {
            for _ in 0..helpers {
                scope.spawn(work);
            }
            work();
        });
        let mut done = done.into_inner().unwrap_or_else(|p| p.into_inner());
        keys.iter()
            .map(|&key| match done.remove(&key) {
                Some(result) => result,
                // Cached, read by another thread (waited for here), or a repeat of a key just read.
                None => self.get(key, by_prefetch),
            })
            .collect()
    }

    /// Reads the volumes of one span of reader `r`: from a whole shard read-ahead kept, else with one request
    /// (read-ahead fetches a shard of at most [`WHOLE_SHARD_MAX`] bytes whole and keeps it for the loads that
    /// follow; loads read their own bytes).
    fn read_span(
        &self,
        r: usize,
        span: &m3d_shards::ReadSpan,
        by_prefetch: bool,
    ) -> Vec<(VolumeKey, Lookup)> {
        let reader = &self.readers[r];
        let outcome = if let Some(whole) = self.raw_get((r, span.shard)) {
            reader.read_span_from(span, &whole, true, true)
        } else if by_prefetch
            && reader
                .shard_bytes(span.shard)
                .is_some_and(|b| b <= WHOLE_SHARD_MAX)
        {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            reader.fetch_shard(span.shard).and_then(|whole| {
                self.raw_put((r, span.shard), whole.clone());
                reader.read_span_from(span, &whole, true, true)
            })
        } else {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            reader.read_span(span, true, true)
        };
        match outcome {
            Ok(records) => records
                .into_iter()
                .map(|(v, record)| {
                    let key = (r, v);
                    let result = record
                        .map(|record| {
                            let bytes = record.image.len()
                                + record.masks.iter().map(|m| m.bits.len()).sum::<usize>();
                            Arc::new(CachedVolume { record, bytes })
                        })
                        .map_err(|e| self.volume_error(key, e));
                    (key, result)
                })
                .collect(),
            // One volume keeps the request's own error; several share its message.
            Err(e) if span.volumes.len() == 1 => {
                let key = (r, span.volumes[0]);
                vec![(key, Err(self.volume_error(key, e)))]
            }
            Err(e) => {
                let msg = e.to_string();
                span.volumes
                    .iter()
                    .map(|&v| {
                        let key = (r, v);
                        (
                            key,
                            Err(self.volume_error(key, ShardError::Invalid(msg.clone()))),
                        )
                    })
                    .collect()
            }
        }
    }

    fn raw_lock(&self) -> MutexGuard<'_, RawShards> {
        // Only a cache: a panic while holding it leaves a consistent map.
        self.raw.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raw_get(&self, key: (usize, u32)) -> Option<bytes::Bytes> {
        self.raw_lock().get(&key).cloned()
    }

    fn raw_put(&self, key: (usize, u32), whole: bytes::Bytes) {
        self.raw_lock()
            .insert(key, whole, bytes::Bytes::len, RAW_SHARD_BYTES);
    }

    /// Records the outcome of reading claimed volume `key`: counted, cached when read, released for waiters.
    fn settle(&self, key: VolumeKey, result: &Lookup, by_prefetch: bool) {
        if by_prefetch {
            self.counters.prefetch_reads.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.cache_misses.fetch_add(1, Ordering::Relaxed);
        }
        self.counters.volume_reads.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        st.loading.remove(&key);
        if let Ok(vol) = result {
            self.insert(&mut st, key, Arc::clone(vol));
        }
        drop(st);
        self.cv.notify_all();
    }

    /// Reads (into the cache) those of `keys` not cached yet, several at a time. Failures are kept for
    /// [`ShardLoader::last_prefetch_error`]; the step that needs the volume reads it again and reports the
    /// error itself.
    fn read_all(&self, keys: &[VolumeKey]) {
        let missing: Vec<VolumeKey> = {
            let st = self.lock();
            keys.iter()
                .copied()
                .filter(|k| !st.volumes.contains(k))
                .collect()
        };
        for r in self.get_many(&missing, true) {
            if let Err(e) = r {
                self.lock().last_prefetch_error = Some(e.to_string());
            }
        }
    }

    fn insert(&self, st: &mut CacheState, key: VolumeKey, vol: Arc<CachedVolume>) {
        if vol.bytes > self.cache_bytes {
            return;
        }
        let dropped = st.volumes.insert(key, vol, |v| v.bytes, self.cache_bytes);
        self.counters
            .evictions
            .fetch_add(dropped, Ordering::Relaxed);
    }

    fn lookup_error(&self, source: ShardError) -> LoadError {
        LoadError::Open {
            url: self.url.clone(),
            source,
        }
    }

    /// The volumes of lookup rows `rows` (in range), their places learned by the volume readers.
    fn lookup_keys(&self, rows: &[u64]) -> Result<Vec<VolumeKey>, LoadError> {
        self.lookup_rows(rows).map(|(keys, _)| keys)
    }

    /// The volumes and records of lookup rows `rows` (in range), from one lookup of their blocks.
    fn lookup_rows(&self, rows: &[u64]) -> Result<(Vec<VolumeKey>, Vec<SampleRecord>), LoadError> {
        let Some(lookup) = &self.lookup else {
            return Err(self.lookup_error(ShardError::Invalid("no sample lookup".into())));
        };
        let looked_up = lookup
            .get_many(rows)
            .map_err(|source| self.lookup_error(source))?;
        let readers = &self.readers;
        let mut keys = Vec::with_capacity(rows.len());
        let mut records = Vec::with_capacity(rows.len());
        for (&index, row) in rows.iter().zip(looked_up) {
            match row.volume {
                // Reader 1 is the volumes dataset's, opened only when the lookup's places match its index.
                Some(v) if !v.foreign || readers.len() > 1 => {
                    let r = usize::from(v.foreign);
                    readers[r].learn(&v);
                    keys.push((r, v.position as usize));
                    records.push(row.record);
                }
                _ => {
                    return Err(LoadError::VolumeNotIndexed {
                        index,
                        sample_id: row.record.sample_id,
                        volume_id: row.record.volume_id,
                    })
                }
            }
        }
        Ok((keys, records))
    }

    fn read_volume(&self, key: VolumeKey) -> Result<Arc<CachedVolume>, LoadError> {
        let reader = self.readers.get(key.0).ok_or_else(|| {
            self.volume_error(key, ShardError::Invalid(format!("no dataset {}", key.0)))
        })?;
        let record = reader
            .read(key.1, true, true)
            .map_err(|e| self.volume_error(key, e))?;
        let bytes = record.image.len() + record.masks.iter().map(|m| m.bits.len()).sum::<usize>();
        Ok(Arc::new(CachedVolume { record, bytes }))
    }
}

/// Volume readers by dataset URL, for loaders that share them: M3D-VQA's samples read M3D-Cap's volumes, and
/// Cap's index (one entry per volume: 120K of them) is then held once, not once per loader.
#[derive(Default)]
pub struct VolumeReaders {
    by_url: HashMap<String, Arc<VolumeReader>>,
}

impl VolumeReaders {
    /// The number of datasets whose readers are held.
    pub fn len(&self) -> usize {
        self.by_url.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_url.is_empty()
    }

    /// The reader of the dataset at `url`, opened now (from `dataset` when the caller has its manifest) if
    /// no loader opened it before.
    fn get(
        &mut self,
        url: &str,
        dataset: Option<&ShardDataset>,
    ) -> Result<Arc<VolumeReader>, LoadError> {
        if let Some(r) = self.by_url.get(url) {
            return Ok(Arc::clone(r));
        }
        let err = |source| LoadError::Open {
            url: url.to_string(),
            source,
        };
        let reader = match dataset {
            Some(ds) => VolumeReader::open(ds),
            None => VolumeReader::open(&ShardDataset::open_for_volumes(url).map_err(err)?),
        }
        .map_err(err)?;
        let reader = Arc::new(reader);
        self.by_url.insert(url.to_string(), Arc::clone(&reader));
        Ok(reader)
    }

    /// The reader of the dataset in `store` that learns volume places from its sample lookup, shared by the
    /// loaders that open `url` through its lookup (kept apart from the index readers, which find volumes by
    /// id).
    fn learning(&mut self, url: &str, store: &Store, volumes: usize) -> Arc<VolumeReader> {
        Arc::clone(
            self.by_url
                .entry(format!("lookup:{url}"))
                .or_insert_with(|| Arc::new(VolumeReader::learning(store.clone(), volumes))),
        )
    }
}

/// Serves decoded samples of one dataset by global sample index; see the module docs.
pub struct ShardLoader {
    url: String,
    samples: SampleTable,
    /// The volume of each sample, packed by [`pack`] ([`NO_VOLUME`]: in no shard; reported when loaded).
    sample_volume: Vec<u64>,
    shared: Arc<Shared>,
    prefetch_tx: Option<SyncSender<Prefetch>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ShardLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardLoader")
            .field("url", &self.url)
            .field("samples", &self.samples.len())
            .field("volumes", &self.num_volumes())
            .field("cache_bytes", &self.shared.cache_bytes)
            .finish()
    }
}

impl ShardLoader {
    /// Opens the dataset at `url` (any `Store` URL): its manifest, volume index and sample shards.
    pub fn open(url: &str, opts: LoaderOptions) -> Result<Self, LoadError> {
        Self::open_with_volumes(url, &[], opts)
    }

    /// [`ShardLoader::open`] for a dataset whose samples refer to volumes stored in other shard datasets too
    /// (M3D-VQA's samples name M3D-Cap volumes): the volume indices of `url` and of every `volume_urls`
    /// dataset are read; a volume id found in several is taken from the first.
    pub fn open_with_volumes(
        url: &str,
        volume_urls: &[String],
        opts: LoaderOptions,
    ) -> Result<Self, LoadError> {
        Self::open_sharing(url, volume_urls, opts, &mut VolumeReaders::default())
    }

    /// [`ShardLoader::open_with_volumes`] taking the volume readers from `readers` (opening and adding those
    /// it lacks): the loaders of one training set share each dataset's volume index.
    pub fn open_sharing(
        url: &str,
        volume_urls: &[String],
        opts: LoaderOptions,
        shared_readers: &mut VolumeReaders,
    ) -> Result<Self, LoadError> {
        let open_err = |url: &str| {
            let url = url.to_string();
            move |source| LoadError::Open { url, source }
        };
        // The manifest first, then the volume indices, then the samples a batch at a time into the compact
        // table, each resolved to its volume on the way: the records are never all held at once.
        let dataset = ShardDataset::open_for_volumes(url).map_err(open_err(url))?;
        let mut readers = vec![shared_readers.get(url, Some(&dataset))?];
        for vurl in volume_urls {
            readers.push(shared_readers.get(vurl, None)?);
        }
        let tmp = std::env::temp_dir();
        let mut table = SampleTableBuilder::spilling(&tmp).unwrap_or_else(|e| {
            // Memory instead of the temp folder: the same table, only larger in RSS.
            tracing::warn!(url, error = %e, "keeping the sample table in memory");
            SampleTableBuilder::default()
        });
        let mut sample_volume = Vec::new();
        let mut table_error = None;
        dataset
            .read_samples(|total, batch| {
                if sample_volume.is_empty() {
                    sample_volume.reserve_exact(total);
                    table.reserve(total);
                }
                for s in &batch {
                    let key = readers
                        .iter()
                        .enumerate()
                        .find_map(|(r, reader)| reader.locate(&s.volume_id).map(|v| (r, v)));
                    sample_volume.push(key.map_or(NO_VOLUME, pack));
                    if let Err(e) = table.push(s) {
                        table_error.get_or_insert(e);
                    }
                }
                Ok(())
            })
            .map_err(open_err(url))?;
        let samples_err = |source| LoadError::Samples {
            url: url.to_string(),
            source,
        };
        if let Some(e) = table_error {
            return Err(samples_err(e));
        }
        let samples = table.finish().map_err(samples_err)?;
        Self::start(url, samples, sample_volume, None, readers, opts)
    }

    /// Opens the dataset at `url` through its sample lookup (`m3d_shards::lookup`), for a training set:
    /// reads `manifest.json` alone, a few KiB whatever the dataset's size (and, for samples whose volumes are
    /// in the one `volume_urls` dataset, that dataset's `manifest.json`); each sample's record and volume place
    /// are fetched with the blocks of the lookup a step needs. Sample `i` is row `i` of the lookup, whose rows
    /// are grouped by split and task ([`ShardLoader::lookup_groups`]). `Ok(None)` where the lookup cannot
    /// serve: a dataset without one (converted before it existed), or whose samples name volumes of
    /// `volume_urls` that its lookup does not locate (written without `--cap`, or for a volumes dataset whose
    /// index has changed since); open those with [`ShardLoader::open_sharing`].
    pub fn open_lookup(
        url: &str,
        volume_urls: &[String],
        opts: LoaderOptions,
        shared_readers: &mut VolumeReaders,
    ) -> Result<Option<Self>, LoadError> {
        let store = Store::open_existing(url).map_err(|e| LoadError::Open {
            url: url.to_string(),
            source: e.into(),
        })?;
        Self::open_lookup_in(store, volume_urls, opts, shared_readers)
    }

    /// [`ShardLoader::open_lookup`] of the dataset at the root of `store` (already opened: e.g. with an I/O
    /// log).
    pub fn open_lookup_in(
        store: Store,
        volume_urls: &[String],
        opts: LoaderOptions,
        shared_readers: &mut VolumeReaders,
    ) -> Result<Option<Self>, LoadError> {
        let url = &store.url().to_string();
        let open_err = |source| LoadError::Open {
            url: url.to_string(),
            source,
        };
        let manifest = Manifest::load_head(&store).map_err(open_err)?;
        let Some(entry) = manifest.sample_lookup else {
            return Ok(None);
        };
        let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let mut readers =
            vec![shared_readers.learning(url, &store, count(manifest.totals.volumes))];
        match (entry.volumes_index_sha256.as_deref(), volume_urls) {
            (_, []) => {}
            (Some(sha), [vurl]) => {
                let verr = |source| LoadError::Open {
                    url: vurl.clone(),
                    source,
                };
                let vstore = Store::open_existing(vurl).map_err(|e| verr(e.into()))?;
                let head = Manifest::load_head(&vstore).map_err(verr)?;
                if head.volume_index.as_ref().map(|e| e.sha256.as_str()) != Some(sha) {
                    tracing::warn!(
                        url,
                        volumes = vurl.as_str(),
                        "the sample lookup locates the volumes of another index than the volume dataset's: \
                         opening the whole-table way"
                    );
                    return Ok(None);
                }
                readers.push(shared_readers.learning(vurl, &vstore, count(head.totals.volumes)));
            }
            _ => return Ok(None),
        }
        let lookup = LookupReader::new(store, entry);
        Self::start(
            url,
            SampleTable::default(),
            Vec::new(),
            Some(lookup),
            readers,
            opts,
        )
        .map(Some)
    }

    /// The loader of `url` over its samples and volume readers, with its read-ahead thread started.
    fn start(
        url: &str,
        samples: SampleTable,
        sample_volume: Vec<u64>,
        lookup: Option<LookupReader>,
        readers: Vec<Arc<VolumeReader>>,
        opts: LoaderOptions,
    ) -> Result<Self, LoadError> {
        let shared = Arc::new(Shared {
            url: url.to_string(),
            readers,
            lookup,
            cache_bytes: opts.cache_bytes,
            state: Mutex::new(CacheState::default()),
            cv: Condvar::new(),
            counters: Counters::default(),
            raw: Mutex::new(RawShards::default()),
        });
        let (prefetch_tx, thread) = if opts.prefetch_depth > 0 {
            let (tx, rx) = sync_channel::<Prefetch>(opts.prefetch_depth);
            let sh = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name("m3d-volume-prefetch".into())
                .spawn(move || {
                    // Ends when the loader drops its sender. Requests already waiting are read together, so
                    // that volumes of one shard wanted by several steps share requests. Rows of the lookup
                    // are resolved here, off the caller's thread: the lookup's blocks are requests too.
                    while let Ok(first) = rx.recv() {
                        let mut taken = 0;
                        let mut keys = Vec::new();
                        for request in
                            std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok()))
                        {
                            taken += 1;
                            match request {
                                Prefetch::Keys(k) => keys.extend(k),
                                Prefetch::Rows(rows) => match sh.lookup_keys(&rows) {
                                    Ok(k) => keys.extend(k),
                                    Err(e) => sh.lock().last_prefetch_error = Some(e.to_string()),
                                },
                            }
                        }
                        let mut seen = HashSet::new();
                        keys.retain(|k| seen.insert(*k));
                        sh.read_all(&keys);
                        let mut st = sh.lock();
                        st.pending_prefetch = st.pending_prefetch.saturating_sub(taken);
                        drop(st);
                        sh.cv.notify_all();
                    }
                })
                .map_err(|source| LoadError::Thread {
                    url: url.to_string(),
                    source,
                })?;
            (Some(tx), Some(handle))
        } else {
            (None, None)
        };
        Ok(ShardLoader {
            url: url.to_string(),
            samples,
            sample_volume,
            shared,
            prefetch_tx,
            thread,
        })
    }

    /// The dataset's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Number of samples in the dataset (valid indices are `0..len()`).
    pub fn len(&self) -> usize {
        match &self.shared.lookup {
            Some(l) => usize::try_from(l.len()).unwrap_or(usize::MAX),
            None => self.samples.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sample table, by global index; empty for a loader opened through the sample lookup, whose records
    /// are read a block at a time ([`ShardLoader::sample`], [`ShardLoader::records`]).
    pub fn samples(&self) -> &SampleTable {
        &self.samples
    }

    /// The (split, task) groups of the lookup's rows, for a loader opened by [`ShardLoader::open_lookup`].
    pub fn lookup_groups(&self) -> Option<&[m3d_shards::LookupGroup]> {
        self.shared.lookup.as_ref().map(|l| l.groups())
    }

    /// Sample records `range`, decoded (a block of the table or the lookup at a time).
    pub fn records(&self, range: std::ops::Range<u64>) -> Result<Vec<SampleRecord>, LoadError> {
        let indices: Vec<u64> = range.collect();
        self.samples_at(&indices)
    }

    /// Sample record `index`, decoded from the table.
    pub fn sample(&self, index: u64) -> Result<SampleRecord, LoadError> {
        let mut one = self.samples_at(&[index])?;
        one.pop().ok_or_else(|| LoadError::SampleOutOfRange {
            url: self.url.clone(),
            index,
            len: self.len(),
        })
    }

    /// Sample records `indices`, in that order, each block of the table decompressed once.
    fn samples_at(&self, indices: &[u64]) -> Result<Vec<SampleRecord>, LoadError> {
        if let Some(lookup) = &self.shared.lookup {
            self.check_range(indices)?;
            let rows = lookup
                .get_many(indices)
                .map_err(|source| self.shared.lookup_error(source))?;
            return Ok(rows.into_iter().map(|r| r.record).collect());
        }
        let positions: Vec<usize> = indices
            .iter()
            .map(|&i| usize::try_from(i).unwrap_or(usize::MAX))
            .collect();
        self.samples
            .get_many(&positions)
            .map_err(|source| match source {
                SampleTableError::OutOfRange { index, len } => LoadError::SampleOutOfRange {
                    url: self.url.clone(),
                    index: index as u64,
                    len,
                },
                source => LoadError::Samples {
                    url: self.url.clone(),
                    source,
                },
            })
    }

    /// Number of volumes the samples can come from (of every dataset read).
    pub fn num_volumes(&self) -> usize {
        self.shared.readers.iter().map(|r| r.len()).sum()
    }

    /// The volume of sample `index`; `Err` names the sample when it is out of range or its volume is in
    /// no shard (decoding its record only then, for the message).
    fn volume_of(&self, index: u64) -> Result<VolumeKey, LoadError> {
        let packed = usize::try_from(index)
            .ok()
            .and_then(|i| self.sample_volume.get(i).copied())
            .ok_or_else(|| LoadError::SampleOutOfRange {
                url: self.url.clone(),
                index,
                len: self.samples.len(),
            })?;
        if packed == NO_VOLUME {
            let sample = self.sample(index)?;
            return Err(LoadError::VolumeNotIndexed {
                index,
                sample_id: sample.sample_id,
                volume_id: sample.volume_id,
            });
        }
        Ok(unpack(packed))
    }

    /// `Err` naming the first of `indices` past the end.
    fn check_range(&self, indices: &[u64]) -> Result<(), LoadError> {
        let len = self.len();
        match indices.iter().find(|&&i| i >= len as u64) {
            Some(&index) => Err(LoadError::SampleOutOfRange {
                url: self.url.clone(),
                index,
                len,
            }),
            None => Ok(()),
        }
    }

    /// The volume of each of `indices`: from the per-sample volumes, or from the lookup (whose places the
    /// volume reader learns then, before any read of them).
    fn keys_for(&self, indices: &[u64]) -> Result<Vec<VolumeKey>, LoadError> {
        if self.shared.lookup.is_none() {
            return indices.iter().map(|&i| self.volume_of(i)).collect();
        }
        self.check_range(indices)?;
        self.shared.lookup_keys(indices)
    }

    /// Distinct volumes needed by `indices`, in first-use order.
    fn volumes_for(&self, indices: &[u64]) -> Result<Vec<VolumeKey>, LoadError> {
        Ok(distinct(&self.keys_for(indices)?))
    }

    /// Decodes the samples at `indices` (in that order; repeats allowed), without augmentation. Each distinct
    /// volume is looked up once per call, so a call reads the store at most once per distinct volume even when
    /// the cache is smaller than that working set; volumes not cached are read several at a time.
    pub fn load(&self, indices: &[u64]) -> Result<Vec<LoadedSample>, LoadError> {
        self.load_augmented(indices, &[])
    }

    /// [`ShardLoader::load`] with the reference's training augmentation of each sample (`augment[i]` for
    /// `indices[i]`; missing or `None`: none), fused into the decoding pass (`m3d_volume::augment`).
    pub fn load_augmented(
        &self,
        indices: &[u64],
        augment: &[Option<AugmentParams>],
    ) -> Result<Vec<LoadedSample>, LoadError> {
        // Validate every index before any volume read so a bad index fails fast and names itself.
        // Through the lookup, the records come with the volumes from the same blocks.
        let (keys, records) = if self.shared.lookup.is_some() {
            self.check_range(indices)?;
            let (keys, records) = self.shared.lookup_rows(indices)?;
            (keys, Some(records))
        } else {
            (self.keys_for(indices)?, None)
        };
        let order = distinct(&keys);
        let mut volumes: HashMap<VolumeKey, Arc<CachedVolume>> = HashMap::new();
        for (key, vol) in order.iter().zip(self.shared.get_many(&order, false)) {
            volumes.insert(*key, vol?);
        }
        let records = match records {
            Some(records) => records,
            None => self.samples_at(indices)?,
        };
        let mut scratch = Vec::new();
        let mut out = Vec::with_capacity(indices.len());
        for ((pos, &index), sample) in indices.iter().enumerate().zip(records) {
            let key = keys[pos];
            let vol = volumes.get(&key).map(|v| &v.record).ok_or_else(|| {
                LoadError::VolumeNotIndexed {
                    index,
                    sample_id: sample.sample_id.clone(),
                    volume_id: sample.volume_id.clone(),
                }
            })?;
            let mut image = vec![0.0f32; vol.numel()];
            let mut mask = sample.mask_index.map(|_| vec![0.0f32; vol.spatial_numel()]);
            let shape = decode_sample_into(
                vol,
                sample.mask_index,
                augment.get(pos).and_then(Option::as_ref),
                &mut scratch,
                &mut image,
                mask.as_deref_mut(),
            )
            .map_err(|source| LoadError::Decode {
                index,
                sample_id: sample.sample_id.clone(),
                source,
            })?;
            out.push(LoadedSample {
                index,
                sample,
                shape,
                image,
                mask,
            });
        }
        Ok(out)
    }

    /// Queues the volumes of a future step's `indices` for the read-ahead thread. Returns `Ok(false)` when the
    /// request was dropped (read-ahead disabled or `prefetch_depth` requests already waiting); an invalid
    /// index is reported now.
    pub fn prefetch(&self, indices: &[u64]) -> Result<bool, LoadError> {
        let request = if self.shared.lookup.is_some() {
            self.check_range(indices)?;
            Prefetch::Rows(indices.to_vec())
        } else {
            Prefetch::Keys(self.volumes_for(indices)?)
        };
        let Some(tx) = &self.prefetch_tx else {
            self.shared
                .counters
                .prefetch_dropped
                .fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        };
        self.shared.lock().pending_prefetch += 1;
        match tx.try_send(request) {
            Ok(()) => Ok(true),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                let mut st = self.shared.lock();
                st.pending_prefetch = st.pending_prefetch.saturating_sub(1);
                drop(st);
                self.shared
                    .counters
                    .prefetch_dropped
                    .fetch_add(1, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    /// Blocks until every queued prefetch request has been worked through (for tests and for a clean
    /// shutdown; the training loop never needs to wait for read-ahead).
    pub fn wait_prefetched(&self) {
        let mut st = self.shared.lock();
        while st.pending_prefetch > 0 {
            st = self.shared.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Message of the last read-ahead failure, if any.
    pub fn last_prefetch_error(&self) -> Option<String> {
        self.shared.lock().last_prefetch_error.clone()
    }

    /// The ids of the volumes currently cached, least recently used first.
    pub fn cached_volumes(&self) -> Vec<String> {
        let st = self.shared.lock();
        let mut v: Vec<(&CachedVolume, u64)> = st
            .volumes
            .map
            .values()
            .map(|(c, t)| (c.as_ref(), *t))
            .collect();
        v.sort_by_key(|(_, t)| *t);
        v.into_iter()
            .map(|(c, _)| c.record.volume_id.clone())
            .collect()
    }

    /// Decoded bytes currently held by the cache.
    pub fn cached_bytes(&self) -> usize {
        self.shared.lock().volumes.held
    }

    pub fn stats(&self) -> LoaderStats {
        let c = &self.shared.counters;
        LoaderStats {
            volume_reads: c.volume_reads.load(Ordering::Relaxed),
            prefetch_reads: c.prefetch_reads.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            cache_misses: c.cache_misses.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            prefetch_dropped: c.prefetch_dropped.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
        }
    }
}

/// `keys` without repeats, in first-use order.
fn distinct(keys: &[VolumeKey]) -> Vec<VolumeKey> {
    let mut seen = HashSet::new();
    keys.iter().copied().filter(|k| seen.insert(*k)).collect()
}

impl Drop for ShardLoader {
    fn drop(&mut self) {
        // Closing the channel ends the read-ahead thread after its current request.
        self.prefetch_tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
