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
//! step-000000020/state.json             step, data-plan position and spec, world size, recipe, code version,
//!                                       format and the run's identity (see [`RunIdentity`])
//! step-000000020/tokenizer.json         the job's tokenizer (a checkpoint can start another stage by itself)
//! step-000000020/COMMIT                 written last: size and CRC-32 of each file above
//! ```
//!
//! A folder without `COMMIT` (a writer killed mid-upload) is never loaded, and a file that does not match its
//! commit record is an error naming it. The commit record is a conditional put, so a second writer of the
//! same step cannot replace it. The learning-rate schedule is a function of the step; the data order,
//! augmentation and prompt wording are functions of (seed, epoch, sample); and libtorch's generator (dropout)
//! is seeded from (seed, step, rank) at every step ([`crate::job::step_seed`]). So these files are the whole
//! state, RNG states included: a resumed run continues exactly, also with another number of workers (where
//! only dropout, drawn per rank, continues statistically rather than bit for bit).
//!
//! That holds only for the same run: [`RunIdentity`] records what the sample sequence depends on (training
//! set, global batch, seed, data order), and [`check_identity`] refuses a resume that changed any of it unless
//! the caller accepts the change.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use m3d_coordinator::plan::PlanSpec;
use m3d_models::weights::{
    byte_sizes, host_buffers, read_safetensors_bytes, read_safetensors_from, safetensors_parts,
    to_host_tensors_into, HostTensor,
};
use m3d_recipes::Recipe;

use m3d_store::Store;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Errors writing or reading checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint store {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: m3d_store::StoreError,
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
    /// A local path that does not exist; `producer` says which run writes it, when its shape tells.
    #[error("{} does not exist{producer}", path.display())]
    Missing { path: PathBuf, producer: String },
    #[error("uploading checkpoint step {step} to {url} failed after {attempts} attempts: {last}")]
    Upload {
        step: u64,
        url: String,
        attempts: u32,
        last: String,
    },
    /// The training set's manifests could not be read for the run's identity.
    #[error(transparent)]
    Dataset(#[from] m3d_coordinator::RecipePlanError),
    /// A resume from a checkpoint of a run that differs in `changes`, not all of them accepted.
    #[error("checkpoint {url} was taken in another run: {}", list_changes(.changes))]
    Changed { url: String, changes: Vec<Changed> },
}

fn list_changes(changes: &[Changed]) -> String {
    changes
        .iter()
        .map(Changed::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

use m3d_coordinator::checkpoints::{committed_in, step_of, COMMIT};
pub use m3d_coordinator::checkpoints::{step_dir, step_url};
const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
const TOKENIZER: &str = "tokenizer.json";

/// Format of `state.json` this code writes. Records without a `format` field (written before it existed)
/// read as 0, and carry no [`RunIdentity`].
pub const STATE_FORMAT: u32 = 1;

/// The global data order (one keyed permutation of the whole training set per epoch), as recorded: the only
/// order before block shuffles existed, so old checkpoints hold it. Block shuffles record
/// `blocks:<block>x<window>` (`m3d_coordinator::plan::Shuffle`'s `Display`).
pub const SHUFFLE_GLOBAL: &str = "global";

/// What the sample sequence of a run depends on besides the step: a checkpoint resumed with any of it
/// changed does not continue the run it was taken from. `train.max_steps` is not part of it: a longer run
/// has the same sequence, only further.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// sha256 over the training set's datasets in recipe order ([`RunIdentity::of`]).
    pub data: String,
    pub global_batch: u64,
    pub seed: u64,
    /// The data order: [`SHUFFLE_GLOBAL`] or `blocks:<block>x<window>`.
    pub shuffle: String,
}

/// One part of the run's identity that differs between a checkpoint and the run resuming from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// The field as the recipe and `--accept-changed` name it.
    pub field: &'static str,
    pub checkpoint: String,
    pub recipe: String,
}

impl std::fmt::Display for Changed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: checkpoint {}, recipe {}",
            self.field, self.checkpoint, self.recipe
        )
    }
}

