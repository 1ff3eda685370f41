//! M3D-CLIP: contrastive image-text pre-training of a 3-D ViT against BERT (Bai et al., "M3D: Advancing 3D
//! Medical Image Analysis with Multi-Modal Large Language Models", arXiv:2404.00578), following the reference
//! `LaMed/src/model/CLIP.py` (class `M3DCLIP`) and its distributed feature gathering (`utils/dist_utils.py`).
//!
//! Both encoders' outputs go through a Linear projection on every token, are L2-normalised, and token 0 is
//! kept (the ViT's CLS token; BERT's `[CLS]`). Logits are `scale * image @ text.T` over the features of
//! all ranks; the loss is the mean of the image->text and text->image cross-entropies.
//!
//! Checkpoint keys are the reference's: `vision_encoder.*` (MONAI ViT), `language_encoder.*` (a `BertModel`,
//! so no `bert.` prefix, with its unused pooler), `mm_vision_proj.*`, `mm_language_proj.*`, `logit_scale`
//! (a 0-d tensor). M3D-LaMed's `pretrained_ViT.bin` is the `vision_encoder.` part of such a checkpoint:
//! `KeyMap::select_prefix("vision_encoder.")` loads it into a bare [`ViT3d`].

use tch::nn::Init;
use tch::{Kind, Reduction, Tensor};

use crate::bert::{Bert, BertConfig};
use crate::builder::VarBuilder;
use crate::error::{ModelError, Result};
use crate::layers::{CheckedIds, Linear};
use crate::vit3d::{ViT3d, ViT3dConfig};
use crate::weights::LoadOptions;

/// How the learnable `logit_scale` parameter enters the logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogitScale {
    /// `logits = logit_scale * sim`, the parameter used as is — what M3D's `CLIP.py` does. Initialised to
    /// ln(1/0.07) ~= 2.66, this is a temperature of ~0.38 rather than CLIP's 0.07, and nothing keeps it
    /// positive. **The default**: the released M3D-CLIP weights were trained this way, their `logit_scale`
    /// value only means something under this rule, and reproducing M3D's training curves needs it.
    #[default]
    Raw,
    /// `logits = exp(logit_scale) * sim`, as in OpenAI CLIP / open_clip (initial temperature 0.07, always
    /// positive). Opt-in for new training runs; not compatible with the released weights' scale.
    Exp,
}

/// Collects a tensor from every data-parallel rank.
pub trait Gather {
    /// Concatenates every rank's `t` along dim 0, in rank order. Must be differentiable with respect to the
    /// local `t` (like `torch.distributed.nn.all_gather`), so the loss over all ranks trains this rank.
    fn all_gather(&self, t: &Tensor) -> Tensor;
    fn rank(&self) -> i64;
    fn world_size(&self) -> i64;
}

/// One process: gathering is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Gather for SingleProcess {
    fn all_gather(&self, t: &Tensor) -> Tensor {
        t.shallow_clone()
    }
    fn rank(&self) -> i64 {
        0
    }
    fn world_size(&self) -> i64 {
        1
    }
}

/// The M3D-CLIP hyper-parameters.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct M3dClipConfig {
    pub vision: ViT3dConfig,
    pub text: BertConfig,
    #[serde(default)]
    pub logit_scale: LogitScale,
    /// The reference's `local_loss`: each rank scores only its own images and texts against everything
    /// gathered (B x B*W logits, labels `rank*B + arange(B)`), instead of the full B*W x B*W matrix with
    /// labels `arange(B*W)` (the reference default, `local_loss=False`). The reference's collator passes
    /// `arange(B)` in this mode, which is right only on rank 0; the rank offset here is open_clip's.
    #[serde(default)]
    pub local_loss: bool,
    /// Text length (the reference tokenises to 512 with `padding="max_length"`).
    #[serde(default = "default_max_text_len")]
    pub max_text_len: i64,
}

fn default_max_text_len() -> i64 {
    512
}

/// The fields of the reference's `M3DCLIPConfig` `config.json` that shape the model.
#[derive(serde::Deserialize)]
struct ReferenceConfig {
    #[serde(default = "ref_in_channels")]
    in_channels: i64,
    #[serde(default = "ref_img_size")]
    img_size: [i64; 3],
    #[serde(default = "ref_patch_size")]
    patch_size: [i64; 3],
    #[serde(default = "ref_hidden")]
    hidden_size: i64,
    #[serde(default = "ref_mlp")]
    mlp_dim: i64,
    #[serde(default = "ref_layers")]
    num_layers: i64,
    #[serde(default = "ref_layers")]
    num_heads: i64,
    #[serde(default = "ref_pos_embed")]
    pos_embed: String,
    #[serde(default)]
    dropout_rate: f64,
    #[serde(default = "ref_spatial_dims")]
    spatial_dims: i64,
    #[serde(default = "ref_vocab")]
    vocab_size: i64,
    #[serde(default)]
    local_loss: bool,
}

