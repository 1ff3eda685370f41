//! The decoder-only language models M3D-LaMed builds on (Llama-2/3, Phi-3), as one [`CausalLm`]: the
//! decoder both families share (pre-norm layers of RMSNorm, rotary grouped-query attention and a gated MLP),
//! the KV cache, the causal + padding (+ sliding-window) attention mask, the attention kernel and greedy
//! decoding. The family modules ([`crate::llama`], [`crate::phi3`]) only read their config.json into a
//! `DecoderSpec`: how projections are stored (separate or fused), biases, dropout, window and RoPE.
//!
//! Semantics follow HF transformers' `LlamaForCausalLM` / `Phi3ForCausalLM` (v5): RoPE with the
//! `rotate_half` convention and frequencies computed in f32, additive masks filled with the dtype's minimum,
//! softmax in f32, GQA by repeating the key/value heads, and, when an attention mask is given, position ids
//! derived from it the way `generate` does (`cumsum(mask) - 1`, so left padding is handled).

use std::path::Path;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::builder::VarBuilder;
use crate::error::{read_json, ModelError, Result};
use crate::layers::{
    check_token_ids, checkpointed, dropout, dtype_min, Activation, CheckedIds, Embedding, Linear,
    RmsNorm,
};

/// An HF config.json of a supported decoder, by `model_type`.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(tag = "model_type")]
pub enum LlmConfig {
    #[serde(rename = "llama")]
    Llama(crate::llama::LlamaConfig),
    #[serde(rename = "phi3")]
    Phi3(crate::phi3::Phi3Config),
}

/// The same expression for every family: the configs share these field names (HF's).
macro_rules! each_family {
    ($cfg:expr, $c:ident => $body:expr) => {
        match $cfg {
            LlmConfig::Llama($c) => $body,
            LlmConfig::Phi3($c) => $body,
        }
    };
}

impl LlmConfig {
    /// Reads and validates an HF `config.json` (head counts, RoPE type).
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: LlmConfig = read_json(path)?;
        cfg.validate().map_err(|e| match e {
            ModelError::Config(m) => ModelError::Config(format!("{}: {m}", path.display())),
            other => other,
        })?;
        Ok(cfg)
    }

    /// Checks what serde cannot: head counts that divide, a supported RoPE.
    pub fn validate(&self) -> Result<()> {
        self.spec().map(|_| ())
    }

    /// The sizes that decide a decoder's memory and compute (`m3d plan`).
    pub fn shape(&self) -> Result<LlmShape> {
        let s = self.spec()?;
        Ok(LlmShape {
            hidden_size: s.hidden_size,
            intermediate_size: s.intermediate_size,
            num_hidden_layers: s.num_hidden_layers,
            num_heads: s.num_heads,
            num_kv_heads: s.num_kv_heads,
            head_dim: s.head_dim,
            vocab_size: s.vocab_size,
            attention_dropout: s.attention_dropout,
            resid_pdrop: s.resid_pdrop,
        })
    }

    /// The validated decoder shape [`CausalLm`] is built from.
    pub(crate) fn spec(&self) -> Result<DecoderSpec> {
        each_family!(self, c => c.spec())
    }

    pub fn hidden_size(&self) -> i64 {
        each_family!(self, c => c.hidden_size)
    }

    pub fn vocab_size(&self) -> i64 {
        each_family!(self, c => c.vocab_size)
    }

    /// For a resized vocabulary (LaMed adds its special tokens before building the model).
    pub fn set_vocab_size(&mut self, n: i64) {
        each_family!(self, c => c.vocab_size = n)
    }

    /// The context length the model was trained for (the longest prompt plus answer `generate` accepts).
    pub fn max_position_embeddings(&self) -> i64 {
        each_family!(self, c => c.max_position_embeddings)
    }

    pub fn num_hidden_layers(&self) -> i64 {
        each_family!(self, c => c.num_hidden_layers)
    }

    pub fn tie_word_embeddings(&self) -> bool {
        each_family!(self, c => c.tie_word_embeddings)
    }

    pub fn bos_token_id(&self) -> Option<i64> {
        each_family!(self, c => c.bos_token_id)
    }

    /// Every id `eos_token_id` names (HF allows one id or a list).
    pub fn eos_token_ids(&self) -> Vec<i64> {
        each_family!(self, c => c.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default())
    }

    pub fn pad_token_id(&self) -> Option<i64> {
        each_family!(self, c => c.pad_token_id)
    }

    /// Selects the attention kernel (not part of HF's config.json; SDPA by default).
    pub fn set_attn_implementation(&mut self, imp: AttentionImpl) {
        each_family!(self, c => c.attn_implementation = imp)
    }
}

