//! A LaMed step's own scalar reductions (the global counts of scored tokens and masked samples, the logged loss
//! and seg parts) reach the collective the way NCCL needs them: built on the collective's device.
//!
//! Before, the step built them as host f64 tensors (`Tensor::from_slice`) and NCCL refused every tensor not on its
//! GPU: every LaMed step failed on CUDA, each failure became a re-registration, until the restart budget was spent.
//! Now NCCL also stages host tensors (tested in `m3d-collectives`), and the step builds its scalars with
//! `Collective::scalars`, on `Collective::device`.
//!
//! [`DeviceStrict`] wraps a collective and refuses what NCCL refused: a tensor not on the device the collective
//! reports. On this CPU-only machine every tensor is on the CPU, so that check alone can never fail here (whether
//! `scalars` really puts a tensor on `Cuda(d)`, and NCCL's copies between host and device, need a GPU). To give the
//! test teeth on a CPU, the wrapper also refuses the other half of the old mistake: an f64 tensor that did not come
//! from `Collective::scalars` — it makes the scalars it hands out itself, keeps them (so their storage is not
//! reused), and refuses an f64 tensor whose storage it did not make. Gradients travel as f32/bf16 buckets, so a
//! step's only f64 tensors are its scalars: a `Tensor::from_slice(&[x])` reduced anywhere in the step is refused,
//! and the step fails. Two ranks (threads joined by the TCP ring) then train a tiny segmenting LaMed through the
//! wrapper and match one rank on the whole batch.

mod common;

use std::sync::Mutex;

use common::{max_diff, one_rank, two_ranks, Named};
use m3d_collectives::{Collective, CollectiveError, ReduceOp};
use m3d_models::lamed::{build_example, collate, Lamed, LamedBatch, LamedConfig, IGNORE_INDEX};
use m3d_models::precision::Precision;
use m3d_models::{weights, VarBuilder};
use m3d_worker::optim::{AdamW, AdamWConfig};
use m3d_worker::schedule::{LrSchedule, Shape};
use m3d_worker::step::{
    global_count, global_sums, DataParallelStep, GradReduction, LamedStepInput, LamedStepOutput,
    StepOptions,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const STEPS: u64 = 2;

/// A collective that refuses what NCCL (before it staged host tensors) refused; see the module docs.
struct DeviceStrict<'a> {
    inner: &'a mut dyn Collective,
    /// The scalars this wrapper made, kept alive so that their storage stays theirs.
    made: Mutex<Vec<Tensor>>,
}

impl<'a> DeviceStrict<'a> {
    fn new(inner: &'a mut dyn Collective) -> Self {
        DeviceStrict {
            inner,
            made: Mutex::new(Vec::new()),
        }
    }

    fn check(&self, t: &Tensor, op: &'static str) -> Result<(), CollectiveError> {
        let refuse = |detail: String| {
            Err(CollectiveError::UnsupportedTensor {
                rank: self.rank(),
                op,
                detail,
            })
        };
        if t.device() != self.device() {
            return refuse(format!(
                "tensor on {:?}; this collective takes tensors on {:?}",
                t.device(),
                self.device()
            ));
        }
        let made = self.made.lock().unwrap();
        if t.kind() == Kind::Double && !made.iter().any(|m| m.data_ptr() == t.data_ptr()) {
            return refuse(
                "an f64 tensor built on the host, not with Collective::scalars on the collective's device".into(),
            );
        }
        Ok(())
    }
}

impl Collective for DeviceStrict<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn device(&self) -> Device {
        self.inner.device()
    }

    fn scalars(&self, values: &[f64]) -> Result<Tensor, CollectiveError> {
        let t = self.inner.scalars(values)?;
        assert_eq!(t.device(), self.device(), "scalars are made on the device");
        self.made.lock().unwrap().push(t.shallow_clone());
        Ok(t)
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CollectiveError> {
        self.check(tensor, "all_reduce")?;
        self.inner.all_reduce(tensor, op)
    }

    fn all_gather(&mut self, tensor: &Tensor) -> Result<Tensor, CollectiveError> {
        self.check(tensor, "all_gather")?;
        self.inner.all_gather(tensor)
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        self.check(tensor, "broadcast")?;
        self.inner.broadcast(tensor, root)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.inner.barrier()
    }
}

