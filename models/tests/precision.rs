//! The bf16 modes: `Bf16Autocast` keeps f32 parameters and gradients while every Linear computes in bf16,
//! and lands close to the f32 result for each model; the autocast region nests and is restored.

use m3d_models::clip::{M3dClip, M3dClipConfig, SingleProcess};
use m3d_models::lamed::{Lamed, LamedBatch, LamedConfig};
use m3d_models::layers::Linear;
use m3d_models::llm::{CausalLm, LlmConfig};
use m3d_models::lora::LoraConfig;
use m3d_models::phi3::Phi3Config;
use m3d_models::precision::{autocast, autocast_kind, Precision};
use m3d_models::VarBuilder;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn cpu_f(dims: &[i64]) -> Tensor {
    Tensor::randn(dims, (Kind::Float, Device::Cpu))
}

/// Loss and flattened gradients in f32 and under bf16 autocast; asserts the autocast gradients are f32,
/// finite, and point the same way as the f32 ones.
fn compare(vs: &VarStore, loss: impl Fn() -> Tensor, what: &str) {
    let run = |p: Precision| {
        for t in vs.variables().values() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let l = p.run(&loss);
        l.backward();
        let mut names: Vec<String> = vs.variables().keys().cloned().collect();
        names.sort();
        let vars = vs.variables();
        let grads: Vec<Tensor> = names
            .iter()
            .filter_map(|n| {
                let g = vars[n].grad();
                g.defined().then(|| {
                    assert_eq!(
                        g.kind(),
                        Kind::Float,
                        "{what}: gradient of {n} is {:?}",
                        g.kind()
                    );
                    g.flatten(0, -1)
                })
            })
            .collect();
        (l.double_value(&[]), Tensor::cat(&grads, 0))
    };
    let (l32, g32) = run(Precision::F32);
    let (lbf, gbf) = run(Precision::Bf16Autocast);
    assert!(
        lbf.is_finite() && gbf.isfinite().all().int64_value(&[]) == 1,
        "{what}: non-finite"
    );
    let rel = (lbf - l32).abs() / l32.abs().max(1e-6);
    assert!(
        rel < 2e-2,
        "{what}: loss {lbf} under autocast vs {l32} in f32"
    );
    let cos = (&g32 * &gbf).sum(Kind::Double).double_value(&[])
        / (g32.norm().double_value(&[]) * gbf.norm().double_value(&[]));
    assert!(cos > 0.99, "{what}: gradient cosine {cos}");
    assert!(
        l32 != lbf,
        "{what}: autocast changed nothing, so it did not run in bf16"
    );
}

#[test]
fn linear_computes_in_the_autocast_kind_and_the_region_restores() {
    let vs = VarStore::new(Device::Cpu);
    let lin = Linear::new(&VarBuilder::new(&vs).pp("l"), 8, 4, true).unwrap();
    let x = cpu_f(&[2, 8]);
    assert_eq!(lin.forward(&x).kind(), Kind::Float);
    let inner = autocast(Some(Kind::BFloat16), || {
        assert_eq!(lin.forward(&x).kind(), Kind::BFloat16);
        autocast(None, || lin.forward(&x).kind())
    });
    assert_eq!(inner, Kind::Float);
    assert_eq!(autocast_kind(), None);
    let caught = std::panic::catch_unwind(|| autocast(Some(Kind::BFloat16), || panic!("inside")));
    assert!(caught.is_err());
    assert_eq!(
        autocast_kind(),
        None,
        "a panic inside the region must not leave autocast on"
    );
    assert_eq!(vs.variables()["l.weight"].kind(), Kind::Float);
    assert_eq!(
        "bf16-autocast".parse::<Precision>().unwrap(),
        Precision::Bf16Autocast
    );
    assert!("fp8"
        .parse::<Precision>()
        .unwrap_err()
        .to_string()
        .contains("fp8"));
}

