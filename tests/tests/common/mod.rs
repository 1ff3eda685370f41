//! Helpers shared by the end-to-end tests: find the `m3d` binary and the Python oracle, run them as real
//! processes, and make small synthetic datasets.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

/// Runs `m3d args...`, returning its output whatever the exit status.
pub fn m3d(args: &[&str]) -> Output {
    Command::new(m3d_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("spawn m3d")
}

/// Runs `m3d args...` and requires success.
pub fn m3d_ok(args: &[&str]) -> String {
    let out = m3d(args);
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
