//! BERTScore (Zhang et al., arXiv:1904.09675) as M3D-Bench computes it: `evaluate.load("bertscore")
//! .compute(predictions=[pred], references=[answer], lang="en")`, one sample at a time, which is the
//! `bert_score` 0.3.13 recipe with `roberta-large` cut after layer 17, no idf and no baseline rescaling.
//!
//! This module owns that recipe over any HF BERT or RoBERTa folder (`config.json`, `model.safetensors` or
//! `pytorch_model.bin`, `tokenizer.json`): the encoder keeps only its first `num_layers` layers
//! (`bert_score.utils.get_model`), and the score of a pair is the greedy cosine matching of
//! `bert_score.utils.greedy_cos_idf` over the token embeddings of that last kept layer.
//!
//! What it reproduces exactly, from `bert_score.utils`:
//! - tokens: `sent_encode` strips the sentence (Python's `str.strip`, whose whitespace includes U+001C..U+001F), encodes it with the special tokens and, for RoBERTa's
//!   byte-level BPE, a leading space (`add_prefix_space=True`), truncated to the tokenizer's
//!   `model_max_length`; an empty sentence is the special tokens alone;
//! - weights: every token 1, except the CLS and SEP tokens, which weigh 0 (`idf=False`) yet still take part in
//!   the matching;
//! - a pair with an empty candidate or reference (only the two special tokens) scores P = R = F = 0;
//! - the reference scores each sample alone, so no other pair's padding enters a maximum (`bert_score` pads a
//!   batch's similarities with zeros, which would floor every maximum at 0).

use std::path::{Path, PathBuf};

use m3d_models::bert::{hf_load_options, Bert, BertConfig};
use m3d_models::tokenizer::Tokenizer;
use m3d_models::weights::{load_read_into, read_tensors, KeyMap};
use m3d_models::VarBuilder;
use serde::Serialize;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::EvalError;

/// `bert_score.utils.model2layers` for the encoders M3D-Bench could name; the default for `roberta-large`.
pub const ROBERTA_LARGE_LAYERS: i64 = 17;

/// One pair's scores, in [-1, 1] (in practice [0, 1]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BertScore {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// An encoder cut after `num_layers` layers with its tokenizer.
pub struct BertScorer {
    _vs: VarStore,
    model: Bert,
    tokenizer: Tokenizer,
    cls: i64,
    sep: i64,
    prefix_space: bool,
    max_len: usize,
    device: Device,
    dir: PathBuf,
}

impl std::fmt::Debug for BertScorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertScorer")
            .field("dir", &self.dir)
            .field("layers", &self.model.layers.len())
            .finish()
    }
}

fn input(dir: &Path, file: &str, reason: impl std::fmt::Display) -> EvalError {
    EvalError::Input(format!("{}: {reason}", dir.join(file).display()))
}

/// The layer `bert_score` takes for a folder it would know by name: roberta-large's shape gives 17. Any other
/// encoder must be told (`num_layers`), as `bert_score.score(model_type=<folder>)` must.
fn default_layers(cfg: &BertConfig) -> Option<i64> {
    (cfg.is_roberta() && cfg.num_hidden_layers == 24 && cfg.hidden_size == 1024)
        .then_some(ROBERTA_LARGE_LAYERS)
}

/// The weights file of an HF folder.
fn weights_file(dir: &Path) -> Result<PathBuf, EvalError> {
    ["model.safetensors", "pytorch_model.bin"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            input(
                dir,
                "model.safetensors",
                "no such file (nor pytorch_model.bin)",
            )
        })
}

impl BertScorer {
    /// Loads the encoder in `dir`, keeping its first `num_layers` layers (`None`: 17 for a roberta-large,
    /// an error otherwise).
    pub fn load(dir: &Path, num_layers: Option<i64>, device: Device) -> Result<Self, EvalError> {
        if !dir.is_dir() {
            return Err(EvalError::Input(format!(
                "{}: no such BERTScore encoder folder",
                dir.display()
            )));
        }
        let mut cfg = BertConfig::from_file(&dir.join("config.json"))?;
        let total = cfg.num_hidden_layers;
        let layers = match num_layers.or_else(|| default_layers(&cfg)) {
            Some(n) if (1..=total).contains(&n) => n,
            Some(n) => {
                return Err(input(
                    dir,
                    "config.json",
                    format!("BERTScore layer {n} is not one of the encoder's 1..={total}"),
                ))
            }
            None => {
                return Err(input(
                    dir,
                    "config.json",
                    "not roberta-large's shape: name the layer BERTScore reads (bert_score's model2layers)",
                ))
            }
        };
        cfg.num_hidden_layers = layers;
        cfg.add_pooling_layer = false;
        cfg.hidden_dropout_prob = 0.0;
        cfg.attention_probs_dropout_prob = 0.0;

        let weights = weights_file(dir)?;
        let tensors = read_tensors(&weights)?;
        // `RobertaForMaskedLM` files (the Hub's roberta-large) keep the encoder under `roberta.`.
        let prefix = ["roberta.", "bert."]
            .into_iter()
            .find(|p| tensors.iter().any(|(k, _)| k.starts_with(p)));
        let mut opts = hf_load_options().ignore_unexpected("pooler.");
        if let Some(p) = prefix {
            opts = opts.with_key_map(KeyMap::select_prefix(p));
        }
        for i in layers..total {
            opts = opts.ignore_unexpected(&format!("encoder.layer.{i}."));
        }
        let vs = VarStore::new(device);
        let model = Bert::new(&VarBuilder::new(&vs), &cfg)?;
        load_read_into(&vs, &weights, tensors, &opts)?;

        let tokenizer = Tokenizer::from_file(dir)?;
        let special = |names: &[&str]| {
            names
                .iter()
                .find_map(|t| tokenizer.token_to_id(t))
                .ok_or_else(|| {
                    input(
                        dir,
                        "tokenizer.json",
                        format!("none of the special tokens {names:?}"),
                    )
                })
        };
        let cls = special(&["<s>", "[CLS]"])?;
        let sep = special(&["</s>", "[SEP]"])?;
        let max_len = model_max_length(dir)?
            .unwrap_or(usize::MAX)
            .min(usize::try_from(cfg.max_tokens()).unwrap_or(usize::MAX));
        Ok(BertScorer {
            _vs: vs,
            model,
            tokenizer,
            cls,
            sep,
            prefix_space: cfg.is_roberta(),
            max_len,
            device,
            dir: dir.to_path_buf(),
        })
    }

