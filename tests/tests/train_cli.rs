//! `m3d train`, `m3d worker` and `m3d coordinator --recipe` as real processes on synthetic M3D data: data
//! parallelism is exact (2 workers with batch B equal 1 worker with 2B, for CLIP's gathered loss and for
//! LaMed stage-2 LoRA with gradient accumulation, up to summation order: the runs compared use different CPU
//! kernels too, see `common::Kernels` and `common::SMOOTH_ADAM`), the loss curve does not depend on the
//! number of workers,
//! tiny models learn, a worker killed with SIGKILL is detected and the job restarts and completes, and a
//! worker without the job's token is refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    final_diff_of, listening_address, losses, m3d_bin, m3d_ok, m3d_ok_env,
    synth_cap_vqa as synth_shards, wait_for, workspace_root, Kernels, SMOOTH_ADAM, SUMMATION_TOL,
};

fn recipe(name: &str) -> String {
    workspace_root()
        .join("recipes")
        .join(name)
        .display()
        .to_string()
}

/// Runs `m3d train <recipe> --workers n --set ...` into `run`; returns stdout.
fn train(recipe_file: &str, workers: usize, run: &Path, sets: &[String]) -> String {
    train_on(recipe_file, workers, run, sets, Kernels::Best)
}

/// [`train`] with the job's processes on `kernels`.
fn train_on(
    recipe_file: &str,
    workers: usize,
    run: &Path,
    sets: &[String],
    kernels: Kernels,
) -> String {
    let mut args: Vec<String> = vec![
        "train".into(),
        recipe_file.into(),
        "--workers".into(),
        workers.to_string(),
        "--set".into(),
        format!("output.run={}", run.display()),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    m3d_ok_env(&refs, &kernels.env())
}

/// `sets` followed by [`SMOOTH_ADAM`].
fn smooth(mut sets: Vec<String>) -> Vec<String> {
    sets.extend(SMOOTH_ADAM.map(String::from));
    sets
}

fn clip_sets(cap: &str, steps: u64, global: usize) -> Vec<String> {
    vec![
        format!("data.tasks.0.shards=[{cap}]"),
        format!("train.max_steps={steps}"),
        format!("train.global_batch={global}"),
        "train.log_every=1".into(),
        "train.warmup_ratio=0".into(),
        "workers.max=3".into(),
    ]
}

#[test]
fn clip_two_workers_equal_one_worker_with_twice_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (cap, _) = synth_shards(dir.path(), 16);
    // Augmentation on: each sample's draw depends on (seed, epoch, sample), not on the rank that loads it.
    let sets = smooth(clip_sets(&cap, 4, 12));
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    // One worker on the most basic kernels, two on this CPU's best: the tolerance covers both.
    train_on(&recipe("clip-tiny.yaml"), 1, &one, &sets, Kernels::Basic);
    let out = train_on(&recipe("clip-tiny.yaml"), 2, &two, &sets, Kernels::Best);
    assert!(out.contains("2 worker(s)"), "{out}");
    let d = final_diff_of(&one, &two);
    eprintln!("CLIP, 1 worker (basic kernels) vs 2 (best): max parameter diff {d:e}");
    assert!(d < SUMMATION_TOL, "parameters differ by {d}");
    // The comparison can fail: a different seed (other augmentations and dropout) moves the parameters by
    // far more than the tolerance.
    let other = dir.path().join("other");
    let mut reseeded = sets.clone();
    reseeded.push("train.seed=7".into());
    train(&recipe("clip-tiny.yaml"), 2, &other, &reseeded);
    let d_other = final_diff_of(&one, &other);
    eprintln!("CLIP, another seed: max parameter diff {d_other:e}");
    assert!(
        d_other > 20.0 * SUMMATION_TOL,
        "a different seed gave {d_other}"
    );
}

