//! The worker role of a job ([`run_worker`], `m3d worker`): register with the coordinator, form the ring with
//! the round's peers, heartbeat in the background, train the round ([`crate::train::run_round`]) with the
//! coordinator as its [`Control`], and on a broken round register again for the restart round — until the
//! job is over.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use m3d_collectives::{nccl_available, Collective, Nccl, NcclId, RingListener};
use m3d_coordinator::job::{CheckpointRef, Progress, WorkerAction, WorkerInfo};
use m3d_coordinator::plan::StepPlan;
use m3d_coordinator::{spawn_heartbeats, Client, ClientError, Code, Heartbeats, Token};
use m3d_recipes::{DeviceKind, Recipe};

use crate::dataset::TrainData;
use crate::job::resolve_tokenizer;
use crate::train::{run_round, Control, RoundEnd, RoundInfo, RunDir, TrainError};

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
    /// The run folder (`output.run`).
    pub run: PathBuf,
    /// libtorch intra-op threads (default: this host's cores divided among its ranks).
    pub threads: Option<usize>,
}

/// How the worker ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerExit {
    /// Every step trained.
    Finished,
    /// The coordinator said the job is over before this worker finished (it failed, or completed without it).
    Stopped,
}

struct Coordinated<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: Client,
    worker_id: String,
    generation: u64,
    heartbeats: Heartbeats,
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
fn patiently<T, F, Fut>(
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
            if matches!(e.code(), Some(Code::Aborted | Code::NotFound)) {
                TrainError::RoundOver(e.to_string())
            } else {
                control_err(e)
            }
        })
    }
}

impl Control for Coordinated<'_> {
    fn plan(&mut self, start: u64, steps: u32) -> Result<Vec<StepPlan>, TrainError> {
        let (id, generation) = (self.worker_id.clone(), self.generation);
        let p = self.retrying("data plan", |mut c| {
            let id = id.clone();
            async move { c.data_plan(&id, generation, start, steps).await }
        })?;
        Ok(p.steps)
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
    let scratch = std::env::temp_dir().join(format!(
        "m3d-worker-{}-{}",
        opts.worker_id,
        std::process::id()
    ));
    let tokenizer = resolve_tokenizer(recipe, &data, &scratch).map_err(TrainError::from)?;
    let run = RunDir(opts.run.clone());
    let mut client = patiently(&rt, &opts.worker_id, "connecting", || {
        Client::connect(&opts.coordinator, opts.token.clone())
    })?;
    loop {
        let listener =
            RingListener::bind(SocketAddr::new(opts.bind, 0)).map_err(|source| RoleError::Io {
                what: format!("binding the collective listener on {}", opts.bind),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| RoleError::Io {
            what: "reading the collective listener's address".into(),
            source,
        })?;
        // On GPUs the collectives are NCCL's: every worker offers a unique id, rank 0's is handed to all.
        let cuda = recipe.workers.device == DeviceKind::Cuda;
        let nccl_id = if cuda {
            nccl_available().map_err(|source| RoleError::Ring {
                generation: 0,
                source,
            })?;
            Some(NcclId::new().map_err(|source| RoleError::Ring {
                generation: 0,
                source,
            })?)
        } else {
            None
        };
        let info = WorkerInfo {
            worker_id: opts.worker_id.clone(),
            host: opts.host.clone(),
            collective_addr: addr.to_string(),
            gpus: u32::from(cuda),
            nccl_unique_id: nccl_id.map(|id| id.as_bytes().to_vec()).unwrap_or_default(),
        };
        let a = match patiently(&rt, &opts.worker_id, "registration", || {
            let (mut c, info) = (client.clone(), &info);
            async move { c.register(info).await }
        }) {
            Ok(a) => a,
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
        let peers = patiently(&rt, &opts.worker_id, "peer list", || {
            let (mut c, id) = (client.clone(), &opts.worker_id);
            async move { c.all_peers(id, a.generation).await }
        })?;
        let addrs = peers
            .iter()
            .map(|p| {
                p.collective_addr
                    .parse::<SocketAddr>()
                    .map_err(|_| RoleError::PeerAddr {
                        worker: p.worker_id.clone(),
                        addr: p.collective_addr.clone(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let heartbeats = {
            let _guard = rt.enter();
            spawn_heartbeats(
                client.clone(),
                opts.worker_id.clone(),
                a.generation,
                a.heartbeat_interval,
            )
        };
        let joined: Result<Box<dyn Collective>, _> = if cuda {
            NcclId::from_bytes(&a.nccl_unique_id).and_then(|id| {
                Nccl::new(
                    a.rank as usize,
                    a.world_size as usize,
                    &id,
                    a.local_rank as usize,
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
        let round = RoundInfo {
            rank: a.rank,
            world_size: a.world_size,
            local_rank: a.local_rank,
            generation: a.generation,
            resume_step: a.resume_step,
            resume_checkpoint: a.resume_checkpoint.as_ref().map(|c| c.url.clone()),
            plan: a.plan,
        };
        let mut control = Coordinated {
            rt: &rt,
            client: client.clone(),
            worker_id: opts.worker_id.clone(),
            generation: a.generation,
            heartbeats,
        };
        match run_round(
            recipe,
            &data,
            &tokenizer,
            &run,
            &round,
            comm.as_mut(),
            &mut control,
        )? {
            RoundEnd::Finished => return Ok(WorkerExit::Finished),
            RoundEnd::Stop => return Ok(WorkerExit::Stopped),
            RoundEnd::Reregister(reason) => {
                tracing::warn!(worker = %opts.worker_id, generation = a.generation, %reason, "round broken; registering again");
                drop(comm);
                client = control.client;
            }
        }
    }
}
