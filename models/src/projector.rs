//! The multimodal projector of M3D-LaMed: vision tokens -> LLM embedding space.
//!
//! Follows the reference `LaMed/src/model/multimodal_projector/{builder,spatial_pooling_projector}.py`
//! (M3D, arXiv 2404.00578). The published models use `spp`: the ViT patch tokens are laid back on their
//! 3-D grid, average-pooled (kernel = stride = 2: 8x16x16 -> 4x8x8 = 256 tokens) and projected by an
//! `nn.Sequential` MLP whose keys are the Sequential indices (`projector.0`, `projector.2`, ...).
//! `linear` (a bare `nn.Linear`, keys `weight`/`bias`) and `identity` are the builder's other choices.
//! `mlp{N}x_gelu` (LLaVA's naming, keys `0`, `2`, ...) is not in the M3D builder; it is offered for
//! projector ablations and never selected by an M3D config.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::builder::VarBuilder;
use crate::error::{ModelError, Result};
use crate::layers::Linear;

/// `mm_projector_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectorType {
    /// Spatial pooling projector (`spp`), the published choice.
    Spp,
    /// One `nn.Linear(mm_hidden_size, hidden_size)`.
    Linear,
    /// No parameters; requires `mm_hidden_size == hidden_size`.
    Identity,
    /// `mlp{depth}x_gelu`: Linear, then (GELU, Linear) x (depth - 1), without pooling.
    Mlp { depth: usize },
}

impl FromStr for ProjectorType {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "spp" => Ok(ProjectorType::Spp),
            "linear" => Ok(ProjectorType::Linear),
            "identity" => Ok(ProjectorType::Identity),
            _ => s
                .strip_prefix("mlp")
                .and_then(|rest| rest.strip_suffix("x_gelu"))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&depth| depth >= 1)
                .map(|depth| ProjectorType::Mlp { depth })
                .ok_or_else(|| {
                    ModelError::Config(format!(
                        "unknown mm_projector_type `{s}` (expected spp, linear, identity or mlpNx_gelu)"
                    ))
                }),
        }
    }
}

impl std::fmt::Display for ProjectorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProjectorType::Spp => f.write_str("spp"),
            ProjectorType::Linear => f.write_str("linear"),
            ProjectorType::Identity => f.write_str("identity"),
            ProjectorType::Mlp { depth } => write!(f, "mlp{depth}x_gelu"),
        }
    }
}

impl Serialize for ProjectorType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ProjectorType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `proj_layer_type`: the MLP inside `spp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjLayerType {
    /// `depth` stacked Linear layers without activation.
    Linear,
    /// Linear, then (GELU, Linear) x (depth - 1).
    Mlp,
}

/// `proj_pooling_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolingType {
    /// 3-D average pooling on the patch grid (kernel = stride = `proj_pooling_size`).
    Spatial,
    /// 1-D average pooling over the flattened token sequence (kernel = stride = size^3).
    Sequence,
}

fn default_projector_type() -> ProjectorType {
    ProjectorType::Spp
}
fn default_layer_type() -> ProjLayerType {
    ProjLayerType::Mlp
}
fn default_layer_num() -> usize {
    2
}
fn default_pooling_type() -> PoolingType {
    PoolingType::Spatial
}
fn default_pooling_size() -> i64 {
    2
}

/// The projector fields of a LaMed `config.json` (same names; defaults are the reference's `ModelArguments`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectorConfig {
    #[serde(default = "default_projector_type")]
    pub mm_projector_type: ProjectorType,
    /// Input image size (D, H, W) of the vision tower.
    pub image_size: [i64; 3],
    /// ViT patch size (D, H, W).
    pub patch_size: [i64; 3],
    /// Vision feature width (768 for the M3D ViT).
    pub mm_hidden_size: i64,
    /// LLM hidden size.
    pub hidden_size: i64,
    #[serde(default = "default_layer_type")]
    pub proj_layer_type: ProjLayerType,
    #[serde(default = "default_layer_num")]
    pub proj_layer_num: usize,
    #[serde(default = "default_pooling_type")]
    pub proj_pooling_type: PoolingType,
    #[serde(default = "default_pooling_size")]
    pub proj_pooling_size: i64,
}

