//! Checkpoints with real processes: a job killed with SIGKILL and resumed (with the same or another number of
//! workers) ends exactly where an uninterrupted job ends; a worker killed mid-run makes the job restart from
//! its last committed checkpoint by itself; a job killed mid-upload resumes from the checkpoint before; an
//! S3 server lost mid-upload fails the job clearly with nothing committed; an uncommitted checkpoint is never
//! loaded.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    final_diff_of, listening_address, losses, m3d, m3d_bin, m3d_env, m3d_err, m3d_ok, m3d_ok_env,
    synth_cap_vqa, wait_for, workspace_root, SMOOTH_ADAM, SUMMATION_TOL,
};

/// Credentials, region and endpoint of the test's S3 server, as the `m3d` processes read them.
fn s3_env(endpoint: &str) -> [(&'static str, &str); 4] {
    [
        ("AWS_ACCESS_KEY_ID", "AKIAM3DTEST"),
        ("AWS_SECRET_ACCESS_KEY", "m3d-test-secret"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", endpoint),
    ]
}

/// The fault-injection variable of `m3d_worker::failpoint`.
const FAILPOINTS: &str = "M3D_FAILPOINTS";

fn synth_cap(dir: &Path) -> String {
    synth_cap_vqa(dir, 16).0
}

/// `m3d train recipes/<recipe>` (a LaMed recipe) on the synthetic Cap and VQA shards, with `sets` as `--set`s
/// and `extra` flags after them.
fn lamed_train(
    recipe: &str,
    run: &Path,
    (cap, vqa): (&str, &str),
    sets: &[String],
    extra: &[&str],
) -> Vec<String> {
    let mut a = vec![
        "train".to_string(),
        workspace_root()
            .join("recipes")
            .join(recipe)
            .display()
            .to_string(),
    ];
    let data = [
        format!("output.run={}", run.display()),
        format!("data.tasks.0.shards=[{cap}]"),
        format!("data.tasks.1.shards=[{vqa}]"),
        format!("data.tasks.1.volumes=[{cap}]"),
    ];
    for s in data.iter().chain(sets) {
        a.push("--set".into());
        a.push(s.clone());
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn args(run: &Path, cap: &str, workers: usize, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "train".into(),
        workspace_root()
            .join("recipes/clip-tiny.yaml")
            .display()
            .to_string(),
        "--workers".into(),
        workers.to_string(),
    ];
    for s in [
        format!("output.run={}", run.display()),
        format!("data.tasks.0.shards=[{cap}]"),
        "train.max_steps=12".into(),
        "train.log_every=1".into(),
        "checkpoint.every=4".into(),
        "workers.max=3".into(),
    ] {
        a.push("--set".into());
        a.push(s);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn train_ok(a: &[String]) -> String {
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    m3d_ok(&refs)
}

/// Starts `m3d train` (with `env` added), waits until `until` exists, then SIGKILLs the supervisor (with the
/// coordinator in it) and every worker it started, as a lost node would lose them.
/// Runs `m3d train`, kills it and its workers (SIGKILL) as soon as every path of `until` exists.
fn train_and_kill(a: &[String], until: &[&Path], env: &[(&str, &str)]) {
    let mut child = Command::new(m3d_bin())
        .args(a)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let pids = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let pids = pids.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((_, pid)) = line.split_once(" pid ") {
                    pids.lock().unwrap().push(pid.trim().to_string());
                }
            }
        })
    };
    let t0 = Instant::now();
    while let Some(missing) = until.iter().find(|p| !p.exists()) {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "{} never appeared",
            missing.display()
        );
        if let Some(s) = child.try_wait().unwrap() {
            panic!(
                "m3d train ended ({s}) before {} appeared",
                missing.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut kill = vec!["-9".to_string(), child.id().to_string()];
    kill.extend(pids.lock().unwrap().iter().cloned());
    let _ = Command::new("kill").args(&kill).status();
    let _ = child.wait();
    let _ = reader.join();
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn killed_job_resumes_exactly_with_the_same_or_another_number_of_workers() {
    let dir = tempfile::tempdir().unwrap();
    let cap = synth_cap(dir.path());
    // Another world size sums in another order: SMOOTH_ADAM keeps that rounding from being amplified.
    let smooth: Vec<&str> = SMOOTH_ADAM.iter().flat_map(|s| ["--set", *s]).collect();
    let whole = dir.path().join("whole");
    train_ok(&args(&whole, &cap, 2, &smooth));
    let reference = losses(&whole);
    assert_eq!(reference.len(), 12);
    for (name, first, then) in [("same", 2, 2), ("fewer", 2, 1), ("more", 1, 3)] {
        let run = dir.path().join(name);
        train_and_kill(
            &args(&run, &cap, first, &smooth),
            &[&run.join("checkpoints/step-000000008/COMMIT")],
            &[],
        );
        let resume: Vec<&str> = smooth.iter().copied().chain(["--resume"]).collect();
        let out = train_ok(&args(&run, &cap, then, &resume));
        assert!(out.contains("resuming from step 8"), "{name}: {out}");
        let l = losses(&run);
        // Steps 1..=12 once each: none repeated, none missing.
        assert_eq!(
            l.iter().map(|p| p.0).collect::<Vec<_>>(),
            (1..=12).collect::<Vec<_>>(),
            "{name}"
        );
        // Steps 1..8 ran with `first` workers in both jobs: identical. Later steps: see SUMMATION_TOL; the
        // loss moves by at most |∇L|·δθ with gradients clipped to norm 1.
        let tol = if first == then { 0.0 } else { 1e-4 };
        for ((s, a), (_, b)) in reference.iter().zip(&l) {
            assert!((a - b).abs() <= tol, "{name}: step {s}: {a} vs {b}");
        }
        let d = final_diff_of(&whole, &run);
        if first == then {
            assert_eq!(
                d, 0.0,
                "{name}: a resumed run with the same workers is bit-identical"
            );
        } else {
            eprintln!("{name}: max parameter diff {d:e}");
            assert!(d < SUMMATION_TOL, "{name}: {d}");
        }
    }
}

#[test]
fn killed_worker_makes_the_job_restart_from_the_last_commit() {
    let dir = tempfile::tempdir().unwrap();
    let cap = synth_cap(dir.path());
    let run = dir.path().join("run");
    // The heartbeat timeout from the recipe (workers.heartbeat_timeout_s), not a flag.
    let a = args(&run, &cap, 2, &["--set", "workers.heartbeat_timeout_s=3"]);
    let mut child = Command::new(m3d_bin())
        .args(&a)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut lines = stdout.lines();
    let mut w1 = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(pid) = line.strip_prefix("worker w1 pid ") {
            w1 = Some(pid.trim().to_string());
            break;
        }
    }
    let w1 = w1.expect("worker w1's pid");
    // Step 4's checkpoint is uploaded in the background and committed with the coordinator at the end of the
    // first step after the upload finished: wait until the coordinator's state records that commit.
    let committed = || {
        std::fs::read(run.join("coordinator/job.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["last_checkpoint"]["step"].as_u64())
            .is_some_and(|s| s >= 4)
    };
    wait_for("the commit of step 4", Duration::from_secs(120), committed);
    Command::new("kill").args(["-9", &w1]).status().unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    let text = rest.join("\n");
    assert!(status.success(), "{text}");
    assert!(text.contains("1 restart(s)"), "{text}");
    let logs = std::fs::read_to_string(run.join("logs/w0.log")).unwrap();
    assert!(logs.contains("resumed from checkpoint"), "{logs}");
    let l = losses(&run);
    assert_eq!(l.last().map(|p| p.0), Some(12));
    assert_eq!(
        l.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>(),
        "the metrics of the broken round past the checkpoint are replaced"
    );
}

/// Each upload pauses between its files and its commit record (a fault-injection point), so the job can be
/// killed while step 8's files are in place and its commit record is not: the resumed job starts from step 4
/// and still ends exactly where the uninterrupted job ends.
#[test]
fn sigkill_during_an_upload_leaves_the_previous_checkpoint_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let cap = synth_cap(dir.path());
    let whole = dir.path().join("whole");
    train_ok(&args(&whole, &cap, 2, &[]));
    let run = dir.path().join("run");
    let step8 = run.join("checkpoints/step-000000008");
    train_and_kill(
        &args(&run, &cap, 2, &[]),
        // The files are uploaded concurrently: both must be in place (the failpoint then holds the commit back).
        &[
            &step8.join("model.safetensors"),
            &step8.join("optimizer.safetensors"),
        ],
        &[(FAILPOINTS, "checkpoint-before-commit=1500")],
    );
    assert!(step8.join("model.safetensors").is_file());
    assert!(
        !step8.join("COMMIT").exists(),
        "killed before its commit record"
    );
    assert!(run.join("checkpoints/step-000000004/COMMIT").is_file());
    let out = train_ok(&args(&run, &cap, 2, &["--resume"]));
    assert!(out.contains("resuming from step 4"), "{out}");
    let l = losses(&run);
    assert_eq!(
        l.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    assert_eq!(final_diff_of(&whole, &run), 0.0);
    // The abandoned step-8 files were replaced by a committed step 8 of the resumed run.
    assert!(step8.join("COMMIT").is_file());
}

/// The S3 server becomes unreachable (a proxy in front of it is cut) while step 4's checkpoint is uploading:
/// the upload is retried, then the job fails with an error naming the checkpoint and the store, in bounded
/// time; the bucket holds no commit record, so nothing can be resumed from the half-written checkpoint.
#[test]
fn s3_unreachable_mid_upload_fails_clearly_and_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cap = synth_cap(dir.path());
    let s3 = m3d_testkit::S3Server::start(&dir.path().join("moto.log"));
    s3.create_bucket("m3d-ckpt");
    let proxy = m3d_testkit::TcpProxy::start(&format!("127.0.0.1:{}", s3.port));
    let endpoint = proxy.endpoint();
    let env = s3_env(&endpoint);
    let run = dir.path().join("run");
    let a = args(
        &run,
        &cap,
        2,
        &["--set", "checkpoint.url=s3://m3d-ckpt/run"],
    );
    let mut child = Command::new(m3d_bin())
        .args(&a)
        .envs(env)
        .env(FAILPOINTS, "checkpoint-before-commit=3000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let t0 = Instant::now();
    while !s3
        .keys("m3d-ckpt", "run/step-000000004/")
        .iter()
        .any(|k| k.ends_with("optimizer.safetensors"))
    {
        assert!(t0.elapsed() < Duration::from_secs(120), "no upload began");
        assert!(child.try_wait().unwrap().is_none(), "the job ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy.cut();
    let cut_at = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if cut_at.elapsed() > Duration::from_secs(150) {
            let _ = child.kill();
            panic!("the job did not fail within 150 s of losing its store");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let failed_after = cut_at.elapsed();
    let stderr = err_reader.join().unwrap();
    assert!(!status.success(), "{stderr}");
    let log = std::fs::read_to_string(run.join("logs/w0.log")).unwrap();
    assert!(
        log.contains("uploading checkpoint step 4 to s3://m3d-ckpt/run failed after 4 attempts"),
        "{log}"
    );
    assert!(
        log.matches("checkpoint upload failed").count() >= 3,
        "retried: {log}"
    );
    assert!(
        stderr.contains("w0"),
        "the job's error names the failed worker: {stderr}"
    );
    assert!(!log.contains("m3d-test-secret") && !stderr.contains("m3d-test-secret"));
    eprintln!("failed {failed_after:?} after the store went away");
    proxy.restore();
    let keys = s3.keys("m3d-ckpt", "run/");
    assert!(
        keys.iter().any(|k| k.starts_with("run/step-000000004/")),
        "the files were written before the cut: {keys:?}"
    );
    assert!(
        !keys.iter().any(|k| k.ends_with("/COMMIT")),
        "nothing committed: {keys:?}"
    );
    let resume = args(
        &run,
        &cap,
        2,
        &["--set", "checkpoint.url=s3://m3d-ckpt/run", "--resume"],
    );
    let out = m3d_env(&resume.iter().map(String::as_str).collect::<Vec<_>>(), &env);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("no committed checkpoint under s3://m3d-ckpt/run"),
        "{e}"
    );
}

/// LoRA dropout on (LaMed stage 2, p = 0.05): libtorch's generator is seeded per step, so a killed and
/// resumed job draws the same dropout masks as the uninterrupted one and ends bit for bit where it ends.
#[test]
fn dropout_continues_exactly_after_a_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (cap, vqa) = synth_cap_vqa(dir.path(), 16);
    let sets = strings(&[
        "model.init_from=[]",
        "model.lora.dropout=0.05",
        "train.max_steps=8",
        "train.log_every=1",
        "checkpoint.every=2",
    ]);
    let stage2 = |run: &Path, extra: &[&str]| {
        let mut flags = vec!["--workers", "2"];
        flags.extend(extra);
        lamed_train("lamed-stage2-tiny.yaml", run, (&cap, &vqa), &sets, &flags)
    };
    let whole = dir.path().join("whole");
    train_ok(&stage2(&whole, &[]));
    let run = dir.path().join("run");
    train_and_kill(
        &stage2(&run, &[]),
        &[&run.join("checkpoints/step-000000004/COMMIT")],
        &[],
    );
    let out = train_ok(&stage2(&run, &["--resume"]));
    assert!(out.contains("resuming from step"), "{out}");
    let (a, b) = (losses(&whole), losses(&run));
    assert_eq!(a, b, "the same losses at every step");
    assert_eq!(final_diff_of(&whole, &run), 0.0);
}

#[test]
fn an_uncommitted_checkpoint_is_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let cap = synth_cap(dir.path());
    let run = dir.path().join("run");
    train_ok(&args(&run, &cap, 1, &[]));
    // A writer killed mid-upload leaves files without a commit record at a later step (the run is extended
    // to get past its last step, which is checkpointed).
    let partial = run.join("checkpoints/step-000000013");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("model.safetensors"), b"half").unwrap();
    let out = train_ok(&args(
        &run,
        &cap,
        1,
        &["--set", "train.max_steps=16", "--resume"],
    ));
    assert!(out.contains("resuming from step 12"), "{out}");
    // A committed checkpoint whose file changed is refused with its name.
    std::fs::write(
        run.join("checkpoints/step-000000016/model.safetensors"),
        b"corrupt",
    )
    .unwrap();
    let refs: Vec<String> = args(&run, &cap, 1, &["--set", "train.max_steps=20", "--resume"]);
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    let out = m3d(&refs);
    assert!(!out.status.success());
    let logs = std::fs::read_to_string(run.join("logs/w0.log")).unwrap();
    assert!(
        logs.contains("step-000000016/model.safetensors") && logs.contains("CRC-32"),
        "{logs}"
    );
    // Without --resume, old checkpoints are not silently mixed with a new run.
    let out = m3d(&refs[..refs.len() - 1]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    let _ = PathBuf::new();
}

/// Workers started before their coordinator wait for it (pods start in any order); `m3d coordinator` killed
/// with SIGKILL mid-run and started again on the same address and state: the workers wait for it again and
/// the job runs to the end.
#[test]
fn restarted_coordinator_continues_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let cap = synth_cap(dir.path());
    let run = dir.path().join("run");
    let recipe = workspace_root()
        .join("recipes/clip-tiny.yaml")
        .display()
        .to_string();
    let mut recipe_args: Vec<String> = vec!["--recipe".into(), recipe];
    for s in [
        format!("output.run={}", run.display()),
        format!("data.tasks.0.shards=[{cap}]"),
        "train.max_steps=30".into(),
        "train.log_every=1".into(),
        "checkpoint.every=10".into(),
    ] {
        recipe_args.push("--set".into());
        recipe_args.push(s);
    }
    let state = dir.path().join("state").display().to_string();
    // Returns the child once it prints the address it listens on.
    let start_coordinator = |listen: &str| {
        let mut c = Command::new(m3d_bin());
        c.args(["coordinator", "--listen", listen, "--state", &state])
            .args([
                "--min-workers",
                "2",
                "--heartbeat-timeout",
                "10s",
                "--exit-on-finish",
            ])
            .args(&recipe_args)
            .env_remove("M3D_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = c.spawn().unwrap();
        let addr = listening_address(&mut child);
        (child, addr)
    };
    // A free port for the coordinator that starts after its workers.
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .to_string();
    let url = format!("http://{listen}");
    let mut workers: Vec<std::process::Child> = ["w0", "w1"]
        .iter()
        .map(|id| {
            Command::new(m3d_bin())
                .args(["worker", "--coordinator", &url, "--worker-id", id])
                .args(&recipe_args)
                .env_remove("M3D_TOKEN")
                .stdout(Stdio::null())
                .stderr(Stdio::from(
                    std::fs::File::create(dir.path().join(format!("{id}.log"))).unwrap(),
                ))
                .spawn()
                .unwrap()
        })
        .collect();
    // Each step waits on the workers' own logs, not on a clock, so that a loaded machine cannot reorder it.
    // The coordinator starts once both workers are waiting for it (well within their 60 s patience).
    let log_of = |id: &str| {
        std::fs::read_to_string(dir.path().join(format!("{id}.log"))).unwrap_or_default()
    };
    let waits = |id: &str, connecting: bool| {
        log_of(id).lines().any(|l| {
            l.contains("coordinator unreachable; retrying")
                && l.contains("what=connecting") == connecting
        })
    };
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let t0 = Instant::now();
        while !done() {
            assert!(
                t0.elapsed() < Duration::from_secs(45),
                "timed out waiting for {what}\nw0:\n{}\nw1:\n{}",
                log_of("w0"),
                log_of("w1")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    until("both workers to wait for the coordinator", &|| {
        waits("w0", true) && waits("w1", true)
    });
    let (mut coordinator, _) = start_coordinator(&listen);
    wait_for("step 5", Duration::from_secs(120), || {
        losses(&run).len() >= 5
    });
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    // Steps do not wait for the coordinator, but a checkpoint commit or the last step's report does: a worker
    // soon waits for it; restart it then.
    until("a worker to wait for the killed coordinator", &|| {
        waits("w0", false) || waits("w1", false)
    });
    let (mut coordinator, _) = start_coordinator(&listen);
    let exits: Vec<_> = workers.iter_mut().map(|w| w.wait().unwrap()).collect();
    if exits.iter().any(|s| !s.success()) {
        let logs: Vec<String> = ["w0", "w1"]
            .iter()
            .zip(&exits)
            .map(|(id, s)| format!("worker {id}: {s}\n{}", log_of(id)))
            .collect();
        panic!("a worker failed\n{}", logs.join("\n"));
    }
    let _ = coordinator.wait();
    let l = losses(&run);
    assert_eq!(l.last().map(|p| p.0), Some(30));
    assert!(run.join("final/model.safetensors").is_file());
}

/// `m3d merge-lora` folds the adapters exactly as `W + (alpha / r) B A`, and `m3d export --vision-encoder`
/// writes M3D-CLIP's ViT in the `pretrained_ViT` layout that MONAI's ViT loads.
#[test]
fn export_and_merge_lora_write_weights_the_oracle_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (cap, vqa) = synth_cap_vqa(dir.path(), 16);
    let stage1 = dir.path().join("stage1");
    let two = strings(&["train.max_steps=2"]);
    train_ok(&lamed_train(
        "lamed-stage1-tiny.yaml",
        &stage1,
        (&cap, &vqa),
        &two,
        &[],
    ));
    let stage2 = dir.path().join("stage2");
    train_ok(&lamed_train(
        "lamed-stage2-tiny.yaml",
        &stage2,
        (&cap, &vqa),
        &[
            two[0].clone(),
            format!("model.init_from.0.path={}", stage1.join("final").display()),
            "checkpoint.every=0".into(),
        ],
        &[],
    ));
    let merged = dir.path().join("merged");
    m3d_ok(&[
        "merge-lora",
        "--from",
        stage2.join("final").to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(merged.join("config.json").is_file() && merged.join("tokenizer.json").is_file());
    let script = dir.path().join("merge_oracle.py");
    std::fs::write(
        &script,
        r#"
import json, sys
import torch
from safetensors.torch import load_file
src, adapter, merged = sys.argv[1], sys.argv[2], sys.argv[3]
w = load_file(src)
cfg = json.load(open(adapter))
scale = cfg["lora_alpha"] / cfg["r"]
m = load_file(merged)
assert not any("lora_" in k for k in m), "lora keys left"
base = {k: v for k, v in w.items() if "lora_" not in k}
assert sorted(base) == sorted(m), sorted(set(base) ^ set(m))
worst, n = 0.0, 0
for k, v in base.items():
    mod = k[: -len(".weight")] if k.endswith(".weight") else None
    a, b = (w.get(f"{mod}.lora_A.weight"), w.get(f"{mod}.lora_B.weight")) if mod else (None, None)
    want = v + scale * (b @ a) if a is not None else v
    n += a is not None
    worst = max(worst, (want - m[k]).abs().max().item())
print(json.dumps({"worst": worst, "merged": n}))
"#,
    )
    .unwrap();
    let out = m3d_testkit::run_python(
        &script,
        &[
            stage2.join("final/model.safetensors").to_str().unwrap(),
            stage2
                .join("final/adapter/adapter_config.json")
                .to_str()
                .unwrap(),
            merged.join("model.safetensors").to_str().unwrap(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["merged"].as_u64().unwrap() >= 14, "{v}");
    assert!(v["worst"].as_f64().unwrap() < 1e-6, "{v}");

    // The CLIP vision encoder alone, loaded into MONAI's ViT.
    let clip = dir.path().join("clip");
    train_ok(&args(&clip, &cap, 1, &[]));
    let vit = dir.path().join("vit");
    m3d_ok(&[
        "export",
        "--vision-encoder",
        "--from",
        clip.join("final").to_str().unwrap(),
        "--out",
        vit.to_str().unwrap(),
    ]);
    let script = dir.path().join("vit_oracle.py");
    std::fs::write(
        &script,
        r#"
import json, sys
from safetensors.torch import load_file
from monai.networks.nets import ViT
sd = load_file(sys.argv[1])
net = ViT(in_channels=1, img_size=(32, 256, 256), patch_size=(8, 32, 32), hidden_size=64, mlp_dim=128,
          num_layers=2, num_heads=4, proj_type="perceptron", classification=True, dropout_rate=0.0)
missing, unexpected = net.load_state_dict(sd, strict=False)
missing = [k for k in missing if not k.startswith("classification_head") and "norm_cross_attn" not in k]
print(json.dumps({"missing": missing, "unexpected": list(unexpected), "keys": len(sd)}))
"#,
    )
    .unwrap();
    let out = m3d_testkit::run_python(
        &script,
        &[vit.join("pretrained_ViT.safetensors").to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["missing"], serde_json::json!([]), "{v}");
    assert_eq!(v["unexpected"], serde_json::json!([]), "{v}");
}

/// Checkpoints written straight to an S3-protocol server (moto on loopback) and a killed job resumed from
/// them: the same final parameters as the job that was never interrupted.
#[test]
fn checkpoints_in_s3_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cap = synth_cap(dir.path());
    let s3 = m3d_testkit::S3Server::start(&dir.path().join("moto.log"));
    s3.create_bucket("m3d-ckpt");
    let endpoint = s3.endpoint();
    let env = s3_env(&endpoint);
    let run_with = |run: &Path, url: &str, extra: &[&str]| {
        let mut a = args(run, &cap, 2, extra);
        a.push("--set".into());
        a.push(format!("checkpoint.url={url}"));
        a
    };
    let ok = |a: &[String]| m3d_ok_env(&a.iter().map(String::as_str).collect::<Vec<_>>(), &env);
    let whole = dir.path().join("whole");
    ok(&run_with(&whole, "s3://m3d-ckpt/whole", &[]));
    // The same job, killed (with its workers) after step 8's checkpoint was committed.
    let part = dir.path().join("part");
    let mut child = Command::new(m3d_bin())
        .args(run_with(&part, "s3://m3d-ckpt/part", &[]))
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut pids = vec![child.id().to_string()];
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while pids.len() < 3 {
        let line = lines.next().expect("worker pids").unwrap();
        if let Some((_, pid)) = line.split_once(" pid ") {
            pids.push(pid.trim().to_string());
        }
    }
    // Killed once step 8's commit record is in the bucket (its upload runs behind the steps, so a step count
    // alone would race a slow server).
    wait_for("step 8's commit record", Duration::from_secs(120), || {
        !s3.keys("m3d-ckpt", "part/step-000000008/COMMIT").is_empty()
    });
    let mut kill = vec!["-9".to_string()];
    kill.extend(pids);
    Command::new("kill").args(&kill).status().unwrap();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(300));
    let out = ok(&run_with(&part, "s3://m3d-ckpt/part", &["--resume"]));
    assert!(
        out.contains("resuming from step 8 (s3://m3d-ckpt/part/step-000000008)"),
        "{out}"
    );
    assert_eq!(final_diff_of(&whole, &part), 0.0);
    let log = std::fs::read_to_string(part.join("logs/w0.log")).unwrap();
    assert!(!log.contains("m3d-test-secret"));
}

/// `--init-from` starts LaMed stage 2 from a committed stage-1 checkpoint (not its final weights), keeping the
/// recipe's mapping of that entry, with the tokenizer saved in the checkpoint: the parameters stage 2 does not
/// train are exactly the checkpoint's. An uncommitted step folder is refused with its name.
#[test]
fn init_from_starts_a_new_stage_from_a_committed_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (cap, vqa) = synth_cap_vqa(dir.path(), 16);
    // Keep step 2 beside the final step 4's checkpoint.
    let sets = strings(&[
        "train.max_steps=4",
        "checkpoint.every=2",
        "checkpoint.keep_last=2",
    ]);
    let lamed = |recipe: &str, run: &Path, extra: &[&str]| {
        lamed_train(recipe, run, (&cap, &vqa), &sets, extra)
    };
    let stage1 = dir.path().join("stage1");
    train_ok(&lamed("lamed-stage1-tiny.yaml", &stage1, &[]));
    let ckpt = stage1.join("checkpoints/step-000000002");
    assert!(
        ckpt.join("tokenizer.json").is_file(),
        "the checkpoint holds the tokenizer"
    );
    let stage2 = dir.path().join("stage2");
    let out = train_ok(&lamed(
        "lamed-stage2-tiny.yaml",
        &stage2,
        &["--init-from", ckpt.to_str().unwrap()],
    ));
    assert!(out.contains("loss"), "{out}");
    let script = dir.path().join("compare.py");
    std::fs::write(
        &script,
        r#"
import json, sys
from safetensors.numpy import load_file
ckpt, final1, final2 = (load_file(p) for p in sys.argv[1:4])
k = "model.embed_tokens.weight"
print(json.dumps({"from_ckpt": float(abs(ckpt[k] - final2[k]).max()),
                  "from_final": float(abs(final1[k] - final2[k]).max())}))
"#,
    )
    .unwrap();
    let out = m3d_testkit::run_python(
        &script,
        &[
            ckpt.join("model.safetensors").to_str().unwrap(),
            stage1.join("final/model.safetensors").to_str().unwrap(),
            stage2.join("final/model.safetensors").to_str().unwrap(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["from_ckpt"].as_f64(), Some(0.0), "{v}");
    assert!(
        v["from_final"].as_f64().unwrap() > 1e-6,
        "step 2 differs from step 4: {v}"
    );

    // Stage 2 from `init`, which must be refused: its stderr and first worker's log.
    let refused = |init: &Path, run: &str| {
        let a = lamed(
            "lamed-stage2-tiny.yaml",
            &dir.path().join(run),
            &["--init-from", init.to_str().unwrap()],
        );
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = m3d(&refs);
        assert!(!out.status.success());
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.path().join(run).join("logs/w0.log")).unwrap_or_default()
        )
    };
    let text = refused(&stage1.join("checkpoints/step-000000003"), "bad");
    assert!(
        text.contains("step-000000003/COMMIT") && text.contains("not committed"),
        "{text}"
    );

    // A stage-1 run that has not finished: its `final/` is named as missing, with the run that writes it,
    // not as a weight file of an unknown format.
    let unfinished = dir.path().join("stage1-not-run/final");
    let text = refused(&unfinished, "bad2");
    let run = dir.path().join("stage1-not-run");
    assert!(
        text.contains(&format!("{} does not exist", unfinished.display()))
            && text.contains(&format!("output.run is `{}`", run.display()))
            && !text.contains("unknown weight format"),
        "{text}"
    );
}

/// `--fresh` deletes this job's checkpoint folders (`step-*`, committed or not) and its job state, and nothing
/// else under the checkpoint URL: in a folder, and in a bucket whose root is the checkpoint URL and which holds
/// other data.
#[test]
fn fresh_deletes_only_the_checkpoints_and_the_job_state() {
    let dir = tempfile::tempdir().unwrap();
    let cap = synth_cap(dir.path());
    let short = |steps: &str, every: &str, extra: &[&str]| -> Vec<String> {
        let mut v = strings(&["--set", steps, "--set", every]);
        v.extend(strings(extra));
        v
    };
    let run_args = |run: &Path, flags: &[String]| {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        args(run, &cap, 1, &flags)
    };
    let first = short("train.max_steps=4", "checkpoint.every=2", &[]);
    // The second run writes no checkpoint: whatever step folder is left was not deleted.
    let fresh = short("train.max_steps=2", "checkpoint.every=0", &["--fresh"]);

    let run = dir.path().join("run");
    let ckpts = run.join("checkpoints");
    train_ok(&run_args(&run, &first));
    let other = ["other/keep.txt", "notes.txt", "step-notes.txt"];
    for name in other {
        let path = ckpts.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, name).unwrap();
    }
    // A writer's leftover: files without a commit record.
    std::fs::create_dir_all(ckpts.join("step-000000003")).unwrap();
    std::fs::write(ckpts.join("step-000000003/model.safetensors"), b"half").unwrap();
    let step_files: usize = std::fs::read_dir(&ckpts)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("step-0")
        })
        .map(|p| std::fs::read_dir(p).unwrap().count())
        .sum();
    assert!(run.join("coordinator/job.json").is_file());
    let out = train_ok(&run_args(&run, &fresh));
    let want = format!(
        "--fresh: deleted 3 checkpoints (step-000000002 .. step-000000004), {step_files} objects under {}, \
         and the job state {}",
        ckpts.display(),
        run.join("coordinator").display()
    );
    assert!(out.contains(&want), "{want}\n{out}");
    let mut left: Vec<String> = common::walk(&ckpts)
        .iter()
        .map(|p| p.strip_prefix(&ckpts).unwrap().display().to_string())
        .collect();
    left.sort();
    let mut want: Vec<String> = strings(&other);
    want.sort();
    assert_eq!(left, want);
    for name in other {
        assert_eq!(std::fs::read_to_string(ckpts.join(name)).unwrap(), name);
    }
    assert_eq!(
        losses(&run).iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![1, 2]
    );

    // The same in a bucket: the checkpoint URL is the bucket itself.
    let s3 = m3d_testkit::S3Server::start(&dir.path().join("moto.log"));
    s3.create_bucket("m3d-shared");
    for name in other {
        s3.put_object("m3d-shared", name, name.as_bytes());
    }
    let endpoint = s3.endpoint();
    let env = s3_env(&endpoint);
    let in_bucket = ["--set", "checkpoint.url=s3://m3d-shared"];
    let ok = |a: &[String]| m3d_ok_env(&a.iter().map(String::as_str).collect::<Vec<_>>(), &env);
    let run = dir.path().join("run-s3");
    ok(&run_args(
        &run,
        &[first.clone(), strings(&in_bucket)].concat(),
    ));
    let keys = s3.keys("m3d-shared", "");
    assert!(
        keys.iter().any(|k| k.starts_with("step-000000004/")),
        "{keys:?}"
    );
    let step_keys = keys.iter().filter(|k| k.starts_with("step-0")).count();
    let out = ok(&run_args(
        &run,
        &[fresh.clone(), strings(&in_bucket)].concat(),
    ));
    assert!(
        out.contains(&format!(
            "--fresh: deleted 2 checkpoints (step-000000002 .. step-000000004), {step_keys} objects under \
             s3://m3d-shared, and the job state"
        )),
        "{out}"
    );
    let mut want: Vec<String> = strings(&other);
    want.sort();
    assert_eq!(s3.keys("m3d-shared", ""), want);
}

/// The run's last step is checkpointed, so `--resume` with a larger `train.max_steps` extends a finished run
/// by the new steps only (and with the same one there is nothing to do). A resume whose recipe changed the
/// run's global batch is refused, naming the field, both values and the checkpoint; `--accept-changed` lets it
/// go ahead.
#[test]
fn resume_extends_a_finished_run_and_refuses_another_runs_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cap = synth_cap(dir.path());
    let run = dir.path().join("run");
    let run_args = |flags: &[&str]| args(&run, &cap, 1, flags);
    let fails = |a: Vec<String>| m3d_err(&a.iter().map(String::as_str).collect::<Vec<_>>());
    train_ok(&run_args(&["--set", "train.max_steps=8"]));
    assert!(run.join("checkpoints/step-000000008/COMMIT").is_file());
    let first = losses(&run);
    let e = fails(run_args(&["--set", "train.max_steps=8", "--resume"]));
    assert!(
        e.contains("step-000000008 is at step 8") && e.contains("nothing is left to train"),
        "{e}"
    );

    let out = train_ok(&run_args(&["--set", "train.max_steps=12", "--resume"]));
    assert!(out.contains("resuming from step 8"), "{out}");
    let extended = losses(&run);
    assert_eq!(
        extended.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    assert_eq!(&extended[..8], &first[..], "steps 1..8 are not run again");
    assert!(run.join("checkpoints/step-000000012/COMMIT").is_file());

    let changed = [
        "--set",
        "train.max_steps=16",
        "--set",
        "train.global_batch=6",
        "--resume",
    ];
    let e = fails(run_args(&changed));
    assert!(
        e.contains(
            "step-000000012 was taken in another run: train.global_batch: checkpoint 12, recipe 6"
        ) && e.contains("--accept-changed train.global_batch"),
        "{e}"
    );
    let e = fails(run_args(
        &[&changed[..], &["--accept-changed", "train.seed"][..]].concat(),
    ));
    assert!(
        e.contains("train.global_batch: checkpoint 12, recipe 6"),
        "{e}"
    );
    let e = fails(run_args(
        &[&changed[..], &["--accept-changed", "train.batch"][..]].concat(),
    ));
    assert!(
        e.contains("train.batch") && e.contains("train.global_batch"),
        "{e}"
    );

    let accepted = [
        &changed[..],
        &["--accept-changed", "train.global_batch"][..],
    ]
    .concat();
    let out = train_ok(&run_args(&accepted));
    assert!(
        out.contains("resuming from step 12")
            && out.contains("--accept-changed train.global_batch: resuming with train.global_batch: checkpoint 12, recipe 6"),
        "{out}"
    );
    assert_eq!(
        losses(&run).iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=16).collect::<Vec<_>>()
    );
}
