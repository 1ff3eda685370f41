//! The worker role of a job ([`run_worker`], `m3d worker`): register with the coordinator, check that its plan
//! is this worker's own ([`check_plan`]), form the ring with the two ring neighbours the `Register` answer
//! names (or NCCL's communicator from rank 0's id, which it also carries — nobody pages the member list, so a
//! worker's control-plane bytes do not grow with the world size), heartbeat in the background, train the round
//! ([`crate::train::run_round`]: the samples of each step are computed locally from the plan) with the
//! coordinator as its [`Control`], and on a broken round register again for the restart round — until the
//! job is over.
//!
//! What needs the coordinator during a round: heartbeats and rank 0's progress reports, both in the background
//! (a paused or restarting coordinator never delays a step); checkpoint commits (rank 0, when an upload has
//! finished: that step waits for the answer); every rank's final report (the end of the round waits for it).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use m3d_collectives::{
    nccl_available, nccl_library, AbortSignal, Collective, CollectiveError, Nccl, NcclId,
    RingListener,
};
use m3d_coordinator::job::{Assignment, CheckpointRef, Progress, WorkerAction, WorkerInfo};
use m3d_coordinator::plan::PlanSpec;
use m3d_coordinator::{
    spawn_heartbeats, spawn_progress, Client, ClientError, Code, Heartbeats, PlanError,
    ProgressReporter, Token, PROGRESS_EVERY,
};
use m3d_recipes::{DeviceKind, Recipe};
use m3d_runs::output::RunDir;

use crate::job::resolve_tokenizer;
use crate::train::{run_round, Control, RoundEnd, RoundInfo, TrainError};
use m3d_data::dataset::TrainData;