#[test]
fn clip_loss_curve_is_the_same_for_one_two_and_three_workers() {
    let dir = tempfile::tempdir().unwrap();
    let (cap, _) = synth_shards(dir.path(), 16);
    // The recipe's own AdamW (epsilon 1e-8), each world size on other kernels.
    let sets = clip_sets(&cap, 5, 12);
    let curves: Vec<Vec<(u64, f64)>> =
        [(1, Kernels::Best), (2, Kernels::Avx2), (3, Kernels::Basic)]
            .iter()
            .map(|&(w, kernels)| {
                let run = dir.path().join(format!("w{w}"));
                train_on(&recipe("clip-tiny.yaml"), w, &run, &sets, kernels);
                losses(&run)
            })
            .collect();
    assert_eq!(curves[0].len(), 5);
    // Adam turns the gradients that are rounding noise into steps of ±lr with a sign that depends on the
    // summation order, so parameters whose gradient is noise end up to ~lr·steps apart. The loss does not see
    // them: a parameter's gradient is the loss's sensitivity to it, so moving the noise-driven ones by
    // δθ ≈ lr·steps = 2.5e-3 changes the loss by |g|·δθ ≲ 1e-9·2.5e-3 (first order; key biases exactly 0).
    // What remains is the rounding of the loss itself (a mean of 12 cross-entropies of ~2.5 over logits from
    // 64-wide products: ~1e-6) and of the signal-driven parameters' updates, which agree to ~lr·1e-5 relative.
    // 1e-5 is ~4e-6 of the loss, several times that budget.
    for c in &curves[1..] {
        assert_eq!(c.len(), curves[0].len());
        for ((s1, l1), (s2, l2)) in curves[0].iter().zip(c) {
            assert_eq!(s1, s2);
            eprintln!("step {s1}: {l1} vs {l2} ({:e})", (l1 - l2).abs());
            assert!((l1 - l2).abs() < 1e-5, "step {s1}: {l1} vs {l2}");
        }
    }
    // The loss moves from step to step (the comparison is not between constants).
    let spread = curves[0]
        .iter()
        .map(|p| p.1)
        .fold(f64::NEG_INFINITY, f64::max)
        - curves[0].iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    assert!(spread > 1e-4, "loss barely moved: {:?}", curves[0]);
}

#[test]
fn lamed_stage2_lora_two_workers_equal_one_and_lowers_the_answer_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (cap, vqa) = synth_shards(dir.path(), 16);
    let stage1 = dir.path().join("stage1");
    train(
        &recipe("lamed-stage1-tiny.yaml"),
        1,
        &stage1,
        &[
            format!("data.tasks.0.shards=[{cap}]"),
            format!("data.tasks.1.shards=[{vqa}]"),
            format!("data.tasks.1.volumes=[{cap}]"),
            "train.max_steps=2".into(),
        ],
    );
    assert!(stage1.join("final/tokenizer.json").is_file());
    let sets = |steps: u64| {
        vec![
            format!("data.tasks.0.shards=[{cap}]"),
            format!("data.tasks.1.shards=[{vqa}]"),
            format!("data.tasks.1.volumes=[{cap}]"),
            format!("model.init_from.0.path={}", stage1.join("final").display()),
            "model.lora.dropout=0".into(),
            format!("train.max_steps={steps}"),
            "train.log_every=1".into(),
        ]
    };
    // global batch 4, micro-batch 2: one worker accumulates 2 micro-batches, two workers 1 each.
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    let r = recipe("lamed-stage2-tiny.yaml");
    train_on(&r, 1, &one, &smooth(sets(3)), Kernels::Basic);
    train_on(&r, 2, &two, &smooth(sets(3)), Kernels::Best);
    let d = final_diff_of(&one, &two);
    eprintln!("LaMed LoRA, 1 worker (basic kernels) vs 2 (best): max parameter diff {d:e}");
    assert!(d < SUMMATION_TOL, "parameters differ by {d}");
    assert!(two.join("final/adapter/adapter_config.json").is_file());
    // Two workers that did not combine their micro-batches correctly would train on another batch: one
    // worker on half the global batch (its micro-batch alone) ends far outside the tolerance.
    let half = dir.path().join("half");
    let mut half_sets = smooth(sets(3));
    half_sets.extend(
        [
            "train.global_batch=2",
            "train.micro_batch=2",
            "workers.max=1",
        ]
        .map(String::from),
    );
    train(&r, 1, &half, &half_sets);
    let d_half = final_diff_of(&one, &half);
    eprintln!("LaMed LoRA, half the batch: max parameter diff {d_half:e}");
    assert!(
        d_half > 20.0 * SUMMATION_TOL,
        "half the batch gave {d_half}"
    );
    // Learning: the answer loss falls over a short run.
    let long = dir.path().join("long");
    train(&recipe("lamed-stage2-tiny.yaml"), 2, &long, &sets(40));
    let l = losses(&long);
    let first: f64 = l[..5].iter().map(|p| p.1).sum::<f64>() / 5.0;
    let last: f64 = l[l.len() - 5..].iter().map(|p| p.1).sum::<f64>() / 5.0;
    assert!(last < 0.85 * first, "answer loss {first} -> {last}");
}

