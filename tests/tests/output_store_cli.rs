//! A job whose every output is in object storage (a moto S3 server on loopback): shards, checkpoints and
//! `output.run` on `s3://`. Its metrics are readable while it trains (`m3d plot`, `m3d status --run`), a killed
//! and resumed job leaves each step's line once, `final/` is complete in the bucket and loads as another
//! run's initial weights, and the supervisor's logs and job state stay in a local folder.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{m3d_bin, m3d_ok_env, wait_for, workspace_root};

const SECRET: &str = "m3d-output-secret";

fn env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "AKIAM3DTEST".into()),
        ("AWS_SECRET_ACCESS_KEY", SECRET.into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", endpoint.into()),
        ("RUST_LOG", "warn".into()),
    ]
}

fn refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// `m3d train recipes/clip-tiny.yaml` on `cap` into `run`, one worker.
fn train_args(run: &str, cap: &str, work: &Path, sets: &[&str], extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "train".into(),
        workspace_root()
            .join("recipes/clip-tiny.yaml")
            .display()
            .to_string(),
        "--workers".into(),
        "1".into(),
        "--work-dir".into(),
        work.display().to_string(),
    ];
    let base = [
        format!("output.run={run}"),
        format!("data.tasks.0.shards=[{cap}]"),
        "train.log_every=1".into(),
        "train.global_batch=4".into(),
        "workers.max=2".into(),
    ];
    for s in base.iter().map(String::as_str).chain(sets.iter().copied()) {
        a.push("--set".into());
        a.push(s.to_string());
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn ok(args: &[String], env: &[(&str, &str)]) -> String {
    m3d_ok_env(&args.iter().map(String::as_str).collect::<Vec<_>>(), env)
}

/// `m3d status --run URL --json`: (lines, last step).
fn metrics_status(run: &str, env: &[(&str, &str)]) -> (u64, u64) {
    let out = m3d_ok_env(&["status", "--run", run, "--json"], env);
    let v: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    (
        v["lines"].as_u64().unwrap(),
        v["last"]["step"].as_u64().unwrap_or(0),
    )
}

#[test]
fn a_job_with_every_output_in_s3_is_readable_while_it_trains_and_loads_after() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = m3d_testkit::S3Server::start(&dir.path().join("moto.log"));
    s3.create_bucket("m3d");
    let env = env(&s3.endpoint());
    let env = refs(&env);
    let raw = dir.path().join("raw");
    let p = |p: &Path| p.display().to_string();
    m3d_ok_env(
        &[
            "data-prep",
            "synth",
            &p(&raw),
            "--cap-cases",
            "8",
            "--slice-size",
            "64x64",
        ],
        &env,
    );
    let cap = "s3://m3d/shards/cap";
    m3d_ok_env(
        &[
            "data-prep",
            "cap",
            "--src",
            &p(&raw.join("M3D_Cap")),
            "--out",
            cap,
        ],
        &env,
    );

    let run = "s3://m3d/runs/clip";
    let work = dir.path().join("work");
    let sets = [
        "train.max_steps=8",
        "checkpoint.every=2",
        "output.metrics_flush_s=0",
    ];
    // Each checkpoint upload pauses before its commit record: the job runs long enough to be read mid-way.
    let mut job_env = env.clone();
    job_env.push(("M3D_FAILPOINTS", "checkpoint-before-commit=2500"));
    let stderr = dir.path().join("train.err");
    let mut child = Command::new(m3d_bin())
        .args(train_args(run, cap, &work, &sets, &[]))
        .envs(job_env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut pids = vec![child.id().to_string()];
    while pids.len() < 2 {
        let Some(line) = lines.next().map(Result::unwrap) else {
            panic!(
                "m3d train ended: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        };
        if line.starts_with("m3d train") {
            assert!(
                line.contains(&format!(
                    "run {run}; logs and job state in {}",
                    work.display()
                )),
                "{line}"
            );
        }
        if let Some((_, pid)) = line.split_once(" pid ") {
            pids.push(pid.trim().to_string());
        }
    }

    // Read while it trains: as soon as the first part holds a line.
    wait_for("the first metrics part", Duration::from_secs(180), || {
        !s3.keys("m3d", "runs/clip/metrics/part-00000.jsonl")
            .is_empty()
    });
    assert!(child.try_wait().unwrap().is_none());
    let out = m3d_ok_env(&["plot", run, "--out", "s3://m3d/plots/during.png"], &env);
    assert!(out.contains("wrote s3://m3d/plots/during.png"), "{out}");
    assert_eq!(s3.keys("m3d", "plots/"), ["plots/during.png"]);
    let status = m3d_ok_env(&["status", "--run", run], &env);
    assert!(status.starts_with("metrics: step "), "{status}");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the job ended before it was read"
    );
    assert!(s3.keys("m3d", "runs/clip/final/").is_empty());

    // Killed (with its worker) once step 4's checkpoint is committed, then resumed: the lines after step 4
    // are cut back and written again, each step once.
    wait_for("step 4's commit record", Duration::from_secs(180), || {
        !s3.keys("m3d", "runs/clip/checkpoints/step-000000004/COMMIT")
            .is_empty()
    });
    let mut kill = vec!["-9".to_string()];
    kill.extend(pids);
    Command::new("kill").args(&kill).status().unwrap();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(300));
    // Steps 5 and 6 train while step 4's upload pauses (the loop waits for it only at step 6's checkpoint),
    // so the killed job had flushed lines after the step it resumes from.
    let (_, before) = metrics_status(run, &env);
    assert!(before > 4, "{before}");
    let out = ok(&train_args(run, cap, &work, &sets, &["--resume"]), &env);
    assert!(out.contains("resuming from step 4"), "{out}");
    assert!(
        out.contains(&format!(
            "final weights {run}/final, metrics {run}/metrics/, plot {run}/loss.png"
        )),
        "{out}"
    );
    assert_eq!(metrics_status(run, &env), (8, 8));

    // The results are in the bucket, final/ with its commit record; logs and job state are local only.
    let keys = s3.keys("m3d", "runs/clip/");
    for want in [
        "runs/clip/final/COMMIT",
        "runs/clip/final/model.safetensors",
        "runs/clip/final/config.json",
        "runs/clip/final/tokenizer.json",
        "runs/clip/loss.png",
        "runs/clip/recipe.yaml",
        "runs/clip/metrics/part-00000.jsonl",
    ] {
        assert!(keys.iter().any(|k| k == want), "{want} missing: {keys:?}");
    }
    assert!(!keys
        .iter()
        .any(|k| k.contains("logs/") || k.contains("coordinator/")));
    assert!(work.join("logs/w0.log").is_file());
    assert!(work.join("coordinator").is_dir());
    assert!(work.join("recipe.yaml").is_file());
    assert!(!work.join("metrics.jsonl").exists() && !work.join("final").exists());
    let log = std::fs::read_to_string(work.join("logs/w0.log")).unwrap();
    assert!(!log.contains(SECRET) && !out.contains(SECRET));

    // After the run: plotted from the bucket to a local file.
    let png = dir.path().join("after.png");
    m3d_ok_env(&["plot", run, "-o", &p(&png)], &env);
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1000, 700));

    // final/ loads: another run starts from it (strict load of every parameter, its tokenizer with it).
    let next = dir.path().join("next");
    let out = ok(
        &train_args(
            &p(&next),
            cap,
            &next,
            &["train.max_steps=1"],
            &["--init-from", &format!("{run}/final")],
        ),
        &env,
    );
    assert!(out.contains("done: 1 steps"), "{out}");
    assert!(next.join("final/model.safetensors").is_file());
    assert!(next.join("metrics.jsonl").is_file());
}
