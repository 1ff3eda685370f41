//! The training step reads nothing back from the device in its forward passes when its batches were checked on
//! the host (issue 12, throughput): the token ids (range, `<im_patch>` slots) and which samples have a mask are
//! known where the batch is built, before it goes to the GPU. These tests show, on the CPU, that the checked
//! paths compute exactly what the device-checked ones do — forward values, losses, a LaMed step's update with
//! the losses and seg parts summed on the device — and refuse what those refuse.

mod common;

use std::sync::{Mutex, MutexGuard};

use common::{one_rank, Named};
use m3d_models::bert::BertConfig;
use m3d_models::clip::{M3dClip, M3dClipConfig, SingleProcess};
use m3d_models::lamed::{
    build_example, collate, Lamed, LamedBatch, LamedConfig, LamedHostChecks, IGNORE_INDEX,
};
use m3d_models::layers::CheckedIds;
use m3d_models::precision::Precision;
use m3d_models::{weights, ModelError, VarBuilder};
use m3d_worker::optim::{AdamW, AdamWConfig};
use m3d_worker::schedule::{LrSchedule, Shape};
use m3d_worker::step::{
    DataParallelStep, GradReduction, LamedStepInput, LamedStepOutput, StepOptions,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// libtorch's generator is global: tests that seed it and draw dropout masks run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A debug LaMed with segmentation and 4 samples (answers of different lengths, sample 2 without a mask).
struct Lamed4 {
    cfg: LamedConfig,
    init: Named,
    images: Tensor,
    segs: Tensor,
    ids: Tensor,
    attention: Tensor,
    labels: Tensor,
}

impl Lamed4 {
    fn new() -> Self {
        tch::manual_seed(23);
        let cfg = LamedConfig::debug();
        let vs = VarStore::new(Device::Cpu);
        let _model = Lamed::new(&VarBuilder::new(&vs), &cfg).unwrap();
        let mut init = weights::state_dict(&vs);
        init.sort_by(|a, b| a.0.cmp(&b.0));
        let (im, seg) = (cfg.tokens.im_patch, cfg.tokens.seg);
        let n = cfg.num_image_tokens() as usize;
        let q: Vec<i64> = std::iter::once(1)
            .chain(std::iter::repeat_n(im, n))
            .chain([9, 10])
            .collect();
        let answers: [&[i64]; 4] = [&[11, seg, 12], &[13, 14, 15, 16, seg], &[17], &[18, seg]];
        let examples: Vec<_> = answers
            .iter()
            .map(|a| {
                let full: Vec<i64> = q.iter().chain(a.iter()).copied().collect();
                build_example(&q, &full, q.len() + 7, 0, 2).unwrap()
            })
            .collect();
        let (ids, attention, labels) = collate(&examples, Device::Cpu).unwrap();
        let [d, h, w] = cfg.vision.img_size;
        let images = Tensor::randn([4, 1, d, h, w], (Kind::Float, Device::Cpu));
        let segs = Tensor::rand([4, 1, d, h, w], (Kind::Float, Device::Cpu))
            .gt(0.5)
            .to_kind(Kind::Float);
        let _ = segs.get(2).fill_(0);
        Lamed4 {
            cfg,
            init,
            images,
            segs,
            ids,
            attention,
            labels,
        }
    }

    fn model(&self) -> (VarStore, Lamed) {
        let vs = VarStore::new(Device::Cpu);
        let model = Lamed::new(&VarBuilder::new(&vs), &self.cfg).unwrap();
        tch::no_grad(|| {
            for (name, mut var) in vs.variables() {
                let (_, src) = self.init.iter().find(|(n, _)| *n == name).unwrap();
                var.copy_(src);
            }
        });
        (vs, model)
    }

    /// Samples `first..first + len` as a batch with labels, and their host checks.
    fn batch(&self, first: i64, len: i64) -> (LamedBatch, LamedHostChecks) {
        let rows = |t: &Tensor| t.narrow(0, first, len);
        let has_mask: Vec<bool> = (first..first + len)
            .map(|i| self.segs.get(i).ne(0.0).any().int64_value(&[]) != 0)
            .collect();
        let checks = LamedHostChecks::check(&self.cfg, &rows(&self.ids), Some(&has_mask)).unwrap();
        let batch = LamedBatch {
            images: rows(&self.images),
            input_ids: rows(&self.ids),
            attention_mask: Some(rows(&self.attention)),
            labels: Some(rows(&self.labels)),
            segs: Some(rows(&self.segs)),
        };
        (batch, checks)
    }
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.equal(b)
}

#[test]
fn checked_lamed_forward_equals_the_device_checked_one() {
    let _serial = serial();
    let data = Lamed4::new();
    let (_vs, model) = data.model();
    let (batch, checks) = data.batch(0, 4);
    assert_eq!(checks.seg_samples(), Some(&[0i64, 1, 3][..]));
    for train in [false, true] {
        // Dropout (seg_projector) draws from the generator: the same seed, the same draws.
        tch::manual_seed(5);
        let a = model.forward_t(&batch, train).unwrap();
        tch::manual_seed(5);
        let b = model.forward_checked(&batch, &checks, train).unwrap();
        assert!(same(&a.logits, &b.logits), "train {train}");
        assert!(same(&a.hidden, &b.hidden));
        assert!(same(a.loss.as_ref().unwrap(), b.loss.as_ref().unwrap()));
        let (sa, sb) = (a.seg.unwrap(), b.seg.unwrap());
        assert_eq!(sa.sample_ids, vec![0, 1, 3]);
        assert_eq!(sa.sample_ids, sb.sample_ids);
        assert!(same(&sa.logits, &sb.logits));
        assert!(same(&sa.dice, &sb.dice) && same(&sa.bce, &sb.bce));
    }
    // Without masks known on the host the samples are found on the device: the same ones.
    let unknown = LamedHostChecks::check(&data.cfg, &data.ids, None).unwrap();
    assert_eq!(unknown.seg_samples(), None);
    let c = model.forward_checked(&batch, &unknown, false).unwrap();
    assert_eq!(c.seg.unwrap().sample_ids, vec![0, 1, 3]);
}

#[test]
fn host_checks_refuse_what_the_device_checks_refuse() {
    let _serial = serial();
    let data = Lamed4::new();
    let (_vs, model) = data.model();
    let input = |e: ModelError| match e {
        ModelError::Input(m) => m,
        other => panic!("{other}"),
    };
    let vocab = data.cfg.llm.vocab_size();
    // An id outside the vocabulary, then a prompt whose image slots do not all hold <im_patch>.
    let out_of_range = data.ids.copy();
    let _ = out_of_range.get(1).get(9).fill_(vocab);
    let wrong_slot = data.ids.copy();
    let _ = wrong_slot.get(3).get(2).fill_(7);
    for (ids, want) in [
        (&out_of_range, "out of range"),
        (&wrong_slot, "must hold <im_patch>"),
    ] {
        let host = input(LamedHostChecks::check(&data.cfg, ids, None).unwrap_err());
        let batch = LamedBatch {
            images: data.images.shallow_clone(),
            input_ids: ids.shallow_clone(),
            attention_mask: None,
            labels: None,
            segs: None,
        };
        let device = input(model.forward_t(&batch, false).unwrap_err());
        assert!(
            host.contains(want) && device.contains(want),
            "{host} / {device}"
        );
        assert_eq!(host, device);
    }
    // Mask flags for another batch size; checks of other ids.
    let m = input(LamedHostChecks::check(&data.cfg, &data.ids, Some(&[true; 3])).unwrap_err());
    assert!(m.contains("3 mask flags for a batch of 4"), "{m}");
    let (batch, _) = data.batch(0, 4);
    let (_, two) = data.batch(0, 2);
    let m = input(model.forward_checked(&batch, &two, false).unwrap_err());
    assert!(m.contains("host checks were made for [2,"), "{m}");
    // Checks for another configuration (more image tokens).
    let mut other = data.cfg.clone();
    other.tokens.im_patch -= 1;
    let ids = data.ids.where_scalarother(
        &data.ids.ne(data.cfg.tokens.im_patch),
        other.tokens.im_patch,
    );
    let foreign = LamedHostChecks::check(&other, &ids, None).unwrap();
    let m = input(model.forward_checked(&batch, &foreign, false).unwrap_err());
    assert!(m.contains("<im_patch> tokens of id"), "{m}");
}

/// Two LaMed steps, two micro-batches of two samples, with or without host checks.
fn lamed_steps(data: &Lamed4, checked: bool) -> (Vec<LamedStepOutput>, Named) {
    one_rank(|comm| {
        let (vs, model) = data.model();
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.add_group("all", 0.1, AdamW::trainable(&vs)).unwrap();
        let schedule = LrSchedule::new(Shape::Cosine, 1e-3, 10, 0.0);
        let mut dp = DataParallelStep::new(StepOptions {
            reduction: GradReduction::Sum,
            max_grad_norm: Some(1.0),
            bucket_bytes: 1 << 16,
            overlap: true,
        });
        let mut micro = Vec::new();
        let mut checks = Vec::new();
        for first in [0, 2] {
            let (mut b, c) = data.batch(first, 2);
            let labels = b.labels.take().unwrap();
            micro.push((b, labels));
            checks.push(c);
        }
        let tokens = data
            .labels
            .ne(IGNORE_INDEX)
            .sum(Kind::Int64)
            .int64_value(&[]);
        let mut outs = Vec::new();
        for step in 0..2 {
            tch::manual_seed(100 + step as i64);
            let input = LamedStepInput {
                model: &model,
                precision: Precision::F32,
                micro: &micro,
                tokens,
                masked: 3,
            };
            let out = if checked {
                dp.train_step_lamed_checked(comm, &mut opt, &schedule, step, input, &checks)
            } else {
                dp.train_step_lamed(comm, &mut opt, &schedule, step, input)
            };
            outs.push(out.unwrap());
        }
        let mut params: Named = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        (outs, params)
    })
}

#[test]
fn checked_lamed_steps_equal_device_checked_ones() {
    let _serial = serial();
    let data = Lamed4::new();
    let (a, pa) = lamed_steps(&data, false);
    let (b, pb) = lamed_steps(&data, true);
    assert_eq!(a, b, "losses, gradient norms, seg parts bit for bit");
    assert!(a.iter().all(|o| o.seg.is_some() && o.step.loss.is_finite()));
    for ((n, x), (m, y)) in pa.iter().zip(&pb) {
        assert_eq!(n, m);
        assert!(same(x, y), "{n}");
    }
    // A wrong number of checks is an error, not a silent fallback.
    one_rank(|comm| {
        let (vs, model) = data.model();
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.add_group("all", 0.1, AdamW::trainable(&vs)).unwrap();
        let schedule = LrSchedule::new(Shape::Cosine, 1e-3, 10, 0.0);
        let (mut b, c) = data.batch(0, 2);
        let labels = b.labels.take().unwrap();
        let micro = vec![(b, labels)];
        let input = LamedStepInput {
            model: &model,
            precision: Precision::F32,
            micro: &micro,
            tokens: 10,
            masked: 2,
        };
        let mut dp = DataParallelStep::new(StepOptions::default());
        let err = dp
            .train_step_lamed_checked(comm, &mut opt, &schedule, 0, input, &[c.clone(), c])
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("2 host checks for 1 micro-batches"),
            "{err}"
        );
    });
}

