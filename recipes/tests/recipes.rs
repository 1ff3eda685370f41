//! The recipe schema: the shipped tiny recipes parse and validate; unknown keys, bad types, bad overrides
//! and impossible combinations are refused with errors that name the key, the line and the file; the
//! reference in docs/recipes.md lists every key of the schema.

use std::path::{Path, PathBuf};

use m3d_recipes::{schema_paths, ModelKind, Precision, Recipe, RecipeError, Schedule, ShuffleMode};

fn root() -> PathBuf {
    m3d_testkit::workspace_root()
}

const MINIMAL: &str = "model:\n  kind: clip\ndata:\n  tasks:\n    - task: cap\n      shards: [s]\n";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The shipped full-size recipes hold the reference's settings (docs/recipes.md cites the lines): a change to
/// any of these numbers must be a deliberate one.
#[test]
fn full_size_recipes_match_the_reference() {
    let load = |file: &str| {
        let r = Recipe::load(&root().join("recipes").join(file), &[])
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(r.world_sizes(), 8..=8, "{file}: 8 GPUs");
        assert_eq!(r.workers.device, m3d_recipes::DeviceKind::Cuda, "{file}");
        assert_eq!(r.precision(), m3d_recipes::Precision::Bf16, "{file}");
        assert_eq!(r.data.max_text_len, 512, "{file}");
        assert_eq!(r.train.warmup_ratio, 0.03, "{file}");
        assert_eq!(r.train.schedule, m3d_recipes::Schedule::Cosine, "{file}");
        assert_eq!(r.train.seed, 42, "{file}");
        for url in [r.checkpoint_url(), r.run_url()] {
            assert!(url.starts_with("s3://"), "{file}: {url}");
        }
        r
    };
    let clip = load("clip.yaml");
    assert_eq!(clip.model.kind, ModelKind::Clip);
    assert_eq!(clip.model.preset, "m3d");
    assert_eq!((clip.train.global_batch, clip.micro_batch(8)), (256, 32));
    assert_eq!(
        (clip.train.lr, clip.train.weight_decay, clip.train.epochs),
        (1e-4, 0.1, 100)
    );
    for (preset, stage2_epochs, stage2_micro) in [
        ("llama2-7b", 4, 8),
        ("llama3-8b", 3, 4),
        ("phi3-mini", 5, 8),
    ] {
        let s1 = load(&format!("lamed-{preset}-stage1.yaml"));
        assert_eq!(s1.model.preset, preset);
        assert!(s1.model.lora.is_none() && !s1.model.segmentation);
        assert_eq!(
            s1.model.trainable,
            ["model.mm_projector.", "model.embed_tokens."]
        );
        assert_eq!((s1.train.global_batch, s1.micro_batch(8)), (128, 16));
        assert_eq!(
            (s1.train.lr, s1.train.weight_decay, s1.train.epochs),
            (1e-4, 0.0, 3)
        );
        let tasks: Vec<(&str, Vec<String>)> = s1
            .data
            .tasks
            .iter()
            .map(|t| (t.task.as_str(), t.kinds.clone()))
            .collect();
        assert_eq!(
            tasks,
            [
                ("cap", vec![]),
                (
                    "vqa",
                    vec!["vqa_closed".to_string(), "vqa_open".to_string()]
                )
            ]
        );
        let s2 = load(&format!("lamed-{preset}-stage2.yaml"));
        let lora = s2.model.lora.as_ref().expect("stage 2 has LoRA");
        assert_eq!((lora.r, lora.alpha, lora.dropout), (16, 32.0, 0.05));
        assert!(
            lora.target_modules.is_empty(),
            "M3D's rule: every LLM Linear"
        );
        assert!(s2.model.segmentation);
        assert_eq!(
            (s2.train.global_batch, s2.micro_batch(8)),
            (64, stage2_micro)
        );
        assert_eq!((s2.train.lr, s2.train.epochs), (5e-5, stage2_epochs));
        let names: Vec<&str> = s2.data.tasks.iter().map(|t| t.task.as_str()).collect();
        assert_eq!(names, ["cap", "vqa", "seg", "refseg"]);
        assert!(s2
            .data
            .tasks
            .iter()
            .all(|t| t.kinds.is_empty() && t.weight == 1.0));
        // The switch that reproduces the reference's current code (segmentation sets commented out).
        let current = Recipe::load(
            &root().join(format!("recipes/lamed-{preset}-stage2.yaml")),
            &[
                "data.tasks.2.kinds=[rec, reg]".to_string(),
                "data.tasks.3.weight=0".to_string(),
            ],
        )
        .unwrap();
        assert_eq!(current.data.tasks[2].kinds, ["rec", "reg"]);
        assert_eq!(current.data.tasks[3].weight, 0.0);
    }
}

