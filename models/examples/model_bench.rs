//! Forward + backward timing of our models, driven by `bench/models.py` (a benchmark, not a test).
//!
//! usage: model_bench <dir> [--iters N] [--warmup W] [--threads T]
//!
//! `<dir>` holds what the Python side wrote for its identical PyTorch model: `bench.json`
//! (`{"model": "vit" | "clip" | "lamed", "config": {...}, "lora": {...} | null}`), `weights.safetensors` and
//! `inputs.safetensors`. Weights load strictly, so both sides run the same parameters on the same inputs.
//! Prints one JSON line: the loss and the seconds of every timed iteration.
//!
//! usage: model_bench --synthetic <clip-m3d | vit-m3d | lamed-llama2-7b | lamed-llama3-8b | lamed-phi3 | lamed-tiny>
//!            [--batch B] [--device cpu|cuda] [--precision f32|bf16|bf16-autocast] [--iters N] [--warmup W]
//!            [--peak-tflops P]
//!
//! Full-size models with random weights and random inputs (what `bench/gpu/models.sh` runs): samples/s,
//! tokens/s and model FLOPs utilisation. FLOPs per step count the matrix products that actually run (PaLM's
//! convention, per component with N = its non-embedding parameters and T = the tokens it sees):
//! - forward: 2·N·T, always;
//! - backward, where it reaches the component (something in it or before it trains): 2·N·T for the input
//!   gradients, plus 2·N_trained·T for the weight gradients of its trained parameters only.
//!
//! So a fully trained component counts 6·N·T, a frozen one the backward passes through (LaMed's LoRA-frozen
//! LLM base, lm_head included) 4·N·T, LoRA adapters and trained parts (the projector) 6·N·T, and a frozen
//! component with nothing trained before it (LaMed's vision tower) 2·N·T: forward only. Attention adds
//! 4·L·d·T² forward and 8·L·d·T² backward (full T², no causal halving), i.e. 12·L·d·T² or, forward only,
//! 4·L·d·T². MFU divides by `--peak-tflops` (dense bf16 peak of the device).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use m3d_models::clip::{M3dClip, M3dClipConfig, SingleProcess};
use m3d_models::flops::{self, attention_flops, matmul_flops, nonembedding_params};
use m3d_models::lamed::{Lamed, LamedBatch, LamedConfig};
use m3d_models::lora::{self, LoraConfig};
use m3d_models::precision::Precision;
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
            let (x, w) = (input(&inputs, "x")?, input(&inputs, "w")?);
            Box::new(move || Ok((model.f_forward_t(&x, true)?.0 * &w).mean(Kind::Float)))
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
            // "debug" names the parity tests' tiny LaMed; otherwise a full LamedConfig.
            let cfg: LamedConfig = match spec.config.as_str() {
                Some("debug") => LamedConfig::debug(),
                _ => serde_json::from_value(spec.config)?,
            };
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

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()?),
        None => Ok(default),
    }
}

/// (label, ViT tokens per sample or 0, LLM/text tokens per sample, attention layers/width per component).
struct Synthetic {
    step: Step,
    samples: i64,
    flops: f64,
    /// Per component: its parameters, whether the backward reaches it, its FLOPs per step.
    parts: serde_json::Value,
    tokens: i64,
}

