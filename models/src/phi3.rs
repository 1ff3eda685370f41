//! Phi-3 (Abdin et al. 2024, "Phi-3 Technical Report") as HF transformers' `Phi3ForCausalLM` configures it:
//! [`Phi3Config`] reads the published config.json into the shared decoder of [`crate::llm`], with a fused
//! `self_attn.qkv_proj` (q, then k, then v rows), a fused `mlp.gate_up_proj` (gate rows, then up rows), no
//! biases, residual dropout (`resid_pdrop`) and an optional sliding attention window. M3D-LaMed uses
//! Phi-3-mini-4k-instruct ([`Phi3Config::phi3_mini_4k`]); build it with [`crate::llm::CausalLm`].
//!
//! Only the default RoPE is supported: the 128k variants' `longrope` and `partial_rotary_factor` < 1 are
//! rejected with a config error.

use crate::error::{ModelError, Result};
use crate::layers::Activation;
use crate::llm::{
    check_heads, resolve_rope, AttentionImpl, DecoderSpec, ProjLayout, RopeParameters, RopeScaling,
    RopeSpec, TokenIds,
};

/// HF `Phi3Config`, as found in a checkpoint's `config.json` (missing fields take HF's defaults).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Phi3Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: Option<i64>,
    pub head_dim: Option<i64>,
    pub resid_pdrop: f64,
    /// Read for completeness; transformers' Phi-3 does not apply it.
    pub embd_pdrop: f64,
    pub attention_dropout: f64,
    pub hidden_act: Activation,
    pub max_position_embeddings: i64,
    pub original_max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<TokenIds>,
    /// Also the embedding's `padding_idx`: that row gets no gradient, as in HF.
    pub pad_token_id: Option<i64>,
    /// Keys more than this many positions behind a query are masked.
    pub sliding_window: Option<i64>,
    /// Ours, not HF's: the attention kernel (numerically equivalent choices).
    pub attn_implementation: AttentionImpl,
}

impl Default for Phi3Config {
    /// transformers' `Phi3Config()` defaults (the Phi-3-mini shape).
    fn default() -> Self {
        Phi3Config {
            vocab_size: 32064,
            hidden_size: 3072,
            intermediate_size: 8192,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            resid_pdrop: 0.0,
            embd_pdrop: 0.0,
            attention_dropout: 0.0,
            hidden_act: Activation::Silu,
            max_position_embeddings: 4096,
            original_max_position_embeddings: 4096,
            rms_norm_eps: 1e-5,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(TokenIds::One(32000)),
            pad_token_id: Some(32000),
            sliding_window: None,
            attn_implementation: AttentionImpl::default(),
        }
    }
}

impl Phi3Config {
    /// `microsoft/Phi-3-mini-4k-instruct`'s config.json (theta 1e4, no RoPE scaling, window 2047).
    pub fn phi3_mini_4k() -> Self {
        Phi3Config {
            rope_theta: Some(10_000.0),
            sliding_window: Some(2047),
            ..Default::default()
        }
    }

    /// A tiny model for tests: hidden 64, 2 layers, 4 heads over 2 kv heads, vocab 128.
    pub fn debug() -> Self {
        Phi3Config {
            vocab_size: 128,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            max_position_embeddings: 128,
            original_max_position_embeddings: 128,
            rope_theta: Some(10_000.0),
            bos_token_id: Some(1),
            eos_token_id: Some(TokenIds::One(2)),
            pad_token_id: Some(0),
            ..Default::default()
        }
    }

    pub fn num_kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The RoPE, which must be the default one (`rope_type` absent or "default").
    pub fn rope(&self) -> Result<RopeSpec> {
        let p = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let kind = p
            .and_then(|p| p.rope_type.as_deref().or(p.legacy_type.as_deref()))
            .unwrap_or("default");
        if kind != "default" {
            return Err(ModelError::Config(format!(
                "phi3: RoPE type `{kind}` is not supported (only the default RoPE of the 4k models)"
            )));
        }
        let spec = resolve_rope(
            "phi3",
            self.rope_theta,
            self.rope_scaling.as_ref(),
            self.rope_parameters.as_ref(),
            self.head_dim(),
            self.max_position_embeddings,
        )?;
        debug_assert_eq!(spec.scaling, RopeScaling::None);
        Ok(spec)
    }

    /// Checks what serde cannot: head counts that divide, the default RoPE, a positive window.
    pub fn validate(&self) -> Result<()> {
        self.spec().map(|_| ())
    }

    pub(crate) fn spec(&self) -> Result<DecoderSpec> {
        check_heads(
            "phi3",
            self.hidden_size,
            self.num_attention_heads,
            self.num_kv_heads(),
            self.head_dim,
        )?;
        if let Some(w) = self.sliding_window {
            if w <= 0 {
                return Err(ModelError::Config(format!(
                    "phi3: sliding_window must be positive, got {w}"
                )));
            }
        }
        Ok(DecoderSpec {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_kv_heads(),
            head_dim: self.head_dim(),
            act: self.hidden_act,
            rms_norm_eps: self.rms_norm_eps,
            attention_dropout: self.attention_dropout,
            resid_pdrop: self.resid_pdrop,
            sliding_window: self.sliding_window,
            tie_word_embeddings: self.tie_word_embeddings,
            pad_token_id: self.pad_token_id,
            attn_implementation: self.attn_implementation,
            rope: self.rope()?,
            layout: ProjLayout::Fused,
        })
    }
}
