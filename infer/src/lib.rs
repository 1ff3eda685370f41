//! Inference with a trained M3D-LaMed: what `m3d generate` and `m3d eval bench` run.
//!
//! [`LamedModel::load`] reads a run's `final/` folder (our `config.json`, `tokenizer.json`, weights, `adapter/`
//! when LoRA was trained) or a released checkpoint in the reference's layout (`model_type` `lamed_llama` /
//! `lamed_phi3`, flat config, the tokenizer saved with LaMed's four tokens), strictly by name.
//! [`LamedModel::answer`] asks several questions at once, each about its own volume, the prompt built as the
//! reference builds it (`"<im_patch>" * N + question`, tokenised with the BOS the tokenizer adds), and reads
//! the answers as the reference's evaluation reads them: text decoded without special tokens, the box the
//! text holds, and for an answer with `[SEG]` the mask SegVol predicts.

use std::path::{Path, PathBuf};

use m3d_models::generate::GenerateOptions;
use m3d_models::lamed::{eos_id, prepare_tokenizer, prompt_bos, Lamed, LamedConfig};
use m3d_models::lora::read_adapter_config;
use m3d_models::precision::Precision;
use m3d_models::tokenizer::Tokenizer;
use m3d_models::weights::{load_file_into, LoadOptions};
use m3d_models::{ModelError, VarBuilder};
use m3d_scoring::boxes::{extract_box, Box3};
use serde::Serialize;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Errors of inference.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0}")]
    Input(String),
}

type Result<T> = std::result::Result<T, InferError>;

/// One question about one volume.
#[derive(Debug)]
pub struct Request {
    /// The preprocessed volume, (C, D, H, W) as the model's vision tower takes it.
    pub image: Tensor,
    /// The question alone (reported with the answer).
    pub question: String,
    /// The model's text input: the image tokens and the question, joined as the task's reference joins them
    /// ([`LamedModel::prompt_text`] for the demo's way).
    pub prompt: String,
}

/// One answer.
#[derive(Debug, Serialize)]
pub struct Answer {
    /// The question as asked (without the image tokens).
    pub question: String,
    /// The generated text, special tokens (`<bx_start>`, `<bx_end>`, eos) removed, as `batch_decode` gives it.
    pub text: String,
    /// The generated ids, end token included.
    pub tokens: Vec<i64>,
    /// The box the text holds (`[d1, h1, w1, d2, h2, w2]`, fractions of the volume), as the reference's
    /// evaluation parses it.
    #[serde(rename = "box")]
    pub bbox: Option<Box3>,
    /// Mask logits (1, 1, D, H, W) on the CPU when the answer holds `[SEG]` and masks were asked for.
    #[serde(skip)]
    pub seg_logits: Option<Tensor>,
}

/// A loaded M3D-LaMed with its tokenizer.
pub struct LamedModel {
    _vs: VarStore,
    model: Lamed,
    tokenizer: Tokenizer,
    eos: i64,
    pad: i64,
    device: Device,
}

impl std::fmt::Debug for LamedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LamedModel")
            .field("device", &self.device)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> InferError {
    InferError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The model configuration in `dir/config.json`: the reference's flat one (`model_type` `lamed_*`) or the
/// one a run writes into `final/`.
pub fn read_config(dir: &Path) -> Result<LamedConfig> {
    let path = dir.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| file_err(&path, e))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| file_err(&path, e))?;
    let cfg = LamedConfig::from_config_json(&value).map_err(|e| file_err(&path, e))?;
    Ok(cfg)
}

