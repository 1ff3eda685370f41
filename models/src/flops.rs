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
