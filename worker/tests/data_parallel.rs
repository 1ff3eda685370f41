//! Data-parallel training equals one process on the concatenated batch: two ranks (threads joined by the
//! TCP ring on loopback), each on its contiguous half of a fixed batch, end three AdamW steps (weight
//! decay, clipping) with the parameters of one rank trained on the whole batch — for M3D-CLIP's global
//! contrastive loss (gathered features, `GradReduction::Mean` with `GatherGrad::AllRanks`) and for a LoRA
//! Llama with the LM loss normalised by the global scored-token count (`GradReduction::Sum`). The wrong
//! reductions are shown to differ, on the gradients and on the trained parameters.

mod common;

use std::sync::{Mutex, MutexGuard};

use common::{max_diff, two_ranks, Named};
use m3d_collectives::Collective;
use m3d_models::clip::{M3dClip, M3dClipConfig};
use m3d_models::lamed::IGNORE_INDEX;
use m3d_models::llama::LlamaConfig;
use m3d_models::llm::{CausalLm, LlmConfig};
use m3d_models::lora::{freeze_base, LoraConfig};
use m3d_models::{weights, VarBuilder};
use m3d_worker::grad::{count_scored_tokens, token_sum_loss};
use m3d_worker::optim::{AdamW, AdamWConfig};
use m3d_worker::schedule::{LrSchedule, Shape};
use m3d_worker::step::{
    global_count, reduce_grads, CollectiveGather, DataParallelStep, GatherGrad, GradReduction,
    StepError, StepOptions,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const STEPS: u64 = 3;

/// libtorch's default generator is global and the two tests run in parallel: whatever draws from it
/// (seeding and generating the inputs, and building models, whose random init is then overwritten) holds
/// this lock, so each test's inputs depend on its seed alone.
static RNG: Mutex<()> = Mutex::new(());

fn rng_lock() -> MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn deep_copy(v: &[(String, Tensor)]) -> Named {
    v.iter().map(|(n, t)| (n.clone(), t.copy())).collect()
}

/// Overwrites every variable of `vs` with the value of the same name in `init`.
fn load(vs: &VarStore, init: &[(String, Tensor)]) {
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let (_, src) = init.iter().find(|(n, _)| *n == name).unwrap();
            var.copy_(src);
        }
    });
}

