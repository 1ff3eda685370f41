//! Shared by the Llama / Phi-3 / generation oracle tests: run an `llm_*` oracle once per test binary, build
//! our model from the oracle's config.json + weights (strict load), compare logits and gradients.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use m3d_models::llm::{AttentionImpl, CausalLm, LlmConfig};
use m3d_models::weights::{load_file_into, LoadOptions};
use m3d_models::VarBuilder;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::common;

/// Runs `tests/oracle/<script> <dir> args..` into a fresh folder of the cargo test tmpdir and returns it.
/// The folder is per process: nextest runs every test in its own process, concurrently, and a shared
/// folder would be rewritten under a test that is reading it.
/// Folders of earlier processes whose process is gone are removed first: the tmpdir is kept between runs (it lives in
/// the shared target folder), and without this every run would leave its oracle outputs behind.
pub fn run_oracle_into(name: &str, script: &str, args: &[&str]) -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    remove_folders_of_gone_processes(tmp, name);
    let dir = tmp.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create oracle dir");
    let mut all = vec![dir.to_str().expect("utf-8 tmpdir")];
    all.extend_from_slice(args);
    m3d_testkit::run_python(&common::oracle_dir().join(script), &all);
    dir
}

fn remove_folders_of_gone_processes(tmp: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(name))
            .and_then(|n| n.strip_prefix('-'))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The folder of `llm_parity.py` run for `cases`, once per test binary (`cell` is that binary's static).
pub fn parity_dir(cell: &'static OnceLock<PathBuf>, name: &str, cases: &[&str]) -> &'static Path {
    cell.get_or_init(|| run_oracle_into(name, "llm_parity.py", cases))
}

/// [`check_parity`] of `dir/case` with both attention kernels.
pub fn check_parity_both_kernels(dir: &Path, case: &str) {
    for imp in [AttentionImpl::Eager, AttentionImpl::Sdpa] {
        let (d_logits, d_grad) = check_parity(&dir.join(case), imp);
        println!(
            "{case} {imp:?}: logits max abs diff {d_logits:.2e}, grads max rel diff {d_grad:.2e}"
        );
    }
}

/// `llm_param_count.py`'s counts, key sets and shapes of the published configs (transformers on the meta
/// device).
pub fn published_param_counts(name: &str) -> serde_json::Value {
    let dir = run_oracle_into(name, "llm_param_count.py", &[]);
    serde_json::from_str(&std::fs::read_to_string(dir.join("counts.json")).expect("counts.json"))
        .expect("counts.json is JSON")
}

/// Our model from an oracle folder (config.json + weights.safetensors, strict).
pub fn load(dir: &Path, imp: AttentionImpl) -> (VarStore, CausalLm) {
    let mut cfg = LlmConfig::from_file(&dir.join("config.json")).expect("config.json");
    cfg.set_attn_implementation(imp);
    let vs = VarStore::new(Device::Cpu);
    let model = CausalLm::new(&VarBuilder::new(&vs), &cfg).expect("build model");
    load_file_into(
        &vs,
        &dir.join("weights.safetensors"),
        &LoadOptions::default(),
    )
    .expect("strict load");
    (vs, model)
}

/// max over parameters of max|ours - oracle| / max|oracle| for the gradients.
pub fn max_rel_grad(vs: &VarStore, io: &HashMap<String, Tensor>) -> f64 {
    let mut worst: f64 = 0.0;
    for (name, var) in vs.variables() {
        let oracle = common::get(io, &format!("grad.{name}"));
        let scale = oracle.abs().max().double_value(&[]).max(1e-12);
        worst = worst.max(common::max_abs_diff(&var.grad(), oracle) / scale);
    }
    worst
}

/// Forward + backward of an `llm_parity.py` case; asserts logits within 1e-4 and gradients within 1e-4
/// relative; returns (max logits diff, max relative grad diff).
pub fn check_parity(dir: &Path, imp: AttentionImpl) -> (f64, f64) {
    let (vs, model) = load(dir, imp);
    let io = common::read(&dir.join("io.safetensors"));
    let ids = common::get(&io, "input_ids");
    let mask = common::get(&io, "attention_mask");
    let logits = model.forward(ids, Some(mask), None, true).expect("forward");
    common::assert_close("logits", &logits, common::get(&io, "logits"), 1e-4);
    let d_logits = common::max_abs_diff(&logits, common::get(&io, "logits"));
    (logits * common::get(&io, "loss_weight"))
        .sum(Kind::Float)
        .backward();
    common::assert_grads(&vs, &io, 1e-4);
    (d_logits, max_rel_grad(&vs, &io))
}

/// Builds `cfg` shape-only and checks, against `llm_param_count.py`'s entry `preset`, the parameter count,
/// the key set and every shape; also that nothing was allocated (RSS growth < 200 MB, build < 1 s).
pub fn check_shape_only_count(counts: &serde_json::Value, preset: &str, cfg: &LlmConfig) -> i64 {
    let rss_before = common::rss_kb();
    let start = Instant::now();
    let vs = VarStore::new(Device::Cpu);
    let model = CausalLm::new(&VarBuilder::shape_only(&vs), cfg).expect("shape-only build");
    let elapsed = start.elapsed();
    let grown_mb = (common::rss_kb() - rss_before) as f64 / 1024.0;
    let vars = vs.variables();
    let ours: i64 = vars
        .values()
        .map(|t| t.size().iter().product::<i64>())
        .sum();
    drop(model);

    let entry = &counts[preset];
    let expected = entry["count"].as_i64().expect("count");
    let shapes = entry["shapes"].as_object().expect("shapes");
    let mut missing: Vec<&String> = shapes.keys().filter(|k| !vars.contains_key(*k)).collect();
    let mut extra: Vec<&String> = vars.keys().filter(|k| !shapes.contains_key(*k)).collect();
    missing.sort();
    extra.sort();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{preset}: keys missing from ours {missing:?}, extra in ours {extra:?}"
    );
    for (k, shape) in shapes {
        let shape: Vec<i64> = serde_json::from_value(shape.clone()).expect("shape");
        assert_eq!(vars[k].size(), shape, "{preset}: shape of {k}");
    }
    assert_eq!(ours, expected, "{preset}: parameter count");
    assert!(
        elapsed.as_secs_f64() < 1.0,
        "{preset}: shape-only build took {elapsed:?}"
    );
    assert!(grown_mb < 200.0, "{preset}: RSS grew by {grown_mb:.1} MB");
    println!(
        "{preset}: {ours} parameters, {} tensors, built in {elapsed:?}, RSS +{grown_mb:.1} MB",
        vars.len()
    );
    ours
}
