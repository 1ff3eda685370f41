//! Activation checkpointing (`train.activation_checkpointing`) gives the gradients the plain model gives: M3D-LaMed
//! (LoRA with dropout on the decoder layers, the vision tower, SegVol's image encoder) and M3D-CLIP (ViT blocks and
//! BERT layers, dropout on), f32 on the CPU, one training step each way from the same weights and seed.
//!
//! Tolerance 1e-6 relative to each gradient's largest entry: the recomputation runs the same kernels on the same
//! values (dropout replays the forward's RNG state), so the only difference is the order in which a parameter's
//! gradient contributions are summed, which moves f32 values by a few ulps (~1e-7 relative).

use m3d_models::builder::VarBuilder;
use m3d_models::clip::{M3dClip, M3dClipConfig, SingleProcess};
use m3d_models::lamed::{Lamed, LamedBatch, LamedConfig, IGNORE_INDEX};
use m3d_models::lora::LoraConfig;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Every parameter's gradient after `step` (zeroed before), by name.
fn grads_of(vs: &VarStore, step: impl FnOnce() -> Tensor) -> Vec<(String, Tensor)> {
    for (_, v) in vs.variables() {
        let mut g = v.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    step().backward();
    let mut out: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, v)| v.requires_grad())
        .map(|(k, v)| {
            let g = v.grad();
            (k, if g.defined() { g.copy() } else { g })
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn assert_same_grads(plain: &[(String, Tensor)], ckpt: &[(String, Tensor)]) -> usize {
    assert_eq!(plain.len(), ckpt.len());
    let mut compared = 0;
    for ((name, p), (name2, c)) in plain.iter().zip(ckpt) {
        assert_eq!(name, name2);
        assert_eq!(
            p.defined(),
            c.defined(),
            "{name}: gradient on one side only"
        );
        if !p.defined() {
            continue;
        }
        let scale = p.abs().max().double_value(&[]);
        let d = (p - c).abs().max().double_value(&[]);
        assert!(
            d <= 1e-6 * scale.max(1e-12),
            "{name}: gradients differ by {d:e} (scale {scale:e})"
        );
        compared += usize::from(scale > 0.0);
    }
    compared
}

#[test]
fn lamed_gradients_are_the_same_with_checkpointing() {
    let cfg = LamedConfig::debug();
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        target_regex: None,
        exclude: vec!["vision_tower".into(), "seg_module".into()],
        use_rslora: false,
    };
    let vs = VarStore::new(Device::Cpu);
    tch::manual_seed(0);
    let mut model = Lamed::new(&VarBuilder::new(&vs).with_lora(Some(lora)), &cfg).unwrap();
    // Fresh LoRA B is zero, which would hide the adapters' share of the gradients.
    tch::no_grad(|| {
        for (k, v) in vs.variables() {
            if k.contains("lora_B") {
                v.detach().copy_(&(v.randn_like() * 0.05));
            }
        }
    });

    let (b, t) = (3, 16);
    let n_img = cfg.num_image_tokens();
    let g = |shape: &[i64], lo: i64, hi: i64| {
        Tensor::randint_low(lo, hi, shape, (Kind::Int64, Device::Cpu))
    };
    tch::manual_seed(1);
    let words = g(&[b, t], 3, 128);
    let ids = words.copy();
    let _ = ids.narrow(1, 0, 1).fill_(1);
    let _ = ids.narrow(1, 1, n_img).fill_(cfg.tokens.im_patch);
    let _ = ids.narrow(1, t - 4, 1).fill_(cfg.tokens.seg);
    let labels = ids.copy();
    let _ = labels.narrow(1, 0, 1 + n_img + 2).fill_(IGNORE_INDEX);
    let mask = Tensor::ones([b, t], (Kind::Int64, Device::Cpu));
    let _ = mask.get(2).narrow(0, t - 3, 3).fill_(0);
    let img = cfg.vision.img_size;
    let images = Tensor::randn([b, 1, img[0], img[1], img[2]], (Kind::Float, Device::Cpu));
    let segs = Tensor::rand([b, 1, img[0], img[1], img[2]], (Kind::Float, Device::Cpu))
        .gt(0.6)
        .to_kind(Kind::Float);
    let _ = segs.get(1).zero_();
    let batch = LamedBatch {
        images,
        input_ids: ids,
        attention_mask: Some(mask),
        labels: Some(labels),
        segs: Some(segs),
    };

    let step = |m: &Lamed| {
        tch::manual_seed(7);
        let out = m.forward_t(&batch, true).unwrap();
        out.loss.unwrap()
    };
    let plain = grads_of(&vs, || step(&model));
    model.set_activation_checkpointing(true);
    let ckpt = grads_of(&vs, || step(&model));
    let compared = assert_same_grads(&plain, &ckpt);
    assert!(compared > 40, "only {compared} gradients were non-zero");
}

#[test]
fn clip_gradients_are_the_same_with_checkpointing() {
    let mut cfg = M3dClipConfig::debug();
    cfg.text.hidden_dropout_prob = 0.1;
    cfg.text.attention_probs_dropout_prob = 0.1;
    cfg.vision.dropout_rate = 0.1;
    let vs = VarStore::new(Device::Cpu);
    tch::manual_seed(0);
    let mut clip = M3dClip::new(&VarBuilder::new(&vs), &cfg).unwrap();
    let b = 4;
    let img = cfg.vision.img_size;
    tch::manual_seed(1);
    let images = Tensor::randn([b, 1, img[0], img[1], img[2]], (Kind::Float, Device::Cpu));
    let ids = Tensor::randint_low(1, cfg.text.vocab_size, [b, 12], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([b, 12], (Kind::Int64, Device::Cpu));
    let _ = mask.get(3).narrow(0, 8, 4).fill_(0);
    let step = |m: &M3dClip| {
        tch::manual_seed(7);
        m.forward_loss(&images, &ids, &mask, &SingleProcess, true)
            .unwrap()
    };
    let plain = grads_of(&vs, || step(&clip));
    clip.set_activation_checkpointing(true);
    let ckpt = grads_of(&vs, || step(&clip));
    let compared = assert_same_grads(&plain, &ckpt);
    assert!(compared > 20, "only {compared} gradients were non-zero");
}