/// Every variable, sorted by name, copied.
fn params(vs: &VarStore) -> Named {
    let mut v: Named = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Largest difference relative to each tensor's own scale, floored at 1e-4 of the largest value overall:
/// gradients that are zero in exact arithmetic (attention key biases: softmax ignores a constant shift)
/// hold only rounding noise, which has no scale of its own.
fn max_rel_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    let global = b
        .iter()
        .map(|(_, y)| y.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    a.iter()
        .zip(b)
        .map(|((n, x), (m, y))| {
            assert_eq!(n, m);
            let d = (x - y).abs().max().double_value(&[]);
            d / y.abs().max().double_value(&[]).max(1e-4 * global)
        })
        .fold(0.0, f64::max)
}

fn bit_equal(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
    a.iter().zip(b).all(|((n, x), (m, y))| n == m && x.equal(y))
}

/// One rank's world on `input`.
fn one_rank<I, T>(input: I, f: impl Fn(&mut dyn Collective, I) -> T) -> T {
    common::one_rank(|comm| f(comm, input))
}

/// This rank's contiguous slice of a global batch.
fn slice(t: &Tensor, comm: &dyn Collective) -> Tensor {
    let per = t.size()[0] / comm.world_size() as i64;
    t.narrow(0, comm.rank() as i64 * per, per)
}

fn optimizer(vs: &VarStore) -> AdamW {
    let mut opt = AdamW::new(AdamWConfig::default());
    opt.add_group("all", 0.1, AdamW::trainable(vs)).unwrap();
    opt
}

fn schedule(lr: f64) -> LrSchedule {
    LrSchedule::new(Shape::Cosine, lr, 10, 0.0)
}

// ---------------------------------------------------------------------------------------------- CLIP

/// Initial weights and the global batch (2B = 4 samples).
struct ClipInputs {
    init: Named,
    images: Tensor,
    ids: Tensor,
    mask: Tensor,
}

impl ClipInputs {
    fn new() -> Self {
        let _rng = rng_lock();
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let _ = M3dClip::new(&VarBuilder::new(&vs), &M3dClipConfig::debug()).unwrap();
        let mut init = weights::state_dict(&vs);
        init.sort_by(|a, b| a.0.cmp(&b.0));
        let images = Tensor::randn([4, 1, 8, 16, 16], (Kind::Float, Device::Cpu));
        let ids = Tensor::randint_low(1, 99, [4, 8], (Kind::Int64, Device::Cpu));
        let mask = Tensor::ones([4, 8], (Kind::Int64, Device::Cpu));
        // Different text lengths (padding masked out).
        let _ = mask.get(1).narrow(0, 5, 3).fill_(0);
        let _ = mask.get(2).narrow(0, 3, 5).fill_(0);
        ClipInputs {
            init,
            images,
            ids,
            mask,
        }
    }

    fn copy(&self) -> Self {
        ClipInputs {
            init: deep_copy(&self.init),
            images: self.images.copy(),
            ids: self.ids.copy(),
            mask: self.mask.copy(),
        }
    }
}

fn clip_model(init: &[(String, Tensor)]) -> (VarStore, M3dClip) {
    let vs = VarStore::new(Device::Cpu);
    let clip = {
        let _rng = rng_lock();
        M3dClip::new(&VarBuilder::new(&vs), &M3dClipConfig::debug()).unwrap()
    };
    load(&vs, init);
    // BERT's key biases get no gradient in exact arithmetic (softmax ignores a shift that is the same for
    // every key), only rounding noise of ~1e-9, which Adam (eps 1e-8) turns into steps of ~lr/10 that
    // depend on the summation order. Freezing them keeps the comparison about real gradients.
    for (name, t) in vs.variables() {
        if name.ends_with("attention.self.key.bias") {
            let _ = t.set_requires_grad(false);
        }
    }
    (vs, clip)
}

fn clip_loss(
    comm: &mut dyn Collective,
    clip: &M3dClip,
    data: &ClipInputs,
    mode: GatherGrad,
) -> Result<Tensor, StepError> {
    let (images, ids, mask) = (
        slice(&data.images, comm),
        slice(&data.ids, comm),
        slice(&data.mask, comm),
    );
    let gather = CollectiveGather::new(comm, mode);
    let loss = clip.forward_loss(&images, &ids, &mask, &gather, false)?;
    gather.finish()?;
    Ok(loss)
}

/// The reduced gradients of one backward from the initial weights.
fn clip_grads(
    comm: &mut dyn Collective,
    data: ClipInputs,
    mode: GatherGrad,
    reduction: GradReduction,
) -> Named {
    let (vs, clip) = clip_model(&data.init);
    let mut opt = optimizer(&vs);
    clip_loss(comm, &clip, &data, mode).unwrap().backward();
    let (names, mut grads): (Vec<String>, Vec<Tensor>) = opt.grads().into_iter().unzip();
    let mut bucketer = m3d_collectives::Bucketer::new(&grads, 1 << 16).unwrap();
    reduce_grads(comm, &mut bucketer, &mut grads, reduction).unwrap();
    names
        .into_iter()
        .zip(grads)
        .map(|(n, g)| (n, g.copy()))
        .collect()
}

/// Clip norm of the CLIP runs: between the gradient norms of the steps (about 5.3, 3.3, 3.8 here), so
/// the right runs are clipped on some steps and not on others; a gradient scaled per tensor by a constant
/// then changes the trained weights (with clipping on every step or never, Adam's per-parameter
/// normalisation would hide it).
const CLIP_MAX_NORM: f64 = 3.5;

/// The parameters after [`STEPS`] steps and the gradient norm of each step.
fn clip_train(
    comm: &mut dyn Collective,
    data: ClipInputs,
    mode: GatherGrad,
    reduction: GradReduction,
) -> (Named, Vec<f64>) {
    let (vs, clip) = clip_model(&data.init);
    let mut opt = optimizer(&vs);
    let mut dp = DataParallelStep::new(StepOptions {
        reduction,
        max_grad_norm: Some(CLIP_MAX_NORM),
        bucket_bytes: 1 << 16,
        overlap: true,
    });
    let norms = (0..STEPS)
        .map(|step| {
            dp.train_step(comm, &mut opt, &schedule(1e-3), step, |c| {
                clip_loss(c, &clip, &data, mode)
            })
            .unwrap()
            .grad_norm
        })
        .collect();
    (params(&vs), norms)
}

#[test]
fn clip_two_ranks_equal_one_rank_with_twice_the_batch() {
    let data = ClipInputs::new();
    let m = GatherGrad::AllRanks;

    // Gradients of one step: the reduced two-rank gradient is the single-process gradient.
    let single = one_rank(data.copy(), |c, d| clip_grads(c, d, m, GradReduction::Mean));
    let grads = |mode, red| {
        two_ranks([data.copy(), data.copy()], |c, d| {
            clip_grads(c, d, mode, red)
        })
    };
    let dp = grads(m, GradReduction::Mean);
    assert!(bit_equal(&dp[0], &dp[1]), "ranks disagree on the gradients");
    let d = max_rel_diff(&dp[0], &single);
    eprintln!("CLIP gradients, AllRanks + Mean vs one rank: max rel diff {d:e}");
    assert!(d <= 1e-5, "gradients differ by {d:e}");
    // open_clip's bare construction: Sum is right for the encoders but counts logit_scale twice; Mean
    // halves the encoders' gradients.
    for red in [GradReduction::Sum, GradReduction::Mean] {
        let wrong = grads(GatherGrad::Local, red);
        let d = max_rel_diff(&wrong[0], &single);
        eprintln!("CLIP gradients, Local + {red:?} vs one rank: max rel diff {d:e}");
        assert!(d > 0.4, "Local + {red:?} should differ, got {d:e}");
    }

    // Training: 3 AdamW steps with weight decay and clipping.
    let (single, norms) = one_rank(data.copy(), |c, d| clip_train(c, d, m, GradReduction::Mean));
    assert!(
        norms.iter().any(|&n| n > CLIP_MAX_NORM) && norms.iter().any(|&n| n < CLIP_MAX_NORM),
        "the clip norm should clip some steps only: {norms:?}"
    );
    let train = |mode, red| {
        two_ranks([data.copy(), data.copy()], |c, d| {
            clip_train(c, d, mode, red)
        })
    };
    let dp: Vec<Named> = train(m, GradReduction::Mean)
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert!(
        bit_equal(&dp[0], &dp[1]),
        "ranks disagree on the parameters"
    );
    let d = max_diff(&dp[0], &single);
    eprintln!("CLIP parameters after {STEPS} steps, two ranks vs one: max abs diff {d:e}");
    assert!(d <= 1e-5, "parameters differ by {d:e}");
    let moved = max_diff(&single, &data.init);
    assert!(
        moved > 1e-3,
        "training did not move the parameters ({moved:e})"
    );
    // open_clip's bare construction with DDP's Mean halves the encoders' gradients against logit_scale's;
    // its gradient norm stays under the clip norm, so the steps are weighted differently and the trained
    // weights differ. (Its Sum is wrong only in logit_scale's gradient, by a constant factor 2 that Adam's
    // per-parameter normalisation hides while the clip coefficient hardly moves: only the gradient check
    // above catches it.)
    let wrong = train(GatherGrad::Local, GradReduction::Mean);
    let d = max_diff(&wrong[0].0, &single);
    eprintln!("CLIP parameters, Local + Mean: max abs diff {d:e}");
    assert!(d > 1e-4, "Local + Mean should not match, got {d:e}");
}

// ---------------------------------------------------------------------------------------------- LoRA LM

struct LmInputs {
    init: Named,
    ids: Tensor,
    labels: Tensor,
}

impl LmInputs {
    fn new() -> Self {
        let _rng = rng_lock();
        tch::manual_seed(5);
        let (vs, _) = build_lm();
        let mut init = weights::state_dict(&vs);
        init.sort_by(|a, b| a.0.cmp(&b.0));
        let ids = Tensor::randint_low(3, 128, [4, 12], (Kind::Int64, Device::Cpu));
        let labels = ids.copy();
        // Rank 0's half scores 2 tokens per sequence, rank 1's 11 (prompt masked).
        let _ = labels.narrow(0, 0, 2).narrow(1, 0, 10).fill_(IGNORE_INDEX);
        LmInputs { init, ids, labels }
    }

    fn copy(&self) -> Self {
        LmInputs {
            init: deep_copy(&self.init),
            ids: self.ids.copy(),
            labels: self.labels.copy(),
        }
    }
}

/// The LoRA Llama with its random init (the caller holds [`rng_lock`]).
fn build_lm() -> (VarStore, CausalLm) {
    let vs = VarStore::new(Device::Cpu);
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        target_regex: None,
        exclude: Vec::new(),
        use_rslora: false,
    };
    let lm = CausalLm::new(
        &VarBuilder::new(&vs).with_lora(Some(lora)),
        &LlmConfig::Llama(LlamaConfig::debug()),
    )
    .unwrap();
    (vs, lm)
}