    /// The ids `bert_score.utils.sent_encode` gives `sentence`.
    pub fn token_ids(&self, sentence: &str) -> Result<Vec<i64>, EvalError> {
        self.encode(sentence)
    }

    /// `bert_score.utils.sent_encode`.
    fn encode(&self, sentence: &str) -> Result<Vec<i64>, EvalError> {
        let s = m3d_scoring::pytext::py_strip(sentence);
        let mut ids = vec![self.cls];
        if !s.is_empty() {
            let text = if self.prefix_space {
                format!(" {s}")
            } else {
                s.to_string()
            };
            let body = self.tokenizer.encode(&text, false)?;
            let keep = body.len().min(self.max_len.saturating_sub(2));
            ids.extend_from_slice(&body[..keep]);
        }
        ids.push(self.sep);
        Ok(ids)
    }

    /// Unit-length token embeddings of each sentence, (tokens, hidden) in float32 on the host. Each sentence is
    /// encoded alone: padded batches would change the last bits with the company a sentence keeps, and an
    /// evaluation split over ranks must score each pair the same whatever the split.
    fn embed(&self, sentences: &[&str]) -> Result<Vec<Tensor>, EvalError> {
        let _guard = tch::no_grad_guard();
        sentences
            .iter()
            .map(|s| {
                let ids = self.encode(s)?;
                let n = ids.len() as i64;
                let ids = Tensor::from_slice(&ids).view([1, n]).to_device(self.device);
                let mask = ids.ones_like();
                let h = self
                    .model
                    .f_forward_t(&ids, &mask, None, false)?
                    .to_kind(Kind::Float)
                    .to_device(Device::Cpu)
                    .squeeze_dim(0);
                let norm = h.norm_scalaropt_dim(2, [-1].as_slice(), true);
                Ok(h / norm)
            })
            .collect()
    }

    /// Scores each `(candidate, reference)` pair alone, as M3D-Bench does.
    pub fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<BertScore>, EvalError> {
        let mut unique: Vec<&str> = pairs.iter().flat_map(|(c, r)| [*c, *r]).collect();
        unique.sort_unstable();
        unique.dedup();
        let emb = self.embed(&unique)?;
        let find = |s: &str| unique.binary_search(&s).map(|i| &emb[i]);
        pairs
            .iter()
            .map(|(c, r)| match (find(c), find(r)) {
                (Ok(hyp), Ok(reference)) => Ok(self.greedy(hyp, reference)),
                _ => Err(EvalError::Input(format!(
                    "BERTScore: a sentence of {:?} was not embedded",
                    (c, r)
                ))),
            })
            .collect()
    }

    /// `greedy_cos_idf` of one pair without idf: the mean over the non-special tokens of each token's best
    /// cosine similarity on the other side (CLS/SEP are candidates for the maximum but weigh nothing).
    fn greedy(&self, hyp: &Tensor, reference: &Tensor) -> BertScore {
        let (lh, lr) = (hyp.size()[0], reference.size()[0]);
        if lh <= 2 || lr <= 2 {
            return BertScore {
                precision: 0.0,
                recall: 0.0,
                f1: 0.0,
            };
        }
        let sim = hyp.matmul(&reference.tr());
        let word_precision = sim.amax([1].as_slice(), false);
        let word_recall = sim.amax([0].as_slice(), false);
        // Weights 1 between the first (CLS) and last (SEP) token, 0 on them, normalised to sum 1; the sum is
        // float32 as bert_score's.
        let mean_inner = |w: &Tensor, n: i64| {
            (w.narrow(0, 1, n - 2) * (1.0 / (n - 2) as f64))
                .sum(Kind::Float)
                .double_value(&[])
        };
        let p = mean_inner(&word_precision, lh);
        let r = mean_inner(&word_recall, lr);
        let f = 2.0 * p * r / (p + r);
        BertScore {
            precision: p,
            recall: r,
            f1: if f.is_nan() { 0.0 } else { f },
        }
    }
}

/// `model_max_length` of `tokenizer_config.json`, if it names one below transformers' "unset" value.
fn model_max_length(dir: &Path) -> Result<Option<usize>, EvalError> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).map_err(|e| input(dir, "tokenizer_config.json", e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| input(dir, "tokenizer_config.json", e))?;
    Ok(value
        .get("model_max_length")
        .and_then(|v| v.as_u64())
        .filter(|&n| n < 1 << 40)
        .map(|n| n as usize))
}
