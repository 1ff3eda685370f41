//! The workers' side of the wire: a client that speaks `m3d.v2` and hands out the domain types.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use m3d_proto::v2 as pb;
use m3d_proto::v2::coordinator_service_client::CoordinatorServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::grpc::{
    action_from_pb, data_plan_from_pb, fingerprint_from_pb, peer_from_pb, phase_from_pb,
    plan_from_pb, status_from_pb, Token,
};
use crate::job::{
    Assignment, CheckpointRef, DataPlan, HeartbeatReply, JobStatus, Peer, Progress, WorkLease,
    WorkerAction, WorkerInfo,
};

/// Errors of the client, naming the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the coordinator at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("coordinator {url}: {code:?}: {message}")]
    Rpc {
        url: String,
        code: tonic::Code,
        message: String,
    },
    /// The connection broke during a call (the coordinator died or restarted mid-answer): no answer came.
    #[error("lost the connection to the coordinator at {url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("coordinator {url} answered an invalid message: {reason}")]
    Invalid { url: String, reason: String },
    #[error("the token for {url} cannot be sent: {reason}")]
    Token { url: String, reason: String },
}

impl ClientError {
    /// The gRPC code of a refused call (`None` for connection or decoding errors).
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the coordinator may answer the same call later: it is down, restarting (its pod moved), or
    /// shedding load — as opposed to having answered and refused it.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Transport { .. } => true,
            ClientError::Rpc { code, .. } => {
                matches!(
                    code,
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                )
            }
            ClientError::Invalid { .. } | ClientError::Token { .. } => false,
        }
    }

    /// Whether the coordinator refused the call because the caller's round is over (a stale generation, or a
    /// worker the current round does not know): the caller registers again.
    pub fn round_over(&self) -> bool {
        matches!(
            self.code(),
            Some(tonic::Code::Aborted | tonic::Code::NotFound)
        )
    }

    /// `s` as this client's error: a status the coordinator sent, or one tonic made up locally for a
    /// connection that broke (those carry the transport error as their source; a received status has none).
    fn from_status(url: &str, s: Status) -> ClientError {
        use std::error::Error as _;
        match s.source() {
            Some(source) => ClientError::Transport {
                url: url.to_string(),
                reason: error_chain(source),
            },
            None => ClientError::Rpc {
                url: url.to_string(),
                code: s.code(),
                message: s.message().to_string(),
            },
        }
    }
}

