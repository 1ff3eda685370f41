//! The SegVol-style promptable 3-D mask decoder of M3D-LaMed.
//!
//! Follows SegVol (Du et al., arXiv 2311.13385) as M3D builds it: `LaMed/src/model/segmentation_module/
//! {builder,segvol}.py` and `segment_anything_volumetric/{build_sam.py, modeling/{mask_decoder,
//! prompt_encoder}.py}` in BAAI-DCAI/M3D, with `modeling/transformer.py` from BAAI-DCAI/SegVol (SAM's
//! two-way transformer, Kirillov et al., arXiv 2304.02643, lifted to volumes). Parameter names are the
//! reference module's (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`; `model.seg_module.*` inside
//! LaMed), so published weights load by name.
//!
//! Data flow, for the text-prompted path LaMed uses (points, boxes and mask prompts are never given there):
//! - image encoder: a MONAI ViT without CLS token -> (B, C, d, h, w) feature grid (8x16x16 for M3D);
//! - prompt encoder: the text embedding (LaMed's projected `[SEG]` state, width C) is the only sparse token;
//!   the dense prompt is the learned `no_mask_embed` broadcast over the grid; `get_dense_pe` is SAM's random
//!   Fourier positional encoding of the grid cell centres;
//! - mask decoder: [iou token, 4 mask tokens, text token] through the two-way transformer (depth 2,
//!   cross-attention at half width), the image grid upscaled x4 by two transposed convolutions (with an
//!   `nn.LayerNorm` over the *whole* (C/4, 2d, 2h, 2w) map between them), mask = hypernetwork(mask token 0) .
//!   upscaled map **plus** the text embedding projected by `txt_align_upscaled_embedding` . upscaled map
//!   (SegVol's text-similarity term); only the first mask is kept (`multimask_output=False`);
//! - the low-resolution logits (32x64x64) are resized trilinearly (align_corners=False) to the image size.
//!
//! The prompt encoder's point/box embeddings and its `mask_downscaling` stack (2-D convolutions in the
//! reference, which could not run on volumes) are created so checkpoints load, but are not used.

use serde::{Deserialize, Serialize};
use tch::nn::Init;
use tch::{Kind, Reduction, Tensor};

use crate::builder::{torch_default_init, VarBuilder};
use crate::error::{ModelError, Result};
use crate::layers::{LayerNorm, Linear};
use crate::vit3d::{ViT3d, ViT3dConfig};

/// `nn.LayerNorm`'s default epsilon (every norm of the decoder uses it).
const LN_EPS: f64 = 1e-5;
/// `nn.Embedding`'s initialisation.
const STANDARD_NORMAL: Init = Init::Randn {
    mean: 0.0,
    stdev: 1.0,
};

fn default_mask_in_chans() -> i64 {
    16
}
fn default_num_multimask_outputs() -> i64 {
    3
}
fn default_transformer_depth() -> i64 {
    2
}
fn default_transformer_mlp_dim() -> i64 {
    2048
}
fn default_transformer_num_heads() -> i64 {
    8
}
fn default_downsample_rate() -> i64 {
    2
}
fn default_iou_head_depth() -> i64 {
    3
}
fn default_iou_head_hidden_dim() -> i64 {
    256
}

/// SegVol's hyper-parameters. The reference hard-codes all but the image and patch size (`_build_sam`);
/// the defaults are its values. The transformer width is the image encoder's `hidden_size` (768), and the
/// text embedding must have that width too (it joins the prompt tokens).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegVolConfig {
    /// MONAI ViT, `classification=False` (no CLS token), "perceptron" patch embedding.
    pub image_encoder: ViT3dConfig,
    #[serde(default = "default_mask_in_chans")]
    pub mask_in_chans: i64,
    #[serde(default = "default_num_multimask_outputs")]
    pub num_multimask_outputs: i64,
    #[serde(default = "default_transformer_depth")]
    pub transformer_depth: i64,
    #[serde(default = "default_transformer_mlp_dim")]
    pub transformer_mlp_dim: i64,
    #[serde(default = "default_transformer_num_heads")]
    pub transformer_num_heads: i64,
    #[serde(default = "default_downsample_rate")]
    pub attention_downsample_rate: i64,
    #[serde(default = "default_iou_head_depth")]
    pub iou_head_depth: i64,
    #[serde(default = "default_iou_head_hidden_dim")]
    pub iou_head_hidden_dim: i64,
}

