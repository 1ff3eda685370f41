//! The one error type of this crate. Every variant names the file (or dataset value) it is about, so a
//! failure deep inside a conversion run can be traced back to its source without a debugger.

use std::path::PathBuf;

/// Errors raised while reading or writing M3D-Data source formats.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Reading or writing the file itself failed.
    #[error("{}: I/O error: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A `.npy` stream is malformed (magic, header, dtype, truncated data, ...).
    #[error("{}: invalid .npy: {reason}", path.display())]
    Npy { path: PathBuf, reason: String },
    /// A `.npz` archive is malformed or lacks an expected member.
    #[error("{}: invalid .npz: {reason}", path.display())]
    Npz { path: PathBuf, reason: String },
    /// A scipy sparse matrix archive is not what we expect (not CSR, inconsistent arrays, ...).
    #[error("{}: invalid sparse matrix: {reason}", path.display())]
    Sparse { path: PathBuf, reason: String },
    /// Data disagrees with the shape it is supposed to have.
    #[error("{}: shape mismatch: expected {expected}, found {found}", path.display())]
    ShapeMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    /// A NIfTI file is malformed or uses something we do not support.
    #[error("{}: invalid NIfTI: {reason}", path.display())]
    Nifti { path: PathBuf, reason: String },
    /// An image slice could not be decoded.
    #[error("{}: cannot decode image: {reason}", path.display())]
    Image { path: PathBuf, reason: String },
    /// A relative path taken from a dataset file would not stay inside the data root.
    #[error("unsafe path {rel:?} under {}: {reason}", root.display())]
    UnsafePath {
        root: PathBuf,
        rel: String,
        reason: String,
    },
}

impl FormatError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        FormatError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