/// `eos_token_id` and friends: HF configs give one id or a list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// How attention probabilities are computed. Both give the same numbers up to rounding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionImpl {
    /// `softmax(q k^T * scale + mask)` materialised, softmax in f32: HF's `eager` path, bit for bit in spirit.
    Eager,
    /// libtorch's fused `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU), which
    /// avoids storing the (T x T) probabilities for backward.
    #[default]
    #[serde(alias = "flash_attention_2", alias = "flash_attention_3")]
    Sdpa,
}

// ---------------------------------------------------------------------------------------------------------
// Rotary position embeddings.

/// One RoPE settings dict, in either the transformers 4.x form (`rope_scaling`, with `type` or `rope_type`,
/// next to a top-level `rope_theta`) or the 5.x form (`rope_parameters`, which also carries `rope_theta`).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// The 4.x spelling of `rope_type`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub legacy_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
}

impl RopeParameters {
    /// `{"rope_type": "linear", "factor": factor}`.
    pub fn linear(factor: f64) -> Self {
        RopeParameters {
            rope_type: Some("linear".into()),
            factor: Some(factor),
            ..Default::default()
        }
    }

    /// `{"rope_type": "dynamic", "factor": factor}` (dynamic NTK scaling).
    pub fn dynamic(factor: f64) -> Self {
        RopeParameters {
            rope_type: Some("dynamic".into()),
            factor: Some(factor),
            ..Default::default()
        }
    }

    /// Llama-3.1's frequency-dependent scaling.
    pub fn llama3(factor: f64, low_freq_factor: f64, high_freq_factor: f64, original: i64) -> Self {
        RopeParameters {
            rope_type: Some("llama3".into()),
            factor: Some(factor),
            low_freq_factor: Some(low_freq_factor),
            high_freq_factor: Some(high_freq_factor),
            original_max_position_embeddings: Some(original),
            ..Default::default()
        }
    }
}

/// A resolved RoPE variant.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Dynamic NTK: the base grows once a sequence exceeds `max_position_embeddings`.
    Dynamic {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: i64,
    },
}

/// The RoPE of a model: base, head dimension and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    pub head_dim: i64,
    pub max_position_embeddings: i64,
    pub scaling: RopeScaling,
}

/// Merges the old and new config forms into one [`RopeSpec`]; `rope_parameters` wins over `rope_scaling`
/// (as in transformers 5), and an explicit `rope_theta` inside the dict wins over the top-level one.
pub(crate) fn resolve_rope(
    model: &str,
    top_level_theta: Option<f64>,
    rope_scaling: Option<&RopeParameters>,
    rope_parameters: Option<&RopeParameters>,
    head_dim: i64,
    max_position_embeddings: i64,
) -> Result<RopeSpec> {
    let empty = RopeParameters::default();
    let p = rope_parameters.or(rope_scaling).unwrap_or(&empty);
    let theta = p.rope_theta.or(top_level_theta).unwrap_or(10_000.0);
    let partial = p.partial_rotary_factor.unwrap_or(1.0);
    if partial != 1.0 {
        return Err(ModelError::Config(format!(
            "{model}: partial_rotary_factor {partial} is not supported (only 1.0)"
        )));
    }
    let kind = p
        .rope_type
        .as_deref()
        .or(p.legacy_type.as_deref())
        .unwrap_or("default");
    let need = |name: &str, v: Option<f64>| {
        v.ok_or_else(|| ModelError::Config(format!("{model}: RoPE type `{kind}` needs `{name}`")))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor", p.factor)?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: need("factor", p.factor)?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor", p.factor)?,
            low_freq_factor: need("low_freq_factor", p.low_freq_factor)?,
            high_freq_factor: need("high_freq_factor", p.high_freq_factor)?,
            original_max_position_embeddings: p
                .original_max_position_embeddings
                .unwrap_or(max_position_embeddings),
        },
        other => {
            return Err(ModelError::Config(format!(
                "{model}: RoPE type `{other}` is not supported (default, linear, dynamic, llama3)"
            )))
        }
    };
    if let RopeScaling::Llama3 {
        low_freq_factor,
        high_freq_factor,
        ..
    } = scaling
    {
        if high_freq_factor <= low_freq_factor {
            return Err(ModelError::Config(format!(
                "{model}: llama3 RoPE needs high_freq_factor > low_freq_factor"
            )));
        }
    }
    if head_dim <= 0 || head_dim % 2 != 0 {
        return Err(ModelError::Config(format!(
            "{model}: RoPE needs an even head_dim, got {head_dim}"
        )));
    }
    Ok(RopeSpec {
        theta,
        head_dim,
        max_position_embeddings,
        scaling,
    })
}