#[test]
fn clip_under_autocast_is_close_to_f32() {
    tch::manual_seed(0);
    let cfg = M3dClipConfig::debug();
    let vs = VarStore::new(Device::Cpu);
    let model = M3dClip::new(&VarBuilder::new(&vs), &cfg).unwrap();
    let v = &cfg.vision;
    let images = cpu_f(&[3, 1, v.img_size[0], v.img_size[1], v.img_size[2]]);
    let ids = Tensor::randint_low(5, cfg.text.vocab_size, [3, 8], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([3, 8], (Kind::Int64, Device::Cpu));
    compare(
        &vs,
        || {
            model
                .forward_loss(&images, &ids, &mask, &SingleProcess, false)
                .unwrap()
        },
        "clip",
    );
}

#[test]
fn phi3_under_autocast_is_close_to_f32() {
    assert_eq!(compare_phi3(None, "phi3"), 0);
}

/// LoRA adapters under autocast: their f32 factors meet a bf16 activation (before, a dtype-mismatch panic in
/// libtorch), here on Phi-3's fused `qkv_proj` / `gate_up_proj` with LaMed's LoRA.
#[test]
fn lora_under_autocast_is_close_to_f32() {
    let adapters = compare_phi3(Some(LoraConfig::m3d_lamed()), "phi3 + lora");
    assert_eq!(
        adapters,
        2 * 4,
        "qkv_proj, o_proj, gate_up_proj, down_proj per layer"
    );
}

/// [`compare`] on the tiny Phi-3, optionally with LoRA adapters (given non-zero `lora_B`, so that they
/// contribute); returns the number of adapters.
fn compare_phi3(lora: Option<LoraConfig>, what: &str) -> usize {
    tch::manual_seed(0);
    let cfg = LlmConfig::Phi3(Phi3Config::debug());
    let vs = VarStore::new(Device::Cpu);
    let model = CausalLm::new(&VarBuilder::new(&vs).with_lora(lora), &cfg).unwrap();
    let mut adapters = 0;
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.contains(".lora_B.") {
                let _ = t.normal_(0.0, 0.02);
                adapters += 1;
            }
        }
    });
    let ids = Tensor::randint_low(3, cfg.vocab_size(), [2, 9], (Kind::Int64, Device::Cpu));
    compare(
        &vs,
        || {
            let logits = model.forward(&ids, None, None, false).unwrap();
            logits
                .to_kind(Kind::Float)
                .log_softmax(-1, Kind::Float)
                .narrow(2, 0, 7)
                .mean(Kind::Float)
        },
        what,
    );
    adapters
}

#[test]
fn lamed_under_autocast_is_close_to_f32() {
    tch::manual_seed(0);
    let cfg = LamedConfig::debug();
    let vs = VarStore::new(Device::Cpu);
    let model = Lamed::new(&VarBuilder::new(&vs), &cfg).unwrap();
    let (b, t, n) = (2, 16, cfg.num_image_tokens());
    let ids = Tensor::randint_low(3, 120, [b, t], (Kind::Int64, Device::Cpu));
    let _ = ids.narrow(1, 0, 1).fill_(1);
    let _ = ids.narrow(1, 1, n).fill_(cfg.tokens.im_patch);
    let _ = ids.narrow(1, 12, 1).fill_(cfg.tokens.seg);
    let labels = ids.copy();
    let _ = labels.narrow(1, 0, n + 1).fill_(-100);
    let v = &cfg.vision;
    let batch = LamedBatch {
        images: cpu_f(&[b, 1, v.img_size[0], v.img_size[1], v.img_size[2]]),
        input_ids: ids,
        attention_mask: Some(Tensor::ones([b, t], (Kind::Int64, Device::Cpu))),
        labels: Some(labels),
        segs: Some(
            cpu_f(&[b, 1, v.img_size[0], v.img_size[1], v.img_size[2]])
                .gt(0.5)
                .to_kind(Kind::Float),
        ),
    };
    compare(
        &vs,
        || model.forward_t(&batch, false).unwrap().loss.unwrap(),
        "lamed",
    );
}

/// Inside an autocast region a Linear whose weights already have the autocast kind still casts its input
/// (before, an f32 activation met bf16 weights and libtorch panicked).
#[test]
fn autocast_casts_the_input_of_bf16_weights() {
    let mut vs = VarStore::new(Device::Cpu);
    let lin = Linear::new(&VarBuilder::new(&vs).pp("l"), 8, 4, true).unwrap();
    vs.bfloat16();
    let y = autocast(Some(Kind::BFloat16), || lin.forward(&cpu_f(&[2, 8])));
    assert_eq!(y.kind(), Kind::BFloat16);
}
