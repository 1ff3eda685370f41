//! BERT encoder (Devlin et al., arXiv:1810.04805) in the layout of Hugging Face `transformers`' `BertModel`
//! (`models/bert/modeling_bert.py`, checked against transformers 5.23): absolute position embeddings,
//! post-norm layers, optional tanh pooler. M3D-CLIP's text encoder is `bert-base-uncased` as a `BertModel`.
//!
//! RoBERTa (`RobertaModel`, Liu et al., arXiv:1907.11692; `config.json` `model_type: roberta`) is the same
//! network with one difference this model honours: positions count from `pad_token_id + 1` over the non-padding
//! tokens (`create_position_ids_from_input_ids`), so padding does not move them. BERTScore's encoder is
//! `roberta-large`.
//!
//! Checkpoint keys are `BertModel`'s (`embeddings.*`, `encoder.layer.N.*`, `pooler.dense.*`). Checkpoints of
//! the pre-training heads (`BertForPreTraining`, e.g. `bert-base-uncased/model.safetensors`) put them under
//! `bert.` — load those with `KeyMap::select_prefix("bert.")` (which also drops the `cls.*` heads). Files
//! written by transformers < 4.31 (e.g. all-MiniLM-L6-v2) also hold the `embeddings.position_ids` buffer that
//! current transformers no longer saves; [`hf_load_options`] skips it. This model has no such buffer: the
//! positions are always `0..T`.

use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::builder::VarBuilder;
use crate::error::{ModelError, Result};
use crate::layers::{
    check_token_ids, checkpointed, dropout, dtype_min, Activation, CheckedIds, Embedding,
    LayerNorm, Linear,
};
use crate::weights::LoadOptions;

/// The fields of an HF BERT `config.json` this model uses; absent fields take `transformers.BertConfig`'s
/// defaults (which are bert-base-uncased).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct BertConfig {
    /// `bert` or `roberta` (see the module docs); BERT when absent.
    #[serde(default = "d::model_type")]
    pub model_type: String,
    #[serde(default = "d::vocab_size")]
    pub vocab_size: i64,
    #[serde(default = "d::hidden_size")]
    pub hidden_size: i64,
    #[serde(default = "d::num_hidden_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "d::num_attention_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d::intermediate_size")]
    pub intermediate_size: i64,
    #[serde(default = "d::hidden_act")]
    pub hidden_act: Activation,
    #[serde(default = "d::max_position_embeddings")]
    pub max_position_embeddings: i64,
    #[serde(default = "d::type_vocab_size")]
    pub type_vocab_size: i64,
    #[serde(default = "d::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d::dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "d::dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default)]
    pub pad_token_id: i64,
    /// Only "absolute" is implemented (what every BERT checkpoint M3D touches uses).
    #[serde(default = "d::position_embedding_type")]
    pub position_embedding_type: String,
    /// `BertModel(config, add_pooling_layer=...)`: not in `config.json`; `BertModel` defaults to a pooler,
    /// and M3D-CLIP's `language_encoder` has one (saved, never used).
    #[serde(default = "d::yes")]
    pub add_pooling_layer: bool,
}

mod d {
    use crate::layers::Activation;
    pub fn model_type() -> String {
        "bert".into()
    }
    pub fn vocab_size() -> i64 {
        30522
    }
    pub fn hidden_size() -> i64 {
        768
    }
    pub fn num_hidden_layers() -> i64 {
        12
    }
    pub fn num_attention_heads() -> i64 {
        12
    }
    pub fn intermediate_size() -> i64 {
        3072
    }
    pub fn hidden_act() -> Activation {
        Activation::Gelu
    }
    pub fn max_position_embeddings() -> i64 {
        512
    }
    pub fn type_vocab_size() -> i64 {
        2
    }
    pub fn layer_norm_eps() -> f64 {
        1e-12
    }
    pub fn dropout() -> f64 {
        0.1
    }
    pub fn position_embedding_type() -> String {
        "absolute".into()
    }
    pub fn yes() -> bool {
        true
    }
}