/// Rotary embedding with HF's `rotate_half` convention: dimension `i` pairs with `i + head_dim / 2`.
/// The inverse frequencies are not a checkpoint tensor (HF keeps them as a non-persistent buffer).
#[derive(Debug)]
pub struct RotaryEmbedding {
    spec: RopeSpec,
    inv_freq: Tensor,
}

impl RotaryEmbedding {
    pub fn new(spec: RopeSpec, device: Device) -> Self {
        let inv_freq = Self::inv_freq(&spec, spec.theta).to_device(device);
        RotaryEmbedding { spec, inv_freq }
    }

    /// `1 / theta^(2i / d)` in f32 (the same float ops as transformers), with the configured scaling.
    fn inv_freq(spec: &RopeSpec, base: f64) -> Tensor {
        let dim = spec.head_dim;
        let exponent = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
            / (dim as f64);
        let inv_freq = Tensor::pow_scalar(base, &exponent).reciprocal();
        match spec.scaling {
            RopeScaling::None | RopeScaling::Dynamic { .. } => inv_freq,
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_len = original_max_position_embeddings as f64;
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
                // Long wavelengths are interpolated by `factor`, short ones kept, the band between blended.
                let scaled =
                    (&inv_freq / factor).where_self(&wavelen.gt(low_freq_wavelen), &inv_freq);
                let smooth = (wavelen.reciprocal() * old_len - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                let smoothed = (-&smooth + 1.0) * &scaled / factor + &smooth * &scaled;
                let medium = wavelen
                    .lt(high_freq_wavelen)
                    .logical_not()
                    .logical_and(&wavelen.gt(low_freq_wavelen).logical_not());
                smoothed.where_self(&medium, &scaled)
            }
        }
    }

    /// `(cos, sin)` of shape (B or 1, 1, T, head_dim) in `kind`, for `position_ids` (B or 1, T).
    pub fn cos_sin(&self, position_ids: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let inv_freq = match self.spec.scaling {
            RopeScaling::Dynamic { factor } => {
                let seq_len = position_ids.max().int64_value(&[]) + 1;
                let max_pos = self.spec.max_position_embeddings;
                if seq_len > max_pos {
                    let dim = self.spec.head_dim as f64;
                    let base = self.spec.theta
                        * ((factor * seq_len as f64 / max_pos as f64) - (factor - 1.0))
                            .powf(dim / (dim - 2.0));
                    Self::inv_freq(&self.spec, base).to_device(self.inv_freq.device())
                } else {
                    self.inv_freq.shallow_clone()
                }
            }
            _ => self.inv_freq.shallow_clone(),
        };
        let freqs = position_ids.to_kind(Kind::Float).unsqueeze(-1) * inv_freq;
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }

    pub fn spec(&self) -> &RopeSpec {
        &self.spec
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

/// `x * cos + rotate_half(x) * sin` for x (B, heads, T, D).
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    x * cos + rotate_half(x) * sin
}

// ---------------------------------------------------------------------------------------------------------
// KV cache, masks, attention.

/// Keys (after RoPE) and values of every layer for the tokens seen so far, (B, kv_heads, T_past, head_dim).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }

    /// Number of cached positions (0 when empty).
    pub fn seq_len(&self) -> i64 {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.size()[2])
            .unwrap_or(0)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Forgets everything (reuse the allocation pattern for a new prompt).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }

    /// Errors unless this cache can take a forward of `batch` sequences through `num_layers` layers: checked
    /// before the first layer runs, so a refused step leaves the cache as it was.
    fn check(&self, num_layers: usize, batch: i64) -> Result<()> {
        if self.layers.len() != num_layers {
            return Err(ModelError::Input(format!(
                "KV cache has {} layers, the model {num_layers}",
                self.layers.len()
            )));
        }
        match self.layers.first().and_then(|l| l.as_ref()) {
            Some((k, _)) if k.size()[0] != batch => Err(ModelError::Input(format!(
                "KV cache holds batch {}, got batch {batch}",
                k.size()[0]
            ))),
            _ => Ok(()),
        }
    }

    /// Appends this step's keys/values for `layer` (checked by [`KvCache::check`]) and returns all of them.
    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let n = self.layers.len();
        let slot = self.layers.get_mut(layer).ok_or_else(|| {
            ModelError::Input(format!(
                "KV cache has {n} layers, the model asked for layer {layer}"
            ))
        })?;
        let (k, v) = match slot.as_ref() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::f_cat(&[pk, &k], 2)?, Tensor::f_cat(&[pv, &v], 2)?),
        };
        *slot = Some((k.shallow_clone(), v.shallow_clone()));
        Ok((k, v))
    }
}

