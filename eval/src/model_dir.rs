//! `--model` as a store URL (`s3://bucket/run/final`, `file:///...`) as well as a local folder: a run whose
//! `output.run` is in a store leaves its `final/` there. A model loads from files (the weights memory-mapped,
//! the tokenizer and configs read by path), so a remote store folder is first copied into a temporary local
//! folder, which lives as long as the [`ModelDir`]; a `file://` one is used in place.

use std::io::Write;
use std::path::{Path, PathBuf};

use m3d_store::{Store, StoreKind};

use crate::EvalError;

/// Bytes per ranged read when copying a model file: a 15 GB checkpoint never sits in memory whole.
const CHUNK: u64 = 64 << 20;

/// A model folder on local disk: the one given, or a copy of a store folder.
pub struct ModelDir {
    path: PathBuf,
    _copy: Option<tempfile::TempDir>,
}

impl ModelDir {
    /// `model` as given to `--model`: a local folder (used in place) or a store URL (copied, every object under
    /// it at its relative key).
    pub fn open(model: &Path) -> Result<ModelDir, EvalError> {
        let Some(url) = model.to_str().filter(|m| m.contains("://")) else {
            return Ok(ModelDir {
                path: model.to_path_buf(),
                _copy: None,
            });
        };
        let url = url.trim_end_matches('/');
        let err = |e: &dyn std::fmt::Display| EvalError::Input(format!("--model {url}: {e}"));
        let store = Store::open_existing(url).map_err(|e| err(&e))?;
        let objects = store.list("").map_err(|e| err(&e))?;
        if objects.is_empty() {
            return Err(err(&"no model there (the folder is empty or missing)"));
        }
        if let StoreKind::Local(root) = store.kind() {
            return Ok(ModelDir {
                path: root.clone(),
                _copy: None,
            });
        }
        let copy = tempfile::Builder::new()
            .prefix("m3d-model-")
            .tempdir()
            .map_err(|e| err(&format!("creating a local folder for the copy: {e}")))?;
        for (key, size) in objects {
            let path = copy.path().join(&key);
            let file_err = |e: std::io::Error| err(&format!("{}: {e}", path.display()));
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(file_err)?;
            }
            let mut file = std::io::BufWriter::new(std::fs::File::create(&path).map_err(file_err)?);
            let mut at = 0;
            while at < size {
                let end = (at + CHUNK).min(size);
                let bytes = store
                    .get_range(&key, at..end)
                    .map_err(|e| err(&format!("{key}: {e}")))?;
                file.write_all(&bytes).map_err(file_err)?;
                at = end;
            }
            file.flush().map_err(file_err)?;
        }
        Ok(ModelDir {
            path: copy.path().to_path_buf(),
            _copy: Some(copy),
        })
    }

    /// The folder to load from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
