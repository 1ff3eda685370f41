//! The dataset manifest (`manifest.json` at the dataset root): format version, provenance, preprocessing
//! parameters, every shard with its size and sha256, and sample counts per task and split.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::parquet_io::FORMAT_NAME;
use crate::schema::SampleRecord;
use crate::ShardError;
use m3d_store::Store;

/// One shard object listed in the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Key relative to the dataset root, e.g. `volumes/part-00000.parquet`.
    pub key: String,
    /// Rows (volumes or samples) in the shard.
    pub rows: u64,
    /// Object size in bytes.
    pub bytes: u64,
    /// Lower-case hex sha256 of the object: the strong check, used by `ShardDataset::verify`.
    pub sha256: String,
    /// crc32 (IEEE) of the object: the fast check made on every streaming read, where sha256 alone would cost
    /// about a fifth of the reader's time. Absent in manifests written before it existed (then sha256 is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<u32>,
}

impl ShardEntry {
    /// Describes the shard `data` that is (or will be) stored at `key`.
    pub fn describe(key: &str, rows: u64, data: &[u8]) -> ShardEntry {
        ShardEntry {
            key: key.to_string(),
            rows,
            bytes: data.len() as u64,
            sha256: sha256_hex(data),
            crc32: Some(crc32fast::hash(data)),
        }
    }
}

/// Dataset totals.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub volumes: u64,
    pub samples: u64,
    /// Sum of all shard sizes.
    pub bytes: u64,
}

/// The manifest of a dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `"m3d-shards"`.
    pub format: String,
    /// [`MANIFEST_VERSION`] of the writer (1 for manifests with their shard lists inline).
    pub schema_version: u32,
    /// `"cap"`, `"seg"`, `"refseg"`, ...
    pub dataset: String,
    /// Tool and version that wrote the dataset.
    pub created_by: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Provenance: source root, split files and their sha256.
    pub source: serde_json::Value,
    /// Preprocessing parameters used.
    pub preprocessing: serde_json::Value,
    /// The shard lists: in `manifest.json` itself for manifests written before [`SHARD_LIST_KEY`] existed,
    /// else kept in that object (see [`Manifest::save`]) and filled in by [`Manifest::load`].
    #[serde(default)]
    pub volume_shards: Vec<ShardEntry>,
    #[serde(default)]
    pub sample_shards: Vec<ShardEntry>,
    /// [`SHARD_LIST_KEY`], holding the two shard lists, so that `manifest.json` stays a few KiB however many
    /// shards a dataset has (at 120K volumes the lists are ~0.8 MB). Set by [`Manifest::save`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_list: Option<ShardEntry>,
    /// The sample lookup (`index/samples.lookup`, see [`crate::lookup`]): the samples and their volumes'
    /// places in ranged-read blocks, which lets a training worker open the dataset in O(1) bytes. Absent in
    /// datasets converted before it existed (`m3d data-prep reindex` adds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_lookup: Option<crate::lookup::LookupEntry>,
    /// The volume index (`index/volumes.parquet`, see [`crate::index`]); absent in datasets converted before it
    /// existed (`m3d data-prep reindex` adds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_index: Option<ShardEntry>,
    pub totals: Totals,
    /// task -> split -> number of samples.
    pub counts: BTreeMap<String, BTreeMap<String, u64>>,
    /// Source items skipped during conversion.
    pub skipped: u64,
}

/// Key of the object holding a manifest's shard lists.
pub const SHARD_LIST_KEY: &str = "index/shards.json";

/// Version of the manifest's own layout: 2 keeps the shard lists in [`SHARD_LIST_KEY`]. Readers accept
/// this or older; a reader of version 1 refuses a version-2 manifest instead of seeing no shards.
pub const MANIFEST_VERSION: u32 = 2;

#[derive(Serialize, Deserialize)]
struct ShardLists {
    volume_shards: Vec<ShardEntry>,
    sample_shards: Vec<ShardEntry>,
}

/// Key of shard number `n` of volumes: `volumes/part-NNNNN.parquet`.
pub fn volume_shard_key(n: usize) -> String {
    format!("volumes/part-{n:05}.parquet")
}

