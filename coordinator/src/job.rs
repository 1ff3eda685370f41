//! The job: its state machine, rendezvous rounds, failure detection, progress and checkpoints.
//!
//! One `Mutex<State>` guards everything; critical sections are short and never await (a heartbeat is a hash
//! lookup), so one coordinator serves thousands of workers. Waiting (a worker in `register` until its round forms,
//! a rank at a checkpoint barrier) is a oneshot channel filled by whoever completes the round or barrier. A
//! background ticker forms rounds whose rendezvous timeout passed, detects members whose heartbeats stopped, and
//! writes progress to the state store at most once per second; transitions and commits are written before the
//! call that caused them answers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use crate::config::JobConfig;
use crate::error::CoordError;
use crate::plan::{PlanKind, PlanSpec, StepPlan};

/// The phases of a job and the only transitions between them (see [`JobPhase::can_become`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    /// No worker has registered yet.
    Pending,
    /// The first round is being formed.
    Rendezvous,
    /// A round trains.
    Running,
    /// Ranks are at a checkpoint barrier, or a checkpoint is being written and not yet committed.
    Checkpointing,
    /// A member failed; a new round (generation + 1) is being formed.
    Restarting,
    Completed,
    Failed,
}

impl JobPhase {
    pub fn name(self) -> &'static str {
        match self {
            JobPhase::Pending => "pending",
            JobPhase::Rendezvous => "rendezvous",
            JobPhase::Running => "running",
            JobPhase::Checkpointing => "checkpointing",
            JobPhase::Restarting => "restarting",
            JobPhase::Completed => "completed",
            JobPhase::Failed => "failed",
        }
    }

    /// The job's transition table.
    pub fn can_become(self, to: JobPhase) -> bool {
        use JobPhase::*;
        matches!(
            (self, to),
            (Pending, Rendezvous)
                | (Rendezvous | Restarting, Running)
                | (Running, Checkpointing)
                | (Checkpointing, Running)
                | (Running | Checkpointing, Restarting)
                | (Running | Checkpointing, Completed)
                | (Running | Checkpointing | Restarting | Rendezvous, Failed)
        )
    }

    pub fn is_final(self) -> bool {
        matches!(self, JobPhase::Completed | JobPhase::Failed)
    }

    fn forming(self) -> bool {
        matches!(
            self,
            JobPhase::Pending | JobPhase::Rendezvous | JobPhase::Restarting
        )
    }
}

impl std::fmt::Display for JobPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a worker says about itself when it registers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub host: String,
    /// Where the worker accepts its peers' collective connections.
    pub collective_addr: String,
    pub gpus: u32,
    /// Candidate NCCL unique id; the one of rank 0 is handed to everyone.
    pub nccl_unique_id: Vec<u8>,
}

/// A member of a round.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Peer {
    pub rank: u32,
    pub worker_id: String,
    pub host: String,
    pub collective_addr: String,
    pub gpus: u32,
}

/// A committed checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointRef {
    pub step: u64,
    pub url: String,
}

/// A worker's place in a formed round.
#[derive(Clone, Debug)]
pub struct Assignment {
    pub rank: u32,
    pub world_size: u32,
    pub generation: u64,
    /// This rank's ring neighbours, rank - 1 and rank + 1 (deduplicated, without itself); the whole list is
    /// [`ControlPlane::peers`] (sending it with every assignment would be O(world size^2) bytes).
    pub peers: Vec<Peer>,
    /// Index among the ranks of this worker's host, and their number (a host's ranks are contiguous).
    pub local_rank: u32,
    pub local_world_size: u32,
    pub nccl_unique_id: Arc<Vec<u8>>,
    /// The first global step this round trains.
    pub resume_step: u64,
    pub resume_checkpoint: Option<CheckpointRef>,
    pub plan: PlanSpec,
    /// The training set's fingerprint the job was planned for ([`JobConfig::data_fingerprint`]).
    pub data_fingerprint: Option<String>,
    pub heartbeat_interval: Duration,
}

/// What a worker should do, in answer to a heartbeat or progress report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerAction {
    Continue,
    /// The round was broken: tear down and register again.
    Reregister,
    /// The job is over.
    Stop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatReply {
    pub action: WorkerAction,
    pub generation: u64,
    pub phase: JobPhase,
}

/// One rank's samples for a range of steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataPlan {
    pub rank: u32,
    pub world_size: u32,
    pub steps: Vec<StepPlan>,
}

/// Items `start..end` of an evaluation's pass, handed to one rank ([`ControlPlane::lease_work`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkLease {
    pub start: u64,
    /// `start` when every item of the round has been handed out.
    pub end: u64,
    /// The number of items in the pass.
    pub items: u64,
}

/// A rank's progress report.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// Global steps completed.
    pub step: u64,
    pub loss: f64,
    pub samples: u64,
}

/// A snapshot of the job.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct JobStatus {
    pub phase: JobPhase,
    pub generation: u64,
    pub world_size: u32,
    pub min_workers: u32,
    pub max_workers: u32,
    pub waiting: u32,
    pub restarts: u32,
    pub max_restarts: u32,
    pub resume_step: u64,
    /// Global steps every rank has completed.
    pub step: u64,
    pub epoch: u64,
    pub step_in_epoch: u64,
    pub total_steps: u64,
    pub last_loss: f64,
    pub last_checkpoint: Option<CheckpointRef>,
    pub failure: Option<String>,
    pub members: Vec<Peer>,
    pub plan: PlanSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_fingerprint: Option<String>,
}

