//! Where a run's results go (`output.run`): a local folder, or a folder in an object store (`file://`,
//! `s3://`).
//!
//! A local folder works as it always has: `metrics.jsonl` appended one line per `write(2)`, `final/` written
//! under a temporary name and renamed into place, `loss.png`. A store cannot append to an object or rename a
//! folder, so there:
//!
//! ```text
//! metrics/part-00000.jsonl   the metrics lines, at most PART_LINES per part; rank 0 keeps the open
//! metrics/part-00001.jsonl   part's lines in memory and rewrites that one object every
//!                            `output.metrics_flush_s` seconds (and when a part fills, and at the end
//!                            of a round), so a flush costs one PUT of at most one part whatever the
//!                            length of the run; full parts are never written again
//! final/model.safetensors    the final weights, config.json, tokenizer.json, adapter/ (as locally)
//! final/COMMIT               written last: size and CRC-32 of each file of final/ (as a checkpoint's)
//! loss.png                   the loss plot `m3d train` draws at the end
//! recipe.yaml                the effective recipe (`m3d train`)
//! ```
//!
//! Readers ([`read_run_metrics`]: `m3d plot`, `m3d status --run`) list the parts and concatenate them, so
//! they see the run up to its last flush while it trains. A `final/` without `COMMIT` is being written (or
//! its writer died) and is refused by [`get_final_file`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use m3d_store::Store;
use serde::{Deserialize, Serialize};

use crate::metrics::{parse_metrics, read_metrics, MetricsError, MetricsLine, MetricsWriter};

/// Lines of one metrics part in a store (about 3.5 MB at the ~350 bytes of a line): the most a flush
/// uploads.
pub const PART_LINES: usize = 10_000;
/// The folder of the metrics parts under a store run.
pub const METRICS_DIR: &str = "metrics";
/// The commit record of `final/` in a store, written last.
pub const FINAL_COMMIT: &str = "COMMIT";

/// Retries of each metrics request and the time they may take: a flush runs on rank 0's training thread,
/// and a store that does not answer must not stall training for object_store's default three minutes
/// (a failed flush is retried at the next interval; nothing is lost).
const METRICS_REQUEST_RETRIES: usize = 2;
const METRICS_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors of a run's outputs, naming the URL or file.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("run {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: m3d_store::StoreError,
    },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}/{key}: {reason}")]
    Invalid {
        url: String,
        key: String,
        reason: String,
    },
}

fn store_err(url: &str) -> impl Fn(m3d_store::StoreError) -> OutputError + '_ {
    move |source| OutputError::Store {
        url: url.to_string(),
        source,
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `url` names a store (`scheme://...`) rather than a local path.
pub fn is_store_url(url: &str) -> bool {
    url.contains("://")
}

/// Where a run writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunDir {
    /// A local folder (a plain path): `<run>/metrics.jsonl`, `<run>/final/`.
    Local(PathBuf),
    /// A folder in a store (`file://`, `s3://`; the URL without a trailing `/`): see the module
    /// documentation.
    Store(String),
}

impl RunDir {
    /// The run folder `output.run` names.
    pub fn of(url: &str) -> RunDir {
        if is_store_url(url) {
            RunDir::Store(url.trim_end_matches('/').to_string())
        } else {
            RunDir::Local(PathBuf::from(url))
        }
    }

    /// The folder or URL, for messages.
    pub fn display(&self) -> String {
        match self {
            RunDir::Local(p) => p.display().to_string(),
            RunDir::Store(url) => url.clone(),
        }
    }

    /// Where the metrics are: `<run>/metrics.jsonl`, or `<run>/metrics/` in a store.
    pub fn metrics_display(&self) -> String {
        match self {
            RunDir::Local(p) => p.join("metrics.jsonl").display().to_string(),
            RunDir::Store(url) => format!("{url}/{METRICS_DIR}/"),
        }
    }

    /// `<run>/<name>` as a path or URL.
    pub fn child(&self, name: &str) -> String {
        match self {
            RunDir::Local(p) => p.join(name).display().to_string(),
            RunDir::Store(url) => format!("{url}/{name}"),
        }
    }

    fn open_store(&self, url: &str, bounded: bool) -> Result<Store, OutputError> {
        if bounded {
            Store::open_with_retries(url, METRICS_REQUEST_RETRIES, METRICS_REQUEST_TIMEOUT)
        } else {
            Store::open(url)
        }
        .map_err(store_err(url))
    }