/// Key of shard number `n` of samples: `samples/part-NNNNN.parquet`.
pub fn sample_shard_key(n: usize) -> String {
    format!("samples/part-{n:05}.parquet")
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Manifest {
    /// Key of the manifest relative to the dataset root.
    pub const KEY: &'static str = "manifest.json";

    /// An empty manifest for `dataset`, stamped with the current time and schema version.
    pub fn new(dataset: &str, created_by: &str) -> Manifest {
        let created_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Manifest {
            format: FORMAT_NAME.to_string(),
            schema_version: MANIFEST_VERSION,
            dataset: dataset.to_string(),
            created_by: created_by.to_string(),
            created_unix,
            source: serde_json::Value::Null,
            preprocessing: serde_json::Value::Null,
            volume_shards: Vec::new(),
            sample_shards: Vec::new(),
            volume_index: None,
            shard_list: None,
            sample_lookup: None,
            totals: Totals::default(),
            counts: BTreeMap::new(),
            skipped: 0,
        }
    }

    /// Adds `samples` to `counts` (task -> split).
    pub fn count_samples<'a>(&mut self, samples: impl IntoIterator<Item = &'a SampleRecord>) {
        for s in samples {
            *self
                .counts
                .entry(s.task.to_string())
                .or_default()
                .entry(s.split.clone())
                .or_default() += 1;
        }
    }

    /// Recomputes `totals` from the shard lists.
    pub fn update_totals(&mut self) {
        self.totals = Totals {
            volumes: self.volume_shards.iter().map(|e| e.rows).sum(),
            samples: self.sample_shards.iter().map(|e| e.rows).sum(),
            bytes: self
                .volume_shards
                .iter()
                .chain(&self.sample_shards)
                .map(|e| e.bytes)
                .sum(),
        };
    }

    /// Parses a manifest, refusing other formats and newer schema versions before looking at the rest
    /// (so a newer manifest is reported as such, not as a field mismatch).
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, ShardError> {
        let err = |reason: String| ShardError::Manifest {
            key: Self::KEY.to_string(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let format = value.get("format").and_then(|v| v.as_str());
        if format != Some(FORMAT_NAME) {
            return Err(err(format!(
                "`format` is {format:?}, expected \"{FORMAT_NAME}\""
            )));
        }
        let version = value
            .get("schema_version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| err("missing or non-integer `schema_version`".into()))?;
        if version > u64::from(MANIFEST_VERSION) {
            return Err(ShardError::SchemaVersion {
                what: Self::KEY.to_string(),
                found: version,
                supported: MANIFEST_VERSION,
            });
        }
        serde_json::from_value(value).map_err(|e| err(format!("does not match the schema: {e}")))
    }

    /// Pretty-printed JSON.
    pub fn to_json(&self) -> Result<Vec<u8>, ShardError> {
        serde_json::to_vec_pretty(self).map_err(|e| ShardError::Manifest {
            key: Self::KEY.to_string(),
            reason: e.to_string(),
        })
    }

    /// Loads `manifest.json` from the store root with its shard lists (from [`SHARD_LIST_KEY`], checked
    /// against the manifest's sha256, when they are kept there).
    pub fn load(store: &Store) -> Result<Self, ShardError> {
        let mut manifest = Self::load_head(store)?;
        if let Some(entry) = &manifest.shard_list {
            let bytes = crate::dataset::fetch_checked(store, entry)?;
            let lists: ShardLists =
                serde_json::from_slice(&bytes).map_err(|e| ShardError::Manifest {
                    key: SHARD_LIST_KEY.to_string(),
                    reason: format!("does not match the schema: {e}"),
                })?;
            manifest.volume_shards = lists.volume_shards;
            manifest.sample_shards = lists.sample_shards;
        }
        Ok(manifest)
    }

    /// Loads `manifest.json` alone: a few KiB, whatever the dataset's size. Its shard lists are empty when
    /// they are kept in [`SHARD_LIST_KEY`] (see [`Manifest::shard_lists_loaded`]).
    pub fn load_head(store: &Store) -> Result<Self, ShardError> {
        let bytes = store.get(Self::KEY)?;
        Self::from_json(&bytes)
    }

    /// Whether the shard lists are in this value (false for a manifest loaded by [`Manifest::load_head`]
    /// whose lists are kept in [`SHARD_LIST_KEY`]).
    pub fn shard_lists_loaded(&self) -> bool {
        self.shard_list.is_none()
            || !(self.volume_shards.is_empty() && self.sample_shards.is_empty())
    }

    /// Writes the shard lists to [`SHARD_LIST_KEY`], then `manifest.json` (version [`MANIFEST_VERSION`])
    /// without them, at the store root, and records both in `self` (whose lists stay). Write it after all
    /// shards so that a reader never sees a manifest naming shards that are not there yet.
    pub fn save(&mut self, store: &Store) -> Result<(), ShardError> {
        if !self.shard_lists_loaded() {
            return Err(ShardError::Manifest {
                key: Self::KEY.to_string(),
                reason: "saving a manifest loaded without its shard lists (a bug)".into(),
            });
        }
        let lists = serde_json::to_vec(&ShardLists {
            volume_shards: self.volume_shards.clone(),
            sample_shards: self.sample_shards.clone(),
        })
        .map_err(|e| ShardError::Manifest {
            key: SHARD_LIST_KEY.to_string(),
            reason: e.to_string(),
        })?;
        let rows = (self.volume_shards.len() + self.sample_shards.len()) as u64;
        self.shard_list = Some(ShardEntry::describe(SHARD_LIST_KEY, rows, &lists));
        self.schema_version = MANIFEST_VERSION;
        let mut head = self.clone();
        head.volume_shards.clear();
        head.sample_shards.clear();
        store.put(SHARD_LIST_KEY, Bytes::from(lists))?;
        Ok(store.put(Self::KEY, Bytes::from(head.to_json()?))?)
    }
}
