//! LoRA against peft 0.21 on the same base weights and adapters: target selection, forward, gradients
//! (adapters only; the base frozen), PEFT adapter files both ways, and `merge_and_unload` equality.
mod common;

use std::collections::HashMap;

use m3d_models::layers::Linear;
use m3d_models::lora::{self, LoraConfig};
use m3d_models::weights::{self, LoadOptions};
use m3d_models::VarBuilder;
use tch::nn::VarStore;
use tch::{Device, Tensor};

/// The oracle's `Tiny` module, with our layers.
struct Tiny {
    layers: Vec<[Linear; 4]>,
    head: Linear,
}

impl Tiny {
    fn new(vb: &VarBuilder) -> Tiny {
        let layers = (0..2)
            .map(|i| {
                let l = vb.pp("layers").pp(i);
                [
                    Linear::new(&l.pp("attn.q_proj"), 16, 16, false).unwrap(),
                    Linear::new(&l.pp("attn.v_proj"), 16, 16, true).unwrap(),
                    Linear::new(&l.pp("mlp.fc"), 16, 24, true).unwrap(),
                    Linear::new(&l.pp("mlp.proj"), 24, 16, true).unwrap(),
                ]
            })
            .collect();
        Tiny {
            layers,
            head: Linear::new(&vb.pp("head"), 16, 5, true).unwrap(),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.shallow_clone();
        for [q, v, fc, proj] in &self.layers {
            let h = q.forward(&x) + v.forward(&x);
            x = &x + proj.forward(&fc.forward(&h).gelu("none"));
        }
        self.head.forward(&x)
    }
}

fn config(targets: &[&str], regex: Option<&str>) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        target_regex: regex.map(String::from),
        exclude: Vec::new(),
        use_rslora: false,
    }
}

fn targets() -> LoraConfig {
    config(&["q_proj", "v_proj", "fc"], None)
}

#[test]
fn target_selection_matches_peft() {
    let dir = common::run_oracle("lora_oracle.py", &[]);
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("targets.json")).unwrap())
            .unwrap();
    let names: Vec<String> = serde_json::from_value(t["linear_names"].clone()).unwrap();
    for (label, cfg) in [
        ("list", targets()),
        ("regex", config(&[], Some(r".*\.(q_proj|fc)"))),
    ] {
        let ours: Vec<&String> = names.iter().filter(|n| cfg.targets(n)).collect();
        let mut ours: Vec<String> = ours.into_iter().cloned().collect();
        ours.sort();
        let peft: Vec<String> = serde_json::from_value(t["targeted"][label].clone()).unwrap();
        assert_eq!(ours, peft, "{label}");
    }
    // The M3D exclusion rule keeps the vision tower, projector, embeddings and heads in full.
    let m3d = LoraConfig::m3d_lamed();
    assert!(m3d.targets("model.layers.3.self_attn.q_proj"));
    assert!(m3d.targets("model.layers.3.mlp.down_proj"));
    for n in [
        "lm_head",
        "model.mm_projector.projector.0",
        "model.vision_tower.vision_tower.blocks.0.attn.qkv",
        "model.seg_projector.0",
    ] {
        assert!(!m3d.targets(n), "{n}");
    }
}

fn build(cfg: &LoraConfig) -> (VarStore, Tiny) {
    let vs = VarStore::new(Device::Cpu);
    let model = Tiny::new(&VarBuilder::new(&vs).with_lora(Some(cfg.clone())));
    (vs, model)
}

