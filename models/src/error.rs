//! The one error type of the models crate. Every variant names the tensor, key or file it is about.

use std::path::PathBuf;

use crate::weights::LoadReport;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
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
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("state dict does not match the model:\n{0}")]
    StateDict(LoadReport),
    #[error("tensor `{name}`: expected shape {expected:?}, got {got:?}")]
    Shape {
        name: String,
        expected: Vec<i64>,
        got: Vec<i64>,
    },
    #[error("invalid config: {0}")]
    Config(String),
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("libtorch: {0}")]
    Tch(#[from] tch::TchError),
    #[error("{0}")]
    Checkpoint(#[from] m3d_grad_hooks::HookError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn weights(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ModelError::Weights {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Reads and parses a JSON file (an HF `config.json`, an index, an adapter config), naming the file on error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}