impl SegVolConfig {
    /// SegVol as M3D-LaMed builds it for 32x256x256 volumes and 4x16x16 patches: ViT-B encoder (768, MLP
    /// 3072, 12 layers, 12 heads, no qkv bias), two-way transformer depth 2 / MLP 2048 / 8 heads, IoU head
    /// 3 x 256; low-res masks 32x64x64.
    pub fn m3d() -> Self {
        Self::for_image([32, 256, 256], [4, 16, 16])
    }

    /// The reference builder's configuration for another image/patch size (`config.image_size`,
    /// `config.patch_size` are the only inputs it takes).
    pub fn for_image(img_size: [i64; 3], patch_size: [i64; 3]) -> Self {
        SegVolConfig {
            // The ViT-B shape of the M3D-CLIP encoder, without a CLS token (MONAI's `classification=False`).
            image_encoder: ViT3dConfig {
                img_size,
                patch_size,
                cls_token: false,
                ..ViT3dConfig::m3d_clip()
            },
            mask_in_chans: 16,
            num_multimask_outputs: 3,
            transformer_depth: 2,
            transformer_mlp_dim: 2048,
            transformer_num_heads: 8,
            attention_downsample_rate: 2,
            iou_head_depth: 3,
            iou_head_hidden_dim: 256,
        }
    }

    /// A tiny SegVol for tests: 8x32x32 volumes, 4x8x8 patches (grid 2x4x4), width 32.
    pub fn debug() -> Self {
        SegVolConfig {
            image_encoder: ViT3dConfig {
                img_size: [8, 32, 32],
                cls_token: false,
                ..ViT3dConfig::debug()
            },
            transformer_mlp_dim: 48,
            transformer_num_heads: 4,
            iou_head_hidden_dim: 16,
            ..Self::m3d()
        }
    }

    /// Transformer / prompt width (= image encoder width).
    pub fn embed_dim(&self) -> i64 {
        self.image_encoder.hidden_size
    }

    /// The image encoder's feature grid (d, h, w).
    pub fn grid(&self) -> [i64; 3] {
        self.image_encoder.grid()
    }

    /// Size of the decoder's low-resolution masks (4x the grid).
    pub fn low_res_size(&self) -> [i64; 3] {
        self.grid().map(|g| 4 * g)
    }

    pub fn validate(&self) -> Result<()> {
        self.image_encoder.validate()?;
        let bad = |m: String| Err(ModelError::Config(format!("SegVol: {m}")));
        let d = self.embed_dim();
        if self.image_encoder.cls_token {
            return bad("the image encoder has no CLS token (classification=False)".into());
        }
        if d % 8 != 0 {
            return bad(format!(
                "width {d} must be divisible by 8 (upscaling to C/4, C/8)"
            ));
        }
        if self.attention_downsample_rate < 1 || d % self.attention_downsample_rate != 0 {
            return bad(format!(
                "attention_downsample_rate {} must divide width {d}",
                self.attention_downsample_rate
            ));
        }
        let internal = d / self.attention_downsample_rate;
        if self.transformer_num_heads < 1 || internal % self.transformer_num_heads != 0 {
            return bad(format!(
                "transformer_num_heads {} must divide the attention widths {d} and {internal}",
                self.transformer_num_heads
            ));
        }
        if self.num_multimask_outputs < 0 || self.iou_head_depth < 1 || self.transformer_depth < 0 {
            return bad(format!("invalid decoder sizes: {self:?}"));
        }
        if self.mask_in_chans < 4 || self.mask_in_chans % 4 != 0 {
            return bad(format!(
                "mask_in_chans {} must be a positive multiple of 4",
                self.mask_in_chans
            ));
        }
        Ok(())
    }
}

/// SAM's `MLP`: `num_layers` Linear layers (`layers.N`), ReLU between them.
#[derive(Debug)]
pub struct Mlp {
    pub layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(vb: &VarBuilder, input: i64, hidden: i64, output: i64, depth: i64) -> Result<Self> {
        let layers = (0..depth)
            .map(|i| {
                let d_in = if i == 0 { input } else { hidden };
                let d_out = if i == depth - 1 { output } else { hidden };
                Linear::new(&vb.pp("layers").pp(i), d_in, d_out, true)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Mlp { layers })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let last = self.layers.len().saturating_sub(1);
        let mut x = xs.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x);
            if i < last {
                x = x.relu();
            }
        }
        x
    }
}

/// SAM's `Attention` with separate q/k/v projections to `width / downsample_rate`.
#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    num_heads: i64,
}