#[test]
fn the_wrapper_refuses_host_built_scalars_and_takes_the_steps_own() {
    one_rank(|comm| {
        let mut strict = DeviceStrict::new(comm);
        // What the step did before: refused, as NCCL refused it on a GPU.
        let mut host = Tensor::from_slice(&[3.0f64]);
        let err = strict.all_reduce(&mut host, ReduceOp::Sum).unwrap_err();
        assert!(err.to_string().contains("built on the host"), "{err}");
        // What it does now.
        assert_eq!(global_count(&mut strict, 3).unwrap(), 3);
        assert_eq!(global_sums(&mut strict, &[1.0, 2.5]).unwrap(), [1.0, 2.5]);
        // Gradient buckets (f32) on the device pass.
        let mut g = Tensor::ones([4], (Kind::Float, strict.device()));
        strict.all_reduce(&mut g, ReduceOp::Sum).unwrap();
    });
}

/// Initial weights and the global batch: 4 samples, 3 of them with a mask, answers of different lengths (so the
/// ranks score different numbers of tokens).
struct Inputs {
    cfg: LamedConfig,
    init: Named,
    images: Tensor,
    segs: Tensor,
    ids: Tensor,
    attention: Tensor,
    labels: Tensor,
}

fn config() -> LamedConfig {
    let mut cfg = LamedConfig::debug();
    // Dropout draws per rank; without it one rank and two compare exactly.
    cfg.seg_projector_dropout = 0.0;
    cfg
}

impl Inputs {
    fn new() -> Self {
        tch::manual_seed(17);
        let cfg = config();
        let vs = VarStore::new(Device::Cpu);
        let _model = Lamed::new(&VarBuilder::new(&vs), &cfg).unwrap();
        let mut init = weights::state_dict(&vs);
        init.sort_by(|a, b| a.0.cmp(&b.0));
        let seg = cfg.tokens.seg;
        let q = [1i64, 128, 128, 128, 128, 9, 10];
        let answers: [&[i64]; 4] = [
            &[11, seg, 12],
            &[13, 14, 15, 16, seg],
            &[17],
            &[18, 19, seg],
        ];
        let examples: Vec<_> = answers
            .iter()
            .map(|a| {
                let full: Vec<i64> = q.iter().chain(a.iter()).copied().collect();
                build_example(&q, &full, 14, 0, 2).unwrap()
            })
            .collect();
        let (ids, attention, labels) = collate(&examples, Device::Cpu).unwrap();
        let images = Tensor::randn([4, 1, 8, 32, 32], (Kind::Float, Device::Cpu));
        let segs = Tensor::rand([4, 1, 8, 32, 32], (Kind::Float, Device::Cpu)).gt(0.5);
        // Sample 2 has no mask.
        let _ = segs.get(2).fill_(0);
        Inputs {
            cfg,
            init,
            images,
            segs,
            ids,
            attention,
            labels,
        }
    }

    fn copy(&self) -> Self {
        Inputs {
            cfg: self.cfg.clone(),
            init: self
                .init
                .iter()
                .map(|(n, t)| (n.clone(), t.copy()))
                .collect(),
            images: self.images.copy(),
            segs: self.segs.copy(),
            ids: self.ids.copy(),
            attention: self.attention.copy(),
            labels: self.labels.copy(),
        }
    }
}

