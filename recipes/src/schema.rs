//! The recipe schema: one struct per YAML section, every field optional unless stated, every default written
//! in its doc comment (and in `docs/recipes.md`, which a test keeps in step with these structs).
//!
//! Every struct denies unknown fields, so a misspelt key is an error that names the key, its line and the
//! file instead of a silently ignored setting.

use serde::{Deserialize, Serialize};

/// A whole training recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Name of the run, used in log lines and as the default output folder (`runs/<name>`). Default: the
    /// recipe file's stem (`clip-tiny` for `recipes/clip-tiny.yaml`), or `run` for a recipe from a string.
    #[serde(default)]
    pub name: Option<String>,
    /// The model to train. Required.
    pub model: ModelSection,
    /// The training data. Required (at least one task).
    pub data: DataSection,
    /// Optimisation: steps, batch sizes, optimizer, schedule, precision.
    #[serde(default)]
    pub train: TrainSection,
    /// The workers of the job.
    #[serde(default)]
    pub workers: WorkersSection,
    /// Checkpointing.
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    /// Where the run writes metrics, logs and the final weights.
    #[serde(default)]
    pub output: OutputSection,
}

/// Which model family a recipe trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// M3D-CLIP: 3-D ViT + BERT, contrastive loss.
    Clip,
    /// M3D-LaMed: ViT + projector + causal LLM (+ optional SegVol).
    Lamed,
}

/// `model:` the model to build and where its initial weights come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `clip` or `lamed`. Required.
    pub kind: ModelKind,
    /// A named size: `clip`: `m3d` (the published M3D-CLIP), `tiny` (M3D's 32x256x256 input, a few
    /// thousand parameters per layer) or `debug`; `lamed`: `llama2-7b`, `llama3-8b`, `phi3-mini`, `tiny`
    /// or `debug`. Default: `debug` (the tiny test size); ignored when `config` is given.
    #[serde(default = "default_preset")]
    pub preset: String,
    /// Path or URL of an HF-style `config.json` that replaces the preset. Default: none.
    #[serde(default)]
    pub config: Option<String>,
    /// LaMed: local HF folder of the base LLM, the reference's `--model_name_or_path` (`Llama-2-7b-chat-hf`,
    /// `Meta-Llama-3-8B-Instruct`, `Phi-3-mini-4k-instruct`: `config.json`, `tokenizer.json`, safetensors,
    /// sharded or not). Its `config.json` is the LLM (unless `config` is given; the preset's vision tower,
    /// projector and SegVol stay), its `tokenizer.json` the run's (unless `tokenizer` is given), and its
    /// weights are loaded before `init_from`, every LLM parameter required, with `embed_tokens` and
    /// `lm_head` cut to the tokenizer's entries and grown by the four LaMed tokens, each new row the mean of
    /// the kept rows (the reference's `resize_token_embeddings` + `initialize_vision_tokenizer`).
    /// Default: none.
    #[serde(default)]
    pub llm: Option<String>,
    /// Path of the HF `tokenizer.json` (folder or file). Default: none, which is only allowed with the
    /// `debug` and `tiny` presets: a word-level vocabulary is then built from the training texts (the same
    /// on every worker) and written to `<run>/tokenizer.json`.
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// Weights loaded, in order, before training. Default: none (random initialisation).
    #[serde(default)]
    pub init_from: Vec<InitFrom>,
    /// LoRA adapters on the LLM (LaMed stage 2). Default: none (no adapters).
    #[serde(default)]
    pub lora: Option<LoraSection>,
    /// Trainable parameters, by name prefix (`model.mm_projector.` for LaMed stage 1). Empty: every
    /// parameter is trained, except the base weights LoRA freezes. With LoRA, the adapters are always
    /// trainable and these prefixes are added to them. Default: `[]`.
    #[serde(default)]
    pub trainable: Vec<String>,
    /// LaMed only: build the segmentation module (`[SEG]` token, SegVol). Default: `false`.
    #[serde(default)]
    pub segmentation: bool,
}

fn default_preset() -> String {
    "debug".into()
}

