//! Activation memory of one micro-batch: what autograd keeps from the forward pass for the backward one,
//! counted tensor by tensor from how our layers compute (`m3d_models`), per token of each component.
//!
//! The rules the counts follow (PyTorch's autograd, which libtorch is):
//! - an operation saves an input only if the gradient of *another* input that requires grad needs it: a
//!   frozen `Linear` saves nothing of its input (only its weight), a trained one saves its input;
//! - element-wise products save both factors, `silu`/`gelu` their input, `layer_norm` its input (plus a
//!   mean and a reciprocal std per token), our `RmsNorm` its input in f32 (a copy in bf16) and, when its
//!   weight trains, the normalised value;
//! - attention is the fused kernel (flash on CUDA and, without dropout, on the CPU): it saves q, k, v (k and v
//!   repeated to every head under grouped-query attention), its output and a log-sum-exp per head; with
//!   attention dropout on the CPU it falls back to the math path, which keeps the probabilities (twice) and
//!   the dropout mask, `heads × T` values per token;
//! - dropout with p > 0 saves a mask (1 byte per value) and its output is a new tensor, which LoRA's
//!   `lora_A` saves for each adapted `Linear`;
//! - a component needs a backward pass only if something in it or before it trains; one that does not
//!   saves nothing (the frozen vision tower of LaMed stage 1).
//!
//! Known omissions, small at M3D's sizes: biases and norm statistics (8 bytes per token), the rotary tables,
//! attention masks, SegVol's prompt encoder and two-way transformer (6 tokens against 2,048 image tokens).

use m3d_models::bert::BertConfig;
use m3d_models::lamed::LamedConfig;
use m3d_models::llm::LlmShape;
use m3d_models::lora::LoraConfig;
use m3d_models::vit3d::ViT3dConfig;
use serde::Serialize;

/// How a component takes part in the backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flow {
    /// Its own (base) weights train.
    pub trains: bool,
    /// A gradient must reach its input (something before it trains).
    pub grad_in: bool,
}

impl Flow {
    fn backward(self) -> bool {
        self.trains || self.grad_in
    }
}

/// What the estimate needs besides the model's shape.
#[derive(Debug, Clone, Copy)]
pub struct Numerics {
    /// Bytes of one activation value: 2 in bf16, 4 in f32.
    pub act: f64,
    /// Attention with dropout takes the math path (the CPU); on CUDA the fused kernel handles dropout.
    pub cpu: bool,
}

/// Saved bytes of one micro-batch, by component, and the short-lived peak on top of them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Activations {
    /// Bytes kept for the backward pass, per component (summed over the micro-batch).
    pub parts: Vec<(String, f64)>,
    /// The largest transient on top of the saved bytes: the gradients of the losses' inputs at the start
    /// of the backward pass (the logits and their f32 copy; SegVol's full-size logits), or, when it is
    /// larger, the patch copy of a frozen vision tower's images.
    pub transient: f64,
    /// The batch itself: images (and masks) in f32.
    pub inputs: f64,
    /// The saved bytes with activation checkpointing of every decoder layer and ViT/BERT block: each
    /// keeps only its input, and one block's activations exist again while it is recomputed.
    pub checkpointed: f64,
}

impl Activations {
    pub fn saved(&self) -> f64 {
        self.parts.iter().map(|(_, b)| b).sum()
    }

    fn add(&mut self, name: &str, bytes: f64) {
        if bytes > 0.0 {
            self.parts.push((name.to_string(), bytes));
        }
    }

    /// Adds a component of which `stack` bytes are `layers` equal blocks over tokens of width `width`;
    /// under checkpointing those become one input per block plus one block recomputed.
    fn add_stacked(&mut self, name: &str, bytes: f64, stack: f64, layers: f64, inputs: f64) {
        self.add(name, bytes);
        let recompute = if layers > 0.0 { stack / layers } else { 0.0 };
        self.checkpointed += bytes - stack + if stack > 0.0 { inputs + recompute } else { 0.0 };
    }

    /// A ViT that trains on `batch` images (nothing before it, so it saves only what its own weights
    /// need): the patch copy the patch embedding keeps, its blocks, and its output.
    fn add_trained_vit(&mut self, name: &str, v: &ViT3dConfig, batch: f64, n: Numerics) {
        let flow = Flow {
            trains: true,
            grad_in: false,
        };
        let (a, tokens, layers) = (n.act, v.num_tokens() as f64, v.num_layers as f64);
        let patches = v.num_patches() as f64 * v.patch_dim() as f64 * a;
        let blocks = layers * vit_block(v, flow, n) * tokens;
        let width = tokens * v.hidden_size as f64 * a;
        self.add_stacked(
            name,
            batch * (patches + blocks + width),
            batch * blocks,
            layers,
            batch * layers * width,
        );
    }

    fn add_plain(&mut self, name: &str, bytes: f64) {
        self.add(name, bytes);
        self.checkpointed += bytes;
    }
}

/// Values in one input volume of a vision tower.
fn voxels(v: &ViT3dConfig) -> f64 {
    (v.in_channels * v.img_size.iter().product::<i64>()) as f64
}

