//! Llama (Touvron et al. 2023, "Llama 2"; Meta 2024, "The Llama 3 Herd of Models") as HF transformers'
//! `LlamaForCausalLM` lays it out: pre-norm decoder blocks of RMSNorm, rotary grouped-query self-attention
//! and a SwiGLU MLP, a final RMSNorm and `lm_head` (tied to `model.embed_tokens` when
//! `tie_word_embeddings`). Parameter names are the HF checkpoint keys (`model.layers.N.self_attn.q_proj`, ...).
//!
//! M3D-LaMed uses Llama-2-7B-chat ([`LlamaConfig::llama2_7b`]) or Llama-3-8B-Instruct
//! ([`LlamaConfig::llama3_8b`]) as its language model.

use tch::Tensor;

use crate::builder::VarBuilder;
use crate::error::{ModelError, Result};
use crate::layers::{Activation, Embedding, Linear, RmsNorm};
use crate::llm::{
    apply_rotary, attention, check_embeds, embed, prepare_decoder_inputs, resolve_rope,
    AttentionImpl, DecoderInputs, KvCache, LlmConfig, RopeParameters, RopeSpec, RotaryEmbedding,
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

    pub fn validate(&self) -> Result<()> {
        check_heads(
            "llama",
            self.hidden_size,
            self.num_attention_heads,
            self.num_kv_heads(),
            self.head_dim,
        )?;
        self.rope().map(|_| ())
    }
}

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

/// `self_attn`: separate q/k/v/o projections, RoPE on q and k, grouped-query attention.
#[derive(Debug)]
pub struct LlamaAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    dropout: f64,
    imp: AttentionImpl,
}

impl LlamaAttention {
    pub fn new(vb: &VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (h, kvh, d) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let bias = cfg.attention_bias;
        Ok(LlamaAttention {
            q_proj: Linear::new(&vb.pp("q_proj"), cfg.hidden_size, h * d, bias)?,
            k_proj: Linear::new(&vb.pp("k_proj"), cfg.hidden_size, kvh * d, bias)?,
            v_proj: Linear::new(&vb.pp("v_proj"), cfg.hidden_size, kvh * d, bias)?,
            o_proj: Linear::new(&vb.pp("o_proj"), h * d, cfg.hidden_size, bias)?,
            num_heads: h,
            num_kv_heads: kvh,
            head_dim: d,
            dropout: cfg.attention_dropout,
            imp: cfg.attn_implementation,
        })
    }

    pub(crate) fn forward_t(
        &self,
        xs: &Tensor,
        inputs: &DecoderInputs,
        cache: Option<(&mut KvCache, usize)>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = (xs.size()[0], xs.size()[1]);
        let heads = |x: Tensor, n: i64| x.view([b, t, n, self.head_dim]).transpose(1, 2);
        let q = heads(self.q_proj.forward_t(xs, train), self.num_heads);
        let k = heads(self.k_proj.forward_t(xs, train), self.num_kv_heads);
        let v = heads(self.v_proj.forward_t(xs, train), self.num_kv_heads);
        let q = apply_rotary(&q, &inputs.cos, &inputs.sin);
        let k = apply_rotary(&k, &inputs.cos, &inputs.sin);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v)?,
            None => (k, v),
        };
        let out = attention(&q, &k, &v, &inputs.bias, self.dropout, train, self.imp);
        Ok(self.o_proj.forward_t(&out, train))
    }
}

/// `mlp`: `down_proj(act(gate_proj(x)) * up_proj(x))` (SwiGLU with `hidden_act` = silu).
#[derive(Debug)]
pub struct LlamaMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    act: Activation,
}

impl LlamaMlp {
    pub fn new(vb: &VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(LlamaMlp {
            gate_proj: Linear::new(&vb.pp("gate_proj"), h, i, bias)?,
            up_proj: Linear::new(&vb.pp("up_proj"), h, i, bias)?,
            down_proj: Linear::new(&vb.pp("down_proj"), i, h, bias)?,
            act: cfg.hidden_act,
        })
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let gate = self.act.forward(&self.gate_proj.forward_t(xs, train));
        self.down_proj
            .forward_t(&(gate * self.up_proj.forward_t(xs, train)), train)
    }
}