/// LaMed with the segmentation module on M3D-Seg shards (masked `seg` samples mixed with the box tasks' samples,
/// which have no mask): 2 workers end where 1 worker accumulating the same global batch ends, so the Dice +
/// BCE share of each micro-batch is normalised over the global batch (metrics equal too); and the
/// segmentation losses fall.
#[test]
fn lamed_segmentation_trains_and_two_workers_equal_one() {
    let dir = tempfile::tempdir().unwrap();
    synth_shards(dir.path(), 8);
    let seg = dir.path().join("shards/seg");
    m3d_ok(&[
        "data-prep",
        "seg",
        "--src",
        dir.path().join("raw/M3D_Seg").to_str().unwrap(),
        "--out",
        seg.to_str().unwrap(),
    ]);
    let sets = |steps: u64| {
        vec![
            format!("data.tasks=[{{task: seg, shards: [{}]}}]", seg.display()),
            "model.init_from=[]".into(),
            "model.segmentation=true".into(),
            "model.trainable=[model.mm_projector., model.seg_projector., model.seg_module.]".into(),
            "model.lora.dropout=0".into(),
            format!("train.max_steps={steps}"),
            "train.log_every=1".into(),
            "checkpoint.every=0".into(),
        ]
    };
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let r = recipe("lamed-stage2-tiny.yaml");
    train_on(&r, 1, &one, &smooth(sets(3)), Kernels::Basic);
    train_on(&r, 2, &two, &smooth(sets(3)), Kernels::Best);
    let d = final_diff_of(&one, &two);
    eprintln!("LaMed segmentation, 1 worker (basic kernels) vs 2 (best): max parameter diff {d:e}");
    assert!(d < SUMMATION_TOL, "parameters differ by {d}");
    let metrics = |run: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    for (a, b) in metrics(&one).iter().zip(metrics(&two)) {
        for k in ["loss", "seg_dice", "seg_bce"] {
            let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!((x - y).abs() < 1e-5, "{k}: {x} vs {y}");
        }
    }
    // Learning: over 60 steps BCE falls by more than half (observed 0.70 -> 0.05) and Dice by more than 0.01
    // (observed 0.989 -> 0.945; the synthetic lesions are small in a 32x256x256 volume).
    let long = dir.path().join("long");
    train(&recipe("lamed-stage2-tiny.yaml"), 2, &long, &sets(60));
    let m = metrics(&long);
    let mean = |k: &str, r: std::ops::Range<usize>| {
        m[r.clone()]
            .iter()
            .map(|l| l[k].as_f64().unwrap())
            .sum::<f64>()
            / r.len() as f64
    };
    let (b0, b1) = (mean("seg_bce", 0..3), mean("seg_bce", 40..60));
    assert!(b1 < 0.5 * b0, "BCE {b0} -> {b1}");
    let (d0, d1) = (mean("seg_dice", 0..3), mean("seg_dice", 40..60));
    assert!(d1 < d0 - 0.01, "Dice {d0} -> {d1}");
}