#[test]
fn tiny_recipes_parse_and_validate() {
    for (file, kind, world) in [
        ("clip-tiny.yaml", ModelKind::Clip, 1..=3),
        ("lamed-stage1-tiny.yaml", ModelKind::Lamed, 1..=2),
        ("lamed-stage2-tiny.yaml", ModelKind::Lamed, 1..=2),
        ("lamed-stage2-seg-tiny.yaml", ModelKind::Lamed, 1..=2),
    ] {
        let path = root().join("recipes").join(file);
        let r = Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.model.kind, kind, "{file}");
        assert_eq!(r.world_sizes(), world, "{file}");
        assert_eq!(r.name(), file.trim_end_matches(".yaml"));
        for w in r.world_sizes() {
            let k = r.grad_accum(w).unwrap();
            assert_eq!(
                k * w * r.micro_batch(w),
                r.train.global_batch,
                "{file} at {w}"
            );
        }
        // The effective recipe written back as YAML parses to the same recipe.
        let again = Recipe::from_yaml_str(&r.to_yaml(), "effective").unwrap();
        assert_eq!(again, r, "{file}");
    }
    let clip = Recipe::load(&root().join("recipes/clip-tiny.yaml"), &[]).unwrap();
    assert_eq!(clip.grad_accum(1).unwrap(), 1);
    assert_eq!(clip.grad_accum(3).unwrap(), 1);
    assert_eq!(clip.micro_batch(3), 4);
    // CLIP cannot accumulate: a micro-batch that needs accumulation at some world size is refused.
    let e = Recipe::load(
        &root().join("recipes/clip-tiny.yaml"),
        &["train.micro_batch=2".to_string()],
    )
    .unwrap_err();
    assert!(e.to_string().contains("train.micro_batch"), "{e}");
    assert!(clip.grad_accum(4).is_err(), "outside workers.min..=max");
    let s2 = Recipe::load(&root().join("recipes/lamed-stage2-tiny.yaml"), &[]).unwrap();
    assert_eq!(s2.model.lora.as_ref().unwrap().r, 8);
    assert_eq!(s2.data.tasks[1].weight, 2.0);
    assert_eq!(s2.checkpoint_url(), "runs/lamed-stage2-tiny/checkpoints");
}

#[test]
fn defaults_are_the_documented_ones() {
    let r = Recipe::from_yaml_str(MINIMAL, "minimal.yaml").unwrap();
    let t = &r.train;
    assert_eq!(
        (t.seed, t.epochs, t.max_steps, t.global_batch, t.micro_batch),
        (42, 1, None, 8, None)
    );
    assert_eq!(
        (t.lr, t.weight_decay, t.betas, t.eps),
        (1e-4, 0.0, [0.9, 0.999], 1e-8)
    );
    assert_eq!(
        (t.warmup_ratio, t.schedule, t.max_grad_norm),
        (0.03, Schedule::Cosine, Some(1.0))
    );
    assert_eq!((t.precision, t.log_every), (None, 10));
    assert_eq!(r.precision(), Precision::F32);
    assert_eq!(r.micro_batch(1), 8);
    assert_eq!(r.micro_batch(2), 4);
    assert_eq!(r.grad_accum(1).unwrap(), 1);
    assert_eq!(r.model.preset, "debug");
    assert_eq!(r.data.max_text_len, 512);
    assert!(r.data.augment);
    assert_eq!(
        (r.data.shuffle, r.data.shuffle_block, r.data.shuffle_window),
        (ShuffleMode::Global, 32, 8)
    );
    assert_eq!(r.data.tasks[0].weight, 1.0);
    assert_eq!(r.run_url(), "runs/run");
    assert_eq!(r.checkpoint.keep_last, 2);
    assert_eq!(r.total_steps(7), 7);
    let w = &r.workers;
    assert_eq!(
        (
            w.restart_rounds,
            w.heartbeat_timeout_s,
            w.rendezvous_timeout_s
        ),
        (3, 10.0, 30.0)
    );
    assert_eq!(r.heartbeat_timeout(), std::time::Duration::from_secs(10));
    // Job settings are the recipe's, checked like the rest.
    let e = Recipe::from_yaml_str(
        &format!("{MINIMAL}workers:\n  heartbeat_timeout_s: 0\n"),
        "hb.yaml",
    )
    .unwrap_err();
    assert!(e.to_string().contains("workers.heartbeat_timeout_s"), "{e}");
}

