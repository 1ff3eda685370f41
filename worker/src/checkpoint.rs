//! Checkpoints of a training run in object storage (any `m3d_shards::Store` URL: a folder, `file://`,
//! `s3://`): what a checkpoint holds, staging it to host memory while training goes on, uploading it in the
//! background with retries and a commit record written last, retention, finding the latest committed one, and
//! loading it with every file checked.
//!
//! Layout under the checkpoint URL (`checkpoint.url`, default `<run>/checkpoints`):
//!
//! ```text
//! step-000000020/model.safetensors      every parameter (identical on every rank under data parallelism,
//!                                       so rank 0 writes them)
//! step-000000020/optimizer.safetensors  AdamW's state, by name (`<param>.exp_avg`, `.exp_avg_sq`, `.step`)
//! step-000000020/state.json             step, data-plan position and spec, world size, recipe, code version
//! step-000000020/COMMIT                 written last: size and CRC-32 of each file above
//! ```
//!
//! A folder without `COMMIT` (a writer killed mid-upload) is never loaded, and a file that does not match its
//! commit record is an error naming it. The learning-rate schedule is a function of the step, and the data
//! order, augmentation and prompt wording are functions of (seed, epoch, sample), so these files are the whole
//! state: a resumed run continues exactly, also with another number of workers. (Dropout draws from
//! libtorch's generator, which is not saved: runs with dropout continue statistically, not bit for bit.)

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use m3d_coordinator::plan::PlanSpec;
use m3d_models::weights::{read_safetensors_bytes, serialize_host, to_host_tensors, HostTensor};
use m3d_shards::store::Store;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Errors writing or reading checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint store {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: m3d_shards::ShardError,
    },
    #[error("checkpoint {url}/{key}: {reason}")]
    Invalid {
        url: String,
        key: String,
        reason: String,
    },
    #[error(transparent)]
    Model(#[from] m3d_models::ModelError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("uploading checkpoint step {step} to {url} failed after {attempts} attempts: {last}")]
    Upload {
        step: u64,
        url: String,
        attempts: u32,
        last: String,
    },
}

const COMMIT: &str = "COMMIT";
const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

/// The folder of step `step`'s checkpoint.
pub fn step_dir(step: u64) -> String {
    format!("step-{step:09}")
}