impl BertConfig {
    /// `bert-base-uncased`: 12 layers, hidden 768, 12 heads, vocabulary 30522, 512 positions.
    pub fn bert_base_uncased() -> Self {
        BertConfig {
            model_type: d::model_type(),
            vocab_size: d::vocab_size(),
            hidden_size: d::hidden_size(),
            num_hidden_layers: d::num_hidden_layers(),
            num_attention_heads: d::num_attention_heads(),
            intermediate_size: d::intermediate_size(),
            hidden_act: Activation::Gelu,
            max_position_embeddings: d::max_position_embeddings(),
            type_vocab_size: d::type_vocab_size(),
            layer_norm_eps: d::layer_norm_eps(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            pad_token_id: 0,
            position_embedding_type: d::position_embedding_type(),
            add_pooling_layer: true,
        }
    }

    /// A tiny configuration for tests: vocabulary 99, hidden 32, 2 layers, 4 heads, no dropout.
    pub fn debug() -> Self {
        BertConfig {
            vocab_size: 99,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 37,
            max_position_embeddings: 64,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            ..Self::bert_base_uncased()
        }
    }

    pub fn is_roberta(&self) -> bool {
        self.model_type == "roberta"
    }

    /// The longest input: RoBERTa's positions start at `pad_token_id + 1` (514 positions hold 512 tokens).
    pub fn max_tokens(&self) -> i64 {
        if self.is_roberta() {
            self.max_position_embeddings - self.pad_token_id - 1
        } else {
            self.max_position_embeddings
        }
    }

    /// Reads an HF `config.json`.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let cfg: Self = crate::error::read_json(path)?;
        cfg.validate()
            .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(format!("BERT: {m}")));
        if self.vocab_size < 1
            || self.hidden_size < 1
            || self.intermediate_size < 1
            || self.max_position_embeddings < 1
            || self.type_vocab_size < 1
            || self.num_hidden_layers < 0
        {
            return bad(format!("sizes must be positive: {self:?}"));
        }
        if self.num_attention_heads < 1 || self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.model_type != "bert" && self.model_type != "roberta" {
            return bad(format!(
                "model_type `{}` is not supported (bert or roberta)",
                self.model_type
            ));
        }
        if self.is_roberta() && (self.pad_token_id < 0 || self.max_tokens() < 1) {
            return bad(format!(
                "RoBERTa positions start after pad_token_id {}, past max_position_embeddings {}",
                self.pad_token_id, self.max_position_embeddings
            ));
        }
        if self.position_embedding_type != "absolute" {
            return bad(format!(
                "position_embedding_type `{}` is not supported (only `absolute`)",
                self.position_embedding_type
            ));
        }
        Ok(())
    }
}

/// Loading options for HF BERT checkpoints: strict, but the `embeddings.position_ids` /
/// `embeddings.token_type_ids` buffers older transformers versions saved are skipped.
pub fn hf_load_options() -> LoadOptions {
    LoadOptions::default()
        .ignore_unexpected("embeddings.position_ids")
        .ignore_unexpected("embeddings.token_type_ids")
}

#[derive(Debug)]
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub token_type_embeddings: Embedding,
    pub layer_norm: LayerNorm,
    pad_token_id: i64,
    roberta: bool,
    dropout: f64,
}

impl BertEmbeddings {
    pub fn new(vb: &VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(BertEmbeddings {
            word_embeddings: Embedding::new(&vb.pp("word_embeddings"), cfg.vocab_size, h)?,
            position_embeddings: Embedding::new(
                &vb.pp("position_embeddings"),
                cfg.max_position_embeddings,
                h,
            )?,
            token_type_embeddings: Embedding::new(
                &vb.pp("token_type_embeddings"),
                cfg.type_vocab_size,
                h,
            )?,
            layer_norm: LayerNorm::new(&vb.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            pad_token_id: cfg.pad_token_id,
            roberta: cfg.is_roberta(),
            dropout: cfg.hidden_dropout_prob,
        })
    }

    pub fn forward_t(&self, input_ids: &Tensor, token_type_ids: &Tensor, train: bool) -> Tensor {
        let positions = if self.roberta {
            let real = input_ids.ne(self.pad_token_id).to_kind(Kind::Int64);
            real.cumsum(1, Kind::Int64) * &real + self.pad_token_id
        } else {
            let t = input_ids.size()[1];
            Tensor::arange(t, (Kind::Int64, input_ids.device())).unsqueeze(0)
        };
        // `nn.Embedding(padding_idx=pad_token_id)`: the pad row gets no gradient, so it is never trained.
        let words = Tensor::embedding(
            &self.word_embeddings.weight,
            input_ids,
            self.pad_token_id,
            false,
            false,
        );
        let x = words
            + self.token_type_embeddings.forward(token_type_ids)
            + self.position_embeddings.forward(&positions);
        dropout(self.layer_norm.forward(&x), self.dropout, train)
    }
}

/// `attention.self` (query/key/value) followed by `attention.output` (dense, residual, LayerNorm).
#[derive(Debug)]
pub struct BertAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub output_dense: Linear,
    pub output_layer_norm: LayerNorm,
    num_heads: i64,
    attn_dropout: f64,
    hidden_dropout: f64,
}