/// One checkpoint to load into the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitFrom {
    /// Path or URL of a checkpoint file or HF folder (safetensors, sharded or `.bin`). Required.
    pub path: String,
    /// Keep only the keys starting with this prefix, prefix removed (`vision_encoder.` takes the ViT out of
    /// an M3D-CLIP checkpoint). Default: none (every key).
    #[serde(default)]
    pub select_prefix: Option<String>,
    /// Prefix added to every (selected) key (`model.vision_tower.vision_tower.` puts that ViT into LaMed).
    /// Default: none.
    #[serde(default)]
    pub add_prefix: Option<String>,
    /// Checkpoint keys left out before `select_prefix` (by prefix): `[model.text_encoder.]` for BAAI/SegVol's
    /// file, whose text encoder M3D does not use (the reference skips those keys). Default: `[]`.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Whether the load must cover the model's parameters exactly (missing, unexpected and mis-shaped keys
    /// are errors); with `add_prefix`, the parameters under that prefix (a component loaded into its place:
    /// the vision tower, SegVol). With `false`, the keys the checkpoint has are loaded and the rest is
    /// reported. Default: `true`.
    #[serde(default = "yes")]
    pub strict: bool,
}

fn yes() -> bool {
    true
}

/// `model.lora:` LoRA as PEFT configures it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Rank. Default: `16` (M3D).
    #[serde(default = "default_lora_r")]
    pub r: i64,
    /// Scale numerator: adapters add `(alpha / r) · B A x`. Default: `32` (M3D).
    #[serde(default = "default_lora_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter input. Default: `0.05` (M3D).
    #[serde(default = "default_lora_dropout")]
    pub dropout: f64,
    /// Module names (PEFT's list rule). Empty: M3D's choice, every Linear of the LLM. Default: `[]`.
    #[serde(default)]
    pub target_modules: Vec<String>,
    /// rsLoRA scaling `alpha / sqrt(r)`. Default: `false`.
    #[serde(default)]
    pub use_rslora: bool,
}

fn default_lora_r() -> i64 {
    16
}
fn default_lora_alpha() -> f64 {
    32.0
}
fn default_lora_dropout() -> f64 {
    0.05
}

/// `data:` which shards to train on and how samples are made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// The tasks mixed into training. Required, at least one.
    pub tasks: Vec<TaskData>,
    /// Which split of the shards is trained on (samples of other splits are left out). Default: `train`.
    #[serde(default = "default_split")]
    pub split: String,
    /// Longest text in tokens; longer ones are truncated. Default: `512`.
    #[serde(default = "default_max_text_len")]
    pub max_text_len: usize,
    /// Random training augmentation of the volumes (M3D's flips, intensity scale/shift). Default: `true`.
    #[serde(default = "yes")]
    pub augment: bool,
    /// Batches decoded ahead of the training step, per worker. Default: `4`.
    #[serde(default = "default_read_ahead")]
    pub read_ahead: usize,
    /// Bytes of shards a worker keeps in its local cache. Default: `1073741824` (1 GiB).
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// Sample order of an epoch: `global` (one permutation of all samples, as the reference's random sampler)
    /// or `blocks` (blocks of `shuffle_block` consecutive samples permuted, the samples of every
    /// `shuffle_window` consecutive blocks of that order shuffled among themselves: each volume read about
    /// once per epoch per worker, for object storage). Default: `global`.
    #[serde(default)]
    pub shuffle: ShuffleMode,
    /// `blocks`: consecutive samples per block. Default: `32` (`m3d data-prep --shard-volumes`' default,
    /// i.e. one M3D-Cap volume shard, which holds one sample per volume).
    #[serde(default = "default_shuffle_block")]
    pub shuffle_block: u64,
    /// `blocks`: blocks per window, the span over which samples are mixed. A worker's `cache_bytes` should
    /// hold one window's volumes (plus `read_ahead` steps' worth), or volumes are read again. Default: `8`.
    #[serde(default = "default_shuffle_window")]
    pub shuffle_window: u64,
}

/// `data.shuffle`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShuffleMode {
    /// One permutation of all samples per epoch.
    #[default]
    Global,
    /// Blocks of consecutive samples permuted, samples shuffled within windows of blocks.
    Blocks,
}

