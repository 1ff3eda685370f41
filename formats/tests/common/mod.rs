//! Shared helpers of the oracle tests: locating the Python interpreter and running an oracle script.
#![allow(dead_code)]

use std::path::Path;

/// Runs `tests/oracle/<script> <args..>` and panics with its output unless it succeeds.
pub fn run_oracle(script: &str, args: &[&str]) -> String {
    m3d_testkit::run_python(
        &m3d_testkit::package_dir().join("tests/oracle").join(script),
        args,
    )
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