impl Attention {
    pub fn new(vb: &VarBuilder, dim: i64, num_heads: i64, downsample_rate: i64) -> Result<Self> {
        let internal = dim / downsample_rate;
        Ok(Attention {
            q_proj: Linear::new(&vb.pp("q_proj"), dim, internal, true)?,
            k_proj: Linear::new(&vb.pp("k_proj"), dim, internal, true)?,
            v_proj: Linear::new(&vb.pp("v_proj"), dim, internal, true)?,
            out_proj: Linear::new(&vb.pp("out_proj"), internal, dim, true)?,
            num_heads,
        })
    }

    fn heads(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        x.reshape([s[0], s[1], self.num_heads, s[2] / self.num_heads])
            .transpose(1, 2)
    }

    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let q = self.heads(&self.q_proj.forward(q));
        let k = self.heads(&self.k_proj.forward(k));
        let v = self.heads(&self.v_proj.forward(v));
        let s = q.size();
        let scale = (s[3] as f64).powf(-0.5);
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            scale,
            false,
        );
        let out = out.transpose(1, 2).reshape([s[0], s[2], s[1] * s[3]]);
        self.out_proj.forward(&out)
    }
}

/// SAM's `MLPBlock` (`lin1`, ReLU, `lin2`), the two-way transformer's feed-forward.
#[derive(Debug)]
pub struct MlpBlock {
    pub lin1: Linear,
    pub lin2: Linear,
}

impl MlpBlock {
    pub fn new(vb: &VarBuilder, dim: i64, mlp_dim: i64) -> Result<Self> {
        Ok(MlpBlock {
            lin1: Linear::new(&vb.pp("lin1"), dim, mlp_dim, true)?,
            lin2: Linear::new(&vb.pp("lin2"), mlp_dim, dim, true)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.lin2.forward(&self.lin1.forward(xs).relu())
    }
}

/// One block of the two-way transformer: token self-attention, token->image cross-attention, token MLP,
/// image->token cross-attention, each followed by a post-norm.
#[derive(Debug)]
pub struct TwoWayAttentionBlock {
    pub self_attn: Attention,
    pub norm1: LayerNorm,
    pub cross_attn_token_to_image: Attention,
    pub norm2: LayerNorm,
    pub mlp: MlpBlock,
    pub norm3: LayerNorm,
    pub norm4: LayerNorm,
    pub cross_attn_image_to_token: Attention,
    skip_first_layer_pe: bool,
}

impl TwoWayAttentionBlock {
    pub fn new(vb: &VarBuilder, cfg: &SegVolConfig, skip_first_layer_pe: bool) -> Result<Self> {
        let d = cfg.embed_dim();
        let heads = cfg.transformer_num_heads;
        let rate = cfg.attention_downsample_rate;
        Ok(TwoWayAttentionBlock {
            self_attn: Attention::new(&vb.pp("self_attn"), d, heads, 1)?,
            norm1: LayerNorm::new(&vb.pp("norm1"), d, LN_EPS)?,
            cross_attn_token_to_image: Attention::new(
                &vb.pp("cross_attn_token_to_image"),
                d,
                heads,
                rate,
            )?,
            norm2: LayerNorm::new(&vb.pp("norm2"), d, LN_EPS)?,
            mlp: MlpBlock::new(&vb.pp("mlp"), d, cfg.transformer_mlp_dim)?,
            norm3: LayerNorm::new(&vb.pp("norm3"), d, LN_EPS)?,
            norm4: LayerNorm::new(&vb.pp("norm4"), d, LN_EPS)?,
            cross_attn_image_to_token: Attention::new(
                &vb.pp("cross_attn_image_to_token"),
                d,
                heads,
                rate,
            )?,
            skip_first_layer_pe,
        })
    }

    /// Returns the updated (queries, keys).
    pub fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        query_pe: &Tensor,
        key_pe: &Tensor,
    ) -> (Tensor, Tensor) {
        // The first layer replaces the queries by their self-attention (no residual): at that point the
        // queries *are* the positional prompt embeddings.
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries, queries, queries)
        } else {
            let q = queries + query_pe;
            queries + self.self_attn.forward(&q, &q, queries)
        };
        let queries = self.norm1.forward(&queries);

        let q = &queries + query_pe;
        let k = keys + key_pe;
        let queries = &queries + self.cross_attn_token_to_image.forward(&q, &k, keys);
        let queries = self.norm2.forward(&queries);

