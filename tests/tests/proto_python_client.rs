//! The wire contract as tools outside Rust see it: `buf lint` (buf's STANDARD rules, proto/buf.yaml) passes on
//! proto/, and a Python client generated from proto/ by the reference protoc (grpcio-tools) talks to a real
//! `m3d coordinator` process through `m3d.v2` and, on its unchanged paths, the deprecated `m3d.v1`
//! (tests/oracle/proto_client.py).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::{listening_address, m3d_bin, oracle, s, synth_cap_vqa, workspace_root};
use serde_json::Value;

/// buf as scripts/setup.sh installs it (npm, @bufbuild/buf): `M3D_BUF`, else
/// `<M3D_CACHE, default ~/.cache/m3d>/npm/node_modules/.bin/buf`.
fn buf() -> PathBuf {
    let p = std::env::var_os("M3D_BUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("M3D_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/m3d")
                })
                .join("npm/node_modules/.bin/buf")
        });
    assert!(
        p.is_file(),
        "buf not found at {}: run scripts/setup.sh (it installs @bufbuild/buf with npm), or set M3D_BUF",
        p.display()
    );
    p
}

fn run_buf(args: &[&str]) -> String {
    let out = Command::new(buf())
        .args(args)
        .current_dir(workspace_root().join("proto"))
        .output()
        .expect("run buf");
    assert!(
        out.status.success(),
        "buf {args:?} failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn buf_lint_passes_on_both_versions_of_the_contract() {
    // Both packages are in the module that `buf lint` checks (v1 with the exceptions buf.yaml names).
    let files = run_buf(&["ls-files"]);
    for f in [
        "proto/m3d/v1/coordinator.proto",
        "proto/m3d/v2/coordinator.proto",
    ] {
        assert!(files.lines().any(|l| l.trim() == f), "{f} not in\n{files}");
    }
    run_buf(&["lint"]);
}

/// Kills the coordinator when the test ends, passed or not.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A u64 of the proto3 JSON mapping (which writes 64-bit integers as strings); a missing field is 0.
fn u64_of(v: &Value) -> u64 {
    match v {
        Value::Null => 0,
        Value::String(t) => t.parse().expect("a 64-bit integer"),
        other => other.as_u64().expect("an integer"),
    }
}

#[test]
fn python_client_generated_by_protoc_talks_to_the_coordinator_in_v2_and_v1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cap, _) = synth_cap_vqa(dir.path(), 8);
    let token = "py-client-5ecret-token";
    let log = dir.path().join("coordinator.log");
    let recipe = workspace_root().join("recipes/clip-tiny.yaml");
    let child = Command::new(m3d_bin())
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--recipe",
            s(&recipe),
        ])
        .args(["--set", &format!("data.tasks.0.shards=[{cap}]")])
        // One worker forms the round at once (and the batch need only divide among 1 worker).
        .args(["--set", "train.global_batch=4", "--set", "workers.max=1"])
        .args(["--state", s(&dir.path().join("state"))])
        .args(["--min-workers", "1", "--max-workers", "1"])
        .env("M3D_TOKEN", token)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
        .spawn()
        .expect("spawn m3d coordinator");
    let mut coordinator = Proc(child);
    let addr = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        listening_address(&mut coordinator.0)
    }))
    .unwrap_or_else(|_| {
        panic!(
            "the coordinator did not start; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });

    let generated = dir.path().join("generated");
    std::fs::create_dir_all(&generated).expect("mkdir");
    let proto_root = workspace_root().join("proto/proto");
    let out = oracle(
        "proto_client.py",
        &[s(&proto_root), s(&generated), &addr, token],
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    drop(coordinator);

    // protoc compiled both packages, and every v1 message is wire-identical to its v2 counterpart.
    assert_eq!(v["generated"].as_array().map(Vec::len), Some(4), "{v}");
    for f in [
        "m3d/v1/coordinator_pb2_grpc.py",
        "m3d/v2/coordinator_pb2_grpc.py",
    ] {
        assert!(generated.join(f).is_file(), "{f} not generated");
    }
    assert_eq!(v["wire_identical_pairs"], 22, "{v}");

    // Without the token, or with a wrong one, both packages refuse.
    for (call, code) in v["refused"].as_object().expect("refused") {
        assert_eq!(code, "UNAUTHENTICATED", "{call}");
    }
    assert_eq!(v["refused"].as_object().map(|o| o.len()), Some(5));

    // With it: the pending job and its plan from the recipe's shards.
    let before = &v["before"];
    assert_eq!(before["state_name"], "JOB_STATE_PENDING", "{before}");
    assert_eq!(u64_of(&before["waiting"]), 0);
    assert!(before["members"].as_array().is_none_or(Vec::is_empty));
    let plan = &before["plan"];
    assert_eq!(u64_of(&plan["global_batch"]), 4, "{plan}");
    let samples = u64_of(&plan["samples"]);
    assert!(samples >= 4, "{plan}");

    // A registration forms a round of one: rank 0 of 1, with the same plan.
    let r = &v["register"];
    assert_eq!(
        [
            &r["rank"],
            &r["world_size"],
            &r["generation"],
            &r["local_rank"],
            &r["local_world_size"],
            &r["peers"]
        ]
        .map(u64_of),
        [0, 1, 0, 0, 1, 0],
        "{r}"
    );
    assert_eq!(r["plan"], *plan);
    assert!(u64_of(&r["heartbeat_interval_ms"]) > 0);
    assert_eq!(v["heartbeat"], "WORKER_ACTION_CONTINUE");
    assert_eq!(v["peers"], serde_json::json!(["py-0"]));
    // `LeaseWork` (v2 only) reaches the coordinator, which refuses it for a training job.
    let lease = v["lease_work"].as_str().unwrap_or_default();
    assert!(
        lease.starts_with("INVALID_ARGUMENT") && lease.contains("training"),
        "{lease}"
    );
    let steps = v["data_plan"].as_array().expect("data plan");
    assert_eq!(steps.len(), 2);
    for (i, step) in steps.iter().enumerate() {
        assert_eq!(u64_of(&step["step"]), i as u64);
        let batch: Vec<u64> = step["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .map(u64_of)
            .collect();
        assert_eq!(batch.len(), 4, "{step}");
        assert!(batch.iter().all(|&x| x < samples), "{step}");
    }
    let after = &v["after"];
    assert_eq!(after["state_name"], "JOB_STATE_RUNNING", "{after}");
    assert_eq!(after["members"][0]["worker_id"], "py-0");
    assert_eq!(v["v2_watch_first_equals_status"], true);

    // The deprecated v1 answers on /m3d.v1.Coordinator/JobStatus with the same job, byte for byte.
    let v1 = &v["v1"];
    assert_eq!(v1["state_name"], "JOB_STATE_RUNNING", "{v1}");
    assert_eq!(v1["status"]["members"], after["members"]);
    for check in [
        "same_bytes_as_v2",
        "raw_path_equals_stub",
        "watch_first_equals_status",
    ] {
        assert_eq!(v1[check], true, "{check}: {v1}");
    }
    assert_eq!(v1["heartbeat"], "WORKER_ACTION_CONTINUE");
    assert_eq!(v1["unknown_worker"], "NOT_FOUND");

    let text = std::fs::read_to_string(&log).expect("coordinator log");
    assert!(!text.contains(token), "the log shows the token");
}
