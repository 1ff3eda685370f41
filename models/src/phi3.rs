//! Phi-3 (Abdin et al. 2024, "Phi-3 Technical Report") as HF transformers' `Phi3ForCausalLM` lays it out:
//! a Llama-style pre-norm decoder with a fused `self_attn.qkv_proj` (q, then k, then v rows), a fused
//! `mlp.gate_up_proj` (gate rows, then up rows), residual dropout (`resid_pdrop`) and an optional sliding
//! attention window. M3D-LaMed uses Phi-3-mini-4k-instruct ([`Phi3Config::phi3_mini_4k`]).
//!
//! Only the default RoPE is supported: the 128k variants' `longrope` and `partial_rotary_factor` < 1 are
//! rejected with a config error.

use tch::Tensor;

use crate::builder::VarBuilder;
use crate::error::{ModelError, Result};
use crate::layers::{dropout, Activation, Embedding, Linear, RmsNorm};
use crate::llama::check_heads;
use crate::llm::{
    apply_rotary, attention, check_embeds, embed, prepare_decoder_inputs, resolve_rope,
    AttentionImpl, DecoderInputs, KvCache, LlmConfig, RopeParameters, RopeScaling, RopeSpec,
    RotaryEmbedding, TokenIds,
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

    pub fn validate(&self) -> Result<()> {
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
        self.rope().map(|_| ())
    }
}

/// `self_attn`: one fused projection to q, k and v, RoPE, grouped-query attention, `o_proj`.
#[derive(Debug)]
pub struct Phi3Attention {
    pub qkv_proj: Linear,
    pub o_proj: Linear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    dropout: f64,
    imp: AttentionImpl,
}

impl Phi3Attention {
    pub fn new(vb: &VarBuilder, cfg: &Phi3Config) -> Result<Self> {
        let (h, kvh, d) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        Ok(Phi3Attention {
            qkv_proj: Linear::new(
                &vb.pp("qkv_proj"),
                cfg.hidden_size,
                (h + 2 * kvh) * d,
                false,
            )?,
            o_proj: Linear::new(&vb.pp("o_proj"), h * d, cfg.hidden_size, false)?,
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
        let d = self.head_dim;
        let qkv = self.qkv_proj.forward_t(xs, train);
        let parts = qkv.split_with_sizes(
            [
                self.num_heads * d,
                self.num_kv_heads * d,
                self.num_kv_heads * d,
            ],
            -1,
        );
        let heads = |x: &Tensor, n: i64| x.reshape([b, t, n, d]).transpose(1, 2);
        let q = apply_rotary(&heads(&parts[0], self.num_heads), &inputs.cos, &inputs.sin);
        let k = apply_rotary(
            &heads(&parts[1], self.num_kv_heads),
            &inputs.cos,
            &inputs.sin,
        );
        let v = heads(&parts[2], self.num_kv_heads);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v)?,
            None => (k, v),
        };
        let out = attention(&q, &k, &v, &inputs.bias, self.dropout, train, self.imp);
        Ok(self.o_proj.forward_t(&out, train))
    }
}

/// `mlp`: `down_proj(up * act(gate))` with gate and up from one fused `gate_up_proj`.
#[derive(Debug)]
pub struct Phi3Mlp {
    pub gate_up_proj: Linear,
    pub down_proj: Linear,
    act: Activation,
}

impl Phi3Mlp {
    pub fn new(vb: &VarBuilder, cfg: &Phi3Config) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Phi3Mlp {
            gate_up_proj: Linear::new(&vb.pp("gate_up_proj"), h, 2 * i, false)?,
            down_proj: Linear::new(&vb.pp("down_proj"), i, h, false)?,
            act: cfg.hidden_act,
        })
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let gate_up = self.gate_up_proj.forward_t(xs, train).chunk(2, -1);
        let hidden = &gate_up[1] * self.act.forward(&gate_up[0]);
        self.down_proj.forward_t(&hidden, train)
    }
}

/// `model.layers.N`: pre-norm residual attention and MLP, each residual branch with dropout.
#[derive(Debug)]
pub struct Phi3DecoderLayer {
    pub self_attn: Phi3Attention,
    pub mlp: Phi3Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    resid_pdrop: f64,
}

impl Phi3DecoderLayer {
    pub fn new(vb: &VarBuilder, cfg: &Phi3Config) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Phi3DecoderLayer {
            self_attn: Phi3Attention::new(&vb.pp("self_attn"), cfg)?,
            mlp: Phi3Mlp::new(&vb.pp("mlp"), cfg)?,
            input_layernorm: RmsNorm::new(&vb.pp("input_layernorm"), h, eps)?,
            post_attention_layernorm: RmsNorm::new(&vb.pp("post_attention_layernorm"), h, eps)?,
            resid_pdrop: cfg.resid_pdrop,
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
        let xs = xs + dropout(attn, self.resid_pdrop, train);
        let mlp = self
            .mlp
            .forward_t(&self.post_attention_layernorm.forward(&xs), train);
        Ok(&xs + dropout(mlp, self.resid_pdrop, train))
    }
}

/// `model`: embeddings, decoder layers, final norm.
#[derive(Debug)]
pub struct Phi3Model {
    pub embed_tokens: Embedding,
    pub layers: Vec<Phi3DecoderLayer>,
    pub norm: RmsNorm,
    rotary: RotaryEmbedding,
    padding_idx: Option<i64>,
    hidden_size: i64,
    sliding_window: Option<i64>,
}

impl Phi3Model {
    pub fn new(vb: &VarBuilder, cfg: &Phi3Config) -> Result<Self> {
        cfg.validate()?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Phi3DecoderLayer::new(&vb.pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Phi3Model {
            embed_tokens: Embedding::new(&vb.pp("embed_tokens"), cfg.vocab_size, cfg.hidden_size)?,
            layers,
            norm: RmsNorm::new(&vb.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            rotary: RotaryEmbedding::new(cfg.rope()?, vb.device()),
            padding_idx: cfg.pad_token_id,
            hidden_size: cfg.hidden_size,
            sliding_window: cfg.sliding_window,
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
        let inputs = prepare_decoder_inputs(
            &self.rotary,
            embeds,
            attention_mask,
            past,
            self.sliding_window,
        )?;
        let mut xs = embeds.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            xs = layer.forward_t(&xs, &inputs, layer_cache, train)?;
        }
        Ok(self.norm.forward(&xs))
    }
}

/// `Phi3ForCausalLM`: [`Phi3Model`] under `model.` and `lm_head` (absent when tied).
#[derive(Debug)]
pub struct Phi3 {
    pub model: Phi3Model,
    pub lm_head: Option<Linear>,
    cfg: LlmConfig,
}

impl Phi3 {
    pub fn new(vb: &VarBuilder, cfg: &Phi3Config) -> Result<Self> {
        let model = Phi3Model::new(&vb.pp("model"), cfg)?;
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
        Ok(Phi3 {
            model,
            lm_head,
            cfg: LlmConfig::Phi3(cfg.clone()),
        })
    }

    pub fn llm_config(&self) -> &LlmConfig {
        &self.cfg
    }

    pub fn embed_weight(&self) -> &Tensor {
        &self.model.embed_tokens.weight
    }

    /// Panics on ids outside the vocabulary; see [`Phi3::try_embed_tokens`].
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