#[test]
fn unknown_key_names_key_line_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{MINIMAL}train:\n  seed: 1\n  lr2: 0.1\n");
    let p = write(dir.path(), "typo.yaml", &text);
    let e = Recipe::load(&p, &[]).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, RecipeError::Parse { line: Some(9), .. }),
        "{e:?}"
    );
    assert!(msg.contains("typo.yaml:9:"), "{msg}");
    assert!(msg.contains("unknown field `lr2`"), "{msg}");
    assert!(msg.contains("train"), "{msg}");

    // Nested inside a list entry, and at the top level.
    let text = "model:\n  kind: clip\ndata:\n  tasks:\n    - task: cap\n      shards: [s]\n      wieght: 2\n";
    let msg = Recipe::from_yaml_str(text, "nested.yaml")
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("nested.yaml:7:"), "{msg}");
    assert!(msg.contains("unknown field `wieght`"), "{msg}");
    let msg = Recipe::from_yaml_str(&format!("{MINIMAL}trian: {{}}\n"), "top.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("top.yaml:7:") && msg.contains("`trian`"),
        "{msg}"
    );
}

#[test]
fn bad_types_and_values_are_refused() {
    let cases: &[(&str, &str)] = &[
        ("train:\n  lr: fast\n", "invalid type"),
        (
            "train:\n  global_batch: -3\n",
            "train.global_batch: invalid type",
        ),
        ("train:\n  precision: fp8\n", "unknown variant `fp8`"),
        ("workers:\n  device: tpu\n", "unknown variant `tpu`"),
        ("train:\n  betas: [0.9]\n", "invalid length"),
    ];
    for (extra, want) in cases {
        let msg = Recipe::from_yaml_str(&format!("{MINIMAL}{extra}"), "bad.yaml")
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("bad.yaml:"), "{msg}");
        assert!(msg.contains(want), "{extra:?}: {msg}");
    }
    let invalid: &[(&str, &str)] = &[
        ("train:\n  lr: 0\n", "train.lr"),
        ("train:\n  warmup_ratio: 1.5\n", "train.warmup_ratio"),
        ("train:\n  betas: [0.9, 1.0]\n", "train.betas.1"),
        ("train:\n  no_decay: ['(']\n", "train.no_decay.0"),
        ("workers:\n  min: 2\n  max: 1\n", "workers.max"),
        (
            "model:\n  kind: clip\n  preset: llama3-8b\n",
            "model.preset",
        ),
        (
            "train:\n  global_batch: 8\n  micro_batch: 3\n",
            "train.global_batch",
        ),
        // 12 = 2 × 6 splits over 1 and 2 workers but not over 4.
        (
            "train:\n  global_batch: 12\n  micro_batch: 2\nworkers:\n  min: 1\n  max: 4\n",
            "× 4 workers",
        ),
        (
            "train:\n  global_batch: 9\nworkers:\n  min: 2\n",
            "train.global_batch",
        ),
        ("checkpoint:\n  keep_last: 0\n", "checkpoint.keep_last"),
    ];
    for (extra, want) in invalid {
        // `model:` replaced where the case sets it.
        let text = if extra.starts_with("model:") {
            format!("{extra}data:\n  tasks:\n    - task: cap\n      shards: [s]\n")
        } else {
            format!("{MINIMAL}{extra}")
        };
        let e = Recipe::from_yaml_str(&text, "combo.yaml").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, RecipeError::Invalid { .. }), "{extra:?}: {msg}");
        assert!(msg.starts_with("combo.yaml: "), "{msg}");
        assert!(msg.contains(want), "{extra:?}: {msg}");
    }
    // LoRA and vqa on CLIP.
    let text =
        "model:\n  kind: clip\n  lora: {}\ndata:\n  tasks:\n    - task: cap\n      shards: [s]\n";
    assert!(Recipe::from_yaml_str(text, "x")
        .unwrap_err()
        .to_string()
        .contains("model.lora"));
    let text = "model:\n  kind: clip\ndata:\n  tasks:\n    - task: vqa\n      shards: [s]\n";
    assert!(Recipe::from_yaml_str(text, "x")
        .unwrap_err()
        .to_string()
        .contains("data.tasks.0.task"));
    // Masks without the segmentation module would be left out of the loss.
    let seg = "data:\n  tasks:\n    - task: cap\n      shards: [s]\n    - task: refseg\n      shards: [r]\n";
    let text = format!("model:\n  kind: lamed\n{seg}");
    let msg = Recipe::from_yaml_str(&text, "x").unwrap_err().to_string();
    assert!(
        msg.contains("data.tasks.1.task") && msg.contains("model.segmentation: true"),
        "{msg}"
    );
    let text = format!("model:\n  kind: lamed\n  segmentation: true\n{seg}");
    Recipe::from_yaml_str(&text, "x").unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn overrides_are_typed_and_checked() {
    let path = root().join("recipes/clip-tiny.yaml");
    let sets = [
        "train.lr=2e-4",
        "workers.max=2",
        "data.tasks.0.weight=3",
        "train.betas=[0.8, 0.95]",
        "train.max_grad_norm=null",
        "train.precision=bf16-autocast",
        "name=other",
    ]
    .map(String::from);
    let r = Recipe::load(&path, &sets).unwrap();
    assert_eq!(r.train.lr, 2e-4);
    assert_eq!(r.workers.max, Some(2));
    assert_eq!(r.data.tasks[0].weight, 3.0);
    assert_eq!(r.train.betas, [0.8, 0.95]);
    assert_eq!(r.train.max_grad_norm, None);
    assert_eq!(r.train.precision, Some(Precision::Bf16Autocast));
    assert_eq!(r.name(), "other");

    // An unset optional section is created with its defaults.
    let mut r = Recipe::load(&root().join("recipes/lamed-stage1-tiny.yaml"), &[]).unwrap();
    r.apply_set("model.lora.r=4").unwrap();
    let lora = r.model.lora.as_ref().unwrap();
    assert_eq!((lora.r, lora.alpha), (4, 32.0));

    // An unknown key inside a section the override creates.
    let mut fresh = Recipe::load(&root().join("recipes/lamed-stage1-tiny.yaml"), &[]).unwrap();
    let msg = fresh
        .apply_set("model.lora.rank=4")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("unknown field `rank`"), "{msg}");
    assert!(fresh.model.lora.is_none());

    let before = r.clone();
    let cases: &[(&str, &str)] = &[
        ("train.lrr=1", "unknown key `train.lrr`"),
        ("trian.lr=1", "unknown key `trian.lr`"),
        ("train.lr.x=1", "is a value, not a section"),
        ("data.tasks.5.weight=1", "no index 5"),
        ("data.tasks.x.weight=1", "not an index"),
        ("model.lora.rank=4", "unknown key `model.lora.rank`"),
        ("model.init_from.0.path=x", "no index 0"),
        ("train.lr=abc", "`train.lr`: invalid type"),
        (
            "train.global_batch=2.5",
            "`train.global_batch`: invalid type",
        ),
        ("train.lr", "expected `section.key=value`"),
        ("=3", "is not a key path"),
    ];
    for (expr, want) in cases {
        let e = r.apply_set(expr).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with(&format!("--set {expr}: ")), "{msg}");
        assert!(msg.contains(want), "{expr}: {msg}");
        assert_eq!(r, before, "a failed override leaves the recipe unchanged");
    }
    // Typed but impossible: validation after the overrides rejects it.
    let e = Recipe::load(&path, &["train.micro_batch=5".into()]).unwrap_err();
    assert!(e.to_string().contains("train.global_batch"), "{e}");
}

#[test]
fn docs_list_every_key_of_the_schema() {
    let doc = std::fs::read_to_string(root().join("docs/recipes.md")).unwrap();
    let paths = schema_paths();
    assert!(paths.len() > 40, "{paths:?}");
    for p in &paths {
        assert!(
            doc.contains(&format!("`{p}`")),
            "docs/recipes.md does not document `{p}`"
        );
    }
}
