//! LoRA (Hu et al. 2021) as PEFT implements it, reusable on any `Linear`:
//! `y = W x + b + (alpha / r) · B A dropout(x)`, A kaiming-uniform, B zero (so a fresh adapter changes
//! nothing). Targets are chosen by module name exactly as PEFT does; the base is frozen; the adapter is saved
//! and loaded alone in PEFT's layout (`adapter_model.safetensors` + `adapter_config.json`, keys
//! `base_model.model.<module>.lora_A.weight`), and folds into plain weights: `W' = W + (alpha / r) · B A`.

use std::collections::HashMap;
use std::path::Path;

use regex::Regex;
use tch::nn::{Init, VarStore};
use tch::Tensor;

use crate::builder::{torch_default_init, VarBuilder};
use crate::error::{read_json, ModelError, Result};
use crate::weights::{self, state_dict};

/// Which modules get adapters and how large they are.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub r: i64,
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    /// Module names as PEFT reads `target_modules` given as a list: a module is a target when its full name
    /// equals an entry or ends with `.<entry>`. `all-linear` selects every `Linear`.
    #[serde(default)]
    pub target_modules: Vec<String>,
    /// PEFT's `target_modules` given as a string: a regex the full module name must match entirely.
    #[serde(default)]
    pub target_regex: Option<String>,
    /// Modules whose name contains any of these are never targets (M3D excludes the vision tower, projector,
    /// embeddings, `lm_head` and the segmentation parts this way).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// rsLoRA scaling `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
}

