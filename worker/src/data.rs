//! The worker's sample loader: [`ShardLoader`] opens a converted dataset once, indexes which volume shard
//! holds each volume, and serves batches of global sample indices (as the coordinator's plan hands them to a
//! rank) as decoded f32 images (and masks). Whole volume shards are fetched, checked and decoded once and
//! kept in a byte-bounded LRU cache, so a batch costs at most one store read per distinct shard it touches;
//! a read-ahead thread fetches the shards of the next steps' index lists ([`ShardLoader::prefetch`]).
//!
//! Output depends only on the indices asked for, never on what happens to be cached.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use m3d_shards::{
    decode_sample_into, Manifest, SampleRecord, ShardDataset, ShardEntry, ShardError, Store,
    VolumeRecord, VolumeShardReader,
};
use m3d_volume::augment::AugmentParams;

/// Errors of the loader; each names the dataset URL, shard key or sample it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The dataset could not be opened (manifest or sample shards).
    #[error("dataset `{url}`: {source}")]
    Open {
        url: String,
        #[source]
        source: ShardError,
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
    /// The shard was indexed as holding the volume but no longer does (changed under the loader).
    #[error("sample {index} (`{sample_id}`): volume `{volume_id}` missing from shard `{key}`")]
    VolumeMissing {
        index: u64,
        sample_id: String,
        volume_id: String,
        key: String,
    },
    /// Fetching, checking or reading one volume shard failed.
    #[error("volume shard `{key}` (#{shard}): {source}")]
    Shard {
        shard: usize,
        key: String,
        #[source]
        source: ShardError,
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

/// Shards of one read-ahead request read at the same time.
const READ_AHEAD_THREADS: usize = 4;

/// Loader settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Upper bound on the decoded bytes (images + mask bits) of the shards kept in the cache. A shard larger
    /// than this on its own is used for the request that fetched it and not kept.
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
    /// Volume-shard reads made while indexing at open (one per shard, images not decoded).
    pub index_reads: u64,
    /// Volume-shard reads from the store after open (by `load` and by read-ahead).
    pub shard_reads: u64,
    /// Of `shard_reads`, those made by the read-ahead thread.
    pub prefetch_reads: u64,
    /// Shard lookups by `load` served from the cache (or from a read already in flight).
    pub cache_hits: u64,
    /// Shard lookups by `load` that had to read the store.
    pub cache_misses: u64,
    /// Shards dropped from the cache to stay within `cache_bytes`.
    pub evictions: u64,
    /// Prefetch requests dropped because `prefetch_depth` requests were already waiting.
    pub prefetch_dropped: u64,
}

/// The decoded volumes of one shard.
struct ShardVolumes {
    by_id: HashMap<String, VolumeRecord>,
    bytes: usize,
}

#[derive(Default)]
struct CacheState {
    /// Cached shards and their last-use tick.
    entries: HashMap<usize, (Arc<ShardVolumes>, u64)>,
    total_bytes: usize,
    tick: u64,
    /// Shards being read right now (by `load` or read-ahead), so a second reader waits instead of re-reading.
    loading: HashSet<usize>,
    /// Prefetch requests queued or being worked on.
    pending_prefetch: usize,
    /// Message of the last read-ahead failure (the `load` that needs the shard re-reads it and reports it).
    last_prefetch_error: Option<String>,
}

#[derive(Default)]
struct Counters {
    shard_reads: AtomicU64,
    prefetch_reads: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    evictions: AtomicU64,
    prefetch_dropped: AtomicU64,
}

/// What the loader and its read-ahead thread share.
struct Shared {
    /// The stores of the datasets the volume shards come from, and each shard's store.
    stores: Vec<Store>,
    entry_store: Vec<usize>,
    entries: Vec<ShardEntry>,
    cache_bytes: usize,
    state: Mutex<CacheState>,
    cv: Condvar,
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // A panic while holding the lock leaves only counters and an LRU map behind; both stay usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shard_error(&self, shard: usize, source: ShardError) -> LoadError {
        LoadError::Shard {
            shard,
            key: self
                .entries
                .get(shard)
                .map_or_else(|| format!("<shard {shard}>"), |e| e.key.clone()),
            source,
        }
    }

    /// The decoded volumes of shard `shard`: from the cache, from a read in flight, or read now.
    fn get(&self, shard: usize, by_prefetch: bool) -> Result<Arc<ShardVolumes>, LoadError> {
        let mut st = self.lock();
        loop {
            st.tick += 1;
            let tick = st.tick;
            if let Some((vols, last)) = st.entries.get_mut(&shard) {
                *last = tick;
                if !by_prefetch {
                    self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(Arc::clone(vols));
            }
            if !st.loading.contains(&shard) {
                break;
            }
            // Another thread is reading it: wait, then look again (it may have failed or not been kept).
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.loading.insert(shard);
        drop(st);
        if by_prefetch {
            self.counters.prefetch_reads.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.cache_misses.fetch_add(1, Ordering::Relaxed);
        }
        self.counters.shard_reads.fetch_add(1, Ordering::Relaxed);
        let result = self.read_shard(shard);
        let mut st = self.lock();
        st.loading.remove(&shard);
        if let Ok(vols) = &result {
            self.insert(&mut st, shard, Arc::clone(vols));
        }
        drop(st);
        self.cv.notify_all();
        result
    }

    /// Reads (into the cache) those of `shards` not cached yet, up to [`READ_AHEAD_THREADS`] at a time: a
    /// cold start (a new round, a resume) needs several shards at once, and on an object store each read
    /// is mostly waiting. Failures are kept for [`ShardLoader::last_prefetch_error`]; the step that needs
    /// the shard reads it again and reports the error itself.
    fn read_all(&self, shards: &[usize]) {
        let missing: Vec<usize> = {
            let st = self.lock();
            shards
                .iter()
                .copied()
                .filter(|s| !st.entries.contains_key(s))
                .collect()
        };
        let next = AtomicUsize::new(0);
        let work = || {
            while let Some(&shard) = missing.get(next.fetch_add(1, Ordering::Relaxed)) {
                if let Err(e) = self.get(shard, true) {
                    self.lock().last_prefetch_error = Some(e.to_string());
                }
            }
        };
        let helpers = READ_AHEAD_THREADS.min(missing.len()).saturating_sub(1);
        std::thread::scope(|scope| {
            for _ in 0..helpers {
                scope.spawn(work);
            }
            work();
        });
    }

    fn insert(&self, st: &mut CacheState, shard: usize, vols: Arc<ShardVolumes>) {
        if vols.bytes > self.cache_bytes {
            return;
        }
        st.tick += 1;
        let tick = st.tick;
        st.total_bytes += vols.bytes;
        st.entries.insert(shard, (vols, tick));
        while st.total_bytes > self.cache_bytes {
            // Least recently used other than the one just inserted (which alone fits).
            let Some(victim) = st
                .entries
                .iter()
                .filter(|(k, _)| **k != shard)
                .min_by_key(|(_, (_, last))| *last)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some((v, _)) = st.entries.remove(&victim) {
                st.total_bytes -= v.bytes;
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn read_shard(&self, shard: usize) -> Result<Arc<ShardVolumes>, LoadError> {
        let entry = self.entries.get(shard).ok_or_else(|| {
            self.shard_error(
                shard,
                ShardError::Invalid(format!("only {} volume shards", self.entries.len())),
            )
        })?;
        let store = &self.stores[self.entry_store.get(shard).copied().unwrap_or(0)];
        let reader = fetch_checked(store, entry).map_err(|e| self.shard_error(shard, e))?;
        let mut by_id = HashMap::new();
        let mut bytes = 0;
        for rec in reader {
            let rec = rec.map_err(|e| self.shard_error(shard, e))?;
            bytes += rec.image.len() + rec.masks.iter().map(|m| m.bits.len()).sum::<usize>();
            by_id.insert(rec.volume_id.clone(), rec);
        }
        Ok(Arc::new(ShardVolumes { by_id, bytes }))
    }
}

/// Fetches a volume shard, checked against its manifest entry by `m3d_shards::fetch_checked`.
fn fetch_checked(store: &Store, entry: &ShardEntry) -> Result<VolumeShardReader, ShardError> {
    VolumeShardReader::new(m3d_shards::fetch_checked(store, entry)?, &entry.key)
}

/// Serves decoded samples of one dataset by global sample index; see the module docs.
pub struct ShardLoader {
    url: String,
    samples: Vec<SampleRecord>,
    /// Shard number of each sample's volume (`None`: the volume is in no shard; reported when loaded).
    sample_shard: Vec<Option<usize>>,
    index_reads: u64,
    shared: Arc<Shared>,
    prefetch_tx: Option<SyncSender<Vec<usize>>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ShardLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardLoader")
            .field("url", &self.url)
            .field("samples", &self.samples.len())
            .field("volume_shards", &self.shared.entries.len())
            .field("cache_bytes", &self.shared.cache_bytes)
            .finish()
    }
}

impl ShardLoader {
    /// Opens the dataset at `url` (any `Store` URL) and indexes its volume shards (one read of each, without
    /// decoding images).
    pub fn open(url: &str, opts: LoaderOptions) -> Result<Self, LoadError> {
        Self::open_with_volumes(url, &[], opts)
    }

    /// [`ShardLoader::open`] for a dataset whose samples refer to volumes stored in other shard datasets too
    /// (M3D-VQA's samples name M3D-Cap volumes): the volume shards of `url` and of every `volume_urls`
    /// dataset are indexed; a volume id found in several is taken from the first.
    pub fn open_with_volumes(
        url: &str,
        volume_urls: &[String],
        opts: LoaderOptions,
    ) -> Result<Self, LoadError> {
        let open_err = |url: &str| {
            let url = url.to_string();
            move |source| LoadError::Open { url, source }
        };
        let dataset = ShardDataset::open(url).map_err(open_err(url))?;
        let mut stores = Vec::new();
        let mut entries: Vec<ShardEntry> = Vec::new();
        let mut entry_store = Vec::new();
        // Volume id -> shard; the first shard wins if an id were ever stored twice.
        let mut volume_shard: HashMap<String, usize> = HashMap::new();
        let mut add = |ds: &ShardDataset, url: &str| -> Result<(), LoadError> {
            let offset = entries.len();
            let manifest: &Manifest = ds.manifest();
            entry_store.extend(std::iter::repeat_n(
                stores.len(),
                manifest.volume_shards.len(),
            ));
            entries.extend(manifest.volume_shards.iter().cloned());
            stores.push(ds.store().clone());
            for (volume_id, shard) in ds.volume_index().map_err(open_err(url))? {
                volume_shard.entry(volume_id).or_insert(shard + offset);
            }
            Ok(())
        };
        add(&dataset, url)?;
        for vurl in volume_urls {
            let ds = ShardDataset::open(vurl).map_err(open_err(vurl))?;
            add(&ds, vurl)?;
        }
        let shared = Arc::new(Shared {
            stores,
            entry_store,
            entries,
            cache_bytes: opts.cache_bytes,
            state: Mutex::new(CacheState::default()),
            cv: Condvar::new(),
            counters: Counters::default(),
        });
        let index_reads = shared.entries.len() as u64;
        let samples = dataset.samples().to_vec();
        let sample_shard = samples
            .iter()
            .map(|s| volume_shard.get(&s.volume_id).copied())
            .collect();
        let (prefetch_tx, thread) = if opts.prefetch_depth > 0 {
            let (tx, rx) = sync_channel::<Vec<usize>>(opts.prefetch_depth);
            let sh = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name("m3d-shard-prefetch".into())
                .spawn(move || {
                    // Ends when the loader drops its sender.
                    while let Ok(shards) = rx.recv() {
                        sh.read_all(&shards);
                        let mut st = sh.lock();
                        st.pending_prefetch = st.pending_prefetch.saturating_sub(1);
                        drop(st);
                        sh.cv.notify_all();
                    }
                })
                .map_err(|e| {
                    open_err(url)(ShardError::Io {
                        path: "<prefetch thread>".into(),
                        source: e,
                    })
                })?;
            (Some(tx), Some(handle))
        } else {
            (None, None)
        };
        Ok(ShardLoader {
            url: url.to_string(),
            samples,
            sample_shard,
            index_reads,
            shared,
            prefetch_tx,
            thread,
        })
    }

    /// Number of samples in the dataset (valid indices are `0..len()`).
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The sample records, by global index.
    pub fn samples(&self) -> &[SampleRecord] {
        &self.samples
    }

    /// Number of volume shards.
    pub fn num_volume_shards(&self) -> usize {
        self.shared.entries.len()
    }

    fn shard_of(&self, index: u64) -> Result<(usize, &SampleRecord), LoadError> {
        let out_of_range = || LoadError::SampleOutOfRange {
            url: self.url.clone(),
            index,
            len: self.samples.len(),
        };
        let i = usize::try_from(index).map_err(|_| out_of_range())?;
        let sample = self.samples.get(i).ok_or_else(out_of_range)?;
        let shard = self.sample_shard.get(i).copied().flatten().ok_or_else(|| {
            LoadError::VolumeNotIndexed {
                index,
                sample_id: sample.sample_id.clone(),
                volume_id: sample.volume_id.clone(),
            }
        })?;
        Ok((shard, sample))
    }

    /// Distinct shards needed by `indices`, in first-use order.
    fn shards_for(&self, indices: &[u64]) -> Result<Vec<usize>, LoadError> {
        let mut seen = HashSet::new();
        let mut order = Vec::new();
        for &index in indices {
            let (shard, _) = self.shard_of(index)?;
            if seen.insert(shard) {
                order.push(shard);
            }
        }
        Ok(order)
    }

    /// Decodes the samples at `indices` (in that order; repeats allowed), without augmentation. Each distinct
    /// shard is looked up once per call, so a call reads the store at most once per distinct shard even when
    /// the cache is smaller than that working set.
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
        // Validate every index before any I/O so a bad index fails fast and names itself.
        let order = self.shards_for(indices)?;
        let mut shards: HashMap<usize, Arc<ShardVolumes>> = HashMap::new();
        for shard in order {
            shards.insert(shard, self.shared.get(shard, false)?);
        }
        let mut scratch = Vec::new();
        let mut out = Vec::with_capacity(indices.len());
        for (pos, &index) in indices.iter().enumerate() {
            let (shard, sample) = self.shard_of(index)?;
            let vol = shards
                .get(&shard)
                .and_then(|v| v.by_id.get(&sample.volume_id))
                .ok_or_else(|| LoadError::VolumeMissing {
                    index,
                    sample_id: sample.sample_id.clone(),
                    volume_id: sample.volume_id.clone(),
                    key: self
                        .shared
                        .entries
                        .get(shard)
                        .map_or_else(String::new, |e| e.key.clone()),
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
                sample: sample.clone(),
                shape,
                image,
                mask,
            });
        }
        Ok(out)
    }

    /// Queues the shards of a future step's `indices` for the read-ahead thread. Returns `Ok(false)` when the
    /// request was dropped (read-ahead disabled or `prefetch_depth` requests already waiting); an invalid
    /// index is reported now.
    pub fn prefetch(&self, indices: &[u64]) -> Result<bool, LoadError> {
        let order = self.shards_for(indices)?;
        let Some(tx) = &self.prefetch_tx else {
            self.shared
                .counters
                .prefetch_dropped
                .fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        };
        self.shared.lock().pending_prefetch += 1;
        match tx.try_send(order) {
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

    /// Shard numbers currently cached, least recently used first.
    pub fn cached_shards(&self) -> Vec<usize> {
        let st = self.shared.lock();
        let mut v: Vec<(usize, u64)> = st.entries.iter().map(|(k, (_, t))| (*k, *t)).collect();
        v.sort_by_key(|(_, t)| *t);
        v.into_iter().map(|(k, _)| k).collect()
    }

    /// Decoded bytes currently held by the cache.
    pub fn cached_bytes(&self) -> usize {
        self.shared.lock().total_bytes
    }

    pub fn stats(&self) -> LoaderStats {
        let c = &self.shared.counters;
        LoaderStats {
            index_reads: self.index_reads,
            shard_reads: c.shard_reads.load(Ordering::Relaxed),
            prefetch_reads: c.prefetch_reads.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            cache_misses: c.cache_misses.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            prefetch_dropped: c.prefetch_dropped.load(Ordering::Relaxed),
        }
    }
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
