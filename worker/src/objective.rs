//! Training objectives: what one step of each model optimises, behind one trait ([`Objective`]) with an
//! implementation per model — [`ClipContrastive`] (M3D-CLIP's contrastive loss over the features gathered from
//! every rank), [`LamedLm`] (LaMed's LM loss) and [`LamedLmSeg`] (LM + Dice + BCE of the segmentation module).
//!
//! An objective says how its batches are built from loaded samples ([`Objective::build`], run ahead of the step
//! on the round's batch thread), which gradient reduction its loss needs ([`Objective::reduction`], see
//! [`crate::step`]) and how one data-parallel step runs on a batch ([`Objective::step`]). The round's loop
//! ([`crate::train`]) is generic over it and knows no model: a new model or loss is a new implementation here
//! and one arm in [`crate::train::run_round`]'s choice of objective.

use m3d_collectives::Collective;
use m3d_data::loader::LoadedSample;
use m3d_models::clip::M3dClip;
use m3d_models::lamed::{Lamed, LamedBatch, LamedHostChecks};
use m3d_models::precision::Precision;
use tch::Tensor;

use crate::job::{Batcher, ClipBatch, JobError};
use crate::optim::AdamW;
use crate::schedule::LrSchedule;
use crate::step::{
    CollectiveGather, DataParallelStep, GatherGrad, GradReduction, LamedStepInput, StepError,
    StepOutput,
};

/// What one optimizer step of an objective did.
#[derive(Debug, Clone, PartialEq)]
pub struct Stepped {
    pub out: StepOutput,
    /// Scored tokens of the global batch (0 for objectives without tokens to score).
    pub tokens: u64,
    /// The objective's own metrics for the step (global values), written beside the loss.
    pub metrics: Vec<(&'static str, f64)>,
}

/// A training objective (see the module docs).
pub trait Objective {
    /// This rank's share of one step, built ahead of it (already on the training device).
    type Batch: Send;

    /// How the ranks' gradients combine for this loss.
    fn reduction(&self) -> GradReduction;

    /// Builds this rank's `samples` of one step (of `epoch`) into a batch of micro-batches of at most `micro`
    /// samples. Runs on the batch thread, so it takes the batcher, not the objective (which holds the model).
    fn build(
        batcher: &Batcher,
        samples: &[(u64, LoadedSample)],
        epoch: u64,
        micro: usize,
    ) -> Result<Self::Batch, JobError>;

    /// `batch` as whole-batch tensors by the reference collators' names (`images`, `input_ids`,
    /// `attention_mask`, `labels`, `segs`; micro-batches concatenated), for [`crate::record`].
    fn record(batch: &Self::Batch) -> Result<Vec<(&'static str, Tensor)>, StepError>;

    /// One optimizer step `step` on `batch`: the loss over the global batch, backward with the gradient
    /// reduction, clipping and AdamW at the scheduled rate (through `stepper`).
    fn step(
        &self,
        stepper: &mut DataParallelStep,
        comm: &mut dyn Collective,
        opt: &mut AdamW,
        schedule: &LrSchedule,
        step: u64,
        batch: Self::Batch,
    ) -> Result<Stepped, StepError>;
}

/// M3D-CLIP's loss (`LaMed/src/model/CLIP.py`): image and text features gathered from every rank, the
/// cross-entropy of the similarity matrix in both directions. [`GradReduction::Mean`] with the all-ranks gather
/// gradient (see [`crate::step`]).
pub struct ClipContrastive<'a> {
    pub model: &'a M3dClip,
    pub precision: Precision,
}

impl Objective for ClipContrastive<'_> {
    type Batch = ClipBatch;

    fn reduction(&self) -> GradReduction {
        GradReduction::Mean
    }

    fn build(
        batcher: &Batcher,
        samples: &[(u64, LoadedSample)],
        _epoch: u64,
        _micro: usize,
    ) -> Result<ClipBatch, JobError> {
        batcher.clip_batch(samples)
    }

    fn record(b: &ClipBatch) -> Result<Vec<(&'static str, Tensor)>, StepError> {
        Ok(vec![
            ("images", b.images.shallow_clone()),
            ("input_ids", b.input_ids.shallow_clone()),
            ("attention_mask", b.attention_mask.shallow_clone()),
        ])
    }

    fn step(
        &self,
        stepper: &mut DataParallelStep,
        comm: &mut dyn Collective,
        opt: &mut AdamW,
        schedule: &LrSchedule,
        step: u64,
        b: ClipBatch,
    ) -> Result<Stepped, StepError> {
        let out = stepper.train_step(comm, opt, schedule, step, |comm| {
            let gather = CollectiveGather::new(comm, GatherGrad::AllRanks);
            let loss = self.precision.run(|| {
                self.model.forward_loss_checked(
                    &b.images,
                    &b.input_ids,
                    &b.attention_mask,
                    &b.checked,
                    &gather,
                    true,
                )
            });
            gather.finish()?;
            Ok(loss?)
        })?;
        Ok(Stepped {
            out,
            tokens: 0,
            metrics: Vec::new(),
        })
    }
}

/// A LaMed batch: the micro-batches with their labels, what was checked on the host for each, the scored
/// tokens and the samples with a non-empty mask.
pub struct LamedMicroBatches {
    pub micro: Vec<(LamedBatch, Tensor)>,
    /// Each micro-batch's host checks: its forward pass reads nothing back from the device.
    pub checks: Vec<LamedHostChecks>,
    pub tokens: i64,
    pub masked: i64,
}

