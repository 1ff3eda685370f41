//! Control plane of a training job: rendezvous, ranks, the data plan, failure detection and restart rounds,
//! checkpoint barrier and commit, and the job's persisted state.
//!
//! Layers:
//! - [`plan`]: the data plan, a pure function of `(seed, epoch)`, the global batch, the rank and the world size.
//! - [`recipe`]: a recipe's plan, its training set sized and fingerprinted from the datasets' manifests alone.
//! - [`job`]: the domain ([`job::Coordinator`] implements [`job::ControlPlane`]): the job's state machine, plain
//!   Rust types, no gRPC. The job document (`job.json` under the state URL, written through `m3d_store::Store`,
//!   atomically) lets a restarted coordinator continue.
//! - [`grpc`] (server, token check) and [`client`]: the thin adapters to `m3d.v2` (the server also answers the
//!   deprecated `m3d.v1`, through the v2 implementation).
//!   **Invariant: only these two modules (and `m3d-proto`) touch prost types.**
//!
//! **Invariant: the coordinator never touches tensors.**

pub mod checkpoints;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod grpc;
pub mod job;
pub mod plan;
pub mod recipe;

pub use client::{
    spawn_heartbeats, spawn_progress, Client, ClientError, Heartbeats, ProgressReporter,
    BACKGROUND_CALL_TIMEOUT, PROGRESS_EVERY,
};
pub use config::JobConfig;
pub use error::{CoordError, PlanError};
pub use grpc::{serve, CoordinatorService, Token};
pub use job::{
    has_saved_job, Assignment, CheckpointRef, ControlPlane, Coordinator, DataPlan, HeartbeatReply,
    JobPhase, JobStatus, Peer, Progress, WorkLease, WorkerAction, WorkerInfo,
};
pub use plan::{BlockOrder, EpochOrder, PlanKind, PlanSpec, SampleOrder, Shuffle, StepPlan};
pub use recipe::{dataset_manifest, plan_spec, shard_listing, RecipePlanError, TrainingSet};
/// gRPC status codes, as [`ClientError::code`] reports them.
pub use tonic::Code;
