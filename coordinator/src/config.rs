//! The coordinator's configuration for one job.

use std::time::Duration;

use crate::error::CoordError;
use crate::job::CheckpointRef;
use crate::plan::PlanSpec;

/// How a job's rounds are formed and watched.
#[derive(Clone, Debug)]
pub struct JobConfig {
    /// A round starts immediately with `max_workers`, or with at least `min_workers` once the rendezvous
    /// timeout has passed (measured from the first registration of the round).
    pub min_workers: u32,
    pub max_workers: u32,
    pub rendezvous_timeout: Duration,
    /// A member that sent nothing for this long has failed.
    pub heartbeat_timeout: Duration,
    /// Restart rounds allowed after failures; one more failure fails the job.
    pub max_restarts: u32,
    pub plan: PlanSpec,
    /// The training set's fingerprint (`m3d_worker::checkpoint::RunIdentity`'s `data`: sha256 hex over the
    /// datasets' shard listings), handed to every worker with the plan so that a worker whose data differs
    /// refuses to train; `None` when the job was planned without a recipe (then only the plan is checked).
    pub data_fingerprint: Option<String>,
    /// A committed checkpoint a new job starts from (`m3d train --resume`); ignored when the job state
    /// already exists (it knows its own last checkpoint).
    pub initial_checkpoint: Option<CheckpointRef>,
}

impl JobConfig {
    pub fn validate(&self) -> Result<(), CoordError> {
        if self.min_workers == 0 {
            return Err(CoordError::Config("min workers must be at least 1".into()));
        }
        if self.max_workers < self.min_workers {
            return Err(CoordError::Config(format!(
                "max workers {} is below min workers {}",
                self.max_workers, self.min_workers
            )));
        }
        if self.heartbeat_timeout.is_zero() {
            return Err(CoordError::Config(
                "heartbeat timeout must be positive".into(),
            ));
        }
        self.plan.validate()?;
        if !(self.min_workers..=self.max_workers).any(|w| self.plan.fits(w)) {
            return Err(CoordError::Config(match self.plan.kind {
                crate::PlanKind::Train => format!(
                    "no world size in {}..={} divides the global batch {}",
                    self.min_workers, self.max_workers, self.plan.global_batch
                ),
                crate::PlanKind::Eval => format!(
                    "{} workers at least for an evaluation of {} samples",
                    self.min_workers, self.plan.samples
                ),
            }));
        }
        Ok(())
    }

    /// How often workers should heartbeat: a third of the timeout, so two lost beats are tolerated.
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_timeout / 3
    }

    /// The largest world size usable with `available` workers (within min..=max and dividing the global batch).
    pub fn world_size_for(&self, available: usize) -> Option<u32> {
        let top = u32::try_from(available)
            .unwrap_or(u32::MAX)
            .min(self.max_workers);
        (self.min_workers..=top).rev().find(|&w| self.plan.fits(w))
    }
}