/// The LoRA Llama with the weights `init` and only the adapters trainable.
fn lm_model(init: &[(String, Tensor)]) -> (VarStore, CausalLm) {
    let (vs, lm) = {
        let _rng = rng_lock();
        build_lm()
    };
    load(&vs, init);
    freeze_base(&vs, &[]);
    (vs, lm)
}

/// `global_norm`: normalise by the global scored-token count (right with Sum); otherwise by this rank's
/// own count (each rank's HF loss, averaged by Mean: the mean of the halves' means).
fn lm_train(
    comm: &mut dyn Collective,
    data: LmInputs,
    reduction: GradReduction,
    global_norm: bool,
) -> Named {
    let (vs, lm) = lm_model(&data.init);
    let mut opt = optimizer(&vs);
    assert!(opt.group_params(0).iter().all(|n| n.contains(".lora_")));
    let mut dp = DataParallelStep::new(StepOptions {
        reduction,
        max_grad_norm: Some(0.5),
        bucket_bytes: 1 << 16,
        overlap: true,
    });
    let (ids, labels) = (slice(&data.ids, comm), slice(&data.labels, comm));
    for step in 0..STEPS {
        dp.train_step(comm, &mut opt, &schedule(1e-3), step, |c| {
            let local = count_scored_tokens(&labels);
            let n = global_count(c, local)?;
            assert_eq!(n, 2 * 2 + 2 * 11);
            let n = if global_norm { n } else { local };
            let logits = lm.forward(&ids, None, None, false)?;
            Ok(token_sum_loss(&logits, &labels, n)?)
        })
        .unwrap();
    }
    params(&vs)
}

