//! M3D-LaMed: a 3-D ViT vision tower, the spatial-pooling projector and a causal LLM (Llama-2/3, Phi-3), with
//! an optional SegVol mask decoder prompted by the LLM's `[SEG]` state.
//!
//! Follows the reference `LaMed/src/model/{lamed_arch.py, language_model/lamed_{llama,phi3}.py}`, its data
//! pipeline `LaMed/src/dataset/multi_dataset.py` and `LaMed/src/train/train.py` (M3D, arXiv 2404.00578).
//! Checkpoint layout (what the published `LamedLlamaForCausalLM` saves):
//! - `model.*`, `lm_head.*`: the HF causal LM, vocabulary grown by the 4 added tokens;
//! - `model.vision_tower.vision_tower.*`: the M3D-CLIP ViT (MONAI layout, with CLS token);
//! - `model.mm_projector.*`: the projector (`projector.0`, `projector.2` for `spp`);
//! - `model.seg_projector.{0,2}`: Linear(H, H), ReLU, Linear(H, 768), Dropout(0.1);
//! - `model.seg_module.*`: SegVol (see [`crate::segvol`]).
//!
//! Behaviour, as the reference:
//! - the image's 256 projected tokens replace the embeddings at positions 1..=256 (right after BOS), where the
//!   prompt holds 256 `<im_patch>` tokens (checked here; the reference splices blindly);
//! - LM loss: HF's shifted cross-entropy, ignore index -100, mean over the scored tokens, in f32;
//! - segmentation, for the samples whose mask is not empty: the last hidden state (after the final norm) at
//!   every position *followed by* a `[SEG]` token (i.e. the state that predicts `[SEG]`), averaged when there
//!   are several, through `seg_projector`, is SegVol's text prompt; a sample without `[SEG]` gets a zero
//!   prompt; loss = Dice + BCE over those samples;
//! - total loss = LM loss + Dice + BCE (weights 1).
//!
//! Deviations, each the correct reading of code that cannot run as written: `vision_select_layer < -1` takes
//! that block's output (the reference indexes the list with the feature name and crashes); generation with
//! segmentation re-runs the finished sequence once to collect the hidden states (the reference keeps them
//! during decoding; the values are the same).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};

use crate::builder::VarBuilder;
use crate::error::{ModelError, Result};
use crate::generate::{generate, left_pad_embeds, GenerateOptions};
use crate::layers::{dropout, to_device_async, CheckedIds, Linear};
use crate::llama::LlamaConfig;
use crate::llm::{CausalLm, LlmConfig};
use crate::phi3::Phi3Config;
use crate::projector::{build_projector, Projector, ProjectorConfig, ProjectorType};
use crate::segvol::{self, SegVol, SegVolConfig};
use crate::vit3d::{ViT3d, ViT3dConfig};

/// The label value the LM loss skips (HF / PyTorch `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;
/// Tokens LaMed adds to the base tokenizer, in id order: `<im_patch>`, `<bx_start>`, `<bx_end>` (special
/// tokens), then `[SEG]` (a normal token).
pub const ADDED_TOKENS: [&str; 4] = ["<im_patch>", "<bx_start>", "<bx_end>", "[SEG]"];

/// Ids of the added tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LamedTokens {
    pub im_patch: i64,
    pub bx_start: i64,
    pub bx_end: i64,
    pub seg: i64,
}

impl LamedTokens {
    /// The ids the tokenizer assigns when the 4 tokens are appended to a tokenizer of `tokenizer_len`
    /// entries (Llama-2: 32000 -> `[SEG]` = 32003).
    pub fn after(tokenizer_len: i64) -> Self {
        LamedTokens {
            im_patch: tokenizer_len,
            bx_start: tokenizer_len + 1,
            bx_end: tokenizer_len + 2,
            seg: tokenizer_len + 3,
        }
    }
}

/// Which ViT output feeds the projector (`vision_select_feature`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectFeature {
    /// Patch tokens only (drop the CLS token): the published setting.
    Patch,
    /// CLS token and patches.
    ClsPatch,
}

fn default_select_layer() -> i64 {
    -1
}
fn default_select_feature() -> SelectFeature {
    SelectFeature::Patch
}
fn default_seg_dropout() -> f64 {
    0.1
}

/// Keys of a released-layout `config.json` that carry shapes the reference hard-codes, for models that differ
/// from them ([`LamedConfig::to_hf_json`]).
const M3D_VISION_KEY: &str = "m3d_vision";
const M3D_SEG_KEY: &str = "m3d_seg";
const M3D_SEG_DROPOUT_KEY: &str = "m3d_seg_projector_dropout";

/// Everything that shapes a LaMed model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LamedConfig {
    /// The LLM, with `vocab_size` already grown by the added tokens.
    pub llm: LlmConfig,
    /// The vision tower (M3D-CLIP's ViT, with CLS token).
    pub vision: ViT3dConfig,
    #[serde(default = "default_select_layer")]
    pub vision_select_layer: i64,
    #[serde(default = "default_select_feature")]
    pub vision_select_feature: SelectFeature,
    pub projector: ProjectorConfig,
    /// SegVol and `seg_projector`, when segmentation is enabled.
    pub seg: Option<SegVolConfig>,
    /// The `nn.Dropout(0.1)` closing `seg_projector`.
    #[serde(default = "default_seg_dropout")]
    pub seg_projector_dropout: f64,
    pub tokens: LamedTokens,
}

impl LamedConfig {
    /// LaMed around a base LLM whose tokenizer has `tokenizer_len` entries: the vocabulary becomes
    /// `tokenizer_len + 4` (the reference's `resize_token_embeddings(len(tokenizer))`, which also *drops*
    /// padding rows a checkpoint may have past the tokenizer, as Phi-3's 32064 -> 32015), with the M3D
    /// vision tower, `spp` projector and, if `seg`, SegVol.
    pub fn m3d(mut llm: LlmConfig, tokenizer_len: i64, seg: bool) -> Self {
        llm.set_vocab_size(tokenizer_len + ADDED_TOKENS.len() as i64);
        let hidden = llm.hidden_size();
        LamedConfig {
            llm,
            vision: ViT3dConfig::m3d_clip(),
            vision_select_layer: -1,
            vision_select_feature: SelectFeature::Patch,
            projector: ProjectorConfig::m3d(hidden),
            seg: seg.then(SegVolConfig::m3d),
            seg_projector_dropout: 0.1,
            tokens: LamedTokens::after(tokenizer_len),
        }
    }

