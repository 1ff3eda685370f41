//! The data-parallel training step: gathering CLIP features over a [`Collective`] ([`CollectiveGather`]),
//! reducing gradients with the reduction that matches the loss ([`reduce_grads`], [`GradReduction`]), and
//! one optimizer step ([`DataParallelStep::train_step`]: zero grads → loss → backward with the bucketed
//! all-reduce overlapped → clipping → AdamW at the scheduled lr).
//!
//! ## Which reduction equals single-process training on the concatenated batch
//!
//! Write θ for the parameters, rank r's batch slice as x_r, and the single-process loss on the concatenated
//! batch as L(θ). After the all-reduce every rank must hold ∂L/∂θ.
//!
//! **Per-sample / per-token losses** (the LM loss): L = Σ_r S_r / N, where S_r is the sum of rank r's
//! token losses and N the scored tokens of the *global* batch ([`global_count`]). Rank r back-propagates
//! S_r / N, whose gradient is exactly rank r's share, so the shares must be **summed**:
//! [`GradReduction::Sum`]. (Averaging would need S_r · W / N.)
//!
//! **The global CLIP loss** does not split into per-rank shares: L = L(f_0, …, f_{W−1}, s) depends on the
//! features f_q of every rank and on the logit scale s. libtorch through `tch` has no custom autograd
//! function, so [`CollectiveGather`] uses open_clip's construction: all-gather the features without
//! gradient and put this rank's own, gradient-carrying tensor back in its slot. Every rank then computes
//! the same value L, and its backward gives
//!
//! - ∂L/∂f_r · ∂f_r/∂θ for the parameters *before* the gather (the encoders and projections): only this
//!   rank's share — the shares must be **summed** over ranks;
//! - the full ∂L/∂s for the parameters used *after* the gather (`logit_scale`): identical on every rank — it
//!   must be **averaged**, a sum counts it W times.
//!
//! No single reduction fits both, so the bare construction (selected with [`GatherGrad::Local`]) is only
//! exact when nothing after the gather is trained. [`GatherGrad::AllRanks`] (the default) fixes this inside
//! the gather: the local slot is `f + (f − f.detach())·(W − 1)`, bit for bit the value f but with gradient
//! W·∂L/∂f_r. Because every rank computes the same L, W·∂L/∂f_r is exactly the gradient that
//! `torch.distributed.nn.all_gather` gives (its backward sums the slot's gradient over the ranks), so the
//! pre-gather parameters receive W × their share and the post-gather ones the full gradient, and
//! [`GradReduction::Mean`] — DDP's average, as in the reference — gives ∂L/∂θ for every parameter. With
//! `local_loss` the ranks compute different losses and this shortcut does not hold: use the global loss.
//!
//! `worker/tests/data_parallel.rs` checks both cases against one process on the whole batch (3 AdamW steps
//! with weight decay and clipping) and shows that the other reduction measurably differs.
//!
//! ## The step's own scalars
//!
//! Besides the gradients, a step reduces a few host values: the global counts (scored tokens, masked samples)
//! and the logged loss parts. They are built with [`Collective::scalars`], on the collective's device, so that
//! NCCL reduces them in place ([`global_sums`]); a LaMed step needs two such reductions
//! ([`DataParallelStep::train_step_lamed`]). `worker/tests/collective_device.rs` drives LaMed steps through a
//! collective that refuses what NCCL refuses.
//!
//! ## Host waits
//!
//! On a GPU the host only queues kernels; every read of a device value back to the host waits for all of them.
//! A step reads as little as it can: the micro-batches' losses (and a LaMed step's Dice and BCE) are summed on
//! the device and read in one copy with the gradient norm, after the reduction, so the host queues micro-batch
//! i + 1 while the GPU still runs micro-batch i's backward; a batch whose ids and masks were checked on the
//! host ([`DataParallelStep::train_step_lamed_checked`], `M3dClip::forward_loss_checked`) is not read back in
//! the forward pass either. What is left per step: the two scalar reductions of a LaMed step (counts, logged
//! loss parts: a copy to the collective's device, the all-reduce, a copy back each), the gradient norm (which
//! the logged loss is read with), and the collective's own waits (NCCL waits for each operation, bucket by
//! bucket, with its watchdog — on the communication thread when overlapping).
//!
//! ## Overlapping the all-reduce with the backward pass
//!
//! DDP starts reducing a bucket while the backward pass still computes earlier layers' gradients. So does this
//! step (`StepOptions::overlap`, the recipe's `train.overlap_grad_reduce`, on when there is more than one
//! rank), with the same three pieces:
//!
//! - **Readiness.** `m3d-grad-hooks` puts a post-accumulate-grad hook on every trainable parameter (`tch` has
//!   none; the crate's C++ shim registers libtorch's own). Armed for the last micro-batch's backward pass only
//!   (the earlier ones only accumulate, as under DDP's `no_sync`), a hook reports its parameter's index the moment
//!   the gradient is final.
//! - **Bucket order.** The first step runs without overlap and records the order in which its gradients became
//!   final; rank 0's order (parameters its pass did not reach appended by index) is broadcast and the buckets are
//!   planned along it (DDP's bucket rebuild after its first iteration). So a bucket fills early, and every rank
//!   has the same buckets even where their graphs differ.
//! - **Reduction.** From the second step, a communication thread takes each reported gradient (f32; a bf16
//!   parameter's is added to the f32 sum of the earlier micro-batches, as `AdamW::accumulate_grads` does) and
//!   reduces bucket k as soon as it is full and buckets 0..k are done — the same sequence of collectives on every
//!   rank, the same buckets, so the result is the one the non-overlapped reduction gives with that plan, bit for
//!   bit. Parameters the pass will not reach (found by walking the loss's autograd graph, DDP's unused-parameter
//!   search) get their zero gradient through their hooks before it (DeepSpeed's zero fill), so that they do not
//!   hold their buckets back. On a GPU the copies are queued on the default stream after the
//!   accumulation, and NCCL's kernels run on their own stream behind an event (`m3d-collectives`' `Nccl`), so
//!   they run beside the backward kernels.
//!
//! [`StepOutput::buckets_during_backward`] counts the buckets whose reduction started before the backward pass
//! returned. `worker/tests/overlap.rs` checks that overlapped and plain steps give the same parameters bit for
//! bit, with bf16 parameters, accumulation and a parameter one rank does not reach, and that buckets really are
//! reduced during the backward pass.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;

