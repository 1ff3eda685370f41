//! The thin gRPC adapters: the server over any [`ControlPlane`], the bearer-token check, and the conversions between
//! the domain types and the `m3d.v2` messages. With `client`, the only code of this crate that touches prost types.
//!
//! The server speaks `m3d.v2` and, side by side on the same port and behind the same token check, the deprecated
//! `m3d.v1`, whose messages are wire-identical to v2's under older names: a v1 call is re-encoded as its v2
//! request, answered by the v2 implementation, and its answer re-encoded as the v1 response (`V1`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use m3d_proto::prost::Message;
use m3d_proto::v1;
use m3d_proto::v1::coordinator_server::{Coordinator as CoordinatorRpcV1, CoordinatorServer};
use m3d_proto::v2 as pb;
use m3d_proto::v2::coordinator_service_server::{
    CoordinatorService as CoordinatorRpc, CoordinatorServiceServer,
};
use subtle::ConstantTimeEq;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::error::{CoordError, PlanError};
use crate::job::{
    Assignment, CheckpointRef, ControlPlane, DataPlan, JobPhase, JobStatus, Peer, Progress,
    WorkerAction, WorkerInfo,
};
use crate::plan::{PlanSpec, Shuffle, StepPlan};

/// A bearer token. `Debug` never shows it, and nothing in this crate logs it.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl Token {
    /// A token from its text (surrounding whitespace, e.g. a file's final newline, is dropped); `None` if empty.
    pub fn new(text: &str) -> Option<Token> {
        let t = text.trim();
        (!t.is_empty()).then(|| Token(Arc::from(t)))
    }

    pub(crate) fn header_value(
        &self,
    ) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, String> {
        format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| "the token must be printable ASCII".to_string())
    }

    /// Constant-time comparison with the `authorization` header of a call (`Bearer <token>`).
    fn accepts(&self, header: Option<&[u8]>) -> bool {
        let Some(presented) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        // Only the token's length can leak through timing (ct_eq returns early on a length mismatch).
        bool::from(presented.ct_eq(self.0.as_bytes()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The one place domain errors become gRPC status codes.
pub fn to_status(e: CoordError) -> Status {
    let code = match &e {
        CoordError::InvalidArgument(_) | CoordError::Config(_) => tonic::Code::InvalidArgument,
        CoordError::Plan(PlanError::StepOutOfRange { .. }) => tonic::Code::OutOfRange,
        CoordError::Plan(_) => tonic::Code::InvalidArgument,
        CoordError::UnknownWorker { .. } => tonic::Code::NotFound,
        CoordError::StaleGeneration { .. } | CoordError::RoundAborted { .. } => {
            tonic::Code::Aborted
        }
        CoordError::NotAccepting { .. }
        | CoordError::JobEnded { .. }
        | CoordError::Checkpoint { .. } => tonic::Code::FailedPrecondition,
        CoordError::State { .. } | CoordError::ShuttingDown => tonic::Code::Unavailable,
    };
    Status::new(code, e.to_string())
}

fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("missing field `{field}`"))
}

/// The gRPC service over a domain [`ControlPlane`].
pub struct CoordinatorService<C> {
    plane: Arc<C>,
}

impl<C: ControlPlane> CoordinatorService<C> {
    pub fn new(plane: C) -> Self {
        CoordinatorService {
            plane: Arc::new(plane),
        }
    }

    /// The tonic server (`m3d.v2` and `m3d.v1`, with the bearer-token check on both when `token` is set, and
    /// `grpc.health.v1.Health` without it, for readiness probes). Streams
    /// are not limited to hyper's default of 200 per connection: every worker of a round waits in `Register` at
    /// once, and a benchmark or a proxy multiplexes thousands of them on a few connections.
    pub fn into_router(self, token: Option<Token>) -> tonic::transport::server::Router {
        let svc = Arc::new(self);
        let interceptor = move |req: Request<()>| -> Result<Request<()>, Status> {
            if let Some(token) = &token {
                let header = req.metadata().get("authorization").map(|v| v.as_bytes());
                if !token.accepts(header) {
                    // The presented value is not logged: it may be a near-miss of the real token.
                    tracing::warn!("refused a call without a valid bearer token");
                    return Err(Status::unauthenticated("missing or wrong bearer token"));
                }
            }
            Ok(req)
        };
        // The health service reports SERVING for as long as the server runs; probes carry no token.
        let (_, health) = tonic_health::server::health_reporter();
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(1 << 16))
            .tcp_nodelay(true)
            .add_service(health)
            .add_service(tonic::service::interceptor::InterceptedService::new(
                CoordinatorServiceServer::from_arc(svc.clone()),
                interceptor.clone(),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                CoordinatorServer::new(V1(svc)),
                interceptor,
            ))
    }
}