fn synthetic(case: &str, batch: i64, vs: &mut VarStore, precision: Precision) -> Result<Synthetic> {
    let dev = vs.device();
    let b = batch;
    let s = match case {
        "clip-m3d" | "vit-m3d" => {
            let cfg = M3dClipConfig::m3d();
            let v = cfg.vision.clone();
            let t = cfg.max_text_len;
            let images = Tensor::randn(
                [b, 1, v.img_size[0], v.img_size[1], v.img_size[2]],
                (Kind::Float, dev),
            )
            .to_kind(precision.kind());
            let nv = v.num_tokens();
            // Everything trains: 6·N·T + 12·L·d·T² per component.
            if case == "vit-m3d" {
                let model = ViT3d::new(&VarBuilder::new(vs), &v)?;
                precision.apply(vs)?;
                let n = nonembedding_params(vs, |_| true);
                let flops = b as f64
                    * (matmul_flops(n, nv, true)
                        + attention_flops(v.num_layers, v.hidden_size, nv, true));
                let step: Step =
                    Box::new(move || Ok(model.f_forward_t(&images, true)?.0.mean(Kind::Float)));
                Synthetic {
                    step,
                    samples: b,
                    flops,
                    parts: serde_json::Value::Null,
                    tokens: b * nv,
                }
            } else {
                let model = M3dClip::new(&VarBuilder::new(vs), &cfg)?;
                precision.apply(vs)?;
                let ids = Tensor::randint_low(1000, 30000, [b, t], (Kind::Int64, dev));
                let mask = Tensor::ones([b, t], (Kind::Int64, dev));
                let flops = b as f64 * flops::total(&flops::clip(vs, &cfg, t));
                let step: Step = Box::new(move || {
                    Ok(model.forward_loss(&images, &ids, &mask, &SingleProcess, true)?)
                });
                Synthetic {
                    step,
                    samples: b,
                    flops,
                    parts: serde_json::Value::Null,
                    tokens: b * (nv + t),
                }
            }
        }
        "lamed-llama2-7b" | "lamed-llama3-8b" | "lamed-phi3" | "lamed-tiny" => {
            let cfg = match case {
                "lamed-llama2-7b" => LamedConfig::llama2_7b(),
                "lamed-llama3-8b" => LamedConfig::llama3_8b(),
                // The CPU recipes' tiny LaMed (a smoke test of this path, e.g. for a GPU bundle on a CPU).
                "lamed-tiny" => LamedConfig::tiny(1000, false),
                _ => LamedConfig::phi3_mini(),
            };
            // 512-token sequences as the reference's stage 2; the tiny LLM has 128 positions.
            let (t, vocab_hi) = if case == "lamed-tiny" {
                (96i64, 1000)
            } else {
                (512i64, 20000)
            };
            let model = Lamed::new(
                &VarBuilder::new(vs).with_lora(Some(LoraConfig::m3d_lamed())),
                &cfg,
            )?;
            precision.apply(vs)?;
            lora::freeze_base(vs, &["mm_projector", "seg_projector", "seg_module"]);
            let v = &cfg.vision;
            let n_img = cfg.num_image_tokens();
            let ids = Tensor::randint_low(100, vocab_hi, [b, t], (Kind::Int64, dev));
            let _ = ids.narrow(1, 1, n_img).fill_(cfg.tokens.im_patch);
            let labels = ids.copy();
            let _ = labels
                .narrow(1, 0, n_img + 1)
                .fill_(m3d_models::lamed::IGNORE_INDEX);
            let batch_in = LamedBatch {
                images: Tensor::randn(
                    [b, 1, v.img_size[0], v.img_size[1], v.img_size[2]],
                    (Kind::Float, dev),
                ),
                input_ids: ids,
                attention_mask: Some(Tensor::ones([b, t], (Kind::Int64, dev))),
                labels: Some(labels),
                segs: None,
            };
            // Count what runs (see the module comment). In this setting (the reference's stage 2) the vision
            // tower is frozen with nothing before it: forward only, 2·N·T + 4·L·d·T². The projector trains:
            // 6·N·T over its pooled tokens. The LLM's base (lm_head included) is frozen but the backward
            // passes through it to the adapters and the projector: 4·N·T; the LoRA adapters train: 6·N·T;
            // its attention runs forward and backward: 12·L·d·T². The segmentation parts do not run
            // (no masks). The flags come from the variables, so other freezing choices count correctly.
            let per_sample = flops::lamed(vs, &cfg, t);
            let flops = b as f64 * flops::total(&per_sample);
            let parts: serde_json::Map<String, serde_json::Value> = per_sample
                .iter()
                .map(|(name, p)| {
                    let json = serde_json::json!({
                        "trained": p.params.trained, "frozen": p.params.frozen,
                        "backward": p.backward, "flops": b as f64 * p.flops,
                    });
                    (name.to_string(), json)
                })
                .collect();
            let parts = serde_json::Value::Object(parts);
            let step: Step = Box::new(move || {
                let out = model.forward_t(&batch_in, true)?;
                out.loss.context("labels given, so a loss")
            });
            Synthetic {
                step,
                samples: b,
                flops,
                parts,
                tokens: b * t,
            }
        }
        other => bail!("unknown synthetic case `{other}`"),
    };
    Ok(s)
}