/// Bytes per token of one `m3d_models::llm::DecoderLayer` (pre-norm, rotary attention, gated MLP).
pub fn decoder_layer(
    s: &LlmShape,
    fused: bool,
    flow: Flow,
    lora: Option<&LoraConfig>,
    n: Numerics,
) -> f64 {
    if !(flow.backward() || lora.is_some()) {
        return 0.0;
    }
    let (h, i, a) = (s.hidden_size as f64, s.intermediate_size as f64, n.act);
    let kv = (s.num_kv_heads * s.head_dim) as f64;
    let lora_p = lora.map(|l| l.dropout).unwrap_or(0.0);
    // A Linear's input is kept when its weight trains, or when LoRA's lora_A reads it without dropout.
    let input_kept = flow.trains || (lora.is_some() && lora_p == 0.0);
    let keep = |w: f64| if input_kept { w * a } else { 0.0 };
    // RmsNorm: the input in f32, the normalised value when the weight trains, the output for the Linears.
    let norm = 4.0 * h + if flow.trains { h * a } else { 0.0 } + keep(h);
    let attention = if fused {
        // q, k, v are views of one qkv output, which the saved v keeps whole; q and k are rotated copies.
        (h + 2.0 * kv) * a + 2.0 * h * a + h * a
    } else {
        4.0 * h * a
    } + 4.0 * s.num_heads as f64;
    let o_input = keep(h);
    let mlp = 3.0 * i * a + keep(i);
    let adapters = match lora {
        Some(_) if lora_p > 0.0 => {
            let widths: &[f64] = if fused {
                &[h, h, h, i]
            } else {
                &[h, h, h, h, h, h, i]
            };
            widths.iter().map(|w| w * a + w).sum()
        }
        _ => 0.0,
    };
    let resid = if s.resid_pdrop > 0.0 { 2.0 * h } else { 0.0 };
    2.0 * norm + attention + o_input + mlp + adapters + resid
}

/// Bytes per token of one MONAI ViT block (`m3d_models::vit3d::TransformerBlock`).
pub fn vit_block(v: &ViT3dConfig, flow: Flow, n: Numerics) -> f64 {
    if !flow.backward() {
        return 0.0;
    }
    let (h, m, a) = (v.hidden_size as f64, v.mlp_dim as f64, n.act);
    let keep = |w: f64| if flow.trains { w * a } else { 0.0 };
    let norms = 2.0 * (h * a + 8.0) + keep(h) + keep(h);
    let attention = 4.0 * h * a + 4.0 * v.num_heads as f64 + keep(h);
    let mlp = m * a + keep(m);
    norms + attention + mlp
}

/// Bytes per token of one BERT layer (post-norm) over texts of `t` tokens.
pub fn bert_layer(b: &BertConfig, t: i64, flow: Flow, n: Numerics) -> f64 {
    if !flow.backward() {
        return 0.0;
    }
    let (h, m, a) = (b.hidden_size as f64, b.intermediate_size as f64, n.act);
    let heads = b.num_attention_heads as f64;
    let keep = |w: f64| if flow.trains { w * a } else { 0.0 };
    let attention = if b.attention_probs_dropout_prob > 0.0 && n.cpu {
        3.0 * h * a + heads * t as f64 * (2.0 * a + 1.0)
    } else {
        4.0 * h * a + 4.0 * heads
    };
    let hidden_masks = if b.hidden_dropout_prob > 0.0 {
        2.0 * h
    } else {
        0.0
    };
    keep(h) + attention + keep(h) + hidden_masks + 2.0 * (h * a + 8.0) + keep(h) + m * a + keep(m)
}

/// The flows of a LaMed model's parts, read from which parameters train.
#[derive(Debug, Clone, Copy, Default)]
pub struct LamedFlows {
    pub vision: bool,
    pub projector: bool,
    pub embed: bool,
    pub llm_base: bool,
    pub lm_head: bool,
    pub lora: bool,
    pub seg_encoder: bool,
    pub seg_rest: bool,
}

