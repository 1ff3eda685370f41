//! The training loop of one rank for one round of a job ([`run_round`]): it computes its slice of each global
//! batch from the round's plan ([`RoundInfo::steps`], the same pure function the coordinator plans with), loads
//! it through [`TrainData`] with read-ahead, runs the data-parallel step, writes metrics (rank 0), hands its
//! progress to a [`Control`] (the coordinator, in a real job) without waiting for it, and saves the final
//! weights (rank 0) before reporting the last step — so a job the coordinator calls completed has them. No step
//! waits for the control plane, except one that commits a finished checkpoint upload (rank 0); the last
//! step's report waits for the answer.
//!
//! A broken round (a peer gone, the coordinator asking everyone to register again) ends the round with
//! [`RoundEnd::Reregister`] rather than an error: the caller joins the restart round. Bad data, a bad recipe
//! or an I/O failure are errors.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

use bytes::Bytes;

use m3d_collectives::{Collective, ReduceOp};
use m3d_coordinator::job::WorkerAction;
use m3d_coordinator::plan::{PlanSpec, StepPlan};
use m3d_models::tokenizer::Tokenizer;
use m3d_models::weights::LoadOptions;
use m3d_recipes::Recipe;
use m3d_runs::metrics::{Meter, MetricsError, MetricsLine};
use m3d_runs::output::{OutputError, RunDir, RunMetrics};
use m3d_store::Store;
use tch::Tensor;

use crate::checkpoint::{
    self, CheckpointError, CheckpointState, RunIdentity, Staged, UploadOptions, Uploader,
    STATE_FORMAT,
};
use crate::job::{device_for, Batcher, JobError, Net, TrainModel};
use crate::objective::{ClipContrastive, LamedLm, LamedLmSeg, Objective};
use crate::optim::{AdamW, OptimError};
use crate::record::BatchRecorder;
use crate::schedule::LrSchedule;
use crate::step::{DataParallelStep, StepError, StepOptions};
use m3d_data::dataset::{DatasetError, TrainData};
use m3d_data::loader::LoadedSample;

/// Errors that end a worker (as opposed to a broken round, which it survives).
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DatasetError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Step(#[from] StepError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Model(#[from] m3d_models::ModelError),
    #[error("recipe: {0}")]
    Recipe(String),
    #[error("coordinator: {0}")]
    Control(String),
    #[error("the round's data plan: {0}")]
    Plan(#[from] m3d_coordinator::PlanError),
    /// The coordinator no longer counts this worker in the round (a stale generation, an unknown worker):
    /// the round is over for it, and it registers again.
    #[error("coordinator ended the round: {0}")]
    RoundOver(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("round {generation} resumes at step {step} but names no checkpoint")]
    NoResume { generation: u64, step: u64 },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("checkpoint {url} holds step {found}, the round resumes at step {expected}")]
    WrongCheckpoint {
        url: String,
        found: u64,
        expected: u64,
    },
}

/// This rank's place in a formed round.
#[derive(Debug, Clone)]
pub struct RoundInfo {
    pub rank: u32,
    pub world_size: u32,
    pub local_rank: u32,
    pub generation: u64,
    pub resume_step: u64,
    /// URL of the committed checkpoint the round resumes from (`None` when it starts at step 0).
    pub resume_checkpoint: Option<String>,
    pub plan: PlanSpec,
}

impl RoundInfo {
    /// This rank's round as the coordinator's `Register` answer describes it.
    pub fn of(a: &m3d_coordinator::Assignment) -> RoundInfo {
        RoundInfo {
            rank: a.rank,
            world_size: a.world_size,
            local_rank: a.local_rank,
            generation: a.generation,
            resume_step: a.resume_step,
            resume_checkpoint: a.resume_checkpoint.as_ref().map(|c| c.url.clone()),
            plan: a.plan,
        }
    }

    /// This rank's samples for global steps `start..start + count` (stopping at the job's last step): a pure
    /// function of (plan, world size, rank, step), the one the coordinator's `GetDataPlan` answers with
    /// ([`PlanSpec::rank_plan`]), so a step never asks the coordinator for its samples.
    pub fn steps(&self, start: u64, count: u64) -> Result<Vec<StepPlan>, TrainError> {
        Ok(self
            .plan
            .rank_plan(start, count, self.rank, self.world_size)?)
    }
}