fn default_split() -> String {
    "train".into()
}
fn default_max_text_len() -> usize {
    512
}
fn default_read_ahead() -> usize {
    4
}
fn default_cache_bytes() -> u64 {
    1 << 30
}
fn default_shuffle_block() -> u64 {
    32
}
fn default_shuffle_window() -> u64 {
    8
}

/// One task of `data.tasks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskData {
    /// Task name: `cap` (captions), `vqa`, `seg` or `refseg`. Required.
    pub task: String,
    /// Shard dataset URLs (folders with a `manifest.json`: a path, `file://` or `s3://`). Required, at least
    /// one.
    pub shards: Vec<String>,
    /// Shard datasets holding the volumes this task's samples refer to, when its own shards store none
    /// (M3D-VQA's samples name M3D-Cap volumes: `volumes: [<cap shards>]`). Default: `[]`.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Which stored sample kinds of the task train, by their names in the shards: `vqa` has `vqa_closed`,
    /// `vqa_open`, `vqa_yes_no`; `seg` has `seg`, `rec`, `reg`; `cap` has `caption`; `refseg` has `refseg`
    /// (M3D-LaMed's stage 1 trains `vqa` with `[vqa_closed, vqa_open]`). Default: `[]`, every kind.
    #[serde(default)]
    pub kinds: Vec<String>,
    /// How often each sample of this task is drawn per epoch: the task contributes `ceil(weight × samples)`
    /// entries to the epoch's order (a weight below 1 takes a prefix of its samples, in shard order); `0`
    /// leaves the task out (its datasets are not opened), which lets `--set` switch a task off.
    /// Default: `1.0`.
    #[serde(default = "default_weight")]
    pub weight: f64,
}

fn default_weight() -> f64 {
    1.0
}

impl TaskData {
    /// Whether this task trains on samples with masks (the segmentation module's): `refseg`, and `seg`
    /// unless its `kinds` leave `seg` out; a task switched off (weight 0) trains on none.
    pub fn carries_masks(&self) -> bool {
        self.weight > 0.0
            && (self.task == "refseg"
                || (self.task == "seg"
                    && (self.kinds.is_empty() || self.kinds.iter().any(|k| k == "seg"))))
    }
}

/// The shape of the learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear warmup from 0, then half a cosine down to 0 (transformers' `get_cosine_schedule_with_warmup`).
    Cosine,
    /// Linear warmup from 0, then constant.
    Constant,
}

/// Numeric precision of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    /// f32 everywhere.
    #[serde(rename = "f32")]
    F32,
    /// bf16 parameters and activations, f32 master weights and optimizer state (DeepSpeed's bf16 mode).
    #[serde(rename = "bf16")]
    Bf16,
    /// f32 parameters, bf16 matrix products (torch.autocast / accelerate `mixed_precision="bf16"`).
    #[serde(rename = "bf16-autocast")]
    Bf16Autocast,
}

