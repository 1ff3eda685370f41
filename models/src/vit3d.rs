//! The 3-D Vision Transformer of M3D-CLIP and of M3D-LaMed's vision tower, in MONAI's `ViT` layout.
//!
//! Follows Dosovitskiy et al., "An Image is Worth 16x16 Words" (arXiv:2010.11929) as MONAI implements it
//! (`monai.networks.blocks.{PatchEmbeddingBlock, TransformerBlock, SABlock, MLPBlock}`, checked against
//! MONAI 1.6.1) and as M3D wraps it (`LaMed/src/model/multimodal_encoder/vit.py`): a "perceptron" patch
//! embedding (each patch flattened, then one Linear), a learned position embedding, an optional zero-initialised
//! CLS token prepended *after* the position embedding (so the CLS token has no position), pre-norm blocks with
//! exact-erf GELU MLPs, and a final LayerNorm.
//!
//! Parameter names are MONAI's, so `pretrained_ViT.bin` and the `vision_encoder.*` part of an M3D-CLIP
//! checkpoint load by name. MONAI >= 1.4 `TransformerBlock`s also carry a `norm_cross_attn` LayerNorm that is
//! never used without cross-attention (and so never trained); this model does not have it, and
//! [`monai_load_options`] drops those keys when reading a checkpoint saved by a recent MONAI.

use std::sync::Arc;

use tch::nn::Init;
use tch::{Kind, Tensor};

use crate::builder::VarBuilder;
use crate::error::{ModelError, Result};
use crate::layers::{checkpointed, dropout, LayerNorm, Linear};
use crate::weights::LoadOptions;

/// `nn.LayerNorm`'s default epsilon, which MONAI's ViT never changes.
const LN_EPS: f64 = 1e-5;

/// The ViT hyper-parameters, with the argument names of MONAI's `ViT` / M3D's `M3DCLIPConfig`.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct ViT3dConfig {
    pub in_channels: i64,
    /// Volume size (D, H, W) the position embedding is built for.
    pub img_size: [i64; 3],
    pub patch_size: [i64; 3],
    pub hidden_size: i64,
    pub mlp_dim: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub dropout_rate: f64,
    pub qkv_bias: bool,
    /// Prepend a CLS token (M3D's `classification=True`, with the classification head removed).
    pub cls_token: bool,
}

impl ViT3dConfig {
    /// The M3D-CLIP vision encoder: 1 channel, 32x256x256 volumes, 4x16x16 patches (8x16x16 = 2048 patches),
    /// ViT-B (768 hidden, 3072 MLP, 12 layers, 12 heads), no qkv bias, no dropout, with a CLS token.
    pub fn m3d_clip() -> Self {
        ViT3dConfig {
            in_channels: 1,
            img_size: [32, 256, 256],
            patch_size: [4, 16, 16],
            hidden_size: 768,
            mlp_dim: 3072,
            num_layers: 12,
            num_heads: 12,
            dropout_rate: 0.0,
            qkv_bias: false,
            cls_token: true,
        }
    }

    /// A tiny ViT on M3D's full 32x256x256 input for CPU recipes: 8x32x32 patches (grid 4x8x8 = 256
    /// patches, as many as M3D-LaMed's image tokens before pooling), width 64, 2 layers.
    pub fn tiny() -> Self {
        ViT3dConfig {
            img_size: [32, 256, 256],
            patch_size: [8, 32, 32],
            hidden_size: 64,
            mlp_dim: 128,
            ..Self::debug()
        }
    }

    /// A tiny configuration for tests: 8x16x16 volumes, 4x8x8 patches (2x2x2 = 8 patches), hidden 32.
    pub fn debug() -> Self {
        ViT3dConfig {
            in_channels: 1,
            img_size: [8, 16, 16],
            patch_size: [4, 8, 8],
            hidden_size: 32,
            mlp_dim: 64,
            num_layers: 2,
            num_heads: 4,
            dropout_rate: 0.0,
            qkv_bias: false,
            cls_token: true,
        }
    }

    /// Patches per axis.
    pub fn grid(&self) -> [i64; 3] {
        let mut g = [0; 3];
        for (i, g) in g.iter_mut().enumerate() {
            *g = self.img_size[i] / self.patch_size[i].max(1);
        }
        g
    }

    pub fn num_patches(&self) -> i64 {
        self.grid().iter().product()
    }

    /// Values in one flattened patch (the patch embedding's input width).
    pub fn patch_dim(&self) -> i64 {
        self.in_channels * self.patch_size.iter().product::<i64>()
    }

