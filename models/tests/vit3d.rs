//! The 3-D ViT against MONAI's own modules (tests/oracle/vit3d_oracle.py): M3D's CLS variant and MONAI's
//! stock `ViT`, outputs of every block and gradients; MONAI-saved `.bin` state dicts load by name.
mod common;

use std::path::Path;

use m3d_models::vit3d::{monai_load_options, ViT3d, ViT3dConfig};
use m3d_models::weights::{load_file_into, LoadOptions};
use m3d_models::{ModelError, VarBuilder};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use common::{assert_close, assert_grads, get, max_abs_diff, read, run_oracle};

fn build(dir: &Path, kind: Kind) -> (VarStore, ViT3d, ViT3dConfig) {
    let cfg: ViT3dConfig = m3d_models::error::read_json(&dir.join("config.json")).unwrap();
    let mut vs = VarStore::new(Device::Cpu);
    let vit = ViT3d::new(&VarBuilder::new(&vs), &cfg).unwrap();
    vs.set_kind(kind);
    load_file_into(&vs, &dir.join("weights.safetensors"), &monai_load_options()).unwrap();
    (vs, vit, cfg)
}

fn parity(variant: &str) {
    let dir = run_oracle("vit3d_oracle.py", &[variant]);
    let io = read(&dir.path().join("io.safetensors"));
    let (vs, vit, cfg) = build(dir.path(), Kind::Float);
    let x = get(&io, "x");
    let (last, hidden) = vit.f_forward_t(x, false).unwrap();
    assert_eq!(last.size()[1], cfg.num_tokens());
    assert_close(&format!("{variant}: last"), &last, get(&io, "last"), 1e-4);
    println!(
        "{variant}: last max diff {:e}",
        max_abs_diff(&last, get(&io, "last"))
    );
    assert_eq!(hidden.len() as i64, cfg.num_layers);
    for (i, h) in hidden.iter().enumerate() {
        let key = format!("hidden.{i}");
        assert_close(&format!("{variant}: {key}"), h, get(&io, &key), 1e-4);
        println!(
            "{variant}: {key} max diff {:e}",
            max_abs_diff(h, get(&io, &key))
        );
    }
    // The same scalar loss as the oracle's, from the random weights it stored.
    let (seed_last, seed_hidden) = grad_seeds(&io, hidden.len());
    let mut loss = (&last * &seed_last).sum(Kind::Float);
    for (h, r) in hidden.iter().zip(&seed_hidden) {
        loss += (h * r).sum(Kind::Float);
    }
    assert_close(
        &format!("{variant}: loss"),
        &loss.reshape([1]),
        get(&io, "loss"),
        1e-3,
    );
    loss.backward();
    assert_grads(&vs, &io, 1e-4);
    let mut worst: f64 = 0.0;
    for (name, var) in vs.variables() {
        let o = get(&io, &format!("grad.{name}"));
        let scale = o.abs().max().double_value(&[]).max(1e-12);
        worst = worst.max(max_abs_diff(&var.grad(), o) / scale);
    }
    println!("{variant}: max grad rel diff {worst:e}");
}

/// The random tensors the oracle multiplied its outputs by (stored as `seed.*`).
fn grad_seeds(io: &std::collections::HashMap<String, Tensor>, n: usize) -> (Tensor, Vec<Tensor>) {
    let last = get(io, "seed.last").shallow_clone();
    let hidden = (0..n)
        .map(|i| get(io, &format!("seed.hidden.{i}")).shallow_clone())
        .collect();
    (last, hidden)
}

#[test]
fn vit3d_cls_matches_m3d_monai_vit() {
    parity("cls");
}

#[test]
fn vit3d_without_cls_matches_monai_vit() {
    parity("nocls");
}