/// What the loop needs from the control plane.
pub trait Control {
    /// Global steps `..step` are done: recorded for reporting in the background (rank 0's reporter sends
    /// the latest about once a second); never blocks.
    fn progress(&mut self, step: u64, loss: f64, samples: u64);
    /// Reports that global steps `..step` are done and waits for the answer (every rank, once, at the end of
    /// the round: the job completes when every rank has reported its last step); returns what to do next.
    fn report(&mut self, step: u64, loss: f64, samples: u64) -> Result<WorkerAction, TrainError>;
    /// The latest word from the control plane's own channel (heartbeats), without blocking.
    fn action(&self) -> WorkerAction;
    /// Records that the checkpoint of `step` at `url` is complete (written and committed in the store).
    fn commit(&mut self, step: u64, url: &str) -> Result<(), TrainError>;
}

/// How a round ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundEnd {
    /// Every step is done (and, on rank 0, the final weights are saved).
    Finished,
    /// The round broke (the reason says why): join the next one.
    Reregister(String),
    /// The job is over (completed or failed elsewhere).
    Stop,
    /// This worker was asked to stop (SIGTERM): every rank stopped after global step `step`, whose checkpoint
    /// rank 0 wrote and committed (when the recipe checkpoints).
    Terminated { step: u64 },
}

/// Attempts of a checkpoint upload before the worker gives up.
const CHECKPOINT_ATTEMPTS: u32 = 4;
/// Retries of each request inside one upload attempt, and the time they may take: the attempts above
/// retry whole files with backoff, so a store that is down fails the job in about a minute, not after
/// object_store's default three minutes per request.
const CHECKPOINT_REQUEST_RETRIES: usize = 2;
const CHECKPOINT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Steps of plan computed at a time.
const PLAN_CHUNK: u32 = 16;

pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A collective failure breaks the round; anything else ends the worker.
fn classify(e: StepError) -> Result<RoundEnd, TrainError> {
    match e {
        StepError::Collective { .. } => Ok(RoundEnd::Reregister(e.to_string())),
        e => Err(e.into()),
    }
}

/// Saves the final weights, configuration, tokenizer and (with LoRA) the PEFT adapter into `dir`, through a
/// temporary folder renamed into place, so `dir` is either absent or complete.
fn save_final(model: &TrainModel, dir: &Path) -> Result<(), TrainError> {
    save_final_files(model, dir, true)
}

/// [`save_final`], the weights file left out unless `weights`.
fn save_final_files(model: &TrainModel, dir: &Path, weights: bool) -> Result<(), TrainError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = parent.join(format!(".final.tmp{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    if weights {
        m3d_models::weights::save_safetensors(&tmp.join("model.safetensors"), &model.state_dict())?;
    }
    let cfg = serde_json::to_vec_pretty(&model.config).unwrap_or_default();
    std::fs::write(tmp.join("config.json"), cfg).map_err(io(&tmp))?;
    let tok = model.tokenizer.path();
    std::fs::copy(tok, tmp.join("tokenizer.json")).map_err(io(tok))?;
    // It names the special tokens (Phi-3's eos among them), which loading the folder again needs.
    let tok_config = tok.with_file_name("tokenizer_config.json");
    if tok_config.is_file() {
        std::fs::copy(&tok_config, tmp.join("tokenizer_config.json")).map_err(io(&tok_config))?;
    }
    if let Some(lora) = &model.lora {
        m3d_models::lora::save_adapter(&tmp.join("adapter"), &model.vs, lora, Some("CAUSAL_LM"))?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io(dir))
}