impl ProjectorConfig {
    /// The published projector: `spp`, 2-layer GELU MLP, spatial pooling 2, on the M3D ViT grid
    /// (image 32x256x256, patch 4x16x16, width 768), into an LLM of width `hidden_size`.
    pub fn m3d(hidden_size: i64) -> Self {
        ProjectorConfig {
            mm_projector_type: ProjectorType::Spp,
            image_size: [32, 256, 256],
            patch_size: [4, 16, 16],
            mm_hidden_size: 768,
            hidden_size,
            proj_layer_type: ProjLayerType::Mlp,
            proj_layer_num: 2,
            proj_pooling_type: PoolingType::Spatial,
            proj_pooling_size: 2,
        }
    }

    /// A tiny `spp` projector: grid 2x4x4 of width 32 -> 1x2x2 = 4 tokens of width `hidden_size`.
    pub fn debug(hidden_size: i64) -> Self {
        ProjectorConfig {
            image_size: [8, 32, 32],
            patch_size: [4, 8, 8],
            mm_hidden_size: 32,
            ..Self::m3d(hidden_size)
        }
    }

    /// The ViT patch grid (D/pd, H/ph, W/pw).
    pub fn grid(&self) -> [i64; 3] {
        [
            self.image_size[0] / self.patch_size[0],
            self.image_size[1] / self.patch_size[1],
            self.image_size[2] / self.patch_size[2],
        ]
    }

    /// The grid after pooling (floor division, as `avg_pool3d` without padding).
    pub fn pooled_grid(&self) -> [i64; 3] {
        let g = self.grid();
        let p = self.proj_pooling_size;
        [g[0] / p, g[1] / p, g[2] / p]
    }