impl BertAttention {
    pub fn new(vb: &VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let s = vb.pp("self");
        let o = vb.pp("output");
        Ok(BertAttention {
            query: Linear::new(&s.pp("query"), h, h, true)?,
            key: Linear::new(&s.pp("key"), h, h, true)?,
            value: Linear::new(&s.pp("value"), h, h, true)?,
            output_dense: Linear::new(&o.pp("dense"), h, h, true)?,
            output_layer_norm: LayerNorm::new(&o.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            num_heads: cfg.num_attention_heads,
            attn_dropout: cfg.attention_probs_dropout_prob,
            hidden_dropout: cfg.hidden_dropout_prob,
        })
    }

    /// `bias`: additive (B, 1, 1, T) key mask in the activations' dtype (0 = attend, dtype min = padding).
    pub fn forward_t(&self, x: &Tensor, bias: &Tensor, train: bool) -> Tensor {
        let (b, t, h) = x.size3().unwrap_or_default();
        let dh = h / self.num_heads;
        let heads = |l: &Linear| {
            l.forward_t(x, train)
                .reshape([b, t, self.num_heads, dh])
                .transpose(1, 2)
        };
        let (q, k, v) = (heads(&self.query), heads(&self.key), heads(&self.value));
        let p = if train { self.attn_dropout } else { 0.0 };
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(bias),
            p,
            false,
            (dh as f64).powf(-0.5),
            false,
        );
        let y = y.transpose(1, 2).reshape([b, t, h]);
        let y = dropout(
            self.output_dense.forward_t(&y, train),
            self.hidden_dropout,
            train,
        );
        self.output_layer_norm.forward(&(y + x))
    }
}

/// `encoder.layer.N`: attention, then `intermediate.dense` + activation, `output.dense`, residual, LayerNorm.
#[derive(Debug)]
pub struct BertLayer {
    pub attention: BertAttention,
    pub intermediate: Linear,
    pub output_dense: Linear,
    pub output_layer_norm: LayerNorm,
    act: Activation,
    hidden_dropout: f64,
}

