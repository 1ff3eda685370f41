//! Training recipes: the YAML schema ([`schema`]), strict parsing, command-line overrides and the checks
//! that reject a recipe before any process starts.
//!
//! - **Strict**: every section denies unknown keys; the error names the key, the file and the line
//!   (`recipes/x.yaml:7:3: train: unknown field `lr2`, expected one of ...`).
//! - **Defaults**: every field has one, written in its doc comment and in `docs/recipes.md` (a test checks
//!   that every field of the schema appears there).
//! - **Overrides**: `--set train.lr=2e-4` ([`Recipe::apply_set`]) parses the value as YAML and re-checks the
//!   whole recipe through the same typed structs, so a bad type or an unknown path is an error naming it.
//! - **Checks** ([`Recipe::validate`]): value ranges and combinations, e.g. the global batch must split into
//!   whole micro-batches for every world size the job may run with.
//!
//! **Invariant: this crate knows nothing about tensors or processes** (the `m3d` binary parses recipes
//! without linking libtorch); it turns YAML into checked values.

pub mod schema;

use std::ops::RangeInclusive;
use std::path::Path;

use regex::Regex;
pub use schema::*;

/// Why a recipe was refused.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("read recipe {file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// YAML syntax, an unknown key or a value of the wrong type. `line`/`column` are 1-based.
    #[error("{}: {message}", location(file, *line, *column))]
    Parse {
        file: String,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// A value out of range or a combination that cannot run.
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
    /// A `--set key=value` override that does not apply.
    #[error("--set {expr}: {message}")]
    Set { expr: String, message: String },
}

fn location(file: &str, line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{file}:{l}:{c}"),
        (Some(l), None) => format!("{file}:{l}"),
        _ => file.to_string(),
    }
}

/// serde_yaml's message without its trailing " at line L column C" (the location goes in front instead).
fn parse_error(file: &str, e: &serde_yaml::Error) -> RecipeError {
    let mut message = e.to_string();
    if let Some(i) = message.rfind(" at line ") {
        message.truncate(i);
    }
    let loc = e.location();
    RecipeError::Parse {
        file: file.to_string(),
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        message,
    }
}

const CLIP_PRESETS: &[&str] = &["m3d", "tiny", "debug"];
const LAMED_PRESETS: &[&str] = &["llama2-7b", "llama3-8b", "phi3-mini", "tiny", "debug"];
const TASKS: &[&str] = &["cap", "vqa", "seg", "refseg"];