    /// M3D-LaMed-Llama-2-7B: Llama-2-7b-chat (tokenizer 32000 -> vocab 32004, `[SEG]` = 32003).
    pub fn llama2_7b() -> Self {
        Self::m3d(LlmConfig::Llama(LlamaConfig::llama2_7b()), 32000, true)
    }

    /// M3D-LaMed-Llama-3-8B: Llama-3-8B-Instruct (tokenizer 128256 -> vocab 128260).
    pub fn llama3_8b() -> Self {
        Self::m3d(LlmConfig::Llama(LlamaConfig::llama3_8b()), 128_256, true)
    }

    /// M3D-LaMed-Phi-3-4B: Phi-3-mini-4k-instruct (tokenizer 32011 -> vocab 32015; the checkpoint's 49
    /// padding rows past the tokenizer are dropped by the reference's resize).
    pub fn phi3_mini() -> Self {
        Self::m3d(LlmConfig::Phi3(Phi3Config::phi3_mini_4k()), 32011, true)
    }

    /// A tiny LaMed for CPU recipes: [`ViT3dConfig::tiny`] on M3D's 32x256x256 input, the `spp` projector
    /// pooling its 4x8x8 patches to 32 image tokens, and the debug Llama (width 64, 2 layers, 128
    /// positions) over a tokenizer of `tokenizer_len` entries (+ the 4 LaMed tokens; ids 0 `<unk>` = pad, 1 `<s>`,
    /// 2 `</s>` as Llama-2's); when `seg`, SegVol with the debug prompt/mask decoder over an image encoder of
    /// the vision tower's shape.
    pub fn tiny(tokenizer_len: i64, seg: bool) -> Self {
        let mut cfg = Self::m3d(LlmConfig::Llama(LlamaConfig::debug()), tokenizer_len, seg);
        cfg.vision = ViT3dConfig::tiny();
        cfg.projector = ProjectorConfig {
            image_size: cfg.vision.img_size,
            patch_size: cfg.vision.patch_size,
            mm_hidden_size: cfg.vision.hidden_size,
            ..ProjectorConfig::m3d(cfg.llm.hidden_size())
        };
        // SegVol's own image encoder is a copy of the vision tower's shape (its prompts come through
        // `seg_projector`, which outputs the vision width), without the CLS token, as in M3D.
        cfg.seg = seg.then(|| SegVolConfig {
            image_encoder: ViT3dConfig {
                cls_token: false,
                ..cfg.vision.clone()
            },
            ..SegVolConfig::debug()
        });
        // No dropout in the tiny preset's own layers, so that CPU runs compare exactly across world sizes
        // (dropout draws per rank); LoRA's dropout is the recipe's.
        cfg.seg_projector_dropout = 0.0;
        cfg
    }

    /// A tiny LaMed for tests: Llama debug LLM (hidden 64, tokenizer 128 -> vocab 132), vision 8x32x32 with
    /// 4x8x8 patches (grid 2x4x4, width 32) -> 4 image tokens, SegVol debug on the same images.
    pub fn debug() -> Self {
        let mut cfg = Self::m3d(LlmConfig::Llama(LlamaConfig::debug()), 128, true);
        cfg.vision = ViT3dConfig {
            img_size: [8, 32, 32],
            patch_size: [4, 8, 8],
            ..ViT3dConfig::debug()
        };
        cfg.projector = ProjectorConfig::debug(cfg.llm.hidden_size());
        cfg.seg = Some(SegVolConfig::debug());
        cfg
    }

    /// Image tokens the prompt must reserve after BOS (`proj_out_num`, 256 for M3D): what the projector
    /// makes of the patches, plus the CLS token when it is selected and the projector keeps every token.
    pub fn num_image_tokens(&self) -> i64 {
        self.projector.num_output_tokens() + i64::from(self.projects_cls_token())
    }

    /// Whether the selected features include a CLS token (which the projector then passes on).
    fn projects_cls_token(&self) -> bool {
        self.vision_select_feature == SelectFeature::ClsPatch && self.vision.cls_token
    }

