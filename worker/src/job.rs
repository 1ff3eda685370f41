//! What a recipe trains: the tokenizer, the model with its initial weights, trainable parameters and
//! precision ([`TrainModel::build`]), and how a list of loaded samples becomes a batch and a loss
//! ([`TrainModel::clip_batch`], [`TrainModel::lamed_batch`]). Everything here is the same on every rank and
//! depends only on the recipe, the shards and the seed, so ranks built independently agree (the loop still
//! broadcasts rank 0's parameters, as DDP does, before the first step).

use std::path::{Path, PathBuf};

use m3d_instruct::{instruction, Family, Templates};
use m3d_models::clip::{M3dClip, M3dClipConfig};
use m3d_models::lamed::{
    build_example, collate, extend_llm_checkpoint, prompt_bos, Lamed, LamedBatch, LamedConfig,
    LamedHostChecks, IGNORE_INDEX,
};
use m3d_models::layers::CheckedIds;
use m3d_models::lora::{freeze_base, LoraConfig};
use m3d_models::precision::Precision;
use m3d_models::presets;
use m3d_models::tokenizer::{Padding, Tokenizer};
use m3d_models::weights::{load_into, read_safetensors_bytes, read_tensors, KeyMap, LoadOptions};
use m3d_models::{ModelError, VarBuilder};
use m3d_recipes::{DeviceKind, ModelKind, Recipe};
use m3d_store::Store;
use m3d_volume::augment::AugmentParams;
use rand::Rng;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::batch::{stack_volumes, to_device, BatchError};
use crate::checkpoint::{self, CheckpointError};
use crate::vocab::{word_level_tokenizer, write_tokenizer, VocabStyle};
use m3d_data::dataset::TrainData;
use m3d_data::draws::{augment_params, sample_rng, splitmix, PURPOSE_DROPOUT, PURPOSE_PROMPT};
use m3d_data::loader::LoadedSample;

