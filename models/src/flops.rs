//! Model FLOPs: the matrix products a training step runs, counted the one way `m3d plan` and the GPU
//! benchmark (`examples/model_bench.rs`) both use (PaLM's convention, per component, N its non-embedding
//! parameters and T the tokens it sees):
//! - forward: 2·N·T, always;
//! - backward, where it reaches the component (something in it or before it trains): 2·N·T for the input
//!   gradients, plus 2·N_trained·T for the weight gradients of its trained parameters only;
//! - attention: 4·L·d·T² forward, 8·L·d·T² backward (full T², no causal halving).
//!
//! So a fully trained component counts 6·N·T + 12·L·d·T², a frozen one the backward passes through 4·N·T
//! (+ attention 12·L·d·T²), and a frozen one with nothing trained before it 2·N·T + 4·L·d·T².

use tch::nn::VarStore;

/// Non-embedding parameters of a component, split by whether they train.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Params {
    pub trained: f64,
    pub frozen: f64,
}

impl Params {
    pub fn total(&self) -> f64 {
        self.trained + self.frozen
    }
}

/// The non-embedding parameters of the variables of `vs` that `select` picks: names with `embed` (token and
/// patch embeddings) or `position` are left out, as the published MFU figures count.
pub fn nonembedding_params(vs: &VarStore, select: impl Fn(&str) -> bool) -> Params {
    let mut p = Params::default();
    for (k, t) in vs.variables() {
        if select(&k) && !k.contains("embed") && !k.contains("position") {
            if t.requires_grad() {
                p.trained += t.numel() as f64;
            } else {
                p.frozen += t.numel() as f64;
            }
        }
    }
    p
}

/// Matrix-product FLOPs of one forward (+ backward when it reaches the component) over `tokens` tokens.
pub fn matmul_flops(p: Params, tokens: i64, backward: bool) -> f64 {
    let (n, t) = (p.total(), tokens as f64);
    if backward {
        4.0 * n * t + 2.0 * p.trained * t
    } else {
        2.0 * n * t
    }
}

/// Attention scores and weighted sums of `layers` layers of width `d` over `tokens` tokens: 4·L·d·T²
/// forward, three times that with the backward.
pub fn attention_flops(layers: i64, d: i64, tokens: i64, backward: bool) -> f64 {
    let fwd = 4.0 * (layers * d) as f64 * (tokens * tokens) as f64;
    if backward {
        3.0 * fwd
    } else {
        fwd
    }
}

/// One component's share of a sample's FLOPs.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PartFlops {
    pub params: Params,
    /// The backward pass reaches it.
    pub backward: bool,
    pub flops: f64,
}

/// FLOPs per sample of M3D-CLIP with texts of `text_tokens`: both towers train (which parameters do is read
/// from `vs`). Parts: `vision_encoder`, `language_encoder`.
pub fn clip(
    vs: &VarStore,
    cfg: &crate::clip::M3dClipConfig,
    text_tokens: i64,
) -> Vec<(&'static str, PartFlops)> {
    let v = &cfg.vision;
    let t = &cfg.text;
    let part = |prefix: &str, tokens: i64, layers: i64, width: i64| {
        let params = nonembedding_params(vs, |k| k.starts_with(prefix));
        PartFlops {
            params,
            backward: true,
            flops: matmul_flops(params, tokens, true)
                + attention_flops(layers, width, tokens, true),
        }
    };
    vec![
        (
            "vision_encoder",
            part(
                "vision_encoder.",
                v.num_tokens(),
                v.num_layers,
                v.hidden_size,
            ),
        ),
        (
            "language_encoder",
            part(
                "language_encoder.",
                text_tokens,
                t.num_hidden_layers,
                t.hidden_size,
            ),
        ),
    ]
}

/// FLOPs per sample of M3D-LaMed over sequences of `text_tokens`, with what trains read from `vs`: the
/// vision tower runs a backward only if it trains (nothing is before it), the projector if it or the tower
/// trains, the LLM (lm_head included) if anything before or in it trains. Parts: `vision_tower`,
/// `mm_projector`, `llm`. The segmentation module runs only on samples with a mask and is not counted.
pub fn lamed(
    vs: &VarStore,
    cfg: &crate::lamed::LamedConfig,
    text_tokens: i64,
) -> Vec<(&'static str, PartFlops)> {
    let v = &cfg.vision;
    let vis = nonembedding_params(vs, |k| k.contains("vision_tower"));
    let proj = nonembedding_params(vs, |k| k.contains("mm_projector"));
    let llm = nonembedding_params(vs, |k| {
        k.starts_with("model.layers.") || k.starts_with("lm_head")
    });
    let embed_trains = vs
        .variables()
        .iter()
        .any(|(k, t)| k.contains("embed_tokens") && t.requires_grad());
    let vis_backward = vis.trained > 0.0;
    let proj_backward = vis_backward || proj.trained > 0.0;
    let llm_backward = proj_backward || embed_trains || llm.trained > 0.0;
    let (layers, d) = (cfg.llm.num_hidden_layers(), cfg.llm.hidden_size());
    vec![
        (
            "vision_tower",
            PartFlops {
                params: vis,
                backward: vis_backward,
                flops: matmul_flops(vis, v.num_tokens(), vis_backward)
                    + attention_flops(v.num_layers, v.hidden_size, v.num_tokens(), vis_backward),
            },
        ),
        (
            "mm_projector",
            PartFlops {
                params: proj,
                backward: proj_backward,
                flops: matmul_flops(proj, cfg.projector.num_output_tokens(), proj_backward),
            },
        ),
        (
            "llm",
            PartFlops {
                params: llm,
                backward: llm_backward,
                flops: matmul_flops(llm, text_tokens, llm_backward)
                    + attention_flops(layers, d, text_tokens, llm_backward),
            },
        ),
    ]
}

/// The sum of the parts' FLOPs.
pub fn total(parts: &[(&'static str, PartFlops)]) -> f64 {
    parts.iter().map(|(_, p)| p.flops).sum()
}