/// `model.layers.N`: pre-norm residual attention and MLP.
#[derive(Debug)]
pub struct LlamaDecoderLayer {
    pub self_attn: LlamaAttention,
    pub mlp: LlamaMlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl LlamaDecoderLayer {
    pub fn new(vb: &VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(LlamaDecoderLayer {
            self_attn: LlamaAttention::new(&vb.pp("self_attn"), cfg)?,
            mlp: LlamaMlp::new(&vb.pp("mlp"), cfg)?,
            input_layernorm: RmsNorm::new(&vb.pp("input_layernorm"), h, eps)?,
            post_attention_layernorm: RmsNorm::new(&vb.pp("post_attention_layernorm"), h, eps)?,
        })
    }

    pub(crate) fn forward_t(
        &self,
        xs: &Tensor,
        inputs: &DecoderInputs,
        cache: Option<(&mut KvCache, usize)>,
        train: bool,
    ) -> Result<Tensor> {
        let attn =
            self.self_attn
                .forward_t(&self.input_layernorm.forward(xs), inputs, cache, train)?;
        let xs = xs + attn;
        let mlp = self
            .mlp
            .forward_t(&self.post_attention_layernorm.forward(&xs), train);
        Ok(xs + mlp)
    }
}

/// `model`: embeddings, decoder layers, final norm.
#[derive(Debug)]
pub struct LlamaModel {
    pub embed_tokens: Embedding,
    pub layers: Vec<LlamaDecoderLayer>,
    pub norm: RmsNorm,
    rotary: RotaryEmbedding,
    padding_idx: Option<i64>,
    hidden_size: i64,
}

impl LlamaModel {
    pub fn new(vb: &VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        cfg.validate()?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| LlamaDecoderLayer::new(&vb.pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(LlamaModel {
            embed_tokens: Embedding::new(&vb.pp("embed_tokens"), cfg.vocab_size, cfg.hidden_size)?,
            layers,
            norm: RmsNorm::new(&vb.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            rotary: RotaryEmbedding::new(cfg.rope()?, vb.device()),
            padding_idx: cfg.pad_token_id,
            hidden_size: cfg.hidden_size,
        })
    }

    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        embed(&self.embed_tokens.weight, ids, self.padding_idx)
    }

    /// Hidden states after the final norm; see [`crate::llm::CausalLm::forward_embeds`].
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        check_embeds(embeds, self.hidden_size)?;
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let inputs = prepare_decoder_inputs(&self.rotary, embeds, attention_mask, past, None)?;
        let mut xs = embeds.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            xs = layer.forward_t(&xs, &inputs, layer_cache, train)?;
        }
        Ok(self.norm.forward(&xs))
    }
}

/// `LlamaForCausalLM`: [`LlamaModel`] under `model.` and `lm_head` (absent when tied).
#[derive(Debug)]
pub struct Llama {
    pub model: LlamaModel,
    pub lm_head: Option<Linear>,
    cfg: LlmConfig,
}

impl Llama {
    pub fn new(vb: &VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let model = LlamaModel::new(&vb.pp("model"), cfg)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Linear::new(
                &vb.pp("lm_head"),
                cfg.hidden_size,
                cfg.vocab_size,
                false,
            )?)
        };
        Ok(Llama {
            model,
            lm_head,
            cfg: LlmConfig::Llama(cfg.clone()),
        })
    }

    pub fn llm_config(&self) -> &LlmConfig {
        &self.cfg
    }

    pub fn embed_weight(&self) -> &Tensor {
        &self.model.embed_tokens.weight
    }

    /// Panics on ids outside the vocabulary; see [`Llama::try_embed_tokens`].
    pub fn embed_tokens(&self, ids: &Tensor) -> Tensor {
        let padding_idx = self.model.padding_idx.unwrap_or(-1);
        Tensor::embedding(
            &self.model.embed_tokens.weight,
            ids,
            padding_idx,
            false,
            false,
        )
    }

    pub fn try_embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        self.model.embed(ids)
    }

    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        self.model
            .forward_embeds(embeds, attention_mask, cache, train)
    }

    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.linear::<&Tensor>(&self.model.embed_tokens.weight, None),
        }
    }
}