/// Errors building the model or a batch.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Tch(#[from] tch::TchError),
    #[error("model.{field}: {reason}")]
    Recipe { field: String, reason: String },
    #[error("model.init_from.{index} ({path}): {source}")]
    InitFrom {
        index: usize,
        path: String,
        #[source]
        source: Box<CheckpointError>,
    },
    #[error("sample `{sample}`: {reason}")]
    Sample { sample: String, reason: String },
    #[error(transparent)]
    Data(#[from] Box<m3d_data::DatasetError>),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A model-configuration error, attributed to `model.config`, else `model.llm`, else `model.preset`.
fn model_err(m: &m3d_recipes::ModelSection, e: ModelError) -> JobError {
    let field = if m.config.is_some() {
        "config"
    } else if m.llm.is_some() {
        "llm"
    } else {
        "preset"
    };
    recipe_err(field, e.to_string())
}

fn recipe_err(field: &str, reason: impl Into<String>) -> JobError {
    JobError::Recipe {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The network being trained.
pub enum Net {
    Clip(Box<M3dClip>),
    Lamed(Box<Lamed>),
}

impl Net {
    /// `train.activation_checkpointing`.
    pub fn set_activation_checkpointing(&mut self, on: bool) {
        match self {
            Net::Clip(c) => c.set_activation_checkpointing(on),
            Net::Lamed(l) => l.set_activation_checkpointing(on),
        }
    }
}

/// The seed of libtorch's generator for optimizer step `step` on `rank`. Dropout draws from that generator;
/// seeding it at every step makes its state a function of (seed, step, rank), so it needs no saving: a run
/// resumed from a checkpoint draws exactly what the uninterrupted run drew (with the same world size).
pub fn step_seed(seed: u64, step: u64, rank: u32) -> i64 {
    let mut z = seed ^ 0x6d33_642d_7374_6570;
    for v in [step, rank as u64, PURPOSE_DROPOUT] {
        z = splitmix(z ^ v);
    }
    (z >> 1) as i64
}

/// Resolves the recipe's tokenizer: `model.tokenizer`; else the `tokenizer.json` of the first `init_from`
/// folder that has one (stage 2 continues with stage 1's vocabulary); else, for the `tiny` and `debug`
/// presets only, a word-level vocabulary built from the training texts, written under `scratch`. Returns it
/// with the path it was read from.
pub fn resolve_tokenizer(
    recipe: &Recipe,
    data: &TrainData,
    scratch: &Path,
) -> Result<Tokenizer, JobError> {
    resolve_tokenizer_with(recipe, scratch, || {
        data.texts().map_err(Box::new).map_err(Into::into)
    })
}

/// [`resolve_tokenizer`] with the training texts read only if a word-level vocabulary is built from them.
pub fn resolve_tokenizer_with(
    recipe: &Recipe,
    scratch: &Path,
    texts: impl FnOnce() -> Result<Vec<String>, JobError>,
) -> Result<Tokenizer, JobError> {
    let m = &recipe.model;
    if let Some(p) = &m.tokenizer {
        return Ok(Tokenizer::from_file(Path::new(p))?);
    }
    if let Some(folder) = &m.llm {
        return Tokenizer::from_file(Path::new(folder))
            .map_err(|e| recipe_err("llm", format!("{folder}: {e}")));
    }
    for (index, init) in m.init_from.iter().enumerate() {
        let err = |source| JobError::InitFrom {
            index,
            path: init.path.clone(),
            source: Box::new(source),
        };
        if let Some(t) = InitSource::of(&init.path)
            .map_err(err)?
            .tokenizer(scratch, err)?
        {
            return Ok(t);
        }
    }
    if !presets::builds_own_vocabulary(&m.preset) || m.config.is_some() {
        return Err(recipe_err(
            "tokenizer",
            format!(
                "preset `{}` needs its published tokenizer: set model.tokenizer to its tokenizer.json",
                m.preset
            ),
        ));
    }
    let style = match m.kind {
        ModelKind::Clip => VocabStyle::Bert,
        ModelKind::Lamed => VocabStyle::Llama,
    };
    let owned = texts()?;
    let mut texts: Vec<&str> = owned.iter().map(String::as_str).collect();
    let templates = Templates::default();
    let template_texts = templates.all_texts();
    texts.extend(template_texts.iter().map(String::as_str));
    scratch_tokenizer(scratch, &word_level_tokenizer(texts, style))
}

/// Writes `json` as `<scratch>/tokenizer.json` (atomically: every worker of a host writes the same file) and
/// loads it from there, so that the job's tokenizer has a file to copy into checkpoints and `final/`.
fn scratch_tokenizer(scratch: &Path, json: &serde_json::Value) -> Result<Tokenizer, JobError> {
    std::fs::create_dir_all(scratch).map_err(|source| JobError::Io {
        path: scratch.to_path_buf(),
        source,
    })?;
    let path = scratch.join("tokenizer.json");
    write_tokenizer(&path, json).map_err(|source| JobError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(Tokenizer::from_file(&path)?)
}

/// Which run writes `path`, when it has the shape of a run's outputs: `<run>/final` (written when the run
/// finishes) or `<run>/checkpoints[/step-N]` (written while it trains). Empty otherwise.
fn producer_of(path: &Path) -> String {
    let mut run = path;
    let what = match path.file_name().and_then(|n| n.to_str()) {
        Some("final") => "the final weights",
        Some("checkpoints") => "the checkpoints",
        Some(n) if n.starts_with("step-") => {
            run = path.parent().unwrap_or(path);
            if run.file_name().and_then(|n| n.to_str()) != Some("checkpoints") {
                return String::new();
            }
            "a checkpoint"
        }
        _ => return String::new(),
    };
    match run.parent().filter(|r| !r.as_os_str().is_empty()) {
        Some(run) => format!(
            ": it would hold {what} of the run whose output.run is `{}`, which has not written it yet \
             (train that run's recipe first, or point this at existing weights)",
            run.display()
        ),
        None => String::new(),
    }
}

/// What `model.init_from.<i>.path` names: a committed m3d checkpoint (a step folder, or a checkpoint folder
/// whose latest commit is taken; local or in a store), weights in a local file or folder (HF layouts, sharded
/// or `.bin`), or a store folder (`s3://`, `file://`) holding `model.safetensors`.
enum InitSource {
    Checkpoint(checkpoint::Found),
    Local(PathBuf),
    Store(Store),
}

impl InitSource {
    fn of(path: &str) -> Result<InitSource, CheckpointError> {
        if !path.contains("://") {
            let p = Path::new(path);
            // Opening a store creates its folder: only look for checkpoints in folders that exist, or where a
            // step folder is named (a missing one is then an error naming its commit record).
            let step_folder = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"));
            if p.is_dir() || step_folder {
                if let Some(found) = checkpoint::find(path)? {
                    return Ok(InitSource::Checkpoint(found));
                }
            }
            if !p.exists() {
                return Err(CheckpointError::Missing {
                    path: p.to_path_buf(),
                    producer: producer_of(p),
                });
            }
            return Ok(InitSource::Local(p.to_path_buf()));
        }
        if let Some(found) = checkpoint::find(path)? {
            return Ok(InitSource::Checkpoint(found));
        }
        Store::open(path)
            .map(InitSource::Store)
            .map_err(|source| CheckpointError::Store {
                url: path.to_string(),
                source,
            })
    }

    fn weights(&self) -> Result<Vec<(String, Tensor)>, CheckpointError> {
        match self {
            InitSource::Checkpoint(found) => {
                tracing::info!(checkpoint = %found.url(), "initial weights from a checkpoint");
                found.model()
            }
            InitSource::Local(path) => Ok(read_tensors(path)?),
            InitSource::Store(store) => {
                let bytes = store_file(store, "model.safetensors")?.ok_or_else(|| {
                    CheckpointError::Store {
                        url: store.url().to_string(),
                        source: m3d_store::StoreError::NotFound {
                            url: store.url().to_string(),
                            key: "model.safetensors".into(),
                        },
                    }
                })?;
                let origin = format!("{}/model.safetensors", store.url());
                Ok(read_safetensors_bytes(&bytes, Path::new(&origin))?)
            }
        }
    }

    /// The tokenizer that came with these weights, if any: a local folder's `tokenizer.json` read in place,
    /// a checkpoint's or a store folder's copied under `scratch` (the job's tokenizer needs a file).
    fn tokenizer(
        &self,
        scratch: &Path,
        err: impl Fn(CheckpointError) -> JobError,
    ) -> Result<Option<Tokenizer>, JobError> {
        let json = match self {
            InitSource::Local(folder) => {
                if !folder.join("tokenizer.json").is_file() {
                    return Ok(None);
                }
                return Ok(Some(Tokenizer::from_file(folder)?));
            }
            InitSource::Checkpoint(found) => found.tokenizer().map_err(&err)?,
            InitSource::Store(store) => store_file(store, "tokenizer.json").map_err(&err)?,
        };
        let Some(json) = json else {
            return Ok(None);
        };
        let json: serde_json::Value = serde_json::from_slice(&json).map_err(|e| {
            err(CheckpointError::Invalid {
                url: self.url(),
                key: "tokenizer.json".into(),
                reason: e.to_string(),
            })
        })?;
        scratch_tokenizer(scratch, &json).map(Some)
    }

    fn url(&self) -> String {
        match self {
            InitSource::Checkpoint(found) => found.url(),
            InitSource::Local(path) => path.display().to_string(),
            InitSource::Store(store) => store.url().to_string(),
        }
    }
}

/// Loads a base LLM's HF folder into a LaMed model (`model.llm`): its `embed_tokens`/`lm_head` rows cut to
/// the tokenizer's `base_vocab` entries and grown by the four LaMed tokens (mean rows), then every LLM
/// parameter required and nothing unexpected; the vision tower, projector, SegVol and LoRA adapters are
/// left to `init_from` (or their initialisation).
fn load_base_llm(
    vs: &VarStore,
    folder: &Path,
    base_vocab: i64,
    lora: bool,
) -> Result<(), JobError> {
    let err = |e: String| recipe_err("llm", format!("{}: {e}", folder.display()));
    let tensors = read_tensors(folder).map_err(|e| err(e.to_string()))?;
    let tensors = extend_llm_checkpoint(tensors, base_vocab).map_err(|e| err(e.to_string()))?;
    // Checkpoints converted by older transformers carry RoPE's `inv_freq`, a buffer computed from the config.
    let mut opts = LoadOptions::default()
        .ignore_unexpected("rotary_emb.inv_freq")
        .allow_missing("model.vision_tower.")
        .allow_missing("model.mm_projector.")
        .allow_missing("model.seg_projector.")
        .allow_missing("model.seg_module.");
    if lora {
        opts = opts.allow_missing("lora_");
    }
    let report = load_into(vs, tensors, &opts).map_err(|e| err(e.to_string()))?;
    tracing::info!(path = %folder.display(), loaded = report.loaded, "base LLM weights");
    Ok(())
}

/// File `name` of a store folder of weights; a run's `final/` is checked against its commit record and
/// refused while incomplete (see [`m3d_runs::output::get_final_file`]).
fn store_file(store: &Store, name: &str) -> Result<Option<bytes::Bytes>, CheckpointError> {
    m3d_runs::output::get_final_file(store, name).map_err(|e| match e {
        m3d_runs::output::OutputError::Store { url, source } => {
            CheckpointError::Store { url, source }
        }
        e => CheckpointError::Invalid {
            url: store.url().to_string(),
            key: name.to_string(),
            reason: e.to_string(),
        },
    })
}

/// The model of a recipe, ready to train.
pub struct TrainModel {
    pub vs: VarStore,
    pub net: Net,
    /// For LaMed: with the 4 LaMed tokens added and a pad token set.
    pub tokenizer: Tokenizer,
    /// The model configuration as JSON (written next to the final weights).
    pub config: serde_json::Value,
    pub lora: Option<LoraConfig>,
    pub precision: Precision,
    pub device: Device,
    /// Turns loaded samples into this model's batches (a copy runs on the batch-building thread).
    pub batcher: Batcher,
}

/// What a batch of a LaMed model needs to know about it.
#[derive(Debug, Clone)]
struct LamedSpec {
    /// The model's configuration, for the host checks of its batches.
    cfg: LamedConfig,
    num_image_tokens: usize,
    pad: i64,
    eos: i64,
    /// The model has the segmentation module: batches carry the samples' masks.
    segmentation: bool,
}

/// Builds batches from loaded samples: everything it needs is copied out of the model, so it can run on
/// another thread while the model trains (the reference's DataLoader workers).
#[derive(Clone)]
pub struct Batcher {
    tokenizer: Tokenizer,
    max_text_len: usize,
    augment: bool,
    seed: u64,
    templates: Templates,
    device: Device,
    kind: Kind,
    /// (D, H, W) the vision tower takes.
    image_size: [i64; 3],
    /// The text encoder's vocabulary (CLIP), for the host check of the token ids.
    text_vocab: i64,
    /// `None` for CLIP.
    lamed: Option<LamedSpec>,
}

/// A CLIP batch on the training device, with its ids checked on the host.
pub struct ClipBatch {
    pub images: Tensor,
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub checked: CheckedIds,
}

/// A LaMed batch on the training device, what was checked on the host before it went there, its scored tokens
/// and its samples with a non-empty mask.
pub struct LamedBuilt {
    pub batch: LamedBatch,
    pub checks: LamedHostChecks,
    pub scored: i64,
    pub masked: i64,
}

/// A recipe's model before any weight exists: its configuration, resolved once for the trainer and for
/// `m3d plan`.
#[derive(Debug, Clone)]
pub enum ModelSpec {
    Clip(Box<M3dClipConfig>),
    Lamed(Box<LamedConfig>),
}

impl ModelSpec {
    pub fn is_lamed(&self) -> bool {
        matches!(self, ModelSpec::Lamed(_))
    }

    /// The configuration as JSON (written next to the final weights).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ModelSpec::Clip(c) => serde_json::to_value(c),
            ModelSpec::Lamed(c) => serde_json::to_value(c),
        }
        .unwrap_or_default()
    }

    /// Creates the network's parameters through `vb` (shape-only for `m3d plan`).
    pub fn build(&self, vb: &VarBuilder) -> Result<Net, JobError> {
        Ok(match self {
            ModelSpec::Clip(c) => Net::Clip(Box::new(M3dClip::new(vb, c)?)),
            ModelSpec::Lamed(c) => Net::Lamed(Box::new(Lamed::new(vb, c)?)),
        })
    }
}

/// The model `recipe` describes over a tokenizer of `base_vocab` entries (LaMed: before its four tokens):
/// `model.preset`, `model.config` or the `config.json` of `model.llm`.
pub fn model_spec(recipe: &Recipe, base_vocab: i64) -> Result<ModelSpec, JobError> {
    let m = &recipe.model;
    match m.kind {
        ModelKind::Clip => {
            if m.lora.is_some() {
                return Err(recipe_err(
                    "lora",
                    "M3D-CLIP is trained in full, without LoRA",
                ));
            }
            let cfg = presets::clip_config(
                &m.preset,
                m.config.as_deref().map(Path::new),
                base_vocab,
                recipe.data.max_text_len as i64,
            )
            .map_err(|e| model_err(m, e))?;
            Ok(ModelSpec::Clip(Box::new(cfg)))
        }
        ModelKind::Lamed => {
            let llm_config = m.llm.as_ref().map(|f| Path::new(f).join("config.json"));
            let config = m.config.as_ref().map(PathBuf::from).or(llm_config);
            let cfg =
                presets::lamed_config(&m.preset, config.as_deref(), base_vocab, m.segmentation)
                    .map_err(|e| model_err(m, e))?;
            Ok(ModelSpec::Lamed(Box::new(cfg)))
        }
    }
}

/// `model.lora` as the model builder takes it (M3D's target rule when the recipe names no modules).
pub fn lora_config(recipe: &Recipe) -> Option<LoraConfig> {
    recipe.model.lora.as_ref().map(|l| LoraConfig {
        r: l.r,
        alpha: l.alpha,
        dropout: l.dropout,
        target_modules: if l.target_modules.is_empty() {
            LoraConfig::m3d_lamed().target_modules
        } else {
            l.target_modules.clone()
        },
        use_rslora: l.use_rslora,
        ..LoraConfig::m3d_lamed()
    })
}

/// Sets which parameters of `vs` train: with LoRA the adapters plus `model.trainable` (by name, as the
/// reference's keyword rule), without it the `model.trainable` prefixes, or everything when none is given.
/// A recipe that leaves nothing trainable is refused.
pub fn set_trainable(vs: &VarStore, recipe: &Recipe, lora: bool) -> Result<(), JobError> {
    let m = &recipe.model;
    let prefixes: Vec<&str> = m.trainable.iter().map(String::as_str).collect();
    if lora {
        freeze_base(vs, &prefixes);
    } else if !prefixes.is_empty() {
        for (name, t) in vs.variables() {
            let _ = t.set_requires_grad(prefixes.iter().any(|p| name.starts_with(p)));
        }
    }
    // Buffers are state, not parameters: a trained module keeps them as they are (the reference's
    // `requires_grad = True` loop runs over `named_parameters`, which has none of them).
    for (name, t) in vs.variables() {
        if m3d_models::builder::is_buffer(&name) {
            let _ = t.set_requires_grad(false);
        }
    }
    if !vs.variables().values().any(|t| t.requires_grad()) {
        return Err(recipe_err(
            "trainable",
            format!("no parameter starts with any of {:?}", m.trainable),
        ));
    }
    Ok(())
}

impl TrainModel {
    /// Builds the recipe's model on `device`: seeded initialisation, `init_from` loads in order, LoRA
    /// injection and freezing, precision.
    pub fn build(recipe: &Recipe, tokenizer: Tokenizer, device: Device) -> Result<Self, JobError> {
        let m = &recipe.model;
        tch::manual_seed(recipe.train.seed as i64);
        let mut vs = VarStore::new(device);
        let mut tokenizer = tokenizer;
        let lora = lora_config(recipe);
        let vb = VarBuilder::new(&vs).with_lora(lora.clone());
        // The base tokenizer's entries (LaMed: before its four tokens are added below).
        let base_vocab = tokenizer.vocab_size(true) as i64;
        let spec = model_spec(recipe, base_vocab)?;
        if spec.is_lamed() {
            m3d_models::lamed::prepare_tokenizer(&mut tokenizer)
                .map_err(|e| recipe_err("tokenizer", e.to_string()))?;
            if let ModelSpec::Lamed(cfg) = &spec {
                prompt_bos(&tokenizer, cfg.tokens.im_patch)
                    .map_err(|e| recipe_err("tokenizer", e.to_string()))?;
            }
        }
        let config = spec.to_json();
        let mut net = spec.build(&vb)?;
        net.set_activation_checkpointing(recipe.train.activation_checkpointing);
        if let Some(folder) = &m.llm {
            load_base_llm(&vs, Path::new(folder), base_vocab, lora.is_some())?;
        }
        for (index, init) in m.init_from.iter().enumerate() {
            let err = |source| JobError::InitFrom {
                index,
                path: init.path.clone(),
                source: Box::new(source),
            };
            let mut tensors = InitSource::of(&init.path)
                .and_then(|s| s.weights())
                .map_err(err)?;
            tensors.retain(|(k, _)| !init.exclude.iter().any(|p| k.starts_with(p.as_str())));
            let key_map = match (&init.select_prefix, &init.add_prefix) {
                (Some(s), Some(a)) => KeyMap::move_prefix(s, a),
                (Some(s), None) => KeyMap::select_prefix(s),
                (None, Some(a)) => KeyMap::add_prefix(a),
                (None, None) => KeyMap::identity(),
            };
            let mut opts = if init.strict {
                LoadOptions::default()
            } else {
                LoadOptions::lenient()
            }
            .with_key_map(key_map);
            if let Some(prefix) = &init.add_prefix {
                opts = opts.within(prefix);
            }
            if lora.is_some() {
                opts = opts.allow_missing("lora_");
            }
            let report = load_into(&vs, tensors, &opts).map_err(|e| err(e.into()))?;
            tracing::info!(path = %init.path, loaded = report.loaded, missing = report.missing.len(), "initial weights");
        }
        set_trainable(&vs, recipe, lora.is_some())?;
        let precision = match recipe.precision() {
            m3d_recipes::Precision::F32 => Precision::F32,
            m3d_recipes::Precision::Bf16 => Precision::Bf16,
            m3d_recipes::Precision::Bf16Autocast => Precision::Bf16Autocast,
        };
        precision.apply(&mut vs)?;
        let (image_size, text_vocab, lamed) = match &net {
            Net::Clip(c) => (c.config().vision.img_size, c.config().text.vocab_size, None),
            Net::Lamed(l) => {
                let pad = tokenizer.pad_token().map(|(_, id)| id).unwrap_or(0);
                let eos = m3d_models::lamed::eos_id(&tokenizer).unwrap_or(pad);
                (
                    l.config().vision.img_size,
                    0,
                    Some(LamedSpec {
                        cfg: l.config().clone(),
                        num_image_tokens: l.config().num_image_tokens() as usize,
                        pad,
                        eos,
                        segmentation: l.config().seg.is_some(),
                    }),
                )
            }
        };
        let batcher = Batcher {
            tokenizer: tokenizer.clone(),
            max_text_len: recipe.data.max_text_len,
            augment: recipe.data.augment,
            seed: recipe.train.seed,
            templates: Templates::default(),
            device,
            kind: precision.kind(),
            image_size,
            text_vocab,
            lamed,
        };
        Ok(TrainModel {
            vs,
            net,
            tokenizer,
            config,
            lora,
            precision,
            device,
            batcher,
        })
    }

    /// Names and values of every parameter (for saving), sorted by name.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        m3d_models::weights::state_dict(&self.vs)
    }
}

impl Batcher {
    /// Each sample's augmentation in `epoch` (none when the recipe does not augment).
    pub fn augmentation(&self, indices: &[u64], epoch: u64) -> Vec<Option<AugmentParams>> {
        indices
            .iter()
            .map(|&i| self.augment.then(|| augment_params(self.seed, epoch, i)))
            .collect()
    }

    /// Whether this builds LaMed batches (else CLIP's).
    pub fn is_lamed(&self) -> bool {
        self.lamed.is_some()
    }

    /// Images of `samples` (global indices alongside; augmented, if at all, while decoding) as one
    /// (B, C, D, H, W) batch on the device (through pinned memory to a GPU, see [`crate::batch`]).
    fn images(&self, samples: &[(u64, LoadedSample)]) -> Result<Tensor, JobError> {
        let expected = self.image_size;
        for (_, s) in samples {
            let dhw = [s.shape[1] as i64, s.shape[2] as i64, s.shape[3] as i64];
            if dhw != expected {
                return Err(JobError::Sample {
                    sample: s.sample.sample_id.clone(),
                    reason: format!(
                        "volume is {:?} (D, H, W); the model takes {expected:?}",
                        dhw
                    ),
                });
            }
        }
        let views: Vec<(&[f32], [usize; 4])> = samples
            .iter()
            .map(|(_, s)| (s.image.as_slice(), s.shape))
            .collect();
        Ok(to_device(&stack_volumes(&views)?, self.device, self.kind)?)
    }

    /// A host tensor of token ids or masks on the training device.
    fn ids_to_device(&self, t: &Tensor) -> Result<Tensor, JobError> {
        Ok(to_device(t, self.device, t.kind())?)
    }

    /// A CLIP batch: images, and the reports tokenised to `data.max_text_len` with max-length padding (the
    /// reference's `padding="max_length"`), their ids checked on the host.
    pub fn clip_batch(&self, samples: &[(u64, LoadedSample)]) -> Result<ClipBatch, JobError> {
        if self.lamed.is_some() {
            return Err(recipe_err("kind", "not a CLIP model"));
        }
        let texts = samples
            .iter()
            .map(|(_, s)| {
                s.sample.report.as_deref().ok_or_else(|| JobError::Sample {
                    sample: s.sample.sample_id.clone(),
                    reason: "caption sample without a report".into(),
                })
            })
            .collect::<Result<Vec<&str>, JobError>>()?;
        let enc =
            self.tokenizer
                .encode_batch(&texts, self.max_text_len, Padding::MaxLength, true)?;
        let checked = CheckedIds::check("BERT input_ids", &enc.input_ids, self.text_vocab)?;
        Ok(ClipBatch {
            images: self.images(samples)?,
            input_ids: self.ids_to_device(&enc.input_ids)?,
            attention_mask: self.ids_to_device(&enc.attention_mask)?,
            checked,
        })
    }

    /// A LaMed batch as the reference's datasets build it: the instruction of each sample (its stored
    /// question, or a prompt template drawn per (seed, epoch, sample)), `<im_patch>` × N before it, the answer
    /// after a space; labels on the answer only; with the segmentation module, every sample's mask (zeros for
    /// samples without one, which the model leaves out of the segmentation loss). The ids and the masks are
    /// checked on the host, the scored tokens counted there, before the batch goes to the device.
    pub fn lamed_batch(
        &self,
        samples: &[(u64, LoadedSample)],
        epoch: u64,
    ) -> Result<LamedBuilt, JobError> {
        let Some(spec) = &self.lamed else {
            return Err(recipe_err("kind", "not a LaMed model"));
        };
        let image_tokens = "<im_patch>".repeat(spec.num_image_tokens);
        let (pad, eos) = (spec.pad, spec.eos);
        let mut examples = Vec::with_capacity(samples.len());
        for (index, s) in samples {
            let mut rng = sample_rng(self.seed, epoch, *index, PURPOSE_PROMPT);
            let family = if rng.random_bool(0.5) {
                Family::Cls
            } else {
                Family::Des
            };
            let inst = instruction(&s.sample, &self.templates, family, &mut rng).map_err(|e| {
                JobError::Sample {
                    sample: s.sample.sample_id.clone(),
                    reason: e.to_string(),
                }
            })?;
            let question = format!("{image_tokens}{}", inst.question);
            let q_ids = self.tokenizer.encode(&question, true)?;
            let full_ids = self
                .tokenizer
                .encode(&format!("{question} {}", inst.answer), true)?;
            examples.push(build_example(
                &q_ids,
                &full_ids,
                self.max_text_len,
                pad,
                eos,
            )?);
        }
        // Built on the host: the counts and checks below read no device memory.
        let (input_ids, attention_mask, labels) = collate(&examples, Device::Cpu)?;
        let scored = labels
            .ne(IGNORE_INDEX)
            .sum(Kind::Int64)
            .f_int64_value(&[])?;
        let images = self.images(samples)?;
        let (segs, masked, has_mask) = if spec.segmentation {
            let (segs, has_mask) = self.masks(samples)?;
            let masked = has_mask.iter().filter(|&&m| m).count() as i64;
            (Some(segs), masked, Some(has_mask))
        } else {
            (None, 0, None)
        };
        let checks = LamedHostChecks::check(&spec.cfg, &input_ids, has_mask.as_deref())?;
        Ok(LamedBuilt {
            batch: LamedBatch {
                images,
                input_ids: self.ids_to_device(&input_ids)?,
                attention_mask: Some(self.ids_to_device(&attention_mask)?),
                labels: Some(self.ids_to_device(&labels)?),
                segs,
            },
            checks,
            scored,
            masked,
        })
    }

    /// The samples' masks as (B, 1, D, H, W) on the training device, zeros where a sample has none, and
    /// which are not empty.
    fn masks(&self, samples: &[(u64, LoadedSample)]) -> Result<(Tensor, Vec<bool>), JobError> {
        let spatial = |s: &LoadedSample| [1, s.shape[1], s.shape[2], s.shape[3]];
        let zeros: Vec<f32> = samples
            .iter()
            .find(|(_, s)| s.mask.is_none())
            .map(|(_, s)| vec![0.0; spatial(s).iter().product()])
            .unwrap_or_default();
        let views: Vec<(&[f32], [usize; 4])> = samples
            .iter()
            .map(|(_, s)| (s.mask.as_deref().unwrap_or(&zeros), spatial(s)))
            .collect();
        let has_mask = samples
            .iter()
            .map(|(_, s)| s.mask.as_ref().is_some_and(|m| m.iter().any(|&v| v != 0.0)))
            .collect();
        let masks = to_device(&stack_volumes(&views)?, self.device, Kind::Float)?;
        Ok((masks, has_mask))
    }
}

/// The device a worker trains on: the CPU, or the GPU of its local rank.
pub fn device_for(kind: DeviceKind, local_rank: u32) -> Result<Device, JobError> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => {
            let n = tch::Cuda::device_count();
            if (local_rank as i64) < n {
                Ok(Device::Cuda(local_rank as usize))
            } else {
                Err(recipe_err(
                    "workers.device",
                    format!("cuda: local rank {local_rank} but {n} GPUs are visible"),
                ))
            }
        }
    }
}