/// `train:` optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Seed of parameter initialisation, data order and dropout. Default: `42`.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Passes over the data. Default: `1`. `max_steps`, when set, wins (transformers' rule).
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    /// Optimizer steps to run, overriding `epochs`. Default: none.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Samples per optimizer step, over all workers. Default: `8`.
    #[serde(default = "default_global_batch")]
    pub global_batch: usize,
    /// Samples per forward pass on one worker. Default: none, which means `global_batch / world size` (no
    /// accumulation at any world size). Gradient accumulation is derived:
    /// `global_batch / (micro_batch × world size)`, which must be a whole number for every world size in
    /// `workers.min..=workers.max`. M3D-CLIP cannot accumulate (its loss compares all pairs of the global
    /// batch at once): leave it unset there.
    #[serde(default)]
    pub micro_batch: Option<usize>,
    /// Peak learning rate. Default: `1e-4`.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Decoupled (AdamW) weight decay. Default: `0.0` (transformers' default).
    #[serde(default)]
    pub weight_decay: f64,
    /// Parameters without weight decay: regexes searched in the lower-cased parameter name. Default:
    /// transformers Trainer's rule — `bias`, `layernorm`, `rmsnorm`, `(?:^|\.)norm(?:$|\.)`,
    /// `_norm(?:$|\.)` — plus `(?:^|\.)norm\d+\.` and `norm_final_attn\.` for the LayerNorms of MONAI's ViT
    /// and SegVol, which the Trainer excludes by module type.
    #[serde(default = "default_no_decay")]
    pub no_decay: Vec<String>,
    /// Adam betas. Default: `[0.9, 0.999]`.
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    /// Adam epsilon (added outside the square root). Default: `1e-8`.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Share of the steps spent warming up linearly from 0: `ceil(ratio × total steps)` steps, as
    /// transformers computes it. Default: `0.03` (M3D).
    #[serde(default = "default_warmup_ratio")]
    pub warmup_ratio: f64,
    /// `cosine` or `constant` (after warmup). Default: `cosine`.
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    /// Gradient clipping by the total 2-norm; `null` turns it off. Default: `1.0` (transformers' default).
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: Option<f64>,
    /// `f32`, `bf16` or `bf16-autocast`. Default: none, which means `f32` on the CPU and `bf16` on CUDA.
    #[serde(default)]
    pub precision: Option<Precision>,
    /// Steps between metrics lines. Default: `10`.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Gradient bucket size of the all-reduce, in MiB. Default: `25` (DDP's `bucket_cap_mb`).
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: usize,
    /// Reduce a bucket of gradients as soon as the backward pass has finished it, while it computes the rest
    /// (DDP's overlap; from the second step, once the order in which gradients become final is known).
    /// Default: `true`. `false` reduces every bucket after the backward pass.
    #[serde(default = "default_overlap")]
    pub overlap_grad_reduce: bool,
    /// Activation checkpointing: every decoder layer, ViT block and BERT layer keeps only its input in the
    /// forward pass and is re-run in the backward pass (HF's `gradient_checkpointing`): the same gradients, a
    /// fraction of the activation memory, about a third more compute. Default: `false`.
    #[serde(default)]
    pub activation_checkpointing: bool,
}

fn default_seed() -> u64 {
    42
}
fn default_epochs() -> u32 {
    1
}
fn default_global_batch() -> usize {
    8
}
fn default_lr() -> f64 {
    1e-4
}
/// The default of `train.no_decay`.
pub fn default_no_decay() -> Vec<String> {
    [
        r"bias",
        r"layernorm",
        r"rmsnorm",
        r"(?:^|\.)norm(?:$|\.)",
        r"_norm(?:$|\.)",
        r"(?:^|\.)norm\d+\.",
        r"norm_final_attn\.",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_warmup_ratio() -> f64 {
    0.03
}
fn default_schedule() -> Schedule {
    Schedule::Cosine
}
fn default_max_grad_norm() -> Option<f64> {
    Some(1.0)
}
fn default_log_every() -> u64 {
    10
}
fn default_bucket_mb() -> usize {
    25
}
fn default_overlap() -> bool {
    true
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            seed: default_seed(),
            epochs: default_epochs(),
            max_steps: None,
            global_batch: default_global_batch(),
            micro_batch: None,
            lr: default_lr(),
            weight_decay: 0.0,
            no_decay: default_no_decay(),
            betas: default_betas(),
            eps: default_eps(),
            warmup_ratio: default_warmup_ratio(),
            schedule: default_schedule(),
            max_grad_norm: default_max_grad_norm(),
            precision: None,
            log_every: default_log_every(),
            bucket_mb: default_bucket_mb(),
            overlap_grad_reduce: default_overlap(),
            activation_checkpointing: false,
        }
    }
}

