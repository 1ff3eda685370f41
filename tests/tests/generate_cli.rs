//! `m3d generate` and `m3d eval bench` as a user runs them, on a tiny LaMed trained by `m3d train` from
//! synthetic shards: answers from a shard volume and a raw `.npy`; several prompts batched (left padding) give
//! what each gives alone; a model that answers `[SEG]` writes its mask as NIfTI on the input's grid and a PNG
//! overlay; bad input is refused naming what is wrong; the benchmark covers every task and gives the same
//! per-sample results on 1 and 2 workers.

mod common;

use std::path::Path;

use common::{m3d_err, m3d_ok, s, synth_small, workspace_root};

/// Trains the tiny LaMed with SegVol for two steps on synthetic M3D-Seg shards; returns (final dir, seg shards).
fn trained(dir: &Path) -> (String, String) {
    let raw = dir.join("raw");
    synth_small(&raw);
    let seg = dir.join("shards/seg");
    m3d_ok(&[
        "data-prep",
        "seg",
        "--src",
        s(&raw.join("M3D_Seg")),
        "--out",
        s(&seg),
    ]);
    let cap = dir.join("shards/cap");
    m3d_ok(&[
        "data-prep",
        "cap",
        "--src",
        s(&raw.join("M3D_Cap")),
        "--out",
        s(&cap),
    ]);
    let vqa = dir.join("shards/vqa");
    m3d_ok(&[
        "data-prep",
        "vqa",
        "--src",
        s(&raw.join("M3D_VQA")),
        "--out",
        s(&vqa),
        "--cap",
        s(&cap),
    ]);
    let refseg = dir.join("shards/refseg");
    m3d_ok(&[
        "data-prep",
        "refseg",
        "--src",
        s(&raw.join("M3D_RefSeg")),
        "--out",
        s(&refseg),
    ]);
    let run = dir.join("run");
    let recipe = workspace_root().join("recipes/lamed-stage2-tiny.yaml");
    let sets = [
        format!("data.tasks=[{{task: seg, shards: [{}]}}]", seg.display()),
        "model.init_from=[]".into(),
        "model.segmentation=true".into(),
        "train.max_steps=2".into(),
        "checkpoint.every=0".into(),
        format!("output.run={}", run.display()),
    ];
    let mut args = vec!["train", s(&recipe), "--workers", "1"];
    for set in &sets {
        args.extend(["--set", set.as_str()]);
    }
    m3d_ok(&args);
    (s(&run.join("final")).to_string(), s(&seg).to_string())
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn texts(out: &str) -> Vec<String> {
    json_lines(out)
        .iter()
        .map(|v| v["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn generate_answers_batches_and_writes_masks() {
    let dir = tempfile::tempdir().unwrap();
    let (model, seg) = trained(dir.path());
    let volume = format!("{seg}#0000/case_00000");
    let raw_npy = dir.path().join("raw/M3D_Seg/0000/case_00000/image.npy");
    let (a, b) = (
        "What is liver in this image?",
        "Can you describe the findings in this image please?",
    );
    let ask = |image: &str, prompts: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            &model,
            "--image",
            image,
            "--max-new-tokens",
            "6",
        ];
        args.extend(["--device", "cpu", "--json"]);
        for p in prompts {
            args.extend(["--prompt", p]);
        }
        m3d_ok(&args)
    };

    // Two prompts of different lengths in one batch: each answer is the one it gets alone.
    let both = texts(&ask(&volume, &[a, b]));
    assert_eq!(both.len(), 2);
    assert_eq!(both[0], texts(&ask(&volume, &[a]))[0]);
    assert_eq!(both[1], texts(&ask(&volume, &[b]))[0]);
    assert!(both.iter().all(|t| !t.is_empty()), "{both:?}");
    // Exported in the released layout (LoRA merged, flat `lamed_*` config), the model answers the same.
    let released = dir.path().join("released");
    m3d_ok(&[
        "export",
        "--from",
        &model,
        "--out",
        s(&released),
        "--released",
    ]);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(released.join("config.json")).unwrap()).unwrap();
    assert!(
        cfg["model_type"].as_str().unwrap().starts_with("lamed_"),
        "{cfg}"
    );
    assert_eq!(cfg["segmentation_module"], "segvol");
    assert!(!released.join("adapter").exists());
    let ask_released = |prompts: &[&str]| {
        let mut args = vec!["generate", "--model", s(&released), "--image", &volume];
        args.extend(["--max-new-tokens", "6", "--device", "cpu", "--json"]);
        for p in prompts {
            args.extend(["--prompt", p]);
        }
        json_lines(&m3d_ok(&args))
    };
    let from_final = json_lines(&ask(&volume, &[a, b]));
    let from_released = ask_released(&[a, b]);
    for (f, r) in from_final.iter().zip(&from_released) {
        assert_eq!(f["tokens"], r["tokens"]);
    }
    // A raw .npy goes through the M3D-Seg preprocessing (the shard stores it in f16, so the answers need not be
    // equal; data-prep's tests compare the preprocessing itself).
    assert_eq!(texts(&ask(s(&raw_npy), &[a])).len(), 1);

    // A model that always says [SEG]: the mask comes back on the input's grid.
    let seg_id = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(Path::new(&model).join("config.json")).unwrap(),
    )
    .unwrap()["tokens"]["seg"]
        .as_i64()
        .unwrap();
    common::oracle("always_seg.py", &[&model, &seg_id.to_string()]);
    let out = dir.path().join("masks");
    let printed = m3d_ok(&[
        "generate",
        "--model",
        &model,
        "--image",
        s(&raw_npy),
        "--task",
        "seg",
        "--target",
        "liver",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
        "--json",
        "--out",
        s(&out),
    ]);
    let answer = &json_lines(&printed)[0];
    assert_eq!(
        answer["tokens"],
        serde_json::json!([seg_id, seg_id, seg_id])
    );
    let nifti = out.join("answer-0.nii.gz");
    assert_eq!(answer["mask"].as_str(), Some(s(&nifti)));
    assert!(out.join("answer-0.png").is_file() && out.join("answers.json").is_file());
    let shapes = common::oracle("nifti_and_npy_shapes.py", &[s(&nifti), s(&raw_npy)]);
    let shapes: serde_json::Value = serde_json::from_str(shapes.trim()).unwrap();
    assert_eq!(shapes["nifti"], shapes["npy_spatial"], "{shapes}");
}

