//! Where `m3d eval bench` writes (`-o`): a local folder, or a folder in a store (`file://`, `s3://`).
//!
//! Ranks on other machines share a store folder, not a file system. So with a store, every process works in a
//! local staging folder of its own and uploads what it wrote there: a rank its part, its overlays and
//! retrieval's scores (before it reports its slice done, so that a completed job has every part in the store);
//! rank 0 downloads the parts, merges, and uploads the report. The object layout is the local folder's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

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
        /// Staging files already in the store (uploaded or downloaded), with the size and modification time
        /// they had then: [`BenchOut::upload_all`] sends only what is new or changed.
        synced: Mutex<HashMap<String, (u64, Option<SystemTime>)>>,
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
            synced: Mutex::new(HashMap::new()),
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
                ..
            } => Some((url, store, staging.path())),
        }
    }

    /// Uploads the files of the staging folder that are not in the store as they are now (a rank's result
    /// files, overlays, retrieval's scores). Result files (`parts/items-*`) go last, so that a result file in
    /// the store means the overlays and scores of its items are there too.
    pub fn upload_all(&self) -> Result<(), EvalError> {
        let BenchOut::Store {
            staging, synced, ..
        } = self
        else {
            return Ok(());
        };
        let staging = staging.path();
        let mut files = Vec::new();
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
                    let name = rel.to_string_lossy().replace('\\', "/");
                    if name.ends_with(".tmp") {
                        continue;
                    }
                    let meta = std::fs::metadata(&path)
                        .map_err(|e| store_err(&path.display().to_string(), e))?;
                    files.push((name, (meta.len(), meta.modified().ok())));
                }
            }
        }
        files.retain(|(name, stamp)| {
            synced.lock().unwrap_or_else(|p| p.into_inner()).get(name) != Some(stamp)
        });
        files.sort_by_key(|(name, _)| (name.starts_with("parts/items-"), name.clone()));
        for (name, stamp) in files {
            self.upload(&[&name])?;
            synced
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name, stamp);
        }
        Ok(())
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

    /// Downloads the output's `parts/` (every rank's result files, summaries, retrieval's scores) into the
    /// staging folder: for the merge, and for a restart round to see what earlier rounds finished.
    pub fn download_parts(&self) -> Result<(), EvalError> {
        let BenchOut::Store {
            url,
            store,
            staging,
            synced,
        } = self
        else {
            return Ok(());
        };
        for (key, _) in store.list("parts").map_err(|e| store_err(url, e))? {
            let path = staging.path().join(&key);
            if std::fs::metadata(&path).is_ok() {
                // This process's own file: the store has what it uploaded, or it is newer.
                continue;
            }
            let bytes = store.get(&key).map_err(|e| store_err(url, e))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| store_err(&dir.display().to_string(), e))?;
            }
            std::fs::write(&path, &bytes).map_err(|e| store_err(&path.display().to_string(), e))?;
            let meta =
                std::fs::metadata(&path).map_err(|e| store_err(&path.display().to_string(), e))?;
            synced
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, (meta.len(), meta.modified().ok()));
        }
        Ok(())
    }

    /// Removes the output's `parts/` (result files of an earlier job in the same output): a job that starts
    /// afresh must neither reuse nor merge them.
    pub fn clear_parts(&self) -> Result<(), EvalError> {
        match self {
            BenchOut::Local(p) => {
                let parts = p.join("parts");
                match std::fs::remove_dir_all(&parts) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(store_err(&parts.display().to_string(), e)),
                }
            }
            BenchOut::Store { url, store, .. } => {
                for (key, _) in store.list("parts").map_err(|e| store_err(url, e))? {
                    store.delete(&key).map_err(|e| store_err(url, e))?;
                }
                Ok(())
            }
        }
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