/// What every layer of one forward needs besides its input: RoPE angles and the attention bias.
struct DecoderInputs {
    cos: Tensor,
    sin: Tensor,
    bias: AttnBias,
}

impl DecoderInputs {
    /// The same tensors (shallow copies), for a checkpointed layer to keep.
    fn shallow_clone(&self) -> DecoderInputs {
        DecoderInputs {
            cos: self.cos.shallow_clone(),
            sin: self.sin.shallow_clone(),
            bias: match &self.bias {
                AttnBias::Mask(m) => AttnBias::Mask(m.shallow_clone()),
                AttnBias::Causal => AttnBias::Causal,
                AttnBias::Nothing => AttnBias::Nothing,
            },
        }
    }
}

/// The attention bias of one forward: an additive (B, 1, T, T_total) mask (0 where allowed, the dtype's
/// minimum where not), or plain causal attention without a mask, or none at all (one new token, no padding).
enum AttnBias {
    Mask(Tensor),
    Causal,
    Nothing,
}

/// Position ids, RoPE angles and attention bias for `t_new` new tokens after `past` cached ones.
/// `sliding_window`: keys further than this behind the query are masked (Phi-3).
fn prepare_decoder_inputs(
    rope: &RotaryEmbedding,
    embeds: &Tensor,
    attention_mask: Option<&Tensor>,
    past: i64,
    sliding_window: Option<i64>,
) -> Result<DecoderInputs> {
    let (b, t) = (embeds.size()[0], embeds.size()[1]);
    let total = past + t;
    let device = embeds.device();
    // Under bf16 autocast q and k come out of the projections in bf16: RoPE tables and the additive mask
    // must be in the kind attention runs in, not the f32 of the residual stream.
    let kind = crate::precision::autocast_kind().unwrap_or(embeds.kind());
    let keep = match attention_mask {
        None => None,
        Some(m) => {
            if m.size() != [b, total] {
                return Err(ModelError::Input(format!(
                    "attention_mask must be (batch {b}, cached {past} + new {t}), got {:?}",
                    m.size()
                )));
            }
            Some(m.to_device(device).ne(0))
        }
    };
    let position_ids = match &keep {
        // As `generate` does: positions count real tokens only, so left-padded rows start at 0.
        Some(keep) => {
            let pos = keep.to_kind(Kind::Int64).cumsum(-1, Kind::Int64) - 1;
            pos.masked_fill(&keep.logical_not(), 1).narrow(1, past, t)
        }
        None => Tensor::arange_start(past, total, (Kind::Int64, device)).unsqueeze(0),
    };
    let (cos, sin) = rope.cos_sin(&position_ids, kind);
    let window_active = sliding_window.is_some_and(|w| total > w);
    let bias = if keep.is_none() && !window_active {
        if t == 1 {
            AttnBias::Nothing
        } else if past == 0 {
            AttnBias::Causal
        } else {
            AttnBias::Mask(additive_mask(None, b, t, past, None, kind, device))
        }
    } else {
        let window = sliding_window.filter(|_| window_active);
        AttnBias::Mask(additive_mask(
            keep.as_ref(),
            b,
            t,
            past,
            window,
            kind,
            device,
        ))
    };
    Ok(DecoderInputs { cos, sin, bias })
}

fn additive_mask(
    keep: Option<&Tensor>,
    b: i64,
    t: i64,
    past: i64,
    window: Option<i64>,
    kind: Kind,
    device: Device,
) -> Tensor {
    let total = past + t;
    // Causality is by cache index (not position id), as in HF.
    let q = Tensor::arange_start(past, total, (Kind::Int64, device)).unsqueeze(1);
    let k = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
    let mut allowed = k.le_tensor(&q);
    if let Some(w) = window {
        allowed = allowed.logical_and(&k.gt_tensor(&(&q - w)));
    }
    let mut allowed = allowed.view([1, 1, t, total]);
    if let Some(keep) = keep {
        allowed = allowed.logical_and(&keep.view([b, 1, 1, total]));
    }
    Tensor::zeros(allowed.size(), (kind, device))
        .masked_fill(&allowed.logical_not(), dtype_min(kind))
}