#[test]
fn generate_refuses_bad_input_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = trained(dir.path());
    let gen = |model: &str, image: &str, prompt: &str| {
        m3d_err(&[
            "generate", "--model", model, "--image", image, "--prompt", prompt, "--device", "cpu",
        ])
    };
    let missing = dir.path().join("nowhere");
    assert!(gen(s(&missing), "x.npy", "hi").contains(s(&missing)));

    let flat = dir.path().join("flat.npy");
    common::oracle("write_npy.py", &[s(&flat), "4,5"]);
    let err = gen(&model, s(&flat), "hi");
    assert!(err.contains(s(&flat)) && err.contains("[4, 5]"), "{err}");

    let broken = dir.path().join("broken.nii.gz");
    std::fs::write(&broken, b"not a nifti").unwrap();
    assert!(gen(&model, s(&broken), "hi").contains(s(&broken)));

    let long = "word ".repeat(2000);
    let err = gen(
        &model,
        s(&dir.path().join("raw/M3D_Seg/0000/case_00000/image.npy")),
        &long,
    );
    assert!(err.contains("context"), "{err}");

    let weights = Path::new(&model).join("model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    assert!(gen(&model, "x.npy", "hi").contains("model.safetensors"));
}

/// The environment of a process that uses the S3 server at `endpoint`.
fn s3_env(endpoint: &str) -> [(&'static str, &str); 4] {
    [
        ("AWS_ACCESS_KEY_ID", "AKIAM3DTEST"),
        ("AWS_SECRET_ACCESS_KEY", "m3d-eval-secret"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", endpoint),
    ]
}

/// A child killed when dropped: a failed assertion does not leave a coordinator serving.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

#[test]
fn eval_bench_covers_every_task_and_two_workers_equal_one() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = trained(dir.path());
    let shards = dir.path().join("shards");
    let cap = shards.join("cap");
    let data: Vec<_> = ["cap", "vqa", "seg", "refseg"]
        .iter()
        .map(|d| shards.join(d))
        .collect();
    // BERTScore from a tiny RoBERTa folder (the eval crate's oracle makes one), read at its second layer.
    let roberta = dir.path().join("roberta");
    m3d_testkit::run_python(
        &m3d_testkit::workspace_root().join("eval/tests/oracle/bertscore_oracle.py"),
        &[
            "make",
            s(&roberta),
            s(&m3d_testkit::workspace_root().join("scoring/tests/data/corpus.jsonl")),
        ],
    );
    // Retrieval scores an M3D-CLIP: the tiny one, trained for a step on the same captions.
    let clip_run = dir.path().join("clip-run");
    m3d_ok(&[
        "train",
        s(&workspace_root().join("recipes/clip-tiny.yaml")),
        "--workers",
        "1",
        "--set",
        &format!("data.tasks=[{{task: cap, shards: [{}]}}]", cap.display()),
        "--set",
        "train.max_steps=1",
        "--set",
        "train.global_batch=2",
        "--set",
        "workers.max=1",
        "--set",
        "checkpoint.every=0",
        "--set",
        &format!("output.run={}", clip_run.display()),
    ]);
    let clip = clip_run.join("final");
    let bench_args = |workers: &str, out: &Path| -> Vec<String> {
        let mut args = vec!["eval", "bench", "--model", &model, "--volumes", s(&cap)];
        args.extend(["--clip", s(&clip)]);
        args.extend([
            "--tasks",
            "cap,vqa-closed,vqa-open,rec,reg,seg,refseg,retrieval",
        ]);
        args.extend(["--bertscore", s(&roberta), "--bertscore-layer", "2"]);
        for d in &data {
            args.extend(["--data", s(d)]);
        }
        args.extend([
            "--limit",
            "2",
            "--max-new-tokens",
            "4",
            "--batch",
            "3",
            "--device",
            "cpu",
        ]);
        args.extend(["--workers", workers, "-o", s(out)]);
        args.iter().map(|a| a.to_string()).collect()
    };
    let bench = |workers: &str, out: &Path| {
        let args = bench_args(workers, out);
        m3d_ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let printed = bench("1", &one);
    bench("2", &two);
    let results = std::fs::read_to_string(one.join("results.jsonl")).unwrap();
    assert_eq!(
        results,
        std::fs::read_to_string(two.join("results.jsonl")).unwrap()
    );
    assert!(two.join("parts/rank-1-of-2.json").is_file());
    // Into object storage (an S3 server on loopback): the ranks stage locally and upload their parts and
    // overlays; rank 0 merges what it downloads and uploads the report, which is the same.
    let s3 = m3d_testkit::S3Server::start(&dir.path().join("moto.log"));
    s3.create_bucket("m3d");
    let endpoint = s3.endpoint();
    let s3_env = s3_env(&endpoint);
    // The model from the bucket too, as a run with `output.run` in a store leaves its `final/`.
    let mut files = 0;
    for entry in common::walk(Path::new(&model)) {
        let key = entry
            .strip_prefix(&model)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        s3.put_object(
            "m3d",
            &format!("model/{key}"),
            &std::fs::read(&entry).unwrap(),
        );
        files += 1;
    }
    assert!(files >= 3, "{files} files in {model}");
    let mut args = bench_args("2", Path::new("s3://m3d/bench"));
    let at = args.iter().position(|a| a == "--model").unwrap() + 1;
    args[at] = "s3://m3d/model/".into();
    let to_s3 = common::m3d_ok_env(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &s3_env,
    );
    assert_eq!(to_s3.replace("s3://m3d/model/", &model), printed);
    let keys = s3.keys("m3d", "bench/");
    for k in [
        "bench/bench.json",
        "bench/bench.md",
        "bench/results.jsonl",
        "bench/parts/rank-0-of-2.json",
        "bench/parts/rank-1-of-2.json",
        "bench/parts/retrieval.json",
    ] {
        assert!(keys.iter().any(|x| x == k), "{k} not in {keys:?}");
    }
    assert!(
        keys.iter().any(|k| k.starts_with("bench/parts/items-")),
        "no result file in {keys:?}"
    );
    assert_eq!(
        keys.iter()
            .filter(|k| k.starts_with("bench/overlays/"))
            .count(),
        std::fs::read_dir(one.join("overlays")).unwrap().count()
    );
    // A store folder with no model in it is named (a new job in the same output: it starts by clearing the
    // earlier job's result files).
    args[at] = "s3://m3d/no-model".into();
    let o = common::m3d_env(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &s3_env,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--model s3://m3d/no-model"),
        "{err}"
    );
    // As on a cluster: the coordinator of the evaluation (`--serve`) and two rank processes started alone,
    // with the token the coordinator requires; rank 0 merges and prints the report.
    let three = dir.path().join("three");
    let token = [("M3D_TOKEN", "eval-secret")];
    let serve = |workers: &str, out: &Path, extra: &[&str]| {
        let mut args = bench_args(workers, out);
        args.extend(["--serve".into(), "127.0.0.1:0".into()]);
        args.extend(extra.iter().map(|x| x.to_string()));
        let mut child = std::process::Command::new(common::m3d_bin())
            .args(&args)
            .envs(token)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let url = format!("http://{}", common::listening_address(&mut child));
        (Reaped(child), url)
    };
    let rank =
        |workers: &str, out: &Path, url: &str, id: &str, extra: &[&str], env: &[(&str, &str)]| {
            let mut args = bench_args(workers, out);
            args.extend(["--coordinator", url, "--worker-id", id].map(String::from));
            args.extend(extra.iter().map(|x| x.to_string()));
            std::process::Command::new(common::m3d_bin())
                .args(&args)
                .envs(env.iter().copied())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
    let (mut coordinator, url) = serve("2", &three, &[]);
    let ranks = [
        rank("2", &three, &url, "pod-a", &[], &token),
        rank("2", &three, &url, "pod-b", &[], &token),
    ];
    let outs: Vec<_> = ranks.map(|r| r.wait_with_output().unwrap()).into();
    for o in &outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(coordinator.wait().unwrap().success());
    assert_eq!(
        results,
        std::fs::read_to_string(three.join("results.jsonl")).unwrap()
    );
    let printed_by: Vec<bool> = outs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("| vqa-closed |"))
        .collect();
    assert_eq!(
        printed_by,
        [true, false],
        "rank 0 (pod-a) prints the report"
    );
    // A rank without the token is refused; one started with other settings refuses the coordinator's plan,
    // naming the flag and both values.
    let (mut coordinator, url) = serve("1", &dir.path().join("four"), &[]);
    let refused = |extra: &[&str], env: &[(&str, &str)]| {
        let o = rank("1", &dir.path().join("four"), &url, "pod-c", extra, env)
            .wait_with_output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let err = refused(&[], &[]);
    assert!(err.to_lowercase().contains("unauthenticated"), "{err}");
    let err = refused(&["--overlays", "3", "--seed", "7"], &token);
    for named in [
        "the coordinator's --overlays is 4, this rank's is 3",
        "the coordinator's --seed is 0, this rank's is 7",
    ] {
        assert!(err.contains(named), "{err}");
    }
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    // A rank lost mid-slice (killed while paused after its first batch): the survivor registers again, a
    // restart round of one forms, and the report is the same. Every item had a finished result file before
    // the loss (the lost rank's first batch included), so the restart round evaluates nothing again.
    let five = dir.path().join("five");
    let (mut coordinator, url) = serve(
        "2",
        &five,
        &[
            "--min-workers",
            "1",
            "--restarts",
            "1",
            "--heartbeat-timeout",
            "2s",
            "--rendezvous-timeout",
            "2s",
        ],
    );
    let survivor = rank("2", &five, &url, "pod-a", &[], &token);
    let mut lost = rank(
        "2",
        &five,
        &url,
        "pod-b",
        &[],
        &[token[0], ("M3D_FAILPOINTS", "eval-batch=60000")],
    );
    common::wait_for(
        "rank 0's share",
        std::time::Duration::from_secs(120),
        || five.join("parts/rank-0-of-2.json").is_file(),
    );
    let chunks = |dir: &Path| -> Vec<(String, std::time::SystemTime)> {
        let mut found: Vec<_> = std::fs::read_dir(dir.join("parts"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.starts_with("items-") && name.ends_with(".jsonl")
            })
            .map(|p| {
                let modified = std::fs::metadata(&p).unwrap().modified().unwrap();
                (
                    p.file_name().unwrap().to_string_lossy().to_string(),
                    modified,
                )
            })
            .collect();
        found.sort();
        found
    };
    // The lost rank's first batch is finished too (it pauses after writing it) once the files cover the pass.
    let pass_items = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(five.join("parts/rank-0-of-2.json")).unwrap(),
    )
    .unwrap()["pass_items"]
        .as_u64()
        .unwrap() as usize;
    common::wait_for(
        "every batch finished",
        std::time::Duration::from_secs(120),
        || {
            let mut covered = vec![false; pass_items];
            for (name, _) in chunks(&five) {
                let (a, b) = name
                    .trim_start_matches("items-")
                    .trim_end_matches(".jsonl")
                    .split_once('-')
                    .unwrap();
                let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
                covered[a..b].fill(true);
            }
            covered.iter().all(|&c| c)
        },
    );
    let before = chunks(&five);
    lost.kill().unwrap();
    lost.wait().unwrap();
    let o = survivor.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(coordinator.wait().unwrap().success());
    let summary = |dir: &Path, name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("parts").join(name)).unwrap()).unwrap()
    };
    let restart = summary(&five, "rank-0-of-1.json");
    assert_eq!(
        restart["evaluated"], 0,
        "the restart round redid work: {restart}"
    );
    assert_eq!(restart["reused"], restart["pass_items"], "{restart}");
    assert_eq!(
        chunks(&five),
        before,
        "result files rewritten by the restart round"
    );
    assert_eq!(
        results,
        std::fs::read_to_string(five.join("results.jsonl")).unwrap()
    );
    // The work queue: a rank that stalls after its first batch (alive and heartbeating) holds only what it
    // leased; the other takes the rest, the job completes in its first round, and the report is the same.
    let six = dir.path().join("six");
    let (mut coordinator, url) = serve("2", &six, &[]);
    let ranks = [
        rank("2", &six, &url, "pod-a", &[], &token),
        rank(
            "2",
            &six,
            &url,
            "pod-b",
            &[],
            &[token[0], ("M3D_FAILPOINTS", "eval-batch=15000")],
        ),
    ];
    for o in ranks.map(|r| r.wait_with_output().unwrap()) {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(coordinator.wait().unwrap().success());
    assert_eq!(
        results,
        std::fs::read_to_string(six.join("results.jsonl")).unwrap()
    );
    let prompts = |name: &str| summary(&six, name)["prompts"].as_u64().unwrap() as usize;
    let (fast, stalled) = (prompts("rank-0-of-2.json"), prompts("rank-1-of-2.json"));
    assert!(
        fast > stalled && fast + stalled == results.lines().count(),
        "the stalled rank answered {stalled} prompts, the other {fast}"
    );
    assert!(
        !six.join("parts/rank-0-of-1.json").exists(),
        "no restart round"
    );
    // A job that fails (no restart budget) while a rank is busy: the coordinator serves until that rank has
    // heard, so the rank ends at once with the failure, not a minute later with "stopped answering". The
    // heartbeat interval (a third of 9 s) is longer than the coordinator's 2 s grace, and the survivor is
    // busy (stalled after each batch) for 20 s, so it hears while busy, after that grace.
    let seven = dir.path().join("seven");
    let (mut coordinator, url) = serve(
        "2",
        &seven,
        &["--restarts", "0", "--heartbeat-timeout", "9s"],
    );
    let busy = rank(
        "2",
        &seven,
        &url,
        "pod-a",
        &[],
        &[token[0], ("M3D_FAILPOINTS", "eval-batch=20000")],
    );
    let mut lost = rank(
        "2",
        &seven,
        &url,
        "pod-b",
        &[],
        &[token[0], ("M3D_FAILPOINTS", "eval-batch=60000")],
    );
    // Each rank pauses after its first batch (the busy one for 20 s, the lost one for 60 s): two result
    // files mean both are in the pass.
    common::wait_for(
        "both ranks' first batches",
        std::time::Duration::from_secs(120),
        || seven.join("parts").is_dir() && chunks(&seven).len() >= 2,
    );
    lost.kill().unwrap();
    lost.wait().unwrap();
    let o = busy.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("failed") && err.contains("`pod-b`") && !err.contains("stopped answering"),
        "{err}"
    );
    coordinator.wait().unwrap();
    // Retrieval without a CLIP to score, and a CLIP exported as a released LaMed: both refused, saying why.
    let err = m3d_err(&[
        "eval",
        "bench",
        "--model",
        &model,
        "--data",
        s(&cap),
        "--tasks",
        "retrieval",
        "-o",
        s(&dir.path().join("no-clip")),
    ]);
    assert!(err.contains("--clip"), "{err}");
    let err = m3d_err(&[
        "export",
        "--from",
        s(&clip),
        "--out",
        s(&dir.path().join("x")),
        "--released",
    ]);
    assert!(
        err.contains("config.json") && err.contains("not a LaMed"),
        "{err}"
    );

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(one.join("bench.json")).unwrap()).unwrap();
    let tasks = report["tasks"].as_object().unwrap();
    let names: Vec<&str> = tasks.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "cap",
            "rec",
            "refseg",
            "reg",
            "retrieval",
            "seg",
            "vqa-closed",
            "vqa-open"
        ]
    );
    let metric = |task: &str, m: &str| tasks[task]["metrics"][m].as_f64();
    for (task, m) in [
        ("cap", "bleu1"),
        ("cap", "rouge1"),
        ("vqa-closed", "accuracy"),
        ("vqa-open", "rouge1"),
        ("cap", "bertscore_f1"),
        ("vqa-open", "bertscore_f1"),
        ("reg", "bertscore_f1"),
        ("rec", "iou"),
        ("rec", "acc@0.5"),
        ("reg", "bleu1"),
        ("seg", "dice"),
        ("refseg", "dice"),
        ("retrieval", "ir_r1"),
        ("retrieval", "tr_r10"),
    ] {
        let v = metric(task, m).unwrap_or_else(|| panic!("{task} {m} missing: {report}"));
        assert!((0.0..=100.0).contains(&v), "{task} {m} = {v}");
    }
    assert_eq!(report["published"]["vqa-closed"]["accuracy"], 75.78);
    assert_eq!(report["published"]["cap"]["bertscore_f1"], 88.46);
    // Overlays of the first segmentation samples (4 by default; --limit 2 leaves 2 per task), written by
    // whichever rank evaluated them: the same files on 1 and 2 workers.
    let overlays = report["overlays"].as_array().unwrap();
    let samples: std::collections::BTreeSet<_> = overlays
        .iter()
        .map(|o| (o[0].as_str(), o[1].as_str()))
        .collect();
    assert_eq!(samples.len(), 4, "{report}");
    for o in overlays {
        for f in o[3].as_array().unwrap() {
            let f = f.as_str().unwrap();
            assert_eq!(
                std::fs::read(one.join(f)).unwrap(),
                std::fs::read(two.join(f)).unwrap(),
                "{f}"
            );
            assert!(std::fs::read_to_string(one.join("bench.md"))
                .unwrap()
                .contains(f));
        }
    }
    assert!(printed.contains("| vqa-closed |") && one.join("bench.md").is_file());
    for line in results.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            r["prediction"].is_string() && r["question"].is_string(),
            "{r}"
        );
    }
}

