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

/// Which CPU kernels libtorch and the libraries under it use: ATen's vectorised kernels
/// (`ATEN_CPU_CAPABILITY`), MKL's matrix products (`MKL_ENABLE_INSTRUCTIONS`) and oneDNN's convolutions
/// (`ONEDNN_MAX_CPU_ISA`). Float results differ in their last bits from one set to another, as they do from one
/// CPU to another (another vector width, AMX, ...). Tests that compare two runs within a tolerance run them
/// under different sets, so a tolerance that holds only for one machine's kernels fails here, not on the next
/// machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// Whatever each library picks for this CPU (AVX-512 or AMX where present).
    Best,
    /// ATen's AVX2 kernels; MKL and oneDNN at most AVX2.
    Avx2,
    /// Every library on its most basic kernels (ATen's scalar-width `default`, SSE4.2 / SSE4.1).
    Basic,
}

impl Kernels {
    /// The environment that selects these kernels (with `RUST_LOG=warn`, as [`m3d`] runs).
    pub fn env(self) -> Vec<(&'static str, &'static str)> {
        let mut env = vec![("RUST_LOG", "warn")];
        match self {
            Kernels::Best => {}
            Kernels::Avx2 => env.extend([
                ("ATEN_CPU_CAPABILITY", "avx2"),
                ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
                ("ONEDNN_MAX_CPU_ISA", "AVX2"),
            ]),
            Kernels::Basic => env.extend([
                ("ATEN_CPU_CAPABILITY", "default"),
                ("MKL_ENABLE_INSTRUCTIONS", "SSE4_2"),
                ("ONEDNN_MAX_CPU_ISA", "SSE41"),
            ]),
        }
        env
    }
}

/// `--set`s that make the trained parameters a smooth function of the reduced gradients, for tests that
/// compare runs whose reductions sum in another order (another world size, other kernels, another CPU).
///
/// With Adam's default epsilon (1e-8) an update is lr·m̂/(√v̂ + 1e-8): Adam divides each gradient by its own
/// running magnitude, so a gradient that is pure rounding noise (~1e-10: BERT's attention key biases, whose true
/// gradient is zero; nearly cancelling sums such as the token-type embedding) becomes a full step of ±lr whose
/// sign depends on the order of the sums, and which parameters those are depends on the kernels and thread
/// counts. With epsilon 1 and gradients clipped to a global norm of 1 (so √v̂ ≤ 1), the update is
/// lr·m̂/(√v̂ + 1), whose derivative in any gradient is at most lr: a difference δg between two runs' gradients
/// moves the parameters apart by at most lr·δg per step, and noise stays noise. The learning rate is raised so
/// that parameters still travel (about lr·|g| per step).
pub const SMOOTH_ADAM: [&str; 2] = ["train.eps=1", "train.lr=0.5"];

/// How far two runs under [`SMOOTH_ADAM`] may end apart after at most 12 steps when only their summation
/// order differs. An f32 sum of n terms is exact to about n·2⁻²⁴ of the sum of the terms' magnitudes; the
/// gradients here are sums of up to ~10⁴ products (a GEMM's inner dimension times the batch), so two
/// summation orders differ by at most ~1e-4·(sum of magnitudes) ≲ 1e-5 per element for gradients clipped to
/// norm 1 (the in-process test measures relative gradient differences ≤ 1e-6; see
/// worker/tests/data_parallel.rs). Over S steps at most S·lr·δg = 12 · 0.5 · 1e-5 = 6e-5, plus the little that
/// curvature feeds back. A wrong reduction (a factor 2, a missing rank) moves parameters by the size of an
/// update, lr·|g| ≈ 1e-3 to 1e-1.
pub const SUMMATION_TOL: f64 = 1e-4;

/// The largest absolute difference between two safetensors files (which must hold the same keys), computed
/// by the Python oracle.
pub fn param_diff_of(a: &Path, b: &Path) -> f64 {
    let script = std::env::temp_dir().join(format!("m3d-diff-{}.py", std::process::id()));
    std::fs::write(
        &script,
        "import sys, json\nfrom safetensors.numpy import load_file\n\
         a, b = load_file(sys.argv[1]), load_file(sys.argv[2])\n\
         assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))\n\
         print(json.dumps(max([float(abs(a[k].astype('float64') - b[k].astype('float64')).max()) for k in a] + [0.0])))\n",
    )
    .expect("write the diff script");
    let out = m3d_testkit::run_python(
        &script,
        &[&a.display().to_string(), &b.display().to_string()],
    );
    out.trim().parse().expect("a number")
}

/// The largest difference between two runs' final weights (`<run>/final/model.safetensors`).
pub fn final_diff_of(a: &Path, b: &Path) -> f64 {
    param_diff_of(
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

/// Every file under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