/// Saves the final weights into the run: [`save_final`] into `<run>/final/` for a local folder. For a store,
/// the weights go from a host copy straight into the upload (no local file the size of the model), the
/// small files through a local temporary folder, and the commit record last
/// ([`m3d_runs::output::upload_final`]).
fn save_final_to(model: &TrainModel, run: &RunDir, step: u64) -> Result<(), TrainError> {
    match run {
        RunDir::Local(dir) => save_final(model, &dir.join("final")),
        RunDir::Store(url) => {
            let tmp = std::env::temp_dir().join(format!("m3d-final-{}", std::process::id()));
            let local = tmp.join("final");
            let saved = save_final_files(model, &local, false).and_then(|()| {
                let host = m3d_models::weights::to_host_tensors(&model.state_dict())?;
                let weights = m3d_models::weights::safetensors_parts(&host)?;
                Ok(m3d_runs::output::upload_final(
                    url,
                    &local,
                    vec![("model.safetensors".to_string(), weights)],
                    step,
                )?)
            });
            // The local copy was only a staging area; a failure to remove it loses nothing.
            let _ = std::fs::remove_dir_all(&tmp);
            saved?;
            tracing::info!(url = %format!("{url}/final"), step, "final weights uploaded");
            Ok(())
        }
    }
}

/// Runs one round: builds the model, broadcasts rank 0's parameters, trains from `round.resume_step` to
/// the end of the job.
///
/// `stop` is this process's stop request (set on SIGTERM). The ranks agree on it after every step (a one-value
/// all-reduce, so all stop after the same step however the signal reached them): rank 0 then saves and
/// commits that step's checkpoint, and the round ends with [`RoundEnd::Terminated`] on the ranks that were
/// asked to stop and [`RoundEnd::Reregister`] on the others.
#[allow(clippy::too_many_arguments)]
pub fn run_round(
    recipe: &Recipe,
    data: &TrainData,
    tokenizer: &Tokenizer,
    run: &RunDir,
    round: &RoundInfo,
    comm: &mut dyn Collective,
    control: &mut dyn Control,
    stop: &AtomicBool,
) -> Result<RoundEnd, TrainError> {
    let world = round.world_size as usize;
    let total = round.plan.total_steps();
    // The world size must split the global batch into whole micro-batches.
    recipe
        .grad_accum(world)
        .map_err(|e| TrainError::Recipe(e.to_string()))?;
    // The first steps' shards are read while the model is built and the checkpoint loaded, as the
    // reference's DataLoader workers start before its first step: on a cold cache that read is most of the
    // time to the first step.
    let depth = recipe.data.read_ahead.max(1);
    let mut first_plans = VecDeque::new();
    if round.resume_step < total {
        first_plans.extend(round.steps(round.resume_step, u64::from(PLAN_CHUNK))?);
        for p in first_plans.iter().take(depth) {
            data.prefetch(&p.samples)?;
        }
    }
    let prefetched_until = round.resume_step + first_plans.len().min(depth) as u64;
    let device = device_for(recipe.workers.device, round.local_rank)?;
    let model = TrainModel::build(recipe, tokenizer.clone(), device)?;
    // DDP's start: every rank begins from rank 0's parameters.
    let mut vars: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, v) in &vars {
        let mut buf = v.detach().copy();
        if let Err(e) = comm.broadcast(&mut buf, 0) {
            return Ok(RoundEnd::Reregister(format!(
                "broadcasting the initial parameters: {e}"
            )));
        }
        tch::no_grad(|| v.detach().copy_(&buf));
    }
    let mut opt = AdamW::from_recipe(&recipe.train, AdamW::trainable(&model.vs))?;
    if round.resume_step > 0 {
        let url = round
            .resume_checkpoint
            .as_deref()
            .ok_or(TrainError::NoResume {
                generation: round.generation,
                step: round.resume_step,
            })?;
        let (base, _) = url.rsplit_once('/').unwrap_or((url, ""));
        let store = Store::open(base).map_err(|source| CheckpointError::Store {
            url: base.to_string(),
            source,
        })?;
        // Parameters are read straight into the model's own (CPU) tensors where the store is a folder.
        let vars = model.vs.variables();
        let loaded = checkpoint::load_into(&store, round.resume_step, &mut |name| {
            vars.get(name).map(Tensor::shallow_clone)
        })?;
        if loaded.state.step != round.resume_step {
            return Err(TrainError::WrongCheckpoint {
                url: url.to_string(),
                found: loaded.state.step,
                expected: round.resume_step,
            });
        }
        m3d_models::weights::load_into(&model.vs, loaded.model, &LoadOptions::default())?;
        opt.load_state_dict(&loaded.optimizer)?;
        tracing::info!(step = round.resume_step, %url, "resumed from checkpoint");
    }
    let started = Started {
        recipe,
        data,
        run,
        round,
        comm,
        control,
        stop,
        model: &model,
        opt,
        first_plans,
        prefetched_until,
        depth,
    };
    // The one place a model picks its objective; everything after is the same loop for every model.
    let precision = model.precision;
    match &model.net {
        Net::Clip(clip) => train_with(
            &ClipContrastive {
                model: clip,
                precision,
            },
            started,
        ),
        Net::Lamed(lamed) if lamed.config().seg.is_some() => train_with(
            &LamedLmSeg(LamedLm {
                model: lamed,
                precision,
            }),
            started,
        ),
        Net::Lamed(lamed) => train_with(
            &LamedLm {
                model: lamed,
                precision,
            },
            started,
        ),
    }
}