        let queries = &queries + self.mlp.forward(&queries);
        let queries = self.norm3.forward(&queries);

        let q = &queries + query_pe;
        let k = keys + key_pe;
        let keys = keys + self.cross_attn_image_to_token.forward(&k, &q, &queries);
        let keys = self.norm4.forward(&keys);
        (queries, keys)
    }
}

/// SAM's `TwoWayTransformer`.
#[derive(Debug)]
pub struct TwoWayTransformer {
    pub layers: Vec<TwoWayAttentionBlock>,
    pub final_attn_token_to_image: Attention,
    pub norm_final_attn: LayerNorm,
}

impl TwoWayTransformer {
    pub fn new(vb: &VarBuilder, cfg: &SegVolConfig) -> Result<Self> {
        let layers = (0..cfg.transformer_depth)
            .map(|i| TwoWayAttentionBlock::new(&vb.pp("layers").pp(i), cfg, i == 0))
            .collect::<Result<Vec<_>>>()?;
        Ok(TwoWayTransformer {
            layers,
            final_attn_token_to_image: Attention::new(
                &vb.pp("final_attn_token_to_image"),
                cfg.embed_dim(),
                cfg.transformer_num_heads,
                cfg.attention_downsample_rate,
            )?,
            norm_final_attn: LayerNorm::new(&vb.pp("norm_final_attn"), cfg.embed_dim(), LN_EPS)?,
        })
    }

    /// `image`, `image_pe`: (B, C, d, h, w); `tokens`: (B, T, C). Returns (tokens (B, T, C), image (B, dhw, C)).
    pub fn forward(&self, image: &Tensor, image_pe: &Tensor, tokens: &Tensor) -> (Tensor, Tensor) {
        let keys0 = image.flatten(2, -1).permute([0, 2, 1]);
        let key_pe = image_pe.flatten(2, -1).permute([0, 2, 1]);
        let mut queries = tokens.shallow_clone();
        let mut keys = keys0;
        for layer in &self.layers {
            (queries, keys) = layer.forward(&queries, &keys, tokens, &key_pe);
        }
        let q = &queries + tokens;
        let k = &keys + &key_pe;
        let queries = &queries + self.final_attn_token_to_image.forward(&q, &k, &keys);
        (self.norm_final_attn.forward(&queries), keys)
    }
}

/// SAM's `PositionEmbeddingRandom`: Fourier features of coordinates in [-1, 1] with a fixed random
/// (3, C/2) frequency matrix (a persistent buffer, saved with the weights).
#[derive(Debug)]
pub struct PositionEmbeddingRandom {
    pub positional_encoding_gaussian_matrix: Tensor,
}

impl PositionEmbeddingRandom {
    pub fn new(vb: &VarBuilder, num_pos_feats: i64) -> Result<Self> {
        // Reference: scale (1.0) * randn. Only 3 x C/2 values, so shape-only builds may allocate it.
        let init = Tensor::f_randn([3, num_pos_feats], (vb.kind(), vb.device()))?;
        Ok(PositionEmbeddingRandom {
            positional_encoding_gaussian_matrix: vb
                .buffer("positional_encoding_gaussian_matrix", init)?,
        })
    }

    /// The encoding of the centres of a (d, h, w) grid: (C, d, h, w).
    pub fn forward(&self, size: [i64; 3]) -> Tensor {
        let g = &self.positional_encoding_gaussian_matrix;
        let opts = (g.kind(), g.device());
        let [d0, d1, d2] = size;
        // Normalised cell centres along each axis, broadcast to the grid.
        let axis = |n: i64| (Tensor::arange(n, opts) + 0.5) / (n as f64);
        let c0 = axis(d0).view([d0, 1, 1]).expand([d0, d1, d2], false);
        let c1 = axis(d1).view([1, d1, 1]).expand([d0, d1, d2], false);
        let c2 = axis(d2).view([1, 1, d2]).expand([d0, d1, d2], false);
        // SAM's (x, y, z) order: the second axis' coordinate comes first, then the first axis', then the third.
        let coords = Tensor::stack(&[c1, c0, c2], -1);
        let coords = (coords * 2.0 - 1.0).matmul(g) * (2.0 * std::f64::consts::PI);
        Tensor::cat(&[coords.sin(), coords.cos()], -1).permute([3, 0, 1, 2])
    }
}

