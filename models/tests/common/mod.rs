//! Shared by the oracle tests: run a committed Python oracle script into a temp folder, read its
//! safetensors fixtures, compare tensors with stated tolerances.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

pub fn oracle_dir() -> PathBuf {
    m3d_testkit::package_dir().join("tests/oracle")
}

/// Runs `tests/oracle/<script> <out> args...` and returns `out` (kept alive by the returned TempDir).
pub fn run_oracle(script: &str, args: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().expect("utf-8 temp path").to_string();
    let mut all = vec![out.as_str()];
    all.extend_from_slice(args);
    m3d_testkit::run_python(&oracle_dir().join(script), &all);
    dir
}

pub fn read(path: &Path) -> HashMap<String, Tensor> {
    m3d_models::weights::read_tensors(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn get<'a>(map: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    map.get(key)
        .unwrap_or_else(|| panic!("fixture has no tensor `{key}`"))
}

/// max |a - b|, after both are moved to f64 on the CPU.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let a = a.detach().to_kind(Kind::Double).to_device(tch::Device::Cpu);
    let b = b.detach().to_kind(Kind::Double).to_device(tch::Device::Cpu);
    (a - b).abs().max().double_value(&[])
}

/// max |ours - oracle| after checking that the shapes agree (a mismatch names `what`).
fn diff_same_shape(what: &str, ours: &Tensor, oracle: &Tensor) -> f64 {
    assert_eq!(
        ours.size(),
        oracle.size(),
        "{what}: shape {:?} vs oracle {:?}",
        ours.size(),
        oracle.size()
    );
    max_abs_diff(ours, oracle)
}

/// Asserts max |a - b| <= atol.
pub fn assert_close(what: &str, ours: &Tensor, oracle: &Tensor, atol: f64) {
    let d = diff_same_shape(what, ours, oracle);
    assert!(d <= atol, "{what}: max abs diff {d:e} > {atol:e}");
}

/// Asserts max |a - b| <= rtol * max |b| (relative to the tensor's scale, for gradients).
pub fn assert_rel_close(what: &str, ours: &Tensor, oracle: &Tensor, rtol: f64) {
    let d = diff_same_shape(what, ours, oracle);
    let scale = oracle
        .detach()
        .to_kind(Kind::Double)
        .abs()
        .max()
        .double_value(&[])
        .max(1e-12);
    assert!(
        d <= rtol * scale,
        "{what}: max abs diff {d:e} > {rtol:e} x scale {scale:e}"
    );
}

/// Compares the gradient of every trainable variable of `vs` with the oracle's `grad.<name>` tensors, and
/// checks that the oracle has a gradient for every variable (none silently skipped).
pub fn assert_grads(vs: &tch::nn::VarStore, fixture: &HashMap<String, Tensor>, rtol: f64) {
    let mut n = 0;
    for (name, var) in vs.variables() {
        if !var.requires_grad() {
            continue;
        }
        let key = format!("grad.{name}");
        let oracle = get(fixture, &key);
        let g = var.grad();
        assert!(g.defined(), "no gradient for `{name}`");
        assert_rel_close(&key, &g, oracle, rtol);
        n += 1;
    }
    assert!(n > 0, "no trainable variables compared");
}

/// Like [`assert_grads`], for models where torch leaves some parameters without a gradient (SegVol's IoU
/// head and unused prompt embeddings): a variable has a gradient here exactly when it has one in the
/// fixture, and then they agree within `rtol` of the oracle's scale. Gradients that are zero analytically
/// (attention key biases: softmax ignores a shift shared by all keys) are float noise on both sides and only
/// need to stay below 1e-8. At least `min_compared` gradients must be compared. Returns the largest
/// relative difference of the others.
pub fn assert_grads_same_support(
    vs: &tch::nn::VarStore,
    fixture: &HashMap<String, Tensor>,
    rtol: f64,
    min_compared: usize,
) -> f64 {
    let mut worst = 0f64;
    let mut compared = 0;
    for (name, var) in vs.variables() {
        if !var.requires_grad() {
            continue;
        }
        let key = format!("grad.{name}");
        let g = var.grad();
        match fixture.get(&key) {
            Some(oracle) => {
                assert!(g.defined(), "no gradient for `{name}` (torch has one)");
                let scale = oracle.abs().max().double_value(&[]);
                let diff = max_abs_diff(&g, oracle);
                if scale < 1e-8 {
                    assert!(
                        diff < 1e-8,
                        "{key}: {diff:e} on an analytically zero gradient"
                    );
                } else {
                    assert_rel_close(&key, &g, oracle, rtol);
                    worst = worst.max(diff / scale);
                }
                compared += 1;
            }
            None => assert!(
                !g.defined() || g.abs().max().double_value(&[]) == 0.0,
                "`{name}` has a gradient, torch has none"
            ),
        }
    }
    assert!(
        compared >= min_compared.max(1),
        "only {compared} gradients compared"
    );
    worst
}

/// VmRSS of this process in kB (to show that a shape-only build allocates nothing).
pub fn rss_kb() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}
