//! Python oracle: reads a default dataset with numpy, scipy.sparse, nibabel and PIL the way the reference
//! scripts do, and checks it against `synth_truth.json` (see `tests/oracle/check_synth.py`).

mod common;

use std::process::Command;

#[test]
fn python_readers_agree_with_truth() {
    let py = common::python();
    let dir = tempfile::tempdir().unwrap();
    m3d_synth::write_all(dir.path(), &m3d_synth::SynthConfig::default()).unwrap();
    let script = m3d_testkit::package_dir().join("tests/oracle/check_synth.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", py.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "oracle failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!("{stdout}");
}