/// Errors that end a worker process.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("forming the ring of round {generation}: {source}")]
    Ring {
        generation: u64,
        #[source]
        source: m3d_collectives::CollectiveError,
    },
    #[error("peer `{worker}` gave an unusable collective address `{addr}`")]
    PeerAddr { worker: String, addr: String },
    #[error("the recipe's data plan: {0}")]
    Plan(#[from] PlanError),
    #[error(transparent)]
    RecipePlan(#[from] m3d_coordinator::RecipePlanError),
    #[error("identifying the training set: {0}")]
    Fingerprint(#[from] crate::checkpoint::CheckpointError),
    /// The coordinator planned another job than this worker's recipe and data describe.
    #[error("refusing the job of the coordinator at {url}: {}; start the coordinator and every worker from the same recipe, overrides and shards", .mismatches.join("; "))]
    PlanMismatch {
        url: String,
        mismatches: Vec<String>,
    },
    #[error("the coordinator at {url} named no ring neighbour for rank {rank} of {world}")]
    NoNeighbour { url: String, rank: u32, world: u32 },
}

/// Every field in which the coordinator's plan (`theirs`, with the training set's fingerprint it was given)
/// differs from this worker's (`ours`), as "the coordinator plans F = X, this worker's recipe says Y", named
/// as in the recipe. `our_fingerprint` is asked only when the coordinator sent one (it reads the datasets'
/// manifests).
pub fn check_plan(
    theirs: &PlanSpec,
    their_fingerprint: Option<&str>,
    ours: &PlanSpec,
    our_fingerprint: impl FnOnce() -> Result<String, crate::checkpoint::CheckpointError>,
) -> Result<Vec<String>, crate::checkpoint::CheckpointError> {
    let mut out = Vec::new();
    let mut cmp = |field: &str, c: String, w: String| {
        if c != w {
            out.push(format!(
                "the coordinator plans {field} = {c}, this worker's recipe says {w}"
            ));
        }
    };
    let steps = |m: Option<u64>| m.map_or("none".to_string(), |m| m.to_string());
    cmp("the job", theirs.kind.to_string(), ours.kind.to_string());
    cmp(
        "the training set's samples",
        theirs.samples.to_string(),
        ours.samples.to_string(),
    );
    cmp(
        "train.global_batch",
        theirs.global_batch.to_string(),
        ours.global_batch.to_string(),
    );
    cmp("train.seed", theirs.seed.to_string(), ours.seed.to_string());
    cmp(
        "train.epochs",
        theirs.epochs.to_string(),
        ours.epochs.to_string(),
    );
    cmp(
        "train.max_steps",
        steps(theirs.max_steps),
        steps(ours.max_steps),
    );
    cmp(
        "data.shuffle",
        theirs.shuffle.to_string(),
        ours.shuffle.to_string(),
    );
    if let Some(theirs) = their_fingerprint {
        cmp(
            "the training set's fingerprint",
            theirs.to_string(),
            our_fingerprint()?,
        );
    }
    Ok(out)
}

/// The collective addresses `RingListener::join` takes, one slot per rank: it dials only the successor (and
/// names the predecessor in errors), which are exactly the ring neighbours of the `Register` answer. The other
/// slots hold an unspecified address that is never dialled: the member list is not fetched.
fn ring_addrs(a: &Assignment, url: &str) -> Result<Vec<SocketAddr>, RoleError> {
    let world = a.world_size as usize;
    let unused = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
    let mut addrs = vec![unused; world];
    for p in &a.peers {
        let addr = p
            .collective_addr
            .parse::<SocketAddr>()
            .map_err(|_| RoleError::PeerAddr {
                worker: p.worker_id.clone(),
                addr: p.collective_addr.clone(),
            })?;
        if let Some(slot) = addrs.get_mut(p.rank as usize) {
            *slot = addr;
        }
    }
    if world > 1 {
        let rank = a.rank as usize;
        for r in [(rank + 1) % world, (rank + world - 1) % world] {
            if !a.peers.iter().any(|p| p.rank as usize == r) {
                return Err(RoleError::NoNeighbour {
                    url: url.to_string(),
                    rank: a.rank,
                    world: a.world_size,
                });
            }
        }
    }
    Ok(addrs)
}

/// How a worker joins its job.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub coordinator: String,
    pub token: Option<Token>,
    /// Stable across restarts of this worker (a pod name, `w0`).
    pub worker_id: String,
    /// Host name used for rank ordering (ranks of a host are contiguous).
    pub host: String,
    /// Address the ring listens on (port 0: any); peers must be able to reach it.
    pub bind: IpAddr,
    /// Timeout of the ring's rendezvous and of every collective operation.
    pub collective_timeout: Duration,
    /// The run folder (`output.run`): local, or in a store.
    pub run: RunDir,
    /// libtorch intra-op threads (default: this host's cores divided among its ranks).
    pub threads: Option<usize>,
    /// Called once the training set and the tokenizer are open, before the worker connects: opening decodes
    /// every sample shard through transient buffers, and the binary, which owns the allocator, hands that
    /// memory back to the system here (`m3d` asks mimalloc to purge what it freed).
    pub after_open: Option<fn()>,
    /// Set (by the binary's SIGTERM handler) to stop: at the next step boundary every rank stops, rank 0
    /// saves and commits a checkpoint, and this worker returns [`WorkerExit::Terminated`]; before a round
    /// has formed it returns at once.
    pub stop: Arc<AtomicBool>,
}

/// How the worker ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerExit {
    /// Every step trained.
    Finished,
    /// The coordinator said the job is over before this worker finished (it failed, or completed without it).
    Stopped,
    /// Asked to stop ([`WorkerOptions::stop`]): `step` is the last step done and, when the recipe checkpoints,
    /// committed (`None`: stopped before training).
    Terminated { step: Option<u64> },
}

struct Coordinated<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: Client,
    worker_id: String,
    generation: u64,
    heartbeats: Heartbeats,
    /// Rank 0's background progress reports (`None` on the other ranks, which report only the last step).
    progress: Option<ProgressReporter>,
}