impl RunIdentity {
    /// The fields a resume may accept as changed, named as in the recipe (`data` is the training set).
    pub const FIELDS: [&'static str; 4] =
        ["data", "data.shuffle", "train.global_batch", "train.seed"];

    /// The identity of the run `recipe` describes; the training set's fingerprint is
    /// [`m3d_coordinator::TrainingSet::fingerprint`] (one manifest read per dataset, no shard read).
    pub fn of(recipe: &Recipe) -> Result<RunIdentity, CheckpointError> {
        let set = m3d_coordinator::TrainingSet::of(recipe)?;
        Ok(RunIdentity {
            data: set.fingerprint,
            global_batch: recipe.train.global_batch as u64,
            seed: recipe.train.seed,
            shuffle: m3d_coordinator::Shuffle::of_recipe(&recipe.data).to_string(),
        })
    }

    /// Every field of `now` that differs from `self` (the checkpoint's), in [`RunIdentity::FIELDS`] order.
    pub fn changes(&self, now: &RunIdentity) -> Vec<Changed> {
        let mut out = Vec::new();
        let mut cmp = |field, checkpoint: String, recipe: String| {
            if checkpoint != recipe {
                out.push(Changed {
                    field,
                    checkpoint,
                    recipe,
                });
            }
        };
        cmp("data", self.data.clone(), now.data.clone());
        cmp("data.shuffle", self.shuffle.clone(), now.shuffle.clone());
        cmp(
            "train.global_batch",
            self.global_batch.to_string(),
            now.global_batch.to_string(),
        );
        cmp("train.seed", self.seed.to_string(), now.seed.to_string());
        out
    }
}

/// What a resume may go ahead with, after [`check_identity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityCheck {
    /// The same run.
    Same,
    /// The checkpoint predates recorded identities (format 0): nothing could be checked.
    Unrecorded,
    /// These fields changed, and every one of them was accepted.
    Accepted(Vec<Changed>),
}

/// Compares the identity recorded in `state` (the checkpoint at `url`) with `now`'s. A change not named in
/// `accept` (fields as in [`RunIdentity::FIELDS`]) is an error listing every change with both values.
pub fn check_identity(
    state: &CheckpointState,
    url: &str,
    now: &RunIdentity,
    accept: &[String],
) -> Result<IdentityCheck, CheckpointError> {
    let Some(recorded) = &state.identity else {
        return Ok(IdentityCheck::Unrecorded);
    };
    let changes = recorded.changes(now);
    if changes.is_empty() {
        return Ok(IdentityCheck::Same);
    }
    if changes.iter().all(|c| accept.iter().any(|a| a == c.field)) {
        return Ok(IdentityCheck::Accepted(changes));
    }
    Err(CheckpointError::Changed {
        url: url.to_string(),
        changes,
    })
}

/// Where training stood when a checkpoint was taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// [`STATE_FORMAT`] of the writer; 0 for records written before the field existed.
    #[serde(default)]
    pub format: u32,
    /// The run the checkpoint belongs to; `None` in records of format 0.
    #[serde(default)]
    pub identity: Option<RunIdentity>,
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
    tokenizer: Option<Bytes>,
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
        Self::new_reusing(state, model, optimizer, None)
    }

    /// [`Staged::new`] into the memory of `spare`, an uploaded checkpoint (see [`Uploader::spare`]): every
    /// checkpoint after the first copies into memory that is already mapped.
    pub fn new_reusing(
        state: &CheckpointState,
        model: &[(String, Tensor)],
        optimizer: &[(String, Tensor)],
        spare: Option<Staged>,
    ) -> Result<Staged, CheckpointError> {
        let (spare_model, spare_optimizer) =
            spare.map(|s| (s.model, s.optimizer)).unwrap_or_default();
        let state_json =
            serde_json::to_vec_pretty(state).map_err(|e| CheckpointError::Invalid {
                url: String::new(),
                key: STATE.into(),
                reason: e.to_string(),
            })?;
        Ok(Staged {
            step: state.step,
            model: to_host_tensors_into(model, spare_model)?,
            optimizer: to_host_tensors_into(optimizer, spare_optimizer)?,
            state: state_json,
            tokenizer: None,
        })
    }

    /// Adds the job's `tokenizer.json` to the checkpoint.
    pub fn with_tokenizer(mut self, json: Bytes) -> Self {
        self.tokenizer = Some(json);
        self
    }

    /// Memory for a first [`Staged::new_reusing`]: buffers of the given sizes (names and bytes of the
    /// parameters and of the optimizer state), every page touched.
    pub fn prepared(model: &[(String, usize)], optimizer: &[(String, usize)]) -> Staged {
        Staged {
            step: 0,
            model: host_buffers(model),
            optimizer: host_buffers(optimizer),
            state: Vec::new(),
            tokenizer: None,
        }
    }

    /// Host memory the staged copy holds.
    pub fn bytes(&self) -> usize {
        self.model
            .iter()
            .chain(&self.optimizer)
            .map(|(_, t)| t.len())
            .sum::<usize>()
            + self.state.len()
            + self.tokenizer.as_ref().map_or(0, Bytes::len)
    }

    /// The files of the checkpoint, each as the buffers that make it up (shared with the staged copy, not
    /// copied: serialising 2.4 GB into one buffer used to cost more than writing it).
    fn files(&self) -> Result<Vec<(&'static str, Vec<Bytes>)>, CheckpointError> {
        Ok([
            (MODEL, safetensors_parts(&self.model)?),
            (OPTIMIZER, safetensors_parts(&self.optimizer)?),
            (STATE, vec![Bytes::from(self.state.clone())]),
        ]
        .into_iter()
        .chain(self.tokenizer.clone().map(|t| (TOKENIZER, vec![t])))
        .collect())
    }
}