    /// Number of vision tokens handed to the LLM (`proj_out_num`; 256 for M3D).
    pub fn num_output_tokens(&self) -> i64 {
        let g = self.grid();
        match self.mm_projector_type {
            ProjectorType::Spp => match self.proj_pooling_type {
                PoolingType::Spatial => self.pooled_grid().iter().product(),
                PoolingType::Sequence => g.iter().product::<i64>() / self.proj_pooling_size.pow(3),
            },
            _ => g.iter().product(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        for i in 0..3 {
            if self.patch_size[i] <= 0 || self.image_size[i] % self.patch_size[i] != 0 {
                return bad(format!(
                    "projector: image_size {:?} is not a multiple of patch_size {:?}",
                    self.image_size, self.patch_size
                ));
            }
        }
        if self.mm_hidden_size <= 0 || self.hidden_size <= 0 {
            return bad("projector: mm_hidden_size and hidden_size must be positive".into());
        }
        match self.mm_projector_type {
            ProjectorType::Spp => {
                if self.proj_layer_num == 0 {
                    return bad("projector: proj_layer_num must be >= 1".into());
                }
                if self.proj_pooling_size <= 0 {
                    return bad("projector: proj_pooling_size must be >= 1".into());
                }
                if self.num_output_tokens() == 0 {
                    return bad(format!(
                        "projector: pooling {} leaves no tokens of grid {:?}",
                        self.proj_pooling_size,
                        self.grid()
                    ));
                }
            }
            ProjectorType::Identity if self.mm_hidden_size != self.hidden_size => {
                return bad(format!(
                    "projector: identity needs mm_hidden_size ({}) == hidden_size ({})",
                    self.mm_hidden_size, self.hidden_size
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

/// An `nn.Sequential` of Linear layers, optionally with GELU between them (at the odd indices, which hold
/// no parameters), so the keys are `0`, `1`, ... (plain) or `0`, `2`, ... (with GELU).
#[derive(Debug)]
pub struct SequentialMlp {
    layers: Vec<Linear>,
    gelu: bool,
}

impl SequentialMlp {
    pub fn new(
        vb: &VarBuilder,
        in_dim: i64,
        out_dim: i64,
        depth: usize,
        gelu: bool,
    ) -> Result<Self> {
        let stride = if gelu { 2 } else { 1 };
        let layers = (0..depth)
            .map(|i| {
                let d_in = if i == 0 { in_dim } else { out_dim };
                Linear::new(&vb.pp(i * stride), d_in, out_dim, true)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SequentialMlp { layers, gelu })
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x = self.layers[0].forward_t(xs, train);
        for layer in &self.layers[1..] {
            if self.gelu {
                x = x.gelu("none");
            }
            x = layer.forward_t(&x, train);
        }
        x
    }
}

/// `SpatialPoolingProjector`: (B, N, C) patch tokens in the ViT's (d h w) order -> (B, N', H).
#[derive(Debug)]
pub struct SpatialPoolingProjector {
    pub projector: SequentialMlp,
    grid: [i64; 3],
    in_dim: i64,
    pooling: PoolingType,
    pool: i64,
}

impl SpatialPoolingProjector {
    pub fn new(vb: &VarBuilder, cfg: &ProjectorConfig) -> Result<Self> {
        cfg.validate()?;
        let gelu = cfg.proj_layer_type == ProjLayerType::Mlp;
        let projector = SequentialMlp::new(
            &vb.pp("projector"),
            cfg.mm_hidden_size,
            cfg.hidden_size,
            cfg.proj_layer_num,
            gelu,
        )?;
        Ok(SpatialPoolingProjector {
            projector,
            grid: cfg.grid(),
            in_dim: cfg.mm_hidden_size,
            pooling: cfg.proj_pooling_type,
            pool: cfg.proj_pooling_size,
        })
    }

    /// Only the pooling step: (B, N, C) -> (B, N', C).
    pub fn pool(&self, xs: &Tensor) -> Result<Tensor> {
        let n: i64 = self.grid.iter().product();
        let size = xs.size();
        if size.len() != 3 || size[1] != n || size[2] != self.in_dim {
            return Err(ModelError::Shape {
                name: "mm_projector input".into(),
                expected: vec![size.first().copied().unwrap_or(-1), n, self.in_dim],
                got: size,
            });
        }
        let b = size[0];
        let p = self.pool;
        // libtorch's CPU pooling kernels have no bf16/f16 variant; the CUDA ones accumulate in f32 and round
        // once, which is exactly what pooling an f32 copy and casting back does.
        let kind = xs.kind();
        let x = match kind {
            Kind::BFloat16 | Kind::Half => xs.to_kind(Kind::Float),
            _ => xs.shallow_clone(),
        };
        let pooled = match self.pooling {
            PoolingType::Spatial => {
                // Token k of the ViT is grid cell (k / (h w), k / w % h, k % w): a (d, h, w) reshape of the
                // sequence, channels moved in front for the pooling op.
                let [d, h, w] = self.grid;
                let x = x.transpose(1, 2).reshape([b, self.in_dim, d, h, w]);
                let x = x.f_avg_pool3d([p, p, p], [p, p, p], [0, 0, 0], false, true, None)?;
                x.flatten(2, 4).transpose(1, 2)
            }
            PoolingType::Sequence => {
                let k = p * p * p;
                x.transpose(1, 2)
                    .f_avg_pool1d([k], [k], [0], false, true)?
                    .transpose(1, 2)
            }
        };
        Ok(pooled.to_kind(kind))
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.projector.forward_t(&self.pool(xs)?, train))
    }
}

/// The projector `build_mm_projector` makes for a config (stored at `model.mm_projector`).
#[derive(Debug)]
pub enum Projector {
    Spp(SpatialPoolingProjector),
    Linear(Linear),
    Identity,
    Mlp(SequentialMlp),
}

impl Projector {
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Projector::Spp(p) => p.forward_t(xs, train),
            Projector::Linear(l) => Ok(l.forward_t(xs, train)),
            Projector::Identity => Ok(xs.shallow_clone()),
            Projector::Mlp(m) => Ok(m.forward_t(xs, train)),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_t(xs, false)
    }
}

/// `build_mm_projector(config)`: parameters directly below `vb` (`model.mm_projector` in LaMed).
pub fn build_projector(vb: &VarBuilder, cfg: &ProjectorConfig) -> Result<Projector> {
    cfg.validate()?;
    Ok(match cfg.mm_projector_type {
        ProjectorType::Spp => Projector::Spp(SpatialPoolingProjector::new(vb, cfg)?),
        ProjectorType::Linear => {
            Projector::Linear(Linear::new(vb, cfg.mm_hidden_size, cfg.hidden_size, true)?)
        }
        ProjectorType::Identity => Projector::Identity,
        ProjectorType::Mlp { depth } => Projector::Mlp(SequentialMlp::new(
            vb,
            cfg.mm_hidden_size,
            cfg.hidden_size,
            depth,
            true,
        )?),
    })
}