use m3d_collectives::{Bucketer, Collective, CollectiveError, ReduceOp};
use m3d_grad_hooks::GradReadyHooks;
use m3d_models::clip::Gather;
use m3d_models::lamed::{Lamed, LamedBatch, LamedHostChecks};
use m3d_models::precision::Precision;
use tch::{Device, Kind, Tensor};

use crate::grad::{clip_grad_norm, token_sum_loss, GradError};
use crate::optim::{AdamW, OptimError, ReadyGrad};
use crate::schedule::LrSchedule;

/// Errors of a data-parallel step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("collective on rank {rank}: {source}")]
    Collective {
        rank: usize,
        #[source]
        source: CollectiveError,
    },
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Grad(#[from] GradError),
    #[error(transparent)]
    Model(#[from] m3d_models::ModelError),
    #[error(transparent)]
    Tch(#[from] tch::TchError),
    #[error("the loss is not a scalar: shape {0:?}")]
    NotScalar(Vec<i64>),
    #[error("overlapped gradient reduction: {0}")]
    Overlap(String),
}

fn coll(rank: usize) -> impl Fn(CollectiveError) -> StepError {
    move |source| StepError::Collective { rank, source }
}

/// How gradients are combined over the ranks (see the module docs for which loss needs which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradReduction {
    /// Sum of the ranks' gradients: each rank back-propagated its share of the global loss (the LM loss
    /// normalised by the global token count).
    Sum,
    /// Average of the ranks' gradients (DDP): each rank back-propagated the whole loss, or W × its share
    /// (the CLIP loss through [`CollectiveGather`] with [`GatherGrad::AllRanks`]).
    Mean,
}

impl From<GradReduction> for ReduceOp {
    fn from(r: GradReduction) -> ReduceOp {
        match r {
            GradReduction::Sum => ReduceOp::Sum,
            GradReduction::Mean => ReduceOp::Mean,
        }
    }
}

/// All-reduces `grads` in place through `bucketer` (planned over the same list, in the same order, on
/// every rank).
pub fn reduce_grads(
    comm: &mut dyn Collective,
    bucketer: &mut Bucketer,
    grads: &mut [Tensor],
    reduction: GradReduction,
) -> Result<(), StepError> {
    let rank = comm.rank();
    bucketer
        .all_reduce(comm, grads, reduction.into())
        .map_err(coll(rank))
}

/// The sums of `values` over the ranks, in one collective. The values go to the collective as
/// [`Collective::scalars`] (on its device: NCCL reduces them in place) and come back to the host. Exact for
/// integers up to 2^53.
pub fn global_sums(comm: &mut dyn Collective, values: &[f64]) -> Result<Vec<f64>, StepError> {
    let rank = comm.rank();
    let mut t = comm.scalars(values).map_err(coll(rank))?;
    comm.all_reduce(&mut t, ReduceOp::Sum).map_err(coll(rank))?;
    Ok(Vec::<f64>::try_from(&t.f_to_device(Device::Cpu)?)?)
}

/// The sum of a count over the ranks (e.g. the scored tokens of the global batch, [`GradReduction::Sum`]'s
/// normaliser for the LM loss). Exact up to 2^53.
pub fn global_count(comm: &mut dyn Collective, local: i64) -> Result<i64, StepError> {
    Ok(global_sums(comm, &[local as f64])?[0].round() as i64)
}

/// What gradient the local slot of a [`CollectiveGather`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GatherGrad {
    /// W·∂L/∂f_r, as `torch.distributed.nn.all_gather` when every rank computes the same loss: exact with
    /// [`GradReduction::Mean`] for every parameter.
    #[default]
    AllRanks,
    /// ∂L/∂f_r (open_clip without `gather_with_grad`): exact with [`GradReduction::Sum`] only when no
    /// parameter is used after the gather (M3D-CLIP's `logit_scale` is).
    Local,
}

