//! `m3d plan`: what a recipe will cost before anything is launched. The recipe's model is built shape-only
//! (every parameter a stride-0 view, nothing allocated: a 7B model in a few MiB) through the trainer's own
//! resolution ([`m3d_worker::job::model_spec`], LoRA and trainable rules), so the parameters counted are
//! exactly those the job trains. From them and the recipe:
//! - parameters, total and trainable, per part of the model;
//! - memory per GPU: weights, gradients, the f32 master weights and gradient buffers of bf16 training,
//!   AdamW's two moments, the all-reduce buckets, and the activations of one micro-batch ([`memory`]),
//!   with and without activation checkpointing;
//! - model FLOPs per sample ([`m3d_models::flops`], the convention of the GPU benchmark), steps per epoch
//!   from the datasets' manifests (or `--samples`), and the time at a stated MFU.
//!
//! A recipe that does not fit the chosen GPU is refused with the numbers and what to change.
//!
//! **Invariant: nothing here allocates a model's weights or reads a volume.**

pub mod gpu;
pub mod memory;

use std::path::PathBuf;

use m3d_coordinator::recipe::TrainingSet;
use m3d_models::flops;
use m3d_models::presets;
use m3d_models::VarBuilder;
use m3d_recipes::{DeviceKind, ModelKind, Precision, Recipe};
use m3d_worker::job::{self, ModelSpec};
use serde::Serialize;
use tch::nn::VarStore;
use tch::Device;

pub use gpu::Gpu;
use memory::{Activations, LamedFlows, Numerics};

/// Errors of `m3d plan`.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Job(#[from] Box<job::JobError>),
    #[error("{0}")]
    Recipe(String),
    #[error(
        "{0}: the epoch's size comes from the datasets' manifests; pass --samples N to plan without them"
    )]
    Data(String),
    #[error("{0}")]
    Model(#[from] m3d_models::ModelError),
}

/// What `m3d plan` is asked.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// World size. Default: `workers.max` of the recipe.
    pub workers: Option<usize>,
    /// The accelerator to check memory against. Default: `h100-80gb` for CUDA recipes, none on the CPU.
    pub gpu: Option<Gpu>,
    /// Samples per epoch, instead of reading the manifests.
    pub samples: Option<u64>,
    /// Model FLOPs utilisation the time estimate assumes.
    pub mfu: f64,
    /// Where a word-level vocabulary may be written (tiny presets without a tokenizer).
    pub scratch: PathBuf,
}

/// One part of the model.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Part {
    pub name: String,
    pub params: i64,
    pub trainable: i64,
}

/// Bytes per GPU.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub weights: f64,
    pub gradients: f64,
    /// bf16: the f32 master copy and f32 gradient buffer of every trainable parameter.
    pub master_and_f32_grads: f64,
    /// AdamW's exp_avg and exp_avg_sq, f32.
    pub optimizer: f64,
    /// Gradient buckets of the all-reduce (two in flight), with more than one worker.
    pub buckets: f64,
    /// The micro-batch's inputs on the device.
    pub inputs: f64,
    /// One micro-batch's saved activations, by component.
    pub activations: Activations,
    /// Everything, at the peak (the end of the forward pass of a micro-batch, gradients already there).
    pub total: f64,
    /// The same with activation checkpointing.
    pub total_checkpointed: f64,
}

/// The whole plan.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub recipe: String,
    pub kind: String,
    pub preset: String,
    pub workers: usize,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub global_batch: usize,
    pub precision: String,
    /// Base tokenizer entries the embeddings were sized for, and where that number came from.
    pub vocab: i64,
    pub vocab_source: String,
    /// Where the LLM's shape came from when `model.llm`'s `config.json` could not be read.
    pub llm_source: Option<String>,
    pub parts: Vec<Part>,
    pub params: i64,
    pub trainable: i64,
    pub memory: Memory,
    pub gpu: Option<Gpu>,
    /// Memory the job may use on the GPU (its memory less [`Gpu::reserve_bytes`]).
    pub usable_bytes: Option<f64>,
    /// Whether the recipe's setting (`train.activation_checkpointing`) fits the GPU.
    pub fits: bool,
    pub fits_checkpointed: bool,
    /// The recipe's `train.activation_checkpointing`.
    pub activation_checkpointing: bool,
    /// Model FLOPs of one sample's forward and backward.
    pub flops_per_sample: f64,
    pub samples_per_epoch: u64,
    pub samples_source: String,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub mfu: f64,
    /// Seconds of the whole run at `mfu` of the GPU's dense peak (none without a GPU).
    pub estimated_seconds: Option<f64>,
    /// What to change when it does not fit.
    pub advice: Vec<String>,
}