impl BertLayer {
    pub fn new(vb: &VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let (h, m) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(BertLayer {
            attention: BertAttention::new(&vb.pp("attention"), cfg)?,
            intermediate: Linear::new(&vb.pp("intermediate.dense"), h, m, true)?,
            output_dense: Linear::new(&vb.pp("output.dense"), m, h, true)?,
            output_layer_norm: LayerNorm::new(&vb.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?,
            act: cfg.hidden_act,
            hidden_dropout: cfg.hidden_dropout_prob,
        })
    }

    pub fn forward_t(&self, x: &Tensor, bias: &Tensor, train: bool) -> Tensor {
        let a = self.attention.forward_t(x, bias, train);
        let y = self.act.forward(&self.intermediate.forward_t(&a, train));
        let y = dropout(
            self.output_dense.forward_t(&y, train),
            self.hidden_dropout,
            train,
        );
        self.output_layer_norm.forward(&(y + a))
    }
}

/// HF `BertModel`.
#[derive(Debug)]
pub struct Bert {
    pub embeddings: BertEmbeddings,
    /// Shared, so that an activation checkpoint can hold its layer until the backward pass re-runs it.
    pub layers: Vec<Arc<BertLayer>>,
    /// `pooler.dense` (tanh of the first token); M3D-CLIP keeps it in its state dict but never uses it.
    pub pooler: Option<Linear>,
    cfg: BertConfig,
    /// Re-run each layer in the backward pass instead of keeping its activations (training forwards only).
    checkpointing: bool,
}

impl Bert {
    pub fn new(vb: &VarBuilder, cfg: &BertConfig) -> Result<Self> {
        cfg.validate()?;
        let embeddings = BertEmbeddings::new(&vb.pp("embeddings"), cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::new(&vb.pp("encoder.layer").pp(i), cfg).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        let pooler = if cfg.add_pooling_layer {
            let h = cfg.hidden_size;
            Some(Linear::new(&vb.pp("pooler.dense"), h, h, true)?)
        } else {
            None
        };
        Ok(Bert {
            embeddings,
            layers,
            pooler,
            cfg: cfg.clone(),
            checkpointing: false,
        })
    }

    /// Activation checkpointing of the layers in training forwards (`train.activation_checkpointing`): each
    /// layer keeps only its input and is re-run in the backward pass.
    pub fn set_activation_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// `input_ids`, `attention_mask` (1 = token, 0 = padding) and `token_type_ids` (default all 0): (B, T)
    /// integers. Returns `last_hidden_state` (B, T, hidden). Panics (in libtorch) on mis-shaped inputs;
    /// [`Bert::f_forward_t`] checks first.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let zeros;
        let token_type_ids = match token_type_ids {
            Some(t) => t,
            None => {
                zeros = input_ids.zeros_like();
                &zeros
            }
        };
        let mut x = self.embeddings.forward_t(input_ids, token_type_ids, train);
        // HF's additive mask: 0 where attended, the dtype's minimum on padding keys. Unlike a boolean mask
        // this stays finite for an all-padding row (uniform attention, as HF's eager path gives).
        let kind = x.kind();
        let keep = attention_mask.to_kind(kind).unsqueeze(1).unsqueeze(1);
        let bias = (keep.ones_like() - keep) * dtype_min(kind);
        for layer in &self.layers {
            x = if self.checkpointing && train {
                let (layer, bias) = (Arc::clone(layer), bias.shallow_clone());
                // Only a libtorch error inside the layer fails here, where the plain layer panics.
                checkpointed(&x, move |x| Ok(layer.forward_t(x, &bias, true)))
                    .unwrap_or_else(|e| panic!("{e}"))
            } else {
                layer.forward_t(&x, &bias, train)
            };
        }
        x
    }

    /// [`Bert::forward_t`] after checking shapes, dtypes and ranges, with typed errors.
    pub fn f_forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.f_forward_t_with(input_ids, attention_mask, token_type_ids, None, train)
    }

    /// [`Bert::f_forward_t`] of `input_ids` checked on the host ([`CheckedIds`]): their range is not read back
    /// from the device.
    pub fn f_forward_t_checked(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
        checked: &CheckedIds,
        train: bool,
    ) -> Result<Tensor> {
        self.f_forward_t_with(
            input_ids,
            attention_mask,
            token_type_ids,
            Some(checked),
            train,
        )
    }

    fn f_forward_t_with(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
        checked: Option<&CheckedIds>,
        train: bool,
    ) -> Result<Tensor> {
        let s = input_ids.size();
        match checked {
            Some(c) => c.covers("BERT input_ids", input_ids, self.cfg.vocab_size)?,
            None => check_token_ids("BERT input_ids", input_ids, self.cfg.vocab_size)?,
        }
        if s[1] > self.cfg.max_tokens() {
            return Err(ModelError::Input(format!(
                "{} input of {} tokens exceeds its {} positions",
                self.cfg.model_type,
                s[1],
                self.cfg.max_tokens()
            )));
        }
        for (name, t) in [
            ("attention_mask", Some(attention_mask)),
            ("token_type_ids", token_type_ids),
        ] {
            if let Some(t) = t {
                if t.size() != s {
                    return Err(ModelError::Shape {
                        name: format!("BERT {name}"),
                        expected: s.clone(),
                        got: t.size(),
                    });
                }
            }
        }
        if let Some(t) = token_type_ids {
            check_token_ids("BERT token_type_ids", t, self.cfg.type_vocab_size)?;
        }
        Ok(self.forward_t(input_ids, attention_mask, token_type_ids, train))
    }

    /// `BertPooler`: tanh(dense(hidden[:, 0])); `None` without a pooler.
    pub fn pooled(&self, last_hidden_state: &Tensor) -> Option<Tensor> {
        self.pooler
            .as_ref()
            .map(|p| p.forward(&last_hidden_state.select(1, 0)).tanh())
    }
}