/// Scaled dot-product attention of q (B, H, T, D) over k, v (B, KVH, S, D); returns (B, T, H * D).
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &AttnBias,
    dropout: f64,
    train: bool,
    imp: AttentionImpl,
) -> Tensor {
    let (b, h, t, d) = (q.size()[0], q.size()[1], q.size()[2], q.size()[3]);
    let n_rep = h / k.size()[1];
    let k = repeat_kv(k, n_rep);
    let v = repeat_kv(v, n_rep);
    let scale = 1.0 / (d as f64).sqrt();
    let p = if train { dropout } else { 0.0 };
    let out = match imp {
        AttentionImpl::Sdpa => {
            let (mask, causal) = match bias {
                AttnBias::Mask(m) => (Some(m), false),
                AttnBias::Causal => (None, true),
                AttnBias::Nothing => (None, false),
            };
            Tensor::scaled_dot_product_attention(q, &k, &v, mask, p, causal, scale, false)
        }
        AttentionImpl::Eager => {
            let mut scores = q.matmul(&k.transpose(2, 3)) * scale;
            match bias {
                AttnBias::Mask(m) => scores += m,
                AttnBias::Causal => {
                    let m = additive_mask(None, b, t, 0, None, scores.kind(), scores.device());
                    scores += m
                }
                AttnBias::Nothing => {}
            }
            let probs = scores.softmax(-1, Kind::Float).to_kind(q.kind());
            crate::layers::dropout(probs, p, train).matmul(&v)
        }
    };
    out.transpose(1, 2).contiguous().view([b, t, h * d])
}

/// (B, KVH, S, D) -> (B, KVH * n_rep, S, D), each kv head repeated for its group of query heads.
fn repeat_kv(x: &Tensor, n_rep: i64) -> Tensor {
    if n_rep == 1 {
        return x.shallow_clone();
    }
    let (b, kvh, s, d) = (x.size()[0], x.size()[1], x.size()[2], x.size()[3]);
    x.unsqueeze(2)
        .expand([b, kvh, n_rep, s, d], false)
        .reshape([b, kvh * n_rep, s, d])
}

