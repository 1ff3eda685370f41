//! The control plane off the training path, with real `m3d coordinator` and `m3d worker` processes: a worker
//! refuses a coordinator that plans another job than its recipe and data (naming the field and both values),
//! and a coordinator stopped with SIGSTOP for 10 s does not stop training (rank 0's metrics keep coming) — after
//! SIGCONT the job completes.

mod common;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use common::{listening_address, losses, m3d_bin, synth_cap_vqa, wait_for, workspace_root};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // A stopped process must be continued to die cleanly in every case.
        signal(&self.0, "CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), child.id().to_string()])
        .stderr(Stdio::null())
        .status();
}

fn recipe_args(sets: &[String]) -> Vec<String> {
    let recipe = workspace_root().join("recipes/clip-tiny.yaml");
    let mut out = vec!["--recipe".to_string(), recipe.display().to_string()];
    for s in sets {
        out.extend(["--set".to_string(), s.clone()]);
    }
    out
}

fn coordinator(args: &[String], dir: &Path, log: &str) -> (Proc, String) {
    let mut cmd = Command::new(m3d_bin());
    cmd.args(["coordinator", "--listen", "127.0.0.1:0", "--state"])
        .arg(dir.join(format!("{log}-state")))
        .args(args)
        .env_remove("M3D_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join(format!("{log}.log"))).unwrap(),
        ));
    let mut child = cmd.spawn().expect("spawn coordinator");
    let log_path = dir.join(format!("{log}.log"));
    let addr = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        listening_address(&mut child)
    }))
    .unwrap_or_else(|_| {
        panic!(
            "the coordinator did not start: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    });
    (Proc(child), format!("http://{addr}"))
}

fn worker(url: &str, args: &[String], id: &str, log: &Path) -> Proc {
    let child = Command::new(m3d_bin())
        .args(["worker", "--coordinator", url, "--worker-id", id])
        .args(args)
        .env_remove("M3D_TOKEN")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .expect("spawn worker");
    Proc(child)
}

fn wait_exit(p: &mut Proc, what: &str, timeout: Duration) -> ExitStatus {
    let mut status = None;
    wait_for(what, timeout, || {
        status = p.0.try_wait().expect("wait");
        status.is_some()
    });
    status.expect("exited")
}

#[test]
fn a_worker_refuses_a_coordinator_that_plans_another_job() {
    let dir = tempfile::tempdir().unwrap();
    let (cap, _) = synth_cap_vqa(&dir.path().join("a"), 8);
    let common = |batch: u32, shards: &str| {
        recipe_args(&[
            format!("data.tasks.0.shards=[{shards}]"),
            format!("train.global_batch={batch}"),
            "train.max_steps=2".into(),
            "workers.max=2".into(),
            format!("output.run={}", dir.path().join("run").display()),
        ])
    };
    // Another global batch: refused, naming the field and both values.
    let mut coord_args = common(4, &cap);
    coord_args.extend(["--min-workers", "1"].map(String::from));
    let (_c, url) = coordinator(&coord_args, dir.path(), "c1");
    let log = dir.path().join("w1.log");
    let mut w = worker(&url, &common(2, &cap), "w", &log);
    let code = wait_exit(&mut w, "the worker to refuse", Duration::from_secs(50));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!code.success(), "the worker trained: {text}");
    assert!(
        text.contains("the coordinator plans train.global_batch = 4, this worker's recipe says 2"),
        "{text}"
    );
    // Another training set of the same size (the same cases drawn with another seed): the fingerprints differ.
    let other = dir.path().join("b");
    let raw = other.join("raw");
    common::m3d_ok(&[
        "data-prep",
        "synth",
        raw.to_str().unwrap(),
        "--cap-cases",
        "8",
        "--slice-size",
        "64x64",
        "--seed",
        "99",
    ]);
    let other_cap = other.join("cap");
    common::m3d_ok(&[
        "data-prep",
        "cap",
        "--src",
        raw.join("M3D_Cap").to_str().unwrap(),
        "--out",
        other_cap.to_str().unwrap(),
    ]);
    let mut coord_args = common(2, other_cap.to_str().unwrap());
    coord_args.extend(["--min-workers", "1"].map(String::from));
    let (_c2, url) = coordinator(&coord_args, dir.path(), "c2");
    let log = dir.path().join("w2.log");
    let mut w = worker(&url, &common(2, &cap), "w", &log);
    let code = wait_exit(&mut w, "the worker to refuse", Duration::from_secs(50));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!code.success(), "the worker trained: {text}");
    assert!(
        text.contains("the coordinator plans the training set's fingerprint = "),
        "{text}"
    );
    assert!(!text.contains("train.global_batch"), "{text}");
}

#[test]
fn a_coordinator_stopped_for_10_s_does_not_stop_training_and_the_job_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (cap, _) = synth_cap_vqa(dir.path(), 8);
    let run = dir.path().join("run");
    let steps = 200;
    let args = recipe_args(&[
        format!("data.tasks.0.shards=[{cap}]"),
        "train.global_batch=2".into(),
        "workers.max=2".into(),
        format!("train.max_steps={steps}"),
        "train.log_every=1".into(),
        "checkpoint.every=0".into(),
        format!("output.run={}", run.display()),
    ]);
    let mut coord_args = args.clone();
    // The default heartbeat timeout (10 s): the pause is as long, so the coordinator must not count its own
    // absence as the workers' silence.
    coord_args.extend(["--min-workers", "2", "--exit-on-finish"].map(String::from));
    let (mut coord, url) = coordinator(&coord_args, dir.path(), "c");
    let _w0 = worker(&url, &args, "w0", &dir.path().join("w0.log"));
    let _w1 = worker(&url, &args, "w1", &dir.path().join("w1.log"));
    wait_for("the first steps", Duration::from_secs(40), || {
        losses(&run).len() >= 3
    });
    signal(&coord.0, "STOP");
    let at_stop = losses(&run).len();
    std::thread::sleep(Duration::from_secs(10));
    let after = losses(&run).len();
    signal(&coord.0, "CONT");
    eprintln!("steps while the coordinator was stopped: {at_stop} -> {after}");
    assert!(
        after > at_stop + 1,
        "training stalled with the coordinator: {at_stop} -> {after} steps"
    );
    let code = wait_exit(&mut coord, "the job to complete", Duration::from_secs(120));
    assert!(code.success(), "coordinator exited with {code}");
    let job: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("c-state/job.json")).expect("job.json"),
    )
    .unwrap();
    assert_eq!(job["phase"], "completed", "{job}");
    assert_eq!(job["restarts"], 0, "{job}");
    let l = losses(&run);
    assert_eq!(l.last().map(|p| p.0), Some(steps));
    assert!(run.join("final/model.safetensors").is_file());
}
