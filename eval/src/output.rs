//! Where `m3d eval bench` writes (`-o`): a local folder, or a folder in a store (`file://`, `s3://`).
//!
//! Ranks on other machines share a store folder, not a file system. So with a store, every process works in a
//! local staging folder of its own and uploads what it wrote there: a rank its part, its overlays and
//! retrieval's scores (before it reports its slice done, so that a completed job has every part in the store);
//! rank 0 downloads the parts, merges, and uploads the report. The object layout is the local folder's.

use std::path::{Path, PathBuf};

use m3d_store::Store;

use crate::EvalError;

/// The files the merge writes.
pub const REPORT: [&str; 3] = ["results.jsonl", "bench.json", "bench.md"];

/// An evaluation's output folder.
pub enum BenchOut {
    Local(PathBuf),
    Store {
        url: String,
        store: Store,
        staging: tempfile::TempDir,
    },
}

fn store_err(url: &str, e: impl std::fmt::Display) -> EvalError {
    EvalError::Input(format!("{url}: {e}"))
}

impl BenchOut {
    /// `out` as given to `-o`: a store URL (`scheme://...`) or a local path.
    pub fn open(out: &str) -> Result<BenchOut, EvalError> {
        if !out.contains("://") {
            return Ok(BenchOut::Local(PathBuf::from(out)));
        }
        let url = out.trim_end_matches('/').to_string();
        let store = Store::open(&url).map_err(|e| store_err(&url, e))?;
        let staging = tempfile::Builder::new()
            .prefix("m3d-eval-")
            .tempdir()
            .map_err(|e| store_err(&url, format!("creating a staging folder: {e}")))?;
        Ok(BenchOut::Store {
            url,
            store,
            staging,
        })
    }

    /// The local folder this process writes into (the output itself, or the staging folder).
    pub fn dir(&self) -> &Path {
        match self {
            BenchOut::Local(p) => p,
            BenchOut::Store { staging, .. } => staging.path(),
        }
    }

    /// `<out>/<name>` as a path or URL.
    pub fn child(&self, name: &str) -> String {
        match self {
            BenchOut::Local(p) => p.join(name).display().to_string(),
            BenchOut::Store { url, .. } => format!("{url}/{name}"),
        }
    }

    /// The store, its URL and the staging folder; `None` for a local folder.
    fn staged(&self) -> Option<(&str, &Store, &Path)> {
        match self {
            BenchOut::Local(_) => None,
            BenchOut::Store {
                url,
                store,
                staging,
            } => Some((url, store, staging.path())),
        }
    }

    /// Uploads every file of the staging folder (a rank's part, overlays, retrieval's scores).
    pub fn upload_all(&self) -> Result<(), EvalError> {
        let Some((_, _, staging)) = self.staged() else {
            return Ok(());
        };
        let mut names = Vec::new();
        let mut stack = vec![staging.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let entries =
                std::fs::read_dir(&dir).map_err(|e| store_err(&dir.display().to_string(), e))?;
            for entry in entries {
                let path = entry
                    .map_err(|e| store_err(&dir.display().to_string(), e))?
                    .path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(staging) {
                    names.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        names.sort();
        self.upload(&names.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Uploads the named files of the staging folder.
    pub fn upload(&self, names: &[&str]) -> Result<(), EvalError> {
        let Some((url, store, staging)) = self.staged() else {
            return Ok(());
        };
        for name in names {
            let path = staging.join(name);
            let bytes =
                std::fs::read(&path).map_err(|e| store_err(&path.display().to_string(), e))?;
            store
                .put(name, bytes.into())
                .map_err(|e| store_err(url, e))?;
        }
        Ok(())
    }

    /// Downloads the ranks' parts (`parts/`) into the staging folder, for the merge.
    pub fn download_parts(&self) -> Result<(), EvalError> {
        let Some((url, store, staging)) = self.staged() else {
            return Ok(());
        };
        for (key, _) in store.list("parts").map_err(|e| store_err(url, e))? {
            let bytes = store.get(&key).map_err(|e| store_err(url, e))?;
            let path = staging.join(&key);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| store_err(&dir.display().to_string(), e))?;
            }
            std::fs::write(&path, &bytes).map_err(|e| store_err(&path.display().to_string(), e))?;
        }
        Ok(())
    }

    /// The bytes of the output's file `name`.
    pub fn read(&self, name: &str) -> Result<Vec<u8>, EvalError> {
        match self {
            BenchOut::Local(p) => {
                let path = p.join(name);
                std::fs::read(&path).map_err(|e| store_err(&path.display().to_string(), e))
            }
            BenchOut::Store { url, store, .. } => store
                .get(name)
                .map(|b| b.to_vec())
                .map_err(|e| store_err(url, e)),
        }
    }
}
