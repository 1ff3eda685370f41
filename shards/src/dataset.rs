//! The reader library training workers use: open a dataset by URL, get its samples, stream its volume
//! shards with integrity checks, verify a whole dataset, and decode one sample's volume (and mask) into
//! caller-owned f32 buffers; and [`write_dataset`], a whole dataset from records in one call.

use std::collections::HashMap;

use bytes::Bytes;

use crate::manifest::{sha256_hex, Manifest, ShardEntry};
use crate::parquet_io::{read_sample_shard, read_sample_shard_batches, VolumeShardReader};
use crate::schema::{SampleRecord, VolumeRecord};
use crate::ShardError;
use m3d_store::Store;

pub use crate::decode::decode_sample_into;

/// An opened dataset: its manifest and all of its samples (volumes are streamed on demand).
#[derive(Clone)]
pub struct ShardDataset {
    store: Store,
    manifest: Manifest,
    samples: Vec<SampleRecord>,
}

impl std::fmt::Debug for ShardDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Summarised: a dataset can hold hundreds of thousands of samples.
        f.debug_struct("ShardDataset")
            .field("store", &self.store)
            .field("dataset", &self.manifest.dataset)
            .field("volume_shards", &self.manifest.volume_shards.len())
            .field("samples", &self.samples.len())
            .finish()
    }
}

/// Which list of the manifest a shard belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardKind {
    Volumes,
    Samples,
    /// The sample lookup (`index/samples.lookup`): checked whole, then every block decoded.
    Lookup,
}

/// Result of checking one shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardCheck {
    pub kind: ShardKind,
    pub key: String,
    /// The object exists and its size and sha256 match the manifest.
    pub sha256_ok: bool,
    /// Rows read from the shard (0 when it could not be read).
    pub rows: u64,
    /// Volume ids whose image crc32 did not match (volume shards only).
    pub bad_volumes: Vec<String>,
    /// Every problem found, as messages (empty when the shard is fine).
    pub errors: Vec<String>,
}