    /// Rank 0's metrics writer for a round resuming at `resume_step`: the lines of later steps (a broken
    /// timeline's) are dropped first.
    pub fn open_metrics(
        &self,
        resume_step: u64,
        flush: Duration,
    ) -> Result<RunMetrics, OutputError> {
        match self {
            RunDir::Local(dir) => {
                let path = dir.join("metrics.jsonl");
                truncate_metrics(&path, resume_step)?;
                Ok(RunMetrics::Local(MetricsWriter::open(&path)?))
            }
            RunDir::Store(url) => Ok(RunMetrics::Store(StoreMetrics::open(
                self.open_store(url, true)?,
                resume_step,
                flush,
                PART_LINES,
            )?)),
        }
    }

    /// Puts `bytes` at `<run>/<name>` (a local file written under a temporary name and renamed).
    pub fn put(&self, name: &str, bytes: Vec<u8>) -> Result<(), OutputError> {
        match self {
            RunDir::Local(dir) => write_local(&dir.join(name), &bytes),
            RunDir::Store(url) => self
                .open_store(url, false)?
                .put(name, Bytes::from(bytes))
                .map_err(store_err(url)),
        }
    }
}

fn write_local(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Keeps the metrics lines of steps up to `resume_step` in a local `metrics.jsonl` (a restart round rewrites
/// what follows).
fn truncate_metrics(path: &Path, resume_step: u64) -> Result<(), OutputError> {
    if !path.exists() {
        return Ok(());
    }
    let kept: Vec<MetricsLine> = read_metrics(path)?
        .into_iter()
        .filter(|l| l.step <= resume_step)
        .collect();
    let mut text = String::new();
    for l in &kept {
        text.push_str(&serde_json::to_string(l).unwrap_or_default());
        text.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Rank 0's metrics: appended to a local file, or kept in parts in a store.
#[derive(Debug)]
pub enum RunMetrics {
    Local(MetricsWriter),
    Store(StoreMetrics),
}

impl RunMetrics {
    pub fn write(&mut self, line: &MetricsLine) -> Result<(), OutputError> {
        match self {
            RunMetrics::Local(w) => Ok(w.write(line)?),
            RunMetrics::Store(w) => w.write(line),
        }
    }

    /// Makes every line written so far readable (a local file already is). In a store the upload is tried
    /// up to [`FINISH_ATTEMPTS`] times with backoff: the end of a run does not fail on one bad request.
    pub fn flush(&mut self) -> Result<(), OutputError> {
        let RunMetrics::Store(w) = self else {
            return Ok(());
        };
        let mut attempt = 1;
        loop {
            match w.flush() {
                Err(e) if attempt < FINISH_ATTEMPTS => {
                    tracing::warn!(attempt, error = %e, "uploading the metrics failed; retrying");
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                    attempt += 1;
                }
                done => return done,
            }
        }
    }
}

/// Attempts of the metrics upload that ends a run ([`RunMetrics::flush`]).
pub const FINISH_ATTEMPTS: u32 = 4;

/// The key of metrics part `index`.
pub fn part_key(index: u32) -> String {
    format!("{METRICS_DIR}/part-{index:05}.jsonl")
}

fn part_index(key: &str) -> Option<u32> {
    key.strip_prefix(METRICS_DIR)?
        .strip_prefix("/part-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// The metrics parts under a store run, in order.
fn list_parts(store: &Store) -> Result<Vec<(u32, String)>, OutputError> {
    let mut parts: Vec<(u32, String)> = store
        .list(METRICS_DIR)
        .map_err(store_err(store.url()))?
        .into_iter()
        .filter_map(|(key, _)| part_index(&key).map(|i| (i, key)))
        .collect();
    parts.sort();
    Ok(parts)
}

/// Metrics lines kept in parts in a store (see the module documentation): the open part's lines are in
/// memory and rewritten whole at each flush, because an object store cannot append.
#[derive(Debug)]
pub struct StoreMetrics {
    store: Store,
    every: Duration,
    part_lines: usize,
    /// Index of the open part, its text and its number of lines.
    part: u32,
    text: Vec<u8>,
    lines: usize,
    /// Full parts whose upload failed, retried before the open part at the next flush.
    full: Vec<(u32, Bytes)>,
    /// Lines written since the open part was last uploaded.
    dirty: bool,
    last_flush: Instant,
}

impl StoreMetrics {
    /// Opens the metrics of the store run `store` for a round resuming at `resume_step`: the parts up to
    /// that step are kept as they are; the parts after it are deleted, last first, and the part holding the
    /// step's line is cut after it and becomes the open part. Only those parts are read (from the last one
    /// back), so a round starts at the cost of a part or two however long the run. Lines are uploaded at
    /// most every `every` (zero: at every line), in parts of `part_lines`.
    pub fn open(
        store: Store,
        resume_step: u64,
        every: Duration,
        part_lines: usize,
    ) -> Result<StoreMetrics, OutputError> {
        let url = store.url().to_string();
        let parts = list_parts(&store)?;
        let mut open = StoreMetrics {
            store,
            every,
            part_lines: part_lines.max(1),
            part: 0,
            text: Vec::new(),
            lines: 0,
            full: Vec::new(),
            dirty: false,
            last_flush: Instant::now(),
        };
        let mut cut = false;
        for (index, key) in parts.iter().rev() {
            let bytes = open.store.get(key).map_err(store_err(&url))?;
            let text = String::from_utf8_lossy(&bytes);
            // Raw lines are kept as they were written; their steps decide which.
            let origin = PathBuf::from(format!("{url}/{key}"));
            let steps = parse_metrics(&text, &origin)?;
            let raw: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let keep = steps
                .iter()
                .take_while(|l| l.step <= resume_step)
                .count()
                .min(raw.len());
            open.part = *index;
            if keep == 0 && !raw.is_empty() {
                // Wholly after the resume step: a broken timeline's.
                open.store.delete(key).map_err(store_err(&url))?;
                cut = true;
                continue;
            }
            open.text = raw[..keep]
                .iter()
                .flat_map(|l| l.bytes().chain(std::iter::once(b'\n')))
                .collect();
            open.lines = keep;
            if keep < raw.len() {
                cut = true;
                open.dirty = true;
                open.flush()?;
            }
            break;
        }
        if cut {
            tracing::info!(
                url,
                resume_step,
                part = open.part,
                "metrics after the resume step dropped"
            );
        }
        if open.lines >= open.part_lines {
            open.part += 1;
            open.text.clear();
            open.lines = 0;
        }
        Ok(open)
    }

    /// Adds a line; uploads when the part is full or the interval has passed. A failed upload is logged and
    /// retried at the next one (the lines stay in memory); [`StoreMetrics::flush`] reports it.
    pub fn write(&mut self, line: &MetricsLine) -> Result<(), OutputError> {
        let json = serde_json::to_vec(line).map_err(|source| MetricsError::Parse {
            path: PathBuf::from(self.store.url()),
            line: 0,
            source,
        })?;
        self.text.extend_from_slice(&json);
        self.text.push(b'\n');
        self.lines += 1;
        self.dirty = true;
        let full = self.lines >= self.part_lines;
        if full {
            let text = Bytes::from(std::mem::take(&mut self.text));
            self.full.push((self.part, text));
            self.part += 1;
            self.lines = 0;
            self.dirty = false;
        }
        if full || self.last_flush.elapsed() >= self.every {
            if let Err(e) = self.flush() {
                tracing::warn!(error = %e, "uploading the metrics failed; retrying at the next flush");
            }
        }
        Ok(())
    }

    /// Uploads the full parts not yet uploaded, then the open part if it changed.
    pub fn flush(&mut self) -> Result<(), OutputError> {
        self.last_flush = Instant::now();
        let url = self.store.url().to_string();
        while let Some((index, text)) = self.full.first() {
            self.store
                .put(&part_key(*index), text.clone())
                .map_err(store_err(&url))?;
            self.full.remove(0);
        }
        if self.dirty {
            self.store
                .put(&part_key(self.part), Bytes::from(self.text.clone()))
                .map_err(store_err(&url))?;
            self.dirty = false;
        }
        Ok(())
    }
}

impl Drop for StoreMetrics {
    /// A round that ends early (broken, stopped, failed) still leaves its lines readable.
    fn drop(&mut self) {
        if !self.full.is_empty() || self.dirty {
            if let Err(e) = self.flush() {
                tracing::warn!(error = %e, "uploading the last metrics lines failed");
            }
        }
    }
}

/// The metrics of a run, and a label for it (the run folder's name): `input` is a metrics file, a run
/// folder (its `metrics.jsonl`, or `metrics/` parts written through `file://`), a store URL of a run folder
/// (its `metrics/` parts, or a `metrics.jsonl` object) or of a `.jsonl` object.
pub fn read_run_metrics(input: &str) -> Result<(String, Vec<MetricsLine>), OutputError> {
    if !is_store_url(input) {
        let p = Path::new(input);
        let file = if p.is_dir() {
            let file = p.join("metrics.jsonl");
            if !file.exists() && p.join(METRICS_DIR).is_dir() {
                let store = Store::open_existing(input).map_err(store_err(input))?;
                return Ok((label_of(input), read_parts(&store)?));
            }
            file
        } else {
            p.to_path_buf()
        };
        return Ok((label_of(&file.display().to_string()), read_metrics(&file)?));
    }
    let url = input.trim_end_matches('/');
    if let Some((base, name)) = url.rsplit_once('/').filter(|(_, n)| n.ends_with(".jsonl")) {
        let store = Store::open_existing(base).map_err(store_err(base))?;
        let bytes = store.get(name).map_err(store_err(base))?;
        let lines = parse_metrics(&String::from_utf8_lossy(&bytes), Path::new(url))?;
        return Ok((label_of(url), lines));
    }
    let store = Store::open_existing(url).map_err(store_err(url))?;
    if list_parts(&store)?.is_empty() {
        if let Some(bytes) = store.get_opt("metrics.jsonl").map_err(store_err(url))? {
            let origin = PathBuf::from(format!("{url}/metrics.jsonl"));
            let lines = parse_metrics(&String::from_utf8_lossy(&bytes), &origin)?;
            return Ok((label_of(url), lines));
        }
    }
    Ok((label_of(url), read_parts(&store)?))
}

/// Every line of a store run's parts, in order. A part deleted between the listing and its read (a restart
/// round cutting the metrics back) is skipped.
fn read_parts(store: &Store) -> Result<Vec<MetricsLine>, OutputError> {
    let url = store.url().to_string();
    let mut out = Vec::new();
    for (_, key) in list_parts(store)? {
        let Some(bytes) = store.get_opt(&key).map_err(store_err(&url))? else {
            continue;
        };
        let origin = PathBuf::from(format!("{}/{key}", url.trim_end_matches('/')));
        out.extend(parse_metrics(&String::from_utf8_lossy(&bytes), &origin)?);
    }
    Ok(out)
}

/// A run's name from its metrics file or folder: the folder's name for `.../<run>/metrics.jsonl` and
/// `.../<run>`, the file's stem for any other `.jsonl`.
fn label_of(path_or_url: &str) -> String {
    let trimmed = path_or_url.trim_end_matches('/');
    let mut segments = trimmed.rsplit('/');
    let last = segments.next().unwrap_or(trimmed);
    let label = match last {
        "metrics.jsonl" => segments.next().unwrap_or("run"),
        n => n.strip_suffix(".jsonl").unwrap_or(n),
    };
    if label.is_empty() || label.contains(':') {
        "run".into()
    } else {
        label.to_string()
    }
}

/// Writes `bytes` to a local path or a store URL (`<folder URL>/<name>`).
pub fn write_output(path_or_url: &str, bytes: Vec<u8>) -> Result<(), OutputError> {
    if !is_store_url(path_or_url) {
        return write_local(Path::new(path_or_url), &bytes);
    }
    let Some((base, name)) = path_or_url.rsplit_once('/').filter(|(b, n)| {
        !n.is_empty() && !b.ends_with(':') && !b.ends_with("//") && b.contains("://")
    }) else {
        return Err(OutputError::Invalid {
            url: path_or_url.to_string(),
            key: String::new(),
            reason: "names no object (expected scheme://bucket/.../name)".into(),
        });
    };
    let store = Store::open(base).map_err(store_err(base))?;
    store.put(name, Bytes::from(bytes)).map_err(store_err(base))
}

/// Size and CRC-32 of one file of `final/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub bytes: u64,
    pub crc32: u32,
}

/// `final/COMMIT`: the step the weights are from and every file of the folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalRecord {
    pub step: u64,
    pub files: BTreeMap<String, FileRecord>,
}

fn files_under(dir: &Path) -> Result<Vec<PathBuf>, OutputError> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).map_err(io_err(&d))? {
            let path = entry.map_err(io_err(&d))?.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Uploads the files of the local folder `from` and the in-memory `files` (name, consecutive buffers) to
/// `final/` of the store run `url`: the old commit record first and every old file of `final/` are deleted
/// (the folder is incomplete from then on), then each file is put, then `final/COMMIT` listing them. Readers
/// take the folder as complete only with its record ([`get_final_file`]).
pub fn upload_final(
    url: &str,
    from: &Path,
    files: Vec<(String, Vec<Bytes>)>,
    step: u64,
) -> Result<FinalRecord, OutputError> {
    let store = Store::open(url).map_err(store_err(url))?;
    let commit = format!("final/{FINAL_COMMIT}");
    store.delete(&commit).map_err(store_err(url))?;
    for (key, _) in store.list("final").map_err(store_err(url))? {
        store.delete(&key).map_err(store_err(url))?;
    }
    let mut all = files;
    for path in files_under(from)? {
        let rel = path
            .strip_prefix(from)
            .map_err(|_| OutputError::Invalid {
                url: url.to_string(),
                key: path.display().to_string(),
                reason: "outside the final folder".into(),
            })?
            .to_string_lossy()
            .replace('\\', "/");
        let bytes = Bytes::from(std::fs::read(&path).map_err(io_err(&path))?);
        all.push((rel, vec![bytes]));
    }
    let mut records = BTreeMap::new();
    for (rel, parts) in all {
        let mut crc = crc32fast::Hasher::new();
        for p in &parts {
            crc.update(p);
        }
        let record = FileRecord {
            bytes: parts.iter().map(|p| p.len() as u64).sum(),
            crc32: crc.finalize(),
        };
        let key = format!("final/{rel}");
        store.put_parts(&key, parts).map_err(store_err(url))?;
        store.sync(&key).map_err(store_err(url))?;
        records.insert(rel, record);
    }
    let record = FinalRecord {
        step,
        files: records,
    };
    let json = serde_json::to_vec_pretty(&record).unwrap_or_default();
    store
        .put(&commit, Bytes::from(json))
        .map_err(store_err(url))?;
    store.sync(&commit).map_err(store_err(url))?;
    Ok(record)
}

/// The commit record of a store folder written by [`upload_final`] (`store` opened at `.../final`), if it
/// has one.
pub fn final_record(store: &Store) -> Result<Option<FinalRecord>, OutputError> {
    let url = store.url();
    let Some(bytes) = store.get_opt(FINAL_COMMIT).map_err(store_err(url))? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| OutputError::Invalid {
            url: url.to_string(),
            key: FINAL_COMMIT.into(),
            reason: e.to_string(),
        })
}

/// File `name` of a weights folder in a store, or `None` if it has no such file. A folder with a commit
/// record (a run's `final/`) has the file checked against it; a folder named `final` without one is refused
/// as incomplete (its run has not finished uploading it, or died doing so). Other folders (weights put there
/// by hand) are read as they are.
pub fn get_final_file(store: &Store, name: &str) -> Result<Option<Bytes>, OutputError> {
    let url = store.url().trim_end_matches('/');
    match final_record(store)? {
        Some(record) => {
            let Some(want) = record.files.get(name) else {
                return Ok(None);
            };
            let bytes = store.get(name).map_err(store_err(url))?;
            let crc = crc32fast::hash(&bytes);
            if bytes.len() as u64 != want.bytes || crc != want.crc32 {
                return Err(OutputError::Invalid {
                    url: url.to_string(),
                    key: name.to_string(),
                    reason: format!(
                        "{} bytes with CRC-32 {crc:08x}, {FINAL_COMMIT} says {} bytes with {:08x}",
                        bytes.len(),
                        want.bytes,
                        want.crc32
                    ),
                });
            }
            Ok(Some(bytes))
        }
        None if url.rsplit('/').next() == Some("final") => Err(OutputError::Invalid {
            url: url.to_string(),
            key: FINAL_COMMIT.into(),
            reason:
                "missing: these final weights are incomplete (their run has not finished writing \
                     them, or stopped while it did)"
                    .into(),
        }),
        None => store.get_opt(name).map_err(store_err(url)),
    }
}