/// The coordinator's operations, independent of any transport (the gRPC adapter is `grpc::CoordinatorService`).
pub trait ControlPlane: Send + Sync + 'static {
    /// Joins the current round; resolves when the round is formed.
    fn register(
        &self,
        worker: WorkerInfo,
    ) -> impl Future<Output = Result<Assignment, CoordError>> + Send;
    fn heartbeat(&self, worker_id: &str, generation: u64) -> Result<HeartbeatReply, CoordError>;
    fn data_plan(
        &self,
        worker_id: &str,
        generation: u64,
        start_step: u64,
        steps: u32,
    ) -> Result<DataPlan, CoordError>;
    /// Members `[start_rank, start_rank + count)` of the round (at most [`MAX_PEERS_PAGE`]), and the world size.
    fn peers(
        &self,
        worker_id: &str,
        generation: u64,
        start_rank: u32,
        count: u32,
    ) -> Result<(u32, Vec<Peer>), CoordError>;
    fn report_progress(
        &self,
        worker_id: &str,
        generation: u64,
        progress: Progress,
    ) -> impl Future<Output = Result<WorkerAction, CoordError>> + Send;
    /// Resolves when every member has reached the barrier for `step`.
    fn checkpoint_barrier(
        &self,
        worker_id: &str,
        generation: u64,
        step: u64,
    ) -> impl Future<Output = Result<u64, CoordError>> + Send;
    fn commit_checkpoint(
        &self,
        worker_id: &str,
        generation: u64,
        checkpoint: CheckpointRef,
    ) -> impl Future<Output = Result<u64, CoordError>> + Send;
    fn status(&self) -> JobStatus;
    /// The current status, updated on every change of the job.
    fn watch(&self) -> watch::Receiver<JobStatus>;
    /// An evaluation job's next `max_items` items at most (a work queue over the round's one pass, in order):
    /// ranks that finish sooner take more. Every round hands out the whole pass again (a broken round's results
    /// are redone by the next one).
    fn lease_work(
        &self,
        worker_id: &str,
        generation: u64,
        max_items: u32,
    ) -> Result<WorkLease, CoordError>;
}

/// The persisted job document (`job.json` under the state URL).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct JobRecord {
    format: u32,
    plan: PlanSpec,
    phase: JobPhase,
    generation: u64,
    restarts: u32,
    resume_step: u64,
    /// Global steps every rank has completed; `epoch` and `step_in_epoch` are the same position, spelled out for
    /// people reading the document (derived from `step` on load).
    step: u64,
    #[serde(default)]
    epoch: u64,
    #[serde(default)]
    step_in_epoch: u64,
    last_loss: f64,
    last_checkpoint: Option<CheckpointRef>,
    failure: Option<String>,
    members: Vec<Peer>,
    nccl_unique_id: Vec<u8>,
    /// The training set's fingerprint the job was planned for (absent in documents written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data_fingerprint: Option<String>,
}

const RECORD_FORMAT: u32 = 1;
const RECORD_KEY: &str = "job.json";

/// Whether the state location `state_url` holds a job document, i.e. whether a coordinator opened there
/// continues a job rather than starting one. A location that does not exist holds none.
pub fn has_saved_job(state_url: &str) -> Result<bool, CoordError> {
    let state_err = |reason: String| CoordError::State {
        url: state_url.to_string(),
        reason,
    };
    let store = match m3d_store::Store::open_existing(state_url) {
        Ok(s) => s,
        Err(m3d_store::StoreError::MissingFolder { .. }) => return Ok(false),
        Err(e) => return Err(state_err(e.to_string())),
    };
    store
        .get_opt(RECORD_KEY)
        .map(|b| b.is_some())
        .map_err(|e| state_err(e.to_string()))
}
/// Steps in one data-plan answer, so one request cannot make the coordinator build a huge message.
pub const MAX_PLAN_STEPS: u32 = 1024;
/// Peers in one `peers` answer.
pub const MAX_PEERS_PAGE: u32 = 4096;

/// Rank `rank`'s ring neighbours among `peers`.
fn neighbours(peers: &[Peer], rank: usize) -> Vec<Peer> {
    let w = peers.len();
    let mut out: Vec<Peer> = Vec::with_capacity(2);
    for r in [(rank + w - 1) % w, (rank + 1) % w] {
        if r != rank && out.iter().all(|p| p.rank as usize != r) {
            out.push(peers[r].clone());
        }
    }
    out
}

struct Waiter {
    info: WorkerInfo,
    reply: oneshot::Sender<Result<Assignment, CoordError>>,
}

struct MemberState {
    last_seen: Instant,
    step: u64,
}

struct Barrier {
    step: u64,
    arrived: HashSet<u32>,
    waiters: Vec<oneshot::Sender<Result<u64, CoordError>>>,
}

