//! `m3d plan`'s memory estimate against measurement: for tiny and medium M3D-CLIP and M3D-LaMed configurations
//! on the CPU (f32), a child process builds the recipe's model as the trainer does (`TrainModel::build`),
//! runs one micro-batch forward + loss + backward, and reports the growth of its resident memory: the
//! weights (after the build) and the peak of the step (`VmHWM`, reset through `/proc/self/clear_refs` just
//! before it). The plan's peak (weights + saved activations + the largest transient + gradients) must be
//! within 15 % of the measured one (weights + step).
//!
//! Why 15 % holds on any CPU: the estimate counts the tensors autograd saves, which depend on the model code,
//! not on the kernels; what it leaves out (norm statistics, masks of a few bytes per token, libtorch's
//! per-op scratch buffers, allocator rounding) is a few percent at these sizes. The child uses one
//! thread and glibc's mmap threshold fixed at 64 KiB, so every tensor larger than that is returned to the
//! system when freed and the resident size follows the live tensors.
//!
//! The medium configurations are measured once more with `train.activation_checkpointing`, against the plan's
//! figure with checkpointing (each block keeps its input; one block's activations exist again while it is
//! recomputed).

use std::path::{Path, PathBuf};
use std::process::Command;

use m3d_planner::{plan, PlanOptions};
use m3d_recipes::Recipe;
use m3d_worker::job::TrainModel;
use m3d_worker::vocab::{word_level_tokenizer, VocabStyle};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

const CHILD: &str = "M3D_MEASURE_RECIPE";

fn status_kib(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
        * 1024.0
}

/// Runs in the child: measures one step of the recipe in `M3D_MEASURE_RECIPE` and prints the bytes.
#[test]
fn child_measures_one_step() {
    let Ok(path) = std::env::var(CHILD) else {
        return;
    };
    tch::set_num_threads(1);
    let recipe = Recipe::load(Path::new(&path), &[]).unwrap();
    let tokenizer = m3d_models::tokenizer::Tokenizer::from_file(Path::new(
        recipe.model.tokenizer.as_deref().unwrap(),
    ))
    .unwrap();
    // libtorch's lazily created state before the baseline: thread pools, allocator tables and the BLAS
    // library's packing buffers (OpenBLAS keeps a per-thread buffer of up to 32 MiB, touched as far as the
    // largest product needed it: a workspace of the CPU library, not of the model, which a GPU's cuBLAS
    // workspace and the planner's reserve stand for).
    let big = Tensor::rand([2048, 2048], (Kind::Float, Device::Cpu));
    let _ = big.mm(&big).sum(Kind::Float);
    drop(big);
    let rss0 = status_kib("VmRSS:");
    let model = TrainModel::build(&recipe, tokenizer, Device::Cpu).unwrap();
    let rss1 = status_kib("VmRSS:");
    let b = recipe.micro_batch(1) as i64;
    let t = recipe.data.max_text_len as i64;
    tch::manual_seed(0);
    let run: Box<dyn Fn() -> Tensor> = match &model.net {
        m3d_worker::job::Net::Clip(c) => {
            let v = &c.config().vision;
            let images = Tensor::rand(
                [b, 1, v.img_size[0], v.img_size[1], v.img_size[2]],
                (Kind::Float, Device::Cpu),
            );
            let vocab = c.config().text.vocab_size;
            let ids = Tensor::randint_low(5, vocab, [b, t], (Kind::Int64, Device::Cpu));
            let mask = Tensor::ones([b, t], (Kind::Int64, Device::Cpu));
            let c = c.as_ref();
            Box::new(move || {
                c.forward_loss(&images, &ids, &mask, &m3d_models::clip::SingleProcess, true)
                    .unwrap()
            })
        }
        m3d_worker::job::Net::Lamed(l) => {
            let cfg = l.config().clone();
            let v = &cfg.vision;
            let n_img = cfg.num_image_tokens();
            let ids =
                Tensor::randint_low(5, cfg.tokens.im_patch, [b, t], (Kind::Int64, Device::Cpu));
            let _ = ids.narrow(1, 0, 1).fill_(1);
            let _ = ids.narrow(1, 1, n_img).fill_(cfg.tokens.im_patch);
            // One [SEG] per sample, so every sample with a mask prompts SegVol.
            let _ = ids.narrow(1, t - 2, 1).fill_(cfg.tokens.seg);
            let labels = ids.copy();
            let _ = labels
                .narrow(1, 0, n_img + 1)
                .fill_(m3d_models::lamed::IGNORE_INDEX);
            let [d, h, w] = v.img_size;
            let segs = cfg.seg.as_ref().map(|_| {
                Tensor::rand([b, 1, d, h, w], (Kind::Float, Device::Cpu))
                    .ge(0.5)
                    .to_kind(Kind::Float)
            });
            let batch = m3d_models::lamed::LamedBatch {
                images: Tensor::rand([b, 1, d, h, w], (Kind::Float, Device::Cpu)),
                input_ids: ids,
                attention_mask: Some(Tensor::ones([b, t], (Kind::Int64, Device::Cpu))),
                labels: Some(labels),
                segs,
            };
            let l = l.as_ref();
            Box::new(move || l.forward_t(&batch, true).unwrap().loss.unwrap())
        }
    };
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let rss2 = status_kib("VmRSS:");
    let loss = run();
    let forward_peak = status_kib("VmHWM:") - rss2;
    let after_forward = status_kib("VmRSS:") - rss2;
    loss.backward();
    let hwm = status_kib("VmHWM:");
    println!(
        "MEASURED {}",
        json!({"weights": rss1 - rss0, "step_peak": hwm - rss2, "forward_peak": forward_peak,
               "after_forward": after_forward, "loss": loss.double_value(&[])})
    );
}