fn lamed_parts(name: &str) -> &'static str {
    if name.contains("lora_") {
        "lora"
    } else if name.contains("vision_tower") {
        "vision_tower"
    } else if name.contains("mm_projector") {
        "mm_projector"
    } else if name.contains("seg_projector") {
        "seg_projector"
    } else if name.contains("seg_module") {
        "seg_module"
    } else if name.contains("embed_tokens") {
        "embed_tokens"
    } else if name.starts_with("lm_head") {
        "lm_head"
    } else {
        "llm"
    }
}

fn clip_parts(name: &str) -> &'static str {
    if name.starts_with("vision_encoder.") {
        "vision_encoder"
    } else if name.starts_with("language_encoder.") {
        "language_encoder"
    } else {
        "projections"
    }
}

/// The base vocabulary the model is sized for: the recipe's tokenizer (as the trainer resolves it), else
/// a published preset's size when its files are not on this machine.
fn vocabulary(recipe: &Recipe, opts: &PlanOptions) -> Result<(i64, String), PlanError> {
    let m = &recipe.model;
    let resolved = job::resolve_tokenizer_with(recipe, &opts.scratch, || {
        let data = m3d_data::dataset::TrainData::open(recipe)
            .map_err(|e| job::JobError::Data(Box::new(e)))?;
        data.texts().map_err(|e| job::JobError::Data(Box::new(e)))
    });
    match resolved {
        Ok(t) => Ok((
            t.vocab_size(true) as i64,
            format!("tokenizer {}", t.path().display()),
        )),
        Err(e) => match presets::published_tokenizer_len(&m.preset) {
            Some(n) => Ok((
                n,
                format!(
                    "the published tokenizer of `{}` (not readable here: {e})",
                    m.preset
                ),
            )),
            None => Err(PlanError::Job(Box::new(e))),
        },
    }
}

