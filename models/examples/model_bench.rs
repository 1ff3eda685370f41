//! Forward + backward timing of our models, driven by `bench/models.py` (a benchmark, not a test).
//!
//! usage: model_bench <dir> [--iters N] [--warmup W] [--threads T]
//!
//! `<dir>` holds what the Python side wrote for its identical PyTorch model: `bench.json`
//! (`{"model": "vit" | "clip" | "lamed", "config": {...}, "lora": {...} | null}`), `weights.safetensors` and
//! `inputs.safetensors`. Weights load strictly, so both sides run the same parameters on the same inputs.
//! Prints one JSON line: the loss and the seconds of every timed iteration.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use m3d_models::clip::{M3dClip, M3dClipConfig, SingleProcess};
use m3d_models::lamed::{Lamed, LamedBatch, LamedConfig};
use m3d_models::lora::{self, LoraConfig};
use m3d_models::vit3d::{ViT3d, ViT3dConfig};
use m3d_models::weights;
use m3d_models::VarBuilder;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

#[derive(serde::Deserialize)]
struct Spec {
    model: String,
    config: serde_json::Value,
    #[serde(default)]
    lora: Option<LoraConfig>,
}

type Step = Box<dyn Fn() -> Result<Tensor>>;

fn input(inputs: &std::collections::HashMap<String, Tensor>, key: &str) -> Result<Tensor> {
    inputs
        .get(key)
        .map(|t| t.shallow_clone())
        .with_context(|| format!("inputs.safetensors has no `{key}`"))
}

fn build(dir: &Path, vs: &VarStore) -> Result<Step> {
    let spec: Spec = serde_json::from_str(&std::fs::read_to_string(dir.join("bench.json"))?)?;
    let inputs: std::collections::HashMap<String, Tensor> =
        weights::read_tensors(&dir.join("inputs.safetensors"))?
            .into_iter()
            .collect();
    let vb = VarBuilder::new(vs).with_lora(spec.lora.clone());
    // MONAI 1.6 saves an unused `norm_cross_attn` per ViT block; HF BERT may carry buffers we do not keep.
    let mut opts = m3d_models::clip::load_options();
    let step: Step = match spec.model.as_str() {
        "vit" => {
            let cfg: ViT3dConfig = serde_json::from_value(spec.config)?;
            let model = ViT3d::new(&vb, &cfg)?;
            let x = input(&inputs, "x")?;
            Box::new(move || Ok(model.f_forward_t(&x, true)?.0.mean(Kind::Float)))
        }
        "clip" => {
            let cfg: M3dClipConfig = serde_json::from_value(spec.config)?;
            let model = M3dClip::new(&vb, &cfg)?;
            let (images, ids, mask) = (
                input(&inputs, "images")?,
                input(&inputs, "input_ids")?,
                input(&inputs, "attention_mask")?,
            );
            Box::new(move || Ok(model.forward_loss(&images, &ids, &mask, &SingleProcess, true)?))
        }
        "lamed" => {
            let cfg: LamedConfig = serde_json::from_value(spec.config)?;
            let model = Lamed::new(&vb, &cfg)?;
            let batch = LamedBatch {
                images: input(&inputs, "images")?,
                input_ids: input(&inputs, "input_ids")?,
                attention_mask: Some(input(&inputs, "attention_mask")?),
                labels: Some(input(&inputs, "labels")?),
                segs: inputs.get("segs").map(|t| t.shallow_clone()),
            };
            Box::new(move || {
                let out = model.forward_t(&batch, true)?;
                out.loss.context("labels given, so a loss")
            })
        }
        other => bail!("unknown model `{other}`"),
    };
    if spec.lora.is_some() {
        opts = opts.allow_missing(".lora_");
    }
    weights::load_file_into(vs, &dir.join("weights.safetensors"), &opts)?;
    if spec.lora.is_some() {
        let adapter = dir.join("adapter");
        if adapter.is_dir() {
            lora::load_adapter(&adapter, vs)?;
        }
        lora::freeze_base(vs, &["mm_projector", "seg_projector", "seg_module"]);
    }
    Ok(step)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        args.get(1)
            .context("usage: model_bench <dir> [--iters N] [--warmup W] [--threads T]")?,
    );
    let flag = |name: &str, default: usize| -> Result<usize> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(args
                .get(i + 1)
                .with_context(|| format!("{name} needs a value"))?
                .parse()?),
            None => Ok(default),
        }
    };
    let (iters, warmup, threads) = (
        flag("--iters", 5)?,
        flag("--warmup", 1)?,
        flag("--threads", 0)?,
    );
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
    let vs = VarStore::new(Device::Cpu);
    let step = build(&dir, &vs)?;
    let params: Vec<Tensor> = vs
        .variables()
        .into_values()
        .filter(|t| t.requires_grad())
        .collect();
    let mut times = Vec::new();
    let mut loss = f64::NAN;
    for i in 0..warmup + iters {
        let t0 = Instant::now();
        for p in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let l = step()?;
        l.backward();
        loss = l.double_value(&[]);
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    println!(
        "{}",
        serde_json::json!({ "loss": loss, "times": times, "threads": tch::get_num_threads() })
    );
    Ok(())
}