    /// Tokens the encoder outputs: the patches, plus one for the CLS token.
    pub fn num_tokens(&self) -> i64 {
        self.num_patches() + i64::from(self.cls_token)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(format!("ViT3d: {m}")));
        if self.in_channels < 1 || self.hidden_size < 1 || self.mlp_dim < 1 || self.num_layers < 0 {
            return bad(format!("sizes must be positive: {self:?}"));
        }
        if self.num_heads < 1 || self.hidden_size % self.num_heads != 0 {
            return bad(format!(
                "hidden_size {} is not divisible by num_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        for i in 0..3 {
            let (m, p) = (self.img_size[i], self.patch_size[i]);
            if p < 1 || m < p || m % p != 0 {
                return bad(format!(
                    "patch_size {:?} must divide img_size {:?} (the perceptron embedding needs whole patches)",
                    self.patch_size, self.img_size
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.dropout_rate) {
            return bad(format!(
                "dropout_rate {} is not in [0, 1]",
                self.dropout_rate
            ));
        }
        Ok(())
    }
}

/// Loading options for MONAI-saved ViT weights: strict, except that the unused `norm_cross_attn` LayerNorms
/// MONAI >= 1.4 puts in every block are dropped (older MONAI, as used for M3D's released weights, has none).
pub fn monai_load_options() -> LoadOptions {
    LoadOptions::default().ignore_unexpected(".norm_cross_attn.")
}

/// `PatchEmbeddingBlock(proj_type="perceptron", pos_embed_type="learnable")`.
#[derive(Debug)]
pub struct PatchEmbedding {
    /// `patch_embeddings.1`: index 0 of MONAI's `nn.Sequential` is the parameter-free `Rearrange`.
    pub proj: Linear,
    pub position_embeddings: Tensor,
    patch_size: [i64; 3],
    dropout: f64,
}

impl PatchEmbedding {
    pub fn new(vb: &VarBuilder, cfg: &ViT3dConfig) -> Result<Self> {
        let proj = Linear::new(
            &vb.pp("patch_embeddings.1"),
            cfg.patch_dim(),
            cfg.hidden_size,
            true,
        )?;
        // MONAI: trunc_normal_(std=0.02, a=-2, b=2); the truncation at 100 sigma never bites.
        let position_embeddings = vb.var(
            "position_embeddings",
            &[1, cfg.num_patches(), cfg.hidden_size],
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        Ok(PatchEmbedding {
            proj,
            position_embeddings,
            patch_size: cfg.patch_size,
            dropout: cfg.dropout_rate,
        })
    }

    /// (B, C, D, H, W) -> (B, N, hidden). Patches are numbered D-major, then H, then W, and each patch is
    /// flattened as (pd, ph, pw, c) — MONAI's `b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)`, whose
    /// "h w d" are simply the first, second and third spatial axes.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let s = x.size();
        let (b, c) = (s[0], s[1]);
        let [p0, p1, p2] = self.patch_size;
        let (g0, g1, g2) = (s[2] / p0, s[3] / p1, s[4] / p2);
        let patches = x
            .reshape([b, c, g0, p0, g1, p1, g2, p2])
            .permute([0, 2, 4, 6, 3, 5, 7, 1])
            .reshape([b, g0 * g1 * g2, p0 * p1 * p2 * c]);
        let emb = self.proj.forward_t(&patches, train) + &self.position_embeddings;
        dropout(emb, self.dropout, train)
    }
}

/// MONAI `SABlock` with a combined `qkv` projection and an output projection.
#[derive(Debug)]
pub struct SelfAttention {
    pub qkv: Linear,
    pub out_proj: Linear,
    num_heads: i64,
    dropout: f64,
}

impl SelfAttention {
    pub fn new(vb: &VarBuilder, cfg: &ViT3dConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(SelfAttention {
            qkv: Linear::new(&vb.pp("qkv"), h, 3 * h, cfg.qkv_bias)?,
            out_proj: Linear::new(&vb.pp("out_proj"), h, h, true)?,
            num_heads: cfg.num_heads,
            dropout: cfg.dropout_rate,
        })
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let (b, n, h) = x.size3().unwrap_or_default();
        let dh = h / self.num_heads;
        // The qkv output is laid out (qkv, head, head_dim): MONAI's "b h (qkv l d) -> qkv b l h d".
        let qkv = self
            .qkv
            .forward_t(x, train)
            .reshape([b, n, 3, self.num_heads, dh])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        // MONAI drops attention *weights* with the block's rate, which is what SDPA's dropout_p does.
        let p = if train { self.dropout } else { 0.0 };
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            p,
            false,
            (dh as f64).powf(-0.5),
            false,
        );
        let y = y.transpose(1, 2).reshape([b, n, h]);
        dropout(self.out_proj.forward_t(&y, train), self.dropout, train)
    }
}

/// MONAI `MLPBlock` ("vit" dropout mode: after the activation and after the second Linear).
#[derive(Debug)]
pub struct Mlp {
    pub linear1: Linear,
    pub linear2: Linear,
    dropout: f64,
}

impl Mlp {
    pub fn new(vb: &VarBuilder, cfg: &ViT3dConfig) -> Result<Self> {
        Ok(Mlp {
            linear1: Linear::new(&vb.pp("linear1"), cfg.hidden_size, cfg.mlp_dim, true)?,
            linear2: Linear::new(&vb.pp("linear2"), cfg.mlp_dim, cfg.hidden_size, true)?,
            dropout: cfg.dropout_rate,
        })
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        // MONAI's "GELU" is `nn.GELU()`: the exact erf form.
        let y = self.linear1.forward_t(x, train).gelu("none");
        let y = dropout(y, self.dropout, train);
        dropout(self.linear2.forward_t(&y, train), self.dropout, train)
    }
}

/// MONAI `TransformerBlock`: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
#[derive(Debug)]
pub struct TransformerBlock {
    pub norm1: LayerNorm,
    pub attn: SelfAttention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
}

impl TransformerBlock {
    pub fn new(vb: &VarBuilder, cfg: &ViT3dConfig) -> Result<Self> {
        Ok(TransformerBlock {
            norm1: LayerNorm::new(&vb.pp("norm1"), cfg.hidden_size, LN_EPS)?,
            attn: SelfAttention::new(&vb.pp("attn"), cfg)?,
            norm2: LayerNorm::new(&vb.pp("norm2"), cfg.hidden_size, LN_EPS)?,
            mlp: Mlp::new(&vb.pp("mlp"), cfg)?,
        })
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let x = x + self.attn.forward_t(&self.norm1.forward(x), train);
        &x + self.mlp.forward_t(&self.norm2.forward(&x), train)
    }
}

/// The encoder: patch embedding, CLS token, blocks, final norm.
#[derive(Debug)]
pub struct ViT3d {
    pub patch_embedding: PatchEmbedding,
    /// (1, 1, hidden), zero-initialised as in M3D.
    pub cls_token: Option<Tensor>,
    /// Shared, so that an activation checkpoint can hold its block until the backward pass re-runs it.
    pub blocks: Vec<Arc<TransformerBlock>>,
    pub norm: LayerNorm,
    cfg: ViT3dConfig,
    /// Re-run each block in the backward pass instead of keeping its activations (training forwards only).
    checkpointing: bool,
}

impl ViT3d {
    pub fn new(vb: &VarBuilder, cfg: &ViT3dConfig) -> Result<Self> {
        cfg.validate()?;
        let patch_embedding = PatchEmbedding::new(&vb.pp("patch_embedding"), cfg)?;
        let cls_token = if cfg.cls_token {
            Some(vb.var("cls_token", &[1, 1, cfg.hidden_size], Init::Const(0.0))?)
        } else {
            None
        };
        let blocks = (0..cfg.num_layers)
            .map(|i| TransformerBlock::new(&vb.pp("blocks").pp(i), cfg).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(&vb.pp("norm"), cfg.hidden_size, LN_EPS)?;
        Ok(ViT3d {
            patch_embedding,
            cls_token,
            blocks,
            norm,
            cfg: cfg.clone(),
            checkpointing: false,
        })
    }

    pub fn config(&self) -> &ViT3dConfig {
        &self.cfg
    }

    /// Activation checkpointing of the blocks in training forwards (`train.activation_checkpointing`): each
    /// block keeps only its input and is re-run in the backward pass.
    pub fn set_activation_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// `x`: (B, C, D, H, W) with the configured channels and size. Returns the last hidden state after the
    /// final norm, (B, [1 +] N, hidden), and the output of every block (before the final norm), as MONAI's
    /// `ViT` does. Panics (in libtorch) on a mis-shaped input; [`ViT3d::f_forward_t`] checks first.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> (Tensor, Vec<Tensor>) {
        let mut h = self.patch_embedding.forward_t(x, train);
        if let Some(cls) = &self.cls_token {
            let b = h.size()[0];
            let cls = cls
                .to_kind(h.kind())
                .expand([b, 1, self.cfg.hidden_size], false);
            h = Tensor::cat(&[cls, h], 1);
        }
        let mut hidden_states = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            h = if self.checkpointing && train {
                let block = Arc::clone(block);
                // Only a libtorch error inside the block fails here, where the plain block panics.
                checkpointed(&h, move |x| Ok(block.forward_t(x, true)))
                    .unwrap_or_else(|e| panic!("{e}"))
            } else {
                block.forward_t(&h, train)
            };
            hidden_states.push(h.shallow_clone());
        }
        (self.norm.forward(&h), hidden_states)
    }

    /// [`ViT3d::forward_t`] after checking the input shape, with a typed error naming it.
    pub fn f_forward_t(&self, x: &Tensor, train: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let s = x.size();
        let c = &self.cfg;
        let ok = s.len() == 5 && s[1] == c.in_channels && s[2..] == c.img_size[..] && s[0] > 0;
        if !ok {
            return Err(ModelError::Shape {
                name: "ViT3d input (B, C, D, H, W)".into(),
                expected: vec![
                    -1,
                    c.in_channels,
                    c.img_size[0],
                    c.img_size[1],
                    c.img_size[2],
                ],
                got: s,
            });
        }
        if !matches!(
            x.kind(),
            Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double
        ) {
            return Err(ModelError::Input(format!(
                "ViT3d input must be floating point, got {:?}",
                x.kind()
            )));
        }
        Ok(self.forward_t(x, train))
    }
}