fn ref_in_channels() -> i64 {
    1
}
fn ref_img_size() -> [i64; 3] {
    [32, 256, 256]
}
fn ref_patch_size() -> [i64; 3] {
    [4, 16, 16]
}
fn ref_hidden() -> i64 {
    768
}
fn ref_mlp() -> i64 {
    3072
}
fn ref_layers() -> i64 {
    12
}
fn ref_pos_embed() -> String {
    "perceptron".into()
}
fn ref_spatial_dims() -> i64 {
    3
}
fn ref_vocab() -> i64 {
    30522
}

impl M3dClipConfig {
    /// The published M3D-CLIP: the M3D ViT-B/3-D and `bert-base-uncased`, raw logit scale, global loss.
    pub fn m3d() -> Self {
        M3dClipConfig {
            vision: ViT3dConfig::m3d_clip(),
            text: BertConfig::bert_base_uncased(),
            logit_scale: LogitScale::Raw,
            local_loss: false,
            max_text_len: 512,
        }
    }

    /// A tiny M3D-CLIP for CPU recipes: [`ViT3dConfig::tiny`] and a 2-layer BERT of width 64 over a
    /// vocabulary of `vocab_size` (a word-level one built from the captions), texts of up to 32 tokens.
    /// Its logit scale is [`LogitScale::Exp`] (temperature 0.07): under the reference's raw scale logits stay
    /// within ±2.66, and a tiny model trained from scratch does not leave its initial state, where every
    /// image (and every text) has nearly the same feature, within the few hundred steps of a CPU recipe.
    pub fn tiny(vocab_size: i64) -> Self {
        M3dClipConfig {
            vision: ViT3dConfig::tiny(),
            text: BertConfig {
                vocab_size,
                hidden_size: 64,
                intermediate_size: 128,
                ..BertConfig::debug()
            },
            max_text_len: 32,
            logit_scale: LogitScale::Exp,
            ..Self::debug()
        }
    }

    /// A tiny configuration for tests: the debug ViT (hidden 32) and the debug BERT (hidden 32).
    pub fn debug() -> Self {
        M3dClipConfig {
            vision: ViT3dConfig::debug(),
            text: BertConfig::debug(),
            logit_scale: LogitScale::Raw,
            local_loss: false,
            max_text_len: 16,
        }
    }