#[test]
fn vit3d_loads_monai_bin_by_name_and_catches_a_wrong_weight() {
    let dir = run_oracle("vit3d_oracle.py", &["cls"]);
    let io = read(&dir.path().join("io.safetensors"));
    let cfg: ViT3dConfig = m3d_models::error::read_json(&dir.path().join("config.json")).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let vit = ViT3d::new(&VarBuilder::new(&vs), &cfg).unwrap();
    let bin = dir.path().join("weights.bin");

    // MONAI 1.6 saves an unused `norm_cross_attn` per block: a plain strict load names them...
    let err = load_file_into(&vs, &bin, &LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("blocks.0.norm_cross_attn.weight"), "{msg}");
    assert!(!msg.contains("missing"), "{msg}");
    // ...and the MONAI options drop exactly those, everything else by name, strictly.
    let report = load_file_into(&vs, &bin, &monai_load_options()).unwrap();
    assert!(report.is_clean());
    assert_eq!(report.loaded, vs.variables().len());
    let (last, _) = vit.forward_t(get(&io, "x"), false);
    assert_close("bin: last", &last, get(&io, "last"), 1e-4);

    // The comparison would catch a transposed weight.
    tch::no_grad(|| {
        let w = &vit.blocks[1].attn.out_proj.weight;
        let t = w.transpose(0, 1).contiguous();
        w.shallow_clone().copy_(&t);
    });
    let (last, _) = vit.forward_t(get(&io, "x"), false);
    let d = max_abs_diff(&last, get(&io, "last"));
    assert!(
        d > 1e-2,
        "a transposed out_proj went unnoticed (diff {d:e})"
    );
}

#[test]
fn vit3d_runs_in_bf16() {
    let dir = run_oracle("vit3d_oracle.py", &["cls"]);
    let io = read(&dir.path().join("io.safetensors"));
    let (_vs, vit, _) = build(dir.path(), Kind::BFloat16);
    let x = get(&io, "x").to_kind(Kind::BFloat16);
    let (last, hidden) = vit.forward_t(&x, false);
    assert_eq!(last.kind(), Kind::BFloat16);
    assert_eq!(hidden[0].kind(), Kind::BFloat16);
    let d = max_abs_diff(&last, get(&io, "last"));
    assert!(d < 0.1, "bf16 drifted by {d}");
}

#[test]
fn vit3d_m3d_clip_preset_has_monai_vit_b_shapes() {
    let cfg = ViT3dConfig::m3d_clip();
    assert_eq!(cfg.grid(), [8, 16, 16]);
    assert_eq!(cfg.num_patches(), 2048);
    assert_eq!(cfg.num_tokens(), 2049);
    let vs = VarStore::new(Device::Cpu);
    let _vit = ViT3d::new(&VarBuilder::shape_only(&vs), &cfg).unwrap();
    let vars = vs.variables();
    let n: i64 = vars
        .values()
        .map(|t| t.size().iter().product::<i64>())
        .sum();
    let (h, m, l) = (768i64, 3072i64, 12i64);
    let block = 3 * h * h + (h * h + h) + 4 * h + (h * m + m) + (m * h + h);
    let expected = (1024 * h + h) + 2048 * h + h + l * block + 2 * h;
    assert_eq!(n, expected);
    assert_eq!(n, 87_389_184);
    assert_eq!(
        vars["patch_embedding.patch_embeddings.1.weight"].size(),
        [768, 1024]
    );
    assert_eq!(
        vars["patch_embedding.position_embeddings"].size(),
        [1, 2048, 768]
    );
    assert_eq!(vars["blocks.11.attn.qkv.weight"].size(), [2304, 768]);
    assert!(!vars.contains_key("blocks.0.attn.qkv.bias"));
    assert_eq!(vars["cls_token"].size(), [1, 1, 768]);
}

#[test]
fn vit3d_rejects_bad_configs_and_inputs() {
    let mut cfg = ViT3dConfig::debug();
    cfg.patch_size = [3, 8, 8];
    let vs = VarStore::new(Device::Cpu);
    assert!(matches!(
        ViT3d::new(&VarBuilder::new(&vs), &cfg),
        Err(ModelError::Config(_))
    ));
    let cfg = ViT3dConfig::debug();
    let vs = VarStore::new(Device::Cpu);
    let vit = ViT3d::new(&VarBuilder::new(&vs), &cfg).unwrap();
    let x = Tensor::zeros([1, 1, 8, 16, 8], (Kind::Float, Device::Cpu));
    let err = vit.f_forward_t(&x, false).unwrap_err();
    assert!(matches!(err, ModelError::Shape { .. }), "{err}");
    let x = Tensor::zeros([2, 1, 8, 16, 16], (Kind::Float, Device::Cpu));
    let (last, hidden) = vit.f_forward_t(&x, true).unwrap();
    assert_eq!(last.size(), [2, 9, 32]);
    assert_eq!(hidden.len(), 2);
}
