//! Plain weights out of a run: `m3d export` and `m3d merge-lora`. The input is a run's `final/` folder or a
//! checkpoint folder (`model.safetensors`, with `adapter/` when the run trained LoRA); the output is an HF-style
//! folder (`model.safetensors`, sharded with an index past 5 GB, plus `config.json` and `tokenizer.json` when the
//! input has them), a LaMed in the layout of the released M3D-LaMed checkpoints (LoRA merged, the flat
//! `config.json` of `LamedLlamaForCausalLM` / `LamedPhi3ForCausalLM`, the tokenizer files), or the vision encoder alone in the layout of M3D's `pretrained_ViT.bin` (MONAI ViT keys
//! without a prefix), which LaMed stage 1 starts from.

use std::path::{Path, PathBuf};

use m3d_models::lamed::LamedConfig;
use m3d_models::lora::{is_lora_key, merge_tensors, read_adapter_config};
use m3d_models::weights::{read_tensors, save_safetensors, save_sharded};
use m3d_models::ModelError;
use tch::Tensor;

/// Errors of an export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Input { path: PathBuf, reason: String },
}

/// What to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    /// Every parameter; LoRA adapters folded into their base weights when `merge_lora`, else kept as they are.
    Full { merge_lora: bool },
    /// The vision encoder alone, keys without their prefix (`pretrained_ViT.safetensors`).
    VisionEncoder,
    /// A LaMed as M3D publishes it: every parameter under its published name with LoRA merged (PEFT's
    /// `merge_and_unload`), `config.json` as [`m3d_models::lamed::LamedConfig::to_hf_json`] writes it, and the
    /// tokenizer files.
    Released,
}

/// Prefixes of the vision encoder in M3D-CLIP and in LaMed checkpoints.
const VISION_PREFIXES: [&str; 2] = ["vision_encoder.", "model.vision_tower.vision_tower."];

/// Shards of an exported model are at most this large (HF's default for `save_pretrained` is 5 GB).
const MAX_SHARD_BYTES: usize = 5 << 30;

/// Writes the export of `from` into `out`; returns the files written.
pub fn export(from: &Path, out: &Path, kind: ExportKind) -> Result<Vec<PathBuf>, ExportError> {
    let file = from.to_path_buf();
    let tensors = read_tensors(from)?;
    std::fs::create_dir_all(out).map_err(|source| ExportError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    match kind {
        ExportKind::VisionEncoder => {
            let Some(prefix) = VISION_PREFIXES
                .iter()
                .find(|p| tensors.iter().any(|(k, _)| k.starts_with(*p)))
            else {
                return Err(ExportError::Input {
                    path: file,
                    reason: format!("no vision encoder (no key starts with {VISION_PREFIXES:?})"),
                });
            };
            let vision: Vec<(String, Tensor)> = tensors
                .iter()
                .filter_map(|(k, t)| Some((k.strip_prefix(prefix)?.to_string(), t.shallow_clone())))
                .collect();
            let path = out.join("pretrained_ViT.safetensors");
            save_safetensors(&path, &vision)?;
            written.push(path);
        }
        ExportKind::Released => {
            let cfg_path = from.join("config.json");
            let bytes = std::fs::read(&cfg_path).map_err(|source| ExportError::Io {
                path: cfg_path.clone(),
                source,
            })?;
            let input = |reason: String| ExportError::Input {
                path: cfg_path.clone(),
                reason,
            };
            let value: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| input(e.to_string()))?;
            let cfg = LamedConfig::from_config_json(&value)
                .map_err(|e| input(format!("not a LaMed: {e}")))?;
            let tensors = if tensors.iter().any(|(k, _)| is_lora_key(k)) {
                let lora = read_adapter_config(&from.join("adapter"))?;
                merge_tensors(&tensors, lora.scaling())
            } else {
                tensors
            };
            if let Some((k, _)) = tensors
                .iter()
                .find(|(k, _)| !(k.starts_with("model.") || k.starts_with("lm_head.")))
            {
                return Err(ExportError::Input {
                    path: file,
                    reason: format!("`{k}` is not a LaMed parameter name"),
                });
            }
            save_sharded(out, &tensors, MAX_SHARD_BYTES)?;
            written.extend(model_files(out)?);
            let hf = cfg.to_hf_json()?;
            let dst = out.join("config.json");
            let text = serde_json::to_string_pretty(&hf).map_err(|e| input(e.to_string()))?;
            std::fs::write(&dst, text).map_err(|source| ExportError::Io {
                path: dst.clone(),
                source,
            })?;
            written.push(dst);
            written.extend(copy_files(
                from,
                out,
                &[
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "special_tokens_map.json",
                ],
            )?);
        }
        ExportKind::Full { merge_lora } => {
            let has_lora = tensors.iter().any(|(k, _)| is_lora_key(k));
            let tensors = if merge_lora {
                if !has_lora {
                    return Err(ExportError::Input {
                        path: file,
                        reason: "no LoRA adapter to merge (no `lora_A`/`lora_B` keys)".into(),
                    });
                }
                let cfg = read_adapter_config(&from.join("adapter"))?;
                merge_tensors(&tensors, cfg.scaling())
            } else {
                tensors
            };
            save_sharded(out, &tensors, MAX_SHARD_BYTES)?;
            written.extend(model_files(out)?);
            written.extend(copy_files(from, out, &["config.json", "tokenizer.json"])?);
        }
    }
    written.sort();
    Ok(written)
}

/// The weight files `save_sharded` wrote into `out`.
fn model_files(out: &Path) -> Result<Vec<PathBuf>, ExportError> {
    let io = |source| ExportError::Io {
        path: out.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(out).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("model"))
        {
            files.push(p);
        }
    }
    Ok(files)
}

/// Copies those of `names` that `from` holds into `out`.
fn copy_files(from: &Path, out: &Path, names: &[&str]) -> Result<Vec<PathBuf>, ExportError> {
    let mut written = Vec::new();
    for name in names {
        let src = from.join(name);
        if src.is_file() {
            let dst = out.join(name);
            std::fs::copy(&src, &dst).map_err(|source| ExportError::Io {
                path: src.clone(),
                source,
            })?;
            written.push(dst);
        }
    }
    Ok(written)
}