impl LamedModel {
    /// Loads the model in `dir` onto `device` in `precision` (see the module docs). Every parameter must be in
    /// the weights and every weight must be a parameter.
    pub fn load(dir: &Path, device: Device, precision: Precision) -> Result<LamedModel> {
        if !dir.is_dir() {
            return Err(file_err(dir, "no such model folder"));
        }
        let cfg = read_config(dir)?;
        let mut tokenizer = Tokenizer::from_file(dir)?;
        prepare_tokenizer(&mut tokenizer)?;
        prompt_bos(&tokenizer, cfg.tokens.im_patch)?;
        let added = tokenizer.token_to_id("[SEG]");
        if added != Some(cfg.tokens.seg) {
            return Err(file_err(
                &dir.join("tokenizer.json"),
                format!(
                    "`[SEG]` is token {added:?} here but {} in config.json: not this model's tokenizer",
                    cfg.tokens.seg
                ),
            ));
        }
        let adapter = dir.join("adapter");
        let lora = if adapter.join("adapter_config.json").is_file() {
            Some(read_adapter_config(&adapter)?)
        } else {
            None
        };
        let mut vs = VarStore::new(device);
        let model = Lamed::new(&VarBuilder::new(&vs).with_lora(lora), &cfg)?;
        load_file_into(&vs, dir, &LoadOptions::default())?;
        precision.apply(&mut vs)?;
        let pad = tokenizer.pad_token().map(|(_, id)| id).unwrap_or(0);
        let eos = eos_id(&tokenizer).unwrap_or(pad);
        Ok(LamedModel {
            _vs: vs,
            model,
            tokenizer,
            eos,
            pad,
            device,
        })
    }

    /// Where the model runs.
    pub fn device(&self) -> Device {
        self.device
    }

    pub fn config(&self) -> &LamedConfig {
        self.model.config()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The id generation stops at.
    pub fn eos(&self) -> i64 {
        self.eos
    }

    /// The (D, H, W) of the volumes the vision tower takes.
    pub fn image_size(&self) -> [usize; 3] {
        self.config().vision.img_size.map(|s| s.max(0) as usize)
    }

    /// Generation options for this model: stop at its eos, feed its pad to finished rows.
    pub fn options(&self, max_new_tokens: usize) -> GenerateOptions {
        GenerateOptions {
            pad_id: self.pad,
            ..GenerateOptions::greedy(max_new_tokens, &[self.eos])
        }
    }

    /// The prompt text of `question` as the reference's demo builds it: the image tokens, then the question with
    /// no space between.
    pub fn prompt_text(&self, question: &str) -> String {
        let n = self.config().num_image_tokens() as usize;
        format!("{}{question}", "<im_patch>".repeat(n))
    }

    /// Answers `requests` in one batch (see the module docs); `masks`: compute the mask of answers with `[SEG]`
    /// (needs a model with SegVol).
    pub fn answer(
        &self,
        requests: &[Request],
        opts: &GenerateOptions,
        masks: bool,
    ) -> Result<Vec<Answer>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        if masks && self.config().seg.is_none() {
            return Err(InferError::Input(
                "masks were asked for, but this model has no segmentation module".into(),
            ));
        }
        let context = self.config().llm.max_position_embeddings();
        let want = self.image_size();
        let mut prompts = Vec::with_capacity(requests.len());
        let mut images = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            let ids = self.tokenizer.encode(&r.prompt, true)?;
            if ids.len() + opts.max_new_tokens > context as usize {
                return Err(InferError::Input(format!(
                    "request {i}: the prompt is {} tokens ({} of them image tokens) and {} new tokens were asked \
                     for, past the model's context of {context}",
                    ids.len(),
                    self.config().num_image_tokens(),
                    opts.max_new_tokens
                )));
            }
            let s = r.image.size();
            let channels = self.config().vision.in_channels;
            if s.len() != 4 || s[0] != channels || s[1..].iter().map(|&d| d as usize).ne(want) {
                return Err(InferError::Input(format!(
                    "request {i}: the image is {s:?}; this model takes ({channels}, {}, {}, {})",
                    want[0], want[1], want[2]
                )));
            }
            prompts.push(
                Tensor::from_slice(&ids)
                    .view([1, -1])
                    .to_device(self.device),
            );
            images.push(r.image.to_kind(Kind::Float).unsqueeze(0));
        }
        let images = Tensor::cat(&images, 0).to_device(self.device);
        let generated = self.model.generate_batch(&prompts, Some(&images), opts)?;
        let mut answers = Vec::with_capacity(requests.len());
        for (i, (tokens, r)) in generated.into_iter().zip(requests).enumerate() {
            let text = self.tokenizer.decode(&tokens, true)?;
            let seg_logits = if masks {
                self.model
                    .seg_logits(&prompts[i], &images.narrow(0, i as i64, 1), &tokens)?
                    .map(|t| t.to_kind(Kind::Float).to_device(Device::Cpu))
            } else {
                None
            };
            answers.push(Answer {
                question: r.question.clone(),
                bbox: extract_box(&text),
                text,
                tokens,
                seg_logits,
            });
        }
        Ok(answers)
    }
}