/// Serves `plane` on an already bound listener until `shutdown` resolves.
pub async fn serve<C: ControlPlane>(
    plane: C,
    listener: tokio::net::TcpListener,
    token: Option<Token>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    CoordinatorService::new(plane)
        .into_router(token)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Binds `addr` (port 0: any free port) and returns the listener and its address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl<C: ControlPlane> CoordinatorRpc for CoordinatorService<C> {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        let caps = r.capabilities.ok_or_else(|| missing("capabilities"))?;
        if r.worker_id.is_empty() {
            return Err(missing("worker_id"));
        }
        let info = WorkerInfo {
            worker_id: r.worker_id,
            host: r.host,
            collective_addr: r.collective_addr,
            gpus: caps.gpus,
            nccl_unique_id: r.nccl_unique_id,
        };
        let a = self.plane.register(info).await.map_err(to_status)?;
        Ok(Response::new(assignment_to_pb(&a)))
    }

    async fn send_heartbeat(
        &self,
        req: Request<pb::SendHeartbeatRequest>,
    ) -> Result<Response<pb::SendHeartbeatResponse>, Status> {
        let r = req.into_inner();
        if r.worker_id.is_empty() {
            return Err(missing("worker_id"));
        }
        let h = self
            .plane
            .heartbeat(&r.worker_id, r.generation)
            .map_err(to_status)?;
        Ok(Response::new(pb::SendHeartbeatResponse {
            action: action_to_pb(h.action) as i32,
            generation: h.generation,
            state: phase_to_pb(h.phase) as i32,
        }))
    }

    async fn get_data_plan(
        &self,
        req: Request<pb::GetDataPlanRequest>,
    ) -> Result<Response<pb::GetDataPlanResponse>, Status> {
        let r = req.into_inner();
        if r.worker_id.is_empty() {
            return Err(missing("worker_id"));
        }
        let p = self
            .plane
            .data_plan(&r.worker_id, r.generation, r.start_step, r.steps)
            .map_err(to_status)?;
        Ok(Response::new(pb::GetDataPlanResponse {
            rank: p.rank,
            world_size: p.world_size,
            steps: p
                .steps
                .into_iter()
                .map(|s| pb::StepSamples {
                    step: s.step,
                    epoch: s.epoch,
                    step_in_epoch: s.step_in_epoch,
                    samples: s.samples,
                })
                .collect(),
        }))
    }

    async fn get_peers(
        &self,
        req: Request<pb::GetPeersRequest>,
    ) -> Result<Response<pb::GetPeersResponse>, Status> {
        let r = req.into_inner();
        if r.worker_id.is_empty() {
            return Err(missing("worker_id"));
        }
        let (world_size, peers) = self
            .plane
            .peers(&r.worker_id, r.generation, r.start_rank, r.count)
            .map_err(to_status)?;
        Ok(Response::new(pb::GetPeersResponse {
            world_size,
            peers: peers.iter().map(peer_to_pb).collect(),
        }))
    }

    async fn report_progress(
        &self,
        req: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        let r = req.into_inner();
        if r.worker_id.is_empty() {
            return Err(missing("worker_id"));
        }
        let progress = Progress {
            step: r.step,
            loss: r.loss,
            samples: r.samples,
        };
        let a = self
            .plane
            .report_progress(&r.worker_id, r.generation, progress)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ReportProgressResponse {
            action: action_to_pb(a) as i32,
        }))
    }

    async fn wait_checkpoint_barrier(
        &self,
        req: Request<pb::WaitCheckpointBarrierRequest>,
    ) -> Result<Response<pb::WaitCheckpointBarrierResponse>, Status> {
        let r = req.into_inner();
        if r.worker_id.is_empty() {
            return Err(missing("worker_id"));
        }
        let step = self
            .plane
            .checkpoint_barrier(&r.worker_id, r.generation, r.step)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::WaitCheckpointBarrierResponse { step }))
    }

    async fn commit_checkpoint(
        &self,
        req: Request<pb::CommitCheckpointRequest>,
    ) -> Result<Response<pb::CommitCheckpointResponse>, Status> {
        let r = req.into_inner();
        if r.worker_id.is_empty() {
            return Err(missing("worker_id"));
        }
        if r.url.is_empty() {
            return Err(missing("url"));
        }
        let step = self
            .plane
            .commit_checkpoint(
                &r.worker_id,
                r.generation,
                CheckpointRef {
                    step: r.step,
                    url: r.url,
                },
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CommitCheckpointResponse { step }))
    }

    async fn get_job_status(
        &self,
        _req: Request<pb::GetJobStatusRequest>,
    ) -> Result<Response<pb::GetJobStatusResponse>, Status> {
        Ok(Response::new(pb::GetJobStatusResponse {
            status: Some(status_to_pb(&self.plane.status())),
        }))
    }

    type WatchJobStatusStream = BoxStream<pb::WatchJobStatusResponse>;

    async fn watch_job_status(
        &self,
        _req: Request<pb::WatchJobStatusRequest>,
    ) -> Result<Response<Self::WatchJobStatusStream>, Status> {
        let rx = self.plane.watch();
        let stream = tokio_stream::wrappers::WatchStream::new(rx).map(|s| {
            Ok(pb::WatchJobStatusResponse {
                status: Some(status_to_pb(&s)),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn lease_work(
        &self,
        req: Request<pb::LeaseWorkRequest>,
    ) -> Result<Response<pb::LeaseWorkResponse>, Status> {
        let r = req.into_inner();
        if r.worker_id.is_empty() {
            return Err(missing("worker_id"));
        }
        let l = self
            .plane
            .lease_work(&r.worker_id, r.generation, r.max_items)
            .map_err(to_status)?;
        Ok(Response::new(pb::LeaseWorkResponse {
            start: l.start,
            end: l.end,
            items: l.items,
        }))
    }
}

/// The deprecated `m3d.v1` service, answered by the `m3d.v2` implementation: each v1 message is wire-identical to
/// its v2 counterpart (see `m3d/v2/coordinator.proto`), so a call is converted by re-encoding its request and
/// answer; only v1's `JobStatus` answers, which v2 wraps in a response message, are unwrapped.
struct V1<C>(Arc<CoordinatorService<C>>);

/// `message` as its wire-identical counterpart of the other package.
fn transcode<T: Message + Default>(message: &impl Message) -> Result<T, Status> {
    m3d_proto::transcode(message)
        .map_err(|e| Status::internal(format!("converting between m3d.v1 and m3d.v2: {e}")))
}

fn to_v2<A: Message, B: Message + Default>(req: Request<A>) -> Result<Request<B>, Status> {
    let (metadata, extensions, message) = req.into_parts();
    Ok(Request::from_parts(
        metadata,
        extensions,
        transcode(&message)?,
    ))
}

fn to_v1<A: Message, B: Message + Default>(resp: Response<A>) -> Result<Response<B>, Status> {
    let (metadata, message, extensions) = resp.into_parts();
    Ok(Response::from_parts(
        metadata,
        transcode(&message)?,
        extensions,
    ))
}

fn status_to_v1(status: Option<pb::JobStatus>) -> Result<v1::JobStatus, Status> {
    transcode(&status.ok_or_else(|| Status::internal("a job status answer without its status"))?)
}

#[tonic::async_trait]
impl<C: ControlPlane> CoordinatorRpcV1 for V1<C> {
    async fn register(
        &self,
        req: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        to_v1(self.0.register(to_v2(req)?).await?)
    }

    async fn get_peers(
        &self,
        req: Request<v1::PeersRequest>,
    ) -> Result<Response<v1::PeersResponse>, Status> {
        to_v1(self.0.get_peers(to_v2(req)?).await?)
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        to_v1(self.0.send_heartbeat(to_v2(req)?).await?)
    }

    async fn get_data_plan(
        &self,
        req: Request<v1::DataPlanRequest>,
    ) -> Result<Response<v1::DataPlanResponse>, Status> {
        to_v1(self.0.get_data_plan(to_v2(req)?).await?)
    }

    async fn report_progress(
        &self,
        req: Request<v1::ProgressRequest>,
    ) -> Result<Response<v1::ProgressResponse>, Status> {
        to_v1(self.0.report_progress(to_v2(req)?).await?)
    }

    async fn checkpoint_barrier(
        &self,
        req: Request<v1::CheckpointBarrierRequest>,
    ) -> Result<Response<v1::CheckpointBarrierResponse>, Status> {
        to_v1(self.0.wait_checkpoint_barrier(to_v2(req)?).await?)
    }

    async fn commit_checkpoint(
        &self,
        req: Request<v1::CommitCheckpointRequest>,
    ) -> Result<Response<v1::CommitCheckpointResponse>, Status> {
        to_v1(self.0.commit_checkpoint(to_v2(req)?).await?)
    }

    async fn job_status(
        &self,
        req: Request<v1::JobStatusRequest>,
    ) -> Result<Response<v1::JobStatus>, Status> {
        let (metadata, answer, extensions) = self.0.get_job_status(to_v2(req)?).await?.into_parts();
        Ok(Response::from_parts(
            metadata,
            status_to_v1(answer.status)?,
            extensions,
        ))
    }

    type WatchStream = BoxStream<v1::JobStatus>;

    async fn watch(
        &self,
        req: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let stream = self.0.watch_job_status(to_v2(req)?).await?;
        Ok(stream.map(|s| -> Self::WatchStream {
            Box::pin(s.map(|item| item.and_then(|answer| status_to_v1(answer.status))))
        }))
    }
}

// ---- conversions (used by the server above and by `client`) ----

pub(crate) fn action_to_pb(a: WorkerAction) -> pb::WorkerAction {
    match a {
        WorkerAction::Continue => pb::WorkerAction::Continue,
        WorkerAction::Reregister => pb::WorkerAction::Reregister,
        WorkerAction::Stop => pb::WorkerAction::Stop,
    }
}

pub(crate) fn action_from_pb(a: i32) -> Option<WorkerAction> {
    match pb::WorkerAction::try_from(a).ok()? {
        pb::WorkerAction::Continue => Some(WorkerAction::Continue),
        pb::WorkerAction::Reregister => Some(WorkerAction::Reregister),
        pb::WorkerAction::Stop => Some(WorkerAction::Stop),
        pb::WorkerAction::Unspecified => None,
    }
}

pub(crate) fn phase_to_pb(p: JobPhase) -> pb::JobState {
    match p {
        JobPhase::Pending => pb::JobState::Pending,
        JobPhase::Rendezvous => pb::JobState::Rendezvous,
        JobPhase::Running => pb::JobState::Running,
        JobPhase::Checkpointing => pb::JobState::Checkpointing,
        JobPhase::Restarting => pb::JobState::Restarting,
        JobPhase::Completed => pb::JobState::Completed,
        JobPhase::Failed => pb::JobState::Failed,
    }
}

pub(crate) fn phase_from_pb(s: i32) -> Option<JobPhase> {
    Some(match pb::JobState::try_from(s).ok()? {
        pb::JobState::Pending => JobPhase::Pending,
        pb::JobState::Rendezvous => JobPhase::Rendezvous,
        pb::JobState::Running => JobPhase::Running,
        pb::JobState::Checkpointing => JobPhase::Checkpointing,
        pb::JobState::Restarting => JobPhase::Restarting,
        pb::JobState::Completed => JobPhase::Completed,
        pb::JobState::Failed => JobPhase::Failed,
        pb::JobState::Unspecified => return None,
    })
}

fn peer_to_pb(p: &Peer) -> pb::Peer {
    pb::Peer {
        rank: p.rank,
        worker_id: p.worker_id.clone(),
        host: p.host.clone(),
        collective_addr: p.collective_addr.clone(),
        gpus: p.gpus,
    }
}

pub(crate) fn peer_from_pb(p: pb::Peer) -> Peer {
    Peer {
        rank: p.rank,
        worker_id: p.worker_id,
        host: p.host,
        collective_addr: p.collective_addr,
        gpus: p.gpus,
    }
}

fn plan_to_pb(p: &PlanSpec, data_fingerprint: Option<&str>) -> pb::DataPlanSpec {
    pb::DataPlanSpec {
        data_fingerprint: data_fingerprint.unwrap_or_default().to_string(),
        samples: p.samples,
        global_batch: p.global_batch,
        seed: p.seed,
        epochs: p.epochs,
        steps_per_epoch: p.steps_per_epoch(),
        total_steps: p.total_steps(),
        max_steps: p.max_steps.unwrap_or(0),
        shuffle_block: match p.shuffle {
            Shuffle::Global => 0,
            Shuffle::Blocks { block, .. } => block,
        },
        shuffle_window: match p.shuffle {
            Shuffle::Global => 0,
            Shuffle::Blocks { window, .. } => window,
        },
        kind: match p.kind {
            crate::PlanKind::Train => pb::PlanKind::Training,
            crate::PlanKind::Eval => pb::PlanKind::Evaluation,
        } as i32,
    }
}

/// The training set's fingerprint a `DataPlanSpec` carries (empty: none).
pub(crate) fn fingerprint_from_pb(p: Option<&pb::DataPlanSpec>) -> Option<String> {
    p.filter(|p| !p.data_fingerprint.is_empty())
        .map(|p| p.data_fingerprint.clone())
}

pub(crate) fn plan_from_pb(p: &pb::DataPlanSpec) -> PlanSpec {
    PlanSpec {
        samples: p.samples,
        global_batch: p.global_batch,
        seed: p.seed,
        epochs: p.epochs,
        max_steps: (p.max_steps > 0).then_some(p.max_steps),
        // A block of 0 is the field's default: a coordinator that predates block shuffles sends the global one.
        shuffle: match p.shuffle_block {
            0 => Shuffle::Global,
            block => Shuffle::Blocks {
                block,
                window: p.shuffle_window,
            },
        },
        // Unspecified (a coordinator that predates the field) is training.
        kind: match pb::PlanKind::try_from(p.kind) {
            Ok(pb::PlanKind::Evaluation) => crate::PlanKind::Eval,
            _ => crate::PlanKind::Train,
        },
    }
}

pub(crate) fn assignment_to_pb(a: &Assignment) -> pb::RegisterResponse {
    pb::RegisterResponse {
        rank: a.rank,
        world_size: a.world_size,
        generation: a.generation,
        peers: a.peers.iter().map(peer_to_pb).collect(),
        local_rank: a.local_rank,
        local_world_size: a.local_world_size,
        nccl_unique_id: a.nccl_unique_id.as_ref().clone(),
        resume_step: a.resume_step,
        resume_checkpoint_url: a
            .resume_checkpoint
            .as_ref()
            .map(|c| c.url.clone())
            .unwrap_or_default(),
        plan: Some(plan_to_pb(&a.plan, a.data_fingerprint.as_deref())),
        heartbeat_interval_ms: a.heartbeat_interval.as_millis() as u64,
    }
}

pub(crate) fn status_to_pb(s: &JobStatus) -> pb::JobStatus {
    pb::JobStatus {
        state: phase_to_pb(s.phase) as i32,
        generation: s.generation,
        world_size: s.world_size,
        min_workers: s.min_workers,
        max_workers: s.max_workers,
        waiting: s.waiting,
        restarts: s.restarts,
        max_restarts: s.max_restarts,
        resume_step: s.resume_step,
        step: s.step,
        epoch: s.epoch,
        step_in_epoch: s.step_in_epoch,
        total_steps: s.total_steps,
        last_loss: s.last_loss,
        last_checkpoint: s.last_checkpoint.as_ref().map(|c| pb::Checkpoint {
            step: c.step,
            url: c.url.clone(),
        }),
        failure: s.failure.clone().unwrap_or_default(),
        members: s.members.iter().map(peer_to_pb).collect(),
        plan: Some(plan_to_pb(&s.plan, s.data_fingerprint.as_deref())),
    }
}

/// The domain status from the `status` field of a `GetJobStatusResponse` or `WatchJobStatusResponse`.
pub(crate) fn status_from_pb(s: Option<pb::JobStatus>) -> Result<JobStatus, String> {
    let s = s.ok_or("missing field `status`")?;
    let phase = phase_from_pb(s.state).ok_or_else(|| format!("unknown job state {}", s.state))?;
    let plan = s
        .plan
        .as_ref()
        .map(plan_from_pb)
        .ok_or("missing field `plan`")?;
    let data_fingerprint = fingerprint_from_pb(s.plan.as_ref());
    Ok(JobStatus {
        phase,
        generation: s.generation,
        world_size: s.world_size,
        min_workers: s.min_workers,
        max_workers: s.max_workers,
        waiting: s.waiting,
        restarts: s.restarts,
        max_restarts: s.max_restarts,
        resume_step: s.resume_step,
        step: s.step,
        epoch: s.epoch,
        step_in_epoch: s.step_in_epoch,
        total_steps: s.total_steps,
        last_loss: s.last_loss,
        last_checkpoint: s.last_checkpoint.map(|c| CheckpointRef {
            step: c.step,
            url: c.url,
        }),
        failure: (!s.failure.is_empty()).then_some(s.failure),
        members: s.members.into_iter().map(peer_from_pb).collect(),
        plan,
        data_fingerprint,
    })
}

pub(crate) fn data_plan_from_pb(p: pb::GetDataPlanResponse) -> DataPlan {
    DataPlan {
        rank: p.rank,
        world_size: p.world_size,
        steps: p
            .steps
            .into_iter()
            .map(|s| StepPlan {
                step: s.step,
                epoch: s.epoch,
                step_in_epoch: s.step_in_epoch,
                samples: s.samples,
            })
            .collect(),
    }
}
