//! Llama (Touvron et al. 2023, "Llama 2"; Meta 2024, "The Llama 3 Herd of Models") as HF transformers'
//! `LlamaForCausalLM` configures it: [`LlamaConfig`] reads the published config.json (both the
//! transformers 4 `rope_scaling` and the 5 `rope_parameters` forms) into the shared decoder of
//! [`crate::llm`], with separate `q_proj`/`k_proj`/`v_proj`/`o_proj` and `gate_proj`/`up_proj`/`down_proj`
//! (optional biases), no residual dropout, and RoPE default, linear, dynamic or llama3. Parameter names are
//! the HF checkpoint keys (`model.layers.N.self_attn.q_proj.weight`, ...).
//!
//! M3D-LaMed uses Llama-2-7B-chat ([`LlamaConfig::llama2_7b`]) or Llama-3-8B-Instruct
//! ([`LlamaConfig::llama3_8b`]) as its language model; build it with [`crate::llm::CausalLm`].

use crate::error::Result;
use crate::layers::Activation;
use crate::llm::{
    check_heads, resolve_rope, AttentionImpl, DecoderSpec, ProjLayout, RopeParameters, RopeSpec,
    TokenIds,
};

/// HF `LlamaConfig`, as found in a checkpoint's `config.json` (missing fields take HF's defaults).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct LlamaConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// Defaults to `num_attention_heads` (no grouped-query attention).
    pub num_key_value_heads: Option<i64>,
    /// Defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<i64>,
    pub hidden_act: Activation,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    /// transformers 4.x: top-level base (`rope_parameters.rope_theta` takes precedence).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// transformers 4.x scaling dict (`{"type"|"rope_type": "linear", "factor": ..}`, llama3, dynamic).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    /// transformers 5.x form: type, theta and scaling in one dict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    pub attention_bias: bool,
    pub attention_dropout: f64,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<TokenIds>,
    /// Also the embedding's `padding_idx`: that row gets no gradient, as in HF.
    pub pad_token_id: Option<i64>,
    /// Ours, not HF's: the attention kernel (numerically equivalent choices).
    pub attn_implementation: AttentionImpl,
}

impl Default for LlamaConfig {
    /// transformers' `LlamaConfig()` defaults (a Llama-2-7B shape with a 2048 context).
    fn default() -> Self {
        LlamaConfig {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: Activation::Silu,
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            attention_bias: false,
            attention_dropout: 0.0,
            mlp_bias: false,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(TokenIds::One(2)),
            pad_token_id: None,
            attn_implementation: AttentionImpl::default(),
        }
    }
}

impl LlamaConfig {
    /// `meta-llama/Llama-2-7b-chat-hf`'s config.json.
    pub fn llama2_7b() -> Self {
        LlamaConfig {
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-5,
            rope_theta: Some(10_000.0),
            ..Default::default()
        }
    }

    /// `meta-llama/Meta-Llama-3-8B-Instruct`'s config.json (8 kv heads, theta 5e5, no RoPE scaling).
    pub fn llama3_8b() -> Self {
        LlamaConfig {
            vocab_size: 128_256,
            intermediate_size: 14336,
            num_key_value_heads: Some(8),
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-5,
            rope_theta: Some(500_000.0),
            bos_token_id: Some(128_000),
            eos_token_id: Some(TokenIds::One(128_009)),
            ..Default::default()
        }
    }

    /// A tiny model for tests: hidden 64, 2 layers, 4 heads over 2 kv heads, vocab 128.
    pub fn debug() -> Self {
        LlamaConfig {
            vocab_size: 128,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            max_position_embeddings: 128,
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

    /// The RoPE variant, from whichever of the old/new config forms is present.
    pub fn rope(&self) -> Result<RopeSpec> {
        resolve_rope(
            "llama",
            self.rope_theta,
            self.rope_scaling.as_ref(),
            self.rope_parameters.as_ref(),
            self.head_dim(),
            self.max_position_embeddings,
        )
    }

    /// Checks what serde cannot: head counts that divide, a supported RoPE.
    pub fn validate(&self) -> Result<()> {
        self.spec().map(|_| ())
    }

    pub(crate) fn spec(&self) -> Result<DecoderSpec> {
        check_heads(
            "llama",
            self.hidden_size,
            self.num_attention_heads,
            self.num_kv_heads(),
            self.head_dim,
        )?;
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
            resid_pdrop: 0.0,
            sliding_window: None,
            tie_word_embeddings: self.tie_word_embeddings,
            pad_token_id: self.pad_token_id,
            attn_implementation: self.attn_implementation,
            rope: self.rope()?,
            layout: ProjLayout::Separate {
                attention_bias: self.attention_bias,
                mlp_bias: self.mlp_bias,
            },
        })
    }
}