fn build_lamed(
    batcher: &Batcher,
    samples: &[(u64, LoadedSample)],
    epoch: u64,
    micro: usize,
) -> Result<LamedMicroBatches, JobError> {
    let mut out = LamedMicroBatches {
        micro: Vec::new(),
        checks: Vec::new(),
        tokens: 0,
        masked: 0,
    };
    for chunk in samples.chunks(micro.max(1)) {
        let mut built = batcher.lamed_batch(chunk, epoch)?;
        out.tokens += built.scored;
        out.masked += built.masked;
        let labels = built.batch.labels.take().ok_or_else(|| JobError::Recipe {
            field: "model.kind".into(),
            reason: "a LaMed batch without labels".into(),
        })?;
        out.micro.push((built.batch, labels));
        out.checks.push(built.checks);
    }
    Ok(out)
}

fn record_lamed(b: &LamedMicroBatches) -> Result<Vec<(&'static str, Tensor)>, StepError> {
    // One field of every micro-batch, concatenated (absent when a micro-batch lacks it).
    let cat = |name: &'static str| -> Result<Option<(&'static str, Tensor)>, StepError> {
        let parts: Vec<Tensor> = b
            .micro
            .iter()
            .filter_map(|(m, labels)| match name {
                "images" => Some(m.images.shallow_clone()),
                "input_ids" => Some(m.input_ids.shallow_clone()),
                "attention_mask" => m.attention_mask.as_ref().map(Tensor::shallow_clone),
                "labels" => Some(labels.shallow_clone()),
                _ => m.segs.as_ref().map(Tensor::shallow_clone),
            })
            .collect();
        Ok((parts.len() == b.micro.len() && !parts.is_empty())
            .then(|| Tensor::f_cat(&parts, 0))
            .transpose()?
            .map(|t| (name, t)))
    };
    let mut out = Vec::new();
    for name in ["images", "input_ids", "attention_mask", "labels", "segs"] {
        out.extend(cat(name)?);
    }
    Ok(out)
}

/// One LaMed step: the LM loss normalised by the global batch's scored tokens ([`GradReduction::Sum`]), plus
/// Dice + BCE when the model segments (see [`DataParallelStep::train_step_lamed`]).
#[allow(clippy::too_many_arguments)]
fn lamed_step(
    model: &Lamed,
    precision: Precision,
    stepper: &mut DataParallelStep,
    comm: &mut dyn Collective,
    opt: &mut AdamW,
    schedule: &LrSchedule,
    step: u64,
    b: LamedMicroBatches,
) -> Result<(Stepped, Option<[f64; 2]>), StepError> {
    let o = stepper.train_step_lamed_checked(
        comm,
        opt,
        schedule,
        step,
        LamedStepInput {
            model,
            precision,
            micro: &b.micro,
            tokens: b.tokens,
            masked: b.masked,
        },
        &b.checks,
    )?;
    let stepped = Stepped {
        out: o.step,
        tokens: o.tokens.max(0) as u64,
        metrics: Vec::new(),
    };
    Ok((stepped, o.seg))
}

/// M3D-LaMed's language-modelling loss (`LamedLlamaForCausalLM.forward` without masks): HF's causal-LM
/// cross-entropy over the answer tokens.
pub struct LamedLm<'a> {
    pub model: &'a Lamed,
    pub precision: Precision,
}

impl Objective for LamedLm<'_> {
    type Batch = LamedMicroBatches;

    fn reduction(&self) -> GradReduction {
        GradReduction::Sum
    }

    fn build(
        batcher: &Batcher,
        samples: &[(u64, LoadedSample)],
        epoch: u64,
        micro: usize,
    ) -> Result<LamedMicroBatches, JobError> {
        build_lamed(batcher, samples, epoch, micro)
    }

    fn record(b: &LamedMicroBatches) -> Result<Vec<(&'static str, Tensor)>, StepError> {
        record_lamed(b)
    }

    fn step(
        &self,
        stepper: &mut DataParallelStep,
        comm: &mut dyn Collective,
        opt: &mut AdamW,
        schedule: &LrSchedule,
        step: u64,
        b: LamedMicroBatches,
    ) -> Result<Stepped, StepError> {
        let (stepped, _) = lamed_step(
            self.model,
            self.precision,
            stepper,
            comm,
            opt,
            schedule,
            step,
            b,
        )?;
        Ok(stepped)
    }
}

/// M3D-LaMed's loss with its segmentation module: the LM loss plus Dice and BCE of SegVol's masks for the
/// samples that have one (weights 1, as the reference), logged as `seg_dice` / `seg_bce`. Batches as
/// [`LamedLm`]'s (with masks).
pub struct LamedLmSeg<'a>(pub LamedLm<'a>);

impl Objective for LamedLmSeg<'_> {
    type Batch = LamedMicroBatches;

    fn reduction(&self) -> GradReduction {
        self.0.reduction()
    }

    fn build(
        batcher: &Batcher,
        samples: &[(u64, LoadedSample)],
        epoch: u64,
        micro: usize,
    ) -> Result<LamedMicroBatches, JobError> {
        LamedLm::build(batcher, samples, epoch, micro)
    }

    fn record(b: &LamedMicroBatches) -> Result<Vec<(&'static str, Tensor)>, StepError> {
        LamedLm::record(b)
    }

    fn step(
        &self,
        stepper: &mut DataParallelStep,
        comm: &mut dyn Collective,
        opt: &mut AdamW,
        schedule: &LrSchedule,
        step: u64,
        b: LamedMicroBatches,
    ) -> Result<Stepped, StepError> {
        let lm = &self.0;
        let (mut stepped, seg) = lamed_step(
            lm.model,
            lm.precision,
            stepper,
            comm,
            opt,
            schedule,
            step,
            b,
        )?;
        if let Some([dice, bce]) = seg {
            stepped.metrics = vec![("seg_dice", dice), ("seg_bce", bce)];
        }
        Ok(stepped)
    }
}