/// SAM's `LayerNorm2d` (only in the unused `mask_downscaling`).
#[derive(Debug)]
pub struct LayerNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl LayerNorm2d {
    pub fn new(vb: &VarBuilder, channels: i64) -> Result<Self> {
        Ok(LayerNorm2d {
            weight: vb.var("weight", &[channels], Init::Const(1.0))?,
            bias: vb.var("bias", &[channels], Init::Const(0.0))?,
        })
    }
}

/// An `nn.Conv2d` / `nn.ConvTranspose3d` parameter pair with PyTorch's default initialisation.
#[derive(Debug)]
pub struct ConvParams {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl ConvParams {
    /// `dims` is the weight shape, `out` the bias length; PyTorch's fan-in is dim 1 x the kernel volume
    /// (for a transposed convolution, whose weight is (in, out, k..), that is out x k^3).
    fn new(vb: &VarBuilder, dims: &[i64], out: i64) -> Result<Self> {
        let fan_in: i64 = dims[1..].iter().product();
        Ok(ConvParams {
            weight: vb.var("weight", dims, torch_default_init(fan_in))?,
            bias: vb.var("bias", &[out], torch_default_init(fan_in))?,
        })
    }

    /// `nn.ConvTranspose3d(c_in, c_out, kernel_size=2, stride=2)`.
    fn transposed(vb: &VarBuilder, c_in: i64, c_out: i64) -> Result<Self> {
        Self::new(vb, &[c_in, c_out, 2, 2, 2], c_out)
    }
}

/// SegVol's `PromptEncoder`. Only the text-prompt path is implemented (see the module docs).
#[derive(Debug)]
pub struct PromptEncoder {
    pub pe_layer: PositionEmbeddingRandom,
    pub point_embeddings: Vec<Tensor>,
    pub not_a_point_embed: Tensor,
    pub mask_downscaling: Vec<(ConvParams, Option<LayerNorm2d>)>,
    pub no_mask_embed: Tensor,
    embed_dim: i64,
    grid: [i64; 3],
}

impl PromptEncoder {
    pub fn new(vb: &VarBuilder, cfg: &SegVolConfig) -> Result<Self> {
        let d = cfg.embed_dim();
        let m = cfg.mask_in_chans;
        let pe_layer = PositionEmbeddingRandom::new(&vb.pp("pe_layer"), d / 2)?;
        let point_embeddings = (0..4)
            .map(|i| {
                vb.pp("point_embeddings")
                    .pp(i)
                    .var("weight", &[1, d], STANDARD_NORMAL)
            })
            .collect::<Result<Vec<_>>>()?;
        let not_a_point_embed =
            vb.pp("not_a_point_embed")
                .var("weight", &[1, d], STANDARD_NORMAL)?;
        let ds = vb.pp("mask_downscaling");
        // Conv2d(1, m/4, 2, 2), LayerNorm2d, GELU, Conv2d(m/4, m, 2, 2), LayerNorm2d, GELU, Conv2d(m, C, 1);
        // Conv2d weights are (out, in, kh, kw).
        let conv = |i: usize, dims: [i64; 4]| ConvParams::new(&ds.pp(i), &dims, dims[0]);
        let mask_downscaling = vec![
            (
                conv(0, [m / 4, 1, 2, 2])?,
                Some(LayerNorm2d::new(&ds.pp(1), m / 4)?),
            ),
            (
                conv(3, [m, m / 4, 2, 2])?,
                Some(LayerNorm2d::new(&ds.pp(4), m)?),
            ),
            (conv(6, [d, m, 1, 1])?, None),
        ];
        let no_mask_embed = vb
            .pp("no_mask_embed")
            .var("weight", &[1, d], STANDARD_NORMAL)?;
        Ok(PromptEncoder {
            pe_layer,
            point_embeddings,
            not_a_point_embed,
            mask_downscaling,
            no_mask_embed,
            embed_dim: d,
            grid: cfg.grid(),
        })
    }

    /// (sparse (B, T, C), dense (B, C, d, h, w)) for a batch of `batch` prompts, with the text embedding
    /// (B, C) as the only sparse token when given.
    pub fn forward(&self, text_embedding: Option<&Tensor>, batch: i64) -> (Tensor, Tensor) {
        let sparse = match text_embedding {
            Some(t) => t.unsqueeze(1),
            None => Tensor::zeros(
                [batch, 0, self.embed_dim],
                (self.no_mask_embed.kind(), self.no_mask_embed.device()),
            ),
        };
        let [g0, g1, g2] = self.grid;
        let dense = self
            .no_mask_embed
            .reshape([1, -1, 1, 1, 1])
            .expand([batch, self.embed_dim, g0, g1, g2], false);
        (sparse, dense)
    }