/// [`Gather`] over a [`Collective`]: the other ranks' features without gradient, this rank's own tensor
/// in its slot (see the module docs).
///
/// [`Gather::all_gather`] cannot return an error; a failed collective is recorded, a placeholder of the
/// right shape returned (this rank's tensor repeated), and every later gather skipped. Call
/// [`CollectiveGather::finish`] after the loss: it returns the error, so a broken step is never applied.
pub struct CollectiveGather<'a> {
    comm: RefCell<&'a mut dyn Collective>,
    mode: GatherGrad,
    error: RefCell<Option<CollectiveError>>,
}

impl<'a> CollectiveGather<'a> {
    pub fn new(comm: &'a mut dyn Collective, mode: GatherGrad) -> Self {
        CollectiveGather {
            comm: RefCell::new(comm),
            mode,
            error: RefCell::new(None),
        }
    }

    /// The first collective error of any gather, if one failed.
    pub fn finish(self) -> Result<(), StepError> {
        let rank = self.comm.borrow().rank();
        match self.error.into_inner() {
            Some(e) => Err(StepError::Collective { rank, source: e }),
            None => Ok(()),
        }
    }
}

impl Gather for CollectiveGather<'_> {
    fn all_gather(&self, t: &Tensor) -> Tensor {
        let (rank, world) = {
            let c = self.comm.borrow();
            (c.rank() as i64, c.world_size() as i64)
        };
        if world == 1 {
            return t.shallow_clone();
        }
        let placeholder = || {
            t.repeat(
                [world]
                    .into_iter()
                    .chain(t.size().into_iter().skip(1).map(|_| 1))
                    .collect::<Vec<i64>>(),
            )
        };
        if self.error.borrow().is_some() {
            return placeholder();
        }
        let gathered = tch::no_grad(|| self.comm.borrow_mut().all_gather(&t.detach()));
        let gathered = match gathered {
            Ok(g) => g,
            Err(e) => {
                *self.error.borrow_mut() = Some(e);
                return placeholder();
            }
        };
        let b = t.size().first().copied().unwrap_or(1);
        let local = match self.mode {
            GatherGrad::Local => t.shallow_clone(),
            // Value: t + 0 = t exactly; gradient: 1 + (W - 1) = W.
            GatherGrad::AllRanks => t + (t - t.detach()) * (world - 1) as f64,
        };
        let mut parts = Vec::with_capacity(3);
        if rank > 0 {
            parts.push(gathered.narrow(0, 0, rank * b));
        }
        parts.push(local);
        if rank + 1 < world {
            parts.push(gathered.narrow(0, (rank + 1) * b, (world - rank - 1) * b));
        }
        Tensor::cat(&parts, 0)
    }

    fn rank(&self) -> i64 {
        self.comm.borrow().rank() as i64
    }

    fn world_size(&self) -> i64 {
        self.comm.borrow().world_size() as i64
    }
}