/// `--recipe recipes/clip-tiny.yaml` and `--set` for each of `sets`: a role's recipe flags.
fn clip_tiny_args(sets: &[String]) -> Vec<String> {
    let mut args = vec!["--recipe".to_string(), recipe("clip-tiny.yaml")];
    for s in sets {
        args.extend(["--set".to_string(), s.clone()]);
    }
    args
}

struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn coordinator(args: &[String], envs: &[(&str, &str)], log: &Path) -> (Proc, String) {
    let mut cmd = Command::new(m3d_bin());
    cmd.args(["coordinator", "--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("M3D_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn coordinator");
    let addr = listening_address(&mut child);
    (Proc { child }, format!("http://{addr}"))
}

fn worker(url: &str, recipe_args: &[String], id: &str, token: Option<&str>, log: &Path) -> Proc {
    let mut cmd = Command::new(m3d_bin());
    cmd.args(["worker", "--coordinator", url, "--worker-id", id])
        .args(recipe_args)
        .env_remove("M3D_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()));
    if let Some(t) = token {
        cmd.env("M3D_TOKEN", t);
    }
    Proc {
        child: cmd.spawn().expect("spawn worker"),
    }
}

fn status(url: &str, token: &str) -> serde_json::Value {
    let out = Command::new(m3d_bin())
        .args(["status", "--coordinator", url, "--json"])
        .env("M3D_TOKEN", token)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

#[test]
fn killed_worker_is_detected_and_the_job_restarts_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (cap, _) = synth_shards(dir.path(), 16);
    let run = dir.path().join("run");
    let recipe_args = clip_tiny_args(&[
        format!("data.tasks.0.shards=[{cap}]"),
        "train.max_steps=40".into(),
        "train.log_every=1".into(),
        format!("output.run={}", run.display()),
    ]);
    let token = "s3cret-token-value";
    let mut coord_args = recipe_args.clone();
    coord_args.extend(
        [
            "--state",
            &dir.path().join("state").display().to_string(),
            "--min-workers",
            "2",
            "--heartbeat-timeout",
            "3s",
            "--exit-on-finish",
        ]
        .map(String::from),
    );
    let coord_log = dir.path().join("coordinator.log");
    let (_coord, url) = coordinator(&coord_args, &[("M3D_TOKEN", token)], &coord_log);
    let w0 = worker(
        &url,
        &recipe_args,
        "w0",
        Some(token),
        &dir.path().join("w0.log"),
    );
    let mut w1 = worker(
        &url,
        &recipe_args,
        "w1",
        Some(token),
        &dir.path().join("w1.log"),
    );
    wait_for("step 3", Duration::from_secs(120), || {
        status(&url, token)["step"].as_u64().unwrap_or(0) >= 3
    });
    w1.child.kill().unwrap(); // SIGKILL
    w1.child.wait().unwrap();
    let detected = wait_for("the restart round", Duration::from_secs(30), || {
        status(&url, token)["restarts"].as_u64().unwrap_or(0) >= 1
    });
    // Within the 3 s heartbeat timeout, give or take the `m3d status` polls on a loaded 2-core machine; a
    // job that missed the death would hang until the 120 s collective timeout instead.
    assert!(
        detected < Duration::from_secs(3) + Duration::from_secs(5),
        "detected after {detected:?}"
    );
    // The replacement joins the restart round and the job runs to the end.
    let _w1 = worker(
        &url,
        &recipe_args,
        "w1",
        Some(token),
        &dir.path().join("w1b.log"),
    );
    wait_for("completion", Duration::from_secs(300), || {
        status(&url, token)["phase"] == "completed"
    });
    drop(w0);
    let l = losses(&run);
    assert_eq!(l.last().map(|p| p.0), Some(40));
    assert!(run.join("final/model.safetensors").is_file());
    for log in ["coordinator.log", "w0.log", "w1.log", "w1b.log"] {
        let text = std::fs::read_to_string(dir.path().join(log)).unwrap_or_default();
        assert!(!text.contains(token), "{log} shows the token");
    }
}

#[test]
fn worker_without_the_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cap, _) = synth_shards(dir.path(), 16);
    let recipe_args: Vec<String> = vec![
        "--recipe".into(),
        recipe("clip-tiny.yaml"),
        "--set".into(),
        format!("data.tasks.0.shards=[{cap}]"),
        "--set".into(),
        format!("output.run={}", dir.path().join("run").display()),
    ];
    let mut coord_args = recipe_args.clone();
    coord_args.extend([
        "--state".to_string(),
        dir.path().join("state").display().to_string(),
    ]);
    let token = "another-s3cret";
    let (_coord, url) = coordinator(
        &coord_args,
        &[("M3D_TOKEN", token)],
        &dir.path().join("c.log"),
    );
    for (id, presented) in [("nobody", None), ("wrong", Some("not-the-token"))] {
        let log = dir.path().join(format!("{id}.log"));
        let mut w = worker(&url, &recipe_args, id, presented, &log);
        let code = w.child.wait().unwrap();
        assert!(!code.success(), "{id} was accepted");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("Unauthenticated") || text.contains("unauthenticated"),
            "{id}: {text}"
        );
    }
    let s = status(&url, token);
    assert_eq!(s["waiting"].as_u64(), Some(0), "{s}");
    assert_eq!(s["phase"], "pending");
}