    /// `get_dense_pe`: (1, C, d, h, w).
    pub fn get_dense_pe(&self) -> Tensor {
        self.pe_layer.forward(self.grid).unsqueeze(0)
    }
}

/// `nn.LayerNorm((C/4, 2d, 2h, 2w))` of the output upscaling: one weight per element of the map.
#[derive(Debug)]
pub struct MapLayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    shape: Vec<i64>,
}

impl MapLayerNorm {
    pub fn new(vb: &VarBuilder, shape: &[i64]) -> Result<Self> {
        Ok(MapLayerNorm {
            weight: vb.var("weight", shape, Init::Const(1.0))?,
            bias: vb.var("bias", shape, Init::Const(0.0))?,
            shape: shape.to_vec(),
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.layer_norm(
            self.shape.as_slice(),
            Some(&self.weight),
            Some(&self.bias),
            LN_EPS,
            true,
        )
    }
}

/// SegVol's `MaskDecoder` (ViT variant).
#[derive(Debug)]
pub struct MaskDecoder {
    pub transformer: TwoWayTransformer,
    pub iou_token: Tensor,
    pub mask_tokens: Tensor,
    /// `output_upscaling.0`: ConvTranspose3d(C, C/4, 2, stride 2).
    pub upscale1: ConvParams,
    /// `output_upscaling.1`.
    pub upscale_norm: MapLayerNorm,
    /// `output_upscaling.3`: ConvTranspose3d(C/4, C/8, 2, stride 2).
    pub upscale2: ConvParams,
    pub output_hypernetworks_mlps: Vec<Mlp>,
    pub iou_prediction_head: Mlp,
    /// Linear(768, 96) in the reference: text width -> C/8.
    pub txt_align_upscaled_embedding: Linear,
}

impl MaskDecoder {
    pub fn new(vb: &VarBuilder, cfg: &SegVolConfig) -> Result<Self> {
        let d = cfg.embed_dim();
        let num_mask_tokens = cfg.num_multimask_outputs + 1;
        let up = vb.pp("output_upscaling");
        let g = cfg.grid();
        let output_hypernetworks_mlps = (0..num_mask_tokens)
            .map(|i| Mlp::new(&vb.pp("output_hypernetworks_mlps").pp(i), d, d, d / 8, 3))
            .collect::<Result<Vec<_>>>()?;
        Ok(MaskDecoder {
            transformer: TwoWayTransformer::new(&vb.pp("transformer"), cfg)?,
            iou_token: vb.pp("iou_token").var("weight", &[1, d], STANDARD_NORMAL)?,
            mask_tokens: vb.pp("mask_tokens").var(
                "weight",
                &[num_mask_tokens, d],
                STANDARD_NORMAL,
            )?,
            upscale1: ConvParams::transposed(&up.pp(0), d, d / 4)?,
            upscale_norm: MapLayerNorm::new(&up.pp(1), &[d / 4, 2 * g[0], 2 * g[1], 2 * g[2]])?,
            upscale2: ConvParams::transposed(&up.pp(3), d / 4, d / 8)?,
            output_hypernetworks_mlps,
            iou_prediction_head: Mlp::new(
                &vb.pp("iou_prediction_head"),
                d,
                cfg.iou_head_hidden_dim,
                num_mask_tokens,
                cfg.iou_head_depth,
            )?,
            txt_align_upscaled_embedding: Linear::new(
                &vb.pp("txt_align_upscaled_embedding"),
                d,
                d / 8,
                true,
            )?,
        })
    }

    fn upscale(&self, src: &Tensor) -> Tensor {
        let conv = |x: &Tensor, p: &ConvParams| {
            x.conv_transpose3d(
                &p.weight,
                Some(&p.bias),
                [2, 2, 2],
                [0, 0, 0],
                [0, 0, 0],
                1,
                [1, 1, 1],
            )
        };
        let x = conv(src, &self.upscale1);
        let x = self.upscale_norm.forward(&x).gelu("none");
        conv(&x, &self.upscale2).gelu("none")
    }

    /// All masks (B, 1 + multimask, 4d, 4h, 4w) and IoU predictions (B, 1 + multimask).
    /// `image`: (B, C, d, h, w); `image_pe`: (1, C, d, h, w); `sparse`: (B, T, C); `dense`: like `image`.
    pub fn predict_masks(
        &self,
        image: &Tensor,
        text_embedding: Option<&Tensor>,
        image_pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
    ) -> (Tensor, Tensor) {
        let b = sparse.size()[0];
        let output_tokens = Tensor::cat(&[&self.iou_token, &self.mask_tokens], 0);
        let n_out = output_tokens.size()[0];
        let output_tokens = output_tokens.unsqueeze(0).expand([b, -1, -1], false);
        let tokens = Tensor::cat(&[&output_tokens, &sparse.to_kind(output_tokens.kind())], 1);
        let s = image.size();
        let src = image.expand([b, s[1], s[2], s[3], s[4]], false) + dense;
        let pos_src = image_pe.expand([b, -1, -1, -1, -1], false);

        let (hs, src) = self.transformer.forward(&src, &pos_src, &tokens);
        let iou_token_out = hs.select(1, 0);
        let src = src.transpose(1, 2).reshape([b, s[1], s[2], s[3], s[4]]);
        let upscaled = self.upscale(&src);
        let us = upscaled.size();
        let flat = upscaled.flatten(2, -1);

        let hyper_in = Tensor::stack(
            &self
                .output_hypernetworks_mlps
                .iter()
                .enumerate()
                .map(|(i, mlp)| mlp.forward(&hs.select(1, 1 + i as i64)))
                .collect::<Vec<_>>(),
            1,
        );
        let mut masks = crate::precision::matmul(&hyper_in, &flat);
        if let Some(text) = text_embedding {
            // SegVol's text term: the projected text embedding's dot product with every upscaled voxel
            // feature, added to every mask.
            let text = self.txt_align_upscaled_embedding.forward(text).unsqueeze(1);
            let sim = crate::precision::matmul(&text, &flat);
            masks += sim;
        }
        let masks = masks.reshape([b, n_out - 1, us[2], us[3], us[4]]);
        let iou_pred = self.iou_prediction_head.forward(&iou_token_out);
        (masks, iou_pred)
    }

    /// `multimask_output = false` (LaMed's only use): the first mask, (B, 1, 4d, 4h, 4w), and its IoU.
    pub fn forward(
        &self,
        image: &Tensor,
        text_embedding: Option<&Tensor>,
        image_pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
        multimask_output: bool,
    ) -> (Tensor, Tensor) {
        let (masks, iou) = self.predict_masks(image, text_embedding, image_pe, sparse, dense);
        let n = masks.size()[1];
        if multimask_output {
            (masks.narrow(1, 1, n - 1), iou.narrow(1, 1, n - 1))
        } else {
            (masks.narrow(1, 0, 1), iou.narrow(1, 0, 1))
        }
    }
}

/// Mask logits and the decoder's IoU estimate for one forward pass.
#[derive(Debug)]
pub struct SegVolOutput {
    /// (B, 1, D, H, W) at the input image size.
    pub logits: Tensor,
    /// (B, 1, 4d, 4h, 4w), before the trilinear resize.
    pub low_res_logits: Tensor,
    /// (B, 1); unused by LaMed's losses (so its head receives no gradient, as in the reference).
    pub iou_pred: Tensor,
}

/// SegVol: `image_encoder`, `prompt_encoder`, `mask_decoder`.
#[derive(Debug)]
pub struct SegVol {
    pub image_encoder: ViT3d,
    pub prompt_encoder: PromptEncoder,
    pub mask_decoder: MaskDecoder,
    cfg: SegVolConfig,
}

impl SegVol {
    pub fn new(vb: &VarBuilder, cfg: &SegVolConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(SegVol {
            image_encoder: ViT3d::new(&vb.pp("image_encoder"), &cfg.image_encoder)?,
            prompt_encoder: PromptEncoder::new(&vb.pp("prompt_encoder"), cfg)?,
            mask_decoder: MaskDecoder::new(&vb.pp("mask_decoder"), cfg)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &SegVolConfig {
        &self.cfg
    }

    /// Image features on the patch grid: (B, 1, D, H, W) -> (B, C, d, h, w).
    pub fn encode_image(&self, image: &Tensor, train: bool) -> Result<Tensor> {
        let (x, _) = self.image_encoder.f_forward_t(image, train)?;
        let s = x.size();
        let [g0, g1, g2] = self.cfg.grid();
        Ok(x.transpose(1, 2).reshape([s[0], s[2], g0, g1, g2]))
    }

    /// The decoder on precomputed image features. `text_emb`: (B, C) or none; `img_size`: output size.
    pub fn forward_decoder(
        &self,
        image_embedding: &Tensor,
        img_size: [i64; 3],
        text_emb: Option<&Tensor>,
    ) -> Result<SegVolOutput> {
        let c = self.cfg.embed_dim();
        let [g0, g1, g2] = self.cfg.grid();
        let s = image_embedding.size();
        // The upscaling LayerNorm is sized for this grid: any other shape could only fail inside libtorch.
        if s.len() != 5 || s[0] < 1 || s[1..] != [c, g0, g1, g2] {
            return Err(ModelError::Shape {
                name: "SegVol image embedding (B, C, d, h, w)".into(),
                expected: vec![-1, c, g0, g1, g2],
                got: s,
            });
        }
        let b = s[0];
        if let Some(t) = text_emb {
            let ts = t.size();
            if ts.len() != 2 || ts[0] != b || ts[1] != c {
                return Err(ModelError::Shape {
                    name: "SegVol text embedding (B, C)".into(),
                    expected: vec![b, c],
                    got: ts,
                });
            }
        }
        let text = text_emb.map(|t| t.to_kind(image_embedding.kind()));
        let (sparse, dense) = self.prompt_encoder.forward(text.as_ref(), b);
        let dense = dense.to_kind(image_embedding.kind());
        let image_pe = self
            .prompt_encoder
            .get_dense_pe()
            .to_kind(image_embedding.kind());
        let (low_res_logits, iou_pred) = self.mask_decoder.forward(
            image_embedding,
            text.as_ref(),
            &image_pe,
            &sparse,
            &dense,
            false,
        );
        let logits = low_res_logits.f_upsample_trilinear3d(img_size, false, None, None, None)?;
        Ok(SegVolOutput {
            logits,
            low_res_logits,
            iou_pred,
        })
    }

    /// Full pass: `image` (B, 1, D, H, W), `text_emb` (B, C) -> mask logits at the image size.
    pub fn forward_t(
        &self,
        image: &Tensor,
        text_emb: Option<&Tensor>,
        train: bool,
    ) -> Result<SegVolOutput> {
        let emb = self.encode_image(image, train)?;
        let s = image.size();
        self.forward_decoder(&emb, [s[2], s[3], s[4]], text_emb)
    }

    pub fn forward(&self, image: &Tensor, text_emb: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.forward_t(image, text_emb, false)?.logits)
    }
}

fn check_pair(logits: &Tensor, target: &Tensor) -> Result<()> {
    if logits.size() != target.size() || logits.dim() < 1 {
        return Err(ModelError::Shape {
            name: "segmentation target (like the logits)".into(),
            expected: logits.size(),
            got: target.size(),
        });
    }
    Ok(())
}

/// The target with the reference's "ignore" value -1 mapped to 0, as f32.
fn clean_target(target: &Tensor) -> Tensor {
    let t = target.to_kind(Kind::Float);
    t.masked_fill(&t.eq(-1.0), 0.0)
}

/// `BinaryDiceLoss` (LaMed/src/model/loss.py): per sample 1 - 2 sum(p t) / (sum p + sum t + 1) with
/// p = sigmoid(logits), averaged over the batch. Computed in f32.
pub fn dice_loss(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    check_pair(logits, target)?;
    let b = logits.size()[0];
    let p = logits.to_kind(Kind::Float).sigmoid().reshape([b, -1]);
    let t = clean_target(target).reshape([b, -1]);
    let num = (&p * &t).sum_dim_intlist(1, false, Kind::Float);
    let den =
        p.sum_dim_intlist(1, false, Kind::Float) + t.sum_dim_intlist(1, false, Kind::Float) + 1.0;
    let dice: Tensor = 1.0 - num * 2.0 / den;
    Ok(dice.mean(Kind::Float))
}

/// `BCELoss` (LaMed/src/model/loss.py): `BCEWithLogitsLoss` (mean over every voxel), target -1 -> 0.
pub fn bce_loss(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    check_pair(logits, target)?;
    Ok(logits
        .to_kind(Kind::Float)
        .binary_cross_entropy_with_logits(
            &clean_target(target),
            None::<Tensor>,
            None::<Tensor>,
            Reduction::Mean,
        ))
}

/// Dice + BCE, LaMed's segmentation loss (weights 1 and 1). Returns (dice, bce).
pub fn seg_losses(logits: &Tensor, target: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((dice_loss(logits, target)?, bce_loss(logits, target)?))
}