/// Plans `recipe` (already validated).
pub fn plan(recipe: &Recipe, opts: &PlanOptions) -> Result<Plan, PlanError> {
    let world = opts.workers.unwrap_or(*recipe.world_sizes().end());
    if !recipe.world_sizes().contains(&world) {
        return Err(PlanError::Recipe(format!(
            "--workers {world} is outside workers.min..=workers.max ({:?})",
            recipe.world_sizes()
        )));
    }
    let micro = recipe.micro_batch(world);
    let accum = recipe
        .grad_accum(world)
        .map_err(|e| PlanError::Recipe(e.to_string()))?;
    let (vocab, vocab_source) = vocabulary(recipe, opts)?;
    // A base LLM folder that is not on this machine (it is on the cluster's volume): plan with the preset's
    // LLM, which names the same published model, and say so.
    let mut shaped = recipe.clone();
    let mut llm_source = None;
    if let Some(folder) = &recipe.model.llm {
        let config = std::path::Path::new(folder).join("config.json");
        if !config.is_file() && presets::published_tokenizer_len(&recipe.model.preset).is_some() {
            shaped.model.llm = None;
            llm_source = Some(format!(
                "preset `{}` ({} is not readable here)",
                recipe.model.preset,
                config.display()
            ));
        }
    }
    let spec = job::model_spec(&shaped, vocab).map_err(Box::new)?;
    let lora = job::lora_config(recipe);
    let vs = VarStore::new(Device::Cpu);
    let vb = VarBuilder::shape_only(&vs).with_lora(lora.clone());
    let _net = spec.build(&vb).map_err(Box::new)?;
    job::set_trainable(&vs, recipe, lora.is_some()).map_err(Box::new)?;

    // Parameters per part (persistent buffers such as SegVol's Fourier matrix are not parameters).
    let part_of: fn(&str) -> &'static str = match recipe.model.kind {
        ModelKind::Lamed => lamed_parts,
        ModelKind::Clip => clip_parts,
    };
    let mut parts: Vec<Part> = Vec::new();
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        if name.ends_with("positional_encoding_gaussian_matrix") {
            continue;
        }
        let t = &vars[name];
        let n = t.numel() as i64;
        let p = part_of(name);
        let idx = match parts.iter().position(|x| x.name == p) {
            Some(i) => i,
            None => {
                parts.push(Part {
                    name: p.to_string(),
                    params: 0,
                    trainable: 0,
                });
                parts.len() - 1
            }
        };
        parts[idx].params += n;
        if t.requires_grad() {
            parts[idx].trainable += n;
        }
    }
    let params: i64 = parts.iter().map(|p| p.params).sum();
    let trainable: i64 = parts.iter().map(|p| p.trainable).sum();
    let trains = |prefix: &str| {
        vars.iter()
            .any(|(k, t)| k.contains(prefix) && !k.contains("lora_") && t.requires_grad())
    };

    // Memory.
    let precision = recipe.precision();
    let (param_bytes, act) = match precision {
        Precision::Bf16 => (2.0, 2.0),
        Precision::F32 => (4.0, 4.0),
        Precision::Bf16Autocast => (4.0, 2.0),
    };
    let cpu = recipe.workers.device == DeviceKind::Cpu;
    let n = Numerics { act, cpu };
    let text = recipe.data.max_text_len as i64;
    let activations = match &spec {
        ModelSpec::Clip(c) => memory::clip(
            &c.vision,
            &c.text,
            (trains("vision_encoder."), trains("language_encoder.")),
            micro as i64,
            c.max_text_len.min(text),
            n,
        ),
        ModelSpec::Lamed(c) => {
            let flows = LamedFlows {
                vision: trains("vision_tower"),
                projector: trains("mm_projector"),
                embed: trains("embed_tokens"),
                llm_base: vars.iter().any(|(k, t)| {
                    k.starts_with("model.layers.") && !k.contains("lora_") && t.requires_grad()
                }),
                lm_head: trains("lm_head"),
                lora: lora.is_some(),
                seg_encoder: trains("seg_module.image_encoder"),
                seg_rest: trains("seg_module") || trains("seg_projector"),
            };
            let masks = recipe.data.tasks.iter().any(|t| t.carries_masks());
            let seg_samples = if masks { micro as i64 } else { 0 };
            memory::lamed(c, flows, lora.as_ref(), micro as i64, text, seg_samples, n)
        }
    };
    let t = trainable as f64;
    let weights = params as f64 * param_bytes;
    let gradients = t * param_bytes;
    let master_and_f32_grads = if param_bytes < 4.0 { 8.0 * t } else { 0.0 };
    let optimizer = 8.0 * t;
    let buckets = if world > 1 {
        2.0 * (recipe.train.bucket_mb as f64) * (1u64 << 20) as f64
    } else {
        0.0
    };
    let inputs = activations.inputs;
    let fixed = weights + gradients + master_and_f32_grads + optimizer + buckets + inputs;
    let total = fixed + activations.saved() + activations.transient;
    let total_checkpointed = fixed + activations.checkpointed + activations.transient;

    // FLOPs per sample.
    let flops_per_sample = flops::total(&match &spec {
        ModelSpec::Clip(c) => flops::clip(&vs, c, c.max_text_len.min(text)),
        ModelSpec::Lamed(c) => flops::lamed(&vs, c, text),
    });

    // Steps and time.
    let (samples_per_epoch, samples_source) = match opts.samples {
        Some(s) => (s, "--samples".to_string()),
        None => {
            let set = TrainingSet::of(recipe).map_err(|e| PlanError::Data(e.to_string()))?;
            (set.samples, "the datasets' manifests".to_string())
        }
    };
    let global = recipe.train.global_batch as u64;
    let steps_per_epoch = samples_per_epoch / global.max(1);
    let total_steps = recipe.total_steps(steps_per_epoch);
    let gpu = opts
        .gpu
        .or(if cpu { None } else { Gpu::named("h100-80gb") });
    let estimated_seconds = gpu.map(|g| {
        let peak = if matches!(precision, Precision::F32) {
            g.peak_f32
        } else {
            g.peak_bf16
        };
        total_steps as f64 * global as f64 * flops_per_sample / (world as f64 * peak * opts.mfu)
    });
    let usable_bytes = gpu.map(|g| g.memory_bytes - g.reserve_bytes());
    // The recipe's own setting decides whether it fits; the other figure is shown beside it.
    let checkpointing = recipe.train.activation_checkpointing;
    let (applicable, saved) = if checkpointing {
        (total_checkpointed, activations.checkpointed)
    } else {
        (total, activations.saved())
    };
    let fits = usable_bytes.is_none_or(|u| applicable <= u);
    let fits_checkpointed = usable_bytes.is_none_or(|u| total_checkpointed <= u);
    let mut advice = Vec::new();
    if let (Some(u), false) = (usable_bytes, fits) {
        if !checkpointing && fits_checkpointed {
            advice.push(format!(
                "train.activation_checkpointing: true ({} in all)",
                gib(total_checkpointed)
            ));
        }
        let per_sample = saved / micro as f64;
        let room = u - fixed - activations.transient / micro as f64;
        // The largest micro-batch that fits and divides each worker's share of the global batch.
        let most = (room / per_sample).floor().max(0.0) as usize;
        let share = recipe.train.global_batch / world.max(1);
        let smaller = (1..=most.min(share))
            .rev()
            .find(|m| share % m == 0)
            .unwrap_or(0);
        if smaller >= 1 && smaller < micro {
            advice.push(format!(
                "a train.micro_batch of at most {smaller} (with accumulation: the global batch stays {global})"
            ));
        }
        if fixed > u {
            advice.push(
                "the weights and optimizer state alone exceed the GPU: train fewer parameters (model.trainable, LoRA) or use a larger GPU"
                    .to_string(),
            );
        }
    }
    Ok(Plan {
        recipe: recipe.name().to_string(),
        kind: format!("{:?}", recipe.model.kind).to_lowercase(),
        preset: recipe.model.preset.clone(),
        workers: world,
        micro_batch: micro,
        grad_accum: accum,
        global_batch: recipe.train.global_batch,
        precision: format!("{precision:?}").to_lowercase(),
        vocab,
        vocab_source,
        llm_source,
        parts,
        params,
        trainable,
        memory: Memory {
            weights,
            gradients,
            master_and_f32_grads,
            optimizer,
            buckets,
            inputs,
            activations,
            total,
            total_checkpointed,
        },
        gpu,
        usable_bytes,
        fits,
        fits_checkpointed,
        activation_checkpointing: checkpointing,
        flops_per_sample,
        samples_per_epoch,
        samples_source,
        steps_per_epoch,
        total_steps,
        mfu: opts.mfu,
        estimated_seconds,
        advice,
    })
}