fn store_err(store: &Store) -> impl Fn(m3d_store::StoreError) -> CheckpointError + '_ {
    move |source| CheckpointError::Store {
        url: store.url().to_string(),
        source,
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn crc32_parts(parts: &[Bytes]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// Writes a staged checkpoint: its files, then the commit record. Until the record lands the checkpoint does
/// not exist for [`committed_steps`] and [`load`].
pub fn write(store: &Store, staged: &Staged) -> Result<(), CheckpointError> {
    write_files(store, staged.step, &staged.files()?, true)
}

/// [`write`] of a checkpoint's files (an upload retried reuses them). The files are checksummed and written
/// concurrently, one thread each (the optimizer file is two thirds of the bytes, so this nearly halves the
/// time); the commit record follows once all of them are in place, as a conditional put, so that a second
/// writer of the same step (a rank 0 of an abandoned round still uploading) cannot replace it.
fn write_files(
    store: &Store,
    step: u64,
    files: &[(&'static str, Vec<Bytes>)],
    exclusive_commit: bool,
) -> Result<(), CheckpointError> {
    let dir = step_dir(step);
    let written: Vec<Result<(String, FileRecord), CheckpointError>> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|(name, parts)| {
                let dir = &dir;
                s.spawn(move || {
                    let record = FileRecord {
                        bytes: parts.iter().map(|p| p.len() as u64).sum(),
                        crc32: crc32_parts(parts),
                    };
                    let key = format!("{dir}/{name}");
                    store
                        .put_parts(&key, parts.clone())
                        .map_err(store_err(store))?;
                    // On disk before the commit record: a crash cannot leave a record of lost data.
                    store.sync(&key).map_err(store_err(store))?;
                    Ok((name.to_string(), record))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(CheckpointError::Upload {
                        step,
                        url: store.url().to_string(),
                        attempts: 0,
                        last: "a writer thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let record = CommitRecord {
        step,
        files: written.into_iter().collect::<Result<_, _>>()?,
    };
    crate::failpoint::pause("checkpoint-before-commit");
    let commit = serde_json::to_vec_pretty(&record).unwrap_or_default();
    let key = format!("{dir}/{COMMIT}");
    let written = if exclusive_commit {
        store.put_if_absent(&key, Bytes::from(commit))
    } else {
        store.put(&key, Bytes::from(commit)).map(|()| true)
    }
    .map_err(store_err(store))?;
    if written {
        return store.sync(&key).map_err(store_err(store));
    }
    // Already committed: by this writer, if an earlier attempt's reply was lost; otherwise by another.
    let existing = store.get(&key).map_err(store_err(store))?;
    match serde_json::from_slice::<CommitRecord>(&existing) {
        Ok(r) if r == record => Ok(()),
        _ => Err(CheckpointError::Invalid {
            url: store.url().to_string(),
            key,
            reason: "already committed by another writer with other contents".into(),
        }),
    }
}

/// Deletes every checkpoint after `step`, commit record first: a round that resumes from `step` abandons
/// them (they belong to the timeline that broke, and were not committed with the coordinator). Returns the
/// deleted steps.
pub fn discard_after(store: &Store, step: u64) -> Result<Vec<u64>, CheckpointError> {
    let all = store.list("").map_err(store_err(store))?;
    let mut later: Vec<u64> = all
        .iter()
        .filter_map(|(k, _)| step_of(k))
        .filter(|&s| s > step)
        .collect();
    later.sort_unstable();
    later.dedup();
    for &s in &later {
        delete_step(store, s, &all)?;
    }
    Ok(later)
}

/// Deletes one step folder among the listed keys, commit record first, so that a half-deleted checkpoint is
/// simply not committed.
fn delete_step(store: &Store, step: u64, all: &[(String, u64)]) -> Result<(), CheckpointError> {
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
    Ok(())
}

/// What [`delete_checkpoints`] deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Steps of the deleted checkpoint folders (committed or not), ascending.
    pub steps: Vec<u64>,
    /// Objects deleted.
    pub objects: usize,
}

/// Deletes every checkpoint folder under `store` (`step-%09d/`, committed or not; commit records first, so
/// that an interrupted deletion leaves nothing committed) and nothing else: the checkpoint URL may be a
/// prefix or a bucket that holds other objects.
pub fn delete_checkpoints(store: &Store) -> Result<Deleted, CheckpointError> {
    let all = store.list("").map_err(store_err(store))?;
    // Only folders named exactly as `step_dir` names them: `step-7/` or `step-notes/` are not ours.
    let ours: Vec<(u64, &str)> = all
        .iter()
        .filter_map(|(key, _)| {
            let step = step_of(key)?;
            key.starts_with(&format!("{}/", step_dir(step)))
                .then_some((step, key.as_str()))
        })
        .collect();
    let commits = ours
        .iter()
        .filter(|(_, k)| k.ends_with(&format!("/{COMMIT}")));
    let others = ours
        .iter()
        .filter(|(_, k)| !k.ends_with(&format!("/{COMMIT}")));
    for (_, key) in commits.chain(others) {
        store.delete(key).map_err(store_err(store))?;
    }
    let mut steps: Vec<u64> = ours.iter().map(|&(s, _)| s).collect();
    steps.sort_unstable();
    steps.dedup();
    Ok(Deleted {
        steps,
        objects: ours.len(),
    })
}

/// The recorded state of the committed checkpoint of `step` (checked against its commit record), without
/// its weights.
pub fn read_state(store: &Store, step: u64) -> Result<CheckpointState, CheckpointError> {
    let record = commit_record(store, step)?;
    parse_state(store, step, &fetch_required(store, step, &record, STATE)?)
}

fn parse_state(store: &Store, step: u64, bytes: &[u8]) -> Result<CheckpointState, CheckpointError> {
    serde_json::from_slice(bytes).map_err(|e| CheckpointError::Invalid {
        url: store.url().to_string(),
        key: format!("{}/{STATE}", step_dir(step)),
        reason: e.to_string(),
    })
}

/// Steps of the committed checkpoints under `store`, ascending.
pub fn committed_steps(store: &Store) -> Result<Vec<u64>, CheckpointError> {
    Ok(committed_in(&store.list("").map_err(store_err(store))?))
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
        delete_step(store, step, &all)?;
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

/// The commit record of `step`, or an error saying the checkpoint is not committed.
fn commit_record(store: &Store, step: u64) -> Result<CommitRecord, CheckpointError> {
    let key = format!("{}/{COMMIT}", step_dir(step));
    let invalid = |reason: String| CheckpointError::Invalid {
        url: store.url().to_string(),
        key: key.clone(),
        reason,
    };
    let commit = store
        .get_opt(&key)
        .map_err(store_err(store))?
        .ok_or_else(|| invalid("not committed (no commit record)".into()))?;
    serde_json::from_slice(&commit).map_err(|e| invalid(e.to_string()))
}

/// Reads file `name` of a committed checkpoint, checked against its commit record; `None` if the record has
/// no such file (`tokenizer.json` is optional).
fn fetch(
    store: &Store,
    step: u64,
    record: &CommitRecord,
    name: &str,
) -> Result<Option<Bytes>, CheckpointError> {
    let key = format!("{}/{name}", step_dir(step));
    let Some(want) = record.files.get(name) else {
        return Ok(None);
    };
    let bytes = store.get(&key).map_err(store_err(store))?;
    if bytes.len() as u64 != want.bytes || crc32(&bytes) != want.crc32 {
        return Err(CheckpointError::Invalid {
            url: store.url().to_string(),
            key,
            reason: format!(
                "{} bytes with CRC-32 {:08x}, the commit record says {} bytes with {:08x}",
                bytes.len(),
                crc32(&bytes),
                want.bytes,
                want.crc32
            ),
        });
    }
    Ok(Some(bytes))
}

fn fetch_required(
    store: &Store,
    step: u64,
    record: &CommitRecord,
    name: &str,
) -> Result<Bytes, CheckpointError> {
    fetch(store, step, record, name)?.ok_or_else(|| CheckpointError::Invalid {
        url: store.url().to_string(),
        key: format!("{}/{COMMIT}", step_dir(step)),
        reason: format!("no record of `{name}`"),
    })
}

fn read_weights(
    store: &Store,
    step: u64,
    record: &CommitRecord,
    name: &str,
    into: &mut dyn FnMut(&str) -> Option<Tensor>,
) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let key = format!("{}/{name}", step_dir(step));
    if let (Some(path), Some(want)) = (store.local_path(&key), record.files.get(name)) {
        // A local file streams straight into the tensors' memory, checksummed on the way: one copy
        // instead of file -> buffer -> tensors.
        let streamed = std::fs::File::open(&path).and_then(|f| Ok((f.metadata()?.len(), f)));
        if let Ok((len, mut file)) = streamed {
            if len == want.bytes {
                let mut crc = crc32fast::Hasher::new();
                let read = read_safetensors_from(
                    &mut file,
                    len,
                    &path,
                    &mut |b: &[u8]| crc.update(b),
                    into,
                );
                if read.is_ok() && crc.finalize() == want.crc32 {
                    return Ok(read?);
                }
            }
        }
        // Anything else (a changed size or checksum, an unreadable layout) is reported by the buffered
        // path below, which names the file and what its commit record says.
    }
    let bytes = fetch_required(store, step, record, name)?;
    let origin = format!("{}/{}/{name}", store.url(), step_dir(step));
    Ok(read_safetensors_bytes(&bytes, Path::new(&origin))?)
}

/// Reads the committed checkpoint of `step`, checking every file against the commit record. The model and
/// optimizer files are fetched and decoded concurrently.
pub fn load(store: &Store, step: u64) -> Result<Loaded, CheckpointError> {
    load_into(store, step, &mut |_| None)
}

/// [`load`], reading each parameter of a local checkpoint straight into the tensor `params(name)` offers
/// (the model's own parameter, on the CPU; see [`read_safetensors_from`]), which the returned model tensors
/// then are.
pub fn load_into(
    store: &Store,
    step: u64,
    params: &mut dyn FnMut(&str) -> Option<Tensor>,
) -> Result<Loaded, CheckpointError> {
    let record = commit_record(store, step)?;
    let state = parse_state(store, step, &fetch_required(store, step, &record, STATE)?)?;
    let (model, optimizer) = std::thread::scope(|s| {
        let optimizer = s.spawn(|| read_weights(store, step, &record, OPTIMIZER, &mut |_| None));
        let model = read_weights(store, step, &record, MODEL, params);
        let optimizer = optimizer.join().unwrap_or_else(|_| {
            Err(CheckpointError::Upload {
                step,
                url: store.url().to_string(),
                attempts: 0,
                last: "the reading thread panicked".into(),
            })
        });
        (model, optimizer)
    });
    Ok(Loaded {
        state,
        model: model?,
        optimizer: optimizer?,
    })
}

/// A committed checkpoint found from a URL: the store of its checkpoint folder and its step.
pub struct Found {
    pub store: Store,
    pub step: u64,
}

/// The committed checkpoint `url` names, if it names one: a step folder (`.../step-000000020`, which must be
/// committed), or a checkpoint folder (its latest committed step). `Ok(None)` for anything else (e.g. a
/// folder of plain weights).
pub fn find(url: &str) -> Result<Option<Found>, CheckpointError> {
    let trimmed = url.trim_end_matches('/');
    let open = |u: &str| {
        Store::open_existing(u).map_err(|source| CheckpointError::Store {
            url: u.to_string(),
            source,
        })
    };
    if let Some((base, last)) = trimmed.rsplit_once('/') {
        if let Some(step) = step_of(last) {
            let store = open(base)?;
            commit_record(&store, step)?;
            return Ok(Some(Found { store, step }));
        }
    }
    let store = open(trimmed)?;
    Ok(committed_steps(&store)?
        .last()
        .map(|&step| Found { store, step }))
}

impl Found {
    /// The checkpoint's parameters (not its optimizer state), checked against the commit record.
    pub fn model(&self) -> Result<Vec<(String, Tensor)>, CheckpointError> {
        let record = commit_record(&self.store, self.step)?;
        read_weights(&self.store, self.step, &record, MODEL, &mut |_| None)
    }

    /// The checkpoint's `tokenizer.json`, if it has one, checked against the commit record.
    pub fn tokenizer(&self) -> Result<Option<Bytes>, CheckpointError> {
        let record = commit_record(&self.store, self.step)?;
        fetch(&self.store, self.step, &record, TOKENIZER)
    }

    /// `<checkpoint folder URL>/step-%09d`.
    pub fn url(&self) -> String {
        step_url(self.store.url(), self.step)
    }
}

/// How an [`Uploader`] writes and keeps checkpoints.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UploadOptions {
    /// Retention: the last `keep_last` checkpoints, and every multiple of `keep_every`.
    pub keep_last: usize,
    pub keep_every: Option<u64>,
    /// Attempts of a whole upload before it fails.
    pub attempts: u32,
    /// Write the commit record with a conditional put (off for S3-compatible stores that refuse
    /// `If-None-Match`; a second writer of the same step then overwrites the first).
    pub exclusive_commit: bool,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            keep_last: 2,
            keep_every: None,
            attempts: 4,
            exclusive_commit: true,
        }
    }
}

/// Writes a checkpoint's files, retrying a failed write up to `attempts` times with exponential backoff.
fn upload(
    store: &Store,
    step: u64,
    files: &[(&'static str, Vec<Bytes>)],
    opts: &UploadOptions,
) -> Result<u64, CheckpointError> {
    let attempts = opts.attempts;
    let mut attempt = 0;
    loop {
        match write_files(store, step, files, opts.exclusive_commit) {
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

/// Uploads staged checkpoints on a background thread, one at a time, retrying failed writes with exponential
/// backoff, then applying the retention rule. Memory stays bounded at one staged copy: a new checkpoint is
/// staged after the previous upload finished, into that upload's memory ([`Uploader::spare`]).
pub struct Uploader {
    tx: Option<SyncSender<Staged>>,
    done: Receiver<(Result<u64, CheckpointError>, Staged)>,
    thread: Option<JoinHandle<()>>,
    in_flight: Option<u64>,
    spare: Option<Staged>,
    preparing: Option<Receiver<Staged>>,
}

impl Uploader {
    pub fn new(store: Store, opts: UploadOptions) -> Self {
        let (tx, rx) = sync_channel::<Staged>(0);
        let (done_tx, done) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("m3d-checkpoint".into())
            .spawn(move || {
                for staged in rx {
                    let result = staged
                        .files()
                        .and_then(|files| upload(&store, staged.step, &files, &opts));
                    if result.is_ok() {
                        if let Err(e) = retain(&store, opts.keep_last, opts.keep_every) {
                            tracing::warn!(error = %e, "checkpoint retention failed");
                        }
                    }
                    // The files' buffers were dropped above, so the staged memory is unshared again.
                    if done_tx.send((result, staged)).is_err() {
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
            spare: None,
            preparing: None,
        }
    }

    /// Starts preparing host memory for the first checkpoint on a background thread: buffers of the sizes
    /// of `model` and `optimizer`'s tensors, every page touched. The first staging copy then runs
    /// at memory speed instead of page-faulting fresh memory while training waits (5 s for full-size
    /// M3D-CLIP's 2.4 GB on the benchmark machine, against 0.3 s into touched memory).
    pub fn prepare(&mut self, model: &[(String, Tensor)], optimizer: &[(String, Tensor)]) {
        if self.spare.is_some() || self.preparing.is_some() {
            return;
        }
        let (model, optimizer) = (byte_sizes(model), byte_sizes(optimizer));
        let (tx, rx) = sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("m3d-checkpoint-prep".into())
            .spawn(move || {
                let _ = tx.send(Staged::prepared(&model, &optimizer));
            });
        if spawned.is_ok() {
            self.preparing = Some(rx);
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

    /// The memory of the last finished upload, or the memory [`Uploader::prepare`] made, for
    /// [`Staged::new_reusing`] (taken: `None` until the next upload finishes).
    pub fn spare(&mut self) -> Option<Staged> {
        if let Some(spare) = self.spare.take() {
            return Some(spare);
        }
        // Waiting for memory being prepared costs no more than faulting it in here.
        self.preparing.take().and_then(|rx| rx.recv().ok())
    }

    fn finished(
        &mut self,
        (result, staged): (Result<u64, CheckpointError>, Staged),
    ) -> Result<Option<u64>, CheckpointError> {
        self.spare = Some(staged);
        result.map(Some)
    }

    /// The finished upload's step, if one finished since the last call (does not block).
    pub fn poll(&mut self) -> Result<Option<u64>, CheckpointError> {
        if self.in_flight.is_none() {
            return Ok(None);
        }
        match self.done.try_recv() {
            Ok(r) => {
                self.in_flight = None;
                self.finished(r)
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
            Ok(r) => self.finished(r),
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