/// `warmup + iters` forward + backward passes of `step` (gradients of the trainable variables of `vs`
/// zeroed before each); returns the seconds of the timed passes and the last loss.
fn time_steps(
    vs: &VarStore,
    step: impl Fn() -> Result<Tensor>,
    warmup: usize,
    iters: usize,
) -> Result<(Vec<f64>, f64)> {
    let trainable: Vec<Tensor> = vs
        .variables()
        .into_values()
        .filter(|t| t.requires_grad())
        .collect();
    let mut times = Vec::with_capacity(iters);
    let mut loss = f64::NAN;
    for i in 0..warmup + iters {
        let t0 = Instant::now();
        for p in &trainable {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let l = step()?;
        l.backward();
        loss = l.double_value(&[]); // synchronises with the device
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok((times, loss))
}

fn run_synthetic(args: &[String], case: &str) -> Result<()> {
    let batch: i64 = arg(args, "--batch", 1)?;
    let device = match arg::<String>(args, "--device", "cpu".into())?.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => bail!("--device {other}: expected cpu or cuda"),
    };
    if device.is_cuda() && !tch::Cuda::is_available() {
        bail!("--device cuda, but libtorch finds no CUDA device");
    }
    let precision: Precision = arg(args, "--precision", Precision::default_for(device))?;
    let (iters, warmup): (usize, usize) = (arg(args, "--iters", 10)?, arg(args, "--warmup", 2)?);
    let peak: f64 = arg(args, "--peak-tflops", 0.0)?;
    let mut vs = VarStore::new(device);
    let s = synthetic(case, batch, &mut vs, precision)?;
    let params: f64 = vs.variables().values().map(|t| t.numel() as f64).sum();
    let trainable: f64 = vs
        .variables()
        .values()
        .filter(|t| t.requires_grad())
        .map(|t| t.numel() as f64)
        .sum();
    let (mut times, _) = time_steps(&vs, || precision.run(|| (s.step)()), warmup, iters)?;
    times.sort_by(f64::total_cmp);
    let median = times
        .get(times.len() / 2)
        .copied()
        .context("--iters must be at least 1")?;
    let tflops = s.flops / median / 1e12;
    println!(
        "{}",
        serde_json::json!({
            "case": case, "device": format!("{device:?}"), "precision": precision, "batch": batch,
            "params": params, "trainable": trainable,
            "step_s": median, "step_flops": s.flops, "flops_parts": s.parts,
            "samples_per_s": s.samples as f64 / median,
            "tokens_per_s": s.tokens as f64 / median, "model_tflops": tflops,
            "mfu": if peak > 0.0 { serde_json::json!(tflops / peak) } else { serde_json::Value::Null },
        })
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--synthetic") {
        let case = args.get(i + 1).context("--synthetic needs a case")?.clone();
        return run_synthetic(&args, &case);
    }
    let dir = PathBuf::from(
        args.get(1)
            .context("usage: model_bench <dir> [--iters N] [--warmup W] [--threads T]")?,
    );
    let (iters, warmup, threads): (usize, usize, i32) = (
        arg(&args, "--iters", 5)?,
        arg(&args, "--warmup", 1)?,
        arg(&args, "--threads", 0)?,
    );
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    let vs = VarStore::new(Device::Cpu);
    let step = build(&dir, &vs)?;
    let (times, loss) = time_steps(&vs, step, warmup, iters)?;
    println!(
        "{}",
        serde_json::json!({ "loss": loss, "times": times, "threads": tch::get_num_threads() })
    );
    Ok(())
}
