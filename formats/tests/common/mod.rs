//! Shared helpers of the oracle tests: locating the Python interpreter and running an oracle script.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The oracle interpreter: `$M3D_PYTHON`, else `<workspace>/.venv/bin/python`. Panics (failing the test) when
/// it does not exist: an oracle test must never pass without its oracle.
pub fn python() -> PathBuf {
    let p = match std::env::var_os("M3D_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"),
    };
    assert!(
        p.exists(),
        "oracle Python interpreter not found at {} (set M3D_PYTHON to a Python with numpy/scipy/nibabel/Pillow)",
        p.display()
    );
    p
}

/// Runs `tests/oracle/<script> <args..>` and panics with its output unless it succeeds.
pub fn run_oracle(script: &str, args: &[&str]) -> String {
    let script_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/oracle")
        .join(script);
    let out = Command::new(python())
        .arg(&script_path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script_path.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "oracle {script} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Manifest lines written by an oracle script, split on tabs.
pub fn manifest(dir: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(dir.join("manifest.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

pub fn parse_shape(s: &str) -> Vec<usize> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().unwrap())
        .collect()
}