    /// Reads the reference's flat `config.json` (`model_type` `lamed_llama` / `lamed_phi3`, with
    /// `image_size`, `patch_size`, `mm_projector_type`, ..., `segmentation_module`, `seg_token_id`).
    pub fn from_hf_json(value: &serde_json::Value) -> Result<Self> {
        let bad = |m: String| ModelError::Config(format!("LaMed config.json: {m}"));
        let mut llm_value = value.clone();
        let model_type = value
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("no model_type".into()))?;
        let base = model_type.strip_prefix("lamed_").unwrap_or(model_type);
        let base = if base == "llama" || base == "phi3" {
            base
        } else {
            return Err(bad(format!("unsupported model_type `{model_type}`")));
        };
        llm_value["model_type"] = serde_json::Value::from(base);
        let llm: LlmConfig =
            serde_json::from_value(llm_value).map_err(|e| bad(format!("LLM fields: {e}")))?;
        let projector: ProjectorConfig = serde_json::from_value(value.clone())
            .map_err(|e| bad(format!("projector fields: {e}")))?;
        let get_i64 = |k: &str| value.get(k).and_then(|v| v.as_i64());
        let in_channels = get_i64("image_channel").unwrap_or(1);
        let extension = |key: &str| -> Result<Option<serde_json::Value>> {
            Ok(value.get(key).filter(|v| !v.is_null()).cloned())
        };
        let vision = match extension(M3D_VISION_KEY)? {
            Some(v) => {
                serde_json::from_value(v).map_err(|e| bad(format!("{M3D_VISION_KEY}: {e}")))?
            }
            None => ViT3dConfig {
                in_channels,
                img_size: projector.image_size,
                patch_size: projector.patch_size,
                ..ViT3dConfig::m3d_clip()
            },
        };
        let seg = match value.get("segmentation_module").and_then(|v| v.as_str()) {
            Some(s) if s.to_lowercase().contains("segvol") => Some(match extension(M3D_SEG_KEY)? {
                Some(v) => {
                    serde_json::from_value(v).map_err(|e| bad(format!("{M3D_SEG_KEY}: {e}")))?
                }
                None => SegVolConfig::for_image(projector.image_size, projector.patch_size),
            }),
            Some(s) => return Err(bad(format!("unknown segmentation_module `{s}`"))),
            None => None,
        };
        let seg_id = get_i64("seg_token_id").unwrap_or(llm.vocab_size() - 1);
        let im_patch = get_i64("img_token_id").unwrap_or(seg_id - 3);
        let select_feature = match value.get("vision_select_feature").and_then(|v| v.as_str()) {
            None | Some("patch") => SelectFeature::Patch,
            Some("cls_patch") => SelectFeature::ClsPatch,
            Some(s) => return Err(bad(format!("unknown vision_select_feature `{s}`"))),
        };
        let cfg = LamedConfig {
            llm,
            vision,
            vision_select_layer: get_i64("vision_select_layer").unwrap_or(-1),
            vision_select_feature: select_feature,
            projector,
            seg,
            seg_projector_dropout: value
                .get(M3D_SEG_DROPOUT_KEY)
                .and_then(|v| v.as_f64())
                .unwrap_or(0.1),
            tokens: LamedTokens {
                im_patch,
                bx_start: seg_id - 2,
                bx_end: seg_id - 1,
                seg: seg_id,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// A `config.json` in either layout: the released one (`model_type` `lamed_*`, [`LamedConfig::from_hf_json`])
    /// or the one a run writes into `final/` (this struct's serde form). Validated.
    pub fn from_config_json(value: &serde_json::Value) -> Result<Self> {
        let released = value
            .get("model_type")
            .and_then(|t| t.as_str())
            .is_some_and(|t| t.starts_with("lamed_"));
        let cfg = if released {
            LamedConfig::from_hf_json(value)?
        } else {
            serde_json::from_value(value.clone()).map_err(|e| {
                ModelError::Config(format!(
                    "neither a LaMed config saved by a run nor a released one (`model_type` lamed_*): {e}"
                ))
            })?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The released checkpoints' `config.json` ([`LamedConfig::from_hf_json`] reads it back): the LLM's HF
    /// fields under `model_type` `lamed_llama` / `lamed_phi3` with `architectures`
    /// `LamedLlamaForCausalLM` / `LamedPhi3ForCausalLM`, and LaMed's flat fields (`image_channel`,
    /// `image_size`, `patch_size`, `vision_tower`, `mm_projector_type`, the `proj_*` fields,
    /// `segmentation_module`, `seg_token_id`, ...). The reference fixes the vision tower at ViT-B and SegVol's
    /// decoder at its published shape; a model of other shapes also carries them under `m3d_vision` /
    /// `m3d_seg` (keys the reference ignores), so a small model round-trips.
    pub fn to_hf_json(&self) -> Result<serde_json::Value> {
        let bad = |m: String| ModelError::Config(format!("LaMed config.json: {m}"));
        let json = |v: std::result::Result<serde_json::Value, serde_json::Error>| {
            v.map_err(|e| bad(e.to_string()))
        };
        let mut out = json(serde_json::to_value(&self.llm))?;
        let (model_type, architecture) = match &self.llm {
            LlmConfig::Llama(_) => ("lamed_llama", "LamedLlamaForCausalLM"),
            LlmConfig::Phi3(_) => ("lamed_phi3", "LamedPhi3ForCausalLM"),
        };
        let serde_json::Value::Object(projector) = json(serde_json::to_value(&self.projector))?
        else {
            return Err(bad("the projector is not a JSON object".into()));
        };
        let Some(obj) = out.as_object_mut() else {
            return Err(bad("the LLM config is not a JSON object".into()));
        };
        obj.extend(projector);
        let t = &self.tokens;
        if (t.bx_start, t.bx_end) != (t.seg - 2, t.seg - 1) {
            return Err(bad(format!(
                "the released layout places <bx_start>, <bx_end> just before [SEG] ({}); these are {:?}",
                t.seg, t
            )));
        }
        let fields = serde_json::json!({
            "model_type": model_type,
            "architectures": [architecture],
            "image_channel": self.vision.in_channels,
            "vision_tower": "vit3d",
            "vision_select_layer": self.vision_select_layer,
            "vision_select_feature": self.vision_select_feature,
            "segmentation_module": self.seg.as_ref().map(|_| "segvol"),
            "seg_token_id": t.seg,
            "img_token_id": t.im_patch,
        });
        if let serde_json::Value::Object(f) = fields {
            obj.extend(f);
        }
        let published_vision = ViT3dConfig {
            in_channels: self.vision.in_channels,
            img_size: self.projector.image_size,
            patch_size: self.projector.patch_size,
            ..ViT3dConfig::m3d_clip()
        };
        let vision = json(serde_json::to_value(&self.vision))?;
        if vision != json(serde_json::to_value(&published_vision))? {
            obj.insert(M3D_VISION_KEY.into(), vision);
        }
        if let Some(seg) = &self.seg {
            let seg = json(serde_json::to_value(seg))?;
            let published =
                SegVolConfig::for_image(self.projector.image_size, self.projector.patch_size);
            if seg != json(serde_json::to_value(&published))? {
                obj.insert(M3D_SEG_KEY.into(), seg);
            }
        }
        if self.seg_projector_dropout != 0.1 {
            obj.insert(
                M3D_SEG_DROPOUT_KEY.into(),
                serde_json::Value::from(self.seg_projector_dropout),
            );
        }
        Ok(out)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(format!("LaMed: {m}")));
        self.llm.validate()?;
        self.vision.validate()?;
        self.projector.validate()?;
        let p = &self.projector;
        if p.mm_hidden_size != self.vision.hidden_size || p.hidden_size != self.llm.hidden_size() {
            return bad(format!(
                "projector {} -> {} does not connect vision width {} to LLM width {}",
                p.mm_hidden_size,
                p.hidden_size,
                self.vision.hidden_size,
                self.llm.hidden_size()
            ));
        }
        if p.image_size != self.vision.img_size || p.patch_size != self.vision.patch_size {
            return bad(format!(
                "projector grid {:?}/{:?} differs from the vision tower's {:?}/{:?}",
                p.image_size, p.patch_size, self.vision.img_size, self.vision.patch_size
            ));
        }
        if self.vision_select_feature == SelectFeature::Patch && !self.vision.cls_token {
            return bad(
                "select feature `patch` drops a CLS token the vision tower does not have".into(),
            );
        }
        if self.projects_cls_token() && p.mm_projector_type == ProjectorType::Spp {
            return bad(
                "the spp projector pools the patch grid and cannot take the CLS token of `cls_patch`"
                    .into(),
            );
        }
        let layers = self.vision.num_layers;
        if self.vision_select_layer >= 0 || self.vision_select_layer < -layers.max(1) {
            return bad(format!(
                "vision_select_layer {} is not in -{layers}..=-1",
                self.vision_select_layer
            ));
        }
        if let Some(seg) = &self.seg {
            seg.validate()?;
            if seg.embed_dim() != self.vision.hidden_size {
                return bad(format!(
                    "seg_projector outputs the vision width {} but SegVol takes {}",
                    self.vision.hidden_size,
                    seg.embed_dim()
                ));
            }
            if seg.image_encoder.img_size != self.vision.img_size {
                return bad("SegVol and the vision tower must see the same image size".into());
            }
        }
        let v = self.llm.vocab_size();
        let t = &self.tokens;
        for (name, id) in [
            ("<im_patch>", t.im_patch),
            ("<bx_start>", t.bx_start),
            ("<bx_end>", t.bx_end),
            ("[SEG]", t.seg),
        ] {
            if id < 0 || id >= v {
                return bad(format!("{name} id {id} is outside the vocabulary ({v})"));
            }
        }
        Ok(())
    }
}

/// `seg_projector`: Linear(H, H), ReLU, Linear(H, C_seg), Dropout.
#[derive(Debug)]
pub struct SegProjector {
    pub fc1: Linear,
    pub fc2: Linear,
    dropout: f64,
}

impl SegProjector {
    pub fn new(vb: &VarBuilder, hidden: i64, out: i64, dropout: f64) -> Result<Self> {
        Ok(SegProjector {
            fc1: Linear::new(&vb.pp(0), hidden, hidden, true)?,
            fc2: Linear::new(&vb.pp(2), hidden, out, true)?,
            dropout,
        })
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let x = self.fc1.forward_t(xs, train).relu();
        dropout(self.fc2.forward_t(&x, train), self.dropout, train)
    }
}

/// A training / evaluation batch, as the reference's collator builds it.
#[derive(Debug)]
pub struct LamedBatch {
    /// (B, C, D, H, W).
    pub images: Tensor,
    /// (B, T): BOS, `num_image_tokens` x `<im_patch>`, prompt, answer, padding.
    pub input_ids: Tensor,
    /// (B, T) 1 / 0.
    pub attention_mask: Option<Tensor>,
    /// (B, T) target ids, [`IGNORE_INDEX`] where not scored.
    pub labels: Option<Tensor>,
    /// (B, 1, D, H, W) masks; all-zero for samples without one.
    pub segs: Option<Tensor>,
}

/// The segmentation branch of one forward pass.
#[derive(Debug)]
pub struct LamedSegOutput {
    /// Batch indices of the samples with a mask.
    pub sample_ids: Vec<i64>,
    /// SegVol's text prompts for them, (n, C_seg).
    pub prompts: Tensor,
    /// (n, 1, D, H, W).
    pub logits: Tensor,
    pub dice: Tensor,
    pub bce: Tensor,
}

/// What the builder of a batch checked on the host before moving it to the device, for
/// [`Lamed::forward_checked`]: the ids (in the vocabulary, `<im_patch>` at positions 1..=N, as
/// [`Lamed::forward_t`] checks them on the device) and which samples have a mask. On a GPU each check on the
/// device is a read back to the host, which waits for every kernel queued before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LamedHostChecks {
    ids: CheckedIds,
    num_image_tokens: i64,
    im_patch: i64,
    seg_samples: Option<Vec<i64>>,
}

impl LamedHostChecks {
    /// Checks `input_ids` (B, T), on the CPU, for a model of `cfg`, with the errors of the device checks.
    /// `has_mask[i]`: sample i's mask has a non-zero voxel (for M3D's non-negative masks the same as the
    /// model's own test, a non-zero sum); `None` leaves the samples with a mask to be found on the device.
    pub fn check(cfg: &LamedConfig, input_ids: &Tensor, has_mask: Option<&[bool]>) -> Result<Self> {
        let ids = CheckedIds::check("input_ids", input_ids, cfg.llm.vocab_size())?;
        let [b, t] = ids.shape();
        let n = cfg.num_image_tokens();
        if t < n + 1 {
            return Err(ModelError::Input(format!(
                "a prompt with an image needs BOS + {n} <im_patch> tokens, got {t} tokens"
            )));
        }
        check_image_slots(input_ids, n, cfg.tokens.im_patch)?;
        let seg_samples = match has_mask {
            Some(m) if m.len() as i64 != b => {
                return Err(ModelError::Input(format!(
                    "{} mask flags for a batch of {b}",
                    m.len()
                )))
            }
            Some(m) => Some((0..b).filter(|&i| m[i as usize]).collect()),
            None => None,
        };
        Ok(LamedHostChecks {
            ids,
            num_image_tokens: n,
            im_patch: cfg.tokens.im_patch,
            seg_samples,
        })
    }

    /// Batch indices of the samples with a mask, when the checks know them.
    pub fn seg_samples(&self) -> Option<&[i64]> {
        self.seg_samples.as_deref()
    }
}

/// Errors unless positions 1..=n of `input_ids` (B, T >= n + 1) all hold `im_patch` (one read).
fn check_image_slots(input_ids: &Tensor, n: i64, im_patch: i64) -> Result<()> {
    if input_ids
        .narrow(1, 1, n)
        .ne(im_patch)
        .any()
        .int64_value(&[])
        != 0
    {
        return Err(ModelError::Input(format!(
            "positions 1..={n} must hold <im_patch> (id {im_patch}) for the image tokens"
        )));
    }
    Ok(())
}

/// What [`Lamed::forward_t`] computes.
#[derive(Debug)]
pub struct LamedOutput {
    /// (B, T, vocab).
    pub logits: Tensor,
    /// Last hidden state after the final norm, (B, T, H).
    pub hidden: Tensor,
    /// LM loss + Dice + BCE (whichever are present).
    pub loss: Option<Tensor>,
    pub lm_loss: Option<Tensor>,
    pub seg: Option<LamedSegOutput>,
}

/// The segmentation parts (`model.seg_projector`, `model.seg_module`).
#[derive(Debug)]
pub struct LamedSeg {
    pub seg_projector: SegProjector,
    pub seg_module: SegVol,
}

/// M3D-LaMed (`LamedLlamaForCausalLM` / `LamedPhi3ForCausalLM`).
pub struct Lamed {
    /// `model.vision_tower.vision_tower`.
    pub vision_tower: ViT3d,
    /// `model.mm_projector`.
    pub mm_projector: Projector,
    /// `model.*` (embeddings, decoder layers, norm) and `lm_head`.
    pub llm: CausalLm,
    pub seg: Option<LamedSeg>,
    cfg: LamedConfig,
}

impl Lamed {
    /// `vb` is the checkpoint root (keys `model.*`, `lm_head.*`).
    pub fn new(vb: &VarBuilder, cfg: &LamedConfig) -> Result<Self> {
        cfg.validate()?;
        let llm = CausalLm::new(vb, &cfg.llm)?;
        let m = vb.pp("model");
        let vision_tower = ViT3d::new(&m.pp("vision_tower.vision_tower"), &cfg.vision)?;
        let mm_projector = build_projector(&m.pp("mm_projector"), &cfg.projector)?;
        let seg = match &cfg.seg {
            Some(seg_cfg) => Some(LamedSeg {
                seg_projector: SegProjector::new(
                    &m.pp("seg_projector"),
                    cfg.llm.hidden_size(),
                    cfg.vision.hidden_size,
                    cfg.seg_projector_dropout,
                )?,
                seg_module: SegVol::new(&m.pp("seg_module"), seg_cfg)?,
            }),
            None => None,
        };
        Ok(Lamed {
            vision_tower,
            mm_projector,
            llm,
            seg,
            cfg: cfg.clone(),
        })
    }

    /// Activation checkpointing (`train.activation_checkpointing`) of the decoder layers, the vision tower's
    /// blocks and SegVol's image-encoder blocks: each keeps only its input in a training forward and is re-run
    /// in the backward pass, with the same gradients.
    pub fn set_activation_checkpointing(&mut self, on: bool) {
        self.llm.set_activation_checkpointing(on);
        self.vision_tower.set_activation_checkpointing(on);
        if let Some(seg) = &mut self.seg {
            seg.seg_module
                .image_encoder
                .set_activation_checkpointing(on);
        }
    }

    pub fn config(&self) -> &LamedConfig {
        &self.cfg
    }

    fn param_kind(&self) -> Kind {
        self.llm.embed_weight().kind()
    }

    fn device(&self) -> Device {
        self.llm.embed_weight().device()
    }

    /// `encode_images`: (B, C, D, H, W) -> projected image tokens (B, num_image_tokens, H).
    pub fn encode_images(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let images = images.to_kind(self.param_kind());
        let (last, hidden_states) = self.vision_tower.f_forward_t(&images, train)?;
        let sel = self.cfg.vision_select_layer;
        let feats = if sel == -1 {
            last
        } else {
            let i = hidden_states.len() as i64 + sel;
            hidden_states
                .get(i.max(0) as usize)
                .map(Tensor::shallow_clone)
                .ok_or_else(|| ModelError::Config(format!("vision_select_layer {sel}")))?
        };
        let feats = match self.cfg.vision_select_feature {
            SelectFeature::Patch => feats.narrow(1, 1, feats.size()[1] - 1),
            SelectFeature::ClsPatch => feats,
        };
        self.mm_projector.forward_t(&feats, train)
    }

    /// `prepare_inputs_for_multimodal`: the token embeddings with positions 1..=N replaced by the image
    /// tokens. Without images, the plain embeddings.
    pub fn input_embeds(
        &self,
        input_ids: &Tensor,
        images: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.input_embeds_with(input_ids, images, None, train)
    }

    fn input_embeds_with(
        &self,
        input_ids: &Tensor,
        images: Option<&Tensor>,
        checked: Option<&LamedHostChecks>,
        train: bool,
    ) -> Result<Tensor> {
        let embeds = match checked {
            Some(c) => self.llm.embed_tokens_checked(input_ids, &c.ids)?,
            None => self.llm.embed_tokens(input_ids)?,
        };
        let Some(images) = images else {
            return Ok(embeds);
        };
        let n = self.cfg.num_image_tokens();
        let (b, t) = (input_ids.size()[0], input_ids.size()[1]);
        if t < n + 1 {
            return Err(ModelError::Input(format!(
                "a prompt with an image needs BOS + {n} <im_patch> tokens, got {t} tokens"
            )));
        }
        match checked {
            // The slots were checked on the host, for this configuration (`forward_checked` compared it).
            Some(_) => {}
            None => check_image_slots(input_ids, n, self.cfg.tokens.im_patch)?,
        }
        if images.size().first() != Some(&b) {
            return Err(ModelError::Shape {
                name: "images (B, C, D, H, W)".into(),
                expected: vec![b],
                got: images.size(),
            });
        }
        let feats = self.encode_images(images, train)?.to_kind(embeds.kind());
        // The splice must keep the sequence length, or the mask and labels no longer line up.
        if feats.size().get(1) != Some(&n) {
            return Err(ModelError::Shape {
                name: "projected image tokens".into(),
                expected: vec![b, n, embeds.size()[2]],
                got: feats.size(),
            });
        }
        Ok(Tensor::cat(
            &[
                embeds.narrow(1, 0, 1),
                feats,
                embeds.narrow(1, n + 1, t - n - 1),
            ],
            1,
        ))
    }

    /// The forward pass of training and evaluation (LM loss with labels, segmentation losses with masks).
    pub fn forward_t(&self, batch: &LamedBatch, train: bool) -> Result<LamedOutput> {
        self.forward_with(batch, None, train)
    }

    /// [`Lamed::forward_t`] of a batch whose ids (and, for segmentation, masks) were checked on the host
    /// ([`LamedHostChecks`]): nothing is read back from the device, so on a GPU the host never waits for the
    /// kernels it queued (checking on the device reads three times: the id range, the image slots and, with
    /// segmentation, the mask sums, the last after the whole LLM forward pass). The values are those of
    /// [`Lamed::forward_t`].
    pub fn forward_checked(
        &self,
        batch: &LamedBatch,
        checked: &LamedHostChecks,
        train: bool,
    ) -> Result<LamedOutput> {
        let (n, im_patch) = (self.cfg.num_image_tokens(), self.cfg.tokens.im_patch);
        if (checked.num_image_tokens, checked.im_patch) != (n, im_patch) {
            return Err(ModelError::Input(format!(
                "host checks made for {} <im_patch> tokens of id {}, the model takes {n} of id {im_patch}",
                checked.num_image_tokens, checked.im_patch
            )));
        }
        self.forward_with(batch, Some(checked), train)
    }

    fn forward_with(
        &self,
        batch: &LamedBatch,
        checked: Option<&LamedHostChecks>,
        train: bool,
    ) -> Result<LamedOutput> {
        let embeds =
            self.input_embeds_with(&batch.input_ids, Some(&batch.images), checked, train)?;
        let hidden =
            self.llm
                .forward_embeds(&embeds, batch.attention_mask.as_ref(), None, train)?;
        let logits = self.llm.logits(&hidden);
        let lm_loss = match &batch.labels {
            Some(labels) => Some(causal_lm_loss(&logits, labels)?),
            None => None,
        };
        let seg = match (&self.seg, &batch.segs) {
            (Some(seg), Some(segs)) => {
                let known = checked.and_then(|c| c.seg_samples.as_deref());
                self.seg_branch(
                    seg,
                    &hidden,
                    &batch.input_ids,
                    &batch.images,
                    segs,
                    known,
                    train,
                )?
            }
            _ => None,
        };
        let mut loss = lm_loss.as_ref().map(Tensor::shallow_clone);
        if let Some(s) = &seg {
            let l = &s.dice + &s.bce;
            loss = Some(match loss {
                Some(lm) => lm + l,
                None => l,
            });
        }
        Ok(LamedOutput {
            logits,
            hidden,
            loss,
            lm_loss,
            seg,
        })
    }

    /// `known`: the samples with a mask, from the host ([`LamedHostChecks`]); else they are found on the
    /// device (one read of the B mask sums).
    #[allow(clippy::too_many_arguments)]
    fn seg_branch(
        &self,
        seg: &LamedSeg,
        hidden: &Tensor,
        input_ids: &Tensor,
        images: &Tensor,
        segs: &Tensor,
        known: Option<&[i64]>,
        train: bool,
    ) -> Result<Option<LamedSegOutput>> {
        let b = hidden.size()[0];
        if segs.dim() != 5 || segs.size()[0] != b {
            return Err(ModelError::Shape {
                name: "segs (B, 1, D, H, W)".into(),
                expected: vec![b, 1, -1, -1, -1],
                got: segs.size(),
            });
        }
        let sample_ids: Vec<i64> = match known {
            Some(ids) => {
                if ids.iter().any(|&i| i < 0 || i >= b) {
                    return Err(ModelError::Input(format!(
                        "host checks name samples {ids:?} with a mask in a batch of {b}"
                    )));
                }
                ids.to_vec()
            }
            None => {
                let sums = segs
                    .to_kind(Kind::Float)
                    .flatten(1, -1)
                    .sum_dim_intlist(1, false, Kind::Float)
                    .to_device(Device::Cpu);
                let sums = Vec::<f32>::try_from(&sums)?;
                (0..b).filter(|&i| sums[i as usize] != 0.0).collect()
            }
        };
        if sample_ids.is_empty() {
            return Ok(None);
        }
        let idx = to_device_async(&Tensor::from_slice(&sample_ids), hidden.device());
        let prompts = self.seg_prompts(
            seg,
            &hidden.index_select(0, &idx),
            &input_ids.index_select(0, &idx),
            train,
        )?;
        let out = seg.seg_module.forward_t(
            &images.index_select(0, &idx).to_kind(self.param_kind()),
            Some(&prompts),
            train,
        )?;
        let target = segs.index_select(0, &idx);
        let (dice, bce) = segvol::seg_losses(&out.logits, &target)?;
        Ok(Some(LamedSegOutput {
            sample_ids,
            prompts,
            logits: out.logits,
            dice,
            bce,
        }))
    }

    /// SegVol prompts from hidden states (n, T, H) and their ids (n, T): the mean of the states at the
    /// positions followed by `[SEG]`, projected; zeros for a sequence without `[SEG]`.
    pub fn seg_prompts(
        &self,
        seg: &LamedSeg,
        hidden: &Tensor,
        ids: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (s, h) = (ids.size(), self.cfg.llm.hidden_size());
        if s.len() != 2 || s[1] < 1 || hidden.size() != [s[0], s[1], h] {
            return Err(ModelError::Shape {
                name: format!("hidden states for [SEG] ids of shape {s:?}"),
                expected: vec![
                    s.first().copied().unwrap_or(-1),
                    s.get(1).copied().unwrap_or(-1),
                    h,
                ],
                got: hidden.size(),
            });
        }
        let (n, t) = (s[0], s[1]);
        // weights[i, p] = 1 / count_i where ids[i, p + 1] is [SEG].
        let next_is_seg = Tensor::cat(
            &[
                ids.narrow(1, 1, t - 1).eq(self.cfg.tokens.seg),
                Tensor::zeros([n, 1], (Kind::Bool, ids.device())),
            ],
            1,
        )
        .to_kind(Kind::Float);
        let counts = next_is_seg.sum_dim_intlist(1, true, Kind::Float);
        let weights = (&next_is_seg / counts.clamp_min(1.0)).to_kind(hidden.kind());
        let pooled = weights.unsqueeze(1).matmul(hidden).squeeze_dim(1);
        let prompts = seg.seg_projector.forward_t(&pooled, train);
        let has_seg = counts.gt(0.0).to_device(prompts.device());
        Ok(prompts.where_self(&has_seg, &prompts.zeros_like()))
    }

    /// Greedy decoding from a prompt (1, T) with an optional image; returns the new tokens.
    pub fn generate(
        &self,
        input_ids: &Tensor,
        images: Option<&Tensor>,
        max_new_tokens: usize,
        eos_ids: &[i64],
    ) -> Result<Vec<i64>> {
        let opts = GenerateOptions::greedy(max_new_tokens, eos_ids);
        let prompts = [input_ids.shallow_clone()];
        Ok(self
            .generate_batch(&prompts, images, &opts)?
            .pop()
            .unwrap_or_default())
    }

    /// Generation for several prompts at once: prompt `i` (1, T_i) with image `i` of `images` (B, C, D, H, W).
    /// Each prompt's embeddings are built as for a batch of one (the image tokens right after its BOS), then
    /// the rows are left-padded into one batch ([`crate::generate`]). Returns each prompt's new tokens.
    pub fn generate_batch(
        &self,
        prompts: &[Tensor],
        images: Option<&Tensor>,
        opts: &GenerateOptions,
    ) -> Result<Vec<Vec<i64>>> {
        if let Some(images) = images {
            if images.size().first() != Some(&(prompts.len() as i64)) {
                return Err(ModelError::Shape {
                    name: "images (B, C, D, H, W), one per prompt".into(),
                    expected: vec![prompts.len() as i64],
                    got: images.size(),
                });
            }
        }
        let embeds = tch::no_grad(|| -> Result<Vec<Tensor>> {
            prompts
                .iter()
                .enumerate()
                .map(|(i, ids)| {
                    let image = images.map(|im| im.narrow(0, i as i64, 1));
                    self.input_embeds(ids, image.as_ref(), false)
                })
                .collect()
        })?;
        let same_length = embeds.windows(2).all(|w| w[0].size()[1] == w[1].size()[1]);
        let (embeds, mask) = left_pad_embeds(&embeds)?;
        // Without padding, no mask: the plain causal path is what a batch of one has always taken.
        let mask = (!same_length).then_some(mask);
        generate(&self.llm, &embeds, mask.as_ref(), opts)
    }

    /// [`Lamed::generate`], then, when the answer contains `[SEG]`, the mask logits (1, 1, D, H, W) that
    /// SegVol predicts from the state before it (the reference's `generate(seg_enable=True)`, which only
    /// looks at generated positions).
    pub fn generate_with_seg(
        &self,
        input_ids: &Tensor,
        images: &Tensor,
        max_new_tokens: usize,
        eos_ids: &[i64],
    ) -> Result<(Vec<i64>, Option<Tensor>)> {
        let generated = self.generate(input_ids, Some(images), max_new_tokens, eos_ids)?;
        let logits = self.seg_logits(input_ids, images, &generated)?;
        Ok((generated, logits))
    }

    /// The mask logits (1, 1, D, H, W) for an answer `generated` to prompt `input_ids` (1, T) about `images`
    /// (1, C, D, H, W), when the answer holds `[SEG]` (else `None`): SegVol prompted by the averaged last
    /// hidden states that predicted each generated `[SEG]`. The finished sequence is run once more to collect
    /// those states (the reference keeps them while decoding; the values are the same).
    pub fn seg_logits(
        &self,
        input_ids: &Tensor,
        images: &Tensor,
        generated: &[i64],
    ) -> Result<Option<Tensor>> {
        let seg = self
            .seg
            .as_ref()
            .ok_or_else(|| ModelError::Config("this LaMed has no segmentation module".into()))?;
        if !generated
            .iter()
            .skip(1)
            .any(|&id| id == self.cfg.tokens.seg)
        {
            return Ok(None);
        }
        tch::no_grad(|| -> Result<Option<Tensor>> {
            let prompt = self.input_embeds(input_ids, Some(images), false)?;
            let gen = Tensor::from_slice(generated)
                .view([1, -1])
                .to_device(self.device());
            let embeds = Tensor::cat(&[prompt, self.llm.embed_tokens(&gen)?], 1);
            let hidden = self.llm.forward_embeds(&embeds, None, None, false)?;
            // Only generated positions count: their hidden states and the ids that follow them.
            let p = input_ids.size()[1];
            let hidden = hidden.narrow(1, p, generated.len() as i64);
            let prompts = self.seg_prompts(seg, &hidden, &gen, false)?;
            Ok(Some(
                seg.seg_module
                    .forward_t(&images.to_kind(self.param_kind()), Some(&prompts), false)?
                    .logits,
            ))
        })
    }
}

/// HF's causal-LM loss: logits at t score labels at t + 1; [`IGNORE_INDEX`] skipped; mean over the scored
/// tokens (NaN when none is scored, as in HF); in f32.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    shifted_cross_entropy(logits, labels, Reduction::Mean)
}

/// [`causal_lm_loss`] summed instead of averaged over the scored tokens, for callers that normalise by a
/// count of their own (the worker divides by the scored tokens of a whole accumulation across ranks).
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    shifted_cross_entropy(logits, labels, Reduction::Sum)
}