fn gib(b: f64) -> String {
    format!("{:.2} GiB", b / (1u64 << 30) as f64)
}

fn count(n: i64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

impl Plan {
    /// The plan as a person reads it.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let m = &self.memory;
        s += &format!(
            "recipe {} ({} {}), {} workers x micro-batch {} x accumulation {} = global batch {}, {}\n",
            self.recipe,
            self.kind,
            self.preset,
            self.workers,
            self.micro_batch,
            self.grad_accum,
            self.global_batch,
            self.precision
        );
        s += &format!("vocabulary {} ({})\n", self.vocab, self.vocab_source);
        if let Some(l) = &self.llm_source {
            s += &format!("LLM shape from {l}\n");
        }
        s += "\nparameters\n";
        for p in &self.parts {
            s += &format!(
                "  {:<18} {:>10}  trainable {:>10}\n",
                p.name,
                count(p.params),
                count(p.trainable)
            );
        }
        s += &format!(
            "  {:<18} {:>10}  trainable {:>10}\n\nmemory per GPU\n",
            "total",
            count(self.params),
            count(self.trainable)
        );
        for (name, b) in [
            ("weights", m.weights),
            ("gradients", m.gradients),
            ("master + f32 grads", m.master_and_f32_grads),
            ("AdamW moments", m.optimizer),
            ("all-reduce buckets", m.buckets),
            ("batch inputs", m.inputs),
        ] {
            s += &format!("  {name:<24} {:>12}\n", gib(b));
        }
        for (name, b) in &m.activations.parts {
            s += &format!("  activations {name:<12} {:>12}\n", gib(*b));
        }
        s += &format!(
            "  {:<24} {:>12}\n",
            "loss transient",
            gib(m.activations.transient)
        );
        s += &format!("  {:<24} {:>12}\n", "total", gib(m.total));
        s += &format!(
            "  {:<24} {:>12}\n",
            "total, act. checkpointing",
            gib(m.total_checkpointed)
        );
        s += &format!(
            "  (the recipe trains {} activation checkpointing)\n",
            if self.activation_checkpointing {
                "with"
            } else {
                "without"
            }
        );
        match (&self.gpu, self.usable_bytes) {
            (Some(g), Some(u)) => {
                s += &format!(
                    "  {} usable (of {}): {}\n",
                    gib(u),
                    g.name,
                    if self.fits {
                        "fits".to_string()
                    } else if self.fits_checkpointed {
                        "fits only with activation checkpointing".to_string()
                    } else {
                        "DOES NOT FIT".to_string()
                    }
                );
            }
            _ => s += "  (CPU recipe: no GPU to check against)\n",
        }
        s += &format!(
            "\ncompute\n  {:.3e} model FLOPs per sample\n  {} samples per epoch ({}), {} steps per epoch, {} steps\n",
            self.flops_per_sample,
            self.samples_per_epoch,
            self.samples_source,
            self.steps_per_epoch,
            self.total_steps
        );
        if let Some(secs) = self.estimated_seconds {
            s += &format!(
                "  about {:.1} h at {:.0} % MFU\n",
                secs / 3600.0,
                self.mfu * 100.0
            );
        }
        for a in &self.advice {
            s += &format!("  to fit: {a}\n");
        }
        s
    }
}