impl LoraConfig {
    /// The reference's LoRA for LaMed: r 16, alpha 32, dropout 0.05, every Linear of the LLM.
    pub fn m3d_lamed() -> Self {
        LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: vec!["all-linear".into()],
            target_regex: None,
            exclude: [
                "vision_tower",
                "mm_projector",
                "embed_tokens",
                "lm_head",
                "seg_projector",
                "seg_module",
            ]
            .map(String::from)
            .to_vec(),
            use_rslora: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.r <= 0 {
            return Err(ModelError::Config(format!(
                "lora r must be positive, got {}",
                self.r
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::Config(format!(
                "lora dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if let Some(re) = &self.target_regex {
            Regex::new(re)
                .map_err(|e| ModelError::Config(format!("lora target_regex `{re}`: {e}")))?;
        }
        Ok(())
    }

    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Whether the `Linear` named `module` (full dotted name) gets an adapter.
    pub fn targets(&self, module: &str) -> bool {
        if self.exclude.iter().any(|e| module.contains(e.as_str())) {
            return false;
        }
        if let Some(re) = &self.target_regex {
            // Validated in `validate`; an invalid pattern selects nothing rather than panicking here.
            return Regex::new(&format!("^(?:{re})$"))
                .map(|r| r.is_match(module))
                .unwrap_or(false);
        }
        self.target_modules
            .iter()
            .any(|t| t == "all-linear" || module == t || module.ends_with(&format!(".{t}")))
    }
}

/// The two low-rank factors of one adapted `Linear`.
#[derive(Debug)]
pub struct LoraAdapter {
    /// `lora_A.weight`, shape (r, in).
    pub a: Tensor,
    /// `lora_B.weight`, shape (out, r).
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
}

impl LoraAdapter {
    pub fn new(vb: &VarBuilder, cfg: &LoraConfig, in_dim: i64, out_dim: i64) -> Result<Self> {
        let a = vb
            .pp("lora_A")
            .var("weight", &[cfg.r, in_dim], torch_default_init(in_dim))?;
        let b = vb
            .pp("lora_B")
            .var("weight", &[out_dim, cfg.r], Init::Const(0.0))?;
        Ok(LoraAdapter {
            a,
            b,
            scaling: cfg.scaling(),
            dropout: cfg.dropout,
        })
    }

    /// The adapter's term for `xs`, in the kind of `xs`: under bf16 autocast the f32 factors are cast on the
    /// fly (their gradients stay f32), as torch's autocast runs PEFT's `lora_A`/`lora_B` Linears.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let kind = xs.kind();
        let a = self.a.to_kind(kind);
        let b = self.b.to_kind(kind);
        let xs = crate::layers::dropout(xs.shallow_clone(), self.dropout, train);
        xs.linear::<Tensor>(&a, None).linear::<Tensor>(&b, None) * self.scaling
    }
}

/// Whether a parameter name belongs to an adapter.
pub fn is_lora_key(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

/// Freezes everything but the adapters and the parameters whose name contains one of `also_train` (PEFT's
/// `modules_to_save`; M3D trains the projector and segmentation parts in full). Returns the number of
/// trainable parameters.
pub fn freeze_base(vs: &VarStore, also_train: &[&str]) -> i64 {
    let mut trainable = 0;
    for (name, t) in vs.variables() {
        let train = is_lora_key(&name) || also_train.iter().any(|p| name.contains(p));
        let _ = t.set_requires_grad(train);
        if train {
            trainable += t.numel() as i64;
        }
    }
    trainable
}

const PEFT_PREFIX: &str = "base_model.model.";

/// Writes the adapters of `vs` alone, as PEFT's `save_pretrained` does. `target_modules` is written as the
/// full names of the adapted modules, so PEFT re-creates exactly these adapters whatever rule chose them.
/// `task_type` is PEFT's (`CAUSAL_LM` for LaMed; `None` for a plain module).
pub fn save_adapter(
    dir: &Path,
    vs: &VarStore,
    cfg: &LoraConfig,
    task_type: Option<&str>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let tensors: Vec<(String, Tensor)> = state_dict(vs)
        .into_iter()
        .filter(|(k, _)| is_lora_key(k))
        .map(|(k, t)| (format!("{PEFT_PREFIX}{k}"), t))
        .collect();
    if tensors.is_empty() {
        return Err(ModelError::Input(
            "the model has no LoRA adapters to save".into(),
        ));
    }
    let modules: std::collections::BTreeSet<&str> = tensors
        .iter()
        .filter_map(|(k, _)| k.strip_prefix(PEFT_PREFIX)?.strip_suffix(".lora_A.weight"))
        .collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": modules,
        "exclude_modules": null,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": cfg.use_rslora,
        "use_dora": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "base_model_name_or_path": null,
    });
    let cfg_path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config).map_err(|source| ModelError::Json {
        path: cfg_path.clone(),
        source,
    })?;
    weights::save_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    std::fs::write(&cfg_path, text).map_err(|e| ModelError::io(&cfg_path, e))
}

#[derive(serde::Deserialize)]
struct PeftConfigFile {
    peft_type: Option<String>,
    r: i64,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    #[serde(default)]
    target_modules: Option<serde_json::Value>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

/// Reads a PEFT adapter folder's `adapter_config.json`.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join("adapter_config.json");
    let f: PeftConfigFile = read_json(&path)?;
    if f.peft_type.as_deref().is_some_and(|t| t != "LORA") {
        return Err(ModelError::Config(format!(
            "{}: peft_type {:?} is not LORA",
            path.display(),
            f.peft_type
        )));
    }
    let unsupported = [
        (f.use_dora, "use_dora"),
        (f.fan_in_fan_out, "fan_in_fan_out"),
        (
            f.bias.as_deref().is_some_and(|b| b != "none"),
            "bias other than \"none\"",
        ),
        (!f.rank_pattern.is_empty(), "rank_pattern"),
        (!f.alpha_pattern.is_empty(), "alpha_pattern"),
    ];
    if let Some((_, what)) = unsupported.iter().find(|(on, _)| *on) {
        return Err(ModelError::Config(format!(
            "{}: {what} is not supported",
            path.display()
        )));
    }
    let (target_modules, target_regex) = match f.target_modules {
        Some(serde_json::Value::String(s)) => (Vec::new(), Some(s)),
        Some(serde_json::Value::Array(a)) => (
            a.into_iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            None,
        ),
        _ => (Vec::new(), None),
    };
    let cfg = LoraConfig {
        r: f.r,
        alpha: f.lora_alpha,
        dropout: f.lora_dropout,
        target_modules,
        target_regex,
        exclude: Vec::new(),
        use_rslora: f.use_rslora,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Loads a PEFT adapter folder into the adapters of `vs` (built with the same config): strict over the
/// adapter keys, the base weights untouched.
pub fn load_adapter(dir: &Path, vs: &VarStore) -> Result<LoraConfig> {
    let cfg = read_adapter_config(dir)?;
    let path = dir.join("adapter_model.safetensors");
    let path = if path.is_file() {
        path
    } else {
        dir.join("adapter_model.bin")
    };
    let tensors: Vec<(String, Tensor)> = weights::read_tensors(&path)?
        .into_iter()
        // PEFT drops the adapter name ("default") when saving; accept files that kept it.
        .map(|(k, t)| {
            (
                k.replace(".lora_A.default.", ".lora_A.")
                    .replace(".lora_B.default.", ".lora_B."),
                t,
            )
        })
        .collect();
    let vars: HashMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .filter(|(k, _)| is_lora_key(k))
        .collect();
    let opts =
        weights::LoadOptions::default().with_key_map(weights::KeyMap::select_prefix(PEFT_PREFIX));
    weights::load_into_vars(&vars, tensors, &opts).map_err(|e| match e {
        ModelError::StateDict(r) => {
            ModelError::weights(&path, format!("adapter does not match the model:\n{r}"))
        }
        other => other,
    })?;
    Ok(cfg)
}

/// The plain state dict with every adapter folded in (`W' = W + scaling · B A`) and no `lora_` keys: what
/// PEFT's `merge_and_unload` gives. The model itself is unchanged.
pub fn merged_state_dict(vs: &VarStore, cfg: &LoraConfig) -> Result<Vec<(String, Tensor)>> {
    Ok(merge_tensors(&state_dict(vs), cfg.scaling()))
}

/// [`merged_state_dict`] on named tensors (e.g. a saved checkpoint with its adapters): every `<m>.weight` with
/// `<m>.lora_A.weight` and `<m>.lora_B.weight` becomes `W + scaling · B A`, and the `lora_` keys are dropped.
pub fn merge_tensors(tensors: &[(String, Tensor)], scaling: f64) -> Vec<(String, Tensor)> {
    let by_name: std::collections::HashMap<&str, &Tensor> =
        tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = Vec::new();
    for (k, t) in tensors {
        if is_lora_key(k) {
            continue;
        }
        let module = k.strip_suffix(".weight");
        let adapter = module.and_then(|m| {
            Some((
                *by_name.get(format!("{m}.lora_A.weight").as_str())?,
                *by_name.get(format!("{m}.lora_B.weight").as_str())?,
            ))
        });
        let t = match adapter {
            Some((a, b)) => tch::no_grad(|| {
                let delta = b
                    .to_kind(tch::Kind::Float)
                    .matmul(&a.to_kind(tch::Kind::Float))
                    * scaling;
                (t.to_kind(tch::Kind::Float) + delta).to_kind(t.kind())
            }),
            None => t.detach(),
        };
        out.push((k.clone(), t));
    }
    out
}