/// Checks (B, T, hidden) input embeddings, T >= 1.
fn check_embeds(embeds: &Tensor, hidden: i64) -> Result<()> {
    let s = embeds.size();
    if s.len() != 3 || s[1] < 1 || s[2] != hidden || !embeds.is_floating_point() {
        return Err(ModelError::Shape {
            name: format!("inputs_embeds ({:?})", embeds.kind()),
            expected: vec![-1, -1, hidden],
            got: s,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// The decoder both families share. Llama and Phi-3 differ only in how the projections are stored (separate
// or fused), in biases, residual dropout and the sliding window; everything else is one code path.

/// Head counts must be positive and group evenly; without an explicit `head_dim` the heads tile `hidden`.
pub(crate) fn check_heads(
    model: &str,
    hidden: i64,
    heads: i64,
    kv_heads: i64,
    head_dim: Option<i64>,
) -> Result<()> {
    if heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 {
        return Err(ModelError::Config(format!(
            "{model}: num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv_heads}"
        )));
    }
    if head_dim.is_none() && hidden % heads != 0 {
        return Err(ModelError::Config(format!(
            "{model}: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
        )));
    }
    Ok(())
}

/// How a family stores its projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProjLayout {
    /// Llama: `q_proj`/`k_proj`/`v_proj`/`o_proj` and `gate_proj`/`up_proj`/`down_proj`, optional biases.
    Separate {
        attention_bias: bool,
        mlp_bias: bool,
    },
    /// Phi-3: `qkv_proj` and `gate_up_proj`, no biases.
    Fused,
}

/// A decoder's sizes, whichever family it is ([`LlmConfig::shape`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LlmShape {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub vocab_size: i64,
    pub attention_dropout: f64,
    pub resid_pdrop: f64,
}

/// A validated decoder shape, whichever family's config.json it was read from.
#[derive(Debug, Clone)]
pub(crate) struct DecoderSpec {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub act: Activation,
    pub rms_norm_eps: f64,
    pub attention_dropout: f64,
    /// Dropout on both residual branches of a layer (Phi-3's `resid_pdrop`; 0 for Llama).
    pub resid_pdrop: f64,
    pub sliding_window: Option<i64>,
    pub tie_word_embeddings: bool,
    /// Also the embedding's `padding_idx`: that row gets no gradient, as in HF.
    pub pad_token_id: Option<i64>,
    pub attn_implementation: AttentionImpl,
    pub rope: RopeSpec,
    pub layout: ProjLayout,
}

/// The q/k/v projections of [`SelfAttention`], in either layout.
#[derive(Debug)]
pub enum QkvProj {
    Separate {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
    /// One `qkv_proj`: q rows, then k, then v. LoRA adapts it as one module, as PEFT does.
    Fused { qkv_proj: Linear },
}

/// `self_attn`: q/k/v projections, RoPE on q and k, grouped-query attention, `o_proj`.
#[derive(Debug)]
pub struct SelfAttention {
    pub qkv: QkvProj,
    pub o_proj: Linear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    dropout: f64,
    imp: AttentionImpl,
}

impl SelfAttention {
    fn new(vb: &VarBuilder, s: &DecoderSpec) -> Result<Self> {
        let (hidden, h, kvh, d) = (s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim);
        let (qkv, o_bias) = match s.layout {
            ProjLayout::Separate {
                attention_bias: bias,
                ..
            } => (
                QkvProj::Separate {
                    q_proj: Linear::new(&vb.pp("q_proj"), hidden, h * d, bias)?,
                    k_proj: Linear::new(&vb.pp("k_proj"), hidden, kvh * d, bias)?,
                    v_proj: Linear::new(&vb.pp("v_proj"), hidden, kvh * d, bias)?,
                },
                bias,
            ),
            ProjLayout::Fused => (
                QkvProj::Fused {
                    qkv_proj: Linear::new(&vb.pp("qkv_proj"), hidden, (h + 2 * kvh) * d, false)?,
                },
                false,
            ),
        };
        Ok(SelfAttention {
            qkv,
            o_proj: Linear::new(&vb.pp("o_proj"), h * d, hidden, o_bias)?,
            num_heads: h,
            num_kv_heads: kvh,
            head_dim: d,
            dropout: s.attention_dropout,
            imp: s.attn_implementation,
        })
    }

    fn forward_t(
        &self,
        xs: &Tensor,
        inputs: &DecoderInputs,
        cache: Option<(&mut KvCache, usize)>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = (xs.size()[0], xs.size()[1]);
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = match &self.qkv {
            QkvProj::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => (
                q_proj.forward_t(xs, train),
                k_proj.forward_t(xs, train),
                v_proj.forward_t(xs, train),
            ),
            QkvProj::Fused { qkv_proj } => {
                let qkv = qkv_proj.forward_t(xs, train);
                (
                    qkv.narrow(-1, 0, h * d),
                    qkv.narrow(-1, h * d, kvh * d),
                    qkv.narrow(-1, (h + kvh) * d, kvh * d),
                )
            }
        };
        let heads = |x: &Tensor, n: i64| x.reshape([b, t, n, d]).transpose(1, 2);
        let q = apply_rotary(&heads(&q, h), &inputs.cos, &inputs.sin);
        let k = apply_rotary(&heads(&k, kvh), &inputs.cos, &inputs.sin);
        let v = heads(&v, kvh);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v)?,
            None => (k, v),
        };
        let out = attention(&q, &k, &v, &inputs.bias, self.dropout, train, self.imp);
        Ok(self.o_proj.forward_t(&out, train))
    }
}

/// The gate and up projections of [`GatedMlp`], in either layout.
#[derive(Debug)]
pub enum GateUpProj {
    Separate {
        gate_proj: Linear,
        up_proj: Linear,
    },
    /// One `gate_up_proj`: gate rows, then up rows.
    Fused {
        gate_up_proj: Linear,
    },
}

/// `mlp`: `down_proj(act(gate) * up)` (SwiGLU with `hidden_act` = silu).
#[derive(Debug)]
pub struct GatedMlp {
    pub gate_up: GateUpProj,
    pub down_proj: Linear,
    act: Activation,
}

impl GatedMlp {
    fn new(vb: &VarBuilder, s: &DecoderSpec) -> Result<Self> {
        let (h, i) = (s.hidden_size, s.intermediate_size);
        let (gate_up, bias) = match s.layout {
            ProjLayout::Separate { mlp_bias: bias, .. } => (
                GateUpProj::Separate {
                    gate_proj: Linear::new(&vb.pp("gate_proj"), h, i, bias)?,
                    up_proj: Linear::new(&vb.pp("up_proj"), h, i, bias)?,
                },
                bias,
            ),
            ProjLayout::Fused => (
                GateUpProj::Fused {
                    gate_up_proj: Linear::new(&vb.pp("gate_up_proj"), h, 2 * i, false)?,
                },
                false,
            ),
        };
        Ok(GatedMlp {
            gate_up,
            down_proj: Linear::new(&vb.pp("down_proj"), i, h, bias)?,
            act: s.act,
        })
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let (gate, up) = match &self.gate_up {
            GateUpProj::Separate { gate_proj, up_proj } => {
                (gate_proj.forward_t(xs, train), up_proj.forward_t(xs, train))
            }
            GateUpProj::Fused { gate_up_proj } => {
                let gate_up = gate_up_proj.forward_t(xs, train);
                let i = gate_up.size()[gate_up.dim() - 1] / 2;
                (gate_up.narrow(-1, 0, i), gate_up.narrow(-1, i, i))
            }
        };
        self.down_proj
            .forward_t(&(self.act.forward(&gate) * up), train)
    }
}

/// `model.layers.N`: pre-norm residual attention and MLP, each branch with residual dropout.
#[derive(Debug)]
pub struct DecoderLayer {
    pub self_attn: SelfAttention,
    pub mlp: GatedMlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    resid_pdrop: f64,
}

impl DecoderLayer {
    fn new(vb: &VarBuilder, s: &DecoderSpec) -> Result<Self> {
        let (h, eps) = (s.hidden_size, s.rms_norm_eps);
        Ok(DecoderLayer {
            self_attn: SelfAttention::new(&vb.pp("self_attn"), s)?,
            mlp: GatedMlp::new(&vb.pp("mlp"), s)?,
            input_layernorm: RmsNorm::new(&vb.pp("input_layernorm"), h, eps)?,
            post_attention_layernorm: RmsNorm::new(&vb.pp("post_attention_layernorm"), h, eps)?,
            resid_pdrop: s.resid_pdrop,
        })
    }

    fn forward_t(
        &self,
        xs: &Tensor,
        inputs: &DecoderInputs,
        cache: Option<(&mut KvCache, usize)>,
        train: bool,
    ) -> Result<Tensor> {
        let attn =
            self.self_attn
                .forward_t(&self.input_layernorm.forward(xs), inputs, cache, train)?;
        let xs = xs + dropout(attn, self.resid_pdrop, train);
        let mlp = self
            .mlp
            .forward_t(&self.post_attention_layernorm.forward(&xs), train);
        Ok(&xs + dropout(mlp, self.resid_pdrop, train))
    }
}

/// `model`: embeddings, decoder layers, final norm (HF's `LlamaModel` / `Phi3Model`).
#[derive(Debug)]
pub struct DecoderModel {
    pub embed_tokens: Embedding,
    /// Shared, so that an activation checkpoint can hold its layer until the backward pass re-runs it.
    pub layers: Vec<Arc<DecoderLayer>>,
    pub norm: RmsNorm,
    rotary: RotaryEmbedding,
    /// Re-run each layer in the backward pass instead of keeping its activations (training forwards only).
    checkpointing: bool,
}

impl DecoderModel {
    fn new(vb: &VarBuilder, s: &DecoderSpec) -> Result<Self> {
        let layers = (0..s.num_hidden_layers)
            .map(|i| DecoderLayer::new(&vb.pp("layers").pp(i), s).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(DecoderModel {
            embed_tokens: Embedding::new(&vb.pp("embed_tokens"), s.vocab_size, s.hidden_size)?,
            layers,
            norm: RmsNorm::new(&vb.pp("norm"), s.hidden_size, s.rms_norm_eps)?,
            rotary: RotaryEmbedding::new(s.rope.clone(), vb.device()),
            checkpointing: false,
        })
    }
}

// ---------------------------------------------------------------------------------------------------------
// The model interface.

/// A causal language model of any supported family (HF `LlamaForCausalLM` / `Phi3ForCausalLM`):
/// [`DecoderModel`] under `model.` and `lm_head` (absent when the embeddings are tied).
#[derive(Debug)]
pub struct CausalLm {
    pub model: DecoderModel,
    pub lm_head: Option<Linear>,
    spec: DecoderSpec,
    cfg: LlmConfig,
}

impl CausalLm {
    /// `vb` is the root of an HF causal-LM checkpoint: keys `model.*` and `lm_head.*`.
    pub fn new(vb: &VarBuilder, cfg: &LlmConfig) -> Result<Self> {
        let spec = cfg.spec()?;
        let model = DecoderModel::new(&vb.pp("model"), &spec)?;
        let lm_head = if spec.tie_word_embeddings {
            None
        } else {
            Some(Linear::new(
                &vb.pp("lm_head"),
                spec.hidden_size,
                spec.vocab_size,
                false,
            )?)
        };
        Ok(CausalLm {
            model,
            lm_head,
            spec,
            cfg: cfg.clone(),
        })
    }

    /// (B, T) ids -> (B, T, H), with HF's `padding_idx` (the pad row receives no gradient). Ids outside the
    /// vocabulary are an error here rather than a device-side assert on CUDA.
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        check_token_ids("input_ids", ids, self.spec.vocab_size)?;
        self.embed(ids)
    }

    /// [`CausalLm::embed_tokens`] of ids checked on the host ([`CheckedIds`]): no device→host read.
    pub fn embed_tokens_checked(&self, ids: &Tensor, checked: &CheckedIds) -> Result<Tensor> {
        checked.covers("input_ids", ids, self.spec.vocab_size)?;
        self.embed(ids)
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(Tensor::f_embedding(
            &self.model.embed_tokens.weight,
            ids,
            self.spec.pad_token_id.unwrap_or(-1),
            false,
            false,
        )?)
    }

    /// The embedding matrix (vocab, hidden), e.g. to initialise rows of added tokens.
    pub fn embed_weight(&self) -> &Tensor {
        &self.model.embed_tokens.weight
    }

    /// Last hidden state after the final norm, (B, T, H).
    ///
    /// `attention_mask` (B, T_total): 1 for real tokens, 0 for padding, covering cached and new tokens.
    /// Causal masking is always applied. Position ids continue from the cache length, or, with a mask,
    /// count real tokens only (HF `generate`'s rule, which makes left padding work). Embeddings of another
    /// floating kind than the parameters (an f32 prompt for a bf16 model) are cast to it.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        check_embeds(embeds, self.spec.hidden_size)?;
        if let Some(c) = cache.as_deref() {
            c.check(self.model.layers.len(), embeds.size()[0])?;
        }
        let embeds = embeds.to_kind(self.embed_weight().kind());
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let inputs = prepare_decoder_inputs(
            &self.model.rotary,
            &embeds,
            attention_mask,
            past,
            self.spec.sliding_window,
        )?;
        let mut xs = embeds;
        let checkpoint = self.model.checkpointing && train && cache.is_none();
        for (i, layer) in self.model.layers.iter().enumerate() {
            if checkpoint {
                let (layer, inputs) = (Arc::clone(layer), inputs.shallow_clone());
                xs = checkpointed(&xs, move |x| layer.forward_t(x, &inputs, None, true))?;
                continue;
            }
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            xs = layer.forward_t(&xs, &inputs, layer_cache, train)?;
        }
        Ok(self.model.norm.forward(&xs))
    }

    /// `lm_head` (or the tied embedding) applied to hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.linear::<&Tensor>(self.embed_weight(), None),
        }
    }

    /// Token ids -> logits (B, T, vocab).
    pub fn forward(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        let embeds = self.embed_tokens(ids)?;
        let hidden = self.forward_embeds(&embeds, attention_mask, cache, train)?;
        Ok(self.logits(&hidden))
    }

    pub fn config(&self) -> &LlmConfig {
        &self.cfg
    }

    /// Activation checkpointing of the decoder layers in training forwards (`train.activation_checkpointing`):
    /// each layer keeps only its input and is re-run in the backward pass (HF's `gradient_checkpointing_enable`).
    pub fn set_activation_checkpointing(&mut self, on: bool) {
        self.model.checkpointing = on;
    }

    /// An empty cache with one slot per layer.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.model.layers.len())
    }
}

