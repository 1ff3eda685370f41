//! Typed errors of the domain layer. The gRPC adapter maps them to status codes in one place
//! (`grpc::to_status`).

/// An invalid data plan request or spec.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PlanError {
    #[error("invalid data plan: {0}")]
    Invalid(String),
    #[error("global batch {global_batch} is not divisible by world size {world_size}")]
    WorldSize { global_batch: u64, world_size: u32 },
    #[error("step {step} is past the end of the job ({total_steps} steps)")]
    StepOutOfRange { step: u64, total_steps: u64 },
}

/// Errors of the coordinator's domain operations.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("worker `{worker}` is not a member of round {generation}")]
    UnknownWorker { worker: String, generation: u64 },
    #[error("worker `{worker}` sent generation {got}, the job is at generation {current}: register again")]
    StaleGeneration {
        worker: String,
        got: u64,
        current: u64,
    },
    #[error("round {generation} was broken ({reason}): register again")]
    RoundAborted { generation: u64, reason: String },
    #[error("the job does not accept workers now ({state}): {reason}")]
    NotAccepting { state: &'static str, reason: String },
    #[error("the job has ended ({state}){}", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    JobEnded { state: &'static str, reason: String },
    #[error("worker `{worker}` cannot commit step {step}: {reason}")]
    Checkpoint {
        worker: String,
        step: u64,
        reason: String,
    },
    #[error("job state at `{url}`: {reason}")]
    State { url: String, reason: String },
    #[error("coordinator is shutting down")]
    ShuttingDown,
}