/// Activations of one LaMed micro-batch of `batch` sequences of `t` tokens, `seg_samples` of which carry a
/// mask (SegVol runs on those only).
pub fn lamed(
    cfg: &LamedConfig,
    f: LamedFlows,
    lora: Option<&LoraConfig>,
    batch: i64,
    t: i64,
    seg_samples: i64,
    n: Numerics,
) -> Activations {
    let mut out = Activations::default();
    let a = n.act;
    let b = batch as f64;
    let v = &cfg.vision;
    let vt = v.num_tokens() as f64;
    let voxels = voxels(v);
    out.inputs = b * voxels * 4.0 * if cfg.seg.is_some() { 2.0 } else { 1.0 };
    // A frozen tower still copies its images into patches for the patch embedding, briefly.
    let mut patch_copy = if f.vision { 0.0 } else { b * voxels * a };
    if f.vision {
        out.add_trained_vit("vision_tower", v, b, n);
    }
    // Projector: pooling keeps its input when the vision tower trains; its Linears keep theirs when it
    // trains.
    let p = &cfg.projector;
    let pt = p.num_output_tokens() as f64;
    let proj_grad = f.projector || f.vision;
    if proj_grad {
        let pooled_in = if f.vision {
            vt * p.mm_hidden_size as f64 * a
        } else {
            0.0
        };
        let mlp = if f.projector {
            pt * (p.mm_hidden_size + 2 * p.hidden_size) as f64 * a
        } else {
            pt * p.hidden_size as f64 * a
        };
        out.add_plain("mm_projector", b * (pooled_in + mlp));
    }
    // LLM: a gradient reaches its input when the embeddings or anything before them trains.
    let Ok(s) = cfg.llm.shape() else {
        return out;
    };
    let fused = matches!(cfg.llm, m3d_models::llm::LlmConfig::Phi3(_));
    let lflow = Flow {
        trains: f.llm_base,
        grad_in: f.embed || proj_grad,
    };
    let lora_cfg = if f.lora { lora } else { None };
    let layers = s.num_hidden_layers as f64 * decoder_layer(&s, fused, lflow, lora_cfg, n);
    let h = s.hidden_size as f64;
    let any = lflow.backward() || f.lora || f.lm_head;
    let head = if any {
        // Final norm input (f32) and, when lm_head trains, its input.
        4.0 * h + if f.lm_head { h * a } else { 0.0 }
    } else {
        0.0
    };
    let tokens = b * t as f64;
    let l = s.num_hidden_layers as f64;
    out.add_stacked(
        "llm",
        tokens * (layers + head),
        tokens * layers,
        l,
        if layers > 0.0 {
            tokens * l * h * a
        } else {
            0.0
        },
    );
    if any {
        let logits = tokens * s.vocab_size as f64;
        // log_softmax's f32 output is saved; the logits and their f32 copy live while it is computed.
        out.add_plain("loss", logits * 4.0);
        out.transient = logits * (a + 4.0);
    }
    let mut loss_transient = out.transient;
    if let Some(seg) = cfg.seg.as_ref().filter(|_| seg_samples > 0) {
        let e = &seg.image_encoder;
        let et = e.num_tokens() as f64;
        let eflow = Flow {
            trains: f.seg_encoder,
            grad_in: false,
        };
        let el = e.num_layers as f64;
        let (encoder, stack) = if f.seg_encoder {
            let stack = et * el * vit_block(e, eflow, n);
            (
                e.num_patches() as f64 * e.patch_dim() as f64 * a + stack,
                stack,
            )
        } else {
            (0.0, 0.0)
        };
        // The decoder's two x2 transposed convolutions over the grid (C/4 then C/8 channels, each kept for
        // its LayerNorm/GELU and the next convolution), and the full-size logits, their sigmoid and the
        // Dice/BCE terms in f32: the upsampled logits, their sigmoid and the two cleaned targets are saved;
        // their gradients (four more) exist at the start of the backward pass.
        let c = e.hidden_size as f64;
        let grid = e.num_patches() as f64;
        let upscale = 3.0 * (c / 4.0) * 8.0 * grid + 2.0 * (c / 8.0) * 64.0 * grid;
        loss_transient += seg_samples as f64 * 4.0 * voxels * 4.0;
        if !f.seg_encoder {
            patch_copy = patch_copy.max(seg_samples as f64 * voxels * a);
        }
        let rest = if f.seg_rest || f.seg_encoder {
            upscale * a
        } else {
            0.0
        } + 4.0 * voxels * 4.0;
        let k = seg_samples as f64;
        out.add_stacked(
            "seg_module",
            k * (encoder + rest),
            k * stack,
            el,
            k * el * et * e.hidden_size as f64 * a,
        );
    }
    out.transient = loss_transient.max(patch_copy);
    out
}

/// Activations of one M3D-CLIP micro-batch of `batch` pairs, texts of `t` tokens; both towers train.
pub fn clip(
    vision: &ViT3dConfig,
    text: &BertConfig,
    trains: (bool, bool),
    batch: i64,
    t: i64,
    n: Numerics,
) -> Activations {
    let mut out = Activations::default();
    let (a, b) = (n.act, batch as f64);
    let voxels = voxels(vision);
    out.inputs = b * voxels * 4.0;
    if trains.0 {
        out.add_trained_vit("vision_encoder", vision, b, n);
    } else {
        out.transient = b * voxels * a;
    }
    if trains.1 {
        let flow = Flow {
            trains: true,
            grad_in: false,
        };
        let h = text.hidden_size as f64;
        let embeddings = h * a
            + 8.0
            + if text.hidden_dropout_prob > 0.0 {
                h
            } else {
                0.0
            };
        let l = text.num_hidden_layers as f64;
        let layers = l * bert_layer(text, t, flow, n);
        let tokens = b * t as f64;
        out.add_stacked(
            "language_encoder",
            tokens * (embeddings + layers),
            tokens * layers,
            l,
            tokens * l * h * a,
        );
    }
    out
}
