//! The crate's error type. Every variant names what it was working on (store URL, shard key, volume id,
//! row) so a failure in a large conversion or a training run can be traced to one object.

/// Errors of the shard format, the store and the reader.
// Large sources are boxed so that `Result<_, ShardError>` stays small on the happy path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// An object-store request failed (names the store URL and key).
    #[error(transparent)]
    Store(#[from] m3d_store::StoreError),

    /// Parquet encoding/decoding error for one shard.
    #[error("shard `{key}`: parquet: {source}")]
    Parquet {
        key: String,
        #[source]
        source: Box<parquet::errors::ParquetError>,
    },

    /// Arrow error while building or reading record batches of one shard.
    #[error("shard `{key}`: arrow: {source}")]
    Arrow {
        key: String,
        #[source]
        source: Box<arrow::error::ArrowError>,
    },

    /// The shard's columns or values do not follow the documented schema.
    #[error("shard `{key}`: {reason}")]
    Schema { key: String, reason: String },

    /// A value in one row is invalid (unknown task or dtype string, bad shape, ...).
    #[error("shard `{key}` row {row}: {reason}")]
    Row {
        key: String,
        row: usize,
        reason: String,
    },

    /// A shard or manifest written by a newer version of the format.
    #[error(
        "`{what}` has schema version {found}, but this reader supports only versions up to {supported}; \
         upgrade m3d to read it"
    )]
    SchemaVersion {
        what: String,
        found: u64,
        supported: u32,
    },

    /// A shard's checksum (crc32 on reads, sha256 under `inspect --verify`; `expected` and `actual` say which)
    /// differs from the manifest's: the object is corrupted or was replaced.
    #[error("shard `{key}`: checksum mismatch (manifest {expected}, object {actual}); the shard is corrupted")]
    Checksum {
        key: String,
        expected: String,
        actual: String,
    },

    /// A volume's image bytes do not match their stored crc32.
    #[error(
        "shard `{key}` row {row}: volume `{volume_id}`: image crc32 mismatch (stored {expected:08x}, \
         computed {actual:08x}); the image is corrupted"
    )]
    ImageCrc {
        key: String,
        row: usize,
        volume_id: String,
        expected: u32,
        actual: u32,
    },

    /// A buffer length that does not match what the shape/dtype requires.
    #[error("{what}: expected {expected} {unit}, got {actual}")]
    Length {
        what: String,
        expected: usize,
        actual: usize,
        unit: &'static str,
    },

    /// The manifest could not be parsed or is inconsistent.
    #[error("manifest `{key}`: {reason}")]
    Manifest { key: String, reason: String },

    /// A caller passed inconsistent arguments (wrong buffer sizes, shard index out of range, ...).
    #[error("{0}")]
    Invalid(String),

    /// The dataset has no volume index (written before the index existed): readers would have to download
    /// every volume shard to find a volume.
    #[error(
        "dataset `{url}` has no volume index (it was converted before m3d wrote one); add it once with \
         `m3d data-prep reindex {url}`"
    )]
    NoIndex { url: String },
}

impl ShardError {
    pub(crate) fn schema(key: &str, reason: impl Into<String>) -> Self {
        ShardError::Schema {
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn parquet(key: &str, source: parquet::errors::ParquetError) -> Self {
        ShardError::Parquet {
            key: key.to_string(),
            source: Box::new(source),
        }
    }

    pub(crate) fn arrow(key: &str, source: arrow::error::ArrowError) -> Self {
        ShardError::Arrow {
            key: key.to_string(),
            source: Box::new(source),
        }
    }
}