/// Trains `STEPS` LaMed steps on this rank's contiguous share of the batch, one sample per micro-batch, through
/// [`DeviceStrict`]; returns each step's output and the final parameters.
fn train(comm: &mut dyn Collective, data: &Inputs) -> (Vec<LamedStepOutput>, Named) {
    let mut strict = DeviceStrict::new(comm);
    let vs = VarStore::new(Device::Cpu);
    let model = Lamed::new(&VarBuilder::new(&vs), &data.cfg).unwrap();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let (_, src) = data.init.iter().find(|(n, _)| *n == name).unwrap();
            var.copy_(src);
        }
    });
    let mut opt = AdamW::new(AdamWConfig::default());
    opt.add_group("all", 0.1, AdamW::trainable(&vs)).unwrap();
    let schedule = LrSchedule::new(Shape::Cosine, 1e-3, 10, 0.0);
    let mut dp = DataParallelStep::new(StepOptions {
        reduction: GradReduction::Sum,
        max_grad_norm: Some(1.0),
        bucket_bytes: 1 << 16,
        overlap: true,
    });
    let per = 4 / strict.world_size() as i64;
    let first = strict.rank() as i64 * per;
    let rows = |t: &Tensor, i: i64| t.narrow(0, first + i, 1);
    let micro: Vec<(LamedBatch, Tensor)> = (0..per)
        .map(|i| {
            (
                LamedBatch {
                    images: rows(&data.images, i),
                    input_ids: rows(&data.ids, i),
                    attention_mask: Some(rows(&data.attention, i)),
                    labels: None,
                    segs: Some(rows(&data.segs, i)),
                },
                rows(&data.labels, i),
            )
        })
        .collect();
    let tokens = micro
        .iter()
        .map(|(_, l)| l.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]))
        .sum();
    let masked = micro
        .iter()
        .map(|(b, _)| i64::from(b.segs.as_ref().unwrap().any().int64_value(&[]) != 0))
        .sum();
    let mut outs = Vec::new();
    for step in 0..STEPS {
        let input = LamedStepInput {
            model: &model,
            precision: Precision::F32,
            micro: &micro,
            tokens,
            masked,
        };
        let out = dp
            .train_step_lamed(&mut strict, &mut opt, &schedule, step, input)
            .unwrap_or_else(|e| panic!("step {step} on rank {}: {e}", strict.rank()));
        outs.push(out);
    }
    let mut params: Named = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    (outs, params)
}

#[test]
fn lamed_steps_reduce_their_scalars_on_the_collectives_device() {
    let data = Inputs::new();
    let (single, single_params) = one_rank(|c| train(c, &data));
    let dp = two_ranks([data.copy(), data.copy()], |c, d| train(c, &d));
    let want_tokens = data
        .labels
        .ne(IGNORE_INDEX)
        .sum(Kind::Int64)
        .int64_value(&[]);
    for (rank, (outs, params)) in dp.iter().enumerate() {
        for (step, (o, s)) in outs.iter().zip(&single).enumerate() {
            assert_eq!(o.tokens, want_tokens, "rank {rank} step {step}");
            assert_eq!(s.tokens, want_tokens);
            // Every rank logs the global values.
            assert_eq!(
                o.step.loss, dp[0].0[step].step.loss,
                "rank {rank} step {step}"
            );
            assert_eq!(o.seg, dp[0].0[step].seg);
            let rel = (o.step.loss - s.step.loss).abs() / s.step.loss.abs();
            assert!(
                rel < 1e-5,
                "step {step}: loss {} vs {}",
                o.step.loss,
                s.step.loss
            );
            let ([d, b], [sd, sb]) = (o.seg.expect("seg parts"), s.seg.expect("seg parts"));
            assert!(
                (d - sd).abs() < 1e-5 && (b - sb).abs() < 1e-5,
                "step {step}: seg {d} {b} vs {sd} {sb}"
            );
        }
        let d = max_diff(params, &single_params);
        eprintln!(
            "LaMed parameters after {STEPS} steps, rank {rank} of two vs one: max abs diff {d:e}"
        );
        assert!(d <= 1e-5, "parameters differ by {d:e}");
    }
    let moved = max_diff(&single_params, &data.init);
    assert!(moved > 1e-4, "the model did not train ({moved:e})");
}