fn measure(recipe: &Path) -> Value {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_measures_one_step",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD, recipe)
        .env("MALLOC_MMAP_THRESHOLD_", "65536")
        .env("MALLOC_TRIM_THRESHOLD_", "65536")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("MEASURED ").map(|(_, json)| json))
        .unwrap_or_else(|| {
            panic!(
                "child failed: {}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap()
}

struct Case {
    name: &'static str,
    yaml: String,
}

fn tokenizer(dir: &Path, style: VocabStyle) -> PathBuf {
    let words: Vec<String> = (0..400).map(|i| format!("w{i}")).collect();
    let json = word_level_tokenizer(words.iter().map(String::as_str), style);
    let p = dir.join(format!("{style:?}-tokenizer.json"));
    std::fs::write(&p, serde_json::to_vec(&json).unwrap()).unwrap();
    p
}

fn cases(dir: &Path) -> Vec<Case> {
    let bert_tok = tokenizer(dir, VocabStyle::Bert);
    let llama_tok = tokenizer(dir, VocabStyle::Llama);
    let vocab = 400 + 5;
    // Medium M3D-CLIP: the reference's config.json format, a 4-layer ViT of width 256 over 32x128x128
    // (513 tokens) and a 4-layer BERT of width 256 with BERT's dropout (the CPU's math attention path).
    std::fs::create_dir_all(dir.join("bert")).unwrap();
    std::fs::write(
        dir.join("bert/config.json"),
        json!({"vocab_size": vocab, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
               "intermediate_size": 1024, "max_position_embeddings": 512, "hidden_dropout_prob": 0.1,
               "attention_probs_dropout_prob": 0.1})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("clip.json"),
        json!({"model_type": "m3d_clip", "img_size": [32, 128, 128], "patch_size": [4, 16, 16],
               "hidden_size": 256, "mlp_dim": 1024, "num_layers": 4, "num_heads": 4, "vocab_size": vocab,
               "language_model_name_or_path": "bert"})
        .to_string(),
    )
    .unwrap();
    // Medium LaMed LLM: a Llama config.json of width 256, 4 layers, GQA 8/2 heads, around the tiny preset's
    // vision tower, projector and SegVol.
    std::fs::write(
        dir.join("llama.json"),
        json!({"model_type": "llama", "vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688,
               "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
               "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": false})
        .to_string(),
    )
    .unwrap();
    let data = "data:\n  tasks:\n    - task: cap\n      shards: [unused]\n";
    let clip = |model: String, batch: usize, text: usize| {
        format!(
            "model:\n{model}  tokenizer: {}\n{data}  max_text_len: {text}\ntrain:\n  global_batch: {batch}\n  precision: f32\n",
            bert_tok.display()
        )
    };
    let lamed = |model: String, batch: usize, text: usize, tasks: &str| {
        format!(
            "model:\n  kind: lamed\n{model}  tokenizer: {}\ndata:\n  tasks:\n{tasks}  max_text_len: {text}\ntrain:\n  global_batch: {batch}\n  precision: f32\n",
            llama_tok.display()
        )
    };
    let cap = "    - task: cap\n      shards: [unused]\n";
    let seg = "    - task: seg\n      shards: [unused]\n";
    vec![
        Case {
            name: "clip-tiny",
            // recipes/clip-tiny.yaml's batch and text length on one worker.
            yaml: clip("  kind: clip\n  preset: tiny\n".into(), 12, 32),
        },
        Case {
            name: "clip-medium",
            yaml: clip(
                format!("  kind: clip\n  config: {}\n", dir.join("clip.json").display()),
                8,
                64,
            ),
        },
        Case {
            name: "lamed-tiny-stage1",
            yaml: lamed(
                "  preset: tiny\n  trainable: [model.mm_projector., model.embed_tokens.]\n".into(),
                4,
                96,
                cap,
            ),
        },
        Case {
            name: "lamed-medium-stage2-seg",
            yaml: lamed(
                format!(
                    "  preset: tiny\n  config: {}\n  segmentation: true\n  lora: {{r: 8, alpha: 16, dropout: 0.05}}\n  trainable: [model.vision_tower., model.mm_projector., model.embed_tokens., lm_head., model.seg_projector., model.seg_module.]\n",
                    dir.join("llama.json").display()
                ),
                4,
                128,
                &format!("{cap}{seg}"),
            ),
        },
    ]
}

#[test]
fn plan_memory_is_within_15_percent_of_the_measured_peak() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    let mut all = Vec::new();
    for case in cases(dir.path()) {
        if case.name.contains("medium") {
            // The recipe's last section is `train`.
            let yaml = format!("{}  activation_checkpointing: true\n", case.yaml);
            all.push((format!("{} +ckpt", case.name), yaml, true));
        }
        all.push((case.name.to_string(), case.yaml, false));
    }
    for (name, yaml, checkpointing) in all {
        let path = dir.path().join(format!("{}.yaml", name.replace(' ', "_")));
        std::fs::write(&path, &yaml).unwrap();
        let recipe = Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(recipe.train.activation_checkpointing, checkpointing);
        let p = plan(
            &recipe,
            &PlanOptions {
                workers: Some(1),
                gpu: None,
                samples: Some(1000),
                mfu: 0.4,
                scratch: dir.path().to_path_buf(),
            },
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let m = &p.memory;
        let est_weights = m.weights;
        let saved = if checkpointing {
            m.activations.checkpointed
        } else {
            m.activations.saved()
        };
        let est_step = saved + m.activations.transient + m.gradients;
        let got = measure(&path);
        let (w, s) = (
            got["weights"].as_f64().unwrap(),
            got["step_peak"].as_f64().unwrap(),
        );
        let (est, measured) = (est_weights + est_step, w + s);
        let mib = |x: f64| x / (1u64 << 20) as f64;
        let line = format!(
            "{}: peak plan {:.1} MiB, measured {:.1} MiB ({:+.1} %) = weights {:.1} / {:.1} + step {:.1} / {:.1}; saved by part (MiB) {:?}",
            name,
            mib(est),
            mib(measured),
            100.0 * (est - measured) / measured,
            mib(est_weights),
            mib(w),
            mib(est_step),
            mib(s),
            m.activations.parts.iter().map(|(n, b)| format!("{n} {:.1}", mib(*b))).collect::<Vec<_>>()
        );
        eprintln!("{line}");
        report.push((line, (est - measured).abs() / measured));
    }
    for (line, d) in &report {
        assert!(*d <= 0.15, "{line}");
    }
}