fn control_err(e: ClientError) -> TrainError {
    TrainError::Control(e.to_string())
}

/// How long a worker keeps retrying a coordinator that does not answer (restarting, or its pod being moved)
/// before giving up.
const COORDINATOR_PATIENCE: Duration = Duration::from_secs(60);

/// Runs `call` until it succeeds, fails for a reason other than an unreachable coordinator
/// ([`ClientError::is_transient`]), or [`COORDINATOR_PATIENCE`] has passed: every call a worker makes goes
/// through here, so a coordinator that restarts (or whose pod moves, or that starts after its workers) costs
/// a wait, not the job.
pub fn patiently<T, F, Fut>(
    rt: &tokio::runtime::Runtime,
    worker_id: &str,
    what: &str,
    mut call: F,
) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let deadline = std::time::Instant::now() + COORDINATOR_PATIENCE;
    let mut delay = Duration::from_millis(100);
    loop {
        match rt.block_on(call()) {
            Err(e) if e.is_transient() && std::time::Instant::now() < deadline => {
                tracing::warn!(worker = %worker_id, %what, error = %e, "coordinator unreachable; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            done => return done,
        }
    }
}

impl Coordinated<'_> {
    /// [`patiently`] with this round's client; a coordinator that no longer knows the round ends it.
    fn retrying<T, F, Fut>(&mut self, what: &str, mut call: F) -> Result<T, TrainError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let client = &self.client;
        patiently(self.rt, &self.worker_id, what, || call(client.clone())).map_err(|e| {
            if e.round_over() {
                TrainError::RoundOver(e.to_string())
            } else {
                control_err(e)
            }
        })
    }
}

impl Control for Coordinated<'_> {
    fn progress(&mut self, step: u64, loss: f64, samples: u64) {
        if let Some(p) = &self.progress {
            p.update(Progress {
                step,
                loss,
                samples,
            });
        }
    }

    fn report(&mut self, step: u64, loss: f64, samples: u64) -> Result<WorkerAction, TrainError> {
        let (id, generation) = (self.worker_id.clone(), self.generation);
        self.retrying("progress report", |mut c| {
            let id = id.clone();
            async move {
                c.report_progress(
                    &id,
                    generation,
                    Progress {
                        step,
                        loss,
                        samples,
                    },
                )
                .await
            }
        })
    }

    fn action(&self) -> WorkerAction {
        *self.heartbeats.actions.borrow()
    }

    fn commit(&mut self, step: u64, url: &str) -> Result<(), TrainError> {
        let (id, generation) = (self.worker_id.clone(), self.generation);
        let checkpoint = CheckpointRef {
            step,
            url: url.to_string(),
        };
        self.retrying("checkpoint commit", |mut c| {
            let (id, checkpoint) = (id.clone(), checkpoint.clone());
            async move { c.commit_checkpoint(&id, generation, &checkpoint).await }
        })?;
        Ok(())
    }
}

/// This worker's candidate NCCL unique id, offered with every registration.
///
/// An id is not free: `ncclGetUniqueId` starts a bootstrap thread and a listening socket in this process that
/// serve the one communicator created from it and otherwise never end. So the id is made once and offered again
/// with every registration attempt (the once-a-second "not admitted yet" retries included) until a round forms
/// with it — this worker became rank 0 and the coordinator handed its id to every rank (see `nccl_unique_id` in
/// `coordinator.proto`). That round's communicator owns the id, so the next registration (a restart round) offers
/// a fresh one. Rounds formed with another worker's id leave ours unused and offered again.
struct CandidateId<F> {
    make: F,
    current: Option<NcclId>,
}

impl<F: FnMut() -> Result<NcclId, CollectiveError>> CandidateId<F> {
    fn new(make: F) -> Self {
        CandidateId {
            make,
            current: None,
        }
    }