/// Settings of [`DataParallelStep`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOptions {
    pub reduction: GradReduction,
    /// Clip the reduced gradients to this total norm (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Gradient bucket size for the all-reduce.
    pub bucket_bytes: usize,
    /// Reduce each bucket while the backward pass computes the rest (see the module docs).
    pub overlap: bool,
}

impl StepOptions {
    /// The step a recipe's `train` section describes, for a loss that needs `reduction`.
    pub fn from_recipe(train: &m3d_recipes::TrainSection, reduction: GradReduction) -> Self {
        StepOptions {
            reduction,
            max_grad_norm: train.max_grad_norm,
            bucket_bytes: train.bucket_mb << 20,
            overlap: train.overlap_grad_reduce,
        }
    }
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions {
            reduction: GradReduction::Mean,
            max_grad_norm: Some(1.0),
            bucket_bytes: 25 << 20,
            overlap: true,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    /// This rank's loss (for the CLIP loss the same on every rank; for an LM share, this rank's share).
    pub loss: f64,
    /// The total gradient norm after the all-reduce, before clipping (the same on every rank).
    pub grad_norm: f64,
    pub lr: f64,
    /// Gradient buckets whose reduction started before the last backward pass returned (0 without overlap).
    pub buckets_during_backward: usize,
}

/// The gradient plan of one set of trainable parameters (replanned when the set changes).
struct Plan {
    names: Vec<String>,
    /// Post-accumulate-grad hooks on the parameters (with overlap, on more than one rank).
    hooks: Option<GradReadyHooks>,
    /// Planned on the first step, in the order its backward pass finished the gradients (rank 0's).
    buckets: Option<Bucketer>,
}

/// The training step of one rank; keeps the gradient buckets planned on the first step.
pub struct DataParallelStep {
    opts: StepOptions,
    plan: Option<Plan>,
}

impl std::fmt::Debug for DataParallelStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallelStep")
            .field("opts", &self.opts)
            .field(
                "buckets",
                &self
                    .plan
                    .as_ref()
                    .and_then(|p| p.buckets.as_ref())
                    .map(Bucketer::len),
            )
            .finish_non_exhaustive()
    }
}

/// The last backward pass of a step, how it ran.
enum LastBackward {
    /// Plain: the gradients are reduced afterwards.
    Plain,
    /// Hooks armed to learn the order in which the gradients become final (first step).
    Learn(Vec<usize>),
    /// Buckets reduced as they filled: the reduced gradients, and how many buckets started during the backward.
    Overlapped(Vec<Tensor>, usize),
}

impl DataParallelStep {
    pub fn new(opts: StepOptions) -> Self {
        DataParallelStep { opts, plan: None }
    }

    pub fn options(&self) -> &StepOptions {
        &self.opts
    }

    /// The buckets' parameter names, in reduction order, once planned (after the first step).
    pub fn bucket_layout(&self) -> Option<Vec<Vec<String>>> {
        let plan = self.plan.as_ref()?;
        let buckets = plan.buckets.as_ref()?;
        Some(
            buckets
                .layout()
                .into_iter()
                .map(|b| b.into_iter().map(|i| plan.names[i].clone()).collect())
                .collect(),
        )
    }

    /// One optimizer step `step` (0-based): zero the gradients, `loss_fn` (given the collective, for
    /// gathering or global counts) → backward → all-reduce the trainable gradients in buckets
    /// ([`StepOptions::reduction`]) → clip → AdamW at `schedule.lr(step)`.
    pub fn train_step<F>(
        &mut self,
        comm: &mut dyn Collective,
        opt: &mut AdamW,
        schedule: &LrSchedule,
        step: u64,
        loss_fn: F,
    ) -> Result<StepOutput, StepError>
    where
        F: FnOnce(&mut dyn Collective) -> Result<Tensor, StepError>,
    {
        let mut once = Some(loss_fn);
        self.train_step_accum(comm, opt, schedule, step, 1, |comm, _| match once.take() {
            Some(f) => f(comm),
            None => unreachable!("one micro-batch"),
        })
    }