/// Where training stood when a checkpoint was taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Global optimizer steps completed.
    pub step: u64,
    pub epoch: u64,
    pub step_in_epoch: u64,
    /// The world size that wrote it (a resume may use another).
    pub world_size: u32,
    pub plan: PlanSpec,
    /// The effective recipe, as YAML.
    pub recipe: String,
    /// `m3d` version that wrote it.
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FileRecord {
    bytes: u64,
    /// CRC-32 (IEEE) of the file: catches truncated, partial and corrupted files at several GB/s, where a
    /// cryptographic hash would cost seconds per checkpoint (this guards against accidents, not attackers).
    crc32: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CommitRecord {
    step: u64,
    files: std::collections::BTreeMap<String, FileRecord>,
}

/// A checkpoint copied to host memory, ready to upload. Staging is one copy of each tensor (the only part
/// that stops training); serialising and checksumming happen on the upload thread.
pub struct Staged {
    pub step: u64,
    model: Vec<(String, HostTensor)>,
    optimizer: Vec<(String, HostTensor)>,
    state: Vec<u8>,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("step", &self.step)
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl Staged {
    /// Copies the parameters and optimizer state to host memory.
    pub fn new(
        state: &CheckpointState,
        model: &[(String, Tensor)],
        optimizer: &[(String, Tensor)],
    ) -> Result<Staged, CheckpointError> {
        let state_json =
            serde_json::to_vec_pretty(state).map_err(|e| CheckpointError::Invalid {
                url: String::new(),
                key: STATE.into(),
                reason: e.to_string(),
            })?;
        Ok(Staged {
            step: state.step,
            model: to_host_tensors(model)?,
            optimizer: to_host_tensors(optimizer)?,
            state: state_json,
        })
    }

    /// Host memory the staged copy holds.
    pub fn bytes(&self) -> usize {
        self.model
            .iter()
            .chain(&self.optimizer)
            .map(|(_, t)| t.len())
            .sum::<usize>()
            + self.state.len()
    }

    /// The files of the checkpoint, serialised.
    fn files(&self) -> Result<Vec<(&'static str, Bytes)>, CheckpointError> {
        Ok(vec![
            (MODEL, Bytes::from(serialize_host(&self.model)?)),
            (OPTIMIZER, Bytes::from(serialize_host(&self.optimizer)?)),
            (STATE, Bytes::from(self.state.clone())),
        ])
    }
}

fn store_err(store: &Store) -> impl Fn(m3d_shards::ShardError) -> CheckpointError + '_ {
    move |source| CheckpointError::Store {
        url: store.url().to_string(),
        source,
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Writes a staged checkpoint: its files, then the commit record. Until the record lands the checkpoint does
/// not exist for [`committed_steps`] and [`load`].
pub fn write(store: &Store, staged: &Staged) -> Result<(), CheckpointError> {
    write_files(store, staged.step, &staged.files()?)
}

/// [`write`] of already serialised files (an upload retried does not serialise again).
fn write_files(
    store: &Store,
    step: u64,
    files: &[(&'static str, Bytes)],
) -> Result<(), CheckpointError> {
    let dir = step_dir(step);
    let mut record = CommitRecord {
        step,
        files: Default::default(),
    };
    for (name, bytes) in files {
        store
            .put(&format!("{dir}/{name}"), bytes.clone())
            .map_err(store_err(store))?;
        record.files.insert(
            name.to_string(),
            FileRecord {
                bytes: bytes.len() as u64,
                crc32: crc32(bytes),
            },
        );
    }
    let commit = serde_json::to_vec_pretty(&record).unwrap_or_default();
    store
        .put(&format!("{dir}/{COMMIT}"), Bytes::from(commit))
        .map_err(store_err(store))
}

/// Steps of the committed checkpoints under `store`, ascending.
pub fn committed_steps(store: &Store) -> Result<Vec<u64>, CheckpointError> {
    Ok(committed_in(&store.list("").map_err(store_err(store))?))
}

/// The step of a key under a step folder (`step-000000020/...`).
fn step_of(key: &str) -> Option<u64> {
    key.split('/').next()?.strip_prefix("step-")?.parse().ok()
}

/// Committed steps among listed keys, ascending.
fn committed_in(keys: &[(String, u64)]) -> Vec<u64> {
    let mut steps: Vec<u64> = keys
        .iter()
        .filter(|(key, _)| key.ends_with(&format!("/{COMMIT}")))
        .filter_map(|(key, _)| step_of(key))
        .collect();
    steps.sort_unstable();
    steps.dedup();
    steps
}

/// Deletes the committed checkpoints that are neither among the last `keep_last` nor a multiple of
/// `keep_every`, commit record first (so a half-deleted checkpoint is simply not committed), and any
/// uncommitted folder older than the newest commit (a writer killed mid-upload). Returns the deleted steps.
pub fn retain(
    store: &Store,
    keep_last: usize,
    keep_every: Option<u64>,
) -> Result<Vec<u64>, CheckpointError> {
    let all = store.list("").map_err(store_err(store))?;
    let steps = committed_in(&all);
    let Some(&newest) = steps.last() else {
        return Ok(Vec::new());
    };
    let keep_from = steps.len().saturating_sub(keep_last.max(1));
    let mut deleted = Vec::new();
    for (i, &step) in steps.iter().enumerate() {
        let kept = i >= keep_from || keep_every.is_some_and(|m| m > 0 && step % m == 0);
        if kept {
            continue;
        }
        let dir = step_dir(step);
        store
            .delete(&format!("{dir}/{COMMIT}"))
            .map_err(store_err(store))?;
        for (key, _) in all
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{dir}/")))
        {
            if !key.ends_with(COMMIT) {
                store.delete(key).map_err(store_err(store))?;
            }
        }
        deleted.push(step);
    }
    // Leftovers of interrupted writes older than the newest commit.
    for (key, _) in &all {
        let Some(step) = step_of(key) else {
            continue;
        };
        if step < newest && !steps.contains(&step) {
            store.delete(key).map_err(store_err(store))?;
        }
    }
    Ok(deleted)
}

/// A checkpoint read back.
pub struct Loaded {
    pub state: CheckpointState,
    pub model: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
}

/// Reads the committed checkpoint of `step`, checking every file against the commit record.
pub fn load(store: &Store, step: u64) -> Result<Loaded, CheckpointError> {
    let dir = step_dir(step);
    let invalid = |key: &str, reason: String| CheckpointError::Invalid {
        url: store.url().to_string(),
        key: key.to_string(),
        reason,
    };
    let commit_key = format!("{dir}/{COMMIT}");
    let commit = store
        .get_opt(&commit_key)
        .map_err(store_err(store))?
        .ok_or_else(|| invalid(&commit_key, "not committed (no commit record)".into()))?;
    let record: CommitRecord =
        serde_json::from_slice(&commit).map_err(|e| invalid(&commit_key, e.to_string()))?;
    let fetch = |name: &str| -> Result<Bytes, CheckpointError> {
        let key = format!("{dir}/{name}");
        let want = record
            .files
            .get(name)
            .ok_or_else(|| invalid(&commit_key, format!("no record of `{name}`")))?;
        let bytes = store.get(&key).map_err(store_err(store))?;
        if bytes.len() as u64 != want.bytes || crc32(&bytes) != want.crc32 {
            return Err(invalid(
                &key,
                format!(
                    "{} bytes with CRC-32 {:08x}, the commit record says {} bytes with {:08x}",
                    bytes.len(),
                    crc32(&bytes),
                    want.bytes,
                    want.crc32
                ),
            ));
        }
        Ok(bytes)
    };
    let state: CheckpointState = serde_json::from_slice(&fetch(STATE)?)
        .map_err(|e| invalid(&format!("{dir}/{STATE}"), e.to_string()))?;
    let read = |name: &str| -> Result<Vec<(String, Tensor)>, CheckpointError> {
        let bytes = fetch(name)?;
        Ok(read_safetensors_bytes(
            &bytes,
            Path::new(&format!("{}/{dir}/{name}", store.url())),
        )?)
    };
    Ok(Loaded {
        state,
        model: read(MODEL)?,
        optimizer: read(OPTIMIZER)?,
    })
}

/// The URL of step `step`'s checkpoint under `base`.
pub fn step_url(base: &str, step: u64) -> String {
    format!("{}/{}", base.trim_end_matches('/'), step_dir(step))
}

/// Writes a checkpoint's files, retrying a failed write up to `attempts` times with exponential backoff.
fn upload(
    store: &Store,
    step: u64,
    files: &[(&'static str, Bytes)],
    attempts: u32,
) -> Result<u64, CheckpointError> {
    let mut attempt = 0;
    loop {
        match write_files(store, step, files) {
            Ok(()) => return Ok(step),
            Err(e) => {
                attempt += 1;
                tracing::warn!(step, attempt, error = %e, "checkpoint upload failed");
                if attempt >= attempts.max(1) {
                    return Err(CheckpointError::Upload {
                        step,
                        url: store.url().to_string(),
                        attempts: attempt,
                        last: e.to_string(),
                    });
                }
                std::thread::sleep(Duration::from_millis(200 << attempt.min(6)));
            }
        }
    }
}

/// Uploads staged checkpoints on a background thread, one at a time (a new one waits for the previous, so
/// at most one staged copy is in memory), retrying failed writes with exponential backoff, then applying the
/// retention rule.
pub struct Uploader {
    tx: Option<SyncSender<Staged>>,
    done: Receiver<Result<u64, CheckpointError>>,
    thread: Option<JoinHandle<()>>,
    in_flight: Option<u64>,
}

impl Uploader {
    pub fn new(store: Store, keep_last: usize, keep_every: Option<u64>, attempts: u32) -> Self {
        let (tx, rx) = sync_channel::<Staged>(0);
        let (done_tx, done) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("m3d-checkpoint".into())
            .spawn(move || {
                for staged in rx {
                    let result = staged
                        .files()
                        .and_then(|files| upload(&store, staged.step, &files, attempts));
                    if result.is_ok() {
                        if let Err(e) = retain(&store, keep_last, keep_every) {
                            tracing::warn!(error = %e, "checkpoint retention failed");
                        }
                    }
                    if done_tx.send(result).is_err() {
                        return;
                    }
                }
            })
            .ok();
        Uploader {
            tx: Some(tx),
            done,
            thread,
            in_flight: None,
        }
    }

    /// Starts uploading `staged`, after waiting for the previous upload; returns that previous upload's
    /// outcome if there was one.
    pub fn submit(&mut self, staged: Staged) -> Result<Option<u64>, CheckpointError> {
        let previous = self.wait()?;
        let step = staged.step;
        let sent = self.tx.as_ref().map(|tx| tx.send(staged).is_ok());
        if sent != Some(true) {
            return Err(CheckpointError::Upload {
                step,
                url: String::new(),
                attempts: 0,
                last: "the upload thread is gone".into(),
            });
        }
        self.in_flight = Some(step);
        Ok(previous)
    }

    /// The finished upload's step, if one finished since the last call (does not block).
    pub fn poll(&mut self) -> Result<Option<u64>, CheckpointError> {
        if self.in_flight.is_none() {
            return Ok(None);
        }
        match self.done.try_recv() {
            Ok(r) => {
                self.in_flight = None;
                r.map(Some)
            }
            Err(_) => Ok(None),
        }
    }

    /// Waits for the upload in flight, if any, and returns its step.
    pub fn wait(&mut self) -> Result<Option<u64>, CheckpointError> {
        if self.in_flight.take().is_none() {
            return Ok(None);
        }
        match self.done.recv() {
            Ok(r) => r.map(Some),
            Err(_) => Err(CheckpointError::Upload {
                step: 0,
                url: String::new(),
                attempts: 0,
                last: "the upload thread stopped".into(),
            }),
        }
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