    /// Reads the reference's `config.json` (`model_type: m3d_clip`). Its text encoder is the BERT named by
    /// `language_model_name_or_path`, whose own config is `text` (bert-base-uncased for M3D).
    pub fn from_reference_config(path: &std::path::Path, text: BertConfig) -> Result<Self> {
        let r: ReferenceConfig = crate::error::read_json(path)?;
        let bad = |m: String| Err(ModelError::Config(format!("{}: {m}", path.display())));
        if r.pos_embed != "perceptron" || r.spatial_dims != 3 {
            return bad(format!(
                "only the 3-D perceptron patch embedding is supported (pos_embed `{}`, spatial_dims {})",
                r.pos_embed, r.spatial_dims
            ));
        }
        if r.vocab_size != text.vocab_size {
            return bad(format!(
                "vocab_size {} differs from the text encoder's {}",
                r.vocab_size, text.vocab_size
            ));
        }
        let cfg = M3dClipConfig {
            vision: ViT3dConfig {
                in_channels: r.in_channels,
                img_size: r.img_size,
                patch_size: r.patch_size,
                hidden_size: r.hidden_size,
                mlp_dim: r.mlp_dim,
                num_layers: r.num_layers,
                num_heads: r.num_heads,
                dropout_rate: r.dropout_rate,
                qkv_bias: false,
                cls_token: true,
            },
            text,
            logit_scale: LogitScale::Raw,
            local_loss: r.local_loss,
            max_text_len: 512,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.vision.validate()?;
        self.text.validate()?;
        if self.vision.hidden_size != self.text.hidden_size {
            // The reference sizes both projections Linear(hidden, hidden) from the ViT's hidden size.
            return Err(ModelError::Config(format!(
                "M3D-CLIP: vision hidden_size {} != text hidden_size {} (both projections are \
                 Linear(hidden, hidden))",
                self.vision.hidden_size, self.text.hidden_size
            )));
        }
        if !self.vision.cls_token {
            return Err(ModelError::Config(
                "M3D-CLIP: the image feature is the CLS token; vision.cls_token must be true"
                    .into(),
            ));
        }
        if self.max_text_len < 1 || self.max_text_len > self.text.max_position_embeddings {
            return Err(ModelError::Config(format!(
                "M3D-CLIP: max_text_len {} is not in [1, max_position_embeddings {}]",
                self.max_text_len, self.text.max_position_embeddings
            )));
        }
        Ok(())
    }
}

/// Everything a CLIP step computes.
#[derive(Debug)]
pub struct ClipOutput {
    /// (B, D) local image features (L2-normalised CLS tokens).
    pub image_features: Tensor,
    /// (B, D) local text features.
    pub text_features: Tensor,
    /// Global loss: (B*W, B*W); local loss: (B, B*W).
    pub logits_per_image: Tensor,
    pub logits_per_text: Tensor,
    /// The reference's `logits`: `(logits_per_image + logits_per_text) / 2` (used for retrieval accuracy).
    pub logits: Tensor,
    /// The class of each row of the logits.
    pub labels: Tensor,
    /// Scalar loss.
    pub loss: Tensor,
}

/// The M3D-CLIP model.
#[derive(Debug)]
pub struct M3dClip {
    pub vision_encoder: ViT3d,
    pub language_encoder: Bert,
    pub mm_vision_proj: Linear,
    pub mm_language_proj: Linear,
    /// 0-d parameter, initialised to ln(1/0.07).
    pub logit_scale: Tensor,
    cfg: M3dClipConfig,
}

/// Loading options for M3D-CLIP checkpoints: strict, except the buffers and unused LayerNorms recent
/// MONAI / old transformers versions add (see [`crate::vit3d::monai_load_options`],
/// [`crate::bert::hf_load_options`]).
pub fn load_options() -> LoadOptions {
    LoadOptions::default()
        .ignore_unexpected(".norm_cross_attn.")
        .ignore_unexpected("language_encoder.embeddings.position_ids")
        .ignore_unexpected("language_encoder.embeddings.token_type_ids")
}

impl M3dClip {
    pub fn new(vb: &VarBuilder, cfg: &M3dClipConfig) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.vision.hidden_size;
        Ok(M3dClip {
            vision_encoder: ViT3d::new(&vb.pp("vision_encoder"), &cfg.vision)?,
            language_encoder: Bert::new(&vb.pp("language_encoder"), &cfg.text)?,
            mm_vision_proj: Linear::new(&vb.pp("mm_vision_proj"), h, h, true)?,
            mm_language_proj: Linear::new(&vb.pp("mm_language_proj"), h, h, true)?,
            logit_scale: vb.var("logit_scale", &[], Init::Const((1.0f64 / 0.07).ln()))?,
            cfg: cfg.clone(),
        })
    }

    /// Activation checkpointing (`train.activation_checkpointing`) of the vision encoder's blocks and the text
    /// encoder's layers: each keeps only its input in a training forward and is re-run in the backward pass,
    /// with the same gradients.
    pub fn set_activation_checkpointing(&mut self, on: bool) {
        self.vision_encoder.set_activation_checkpointing(on);
        self.language_encoder.set_activation_checkpointing(on);
    }

    pub fn config(&self) -> &M3dClipConfig {
        &self.cfg
    }

    /// (B, 1 + N, D): every token projected and L2-normalised (the reference's `encode_image`).
    pub fn encode_image(&self, images: &Tensor, train: bool) -> Tensor {
        let (last, _) = self.vision_encoder.forward_t(images, train);
        l2_normalize(&self.mm_vision_proj.forward_t(&last, train))
    }