impl ShardCheck {
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Result of [`ShardDataset::verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub shards: Vec<ShardCheck>,
}

impl VerifyReport {
    /// True when every shard is intact.
    pub fn is_ok(&self) -> bool {
        self.shards.iter().all(ShardCheck::is_ok)
    }

    /// The shards with problems.
    pub fn failures(&self) -> impl Iterator<Item = &ShardCheck> {
        self.shards.iter().filter(|s| !s.is_ok())
    }
}

/// Fetches a shard and checks it against its manifest entry: size, then crc32 when the manifest has it (fast,
/// catches corruption in transit and at rest), else sha256.
/// The one place shard bytes are verified on read (also used by the worker's shard cache).
pub fn fetch_checked(store: &Store, entry: &ShardEntry) -> Result<Bytes, ShardError> {
    let bytes = store.get(&entry.key)?;
    if let Some(expected) = entry.crc32 {
        let actual = crc32fast::hash(&bytes);
        if bytes.len() as u64 != entry.bytes || actual != expected {
            return Err(ShardError::Checksum {
                key: entry.key.clone(),
                expected: format!("crc32 {expected:08x}, {} bytes", entry.bytes),
                actual: format!("crc32 {actual:08x}, {} bytes", bytes.len()),
            });
        }
        return Ok(bytes);
    }
    let actual = sha256_hex(&bytes);
    if bytes.len() as u64 != entry.bytes || actual != entry.sha256 {
        return Err(ShardError::Checksum {
            key: entry.key.clone(),
            expected: entry.sha256.clone(),
            actual: if bytes.len() as u64 != entry.bytes {
                format!(
                    "{actual} ({} bytes, manifest says {})",
                    bytes.len(),
                    entry.bytes
                )
            } else {
                actual
            },
        });
    }
    Ok(bytes)
}

/// Writes a complete dataset into `store` from records, laid out as `m3d data-prep` lays it out: each list of
/// `volume_shards` as one volume shard (`opts`), `samples` as one sample shard, the volume index, the sample lookup, and `manifest`
/// (its name, provenance and preprocessing as given; shards, counts and totals filled in) last. For tests,
/// benchmarks and tools that make datasets from records; `m3d data-prep` writes shard by shard with completion
/// records instead.
pub fn write_dataset(
    store: &Store,
    mut manifest: Manifest,
    volume_shards: &[Vec<VolumeRecord>],
    samples: &[SampleRecord],
    opts: &crate::WriteOptions,
) -> Result<Manifest, ShardError> {
    use crate::manifest::{sample_shard_key, volume_shard_key};
    let mut layouts = Vec::with_capacity(volume_shards.len());
    for (n, records) in volume_shards.iter().enumerate() {
        let key = volume_shard_key(n);
        let bytes = crate::write_volume_shard(records, opts)?;
        manifest
            .volume_shards
            .push(ShardEntry::describe(&key, records.len() as u64, &bytes));
        layouts.push(crate::shard_layout(&bytes, &key, n as u32)?);
        store.put(&key, bytes)?;
    }
    let key = sample_shard_key(0);
    let bytes = crate::write_sample_shard(samples, opts)?;
    manifest
        .sample_shards
        .push(ShardEntry::describe(&key, samples.len() as u64, &bytes));
    store.put(&key, bytes)?;
    manifest.count_samples(samples);
    manifest.update_totals();
    let index = crate::VolumeIndex::from_layouts(&layouts);
    crate::write_index(store, &mut manifest, &index)?;
    crate::lookup::write_lookup(store, &mut manifest, samples, &index, None)?;
    manifest.save(store)?;
    Ok(manifest)
}

impl ShardDataset {
    /// Opens the dataset at `url` (any [`Store`] URL): loads and version-checks the manifest, then loads
    /// every sample shard (each checked against its sha256 and row count).
    pub fn open(url: &str) -> Result<Self, ShardError> {
        Self::open_store(Store::open_existing(url)?)
    }

    /// Like [`ShardDataset::open`] with an already opened store.
    pub fn open_store(store: Store) -> Result<Self, ShardError> {
        let mut dataset = ShardDataset {
            manifest: Manifest::load(&store)?,
            store,
            samples: Vec::new(),
        };
        // Sized from the manifest and extended batch by batch, not grown by doubling (which would hold up to
        // twice the table for a moment: records are 300 bytes each before their strings).
        let mut samples = Vec::new();
        dataset.read_samples(|total, batch| {
            if samples.is_empty() {
                samples.reserve_exact(total);
            }
            samples.extend(batch);
            Ok(())
        })?;
        samples.shrink_to_fit();
        dataset.samples = samples;
        tracing::debug!(
            url = dataset.store.url(),
            samples = dataset.samples.len(),
            volume_shards = dataset.manifest.volume_shards.len(),
            "opened shard dataset"
        );
        Ok(dataset)
    }

    /// Opens only the manifest of the dataset at `url`, without its sample table ([`ShardDataset::samples`]
    /// is empty): for a dataset read for its volumes alone (M3D-VQA's samples name M3D-Cap's volumes), whose
    /// samples would only take memory, or whose samples are read with [`ShardDataset::read_samples`].
    pub fn open_for_volumes(url: &str) -> Result<Self, ShardError> {
        let store = Store::open_existing(url)?;
        let manifest = Manifest::load(&store)?;
        Ok(ShardDataset {
            store,
            manifest,
            samples: Vec::new(),
        })
    }

    /// Reads the dataset's sample shards, each checked against its sha256 and its row count, and hands `f`
    /// their records a batch (at most 8,192) at a time, in order, with the number of samples the manifest
    /// lists: for a reader that keeps the samples in a form of its own (the worker's compact sample table)
    /// and so never holds them all as records.
    pub fn read_samples(
        &self,
        mut f: impl FnMut(usize, Vec<SampleRecord>) -> Result<(), ShardError>,
    ) -> Result<(), ShardError> {
        let total: u64 = self.manifest.sample_shards.iter().map(|e| e.rows).sum();
        let total = usize::try_from(total).unwrap_or(usize::MAX);
        for entry in &self.manifest.sample_shards {
            let bytes = fetch_checked(&self.store, entry)?;
            let rows = read_sample_shard_batches(bytes, &entry.key, |_, batch| f(total, batch))?;
            if rows as u64 != entry.rows {
                return Err(ShardError::Manifest {
                    key: Manifest::KEY.to_string(),
                    reason: format!(
                        "sample shard `{}` has {} rows, manifest says {}",
                        entry.key, rows, entry.rows
                    ),
                });
            }
        }
        Ok(())
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The sample table, taken out of the dataset (no copy).
    pub fn into_samples(self) -> Vec<SampleRecord> {
        self.samples
    }

    pub fn samples(&self) -> &[SampleRecord] {
        &self.samples
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Number of volume shards.
    pub fn num_volume_shards(&self) -> usize {
        self.manifest.volume_shards.len()
    }

    /// Indices into [`ShardDataset::samples`] grouped by volume id, so a worker streaming a volume shard
    /// can find the samples of each volume it decodes.
    pub fn samples_by_volume(&self) -> HashMap<&str, Vec<usize>> {
        let mut map: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, s) in self.samples.iter().enumerate() {
            map.entry(s.volume_id.as_str()).or_default().push(i);
        }
        map
    }

    /// The volume index (manifest-listed, checksummed; [`ShardError::NoIndex`] for a dataset converted
    /// before the index existed). Reads no volume shard.
    pub fn volume_index(&self) -> Result<crate::VolumeIndex, ShardError> {
        let entry = self
            .manifest
            .volume_index
            .as_ref()
            .ok_or_else(|| ShardError::NoIndex {
                url: self.store.url().to_string(),
            })?;
        let bytes = fetch_checked(&self.store, entry)?;
        let rows: Vec<u64> = self.manifest.volume_shards.iter().map(|e| e.rows).collect();
        let index = crate::VolumeIndex::from_parquet(bytes, &rows)?;
        if index.volumes.len() as u64 != self.manifest.totals.volumes {
            return Err(ShardError::Manifest {
                key: Manifest::KEY.to_string(),
                reason: format!(
                    "the volume index lists {} volumes, the manifest {}",
                    index.volumes.len(),
                    self.manifest.totals.volumes
                ),
            });
        }
        Ok(index)
    }

    /// The volume `id` with its image and masks, by one ranged read through the index.
    pub fn find_volume(&self, id: &str) -> Result<Option<VolumeRecord>, ShardError> {
        let reader = crate::VolumeReader::open(self)?;
        match reader.locate(id) {
            Some(i) => reader.read(i, true, true).map(Some),
            None => Ok(None),
        }
    }

    /// Fetches volume shard number `shard`, verifies it against the manifest (size and crc32, or sha256
    /// for manifests without crc32; [`ShardError::Checksum`] naming the key on mismatch) and streams its rows.
    pub fn stream_volumes(&self, shard: usize) -> Result<VolumeShardReader, ShardError> {
        let entry = self.manifest.volume_shards.get(shard).ok_or_else(|| {
            ShardError::Invalid(format!(
                "volume shard index {shard} out of range ({} shards in `{}`)",
                self.manifest.volume_shards.len(),
                self.store.url()
            ))
        })?;
        let bytes = fetch_checked(&self.store, entry)?;
        VolumeShardReader::new(bytes, &entry.key)
    }

    /// Re-reads every shard and the sample lookup: recomputes sha256s, row counts and every image crc32. Problems are recorded
    /// per shard in the report; only a failure to talk to the store for a reason other than a missing
    /// object is returned as an error.
    pub fn verify(&self) -> Result<VerifyReport, ShardError> {
        let mut report = VerifyReport::default();
        let lists = [
            (ShardKind::Volumes, &self.manifest.volume_shards),
            (ShardKind::Samples, &self.manifest.sample_shards),
        ];
        for (kind, entries) in lists {
            for entry in entries {
                report.shards.push(self.check_shard(kind, entry)?);
            }
        }
        if let Some(lookup) = &self.manifest.sample_lookup {
            report
                .shards
                .push(self.check_shard(ShardKind::Lookup, &lookup.file)?);
        }
        Ok(report)
    }

    fn check_shard(&self, kind: ShardKind, entry: &ShardEntry) -> Result<ShardCheck, ShardError> {
        let mut check = ShardCheck {
            kind,
            key: entry.key.clone(),
            sha256_ok: false,
            rows: 0,
            bad_volumes: Vec::new(),
            errors: Vec::new(),
        };
        let bytes = match self.store.get(&entry.key) {
            Ok(b) => b,
            Err(e @ m3d_store::StoreError::NotFound { .. }) => {
                check.errors.push(e.to_string());
                return Ok(check);
            }
            Err(e) => return Err(e.into()),
        };
        let actual = sha256_hex(&bytes);
        check.sha256_ok = actual == entry.sha256 && bytes.len() as u64 == entry.bytes;
        if !check.sha256_ok {
            check.errors.push(
                ShardError::Checksum {
                    key: entry.key.clone(),
                    expected: entry.sha256.clone(),
                    actual,
                }
                .to_string(),
            );
        }
        match kind {
            ShardKind::Lookup => {
                let entry = self.manifest.sample_lookup.clone();
                let rows: Vec<u64> = (0..entry.as_ref().map_or(0, |l| l.file.rows)).collect();
                let lookup = entry.map(|l| crate::LookupReader::new(self.store.clone(), l));
                match lookup.map(|l| l.get_many(&rows)) {
                    Some(Ok(got)) => check.rows = got.len() as u64,
                    Some(Err(e)) => check.errors.push(e.to_string()),
                    None => {}
                }
            }
            ShardKind::Samples => match read_sample_shard(bytes, &entry.key) {
                Ok(rows) => check.rows = rows.len() as u64,
                Err(e) => check.errors.push(e.to_string()),
            },
            ShardKind::Volumes => match VolumeShardReader::new(bytes, &entry.key) {
                Ok(reader) => {
                    for item in reader.with_masks(false) {
                        match item {
                            Ok(_) => check.rows += 1,
                            Err(ShardError::ImageCrc { volume_id, .. }) => {
                                check.rows += 1;
                                check.errors.push(format!(
                                    "shard `{}`: volume `{volume_id}`: image crc32 mismatch",
                                    entry.key
                                ));
                                check.bad_volumes.push(volume_id);
                            }
                            Err(e) => check.errors.push(e.to_string()),
                        }
                    }
                }
                Err(e) => check.errors.push(e.to_string()),
            },
        }
        if check.rows != entry.rows {
            check.errors.push(format!(
                "shard `{}`: {} rows read, manifest says {}",
                entry.key, check.rows, entry.rows
            ));
        }
        Ok(check)
    }
}
