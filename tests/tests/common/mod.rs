//! Helpers shared by the end-to-end tests: find the `m3d` binary and the Python oracle, run them as real
//! processes, and make small synthetic datasets.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub use m3d_testkit::workspace_root;

/// The `m3d` binary of the same build as this test (target/<profile>/m3d), or `M3D_BIN`.
pub fn m3d_bin() -> PathBuf {
    if let Ok(p) = std::env::var("M3D_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/m3d
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("m3d"))
        .expect("target dir");
    assert!(
        bin.is_file(),
        "{} not found: build it first (`cargo build -p m3d`, or run the whole workspace's tests)",
        bin.display()
    );
    bin
}

/// Runs `m3d args...` (warnings and errors logged), returning its output whatever the exit status.
pub fn m3d(args: &[&str]) -> Output {
    m3d_env(args, &[("RUST_LOG", "warn")])
}

/// Runs `m3d args...` with `env` added to the environment, returning its output whatever the exit status.
pub fn m3d_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(m3d_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("spawn m3d")
}

/// Runs `m3d args...` and requires success.
pub fn m3d_ok(args: &[&str]) -> String {
    m3d_ok_env(args, &[("RUST_LOG", "warn")])
}

/// Runs `m3d args...` with `env` added and requires success.
pub fn m3d_ok_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = m3d_env(args, env);
    assert!(
        out.status.success(),
        "m3d {args:?} failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `m3d args...`, requires failure and returns stderr.
pub fn m3d_err(args: &[&str]) -> String {
    let out = m3d(args);
    assert!(
        !out.status.success(),
        "m3d {args:?} should have failed\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a Python oracle script from tests/oracle with arguments; requires success.
pub fn oracle(script: &str, args: &[&str]) -> String {
    m3d_testkit::run_python(&workspace_root().join("tests/oracle").join(script), args)
}

/// A small synthetic M3D-Data in `dir`.
pub fn synth_small(dir: &Path) {
    m3d_ok(&[
        "data-prep",
        "synth",
        dir.to_str().unwrap(),
        "--seed",
        "7",
        "--cap-cases",
        "4",
        "--seg-datasets",
        "1",
        "--seg-cases",
        "4",
        "--refseg-cases",
        "2",
    ]);
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Synthetic M3D-Cap and M3D-VQA shards in `dir` (`dir/shards/cap`, `dir/shards/vqa`), from `cap_cases` cases
/// with 64x64 slices; returns their URLs.
pub fn synth_cap_vqa(dir: &Path, cap_cases: usize) -> (String, String) {
    let raw = dir.join("raw");
    let cap = dir.join("shards/cap");
    let vqa = dir.join("shards/vqa");
    let p = |p: &Path| p.display().to_string();
    m3d_ok(&[
        "data-prep",
        "synth",
        &p(&raw),
        "--cap-cases",
        &cap_cases.to_string(),
        "--slice-size",
        "64x64",
    ]);
    m3d_ok(&[
        "data-prep",
        "cap",
        "--src",
        &p(&raw.join("M3D_Cap")),
        "--out",
        &p(&cap),
    ]);
    m3d_ok(&[
        "data-prep",
        "vqa",
        "--src",
        &p(&raw.join("M3D_VQA")),
        "--out",
        &p(&vqa),
        "--cap",
        &p(&cap),
    ]);
    (p(&cap), p(&vqa))
}

/// (step, loss) of every line of a run's `metrics.jsonl` (empty when there is none yet).
pub fn losses(run: &Path) -> Vec<(u64, f64)> {
    let Ok(text) = std::fs::read_to_string(run.join("metrics.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// Which parameters a comparison of two weight files covers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    All,
    /// All but [`Keys::Noisy`].
    Quiet,
    /// The parameters whose gradient is (nearly) pure rounding noise, which Adam normalises into updates of
    /// up to ±lr whose sign depends on the order of floating-point sums — any change of batch layout moves
    /// them, in torch's DDP as here:
    /// - BERT's attention key biases: their true gradient is exactly zero (a softmax does not change when the
    ///   same value is added to every key), so they receive rounding noise of ~1e-10;
    /// - BERT's token-type embeddings: one row shared by every token of the batch, whose gradient is a sum
    ///   over all of them that nearly cancels (measured: 3.2e-5 apart after 4 steps at lr 5e-4, while every
    ///   other parameter agrees within 2.5e-6).
    Noisy,
}

/// The largest absolute difference between the `keys` of two safetensors files (which must hold the same
/// keys), computed by the Python oracle.
pub fn param_diff_of(keys: Keys, a: &Path, b: &Path) -> f64 {
    let script = std::env::temp_dir().join(format!("m3d-diff-{}.py", std::process::id()));
    std::fs::write(
        &script,
        "import sys, json\nfrom safetensors.numpy import load_file\n\
         a, b = load_file(sys.argv[1]), load_file(sys.argv[2])\n\
         assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))\n\
         which = sys.argv[3]\n\
         noisy = lambda k: k.endswith('attention.self.key.bias') or 'token_type_embeddings' in k\n\
         keys = [k for k in a if which == 'all' or noisy(k) == (which == 'noisy')]\n\
         print(json.dumps(max([float(abs(a[k].astype('float64') - b[k].astype('float64')).max()) for k in keys] + [0.0])))\n",
    )
    .expect("write the diff script");
    let which = match keys {
        Keys::All => "all",
        Keys::Quiet => "quiet",
        Keys::Noisy => "noisy",
    };
    let out = m3d_testkit::run_python(
        &script,
        &[&a.display().to_string(), &b.display().to_string(), which],
    );
    out.trim().parse().expect("a number")
}

/// The largest difference between the `keys` of two runs' final weights (`<run>/final/model.safetensors`).
pub fn final_diff_of(keys: Keys, a: &Path, b: &Path) -> f64 {
    param_diff_of(
        keys,
        &a.join("final/model.safetensors"),
        &b.join("final/model.safetensors"),
    )
}

/// Polls `done` until it holds, failing the test after `timeout`; returns how long that took.
pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

/// The address a started `m3d coordinator` (stdout piped) listens on: its first line of stdout.
pub fn listening_address(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(
        child
            .stdout
            .take()
            .expect("the coordinator's stdout is piped"),
    )
    .read_line(&mut line)
    .expect("the address line");
    line.trim()
        .strip_prefix("m3d coordinator listening on ")
        .unwrap_or_else(|| panic!("the coordinator did not start: {line:?}"))
        .to_string()
}