/// `e` and its sources, joined with ": " (tonic's transport errors say little on their own).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Deadline of a heartbeat or progress report: a coordinator that is stopped (SIGSTOP, a paused VM) or
/// unreachable without a reset costs the background task one timed-out call, retried at its next beat, never
/// a call that hangs for as long as the pause.
pub const BACKGROUND_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// `msg` as a request with the deadline of background calls.
fn background<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(BACKGROUND_CALL_TIMEOUT);
    r
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Auth(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A connection to the coordinator. Cheap to clone: clones multiplex on the same HTTP/2 connection.
#[derive(Clone)]
pub struct Client {
    url: Arc<str>,
    rpc: CoordinatorServiceClient<InterceptedService<Channel, Auth>>,
}

impl Client {
    /// Connects to `url` (e.g. `http://127.0.0.1:7070`).
    pub async fn connect(url: &str, token: Option<Token>) -> Result<Client, ClientError> {
        let err = |reason: String| ClientError::Connect {
            url: url.to_string(),
            reason,
        };
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| err(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30));
        let channel = endpoint.connect().await.map_err(|e| err(error_chain(&e)))?;
        Client::from_channel(url, channel, token)
    }

    /// A client over an existing channel (several clients can share one).
    pub fn from_channel(
        url: &str,
        channel: Channel,
        token: Option<Token>,
    ) -> Result<Client, ClientError> {
        let auth = match token {
            Some(t) => Some(t.header_value().map_err(|reason| ClientError::Token {
                url: url.to_string(),
                reason,
            })?),
            None => None,
        };
        Ok(Client {
            url: Arc::from(url),
            rpc: CoordinatorServiceClient::with_interceptor(channel, Auth(auth))
                .max_decoding_message_size(64 << 20),
        })
    }

    fn rpc_err(&self, s: Status) -> ClientError {
        ClientError::from_status(&self.url, s)
    }

    fn invalid(&self, reason: impl Into<String>) -> ClientError {
        ClientError::Invalid {
            url: self.url.to_string(),
            reason: reason.into(),
        }
    }

    /// Joins the job; returns when the round is formed.
    pub async fn register(&mut self, w: &WorkerInfo) -> Result<Assignment, ClientError> {
        let req = pb::RegisterRequest {
            worker_id: w.worker_id.clone(),
            host: w.host.clone(),
            collective_addr: w.collective_addr.clone(),
            capabilities: Some(pb::Capabilities { gpus: w.gpus }),
            nccl_unique_id: w.nccl_unique_id.clone(),
        };
        let r = self
            .rpc
            .register(req)
            .await
            .map_err(|s| self.rpc_err(s))?
            .into_inner();
        let plan = r
            .plan
            .as_ref()
            .map(plan_from_pb)
            .ok_or_else(|| self.invalid("missing field `plan`"))?;
        Ok(Assignment {
            rank: r.rank,
            world_size: r.world_size,
            generation: r.generation,
            peers: r.peers.into_iter().map(peer_from_pb).collect(),
            local_rank: r.local_rank,
            local_world_size: r.local_world_size,
            nccl_unique_id: Arc::new(r.nccl_unique_id),
            resume_step: r.resume_step,
            resume_checkpoint: (!r.resume_checkpoint_url.is_empty()).then_some(CheckpointRef {
                step: r.resume_step,
                url: r.resume_checkpoint_url,
            }),
            data_fingerprint: fingerprint_from_pb(r.plan.as_ref()),
            plan,
            heartbeat_interval: Duration::from_millis(r.heartbeat_interval_ms),
        })
    }

    pub async fn heartbeat(
        &mut self,
        worker_id: &str,
        generation: u64,
    ) -> Result<HeartbeatReply, ClientError> {
        let r = self
            .rpc
            .send_heartbeat(background(pb::SendHeartbeatRequest {
                worker_id: worker_id.to_string(),
                generation,
            }))
            .await
            .map_err(|s| self.rpc_err(s))?
            .into_inner();
        Ok(HeartbeatReply {
            action: action_from_pb(r.action)
                .ok_or_else(|| self.invalid(format!("unknown action {}", r.action)))?,
            generation: r.generation,
            phase: phase_from_pb(r.state)
                .ok_or_else(|| self.invalid(format!("unknown job state {}", r.state)))?,
        })
    }

    pub async fn data_plan(
        &mut self,
        worker_id: &str,
        generation: u64,
        start_step: u64,
        steps: u32,
    ) -> Result<DataPlan, ClientError> {
        let r = self
            .rpc
            .get_data_plan(pb::GetDataPlanRequest {
                worker_id: worker_id.to_string(),
                generation,
                start_step,
                steps,
            })
            .await
            .map_err(|s| self.rpc_err(s))?
            .into_inner();
        Ok(data_plan_from_pb(r))
    }

    /// The next items of an evaluation's pass for this rank, at most `max_items` (`start == end`: none left).
    pub async fn lease_work(
        &mut self,
        worker_id: &str,
        generation: u64,
        max_items: u32,
    ) -> Result<WorkLease, ClientError> {
        let r = self
            .rpc
            .lease_work(pb::LeaseWorkRequest {
                worker_id: worker_id.to_string(),
                generation,
                max_items,
            })
            .await
            .map_err(|s| self.rpc_err(s))?
            .into_inner();
        if r.start > r.end || r.end > r.items {
            return Err(self.invalid(format!(
                "a work lease of items {}..{} of {}",
                r.start, r.end, r.items
            )));
        }
        Ok(WorkLease {
            start: r.start,
            end: r.end,
            items: r.items,
        })
    }

    /// The whole member list of the round, ordered by rank (paged through `GetPeers`): O(world size) bytes,
    /// for tools. A worker needs none of it (its `Register` answer has its ring neighbours and rank 0's NCCL id).
    pub async fn all_peers(
        &mut self,
        worker_id: &str,
        generation: u64,
    ) -> Result<Vec<Peer>, ClientError> {
        let mut out: Vec<Peer> = Vec::new();
        loop {
            let r = self
                .rpc
                .get_peers(pb::GetPeersRequest {
                    worker_id: worker_id.to_string(),
                    generation,
                    start_rank: out.len() as u32,
                    count: crate::job::MAX_PEERS_PAGE,
                })
                .await
                .map_err(|s| self.rpc_err(s))?
                .into_inner();
            let got = r.peers.len();
            out.extend(r.peers.into_iter().map(peer_from_pb));
            if out.len() >= r.world_size as usize {
                return Ok(out);
            }
            if got == 0 {
                return Err(self.invalid(format!(
                    "GetPeers stopped at {} of {} ranks",
                    out.len(),
                    r.world_size
                )));
            }
        }
    }

    pub async fn report_progress(
        &mut self,
        worker_id: &str,
        generation: u64,
        p: Progress,
    ) -> Result<WorkerAction, ClientError> {
        let r = self
            .rpc
            .report_progress(background(pb::ReportProgressRequest {
                worker_id: worker_id.to_string(),
                generation,
                step: p.step,
                loss: p.loss,
                samples: p.samples,
            }))
            .await
            .map_err(|s| self.rpc_err(s))?
            .into_inner();
        action_from_pb(r.action).ok_or_else(|| self.invalid(format!("unknown action {}", r.action)))
    }

    pub async fn checkpoint_barrier(
        &mut self,
        worker_id: &str,
        generation: u64,
        step: u64,
    ) -> Result<u64, ClientError> {
        let r = self
            .rpc
            .wait_checkpoint_barrier(pb::WaitCheckpointBarrierRequest {
                worker_id: worker_id.to_string(),
                generation,
                step,
            })
            .await
            .map_err(|s| self.rpc_err(s))?;
        Ok(r.into_inner().step)
    }

    pub async fn commit_checkpoint(
        &mut self,
        worker_id: &str,
        generation: u64,
        checkpoint: &CheckpointRef,
    ) -> Result<u64, ClientError> {
        let r = self
            .rpc
            .commit_checkpoint(pb::CommitCheckpointRequest {
                worker_id: worker_id.to_string(),
                generation,
                step: checkpoint.step,
                url: checkpoint.url.clone(),
            })
            .await
            .map_err(|s| self.rpc_err(s))?;
        Ok(r.into_inner().step)
    }

    pub async fn status(&mut self) -> Result<JobStatus, ClientError> {
        let r = self
            .rpc
            .get_job_status(pb::GetJobStatusRequest {})
            .await
            .map_err(|s| self.rpc_err(s))?
            .into_inner();
        status_from_pb(r.status).map_err(|e| self.invalid(e))
    }

    /// The current status, then one item per change of the job.
    pub async fn watch(
        &mut self,
    ) -> Result<impl Stream<Item = Result<JobStatus, ClientError>> + use<>, ClientError> {
        let stream = self
            .rpc
            .watch_job_status(pb::WatchJobStatusRequest {})
            .await
            .map_err(|s| self.rpc_err(s))?
            .into_inner();
        let url = self.url.clone();
        Ok(stream.map(move |item| match item {
            Ok(s) => status_from_pb(s.status).map_err(|reason| ClientError::Invalid {
                url: url.to_string(),
                reason,
            }),
            Err(s) => Err(ClientError::from_status(&url, s)),
        }))
    }
}

