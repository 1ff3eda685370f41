//! Checkpoint save/load timing for `bench/checkpoint.sh`: builds M3D-CLIP (`--preset m3d|tiny`) with AdamW state
//! for every parameter, then times (1) staging to host memory (what the training loop waits for; into memory
//! prepared beforehand, then into the previous round's memory, as in training), (2) writing
//! the staged checkpoint with its commit record to a local folder store, (3) restoring it as a resume does:
//! every file checked, the parameters into the model, AdamW's state into the optimizer. Prints one JSON line.
//!
//! `cargo run --release -p m3d-worker --example checkpoint_bench -- --preset m3d --dir /tmp/ck --rounds 3 [--keep]`
//! (`--keep` leaves the last checkpoint in `--dir` for the torch side of the benchmark).

use std::time::Instant;

use m3d_models::clip::{M3dClip, M3dClipConfig};
use m3d_models::weights::{self, LoadOptions};
use m3d_models::VarBuilder;
use m3d_store::Store;
use m3d_worker::checkpoint::{load_into, write, CheckpointState, Staged};
use m3d_worker::optim::{AdamW, AdamWConfig};
use tch::nn::VarStore;
use tch::{Device, Kind};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let preset = arg("--preset", "tiny");
    let dir = std::path::PathBuf::from(arg("--dir", "/tmp/m3d-ckpt-bench"));
    let rounds: usize = arg("--rounds", "3").parse().expect("--rounds");
    let cfg = match preset.as_str() {
        "m3d" => M3dClipConfig::m3d(),
        _ => M3dClipConfig::tiny(1000),
    };
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let _clip = M3dClip::new(&VarBuilder::new(&vs), &cfg).expect("model");
    let params = AdamW::trainable(&vs);
    let shared = params
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    let mut opt = AdamW::with_no_decay(AdamWConfig::default(), 0.1, &[], shared).expect("opt");
    // One step so every parameter has its moments.
    let loss = params
        .iter()
        .map(|(_, p)| p.sum(Kind::Float))
        .fold(tch::Tensor::from(0f32), |a, b| a + b);
    loss.backward();
    opt.step(1e-4).expect("step");
    let model = m3d_models::weights::state_dict(&vs);
    let state = CheckpointState {
        format: m3d_worker::checkpoint::STATE_FORMAT,
        identity: None,
        step: 1,
        epoch: 0,
        step_in_epoch: 1,
        world_size: 1,
        plan: m3d_coordinator::plan::PlanSpec {
            kind: m3d_coordinator::PlanKind::Train,
            samples: 1,
            global_batch: 1,
            seed: 0,
            epochs: 1,
            max_steps: None,
            shuffle: Default::default(),
        },
        recipe: String::new(),
        version: "bench".into(),
    };
    let (mut stage, mut save, mut read) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0;
    // As in training: the first checkpoint is staged into memory prepared in the background since the first
    // step (`Uploader::prepare`), every later one into the memory of the previous one.
    let t = Instant::now();
    let mut spare = Some(Staged::prepared(
        &weights::byte_sizes(&weights::state_dict(&vs)),
        &weights::byte_sizes(&opt.state_view()),
    ));
    let prepare_s = t.elapsed().as_secs_f64();
    for _ in 0..rounds {
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(dir.to_str().expect("utf-8 dir")).expect("store");
        let t = Instant::now();
        let staged =
            Staged::new_reusing(&state, &model, &opt.state_view(), spare.take()).expect("stage");
        stage.push(t.elapsed().as_secs_f64());
        bytes = staged.bytes();
        let t = Instant::now();
        write(&store, &staged).expect("write");
        save.push(t.elapsed().as_secs_f64() + stage.last().copied().unwrap_or(0.0));
        spare = Some(staged);
        // A resume: the parameters into the model (read straight into them), AdamW's state adopted.
        let vars = vs.variables();
        let t = Instant::now();
        let l = load_into(&store, 1, &mut |n| {
            vars.get(n).map(tch::Tensor::shallow_clone)
        })
        .expect("load");
        weights::load_into(&vs, l.model, &LoadOptions::default()).expect("into the model");
        opt.load_state_dict(&l.optimizer).expect("optimizer state");
        read.push(t.elapsed().as_secs_f64());
    }
    let first_stage = stage.first().copied().unwrap_or(0.0);
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!(
        "{}",
        serde_json::json!({
            "preset": preset,
            "bytes": bytes,
            "stage_s": med(&mut stage),
            "first_stage_s": first_stage,
            "prepare_s": prepare_s,
            "save_s": med(&mut save),
            "load_s": med(&mut read),
        })
    );
    if !std::env::args().any(|a| a == "--keep") {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