    /// [`DataParallelStep::train_step`] over `micro_batches` accumulated micro-batches: `loss_fn(comm, i)` is
    /// called and back-propagated for each `i`, the gradients add up, and one all-reduce and one update
    /// follow. The losses must be normalised for the sum (e.g. the LM loss over the global token count, see
    /// [`crate::grad`]); [`StepOutput::loss`] is their sum.
    pub fn train_step_accum<F>(
        &mut self,
        comm: &mut dyn Collective,
        opt: &mut AdamW,
        schedule: &LrSchedule,
        step: u64,
        micro_batches: usize,
        loss_fn: F,
    ) -> Result<StepOutput, StepError>
    where
        F: FnMut(&mut dyn Collective, usize) -> Result<Tensor, StepError>,
    {
        let (out, _) =
            self.accumulate_and_update(comm, opt, schedule, step, micro_batches, loss_fn, || {
                Ok(None)
            })?;
        Ok(out)
    }

    /// The plan for `opt`'s parameters, made anew when they changed.
    fn plan_for(&mut self, opt: &AdamW, world: usize) -> Result<&mut Plan, StepError> {
        let params = opt.params();
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
        if self.plan.as_ref().is_some_and(|p| p.names != names) {
            // Old hooks go first: a parameter keeps one post-accumulate-grad hook.
            self.plan = None;
        }
        if self.plan.is_some() {
            return self
                .plan
                .as_mut()
                .ok_or_else(|| StepError::Overlap("no plan".into()));
        }
        let hooks = if self.opts.overlap && world > 1 {
            let tensors: Vec<Tensor> = params.into_iter().map(|(_, t)| t).collect();
            Some(GradReadyHooks::install(&tensors).map_err(|e| StepError::Overlap(e.to_string()))?)
        } else {
            None
        };
        Ok(self.plan.insert(Plan {
            names,
            hooks,
            buckets: None,
        }))
    }

    /// [`DataParallelStep::train_step_accum`], also reading `extra()` (a 1-d f64 tensor on the loss's device,
    /// called after the last backward) back to the host in the same copy as the loss: the values come back
    /// second.
    #[allow(clippy::too_many_arguments)]
    fn accumulate_and_update<F, E>(
        &mut self,
        comm: &mut dyn Collective,
        opt: &mut AdamW,
        schedule: &LrSchedule,
        step: u64,
        micro_batches: usize,
        mut loss_fn: F,
        extra: E,
    ) -> Result<(StepOutput, Vec<f64>), StepError>
    where
        F: FnMut(&mut dyn Collective, usize) -> Result<Tensor, StepError>,
        E: FnOnce() -> Result<Option<Tensor>, StepError>,
    {
        let rank = comm.rank();
        let reduction = self.opts.reduction;
        let bucket_bytes = self.opts.bucket_bytes;
        opt.zero_grad();
        let plan = self.plan_for(opt, comm.world_size())?;
        // The losses are summed on the device, in f64 and in order (what adding their host values did), and
        // read once below: a read per micro-batch would make the host wait for each backward pass before it
        // queues the next forward.
        let mut loss_sum: Option<Tensor> = None;
        let last = micro_batches.max(1) - 1;
        let mut how = LastBackward::Plain;
        for i in 0..=last {
            let loss = loss_fn(comm, i)?;
            if loss.numel() != 1 {
                return Err(StepError::NotScalar(loss.size()));
            }
            how = match (&plan.hooks, &mut plan.buckets) {
                (Some(hooks), Some(buckets)) if i == last => {
                    overlapped_backward(&loss, comm, opt, hooks, buckets, reduction)?
                }
                (Some(hooks), None) if i == last => {
                    let _armed = hooks.arm();
                    let done = loss.f_backward();
                    let fired = hooks.disarm();
                    done?;
                    LastBackward::Learn(fired.order)
                }
                _ => {
                    loss.f_backward()?;
                    LastBackward::Plain
                }
            };
            let value = loss.f_detach()?.f_to_kind(Kind::Double)?.f_reshape([1])?;
            let sum = match loss_sum.take() {
                Some(sum) => sum,
                None => Tensor::f_zeros([1], (Kind::Double, value.device()))?,
            };
            loss_sum = Some(sum.f_add(&value)?);
        }
        let extra = extra()?;
        let mut during = 0;
        let grads: Vec<Tensor> = if let LastBackward::Overlapped(reduced, n) = how {
            opt.set_grads(reduced)?;
            during = n;
            opt.grads().into_iter().map(|(_, g)| g).collect()
        } else {
            // Every trainable parameter takes part, used by this rank's batch or not: the same buckets on
            // every rank.
            opt.fill_missing_grads()?;
            let mut grads: Vec<Tensor> = opt.grads().into_iter().map(|(_, g)| g).collect();
            if grads.len() != plan.names.len() {
                return Err(StepError::Overlap(format!(
                    "{} gradients for {} trainable parameters",
                    grads.len(),
                    plan.names.len()
                )));
            }
            let buckets = match (&mut plan.buckets, how) {
                (Some(b), _) => b,
                (slot, LastBackward::Learn(fired)) => {
                    let order = agreed_order(comm, fired, grads.len())?;
                    let b =
                        Bucketer::with_order(&grads, &order, bucket_bytes).map_err(coll(rank))?;
                    slot.insert(b)
                }
                (slot, _) => {
                    let b = Bucketer::new(&grads, bucket_bytes).map_err(coll(rank))?;
                    slot.insert(b)
                }
            };
            reduce_grads(comm, buckets, &mut grads, reduction)?;
            grads
        };
        let grad_norm = match self.opts.max_grad_norm {
            Some(max) => clip_grad_norm(&grads, max)?,
            None => crate::grad::total_norm(&grads)?
                .map(|t| t.double_value(&[]))
                .unwrap_or(0.0),
        };
        // Read right after the gradient norm, which waited for the GPU: this copy waits for nothing more.
        let mut values = match (loss_sum, extra) {
            (Some(loss), Some(extra)) => {
                let extra = extra.f_to_kind(Kind::Double)?.f_to_device(loss.device())?;
                let both = Tensor::f_cat(&[loss, extra], 0)?;
                Vec::<f64>::try_from(&both.f_to_device(Device::Cpu)?)?
            }
            (Some(loss), None) => Vec::<f64>::try_from(&loss.f_to_device(Device::Cpu)?)?,
            (None, _) => vec![0.0],
        };
        let loss_value = values.remove(0);
        let lr = schedule.lr(step);
        opt.step(lr)?;
        Ok((
            StepOutput {
                loss: loss_value,
                grad_norm,
                lr,
                buckets_during_backward: during,
            },
            values,
        ))
    }
}