impl Recipe {
    /// Reads, parses and validates the recipe at `path`, then applies the `--set` overrides in order and
    /// validates again. An unnamed recipe takes the file's stem as its name.
    pub fn load(path: &Path, sets: &[String]) -> Result<Recipe, RecipeError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
            file: file.clone(),
            source,
        })?;
        let mut recipe = Recipe::from_yaml_str(&text, &file)?;
        if recipe.name.is_none() {
            recipe.name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string);
        }
        for s in sets {
            recipe.apply_set(s)?;
        }
        recipe.validate(&file)?;
        Ok(recipe)
    }

    /// Parses and validates YAML text; `origin` (a file name) is what errors cite.
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<Recipe, RecipeError> {
        let recipe: Recipe = serde_yaml::from_str(text).map_err(|e| parse_error(origin, &e))?;
        recipe.validate(origin)?;
        Ok(recipe)
    }

    /// The recipe as YAML (every field written out, defaults included): what a run records as its
    /// effective recipe.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_else(|e| format!("# unserialisable recipe: {e}\n"))
    }

    /// Applies one `path=value` override, e.g. `train.lr=2e-4`, `workers.max=4`, `data.tasks.0.weight=2`,
    /// `model.lora.r=8` (an unset optional section is created with its defaults). The value is YAML
    /// (`null` clears an optional field; `[0.9, 0.95]` sets a list). Unknown paths and values of the wrong
    /// type are errors naming them; the recipe is unchanged on error. Does not validate ranges: call
    /// [`Recipe::validate`] after the last override ([`Recipe::load`] does).
    pub fn apply_set(&mut self, expr: &str) -> Result<(), RecipeError> {
        let err = |message: String| RecipeError::Set {
            expr: expr.to_string(),
            message,
        };
        let (path, value) = expr
            .split_once('=')
            .ok_or_else(|| err("expected `section.key=value`".into()))?;
        let path = path.trim();
        if path.is_empty() || path.split('.').any(str::is_empty) {
            return Err(err(format!("`{path}` is not a key path")));
        }
        let value: serde_yaml::Value = serde_yaml::from_str(value)
            .map_err(|e| err(format!("value `{value}` is not YAML: {e}")))?;
        let mut root = serde_yaml::to_value(&*self).map_err(|e| err(e.to_string()))?;
        let parts: Vec<&str> = path.split('.').collect();
        let mut cur = &mut root;
        for (i, part) in parts.iter().enumerate() {
            let here = if i == 0 {
                "the recipe".to_string()
            } else {
                format!("`{}`", parts[..i].join("."))
            };
            if cur.is_null() {
                // An optional section that is not set: create it; deserialisation rejects unknown keys.
                *cur = serde_yaml::Value::Mapping(Default::default());
                if let serde_yaml::Value::Mapping(m) = cur {
                    m.insert((*part).into(), serde_yaml::Value::Null);
                }
            }
            cur = match cur {
                serde_yaml::Value::Mapping(m) => {
                    let fields: Vec<String> = m
                        .keys()
                        .filter_map(|k| k.as_str().map(str::to_string))
                        .collect();
                    match m.get_mut(*part) {
                        Some(v) => v,
                        None => {
                            return Err(err(format!(
                                "unknown key `{path}`: {here} has no field `{part}` (fields: {})",
                                fields.join(", ")
                            )))
                        }
                    }
                }
                serde_yaml::Value::Sequence(s) => {
                    let len = s.len();
                    let idx: usize = part.parse().map_err(|_| {
                        err(format!(
                            "unknown key `{path}`: {here} is a list, `{part}` is not an index"
                        ))
                    })?;
                    s.get_mut(idx).ok_or_else(|| {
                        err(format!(
                            "unknown key `{path}`: {here} has {len} entries, no index {idx}"
                        ))
                    })?
                }
                _ => {
                    return Err(err(format!(
                        "unknown key `{path}`: {here} is a value, not a section"
                    )))
                }
            };
        }
        *cur = value;
        let updated: Recipe =
            serde_yaml::from_value(root).map_err(|e| err(format!("`{path}`: {e}")))?;
        *self = updated;
        Ok(())
    }

    /// Checks ranges and combinations; `origin` is the file errors cite.
    pub fn validate(&self, origin: &str) -> Result<(), RecipeError> {
        let bad = |field: &str, message: String| {
            Err(RecipeError::Invalid {
                file: origin.to_string(),
                field: field.to_string(),
                message,
            })
        };
        if let Some(name) = &self.name {
            if name.trim().is_empty() || name.contains('/') {
                return bad("name", format!("`{name}` must be non-empty without `/`"));
            }
        }
        // model
        let m = &self.model;
        let presets = match m.kind {
            ModelKind::Clip => CLIP_PRESETS,
            ModelKind::Lamed => LAMED_PRESETS,
        };
        if m.config.is_none() && !presets.contains(&m.preset.as_str()) {
            return bad(
                "model.preset",
                format!(
                    "`{}` is not a {:?} preset (expected one of {})",
                    m.preset,
                    m.kind,
                    presets.join(", ")
                ),
            );
        }
        if m.kind == ModelKind::Clip {
            if m.lora.is_some() {
                return bad("model.lora", "LoRA applies to `lamed` models only".into());
            }
            if m.llm.is_some() {
                return bad(
                    "model.llm",
                    "a base LLM applies to `lamed` models only".into(),
                );
            }
            if m.segmentation {
                return bad(
                    "model.segmentation",
                    "segmentation applies to `lamed` models only".into(),
                );
            }
        }
        for (i, init) in m.init_from.iter().enumerate() {
            if init.path.trim().is_empty() {
                return bad(&format!("model.init_from.{i}.path"), "empty path".into());
            }
        }
        if let Some(l) = &m.lora {
            if l.r < 1 {
                return bad("model.lora.r", format!("{} must be at least 1", l.r));
            }
            if !(l.alpha.is_finite() && l.alpha > 0.0) {
                return bad("model.lora.alpha", format!("{} must be > 0", l.alpha));
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return bad(
                    "model.lora.dropout",
                    format!("{} must be in [0, 1)", l.dropout),
                );
            }
        }
        for (i, p) in m.trainable.iter().enumerate() {
            if p.is_empty() {
                return bad(&format!("model.trainable.{i}"), "empty prefix".into());
            }
        }
        // data
        let d = &self.data;
        if d.tasks.is_empty() {
            return bad("data.tasks", "at least one task is needed".into());
        }
        for (i, t) in d.tasks.iter().enumerate() {
            let f = |k: &str| format!("data.tasks.{i}.{k}");
            if !TASKS.contains(&t.task.as_str()) {
                return bad(
                    &f("task"),
                    format!(
                        "`{}` is not a task (expected one of {})",
                        t.task,
                        TASKS.join(", ")
                    ),
                );
            }
            if m.kind == ModelKind::Clip && t.task != "cap" {
                return bad(
                    &f("task"),
                    format!("CLIP trains on image-text pairs (`cap`), not `{}`", t.task),
                );
            }
            if t.carries_masks() && !m.segmentation {
                // Their masks would be loaded and silently left out of the loss.
                return bad(
                    &f("task"),
                    format!(
                        "`{}` samples carry masks, which train the segmentation module: set \
                         model.segmentation: true (or train only `kinds: [rec, reg]` of `seg`)",
                        t.task
                    ),
                );
            }
            if t.shards.is_empty() || t.shards.iter().any(|s| s.trim().is_empty()) {
                return bad(
                    &f("shards"),
                    "at least one non-empty shard URL is needed".into(),
                );
            }
            if !(t.weight.is_finite() && t.weight >= 0.0) {
                return bad(&f("weight"), format!("{} must be >= 0", t.weight));
            }
        }
        if d.tasks.iter().all(|t| t.weight == 0.0) {
            return bad(
                "data.tasks",
                "every task has weight 0: nothing to train on".into(),
            );
        }
        if d.max_text_len < 2 {
            return bad(
                "data.max_text_len",
                format!("{} must be at least 2", d.max_text_len),
            );
        }
        if d.read_ahead < 1 {
            return bad("data.read_ahead", "must be at least 1".into());
        }
        if d.shuffle_block < 1 {
            return bad("data.shuffle_block", "must be at least 1 sample".into());
        }
        if d.shuffle_window < 1 {
            return bad("data.shuffle_window", "must be at least 1 block".into());
        }
        // train
        let t = &self.train;
        if t.epochs < 1 {
            return bad("train.epochs", "must be at least 1".into());
        }
        if t.max_steps == Some(0) {
            return bad("train.max_steps", "must be at least 1 (or null)".into());
        }
        if t.global_batch < 1 {
            return bad("train.global_batch", "must be at least 1".into());
        }
        if t.micro_batch == Some(0) {
            return bad("train.micro_batch", "must be at least 1 (or null)".into());
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return bad("train.lr", format!("{} must be > 0", t.lr));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return bad(
                "train.weight_decay",
                format!("{} must be >= 0", t.weight_decay),
            );
        }
        for (i, b) in t.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return bad(
                    &format!("train.betas.{i}"),
                    format!("{b} must be in [0, 1)"),
                );
            }
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return bad("train.eps", format!("{} must be > 0", t.eps));
        }
        if !(0.0..=1.0).contains(&t.warmup_ratio) {
            return bad(
                "train.warmup_ratio",
                format!("{} must be in [0, 1]", t.warmup_ratio),
            );
        }
        if let Some(n) = t.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return bad("train.max_grad_norm", format!("{n} must be > 0 (or null)"));
            }
        }
        if t.log_every < 1 {
            return bad("train.log_every", "must be at least 1".into());
        }
        if !(1..=4096).contains(&t.bucket_mb) {
            return bad(
                "train.bucket_mb",
                format!("{} is not in 1..=4096", t.bucket_mb),
            );
        }
        for (i, p) in t.no_decay.iter().enumerate() {
            if let Err(e) = Regex::new(p) {
                return bad(&format!("train.no_decay.{i}"), format!("`{p}`: {e}"));
            }
        }
        // workers
        let w = &self.workers;
        if w.min < 1 {
            return bad("workers.min", "must be at least 1".into());
        }
        if let Some(max) = w.max {
            if max < w.min {
                return bad(
                    "workers.max",
                    format!("{max} is below workers.min {}", w.min),
                );
            }
        }
        for (field, secs) in [
            ("workers.heartbeat_timeout_s", w.heartbeat_timeout_s),
            ("workers.rendezvous_timeout_s", w.rendezvous_timeout_s),
        ] {
            if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
                return bad(field, format!("{secs} must be in (0, 86400] seconds"));
            }
        }
        // batch arithmetic, for every world size the job may run with
        for world in self.world_sizes() {
            let micro = self.micro_batch(world);
            if t.global_batch % (micro * world) != 0 {
                return bad(
                    "train.global_batch",
                    format!(
                        "{} is not a multiple of micro_batch {micro} × {world} workers = {} (every world \
                         size in workers.min..=workers.max must divide it)",
                        t.global_batch,
                        micro * world
                    ),
                );
            }
        }
        if self.model.kind == ModelKind::Clip {
            if let Some(micro) = t.micro_batch {
                if self.world_sizes().any(|w| micro * w != t.global_batch) {
                    return bad(
                        "train.micro_batch",
                        format!(
                            "M3D-CLIP's contrastive loss compares every pair of the global batch in one pass, so it \
                             cannot be accumulated: micro_batch {micro} × world size must equal global_batch {} \
                             for every world size; leave train.micro_batch unset",
                            t.global_batch
                        ),
                    );
                }
            }
        }
        // checkpoint
        let c = &self.checkpoint;
        if c.keep_last < 1 {
            return bad("checkpoint.keep_last", "must be at least 1".into());
        }
        if c.keep_every == Some(0) {
            return bad(
                "checkpoint.keep_every",
                "must be at least 1 (or null)".into(),
            );
        }
        Ok(())
    }

    /// The recipe's name (`run` when it has none).
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("run")
    }

    /// The world sizes the job may run with: `workers.min..=workers.max`.
    pub fn world_sizes(&self) -> RangeInclusive<usize> {
        let min = self.workers.min;
        min..=self.workers.max.unwrap_or(min).max(min)
    }

    /// Samples per forward pass on one worker at world size `world`: `train.micro_batch`, or
    /// `global_batch / world` (no accumulation).
    pub fn micro_batch(&self, world: usize) -> usize {
        self.train
            .micro_batch
            .unwrap_or(self.train.global_batch / world.max(1))
            .max(1)
    }

    /// Micro-batches accumulated per optimizer step at world size `world`:
    /// `global_batch / (micro_batch × world)`.
    pub fn grad_accum(&self, world: usize) -> Result<usize, RecipeError> {
        let micro = self.micro_batch(world);
        let per_step = micro * world;
        if world == 0
            || !self.world_sizes().contains(&world)
            || self.train.global_batch % per_step != 0
        {
            return Err(RecipeError::Invalid {
                file: self.name().to_string(),
                field: "workers".into(),
                message: format!(
                    "world size {world} is outside workers.min..=workers.max ({:?}) or does not divide \
                     global_batch {} into micro-batches of {micro}",
                    self.world_sizes(),
                    self.train.global_batch
                ),
            });
        }
        Ok(self.train.global_batch / per_step)
    }

    /// Optimizer steps of the run: `train.max_steps`, else `epochs × steps_per_epoch`.
    pub fn total_steps(&self, steps_per_epoch: u64) -> u64 {
        self.train
            .max_steps
            .unwrap_or(self.train.epochs as u64 * steps_per_epoch)
    }

    /// `output.run`, or `runs/<name>`.
    pub fn run_url(&self) -> String {
        self.output
            .run
            .clone()
            .unwrap_or_else(|| format!("runs/{}", self.name()))
    }

    /// `checkpoint.url`, or `<run>/checkpoints`.
    pub fn checkpoint_url(&self) -> String {
        self.checkpoint
            .url
            .clone()
            .unwrap_or_else(|| format!("{}/checkpoints", self.run_url().trim_end_matches('/')))
    }

    /// `workers.heartbeat_timeout_s` as a duration.
    pub fn heartbeat_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.workers.heartbeat_timeout_s)
    }

    /// `workers.rendezvous_timeout_s` as a duration.
    pub fn rendezvous_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.workers.rendezvous_timeout_s)
    }

    /// `train.precision`, or f32 on the CPU and bf16 on CUDA.
    pub fn precision(&self) -> Precision {
        self.train.precision.unwrap_or(match self.workers.device {
            DeviceKind::Cpu => Precision::F32,
            DeviceKind::Cuda => Precision::Bf16,
        })
    }
}