/// Tiny M3D-CLIP trained on synthetic pairs retrieves better than chance.
#[test]
fn tiny_clip_learns_retrieval() {
    let dir = tempfile::tempdir().unwrap();
    let (cap, _) = synth_shards(dir.path(), 80);
    let run = dir.path().join("run");
    train(
        &recipe("clip-tiny.yaml"),
        1,
        &run,
        &[
            format!("data.tasks.0.shards=[{cap}]"),
            "train.max_steps=400".into(),
            "train.lr=5e-4".into(),
            "train.warmup_ratio=0.05".into(),
            "train.weight_decay=0".into(),
            "data.augment=false".into(),
        ],
    );
    let out = m3d_ok(&[
        "eval",
        "retrieval",
        "--model",
        &run.join("final").display().to_string(),
        "--shards",
        &cap,
        "--split",
        "train",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pairs = r["pairs"].as_f64().unwrap();
    let chance = 1.0 / pairs;
    let r1 = r["image_to_text_r1"].as_f64().unwrap();
    assert!(r1 > 5.0 * chance, "R@1 {r1} vs chance {chance}: {r}");
    let _ = PathBuf::new();
}

/// Sends SIGTERM to `child` (as Kubernetes, podman and `kill` stop a process).
fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM {}", child.id());
}

/// Waits for `child` to exit (at most `limit`), returning its exit code.
fn exit_code(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        assert!(start.elapsed() < limit, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The committed checkpoint steps under `dir` (folders with a COMMIT record).
fn committed(dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                let step = e
                    .file_name()
                    .to_str()?
                    .strip_prefix("step-")?
                    .parse()
                    .ok()?;
                e.path().join("COMMIT").is_file().then_some(step)
            })
            .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps
}

#[test]
fn sigterm_to_every_process_saves_a_checkpoint_at_the_current_step_and_the_job_resumes_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cap, _) = synth_shards(dir.path(), 16);
    let run = dir.path().join("run");
    let ckpt = run.join("checkpoints");
    let recipe_args = clip_tiny_args(&[
        format!("data.tasks.0.shards=[{cap}]"),
        "train.max_steps=100000".into(),
        "train.log_every=1".into(),
        // Only the stop writes a checkpoint in this test.
        "checkpoint.every=100000".into(),
        format!("output.run={}", run.display()),
    ]);
    let token = "s3cret-token-value";
    let state = dir.path().join("state").display().to_string();
    let mut coord_args = recipe_args.clone();
    coord_args
        .extend(["--state", &state, "--min-workers", "2", "--exit-on-finish"].map(String::from));
    let start = |tag: &str| {
        let (coord, url) = coordinator(
            &coord_args,
            &[("M3D_TOKEN", token)],
            &dir.path().join(format!("coordinator-{tag}.log")),
        );
        let workers: Vec<Proc> = ["w0", "w1"]
            .iter()
            .map(|id| {
                worker(
                    &url,
                    &recipe_args,
                    id,
                    Some(token),
                    &dir.path().join(format!("{id}-{tag}.log")),
                )
            })
            .collect();
        (coord, url, workers)
    };
    let (mut coord, url, mut workers) = start("a");
    wait_for("step 5", Duration::from_secs(180), || {
        status(&url, token)["step"].as_u64().unwrap_or(0) >= 5
    });
    // Every process of the job is stopped at once, as a JobSet restart or a node drain does.
    let stopped = std::time::Instant::now();
    for w in &workers {
        sigterm(&w.child);
    }
    sigterm(&coord.child);
    for w in &mut workers {
        assert_eq!(exit_code(&mut w.child, Duration::from_secs(60)), Some(143));
    }
    assert_eq!(
        exit_code(&mut coord.child, Duration::from_secs(60)),
        Some(143)
    );
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(30), "stopping took {took:?}");
    // One committed checkpoint, at the last step trained: nothing done is lost.
    let steps = committed(&ckpt);
    assert_eq!(steps.len(), 1, "{steps:?}");
    let saved = steps[0];
    let last_logged = losses(&run).last().map(|p| p.0).unwrap();
    assert_eq!(
        saved, last_logged,
        "checkpoint {saved}, metrics up to {last_logged}"
    );
    // The coordinator recorded it in its state before exiting.
    let job: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state/job.json")).unwrap()).unwrap();
    assert_eq!(
        job["last_checkpoint"]["step"].as_u64(),
        Some(saved),
        "{job}"
    );

    // The relaunched job (same state, same command lines) resumes from that checkpoint.
    let (_coord, url, workers) = start("b");
    wait_for(
        "a step after the checkpoint",
        Duration::from_secs(180),
        || status(&url, token)["step"].as_u64().unwrap_or(0) > saved,
    );
    drop(workers);
    let log = std::fs::read_to_string(dir.path().join("w0-b.log")).unwrap();
    assert!(
        log.contains("resumed from checkpoint") && log.contains(&format!("step={saved}")),
        "{log}"
    );
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            assert!(!text.contains(token), "{} shows the token", p.display());
        }
    }
}