/// The bucket order every rank uses: rank 0's order of final gradients (the parameters its backward pass did
/// not reach last, by index), broadcast, so that ranks whose graphs differed (a batch without masks) agree.
fn agreed_order(
    comm: &mut dyn Collective,
    fired: Vec<usize>,
    count: usize,
) -> Result<Vec<usize>, StepError> {
    let rank = comm.rank();
    let mut order = fired;
    let mut seen = vec![false; count];
    order.retain(|&i| i < count && !std::mem::replace(&mut seen[i], true));
    order.extend((0..count).filter(|&i| !seen[i]));
    // Indices are exact in f64 (far below 2^53).
    let values: Vec<f64> = order.iter().map(|&i| i as f64).collect();
    let mut t = comm.scalars(&values).map_err(coll(rank))?;
    comm.broadcast(&mut t, 0).map_err(coll(rank))?;
    let agreed = Vec::<f64>::try_from(&t.f_to_device(Device::Cpu)?)?;
    Ok(agreed.into_iter().map(|v| v as usize).collect())
}

/// The last backward pass with the buckets reduced as they fill: a communication thread takes each gradient as
/// its hook reports it final and reduces bucket k once all of its gradients are in and buckets 0..k are done
/// (the planned order, the same on every rank). Parameters the pass did not reach get zero gradients through
/// their hooks after it. Gives the reduced gradients, in the parameters' order.
fn overlapped_backward(
    loss: &Tensor,
    comm: &mut dyn Collective,
    opt: &AdamW,
    hooks: &GradReadyHooks,
    buckets: &mut Bucketer,
    reduction: GradReduction,
) -> Result<LastBackward, StepError> {
    let rank = comm.rank();
    let sources = opt.ready_grads();
    let unreached = hooks
        .unreached_by(loss)
        .map_err(|e| StepError::Overlap(e.to_string()))?;
    let backward_done = AtomicBool::new(false);
    let ready = hooks.arm();
    let (backward, fired, reduced) = std::thread::scope(|s| {
        let backward_done = &backward_done;
        let reducer = s.spawn(move || {
            reduce_as_ready(comm, buckets, &sources, ready, reduction, backward_done)
        });
        // The parameters this pass will not reach get their zero gradients first, so that their buckets are
        // not held back until the end (DDP marks them ready at the start too).
        let backward = opt
            .backward_zero_through(&unreached)
            .map_err(StepError::from)
            .and_then(|()| loss.f_backward().map_err(StepError::from))
            .and_then(|()| {
                backward_done.store(true, Ordering::Release);
                // None, unless a hook was missed: then its zero gradient completes the buckets.
                opt.backward_zero_through(&hooks.not_fired())
                    .map_err(StepError::from)
            });
        // Closes the channel: the reducer ends, with an error if some bucket never filled.
        let fired = hooks.disarm();
        (backward, fired, reducer.join())
    });
    backward?;
    let (grads, during) = reduced.map_err(|_| {
        StepError::Overlap(format!(
            "rank {rank}: the gradient reduction thread panicked"
        ))
    })??;
    if let Some(i) = fired.repeated {
        return Err(StepError::Overlap(format!(
            "parameter `{}` accumulated a second gradient after it was reduced (a second backward pass in one \
             step?)",
            sources_name(opt, i)
        )));
    }
    Ok(LastBackward::Overlapped(grads, during))
}

