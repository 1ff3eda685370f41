//! `m3d coordinator` and `m3d status` as real processes: a coordinator killed with SIGKILL and started again
//! continues the job from its persisted state; with a token, workers without it are refused and the token appears
//! in no log line.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{listening_address, m3d_bin};
use m3d_coordinator::{
    CheckpointRef, Client, Code, JobPhase, Progress, Token, WorkerAction, WorkerInfo,
};

struct Coordinator {
    child: Child,
    url: String,
}

impl Coordinator {
    /// Starts `m3d coordinator --listen 127.0.0.1:0 args...`, logging to `log`; waits for its address line.
    fn start(args: &[&str], envs: &[(&str, &str)], log: &Path) -> Coordinator {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let mut cmd = Command::new(m3d_bin());
        cmd.arg("-vv")
            .args(["coordinator", "--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("M3D_TOKEN")
            .env("RUST_LOG", "trace")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn m3d coordinator");
        let addr = listening_address(&mut child);
        Coordinator {
            child,
            url: format!("http://{addr}"),
        }
    }

    fn kill(mut self) {
        // Child::kill is SIGKILL: no graceful shutdown, nothing flushed.
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }
}

fn worker(id: &str) -> WorkerInfo {
    WorkerInfo {
        worker_id: id.into(),
        host: "h".into(),
        collective_addr: format!("127.0.0.1:{}", 7000 + id.len()),
        gpus: 0,
        nccl_unique_id: Vec::new(),
    }
}

fn status_cli(url: &str, extra: &[&str], token: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(m3d_bin());
    cmd.args(["status", "--coordinator", url])
        .args(extra)
        .env_remove("M3D_TOKEN")
        .env("RUST_LOG", "warn");
    if let Some(t) = token {
        cmd.env("M3D_TOKEN", t);
    }
    cmd.output().expect("m3d status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_and_restarted_continues_with_the_same_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state").display().to_string();
    let log = dir.path().join("coordinator.log");
    let args = [
        "--state",
        &state,
        "--min-workers",
        "2",
        "--max-workers",
        "2",
        "--samples",
        "100",
        "--global-batch",
        "12",
        "--epochs",
        "2",
        "--heartbeat-timeout",
        "60s",
    ];
    let coord = Coordinator::start(&args, &[], &log);
    let mut tasks = Vec::new();
    for id in ["a", "b"] {
        let url = coord.url.clone();
        tasks.push(tokio::spawn(async move {
            Client::connect(&url, None)
                .await
                .expect("connect")
                .register(&worker(id))
                .await
                .expect("register")
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task").world_size, 2);
    }
    let mut c = Client::connect(&coord.url, None).await.expect("connect");
    for id in ["a", "b"] {
        c.report_progress(
            id,
            0,
            Progress {
                step: 9,
                loss: 0.5,
                samples: 54,
            },
        )
        .await
        .expect("progress");
    }
    // The commit is written before it is acknowledged, and carries the position with it.
    let ckpt = CheckpointRef {
        step: 9,
        url: "file:///ckpt/9".into(),
    };
    c.commit_checkpoint("a", 0, &ckpt).await.expect("commit");
    drop(c);
    coord.kill();

    let coord = Coordinator::start(&args, &[], &log);
    let mut c = Client::connect(&coord.url, None).await.expect("connect");
    let s = c.status().await.expect("status");
    assert_eq!(s.phase, JobPhase::Running);
    // 100 samples / 12 = 8 steps per epoch: global step 9 is epoch 1, step 1.
    assert_eq!(
        (s.generation, s.step, s.epoch, s.step_in_epoch),
        (0, 9, 1, 1)
    );
    assert_eq!(s.last_checkpoint, Some(ckpt));
    assert_eq!(
        c.heartbeat("b", 0).await.expect("hb").action,
        WorkerAction::Continue
    );

    let out = status_cli(&coord.url, &["--json"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(v["phase"], "running");
    assert_eq!(v["step"], 9);
    assert_eq!(v["members"].as_array().map(Vec::len), Some(2));
    let out = status_cli(&coord.url, &[], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("step 9/16 (epoch 1, step 1 in epoch)"),
        "{text}"
    );
    coord.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_refuses_workers_without_the_token_and_never_logs_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = "m3d-secret-5e1f0c2a9b";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{secret}\n")).expect("token file");
    let state = dir.path().join("state").display().to_string();
    let log = dir.path().join("coordinator.log");
    let tf = token_file.display().to_string();
    let coord = Coordinator::start(
        &[
            "--state",
            &state,
            "--token-file",
            &tf,
            "--samples",
            "1024",
            "--global-batch",
            "8",
            "--min-workers",
            "1",
        ],
        &[],
        &log,
    );

    for token in [None, Token::new("m3d-secret-5e1f0c2a9c")] {
        let mut c = Client::connect(&coord.url, token).await.expect("connect");
        let err = c.register(&worker("intruder")).await.expect_err("refused");
        assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    }
    let mut c = Client::connect(&coord.url, Token::new(secret))
        .await
        .expect("connect");
    let a = c
        .register(&worker("a"))
        .await
        .expect("register with the token");
    assert_eq!((a.rank, a.world_size), (0, 1));
    assert_eq!(
        c.status().await.expect("status").members.len(),
        1,
        "the refused worker never joined"
    );

    let out = status_cli(&coord.url, &[], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));
    let out = status_cli(&coord.url, &["--json"], Some(secret));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    coord.kill();

    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(
        logged.contains("refused a call without a valid bearer token"),
        "the log is real: {logged}"
    );
    assert!(logged.len() > 1000, "trace logging was on");
    assert!(
        !logged.contains(secret),
        "the token leaked into the coordinator's log"
    );
    let persisted =
        std::fs::read_to_string(dir.path().join("state").join("job.json")).expect("job.json");
    assert!(!persisted.contains(secret));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_with_exit_on_finish_exits_cleanly_once_the_job_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state").display().to_string();
    let log = dir.path().join("coordinator.log");
    let args = [
        "--state",
        &state,
        "--samples",
        "8",
        "--global-batch",
        "8",
        "--min-workers",
        "1",
        "--exit-on-finish",
    ];
    let mut coord = Coordinator::start(&args, &[], &log);
    let mut c = Client::connect(&coord.url, None).await.expect("connect");
    let a = c.register(&worker("only")).await.expect("register");
    assert_eq!(a.plan.total_steps(), 1);
    let p = Progress {
        step: 1,
        loss: 0.0,
        samples: 8,
    };
    assert_eq!(
        c.report_progress("only", 0, p).await.expect("progress"),
        WorkerAction::Stop
    );
    let mut status = None;
    for _ in 0..600 {
        if let Some(s) = coord.child.try_wait().expect("try_wait") {
            status = Some(s);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let status = status.expect("the coordinator did not exit after the job completed");
    assert!(status.success(), "{status:?}");
    let doc = std::fs::read_to_string(dir.path().join("state").join("job.json")).expect("job.json");
    assert!(doc.contains("\"phase\": \"completed\""), "{doc}");
}

/// Without a recipe the coordinator has no plan to fall back on: a missing --samples, --global-batch or
/// --min-workers is an error naming each, before anything listens.
#[test]
fn coordinator_without_a_recipe_or_an_explicit_plan_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state").display().to_string();
    let out = Command::new(m3d_bin())
        .args(["coordinator", "--listen", "127.0.0.1:0", "--state", &state])
        .args(["--global-batch", "8"])
        .env_remove("M3D_TOKEN")
        .output()
        .expect("spawn m3d coordinator");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("missing: --samples, --min-workers") && stderr.contains("no default plan"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "nothing listened"
    );
}

/// Resident memory of a process, from /proc (Linux).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// The control plane is its own small process: `m3d-coordinator` (and `m3d coordinator`, which hands over to
/// it) maps no libtorch and idles under 100 MiB resident (the `m3d` binary maps about 0.5 GiB of libtorch).
#[test]
fn the_coordinator_process_maps_no_libtorch_and_stays_small() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lean = m3d_bin().with_file_name("m3d-coordinator");
    assert!(lean.is_file(), "{} not built", lean.display());
    for via_m3d in [false, true] {
        let state = dir.path().join(format!("state-{via_m3d}"));
        let mut cmd = if via_m3d {
            let mut c = Command::new(m3d_bin());
            c.arg("coordinator");
            c
        } else {
            Command::new(&lean)
        };
        cmd.args(["--listen", "127.0.0.1:0", "--state"])
            .arg(&state)
            .args([
                "--samples",
                "4096",
                "--global-batch",
                "32",
                "--min-workers",
                "4",
            ])
            .env_remove("M3D_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn the coordinator");
        let _addr = listening_address(&mut child);
        let pid = child.id();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("proc maps");
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("proc exe");
        let rss = rss_bytes(pid);
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert!(
            !maps.contains("libtorch"),
            "via m3d: {via_m3d}: libtorch is mapped into {}",
            exe.display()
        );
        assert!(
            exe.ends_with("m3d-coordinator"),
            "via m3d: {via_m3d}: the coordinator runs as {}",
            exe.display()
        );
        assert!(
            rss < 100 << 20,
            "via m3d: {via_m3d}: the idle coordinator holds {} MiB",
            rss >> 20
        );
        eprintln!("via m3d: {via_m3d}: idle RSS {} MiB", rss >> 20);
    }
}