/// A round whose model is built and whose first steps' shards are being read: what [`train_with`] continues
/// from.
struct Started<'a> {
    recipe: &'a Recipe,
    data: &'a TrainData,
    run: &'a RunDir,
    round: &'a RoundInfo,
    comm: &'a mut dyn Collective,
    control: &'a mut dyn Control,
    stop: &'a AtomicBool,
    model: &'a TrainModel,
    opt: AdamW,
    /// The plans computed before the model was built, and the steps whose shards were queued then.
    first_plans: VecDeque<StepPlan>,
    prefetched_until: u64,
    depth: usize,
}

/// The rest of a round for `objective`: the step, metrics and checkpoint components from their recipe sections,
/// the batch thread, and the step loop.
fn train_with<O: Objective>(objective: &O, started: Started<'_>) -> Result<RoundEnd, TrainError> {
    let Started {
        recipe,
        data,
        run,
        round,
        comm,
        control,
        stop,
        model,
        mut opt,
        first_plans,
        prefetched_until,
        depth,
    } = started;
    let rank = round.rank;
    let world = round.world_size as usize;
    let total = round.plan.total_steps();
    let schedule = LrSchedule::from_recipe(&recipe.train, total);
    let mut stepper = DataParallelStep::new(StepOptions::from_recipe(
        &recipe.train,
        objective.reduction(),
    ));
    let mut metrics = if rank == 0 {
        let flush = Duration::from_secs(recipe.output.metrics_flush_s);
        Some(run.open_metrics(round.resume_step, flush)?)
    } else {
        None
    };
    let checkpoint_base = recipe.checkpoint_url();
    let uploader = if rank == 0 && recipe.checkpoint.every > 0 {
        let store = Store::open_with_retries(
            &checkpoint_base,
            CHECKPOINT_REQUEST_RETRIES,
            CHECKPOINT_REQUEST_TIMEOUT,
        )
        .map_err(|source| CheckpointError::Store {
            url: checkpoint_base.clone(),
            source,
        })?;
        // Checkpoints after the one this round starts from belong to the timeline that broke.
        let abandoned = checkpoint::discard_after(&store, round.resume_step)?;
        if !abandoned.is_empty() {
            tracing::info!(steps = ?abandoned, "deleted checkpoints of the abandoned round");
        }
        Some(Uploader::new(
            store,
            UploadOptions {
                keep_last: recipe.checkpoint.keep_last,
                keep_every: recipe.checkpoint.keep_every,
                attempts: CHECKPOINT_ATTEMPTS,
                exclusive_commit: recipe.checkpoint.exclusive_commit,
            },
        ))
    } else {
        None
    };
    // Every checkpoint records the run it belongs to (a resume checks it) and carries the job's tokenizer;
    // both are read once per round.
    let identity = match &uploader {
        Some(_) => Some(RunIdentity::of(recipe)?),
        None => None,
    };
    let tokenizer_json = match &uploader {
        Some(_) => {
            let path = model.tokenizer.path();
            Some(Bytes::from(std::fs::read(path).map_err(|source| {
                CheckpointError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            })?))
        }
        None => None,
    };
    let recorder = match &recipe.output.record_batches {
        None => None,
        Some(_) if world != 1 || round.resume_step != 0 => {
            return Err(TrainError::Recipe(
                "output.record_batches records a run of one worker from step 0".into(),
            ))
        }
        Some(dir) => {
            let trainable: Vec<String> = opt.params().into_iter().map(|(n, _)| n).collect();
            Some(BatchRecorder::create(
                Path::new(dir),
                &model.state_dict(),
                &trainable,
            )?)
        }
    };
    let micro = recipe.micro_batch(world);
    let (plan_tx, plan_rx) = sync_channel::<StepPlan>(depth + PLAN_CHUNK as usize);
    let (ready_tx, ready_rx) = sync_channel::<Result<(StepPlan, O::Batch), TrainError>>(depth);
    let batcher = model.batcher.clone();
    std::thread::scope(|scope| {
        // The batch builder: loads, decodes, augments and tokenises the next steps while this thread trains
        // (the reference's DataLoader workers). It stops when the plans stop or the trainer hangs up.
        std::thread::Builder::new()
            .name("m3d-batches".into())
            .spawn_scoped(scope, move || {
                for plan in plan_rx {
                    let built = build_batch::<O>(data, &batcher, &plan, micro).map(|b| (plan, b));
                    let failed = built.is_err();
                    if ready_tx.send(built).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| TrainError::Io {
                path: PathBuf::from("<batch thread>"),
                source: e,
            })?;
        let mut lp = Loop {
            objective,
            recipe,
            data,
            round,
            run,
            comm,
            control,
            model,
            opt: &mut opt,
            schedule: &schedule,
            stepper: &mut stepper,
            metrics: metrics.as_mut(),
            plan_tx: Some(plan_tx),
            ready_rx,
            next_plan: round.resume_step + first_plans.len() as u64,
            plans: first_plans,
            prefetched_until,
            sent: round.resume_step,
            depth: depth as u64,
            total,
            uploader,
            identity,
            tokenizer_json,
            checkpoint_base,
            stop,
            recorder,
        };
        let end = match lp.run() {
            Err(TrainError::RoundOver(reason)) => Ok(RoundEnd::Reregister(reason)),
            end => end,
        };
        // Hang up on the builder (it may be blocked sending a batch) before the scope joins it.
        drop(lp);
        end
    })
}

/// Loads and decodes the samples of `plan` and builds them into `O`'s batch, ahead of its step (on the batch
/// thread; the batch is on the training device, its host copies pinned and sent without waiting, see
/// [`crate::batch`]).
fn build_batch<O: Objective>(
    data: &TrainData,
    batcher: &Batcher,
    plan: &StepPlan,
    micro: usize,
) -> Result<O::Batch, TrainError> {
    let loaded = data.load(
        &plan.samples,
        &batcher.augmentation(&plan.samples, plan.epoch),
    )?;
    let samples: Vec<(u64, LoadedSample)> = plan.samples.iter().copied().zip(loaded).collect();
    Ok(O::build(batcher, &samples, plan.epoch, micro)?)
}

/// Commits the checkpoint of a finished upload, if there is one, with the coordinator: restart rounds resume
/// from it.
fn commit_finished(
    control: &mut dyn Control,
    base: &str,
    finished: Option<u64>,
) -> Result<(), TrainError> {
    match finished {
        Some(step) => control.commit(step, &checkpoint::step_url(base, step)),
        None => Ok(()),
    }
}

/// The state of one round's step loop.
struct Loop<'a, O: Objective> {
    objective: &'a O,
    recipe: &'a Recipe,
    data: &'a TrainData,
    round: &'a RoundInfo,
    run: &'a RunDir,
    comm: &'a mut dyn Collective,
    control: &'a mut dyn Control,
    model: &'a TrainModel,
    opt: &'a mut AdamW,
    schedule: &'a LrSchedule,
    stepper: &'a mut DataParallelStep,
    metrics: Option<&'a mut RunMetrics>,
    plan_tx: Option<SyncSender<StepPlan>>,
    ready_rx: Receiver<Result<(StepPlan, O::Batch), TrainError>>,
    /// Plans computed but not yet handed to the batch builder.
    plans: VecDeque<StepPlan>,
    /// First step whose plan has not been computed.
    next_plan: u64,
    /// Steps before this one had their shards queued for read-ahead before the loop began.
    prefetched_until: u64,
    /// First step whose plan has not been handed to the batch builder.
    sent: u64,
    depth: u64,
    total: u64,
    /// Rank 0's checkpoint uploads, the run identity each checkpoint records and the tokenizer file each
    /// includes.
    uploader: Option<Uploader>,
    identity: Option<RunIdentity>,
    tokenizer_json: Option<Bytes>,
    checkpoint_base: String,
    stop: &'a AtomicBool,
    /// `output.record_batches`.
    recorder: Option<BatchRecorder>,
}

impl<O: Objective> Loop<'_, O> {
    /// Whether any rank was asked to stop before this point (`Some(asked_here)`), agreed by all ranks with one
    /// all-reduce of a single value; a collective that fails ends the round.
    fn stop_agreed(&mut self) -> Result<Option<bool>, TrainError> {
        let here = self.stop.load(Ordering::SeqCst);
        let round_over = |e: m3d_collectives::CollectiveError| {
            TrainError::RoundOver(format!("agreeing on a stop request: {e}"))
        };
        let mut flag = self
            .comm
            .scalars(&[f64::from(u8::from(here))])
            .map_err(round_over)?;
        self.comm
            .all_reduce(&mut flag, ReduceOp::Sum)
            .map_err(round_over)?;
        let asked = flag
            .f_double_value(&[0])
            .map_err(|e| TrainError::RoundOver(format!("reading the stop flag: {e}")))?;
        Ok((asked > 0.0).then_some(here))
    }

    /// Hands the builder the plans of the steps up to `step + depth`, computing them in chunks, and starts
    /// reading their shards.
    fn feed(&mut self, step: u64) -> Result<(), TrainError> {
        let until = (step + self.depth).min(self.total);
        while self.sent < until {
            if self.plans.is_empty() {
                let got = self.round.steps(self.next_plan, u64::from(PLAN_CHUNK))?;
                if got.is_empty() {
                    return Err(TrainError::Control(format!(
                        "empty data plan for step {}",
                        self.next_plan
                    )));
                }
                self.next_plan += got.len() as u64;
                self.plans.extend(got);
            }
            let Some(plan) = self.plans.pop_front() else {
                break;
            };
            if plan.step != self.sent {
                return Err(TrainError::Control(format!(
                    "data plan for step {} where step {} was expected",
                    plan.step, self.sent
                )));
            }
            if plan.step >= self.prefetched_until {
                self.data.prefetch(&plan.samples)?;
            }
            if let Some(tx) = &self.plan_tx {
                if tx.send(plan).is_err() {
                    break;
                }
            }
            self.sent += 1;
        }
        Ok(())
    }

    fn run(&mut self) -> Result<RoundEnd, TrainError> {
        let world = self.round.world_size as usize;
        let rank = self.round.rank;
        let log_every = self.recipe.train.log_every.max(1);
        let mut meter = Meter::new();
        for step in self.round.resume_step..self.total {
            match self.control.action() {
                WorkerAction::Continue => {}
                WorkerAction::Reregister => {
                    return Ok(RoundEnd::Reregister(
                        "the coordinator ended the round".into(),
                    ))
                }
                WorkerAction::Stop => return Ok(RoundEnd::Stop),
            }
            self.feed(step)?;
            let wait = Instant::now();
            let (plan, built) = self.ready_rx.recv().map_err(|_| {
                TrainError::Control("the batch builder stopped without an error".into())
            })??;
            let data_wait = wait.elapsed();
            if plan.step != step {
                return Err(TrainError::Control(format!(
                    "batch for step {} where step {step} was expected",
                    plan.step
                )));
            }
            let samples = plan.samples.len() as u64 * world as u64;
            if let Some(rec) = self.recorder.as_mut() {
                rec.add(step, O::record(&built)?)?;
                if step + 1 == self.total {
                    if let Some(rec) = self.recorder.take() {
                        rec.finish()?;
                    }
                }
            }
            tch::manual_seed(crate::job::step_seed(self.recipe.train.seed, step, rank));
            let r = self.objective.step(
                self.stepper,
                &mut *self.comm,
                self.opt,
                self.schedule,
                step,
                built,
            );
            // A failed collective is a broken round; anything else ends the worker.
            let stepped = match r {
                Ok(s) => s,
                Err(e) => return classify(e),
            };
            meter.add(samples, stepped.tokens, data_wait);
            let out = stepped.out;
            let model = self.model;
            let done = step + 1;
            if let Some(w) = self.metrics.as_deref_mut() {
                if done % log_every == 0 || done == self.total {
                    let mut line = MetricsLine::new(done, out.loss, out.lr).with_rates(&mut meter);
                    line.grad_norm = Some(out.grad_norm);
                    line.extra.insert("epoch".into(), plan.epoch as f64);
                    line.extra.insert("world_size".into(), world as f64);
                    for (name, value) in &stepped.metrics {
                        line.extra.insert((*name).into(), *value);
                    }
                    w.write(&line)?;
                }
            }
            // A stop request ends the round after this step, unless it is the last one anyway.
            let stopping = if done < self.total {
                self.stop_agreed()?
            } else {
                None
            };
            if let Some(up) = self.uploader.as_mut() {
                if step == self.round.resume_step {
                    // AdamW's state exists after the first step: prepare the first checkpoint's memory now.
                    up.prepare(&model.state_dict(), &self.opt.state_view());
                }
                // A finished upload is committed with the coordinator (the next restart round resumes
                // from it); a new checkpoint is staged every `checkpoint.every` steps and after the last
                // step, so that a finished run can be extended (`--resume` with a larger
                // `train.max_steps`) without redoing a step.
                commit_finished(&mut *self.control, &self.checkpoint_base, up.poll()?)?;
                let every = self.recipe.checkpoint.every;
                if every > 0 && (done % every == 0 || done == self.total || stopping.is_some()) {
                    let stall = Instant::now();
                    // The previous upload finishes before the next staging copy is made: at most one
                    // checkpoint is ever held in host memory.
                    commit_finished(&mut *self.control, &self.checkpoint_base, up.wait()?)?;
                    let (epoch, step_in_epoch) = self.round.plan.position(done);
                    let state = CheckpointState {
                        format: STATE_FORMAT,
                        identity: self.identity.clone(),
                        step: done,
                        epoch,
                        step_in_epoch,
                        world_size: world as u32,
                        plan: self.round.plan,
                        recipe: self.recipe.to_yaml(),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                    };
                    let mut staged = Staged::new_reusing(
                        &state,
                        &model.state_dict(),
                        &self.opt.state_view(),
                        up.spare(),
                    )?;
                    if let Some(json) = &self.tokenizer_json {
                        staged = staged.with_tokenizer(json.clone());
                    }
                    commit_finished(
                        &mut *self.control,
                        &self.checkpoint_base,
                        up.submit(staged)?,
                    )?;
                    tracing::info!(
                        step = done,
                        stall_s = stall.elapsed().as_secs_f64(),
                        "checkpoint staged"
                    );
                }
                if done == self.total || stopping.is_some() {
                    commit_finished(&mut *self.control, &self.checkpoint_base, up.wait()?)?;
                }
            }
            if let Some(here) = stopping {
                if let Some(w) = self.metrics.as_deref_mut() {
                    w.flush()?;
                }
                // The other ranks wait here until rank 0 has committed the checkpoint: a rank that left
                // earlier would end the round at the coordinator before the commit reached it. Past this
                // point the process leaves either way, so a failure is only logged.
                if let Err(e) = self.stop_agreed() {
                    tracing::warn!(error = %e, "the ranks did not meet after the stop checkpoint");
                }
                tracing::info!(step = done, asked_here = here, "stopped on request");
                return Ok(if here {
                    RoundEnd::Terminated { step: done }
                } else {
                    RoundEnd::Reregister(format!("another rank was asked to stop at step {done}"))
                });
            }
            if done == self.total && rank == 0 {
                // The last lines are readable before the job can be called complete.
                if let Some(w) = self.metrics.as_deref_mut() {
                    w.flush()?;
                }
                save_final_to(model, self.run, done)?;
            }
            let global_samples = done * self.round.plan.global_batch;
            if done < self.total {
                self.control.progress(done, out.loss, global_samples);
                continue;
            }
            match self.control.report(done, out.loss, global_samples)? {
                WorkerAction::Continue => {}
                WorkerAction::Reregister => {
                    return Ok(RoundEnd::Reregister(
                        "the coordinator ended the round".into(),
                    ))
                }
                WorkerAction::Stop if done == self.total => return Ok(RoundEnd::Finished),
                WorkerAction::Stop => return Ok(RoundEnd::Stop),
            }
        }
        Ok(RoundEnd::Finished)
    }
}