fn shifted_cross_entropy(logits: &Tensor, labels: &Tensor, reduction: Reduction) -> Result<Tensor> {
    let s = logits.size();
    if s.len() != 3 || labels.size() != s[..2] {
        return Err(ModelError::Shape {
            name: "labels (B, T) for logits (B, T, V)".into(),
            expected: s.get(..2).map(<[i64]>::to_vec).unwrap_or_default(),
            got: labels.size(),
        });
    }
    let (b, t, v) = (s[0], s[1], s[2]);
    if t < 2 {
        return Err(ModelError::Input(
            "the LM loss needs at least 2 positions".into(),
        ));
    }
    let pred = logits
        .narrow(1, 0, t - 1)
        .to_kind(Kind::Float)
        .reshape([b * (t - 1), v]);
    let target = labels
        .narrow(1, 1, t - 1)
        .reshape([b * (t - 1)])
        .to_kind(Kind::Int64);
    Ok(pred.f_cross_entropy_loss(&target, None::<Tensor>, reduction, IGNORE_INDEX, 0.0)?)
}

/// A base checkpoint's (vocab, H) embedding or LM-head matrix grown for LaMed, as the reference's
/// `resize_token_embeddings(len(tokenizer))` + `initialize_vision_tokenizer` do: the first `keep` rows (the
/// tokenizer's entries), then `num_new` rows equal to their mean (computed in f32).
pub fn extend_token_rows(weight: &Tensor, keep: i64, num_new: i64) -> Result<Tensor> {
    let rows = weight.size().first().copied().unwrap_or(0);
    if weight.dim() != 2 || keep < 1 || keep > rows || num_new < 0 {
        return Err(ModelError::Input(format!(
            "cannot keep {keep} rows of a {:?} matrix and add {num_new}",
            weight.size()
        )));
    }
    let kept = weight.narrow(0, 0, keep);
    let mean = kept
        .to_kind(Kind::Float)
        .mean_dim(0, true, Kind::Float)
        .to_kind(weight.kind());
    let h = weight.size()[1];
    Ok(Tensor::cat(&[kept, mean.expand([num_new, h], false)], 0))
}