/// A served evaluation of two ranks whose coordinator is killed mid-pass and started again on its saved state
/// (`--state`), as a restarted coordinator pod would be, with `-o` a local folder and then an S3 folder: the ranks
/// wait for it, the job completes with the same per-sample results as one process alone, and no work item is
/// evaluated twice (the restarted coordinator hands the pass out again from its start, and each rank skips the
/// batches either rank had finished: the ranks' `evaluated` add up to the pass).
#[test]
fn an_eval_job_outlives_its_coordinator_and_evaluates_each_item_once() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = trained(dir.path());
    let shards = dir.path().join("shards");
    let cap = shards.join("cap");
    let args = |out: &str, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "eval",
            "bench",
            "--model",
            &model,
            "--volumes",
            s(&cap),
            "--data",
            s(&cap),
            "--data",
            s(&shards.join("vqa")),
            "--tasks",
            "cap,vqa-closed,vqa-open",
            "--limit",
            "4",
            "--max-new-tokens",
            "4",
            "--batch",
            "2",
            "--device",
            "cpu",
            "-o",
            out,
        ]
        .map(String::from)
        .into();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let alone = dir.path().join("alone");
    m3d_ok(
        &args(s(&alone), &["--workers", "1"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let results = std::fs::read_to_string(alone.join("results.jsonl")).unwrap();

    // The job into `out`, its coordinator killed once `finished()` (result files so far) reaches 3; returns the
    // report and the ranks' summaries, as `read(name)` gives the output's files.
    let job = |out: &str,
               state: &Path,
               env: &[(&str, &str)],
               finished: &dyn Fn() -> usize,
               read: &dyn Fn(&str) -> Vec<u8>| {
        let listen = format!("127.0.0.1:{}", m3d_testkit::free_port());
        let mut env = env.to_vec();
        env.push(("M3D_TOKEN", "eval-secret"));
        let serve = || {
            Reaped(
                std::process::Command::new(common::m3d_bin())
                    .args(args(
                        out,
                        &["--workers", "2", "--serve", &listen, "--state", s(state)],
                    ))
                    .envs(env.iter().copied())
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        };
        let mut coordinator = serve();
        // The ranks pause 2 s after each of their batches, so the pass is still going when the coordinator dies.
        let rank = |id: &str| {
            std::process::Command::new(common::m3d_bin())
                .args(args(
                    out,
                    &[
                        "--workers",
                        "2",
                        "--coordinator",
                        &format!("http://{listen}"),
                        "--worker-id",
                        id,
                    ],
                ))
                .envs(env.iter().copied())
                .env("M3D_FAILPOINTS", "eval-batch=2000")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let ranks = [rank("pod-a"), rank("pod-b")];
        // Killed once its saved state says the round is running, so that the restarted coordinator continues
        // that round (and hands its pass out again from the start) rather than forming a new one.
        let saved = m3d_store::Store::open(s(state)).unwrap();
        common::wait_for(
            "three finished batches of a running round",
            std::time::Duration::from_secs(120),
            || {
                finished() >= 3
                    && saved.get_opt("job.json").unwrap().is_some_and(|b| {
                        serde_json::from_slice::<serde_json::Value>(&b).unwrap()["phase"]
                            == "running"
                    })
            },
        );
        coordinator.kill().unwrap();
        coordinator.wait().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(1));
        let mut coordinator = serve();
        for o in ranks.map(|r| r.wait_with_output().unwrap()) {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        assert!(coordinator.wait().unwrap().success());
        let summaries: Vec<serde_json::Value> = (0..2)
            .map(|r| serde_json::from_slice(&read(&format!("parts/rank-{r}-of-2.json"))).unwrap())
            .collect();
        (String::from_utf8(read("results.jsonl")).unwrap(), summaries)
    };
    let once = |summaries: &[serde_json::Value]| {
        let sum = |k: &str| -> u64 { summaries.iter().map(|s| s[k].as_u64().unwrap()).sum() };
        assert_eq!(
            sum("evaluated"),
            summaries[0]["pass_items"].as_u64().unwrap(),
            "an item evaluated twice, or not at all: {summaries:?}"
        );
        assert!(
            sum("reused") >= 3,
            "the batches finished before the restart were not reused: {summaries:?}"
        );
    };

    // A local folder: also, no result file finished before the restart is written again.
    let out = dir.path().join("job");
    let files = || -> Vec<(String, std::time::SystemTime)> {
        let Ok(d) = std::fs::read_dir(out.join("parts")) else {
            return Vec::new();
        };
        let mut found: Vec<_> = d
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().starts_with("items-"))
            .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
            .map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                (name, e.metadata().unwrap().modified().unwrap())
            })
            .collect();
        found.sort();
        found
    };
    let before = std::cell::RefCell::new(Vec::new());
    let (report, summaries) = job(
        s(&out),
        &dir.path().join("state"),
        &[],
        &|| {
            let now = files();
            *before.borrow_mut() = now.clone();
            now.len()
        },
        &|name| std::fs::read(out.join(name)).unwrap(),
    );
    assert_eq!(report, results);
    once(&summaries);
    let after = files();
    for file in before.borrow().iter() {
        assert!(after.contains(file), "{file:?} was rewritten: {after:?}");
    }

    // An S3 folder (the S3 server on loopback), the coordinator's state in it too.
    let s3 = m3d_testkit::S3Server::start(&dir.path().join("moto.log"));
    s3.create_bucket("m3d");
    let endpoint = s3.endpoint();
    let s3_env = s3_env(&endpoint);
    for (k, v) in s3_env {
        std::env::set_var(k, v);
    }
    let store = m3d_store::Store::open("s3://m3d/job").unwrap();
    let (report, summaries) = job(
        "s3://m3d/job",
        Path::new("s3://m3d/job-state"),
        &s3_env,
        &|| {
            s3.keys("m3d", "job/parts/items-")
                .iter()
                .filter(|k| k.ends_with(".jsonl"))
                .count()
        },
        &|name| store.get(name).unwrap().to_vec(),
    );
    assert_eq!(report, results);
    once(&summaries);
}