struct State {
    phase: JobPhase,
    generation: u64,
    restarts: u32,
    waiting: BTreeMap<String, Waiter>,
    round_opened: Option<Instant>,
    peers: Arc<Vec<Peer>>,
    nccl_unique_id: Arc<Vec<u8>>,
    index: HashMap<String, u32>,
    members: Vec<MemberState>,
    resume_step: u64,
    last_loss: f64,
    last_checkpoint: Option<CheckpointRef>,
    barrier: Option<Barrier>,
    failure: Option<String>,
    /// Bumped on every change; the persister writes when it is ahead of what was written.
    version: u64,
    progress_dirty: bool,
    /// An evaluation round's work queue: items `0..leased` of the pass have been handed out. Not persisted: a
    /// new round, and a round that a restarted coordinator continues, hand the pass out again from its start
    /// (the ranks skip what they find finished: `m3d_eval::bench::run_rank`).
    leased: u64,
    /// Members of the round a failure ended who have not been told yet (any call of theirs answers "the job
    /// has ended" and strikes them off). A coordinator that exits once the job is over serves until this is
    /// empty, so that a rank still working hears the failure rather than a coordinator gone away.
    unheard: BTreeSet<String>,
}

impl State {
    fn transition(&mut self, to: JobPhase) {
        // Every call site is guarded by the phase it comes from; a bad transition is a bug in this file.
        debug_assert!(
            self.phase.can_become(to),
            "transition {} -> {}",
            self.phase,
            to
        );
        tracing::info!(from = %self.phase, to = %to, generation = self.generation, "job transition");
        self.phase = to;
        self.version += 1;
    }

    /// The round's position: the furthest step reported. Ranks step together (every step ends in a
    /// collective), and during a round only rank 0 reports progress, in the background; every rank reports
    /// once more at its end, and the job completes when all of them have reported the last step.
    fn position(&self) -> u64 {
        self.members
            .iter()
            .map(|m| m.step)
            .max()
            .unwrap_or(self.resume_step)
    }

    fn member(&mut self, worker_id: &str, generation: u64) -> Result<u32, CoordError> {
        if self.phase.is_final() {
            self.unheard.remove(worker_id);
            return Err(CoordError::JobEnded {
                state: self.phase.name(),
                reason: self.failure.clone().unwrap_or_default(),
            });
        }
        if generation != self.generation {
            return Err(CoordError::StaleGeneration {
                worker: worker_id.to_string(),
                got: generation,
                current: self.generation,
            });
        }
        let rank = self
            .index
            .get(worker_id)
            .copied()
            .ok_or_else(|| CoordError::UnknownWorker {
                worker: worker_id.to_string(),
                generation,
            })?;
        if let Some(m) = self.members.get_mut(rank as usize) {
            m.last_seen = Instant::now();
        }
        Ok(rank)
    }
}

struct Inner {
    cfg: JobConfig,
    state: Mutex<State>,
    status_tx: watch::Sender<JobStatus>,
    store: Option<m3d_store::Store>,
    /// Serialises writes of the job document; holds the version last written.
    written: tokio::sync::Mutex<u64>,
    /// Set when the process is stopping ([`Coordinator::drain`]): members that go quiet are leaving with
    /// it, not failing, so no restart round is formed.
    draining: std::sync::atomic::AtomicBool,
}

/// The coordinator of one job. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