fn sources_name(opt: &AdamW, i: usize) -> String {
    opt.params()
        .get(i)
        .map(|(n, _)| n.clone())
        .unwrap_or_else(|| format!("#{i}"))
}

/// The communication thread of [`overlapped_backward`].
fn reduce_as_ready(
    comm: &mut dyn Collective,
    buckets: &mut Bucketer,
    sources: &[ReadyGrad],
    ready: Receiver<usize>,
    reduction: GradReduction,
    backward_done: &AtomicBool,
) -> Result<(Vec<Tensor>, usize), StepError> {
    let rank = comm.rank();
    let layout = buckets.layout();
    let mut bucket_of = vec![usize::MAX; sources.len()];
    for (b, members) in layout.iter().enumerate() {
        for &i in members {
            if let Some(slot) = bucket_of.get_mut(i) {
                *slot = b;
            }
        }
    }
    let mut pending: Vec<usize> = layout.iter().map(Vec::len).collect();
    let mut grads: Vec<Tensor> = sources.iter().map(|_| Tensor::new()).collect();
    let (mut next, mut during) = (0, 0);
    while next < layout.len() {
        let i = ready.recv().map_err(|_| {
            let missing: Vec<&str> = layout[next..]
                .iter()
                .flatten()
                .filter(|&&i| !grads[i].defined())
                .map(|&i| sources[i].name())
                .collect();
            StepError::Overlap(format!(
                "rank {rank}: the backward pass ended without finishing the gradients of {missing:?}"
            ))
        })?;
        let b = bucket_of.get(i).copied().unwrap_or(usize::MAX);
        if b == usize::MAX {
            return Err(StepError::Overlap(format!(
                "rank {rank}: no bucket holds parameter #{i}"
            )));
        }
        grads[i] = sources[i].take()?;
        pending[b] -= 1;
        while next < layout.len() && pending[next] == 0 {
            if !backward_done.load(Ordering::Acquire) {
                during += 1;
            }
            buckets
                .reduce_bucket(next, comm, &mut grads, reduction.into())
                .map_err(coll(rank))?;
            next += 1;
        }
    }
    Ok((grads, during))
}

/// This rank's share of a LaMed step ([`DataParallelStep::train_step_lamed`]).
pub struct LamedStepInput<'a> {
    pub model: &'a Lamed,
    pub precision: Precision,
    /// The accumulated micro-batches and their labels.
    pub micro: &'a [(LamedBatch, Tensor)],
    /// Scored tokens in this rank's micro-batches.
    pub tokens: i64,
    /// This rank's samples with a non-empty mask (segmentation).
    pub masked: i64,
}

/// What a LaMed step did, over the global batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LamedStepOutput {
    /// `loss`: the global loss (the sum of the ranks' shares), the same on every rank.
    pub step: StepOutput,
    /// Scored tokens of the global batch.
    pub tokens: i64,
    /// Dice and BCE, means over the global batch's masked samples (when it has any and the model segments).
    pub seg: Option<[f64; 2]>,
}

