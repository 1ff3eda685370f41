//! The error type of every converter. Each variant names the file (and row or key) it is about, so a user can
//! go straight to the bad input.

use std::path::PathBuf;

/// What went wrong converting a dataset.
#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    #[error(transparent)]
    Format(#[from] m3d_formats::FormatError),
    #[error(transparent)]
    Shard(#[from] m3d_shards::ShardError),
    #[error(transparent)]
    Store(#[from] m3d_store::StoreError),
    #[error("{path}: {reason}")]
    Input { path: PathBuf, reason: String },
    #[error("{path}, row {row}: {reason}")]
    Row {
        path: PathBuf,
        row: usize,
        reason: String,
    },
    #[error("{path}: missing column(s) {missing:?} (found {found:?})")]
    MissingColumns {
        path: PathBuf,
        missing: Vec<String>,
        found: Vec<String>,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A split conversion (`--part I/N`) that cannot be finalized: the message names the part and the location.
    #[error("{0}")]
    Parts(String),
    #[error("invalid options: {0}")]
    Options(String),
}

impl PrepError {
    pub(crate) fn input(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        PrepError::Input {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PrepError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = PrepError> = std::result::Result<T, E>;