/// Every key path of the schema (`train.lr`, `data.tasks.*.weight`, `model.lora.r`, ...), from a recipe
/// with every optional section filled: what `docs/recipes.md` must document.
pub fn schema_paths() -> Vec<String> {
    let mut r = Recipe {
        name: Some("x".into()),
        model: ModelSection {
            kind: ModelKind::Lamed,
            preset: "debug".into(),
            config: None,
            llm: None,
            tokenizer: None,
            init_from: vec![InitFrom {
                path: "x".into(),
                select_prefix: None,
                add_prefix: None,
                exclude: Vec::new(),
                strict: true,
            }],
            lora: None,
            trainable: vec![],
            segmentation: false,
        },
        data: DataSection {
            tasks: vec![TaskData {
                task: "cap".into(),
                shards: vec!["x".into()],
                volumes: vec!["y".into()],
                kinds: Vec::new(),
                weight: 1.0,
            }],
            split: "train".into(),
            max_text_len: 512,
            augment: true,
            read_ahead: 4,
            cache_bytes: 1,
            shuffle: ShuffleMode::Blocks,
            shuffle_block: 32,
            shuffle_window: 8,
        },
        train: TrainSection::default(),
        workers: WorkersSection::default(),
        checkpoint: CheckpointSection::default(),
        output: OutputSection::default(),
    };
    r.model.lora = Some(LoraSection {
        r: 16,
        alpha: 32.0,
        dropout: 0.05,
        target_modules: vec![],
        use_rslora: false,
    });
    let mut out = Vec::new();
    if let Ok(v) = serde_yaml::to_value(&r) {
        collect_paths(&v, String::new(), &mut out);
    }
    out
}

fn collect_paths(v: &serde_yaml::Value, prefix: String, out: &mut Vec<String>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, child) in m {
                let Some(k) = k.as_str() else { continue };
                let p = if prefix.is_empty() {
                    k.to_string()
                } else {
                    format!("{prefix}.{k}")
                };
                out.push(p.clone());
                collect_paths(child, p, out);
            }
        }
        serde_yaml::Value::Sequence(s) => {
            // Lists of sections (`data.tasks`, `model.init_from`) document their entries' keys as `*`.
            if let Some(first @ serde_yaml::Value::Mapping(_)) = s.first() {
                collect_paths(first, format!("{prefix}.*"), out);
            }
        }
        _ => {}
    }
}