/// Where workers compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// `workers:` the data-parallel world.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersSection {
    /// Fewest workers the job runs with. Default: `1`.
    #[serde(default = "default_min_workers")]
    pub min: usize,
    /// Most workers the job uses. Default: none, which means `min` (a fixed world size).
    #[serde(default)]
    pub max: Option<usize>,
    /// `cpu` or `cuda` (one GPU per worker). Default: `cpu`.
    #[serde(default = "default_device")]
    pub device: DeviceKind,
    /// Restarts of the whole job on a cluster for failures other than preemption and node loss (which never
    /// count): the rendered JobSet's `failurePolicy.maxRestarts`. Default: `3`.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// Restart rounds the coordinator forms after a worker fails (a round with every survivor, resuming
    /// from the last checkpoint); one failure more fails the job. `m3d coordinator --restarts` and
    /// `m3d train --restarts` override it. Default: `3`.
    #[serde(default = "default_restart_rounds")]
    pub restart_rounds: u32,
    /// Seconds without a heartbeat after which a worker has failed (`--heartbeat-timeout` overrides it).
    /// Default: `10`.
    #[serde(default = "default_heartbeat_timeout_s")]
    pub heartbeat_timeout_s: f64,
    /// Seconds a round waits for slow starters once its first worker registered, before it starts with at
    /// least `min` workers (`m3d coordinator --rendezvous-timeout` overrides it). Default: `30`.
    #[serde(default = "default_rendezvous_timeout_s")]
    pub rendezvous_timeout_s: f64,
}

fn default_restart_rounds() -> u32 {
    3
}
fn default_heartbeat_timeout_s() -> f64 {
    10.0
}
fn default_rendezvous_timeout_s() -> f64 {
    30.0
}

fn default_max_restarts() -> u32 {
    3
}

fn default_min_workers() -> usize {
    1
}
fn default_device() -> DeviceKind {
    DeviceKind::Cpu
}

impl Default for WorkersSection {
    fn default() -> Self {
        WorkersSection {
            min: default_min_workers(),
            max: None,
            device: default_device(),
            max_restarts: default_max_restarts(),
            restart_rounds: default_restart_rounds(),
            heartbeat_timeout_s: default_heartbeat_timeout_s(),
            rendezvous_timeout_s: default_rendezvous_timeout_s(),
        }
    }
}

/// `checkpoint:` when and where training state is saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Folder URL of the checkpoints. Default: none, which means `<output.run>/checkpoints`.
    #[serde(default)]
    pub url: Option<String>,
    /// Optimizer steps between checkpoints (the last step is checkpointed too); `0` writes none (the run's
    /// `final/` weights are still written). Default: `0`.
    #[serde(default)]
    pub every: u64,
    /// How many of the most recent checkpoints are kept. Default: `2`.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// Also keep every checkpoint whose step is a multiple of this. Default: none.
    #[serde(default)]
    pub keep_every: Option<u64>,
    /// Write each commit record with a conditional put (`If-None-Match: *` on S3), so that of two writers of
    /// one step exactly one wins. Set `false` for an S3-compatible store that refuses conditional puts.
    /// Default: `true`.
    #[serde(default = "yes")]
    pub exclusive_commit: bool,
}

fn default_keep_last() -> usize {
    2
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            url: None,
            every: 0,
            keep_last: default_keep_last(),
            keep_every: None,
            exclusive_commit: true,
        }
    }
}

/// `output:` where the run's results go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Folder URL of the run (metrics, final weights, loss plot): a local path, `file://` or `s3://`.
    /// Default: none, which means `runs/<name>`.
    #[serde(default)]
    pub run: Option<String>,
    /// With `run` in a store (`file://`, `s3://`): seconds between uploads of the metrics lines written
    /// since the last one (an object store cannot append, so each upload rewrites the current part);
    /// `0` uploads after every line. A local path appends every line at once and ignores this.
    /// Default: `30`.
    #[serde(default = "default_metrics_flush_s")]
    pub metrics_flush_s: u64,
    /// A local folder that receives the run's inputs as the trainer saw them: `init.safetensors` (the weights
    /// before the first step), `trainable.json` and `batches.safetensors` (every step's batch, each distinct
    /// volume stored once), for replaying the run in another trainer (the trajectory test against HF's
    /// `Trainer` does). One worker only. Default: none.
    #[serde(default)]
    pub record_batches: Option<String>,
}

fn default_metrics_flush_s() -> u64 {
    30
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection {
            run: None,
            metrics_flush_s: default_metrics_flush_s(),
            record_batches: None,
        }
    }
}