#[test]
fn accumulated_loss_is_the_f64_sum_of_the_micro_batch_losses() {
    // Losses whose f32 values do not add exactly in f32: the step sums them in f64, in order, as the host did.
    let values = [0.1f32, 1e-8, 3.3, 7.25e-3];
    let want = values.iter().fold(0.0f64, |acc, &v| acc + v as f64);
    one_rank(|comm| {
        let w = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.add_group("w", 0.0, vec![("w".to_string(), w.shallow_clone())])
            .unwrap();
        let schedule = LrSchedule::new(Shape::Constant, 1e-3, 10, 0.0);
        let mut dp = DataParallelStep::new(StepOptions::default());
        let out = dp
            .train_step_accum(comm, &mut opt, &schedule, 0, values.len(), |_, i| {
                Ok(w.sum(Kind::Float) + values[i] as f64)
            })
            .unwrap();
        assert_eq!(out.loss.to_bits(), want.to_bits());
    });
}

#[test]
fn checked_clip_forward_equals_the_device_checked_one() {
    let _serial = serial();
    tch::manual_seed(3);
    let cfg = M3dClipConfig {
        text: BertConfig {
            vocab_size: 40,
            ..BertConfig::debug()
        },
        ..M3dClipConfig::debug()
    };
    let vs = VarStore::new(Device::Cpu);
    let clip = M3dClip::new(&VarBuilder::new(&vs), &cfg).unwrap();
    let [d, h, w] = cfg.vision.img_size;
    let images = Tensor::randn([3, 1, d, h, w], (Kind::Float, Device::Cpu));
    let ids = Tensor::randint(40, [3, 6], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([3, 6], (Kind::Int64, Device::Cpu));
    let checked = CheckedIds::check("BERT input_ids", &ids, 40).unwrap();
    assert_eq!(checked.shape(), [3, 6]);
    for train in [false, true] {
        tch::manual_seed(9);
        let a = clip
            .forward_t(&images, &ids, &mask, &SingleProcess, train)
            .unwrap();
        tch::manual_seed(9);
        let b = clip
            .forward_t_checked(&images, &ids, &mask, &checked, &SingleProcess, train)
            .unwrap();
        assert!(
            same(&a.loss, &b.loss) && same(&a.logits, &b.logits),
            "train {train}"
        );
        assert!(same(&a.image_features, &b.image_features));
        assert!(same(&a.text_features, &b.text_features));
    }
    // An id outside the vocabulary: the host check says what the device check says.
    let bad = ids.copy();
    let _ = bad.get(2).get(1).fill_(40);
    let host = CheckedIds::check("BERT input_ids", &bad, 40)
        .unwrap_err()
        .to_string();
    let device = clip
        .forward_t(&images, &bad, &mask, &SingleProcess, false)
        .unwrap_err()
        .to_string();
    assert!(host.contains("out of range [0, 40): min"), "{host}");
    assert_eq!(host, device);
    // Checks of other ids, or against a larger vocabulary, are refused.
    let short = CheckedIds::check("BERT input_ids", &ids.narrow(1, 0, 5), 40).unwrap();
    let wide = CheckedIds::check("BERT input_ids", &ids, 41).unwrap();
    for c in [&short, &wide] {
        let e = clip
            .forward_t_checked(&images, &ids, &mask, c, &SingleProcess, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("host checks were made for"), "{e}");
    }
}