    /// The id to offer now (made on first use, or after the previous one was spent).
    fn offer(&mut self) -> Result<&NcclId, CollectiveError> {
        if self.current.is_none() {
            self.current = Some((self.make)()?);
        }
        Ok(self.current.as_ref().expect("made above"))
    }

    /// A round formed with `round_id` (rank 0's): if it is ours, it is spent.
    fn round_formed(&mut self, round_id: &[u8]) {
        if self
            .current
            .as_ref()
            .is_some_and(|id| id.as_bytes() == round_id)
        {
            self.current = None;
        }
    }
}

/// Raises `signal` as soon as the heartbeats say the round is over for this worker (a peer died, the
/// coordinator formed a restart round): a NCCL collective waiting for a dead peer is aborted at once instead of
/// at its timeout — as the ring's sockets fail at once when a peer process dies. Ends with the heartbeats.
fn abort_when_round_ends(
    rt: &tokio::runtime::Runtime,
    heartbeats: &Heartbeats,
    generation: u64,
    signal: AbortSignal,
) -> tokio::task::JoinHandle<()> {
    let mut actions = heartbeats.actions.clone();
    rt.spawn(async move {
        loop {
            let action = *actions.borrow_and_update();
            if action != WorkerAction::Continue {
                signal.abort(format!(
                    "the coordinator ended round {generation} for this worker ({action:?})"
                ));
                return;
            }
            if actions.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Stops a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves once `stop` is set (checked every 100 ms).
async fn stopped(stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The error a call ends with when the worker is asked to stop while waiting for it.
fn stop_error(url: &str) -> ClientError {
    ClientError::Rpc {
        url: url.to_string(),
        code: Code::Cancelled,
        message: "this worker was asked to stop".into(),
    }
}

/// Runs the worker until the job is over.
pub fn run_worker(recipe: &Recipe, opts: &WorkerOptions) -> Result<WorkerExit, RoleError> {
    if let Some(t) = opts.threads {
        tch::set_num_threads(t.max(1) as i32);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|source| RoleError::Io {
            what: "starting the runtime".into(),
            source,
        })?;
    let data = TrainData::open(recipe).map_err(TrainError::from)?;
    // The tokenizer's file (a vocabulary built here, or one copied from a checkpoint) is copied into every
    // checkpoint and `final/`: the folder lives as long as the worker, and is removed when it returns.
    let scratch = tempfile::Builder::new()
        .prefix("m3d-worker-")
        .tempdir()
        .map_err(|source| RoleError::Io {
            what: "creating a scratch folder for the tokenizer".into(),
            source,
        })?;
    let tokenizer = resolve_tokenizer(recipe, &data, scratch.path()).map_err(TrainError::from)?;
    if let Some(after_open) = opts.after_open {
        after_open();
    }
    let run = opts.run.clone();
    let mut client = patiently(&rt, &opts.worker_id, "connecting", || {
        Client::connect(&opts.coordinator, opts.token.clone())
    })?;
    // On GPUs the collectives are NCCL's: every worker offers a unique id, rank 0's is handed to all.
    let cuda = recipe.workers.device == DeviceKind::Cuda;
    let ring_err =
        |generation: u64| move |source: CollectiveError| RoleError::Ring { generation, source };
    if cuda {
        nccl_available().map_err(ring_err(0))?;
        let lib = nccl_library().map_err(ring_err(0))?;
        tracing::info!(worker = %opts.worker_id, nccl = %lib.path, version = %lib.version, "NCCL loaded");
    }
    let mut candidate_id = CandidateId::new(NcclId::new);
    // What the coordinator must plan: this recipe over the training set this worker opened.
    let own_plan = m3d_coordinator::plan_spec(recipe, data.len())?;
    let mut own_fingerprint: Option<String> = None;
    loop {
        if opts.stop.load(Ordering::SeqCst) {
            return Ok(WorkerExit::Terminated { step: None });
        }
        let listener =
            RingListener::bind(SocketAddr::new(opts.bind, 0)).map_err(|source| RoleError::Io {
                what: format!("binding the collective listener on {}", opts.bind),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| RoleError::Io {
            what: "reading the collective listener's address".into(),
            source,
        })?;
        let nccl_unique_id = if cuda {
            candidate_id
                .offer()
                .map_err(ring_err(0))?
                .as_bytes()
                .to_vec()
        } else {
            Vec::new()
        };
        let info = WorkerInfo {
            worker_id: opts.worker_id.clone(),
            host: opts.host.clone(),
            collective_addr: addr.to_string(),
            gpus: u32::from(cuda),
            nccl_unique_id,
        };
        // Registration waits for the round to form (a long poll): a stop request ends the wait at once.
        let a = match patiently(&rt, &opts.worker_id, "registration", || {
            let (mut c, info, stop) = (client.clone(), &info, &opts.stop);
            async move {
                tokio::select! {
                    r = c.register(info) => r,
                    () = stopped(stop) => Err(stop_error(&opts.coordinator)),
                }
            }
        }) {
            Ok(a) => a,
            Err(_) if opts.stop.load(Ordering::SeqCst) => {
                return Ok(WorkerExit::Terminated { step: None })
            }
            Err(e) if matches!(e.code(), Some(Code::FailedPrecondition | Code::Aborted)) => {
                // Either the job is over, or a round is training without this worker (it joins the next).
                let status = patiently(&rt, &opts.worker_id, "job status", || {
                    let mut c = client.clone();
                    async move { c.status().await }
                })?;
                if status.phase.is_final() {
                    return Ok(WorkerExit::Stopped);
                }
                tracing::info!(worker = %opts.worker_id, reason = %e, "not admitted yet; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        tracing::info!(worker = %opts.worker_id, rank = a.rank, world = a.world_size, generation = a.generation, resume = a.resume_step, "joined round");
        candidate_id.round_formed(&a.nccl_unique_id);
        // One plan: the coordinator's must be the one this worker's recipe and data give, or the ranks would
        // train on different samples than the plan says (or on different data altogether).
        let mismatches = check_plan(&a.plan, a.data_fingerprint.as_deref(), &own_plan, || {
            if let Some(f) = &own_fingerprint {
                return Ok(f.clone());
            }
            let f = crate::checkpoint::RunIdentity::of(recipe)?.data;
            own_fingerprint = Some(f.clone());
            Ok(f)
        })?;
        if !mismatches.is_empty() {
            return Err(RoleError::PlanMismatch {
                url: opts.coordinator.clone(),
                mismatches,
            });
        }
        let addrs = ring_addrs(&a, &opts.coordinator)?;
        let (heartbeats, progress) = {
            let _guard = rt.enter();
            let heartbeats = spawn_heartbeats(
                client.clone(),
                opts.worker_id.clone(),
                a.generation,
                a.heartbeat_interval,
            );
            // Only rank 0 reports during the round (the ranks step together); see PROGRESS_EVERY.
            let progress = (a.rank == 0).then(|| {
                spawn_progress(
                    client.clone(),
                    opts.worker_id.clone(),
                    a.generation,
                    PROGRESS_EVERY,
                )
            });
            (heartbeats, progress)
        };
        // NCCL waits (setup, every collective) end at the collective timeout, or as soon as the heartbeats say
        // the round is over; the task ends with the heartbeats, and is stopped when the round ends.
        let signal = AbortSignal::new();
        let _round_watch = cuda.then(|| {
            AbortOnDrop(abort_when_round_ends(
                &rt,
                &heartbeats,
                a.generation,
                signal.clone(),
            ))
        });
        let joined: Result<Box<dyn Collective>, _> = if cuda {
            NcclId::from_bytes(&a.nccl_unique_id).and_then(|id| {
                Nccl::new(
                    a.rank as usize,
                    a.world_size as usize,
                    &id,
                    a.local_rank as usize,
                    opts.collective_timeout,
                    &signal,
                )
                .map(|c| Box::new(c) as Box<dyn Collective>)
            })
        } else {
            listener
                .join(
                    a.rank as usize,
                    a.world_size as usize,
                    &addrs,
                    opts.collective_timeout,
                )
                .map(|c| Box::new(c) as Box<dyn Collective>)
        };
        let mut comm = match joined {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(worker = %opts.worker_id, generation = a.generation, error = %e, "ring not formed; registering again");
                continue;
            }
        };
        // Each rank of this host gets its share of the cores for libtorch's intra-op threads (as torchrun's
        // OMP_NUM_THREADS); more would oversubscribe the CPUs the ranks share.
        if opts.threads.is_none() {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            tch::set_num_threads((cores / a.local_world_size.max(1) as usize).max(1) as i32);
        }
        let round = RoundInfo::of(&a);
        let mut control = Coordinated {
            rt: &rt,
            client: client.clone(),
            worker_id: opts.worker_id.clone(),
            generation: a.generation,
            heartbeats,
            progress,
        };
        match run_round(
            recipe,
            &data,
            &tokenizer,
            &run,
            &round,
            comm.as_mut(),
            &mut control,
            &opts.stop,
        )? {
            RoundEnd::Finished => return Ok(WorkerExit::Finished),
            RoundEnd::Terminated { step } => {
                return Ok(WorkerExit::Terminated { step: Some(step) })
            }
            RoundEnd::Stop => return Ok(WorkerExit::Stopped),
            RoundEnd::Reregister(reason) => {
                tracing::warn!(worker = %opts.worker_id, generation = a.generation, %reason, "round broken; registering again");
                // The round is over: a NCCL communicator is aborted, not finalized (peers may be gone).
                signal.abort(reason);
                drop(comm);
                client = control.client;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider that counts its calls and makes distinct ids.
    fn counting() -> (
        std::rc::Rc<std::cell::Cell<u8>>,
        impl FnMut() -> Result<NcclId, CollectiveError>,
    ) {
        let calls = std::rc::Rc::new(std::cell::Cell::new(0u8));
        let c = calls.clone();
        (calls, move || {
            c.set(c.get() + 1);
            NcclId::from_bytes(&[c.get(); 128])
        })
    }

    #[test]
    fn an_nccl_id_is_made_once_and_offered_until_a_round_uses_it() {
        let (calls, make) = counting();
        let mut ids = CandidateId::new(make);
        // Registration attempts that are not admitted (a round trains without us) offer the same id.
        let first = ids.offer().unwrap().clone();
        for _ in 0..5 {
            assert_eq!(ids.offer().unwrap(), &first);
        }
        assert_eq!(calls.get(), 1);
        // A round formed with another worker's id (we are not rank 0): ours stays unused and is offered again.
        ids.round_formed(&[9u8; 128]);
        ids.round_formed(&[]);
        assert_eq!(ids.offer().unwrap(), &first);
        assert_eq!(calls.get(), 1);
        // A round formed with ours: spent; the restart round gets a fresh one, made once.
        ids.round_formed(first.as_bytes());
        let second = ids.offer().unwrap().clone();
        assert_ne!(second, first);
        assert_eq!(ids.offer().unwrap(), &second);
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn a_failing_provider_is_retried_at_the_next_offer() {
        let mut n = 0;
        let mut ids = CandidateId::new(|| {
            n += 1;
            if n == 1 {
                Err(CollectiveError::NcclUnavailable("test".into()))
            } else {
                NcclId::from_bytes(&[1u8; 128])
            }
        });
        assert!(ids.offer().is_err());
        assert!(ids.offer().is_ok());
        assert!(ids.offer().is_ok());
        assert_eq!(n, 2);
    }
}