#[test]
fn lora_llm_two_ranks_equal_one_rank() {
    let data = LmInputs::new();
    let single = one_rank(data.copy(), |c, d| lm_train(c, d, GradReduction::Sum, true));
    let dp = two_ranks([data.copy(), data.copy()], |c, d| {
        lm_train(c, d, GradReduction::Sum, true)
    });
    assert!(
        bit_equal(&dp[0], &dp[1]),
        "ranks disagree on the parameters"
    );
    let d = max_diff(&dp[0], &single);
    eprintln!("LoRA LM parameters after {STEPS} steps, two ranks vs one: max abs diff {d:e}");
    assert!(d <= 1e-5, "parameters differ by {d:e}");
    let lora_moved = single
        .iter()
        .zip(&data.init)
        .filter(|((n, _), _)| n.contains(".lora_B."))
        .map(|((_, a), (_, b))| (a - b).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(lora_moved > 1e-3, "LoRA B did not train ({lora_moved:e})");
    let base_moved = single
        .iter()
        .zip(&data.init)
        .filter(|((n, _), _)| !n.contains(".lora_"))
        .map(|((_, a), (_, b))| (a - b).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert_eq!(base_moved, 0.0, "a frozen base weight moved");
    // DDP's usual recipe (each rank's own mean, averaged) weighs rank 0's 4 tokens like rank 1's 22.
    let naive = two_ranks([data.copy(), data.copy()], |c, d| {
        lm_train(c, d, GradReduction::Mean, false)
    });
    let d = max_diff(&naive[0], &single);
    eprintln!("LoRA LM parameters, per-rank means averaged: max abs diff {d:e}");
    assert!(
        d > 1e-4,
        "the mean of per-rank means should not match, got {d:e}"
    );
}

// ------------------------------------------------------------------------------ parameters a rank leaves out

/// A head only some samples reach (LaMed's segmentation module, for a batch without masks): when rank 1's half
/// of the batch does not reach it, both ranks still all-reduce the same buckets and end with the parameters one
/// rank trained on the whole batch ends with (the head's gradient comes from rank 0 alone).
#[test]
fn a_parameter_one_rank_does_not_use_still_trains_identically() {
    let _g = rng_lock();
    tch::manual_seed(7);
    let build = || {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let body = tch::nn::linear(&root / "body", 4, 4, Default::default());
        let head = tch::nn::linear(&root / "head", 4, 1, Default::default());
        (vs, body, head)
    };
    let init = params(&build().0);
    let x = Tensor::randn([4, 4], (Kind::Float, Device::Cpu));
    // Samples 0 and 1 (rank 0's half) reach the head; 2 and 3 (rank 1's) do not.
    let reaches = [true, true, false, false];
    drop(_g);
    // Tensors are not `Sync`: each rank gets its own copies of the weights and the batch.
    let input = |rows: Vec<usize>| (rows, deep_copy(&init), x.copy());
    let run = |comm: &mut dyn Collective, (rows, init, x): (Vec<usize>, Named, Tensor)| -> Named {
        // `build` draws a random init (overwritten by `load`): under the lock, or it shifts the draws of a
        // test running beside this one.
        let (vs, body, head) = {
            let _g = rng_lock();
            build()
        };
        load(&vs, &init);
        let mut opt = optimizer(&vs);
        let mut stepper = DataParallelStep::new(StepOptions {
            reduction: GradReduction::Sum,
            ..StepOptions::default()
        });
        for step in 0..STEPS {
            stepper
                .train_step(comm, &mut opt, &schedule(1e-2), step, |_| {
                    let mut terms = Vec::new();
                    for &r in &rows {
                        let h = tch::nn::Module::forward(&body, &x.narrow(0, r as i64, 1)).tanh();
                        terms.push(h.square().sum(Kind::Float) / 4.0);
                        if reaches[r] {
                            terms.push(tch::nn::Module::forward(&head, &h).sum(Kind::Float) / 4.0);
                        }
                    }
                    let loss = Tensor::stack(&terms, 0).sum(Kind::Float);
                    Ok(loss)
                })
                .unwrap();
        }
        params(&vs)
    };
    let whole = one_rank(input(vec![0, 1, 2, 3]), run);
    let halves = two_ranks([input(vec![0, 1]), input(vec![2, 3])], run);
    for p in &halves {
        assert!(max_diff(&whole, p) < 1e-6, "{}", max_diff(&whole, p));
    }
    assert!(max_diff(&init, &whole) > 1e-4, "the head and body trained");
}