/// The prompt of [`greedy_generate`], batch 1: token ids (1, T) or input embeddings (1, T, H).
pub enum GenerateInput {
    Ids(Tensor),
    Embeds(Tensor),
}

/// Greedy decoding with a KV cache (one prefill, then one token per step), stopping after an id in
/// `eos_ids` (which is returned, as HF `generate` does) or after `max_new_tokens`. Returns only new tokens.
pub fn greedy_generate(
    model: &CausalLm,
    prompt: GenerateInput,
    max_new_tokens: usize,
    eos_ids: &[i64],
) -> Result<Vec<i64>> {
    tch::no_grad(|| {
        let embeds = match prompt {
            GenerateInput::Ids(ids) => model.embed_tokens(&ids)?,
            GenerateInput::Embeds(e) => e,
        };
        check_embeds(&embeds, model.config().hidden_size())?;
        if embeds.size()[0] != 1 || embeds.size()[1] == 0 {
            return Err(ModelError::Input(format!(
                "greedy_generate takes one non-empty prompt, got {:?}",
                embeds.size()
            )));
        }
        let opts = crate::generate::GenerateOptions::greedy(max_new_tokens, eos_ids);
        let mut rows = crate::generate::generate(model, &embeds, None, &opts)?;
        Ok(rows.pop().unwrap_or_default())
    })
}