    /// (B, T, D): every token projected and L2-normalised (the reference's `encode_text`).
    pub fn encode_text(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Tensor {
        let last = self
            .language_encoder
            .forward_t(input_ids, attention_mask, None, train);
        l2_normalize(&self.mm_language_proj.forward_t(&last, train))
    }

    /// The multiplier of the cosine similarities, per [`LogitScale`].
    pub fn scale(&self) -> Tensor {
        match self.cfg.logit_scale {
            LogitScale::Raw => self.logit_scale.shallow_clone(),
            LogitScale::Exp => self.logit_scale.exp(),
        }
    }

    /// One contrastive step on this rank's batch: images (B, C, D, H, W), input_ids and attention_mask (B, T).
    pub fn forward_t(
        &self,
        images: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        gather: &dyn Gather,
        train: bool,
    ) -> Result<ClipOutput> {
        self.forward_with(images, input_ids, attention_mask, None, gather, train)
    }

    /// [`M3dClip::forward_t`] of `input_ids` checked on the host ([`CheckedIds`]), so that nothing is read
    /// back from the device between the encoders (on a GPU that read would drain the vision encoder's queue).
    pub fn forward_t_checked(
        &self,
        images: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        checked: &CheckedIds,
        gather: &dyn Gather,
        train: bool,
    ) -> Result<ClipOutput> {
        self.forward_with(
            images,
            input_ids,
            attention_mask,
            Some(checked),
            gather,
            train,
        )
    }

    /// Only the scalar loss of [`M3dClip::forward_t_checked`].
    pub fn forward_loss_checked(
        &self,
        images: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        checked: &CheckedIds,
        gather: &dyn Gather,
        train: bool,
    ) -> Result<Tensor> {
        Ok(self
            .forward_with(
                images,
                input_ids,
                attention_mask,
                Some(checked),
                gather,
                train,
            )?
            .loss)
    }

    fn forward_with(
        &self,
        images: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        checked: Option<&CheckedIds>,
        gather: &dyn Gather,
        train: bool,
    ) -> Result<ClipOutput> {
        let (vision, _) = self.vision_encoder.f_forward_t(images, train)?;
        let text = match checked {
            Some(c) => self.language_encoder.f_forward_t_checked(
                input_ids,
                attention_mask,
                None,
                c,
                train,
            )?,
            None => self
                .language_encoder
                .f_forward_t(input_ids, attention_mask, None, train)?,
        };
        let (bi, bt) = (vision.size()[0], text.size()[0]);
        if bi != bt {
            return Err(ModelError::Input(format!(
                "M3D-CLIP: {bi} images but {bt} texts"
            )));
        }
        // Projection and normalisation act per token, so taking token 0 first gives the reference's
        // `encode_*(..)[:, 0]` (values and gradients) without projecting the other 2048 tokens.
        let image_features =
            l2_normalize(&self.mm_vision_proj.forward_t(&vision.select(1, 0), train));
        let text_features =
            l2_normalize(&self.mm_language_proj.forward_t(&text.select(1, 0), train));
        Ok(self.contrastive(image_features, text_features, gather))
    }

    /// Only the scalar loss of [`M3dClip::forward_t`].
    pub fn forward_loss(
        &self,
        images: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        gather: &dyn Gather,
        train: bool,
    ) -> Result<Tensor> {
        Ok(self
            .forward_t(images, input_ids, attention_mask, gather, train)?
            .loss)
    }

    /// The loss of [`M3dClip::forward_t`] from already-computed local features (B, D).
    pub fn contrastive(
        &self,
        image_features: Tensor,
        text_features: Tensor,
        gather: &dyn Gather,
    ) -> ClipOutput {
        let b = image_features.size()[0];
        let all_image = gather.all_gather(&image_features);
        let all_text = gather.all_gather(&text_features);
        let scale = self.scale();
        let device = image_features.device();
        let (logits_per_image, logits_per_text, labels) = if self.cfg.local_loss {
            let lpi = image_features.matmul(&all_text.tr()) * &scale;
            let lpt = text_features.matmul(&all_image.tr()) * &scale;
            let labels = Tensor::arange(b, (Kind::Int64, device)) + gather.rank() * b;
            (lpi, lpt, labels)
        } else {
            let lpi = all_image.matmul(&all_text.tr()) * &scale;
            let lpt = lpi.tr();
            let n = all_image.size()[0];
            (lpi, lpt, Tensor::arange(n, (Kind::Int64, device)))
        };
        let ce = |logits: &Tensor| {
            logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
                &labels,
                None,
                Reduction::Mean,
                -100,
                0.0,
            )
        };
        let loss = (ce(&logits_per_image) + ce(&logits_per_text)) / 2.0;
        let logits = (&logits_per_image + &logits_per_text) / 2.0;
        ClipOutput {
            image_features,
            text_features,
            logits_per_image,
            logits_per_text,
            logits,
            labels,
            loss,
        }
    }
}

/// `F.normalize(x, dim=-1)`: x / max(||x||, 1e-12).
fn l2_normalize(x: &Tensor) -> Tensor {
    let norm = x
        .norm_scalaropt_dim(2, [-1i64].as_slice(), true)
        .clamp_min(1e-12);
    x / norm
}