/// A worker's background heartbeats (see [`spawn_heartbeats`]); dropping it stops them.
pub struct Heartbeats {
    /// The coordinator's latest answer: anything but `Continue` means the round is over for this worker.
    pub actions: tokio::sync::watch::Receiver<WorkerAction>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Heartbeats for `worker_id` in round `generation` every `interval` (the assignment's `heartbeat_interval`) until
/// the coordinator answers `Reregister` or `Stop`. A failed call is retried at the next beat: the coordinator may be
/// restarting, and if it stays away the round fails by its own timeout.
pub fn spawn_heartbeats(
    mut client: Client,
    worker_id: String,
    generation: u64,
    interval: Duration,
) -> Heartbeats {
    let (tx, actions) = tokio::sync::watch::channel(WorkerAction::Continue);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match client.heartbeat(&worker_id, generation).await {
                Ok(h) => {
                    let _ = tx.send(h.action);
                    if h.action != WorkerAction::Continue {
                        return;
                    }
                }
                Err(e) => tracing::warn!(worker = %worker_id, error = %e, "heartbeat failed"),
            }
        }
    });
    Heartbeats { actions, task }
}

/// How often rank 0's background reporter sends its latest progress ([`spawn_progress`]).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// A rank's background progress reports (see [`spawn_progress`]); dropping it stops them.
pub struct ProgressReporter {
    latest: tokio::sync::watch::Sender<Option<Progress>>,
    task: tokio::task::JoinHandle<()>,
}

impl ProgressReporter {
    /// Records the latest progress; never blocks and never waits for the coordinator.
    pub fn update(&self, p: Progress) {
        self.latest.send_replace(Some(p));
    }
}

impl Drop for ProgressReporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends the latest progress given to [`ProgressReporter::update`] every `every` (when it changed), one call at
/// a time and each with [`BACKGROUND_CALL_TIMEOUT`]: the training loop only stores a value, so a slow, paused
/// or restarting coordinator never delays a step, and reports that could not be sent are superseded by the
/// next one. (The answer's action is not used: the heartbeats carry the same word.)
pub fn spawn_progress(
    mut client: Client,
    worker_id: String,
    generation: u64,
    every: Duration,
) -> ProgressReporter {
    let (latest, mut rx) = tokio::sync::watch::channel(None::<Progress>);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent: Option<u64> = None;
        loop {
            tick.tick().await;
            let Some(p) = *rx.borrow_and_update() else {
                continue;
            };
            if sent == Some(p.step) {
                continue;
            }
            match client.report_progress(&worker_id, generation, p).await {
                Ok(_) => sent = Some(p.step),
                Err(e) => {
                    tracing::warn!(worker = %worker_id, step = p.step, error = %e, "progress report failed; the next one supersedes it")
                }
            }
        }
    });
    ProgressReporter { latest, task }
}
