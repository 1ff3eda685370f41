//! Which model a name or a `config.json` means: the one place that turns a recipe's `model.preset` /
//! `model.config` into a [`M3dClipConfig`] or [`LamedConfig`]. The trainer, `m3d plan` and the tests all
//! resolve models here, so a preset means the same everywhere.
//!
//! A `config.json` may be:
//! - a base LLM's (`model_type` `llama` or `phi3`, as in `Llama-2-7b-chat-hf/config.json`): it replaces the
//!   preset's LLM; the preset's vision tower, projector and SegVol stay (the M3D ones for the full-size
//!   presets), and the vocabulary grows by the four LaMed tokens after the tokenizer's entries;
//! - LaMed's own flat config (`lamed_llama`, `lamed_phi3`, as the released M3D-LaMed checkpoints): the whole
//!   model;
//! - M3D-CLIP's (`m3d_clip`): the whole model, its text encoder `bert-base-uncased` or the BERT folder its
//!   `language_model_name_or_path` names.

use std::path::Path;

use crate::bert::BertConfig;
use crate::clip::M3dClipConfig;
use crate::error::{read_json, ModelError, Result};
use crate::lamed::LamedConfig;
use crate::llm::LlmConfig;

/// The M3D-CLIP presets.
pub const CLIP_PRESETS: [&str; 3] = ["m3d", "tiny", "debug"];
/// The M3D-LaMed presets.
pub const LAMED_PRESETS: [&str; 5] = ["llama2-7b", "llama3-8b", "phi3-mini", "tiny", "debug"];

/// Base tokenizer entries (LaMed: before its four tokens) of the presets whose text model is a published
/// one: M3D-CLIP's `bert-base-uncased` and the three LLMs.
pub fn published_tokenizer_len(preset: &str) -> Option<i64> {
    match preset {
        "m3d" => Some(30_522),
        "llama2-7b" => Some(32_000),
        "llama3-8b" => Some(128_256),
        "phi3-mini" => Some(32_011),
        _ => None,
    }
}

/// Whether a preset needs a word-level vocabulary built from the run's texts when no tokenizer is given.
pub fn builds_own_vocabulary(preset: &str) -> bool {
    matches!(preset, "tiny" | "debug")
}

fn unknown(kind: &str, preset: &str, known: &[&str]) -> ModelError {
    ModelError::Config(format!(
        "unknown {kind} preset `{preset}` ({})",
        known.join(", ")
    ))
}

/// M3D-CLIP of `preset`, or of `config` (the reference's `config.json`) when given, with a text encoder of
/// at least `vocab` entries (the `debug` preset takes exactly `vocab`) and texts of `max_text_len` tokens.
pub fn clip_config(
    preset: &str,
    config: Option<&Path>,
    vocab: i64,
    max_text_len: i64,
) -> Result<M3dClipConfig> {
    let mut cfg = match config {
        Some(path) => clip_from_file(path)?,
        None => match preset {
            "tiny" => M3dClipConfig::tiny(vocab),
            "debug" => {
                let mut c = M3dClipConfig::debug();
                c.text.vocab_size = vocab;
                c
            }
            "m3d" => M3dClipConfig::m3d(),
            other => return Err(unknown("M3D-CLIP", other, &CLIP_PRESETS)),
        },
    };
    if cfg.text.vocab_size < vocab {
        return Err(ModelError::Config(format!(
            "the tokenizer has {vocab} tokens, the text encoder only {}",
            cfg.text.vocab_size
        )));
    }
    cfg.max_text_len = max_text_len;
    cfg.validate()?;
    Ok(cfg)
}

fn clip_from_file(path: &Path) -> Result<M3dClipConfig> {
    let value: serde_json::Value = read_json(path)?;
    let bad = |m: String| ModelError::Config(format!("{}: {m}", path.display()));
    match value.get("model_type").and_then(|v| v.as_str()) {
        Some("m3d_clip") => {}
        other => {
            return Err(bad(format!(
                "model_type {other:?} is not M3D-CLIP's (`m3d_clip`)"
            )))
        }
    }
    let text = match value
        .get("language_model_name_or_path")
        .and_then(|v| v.as_str())
    {
        None | Some("bert-base-uncased") => BertConfig::bert_base_uncased(),
        Some(name) => {
            let dir = path.parent().unwrap_or(Path::new(".")).join(name);
            read_json(&dir.join("config.json")).map_err(|e| {
                bad(format!(
                    "language_model_name_or_path `{name}`: expected an HF BERT folder ({e})"
                ))
            })?
        }
    };
    M3dClipConfig::from_reference_config(path, text)
}

/// M3D-LaMed of `preset` over a base tokenizer of `tokenizer_len` entries, or with `config` (see the module
/// docs) when given. `segmentation` adds SegVol and `seg_projector` (a LaMed `config.json` decides that
/// itself through its `segmentation_module`).
pub fn lamed_config(
    preset: &str,
    config: Option<&Path>,
    tokenizer_len: i64,
    segmentation: bool,
) -> Result<LamedConfig> {
    let base = match preset {
        "tiny" => LamedConfig::tiny(tokenizer_len, segmentation),
        "debug" => LamedConfig::debug(),
        "llama2-7b" => LamedConfig::llama2_7b(),
        "llama3-8b" => LamedConfig::llama3_8b(),
        "phi3-mini" => LamedConfig::phi3_mini(),
        other => return Err(unknown("M3D-LaMed", other, &LAMED_PRESETS)),
    };
    let cfg = match config {
        None => {
            if base.tokens.im_patch != tokenizer_len {
                return Err(ModelError::Config(format!(
                    "the tokenizer has {tokenizer_len} tokens; preset `{preset}` expects {}",
                    base.tokens.im_patch
                )));
            }
            let mut cfg = base;
            if !segmentation {
                cfg.seg = None;
            }
            cfg
        }
        Some(path) => {
            let value: serde_json::Value = read_json(path)?;
            let at = |e: ModelError| match e {
                ModelError::Config(m) => ModelError::Config(format!("{}: {m}", path.display())),
                other => other,
            };
            let model_type = value
                .get("model_type")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            if model_type.starts_with("lamed_") {
                LamedConfig::from_hf_json(&value).map_err(at)?
            } else {
                let llm: LlmConfig = serde_json::from_value(value).map_err(|e| {
                    ModelError::Config(format!(
                        "{}: not a supported LLM config.json (`llama`, `phi3`, `lamed_llama`, `lamed_phi3`): {e}",
                        path.display()
                    ))
                })?;
                llm.validate().map_err(at)?;
                let mut cfg = LamedConfig::m3d(llm, tokenizer_len, segmentation);
                // The preset's vision side, joined to this LLM's width.
                cfg.vision = base.vision.clone();
                cfg.projector = crate::projector::ProjectorConfig {
                    hidden_size: cfg.llm.hidden_size(),
                    ..base.projector.clone()
                };
                cfg.seg = if segmentation { base.seg.clone() } else { None };
                cfg.seg_projector_dropout = base.seg_projector_dropout;
                cfg
            }
        }
    };
    cfg.validate()?;
    Ok(cfg)
}