impl DataParallelStep {
    /// One LaMed step ([`GradReduction::Sum`]): the LM loss normalised by the global count of scored tokens, and
    /// Dice and BCE weighted by each micro-batch's share of the global masked samples (the reference's per-batch
    /// means, independent of how the batch is split), accumulated over the micro-batches. Two scalar reductions
    /// besides the gradients: the counts before, the logged loss and seg parts after.
    pub fn train_step_lamed(
        &mut self,
        comm: &mut dyn Collective,
        opt: &mut AdamW,
        schedule: &LrSchedule,
        step: u64,
        input: LamedStepInput<'_>,
    ) -> Result<LamedStepOutput, StepError> {
        self.lamed_step(comm, opt, schedule, step, input, None)
    }

    /// [`DataParallelStep::train_step_lamed`] of micro-batches checked on the host (`checks[i]` for
    /// `input.micro[i]`, see `Lamed::forward_checked`): the same values, without reading anything back from
    /// the device in the forward passes.
    pub fn train_step_lamed_checked(
        &mut self,
        comm: &mut dyn Collective,
        opt: &mut AdamW,
        schedule: &LrSchedule,
        step: u64,
        input: LamedStepInput<'_>,
        checks: &[LamedHostChecks],
    ) -> Result<LamedStepOutput, StepError> {
        if checks.len() != input.micro.len() {
            return Err(StepError::Model(m3d_models::ModelError::Input(format!(
                "{} host checks for {} micro-batches",
                checks.len(),
                input.micro.len()
            ))));
        }
        self.lamed_step(comm, opt, schedule, step, input, Some(checks))
    }

    fn lamed_step(
        &mut self,
        comm: &mut dyn Collective,
        opt: &mut AdamW,
        schedule: &LrSchedule,
        step: u64,
        input: LamedStepInput<'_>,
        checks: Option<&[LamedHostChecks]>,
    ) -> Result<LamedStepOutput, StepError> {
        let LamedStepInput {
            model,
            precision,
            micro,
            tokens,
            masked,
        } = input;
        let segments = model.config().seg.is_some();
        let counts = global_sums(
            comm,
            &[tokens as f64, if segments { masked as f64 } else { 0.0 }],
        )?;
        let (tokens, masked) = (counts[0].round() as i64, counts[1].round() as i64);
        // This rank's shares of the global Dice and BCE means, summed on the device in f64 (as the host values
        // were) and read with the loss.
        let parts: RefCell<Option<Tensor>> = RefCell::new(None);
        let (mut out, seg_parts) = self.accumulate_and_update(
            comm,
            opt,
            schedule,
            step,
            micro.len(),
            |_, i| {
                let (b, labels) = &micro[i];
                let out = precision.run(|| match checks.and_then(|c| c.get(i)) {
                    Some(c) => model.forward_checked(b, c, true),
                    None => model.forward_t(b, true),
                })?;
                let lm = token_sum_loss(&out.logits, labels, tokens.max(1))?;
                Ok(match &out.seg {
                    Some(seg) if masked > 0 => {
                        let share = seg.sample_ids.len() as f64 / masked as f64;
                        let part =
                            Tensor::f_stack(&[seg.dice.f_detach()?, seg.bce.f_detach()?], 0)?
                                .f_to_kind(Kind::Double)?
                                .f_mul_scalar(share)?;
                        let mut acc = parts.borrow_mut();
                        let sum = match acc.take() {
                            Some(sum) => sum,
                            None => Tensor::f_zeros([2], (Kind::Double, part.device()))?,
                        };
                        *acc = Some(sum.f_add(&part)?);
                        lm + (&seg.dice + &seg.bce) * share
                    }
                    _ => lm,
                })
            },
            || Ok(parts.borrow_mut().take()),
        )?;
        let [dice, bce] = match seg_parts[..] {
            [dice, bce] => [dice, bce],
            _ => [0.0, 0.0],
        };
        // Each rank holds its share of the global loss and of the seg means: the logged values are their sums.
        let sums = global_sums(comm, &[out.loss, dice, bce])?;
        out.loss = sums[0];
        Ok(LamedStepOutput {
            step: out,
            tokens,
            seg: (masked > 0).then_some([sums[1], sums[2]]),
        })
    }
}
