//! The one error type of this crate. Every variant names the file it was writing (or the configuration
//! field it rejected), so a failure in a long `write_all` run points at its cause directly.

use std::path::PathBuf;

/// Errors raised while generating a synthetic dataset.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The configuration cannot produce a dataset with the promised properties.
    #[error("invalid synth config: {field}: {reason}")]
    Config { field: &'static str, reason: String },
    /// Creating a folder or writing a file failed.
    #[error("{}: I/O error: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Encoding a PNG/JPEG slice failed.
    #[error("{}: cannot encode image: {source}", path.display())]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    /// Writing a CSV file failed.
    #[error("{}: cannot write CSV: {source}", path.display())]
    Csv {
        path: PathBuf,
        #[source]
        source: csv::Error,
    },
    /// Serialising a JSON file failed.
    #[error("{}: cannot write JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Writing a `.npy`, `.npz` or NIfTI file failed (the format error names the file).
    #[error(transparent)]
    Format(#[from] m3d_formats::FormatError),
}

impl SynthError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        SynthError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        SynthError::Config {
            field,
            reason: reason.into(),
        }
    }
}