impl Coordinator {
    /// Opens the job at `state_url` (continuing from its `job.json` if there is one) and starts the ticker.
    /// `None`: state in memory only (tests, benchmarks).
    pub async fn open(cfg: JobConfig, state_url: Option<&str>) -> Result<Coordinator, CoordError> {
        cfg.validate()?;
        let store = match state_url {
            Some(url) => Some(m3d_store::Store::open(url).map_err(|e| CoordError::State {
                url: url.to_string(),
                reason: e.to_string(),
            })?),
            None => None,
        };
        let mut state = State {
            phase: JobPhase::Pending,
            generation: 0,
            restarts: 0,
            waiting: BTreeMap::new(),
            round_opened: None,
            peers: Arc::new(Vec::new()),
            nccl_unique_id: Arc::new(Vec::new()),
            index: HashMap::new(),
            members: Vec::new(),
            resume_step: cfg.initial_checkpoint.as_ref().map_or(0, |c| c.step),
            last_loss: 0.0,
            last_checkpoint: cfg.initial_checkpoint.clone(),
            barrier: None,
            failure: None,
            version: 0,
            progress_dirty: false,
            leased: 0,
            unheard: BTreeSet::new(),
        };
        if let Some(store) = &store {
            let state_err = |reason: String| CoordError::State {
                url: store.url().to_string(),
                reason,
            };
            if let Some(bytes) = store
                .get_opt_async(RECORD_KEY)
                .await
                .map_err(|e| state_err(e.to_string()))?
            {
                let rec: JobRecord = serde_json::from_slice(&bytes)
                    .map_err(|e| state_err(format!("{RECORD_KEY} is not a job document: {e}")))?;
                if rec.format != RECORD_FORMAT {
                    return Err(state_err(format!(
                        "{RECORD_KEY} has format {}, expected {RECORD_FORMAT}",
                        rec.format
                    )));
                }
                if rec.plan != cfg.plan {
                    return Err(state_err(format!(
                        "{RECORD_KEY} was written for data plan {:?}, not {:?}: use a new state URL for a new job",
                        rec.plan, cfg.plan
                    )));
                }
                if let (Some(was), Some(now)) = (&rec.data_fingerprint, &cfg.data_fingerprint) {
                    if was != now {
                        return Err(state_err(format!(
                            "{RECORD_KEY} was written for the training set with fingerprint {was}, not {now}: \
                             use a new state URL for a new job"
                        )));
                    }
                }
                adopt(&mut state, rec);
                tracing::info!(phase = %state.phase, generation = state.generation, step = state.position(),
                    "continuing the job from its saved state");
            }
        }
        let status = snapshot(&cfg, &state);
        let (status_tx, _) = watch::channel(status);
        let coord = Coordinator {
            inner: Arc::new(Inner {
                cfg,
                state: Mutex::new(state),
                status_tx,
                store,
                written: tokio::sync::Mutex::new(0),
                draining: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        coord.persist(true).await?;
        tokio::spawn(ticker(Arc::downgrade(&coord.inner)));
        Ok(coord)
    }

    /// Whether no member of the current round has sent a heartbeat for `quiet` (true without a round): after
    /// SIGTERM the coordinator keeps serving until then, so that workers stopping on their own SIGTERM can
    /// commit the checkpoint they save on the way out.
    pub fn members_quiet(&self, quiet: Duration) -> bool {
        let st = self.lock();
        let now = Instant::now();
        st.members
            .iter()
            .all(|m| now.saturating_duration_since(m.last_seen) >= quiet)
    }

    /// The members of the round a failure ended that have not called since (sorted): they are still to hear
    /// that the job is over. Empty while the job runs and once it completed.
    pub fn unheard(&self) -> Vec<String> {
        self.lock().unheard.iter().cloned().collect()
    }

    /// The process is stopping: from now on members that go quiet are leaving with it (their round is
    /// continued or restarted by whichever coordinator runs next), so none is declared failed.
    pub fn drain(&self) {
        self.inner
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Writes the job state now (before the process exits).
    pub async fn flush(&self) -> Result<(), CoordError> {
        self.persist(true).await
    }

    /// Takes `checkpoint` as the last committed one if it is newer than the state's: a checkpoint complete in
    /// the store whose commit call never reached a coordinator (it was stopped while the workers saved theirs
    /// on SIGTERM). The next round resumes from it. Returns whether it was taken.
    pub async fn adopt_checkpoint(&self, checkpoint: CheckpointRef) -> Result<bool, CoordError> {
        {
            let mut st = self.lock();
            if checkpoint.step > self.inner.cfg.plan.total_steps()
                || st
                    .last_checkpoint
                    .as_ref()
                    .is_some_and(|c| c.step >= checkpoint.step)
            {
                return Ok(false);
            }
            tracing::info!(step = checkpoint.step, url = %checkpoint.url, "adopted a committed checkpoint found in the store");
            st.last_checkpoint = Some(checkpoint);
            st.version += 1;
            self.publish(&st);
        }
        self.persist(true).await?;
        Ok(true)
    }

    pub fn config(&self) -> &JobConfig {
        &self.inner.cfg
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug here; keep serving with the state as it is.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, state: &State) {
        self.inner
            .status_tx
            .send_replace(snapshot(&self.inner.cfg, state));
    }

    /// Writes the job document if a transition happened since the last write (or always, with `force`: progress
    /// changes the document without a transition).
    async fn persist(&self, force: bool) -> Result<(), CoordError> {
        let Some(store) = &self.inner.store else {
            return Ok(());
        };
        let mut written = self.inner.written.lock().await;
        let (version, record) = {
            let mut st = self.lock();
            st.progress_dirty = false;
            (st.version, record_of(&self.inner.cfg, &st))
        };
        if !force && version <= *written && *written != 0 {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(&record).map_err(|e| CoordError::State {
            url: store.url().to_string(),
            reason: e.to_string(),
        })?;
        store
            .put_async(RECORD_KEY, Bytes::from(bytes))
            .await
            .map_err(|e| CoordError::State {
                url: store.url().to_string(),
                reason: e.to_string(),
            })?;
        *written = version.max(1);
        Ok(())
    }

    /// Forms the round if it is complete (max workers) or its rendezvous timeout passed (min workers); returns
    /// the replies to send once the new round is persisted.
    fn try_form(
        &self,
        st: &mut State,
        now: Instant,
    ) -> Vec<(Waiter, Result<Assignment, CoordError>)> {
        let cfg = &self.inner.cfg;
        if !st.phase.forming() || st.waiting.is_empty() {
            return Vec::new();
        }
        let timed_out = st
            .round_opened
            .is_some_and(|t| now.duration_since(t) >= cfg.rendezvous_timeout);
        let ready = |n: usize| {
            n >= cfg.max_workers as usize || (timed_out && n >= cfg.min_workers as usize)
        };
        if !ready(st.waiting.len()) {
            return Vec::new();
        }
        // A worker that gave up waiting (its call was cancelled) must not become a member that never beats. Pruned
        // only here, when the round could form, so that a registration costs O(log n), not O(n).
        st.waiting.retain(|_, w| !w.reply.is_closed());
        let n = st.waiting.len();
        if !ready(n) {
            return Vec::new();
        }
        let Some(world) = cfg.world_size_for(n) else {
            return Vec::new();
        };
        // Deterministic ranks: ordered by (host, worker id), so the ranks of one host are contiguous and the same
        // set of workers always gets the same ranks, whatever the order they arrived in.
        let mut waiters: Vec<Waiter> = std::mem::take(&mut st.waiting).into_values().collect();
        waiters.sort_by(|a, b| {
            (&a.info.host, &a.info.worker_id).cmp(&(&b.info.host, &b.info.worker_id))
        });
        let extra = waiters.split_off(world as usize);
        let peers: Arc<Vec<Peer>> = Arc::new(
            waiters
                .iter()
                .enumerate()
                .map(|(r, w)| Peer {
                    rank: r as u32,
                    worker_id: w.info.worker_id.clone(),
                    host: w.info.host.clone(),
                    collective_addr: w.info.collective_addr.clone(),
                    gpus: w.info.gpus,
                })
                .collect(),
        );
        let uid = Arc::new(
            waiters
                .first()
                .map(|w| w.info.nccl_unique_id.clone())
                .unwrap_or_default(),
        );
        st.resume_step = st.last_checkpoint.as_ref().map_or(0, |c| c.step);
        st.index = peers
            .iter()
            .map(|p| (p.worker_id.clone(), p.rank))
            .collect();
        st.members = (0..world)
            .map(|_| MemberState {
                last_seen: now,
                step: st.resume_step,
            })
            .collect();
        st.peers = peers.clone();
        st.nccl_unique_id = uid.clone();
        st.round_opened = None;
        st.barrier = None;
        st.leased = 0;
        st.transition(JobPhase::Running);
        tracing::info!(
            generation = st.generation,
            world_size = world,
            resume_step = st.resume_step,
            "round formed"
        );
        let mut out = Vec::with_capacity(waiters.len() + extra.len());
        let mut host_start = 0usize;
        for (rank, w) in waiters.into_iter().enumerate() {
            if peers[host_start].host != peers[rank].host {
                host_start = rank;
            }
            let host_len = peers[host_start..]
                .iter()
                .take_while(|p| p.host == peers[rank].host)
                .count();
            let a = Assignment {
                rank: rank as u32,
                world_size: world,
                generation: st.generation,
                peers: neighbours(&peers, rank),
                local_rank: (rank - host_start) as u32,
                local_world_size: host_len as u32,
                nccl_unique_id: uid.clone(),
                resume_step: st.resume_step,
                resume_checkpoint: st.last_checkpoint.clone(),
                plan: cfg.plan,
                data_fingerprint: cfg.data_fingerprint.clone(),
                heartbeat_interval: cfg.heartbeat_interval(),
            };
            out.push((w, Ok(a)));
        }
        for w in extra {
            let reason = format!(
                "round {} formed with {world} workers without it",
                st.generation
            );
            out.push((
                w,
                Err(CoordError::NotAccepting {
                    state: "running",
                    reason,
                }),
            ));
        }
        out
    }

    /// A member failed (`culprit`, when one is to blame: it will not be heard from again): a restart round
    /// within the budget, else the job fails. Wakes barrier waiters.
    fn fail_round(&self, st: &mut State, reason: String, culprit: &str) {
        if let Some(b) = st.barrier.take() {
            for w in b.waiters {
                let _ = w.send(Err(CoordError::RoundAborted {
                    generation: st.generation,
                    reason: reason.clone(),
                }));
            }
        }
        let told: BTreeSet<String> = st
            .peers
            .iter()
            .map(|p| p.worker_id.clone())
            .filter(|w| w != culprit)
            .collect();
        st.index.clear();
        st.members.clear();
        st.peers = Arc::new(Vec::new());
        if st.restarts < self.inner.cfg.max_restarts {
            st.restarts += 1;
            st.generation += 1;
            st.round_opened = None;
            tracing::warn!(%reason, generation = st.generation, restarts = st.restarts, "round broken: restarting");
            st.failure = Some(reason);
            st.transition(JobPhase::Restarting);
        } else {
            tracing::error!(%reason, restarts = st.restarts, "round broken and the restart budget is spent: job failed");
            st.failure = Some(format!(
                "{reason} (restart budget of {} spent)",
                self.inner.cfg.max_restarts
            ));
            st.transition(JobPhase::Failed);
            st.unheard = told;
            for (_, w) in std::mem::take(&mut st.waiting) {
                let _ = w.reply.send(Err(CoordError::JobEnded {
                    state: "failed",
                    reason: st.failure.clone().unwrap_or_default(),
                }));
            }
        }
    }

    /// One pass of the ticker: rendezvous timeouts, heartbeat timeouts, periodic progress writes. `stalled`:
    /// this process did not run for a good part of the heartbeat timeout (see [`ticker`]).
    async fn tick(&self, progress_due: bool, stalled: bool) -> bool {
        let now = Instant::now();
        let (replies, changed, dirty) = {
            let mut st = self.lock();
            let before = st.version;
            if stalled {
                // The members' heartbeats of that time wait unread in this process's sockets: their silence
                // is the coordinator's own, so each gets a whole timeout from now to be heard again.
                tracing::warn!("the coordinator did not run for a while (paused?): members' heartbeat timeouts restart now");
                for m in st.members.iter_mut() {
                    m.last_seen = now;
                }
            }
            let draining = self
                .inner
                .draining
                .load(std::sync::atomic::Ordering::SeqCst);
            if !draining && matches!(st.phase, JobPhase::Running | JobPhase::Checkpointing) {
                let timeout = self.inner.cfg.heartbeat_timeout;
                let dead = st
                    .members
                    .iter()
                    .position(|m| now.duration_since(m.last_seen) > timeout);
                if let Some(rank) = dead {
                    let who = st
                        .peers
                        .get(rank)
                        .map(|p| p.worker_id.clone())
                        .unwrap_or_default();
                    let reason = format!(
                        "worker `{who}` (rank {rank}) sent no heartbeat for {:?} in round {}",
                        timeout, st.generation
                    );
                    self.fail_round(&mut st, reason, &who);
                }
            }
            let replies = self.try_form(&mut st, now);
            let changed = st.version != before;
            let dirty = st.progress_dirty && progress_due;
            if changed || dirty {
                self.publish(&st);
            }
            (replies, changed, dirty)
        };
        if changed || dirty {
            if let Err(e) = self.persist(dirty).await {
                tracing::error!(error = %e, "cannot write the job state");
            }
        }
        send_replies(replies);
        dirty
    }

    fn check_ended(st: &State) -> Result<(), CoordError> {
        if st.phase.is_final() {
            return Err(CoordError::JobEnded {
                state: st.phase.name(),
                reason: st.failure.clone().unwrap_or_default(),
            });
        }
        Ok(())
    }
}

fn send_replies(replies: Vec<(Waiter, Result<Assignment, CoordError>)>) {
    for (w, r) in replies {
        // The worker may have given up meanwhile; its rank then fails by heartbeat timeout.
        let _ = w.reply.send(r);
    }
}

async fn ticker(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => (i.cfg.heartbeat_timeout / 10)
            .clamp(Duration::from_millis(10), Duration::from_millis(100)),
        None => return,
    };
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_progress_write = Instant::now();
    let mut last_tick = Instant::now();
    loop {
        interval.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        // A gap of half the heartbeat timeout between ticks of a ~100 ms period: the process was stopped
        // (SIGSTOP, a paused VM or container) or starved, and could not read the heartbeats sent meanwhile.
        // Measured from the end of the previous tick, so a slow state write does not count.
        let stalled = last_tick.elapsed() > inner.cfg.heartbeat_timeout / 2;
        let coord = Coordinator { inner };
        // Progress is written at most once a second; transitions at once.
        let progress_due = last_progress_write.elapsed() >= Duration::from_secs(1);
        if coord.tick(progress_due, stalled).await {
            last_progress_write = Instant::now();
        }
        last_tick = Instant::now();
    }
}

fn adopt(st: &mut State, rec: JobRecord) {
    st.phase = rec.phase;
    st.generation = rec.generation;
    st.restarts = rec.restarts;
    st.resume_step = rec.resume_step;
    st.last_loss = rec.last_loss;
    st.last_checkpoint = rec.last_checkpoint;
    st.failure = rec.failure;
    st.nccl_unique_id = Arc::new(rec.nccl_unique_id);
    match rec.phase {
        // The round that was training goes on: its members keep their ranks and generation, and must heartbeat
        // within the timeout counted from now. A barrier in flight is lost with the old process: the ranks retry.
        JobPhase::Running | JobPhase::Checkpointing => {
            st.phase = JobPhase::Running;
            let now = Instant::now();
            st.index = rec
                .members
                .iter()
                .map(|p| (p.worker_id.clone(), p.rank))
                .collect();
            st.members = rec
                .members
                .iter()
                .map(|_| MemberState {
                    last_seen: now,
                    step: rec.step,
                })
                .collect();
            st.peers = Arc::new(rec.members);
        }
        // A round being formed starts again: its waiters lost their connection with the old process.
        _ => {}
    }
    st.version = 1;
}

fn record_of(cfg: &JobConfig, st: &State) -> JobRecord {
    let (epoch, step_in_epoch) = cfg.plan.position(st.position());
    JobRecord {
        epoch,
        step_in_epoch,
        format: RECORD_FORMAT,
        plan: cfg.plan,
        phase: st.phase,
        generation: st.generation,
        restarts: st.restarts,
        resume_step: st.resume_step,
        step: st.position(),
        last_loss: st.last_loss,
        last_checkpoint: st.last_checkpoint.clone(),
        failure: st.failure.clone(),
        members: st.peers.as_ref().clone(),
        nccl_unique_id: st.nccl_unique_id.as_ref().clone(),
        data_fingerprint: cfg.data_fingerprint.clone(),
    }
}

fn snapshot(cfg: &JobConfig, st: &State) -> JobStatus {
    let step = st.position();
    let (epoch, step_in_epoch) = cfg.plan.position(step);
    JobStatus {
        phase: st.phase,
        generation: st.generation,
        world_size: st.peers.len() as u32,
        min_workers: cfg.min_workers,
        max_workers: cfg.max_workers,
        waiting: st.waiting.len() as u32,
        restarts: st.restarts,
        max_restarts: cfg.max_restarts,
        resume_step: st.resume_step,
        step,
        epoch,
        step_in_epoch,
        total_steps: cfg.plan.total_steps(),
        last_loss: st.last_loss,
        last_checkpoint: st.last_checkpoint.clone(),
        failure: st.failure.clone(),
        members: st.peers.as_ref().clone(),
        plan: cfg.plan,
        data_fingerprint: cfg.data_fingerprint.clone(),
    }
}

fn check_worker_id(id: &str) -> Result<(), CoordError> {
    if id.is_empty() || id.len() > 256 {
        return Err(CoordError::InvalidArgument(
            "worker_id must have 1 to 256 bytes".into(),
        ));
    }
    Ok(())
}

impl ControlPlane for Coordinator {
    async fn register(&self, worker: WorkerInfo) -> Result<Assignment, CoordError> {
        check_worker_id(&worker.worker_id)?;
        let (tx, rx) = oneshot::channel();
        let replies = {
            let mut st = self.lock();
            Self::check_ended(&st)?;
            let now = Instant::now();
            if !st.phase.forming() {
                if st.index.contains_key(&worker.worker_id) {
                    // A member registering again has restarted: its old incarnation is gone, so is the round. It
                    // joins the restart round rather than waiting for the heartbeat timeout to notice.
                    let reason = format!(
                        "worker `{}` registered again during round {}",
                        worker.worker_id, st.generation
                    );
                    // Its answer says the job ended, if it did: it has heard.
                    self.fail_round(&mut st, reason, &worker.worker_id);
                    Self::check_ended(&st)?;
                } else {
                    return Err(CoordError::NotAccepting {
                        state: st.phase.name(),
                        reason: format!(
                            "round {} is training with {} workers",
                            st.generation,
                            st.peers.len()
                        ),
                    });
                }
            }
            if st.phase == JobPhase::Pending {
                st.transition(JobPhase::Rendezvous);
            }
            if st.round_opened.is_none() {
                st.round_opened = Some(now);
            }
            tracing::debug!(worker = %worker.worker_id, host = %worker.host, generation = st.generation, "registered");
            if let Some(old) = st.waiting.insert(
                worker.worker_id.clone(),
                Waiter {
                    info: worker,
                    reply: tx,
                },
            ) {
                let _ = old.reply.send(Err(CoordError::NotAccepting {
                    state: st.phase.name(),
                    reason: format!("worker `{}` registered again", old.info.worker_id),
                }));
            }
            let replies = self.try_form(&mut st, now);
            self.publish(&st);
            replies
        };
        if !replies.is_empty() {
            // The round is formed in memory either way; failing the workers' calls would only make them register
            // again and break it. A coordinator restarted before a later write succeeds re-forms the round.
            if let Err(e) = self.persist(false).await {
                tracing::error!(error = %e, "cannot write the job state after forming a round");
            }
        }
        send_replies(replies);
        rx.await.map_err(|_| CoordError::ShuttingDown)?
    }

    fn heartbeat(&self, worker_id: &str, generation: u64) -> Result<HeartbeatReply, CoordError> {
        let mut st = self.lock();
        let action = match st.member(worker_id, generation) {
            Ok(_) => WorkerAction::Continue,
            Err(CoordError::JobEnded { .. }) => WorkerAction::Stop,
            Err(CoordError::StaleGeneration { .. } | CoordError::UnknownWorker { .. }) => {
                WorkerAction::Reregister
            }
            Err(e) => return Err(e),
        };
        Ok(HeartbeatReply {
            action,
            generation: st.generation,
            phase: st.phase,
        })
    }

    fn data_plan(
        &self,
        worker_id: &str,
        generation: u64,
        start_step: u64,
        steps: u32,
    ) -> Result<DataPlan, CoordError> {
        let (rank, world) = {
            let mut st = self.lock();
            let rank = st.member(worker_id, generation)?;
            (rank, st.peers.len() as u32)
        };
        if steps > MAX_PLAN_STEPS {
            return Err(CoordError::InvalidArgument(format!(
                "at most {MAX_PLAN_STEPS} steps per data plan request, not {steps}"
            )));
        }
        // Computed outside the lock: the plan is a pure function of the spec, rank and world size.
        let steps = self
            .inner
            .cfg
            .plan
            .rank_plan(start_step, u64::from(steps), rank, world)?;
        Ok(DataPlan {
            rank,
            world_size: world,
            steps,
        })
    }

    fn lease_work(
        &self,
        worker_id: &str,
        generation: u64,
        max_items: u32,
    ) -> Result<WorkLease, CoordError> {
        let plan = &self.inner.cfg.plan;
        if plan.kind != PlanKind::Eval {
            return Err(CoordError::InvalidArgument(format!(
                "work is leased only by an evaluation job, and this is a {} job (its ranks follow the data plan)",
                plan.kind
            )));
        }
        if max_items == 0 {
            return Err(CoordError::InvalidArgument(
                "a work lease of 0 items".to_string(),
            ));
        }
        let mut st = self.lock();
        st.member(worker_id, generation)?;
        let start = st.leased;
        let end = start.saturating_add(u64::from(max_items)).min(plan.samples);
        st.leased = end;
        Ok(WorkLease {
            start,
            end,
            items: plan.samples,
        })
    }

    fn peers(
        &self,
        worker_id: &str,
        generation: u64,
        start_rank: u32,
        count: u32,
    ) -> Result<(u32, Vec<Peer>), CoordError> {
        if count > MAX_PEERS_PAGE {
            return Err(CoordError::InvalidArgument(format!(
                "at most {MAX_PEERS_PAGE} peers per request, not {count}"
            )));
        }
        let peers = {
            let mut st = self.lock();
            st.member(worker_id, generation)?;
            st.peers.clone()
        };
        let start = (start_rank as usize).min(peers.len());
        let end = start.saturating_add(count as usize).min(peers.len());
        Ok((peers.len() as u32, peers[start..end].to_vec()))
    }

    async fn report_progress(
        &self,
        worker_id: &str,
        generation: u64,
        progress: Progress,
    ) -> Result<WorkerAction, CoordError> {
        let completed = {
            let mut st = self.lock();
            let rank = match st.member(worker_id, generation) {
                Ok(r) => r,
                Err(CoordError::JobEnded { .. }) => return Ok(WorkerAction::Stop),
                Err(CoordError::StaleGeneration { .. }) => return Ok(WorkerAction::Reregister),
                Err(e) => return Err(e),
            };
            let total = self.inner.cfg.plan.total_steps();
            if progress.step > total {
                return Err(CoordError::InvalidArgument(format!(
                    "worker `{worker_id}` reports step {} of a {total}-step job",
                    progress.step
                )));
            }
            if let Some(m) = st.members.get_mut(rank as usize) {
                m.step = m.step.max(progress.step);
            }
            if rank == 0 {
                st.last_loss = progress.loss;
            }
            st.progress_dirty = true;
            let done = progress.step == total && st.members.iter().all(|m| m.step >= total);
            if done && st.phase.can_become(JobPhase::Completed) {
                st.transition(JobPhase::Completed);
                self.publish(&st);
                true
            } else {
                false
            }
        };
        if completed {
            self.persist(true).await?;
            return Ok(WorkerAction::Stop);
        }
        Ok(WorkerAction::Continue)
    }

    async fn checkpoint_barrier(
        &self,
        worker_id: &str,
        generation: u64,
        step: u64,
    ) -> Result<u64, CoordError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.lock();
            let rank = st.member(worker_id, generation)?;
            let world = st.members.len();
            match &st.barrier {
                Some(b) if b.step != step => {
                    return Err(CoordError::InvalidArgument(format!(
                    "worker `{worker_id}` is at a barrier for step {step}, its peers for step {}",
                    b.step
                )))
                }
                Some(_) => {}
                None => {
                    st.barrier = Some(Barrier {
                        step,
                        arrived: HashSet::new(),
                        waiters: Vec::new(),
                    });
                    if st.phase == JobPhase::Running {
                        st.transition(JobPhase::Checkpointing);
                        self.publish(&st);
                    }
                }
            }
            let b = st.barrier.as_mut().ok_or(CoordError::ShuttingDown)?;
            b.arrived.insert(rank);
            b.waiters.push(tx);
            if b.arrived.len() == world {
                if let Some(b) = st.barrier.take() {
                    for w in b.waiters {
                        let _ = w.send(Ok(step));
                    }
                }
            }
        }
        rx.await.map_err(|_| CoordError::ShuttingDown)?
    }

    async fn commit_checkpoint(
        &self,
        worker_id: &str,
        generation: u64,
        checkpoint: CheckpointRef,
    ) -> Result<u64, CoordError> {
        {
            let mut st = self.lock();
            st.member(worker_id, generation)?;
            let err = |reason: String| CoordError::Checkpoint {
                worker: worker_id.to_string(),
                step: checkpoint.step,
                reason,
            };
            if checkpoint.url.is_empty() {
                return Err(err("empty checkpoint URL".into()));
            }
            if checkpoint.step > self.inner.cfg.plan.total_steps() {
                return Err(err(format!(
                    "the job has {} steps",
                    self.inner.cfg.plan.total_steps()
                )));
            }
            match &st.last_checkpoint {
                Some(last) if last == &checkpoint => return Ok(checkpoint.step),
                Some(last) if last.step >= checkpoint.step => {
                    return Err(err(format!("step {} is already committed", last.step)))
                }
                _ => {}
            }
            tracing::info!(step = checkpoint.step, url = %checkpoint.url, "checkpoint committed");
            st.last_checkpoint = Some(checkpoint.clone());
            st.version += 1;
            if st.phase == JobPhase::Checkpointing && st.barrier.is_none() {
                st.transition(JobPhase::Running);
            }
            self.publish(&st);
        }
        // The commit is durable before it is acknowledged.
        self.persist(false).await?;
        Ok(checkpoint.step)
    }

    fn status(&self) -> JobStatus {
        snapshot(&self.inner.cfg, &self.lock())
    }

    fn watch(&self) -> watch::Receiver<JobStatus> {
        self.inner.status_tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::JobPhase::*;

    #[test]
    fn transition_table() {
        assert!(Pending.can_become(Rendezvous));
        assert!(Rendezvous.can_become(Running));
        assert!(Running.can_become(Restarting));
        assert!(Restarting.can_become(Running));
        assert!(Checkpointing.can_become(Running));
        assert!(!Pending.can_become(Running));
        assert!(!Completed.can_become(Running));
        assert!(!Failed.can_become(Restarting));
        assert!(!Restarting.can_become(Completed));
    }
}