#[test]
fn forward_gradients_and_merge_match_peft() {
    let dir = common::run_oracle("lora_oracle.py", &[]);
    let d = dir.path();
    let cfg = targets();
    let (vs, model) = build(&cfg);
    assert_eq!(
        vs.variables()
            .keys()
            .filter(|k| lora::is_lora_key(k))
            .count(),
        12
    );
    // Base weights alone must not satisfy a strict load of a model with adapters...
    assert!(
        weights::load_file_into(&vs, &d.join("base.safetensors"), &LoadOptions::default()).is_err()
    );
    // ...unless the adapters are explicitly allowed to be missing.
    let opts = LoadOptions::default().allow_missing(".lora_");
    weights::load_file_into(&vs, &d.join("base.safetensors"), &opts).unwrap();
    let loaded = lora::load_adapter(&d.join("adapter"), &vs).unwrap();
    assert_eq!(loaded.r, 4);
    assert_eq!(loaded.alpha, 8.0);

    let io = common::read(&d.join("io.safetensors"));
    let trainable = lora::freeze_base(&vs, &[]);
    assert_eq!(
        trainable,
        2 * (4 * 16 + 16 * 4 + 4 * 16 + 16 * 4 + 4 * 16 + 24 * 4)
    );
    let y = model.forward(common::get(&io, "x"));
    common::assert_close("lora forward", &y, common::get(&io, "y"), 1e-5);
    (y * common::get(&io, "w")).sum(tch::Kind::Float).backward();
    common::assert_grads(&vs, &io, 1e-4);
    for (name, t) in vs.variables() {
        if !lora::is_lora_key(&name) {
            assert!(!t.grad().defined(), "frozen {name} got a gradient");
        }
    }

    let merged: HashMap<String, Tensor> = lora::merged_state_dict(&vs, &cfg)
        .unwrap()
        .into_iter()
        .collect();
    let oracle = common::read(&d.join("merged.safetensors"));
    let mut keys: Vec<&String> = merged.keys().collect();
    let mut okeys: Vec<&String> = oracle.keys().collect();
    keys.sort();
    okeys.sort();
    assert_eq!(keys, okeys);
    for (k, t) in &merged {
        common::assert_close(k, t, &oracle[k], 1e-6);
    }
    // The merged weights alone reproduce the adapted output in a plain model.
    let plain_vs = VarStore::new(Device::Cpu);
    let plain = Tiny::new(&VarBuilder::new(&plain_vs));
    weights::load_into(
        &plain_vs,
        merged.into_iter().collect(),
        &LoadOptions::default(),
    )
    .unwrap();
    let yp = tch::no_grad(|| plain.forward(common::get(&io, "x")));
    common::assert_close("merged forward", &yp, common::get(&io, "y"), 1e-5);
}

#[test]
fn our_adapter_files_load_in_peft() {
    let dir = common::run_oracle("lora_oracle.py", &[]);
    let d = dir.path();
    let cfg = targets();
    let (vs, _model) = build(&cfg);
    weights::load_file_into(
        &vs,
        &d.join("base.safetensors"),
        &LoadOptions::default().allow_missing(".lora_"),
    )
    .unwrap();
    lora::load_adapter(&d.join("adapter"), &vs).unwrap();
    let ours = d.join("ours");
    lora::save_adapter(&ours, &vs, &cfg, None).unwrap();
    let out = m3d_testkit::run_python(
        &common::oracle_dir().join("lora_oracle.py"),
        &[d.to_str().unwrap(), "check", ours.to_str().unwrap()],
    );
    let diff: f64 = out.trim().lines().last().unwrap().parse().unwrap();
    assert!(
        diff <= 1e-6,
        "peft output with our adapter differs by {diff}"
    );

    // An adapter for other modules is refused, naming the file and the keys.
    let (other_vs, _m) = build(&config(&["q_proj"], None));
    let e = lora::load_adapter(&d.join("adapter"), &other_vs)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adapter_model.safetensors")
            && e.contains("unexpected")
            && e.contains("v_proj.lora_A.weight"),
        "{e}"
    );
}

#[test]
fn fresh_adapters_change_nothing_and_bad_configs_are_refused() {
    let cfg = targets();
    tch::manual_seed(3);
    let (vs, model) = build(&cfg);
    let x = Tensor::randn([2, 3, 16], (tch::Kind::Float, Device::Cpu));
    let with = tch::no_grad(|| model.forward(&x));
    let merged = lora::merged_state_dict(&vs, &cfg).unwrap();
    let plain_vs = VarStore::new(Device::Cpu);
    let plain = Tiny::new(&VarBuilder::new(&plain_vs));
    weights::load_into(&plain_vs, merged, &LoadOptions::default()).unwrap();
    let without = tch::no_grad(|| plain.forward(&x));
    assert!(
        with.equal(&without),
        "B starts at zero, so a fresh adapter is the identity"
    );

    let mut bad = cfg.clone();
    bad.r = 0;
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("r must be positive"));
    let mut bad = cfg.clone();
    bad.target_regex = Some("(".into());
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("target_regex"));
    let mut rs = cfg;
    rs.use_rslora = true;
    assert_eq!(rs.scaling(), 4.0);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("adapter_config.json"),
        r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"use_dora":true}"#,
    )
    .unwrap();
    let e = lora::read_adapter_config(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adapter_config.json") && e.contains("use_dora"),
        "{e}"
    );
}