#[test]
fn one_worker_command_with_two_processes_trains_as_two_ranks() {
    // `m3d worker --procs 2`: what a pod with 2 GPUs runs (here on CPU): two ranks of one host.
    let dir = tempfile::tempdir().unwrap();
    let (cap, _) = synth_shards(dir.path(), 16);
    let run = dir.path().join("run");
    let recipe_args = clip_tiny_args(&[
        format!("data.tasks.0.shards=[{cap}]"),
        "train.max_steps=4".into(),
        format!("output.run={}", run.display()),
    ]);
    let token = "procs-token";
    let mut coord_args = recipe_args.clone();
    coord_args.extend(
        [
            "--state",
            &dir.path().join("state").display().to_string(),
            "--min-workers",
            "2",
        ]
        .map(String::from),
    );
    let (_coord, url) = coordinator(
        &coord_args,
        &[("M3D_TOKEN", token)],
        &dir.path().join("c.log"),
    );
    let mut args = recipe_args.clone();
    args.extend(["--procs".to_string(), "2".to_string()]);
    let mut pod = worker(
        &url,
        &args,
        "pod0",
        Some(token),
        &dir.path().join("pod.log"),
    );
    assert_eq!(exit_code(&mut pod.child, Duration::from_secs(300)), Some(0));
    let s = status(&url, token);
    assert_eq!(s["phase"], "completed", "{s}");
    assert_eq!(losses(&run).last().map(|p| p.0), Some(4));
    let ids: Vec<String> = s["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|p| p["worker_id"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    assert!(ids.is_empty() || ids == ["pod0-0", "pod0-1"], "{ids:?}");
}