/// Converts a base LLM state dict (HF keys) into the LLM part of a LaMed checkpoint: `model.embed_tokens`
/// and `lm_head` (when not tied) get [`extend_token_rows`] for the 4 added tokens.
pub fn extend_llm_checkpoint(
    tensors: Vec<(String, Tensor)>,
    tokenizer_len: i64,
) -> Result<Vec<(String, Tensor)>> {
    let mut found = false;
    let out = tensors
        .into_iter()
        .map(|(k, t)| {
            if k == "model.embed_tokens.weight" || k == "lm_head.weight" {
                found |= k == "model.embed_tokens.weight";
                let t = extend_token_rows(&t, tokenizer_len, ADDED_TOKENS.len() as i64)
                    .map_err(|e| ModelError::Input(format!("{k}: {e}")))?;
                Ok((k, t))
            } else {
                Ok((k, t))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    if !found {
        return Err(ModelError::Input(
            "base checkpoint has no `model.embed_tokens.weight`".into(),
        ));
    }
    Ok(out)
}

/// End-of-text tokens when `tokenizer_config.json` names none: Llama-2 `</s>`, Llama-3 `<|end_of_text|>`,
/// word-level vocabularies in BERT's style `[SEP]`.
const EOS_TOKENS: [&str; 3] = ["</s>", "<|end_of_text|>", "[SEP]"];

/// The eos id LaMed's examples end with, as the reference sets it (LaMed/src/train/train.py:287-291):
/// Llama-3's `<|end_of_text|>` (128001, whatever its config names: the Instruct model's says `<|eot_id|>`),
/// else the tokenizer's own (`tokenizer_config.json`, e.g. Phi-3's `<|endoftext|>`), else [`EOS_TOKENS`].
pub fn eos_id(tokenizer: &crate::tokenizer::Tokenizer) -> Option<i64> {
    tokenizer
        .token_to_id("<|end_of_text|>")
        .or_else(|| tokenizer.config_eos_token().map(|(_, id)| id))
        .or_else(|| {
            EOS_TOKENS
                .into_iter()
                .find_map(|t| tokenizer.token_to_id(t))
        })
}

/// Makes a base LLM's tokenizer LaMed's, as the reference's training script does: `<im_patch>`, `<bx_start>`,
/// `<bx_end>` added as special tokens and `[SEG]` as a normal one, in this order (so their ids follow the base
/// vocabulary), and a pad token where there is none: unk where there is one (Llama-2, Phi-3), else eos
/// (Llama-3). Tokens already there are kept, so a tokenizer saved with a LaMed (a released checkpoint's)
/// passes through unchanged.
pub fn prepare_tokenizer(tokenizer: &mut crate::tokenizer::Tokenizer) -> Result<()> {
    let (special, normal) = ADDED_TOKENS.split_at(3);
    tokenizer.add_special_tokens(special)?;
    tokenizer.add_tokens(normal)?;
    if tokenizer.pad_token().is_none() {
        let unk = ["<unk>", "[UNK]"]
            .into_iter()
            .find(|t| tokenizer.token_to_id(t).is_some())
            .map(String::from);
        let eos = eos_id(tokenizer).and_then(|id| tokenizer.id_to_token(id));
        let pad = unk.or(eos).ok_or_else(|| {
            ModelError::Config(format!(
                "{}: the tokenizer has neither a pad, an unk nor an eos token",
                tokenizer.path().display()
            ))
        })?;
        tokenizer.set_pad_token(&pad)?;
    }
    Ok(())
}

/// The BOS a LaMed prompt starts with. The reference splices the image features over positions
/// `1..=num_image_tokens` and keeps position 0 (`LaMed/src/model/lamed_arch.py`): it assumes the tokenizer
/// puts exactly one BOS before the text, as Llama-2's, Llama-3's and Phi-3's `tokenizer.json` templates do.
/// A tokenizer without one would have the first `<im_patch>` kept as a token and the first word of the
/// question overwritten, silently; this refuses it.
pub fn prompt_bos(tokenizer: &crate::tokenizer::Tokenizer, im_patch: i64) -> Result<i64> {
    let ids = tokenizer.encode("<im_patch>", true)?;
    match ids.as_slice() {
        [bos, patch] if *patch == im_patch && *bos != im_patch => Ok(*bos),
        _ => Err(ModelError::Config(format!(
            "{}: `<im_patch>` encodes as {ids:?}; LaMed needs exactly one BOS token before the image tokens \
             (the image features replace the positions after it), so the tokenizer's template must add one",
            tokenizer.path().display()
        ))),
    }
}

/// One tokenised example with its labels, as the reference's datasets build it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LamedExample {
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub labels: Vec<i64>,
}

/// Builds an example from the tokenisation (with BOS) of `question` (`<im_patch>` x N + prompt) and of
/// `question + " " + answer`, as `CapDataset`/`VQADataset` do: truncate and right-pad to `max_len` with
/// `pad_id`; put `eos_id` at the first padding position (mask stays 0 there); labels = ids with the question
/// and every `pad_id` position set to -100, except that EOS is scored even when pad == eos.
pub fn build_example(
    question_ids: &[i64],
    full_ids: &[i64],
    max_len: usize,
    pad_id: i64,
    eos_id: i64,
) -> Result<LamedExample> {
    if max_len == 0 || full_ids.is_empty() {
        return Err(ModelError::Input("empty example or max_len 0".into()));
    }
    let valid = full_ids.len().min(max_len);
    let mut input_ids: Vec<i64> = full_ids[..valid].to_vec();
    input_ids.resize(max_len, pad_id);
    let mut attention_mask = vec![1i64; valid];
    attention_mask.resize(max_len, 0);
    if valid < max_len {
        input_ids[valid] = eos_id;
    }
    let question_len = question_ids.len().min(max_len);
    let mut labels = input_ids.clone();
    labels[..question_len].fill(IGNORE_INDEX);
    for l in labels.iter_mut() {
        if *l == pad_id {
            *l = IGNORE_INDEX;
        }
    }
    if pad_id == eos_id && valid < max_len {
        labels[valid] = eos_id;
    }
    Ok(LamedExample {
        input_ids,
        attention_mask,
        labels,
    })
}

/// Stacks examples of equal length into (B, T) `input_ids`, `attention_mask`, `labels` on `device`.
pub fn collate(examples: &[LamedExample], device: Device) -> Result<(Tensor, Tensor, Tensor)> {
    let t = examples
        .first()
        .map(|e| e.input_ids.len())
        .ok_or_else(|| ModelError::Input("empty batch".into()))?;
    if examples
        .iter()
        .any(|e| e.input_ids.len() != t || e.attention_mask.len() != t || e.labels.len() != t)
    {
        return Err(ModelError::Input(
            "examples of a batch must have one length".into(),
        ));
    }
    let stack = |f: &dyn Fn(&LamedExample) -> &Vec<i64>| {
        let flat: Vec<i64> = examples.iter().flat_map(|e| f(e).iter().copied()).collect();
        Tensor::from_slice(&flat)
            .view([examples.len() as i64, t as i64])
            .to_device(device)
    };
    Ok((
        stack(&|e| &e.input_ids),
        stack(&|e| &e.attention_mask),
        stack(&|e| &e.labels),
    ))
}
