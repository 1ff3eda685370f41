//! Gradient accumulation equals one large batch: the gradients of one batch of 2B sequences through a
//! tiny Llama (m3d-models' debug `CausalLm`, HF's causal-LM loss) equal those of 2 accumulated
//! micro-batches of B — with token normalisation when the micro-batches score different numbers of tokens
//! (where the naive mean of means is measurably wrong), and with the 1/k mean scale when they score the
//! same number.

use m3d_models::lamed::{causal_lm_loss, IGNORE_INDEX};
use m3d_models::llama::LlamaConfig;
use m3d_models::llm::{CausalLm, LlmConfig};
use m3d_models::VarBuilder;
use m3d_worker::grad::{count_scored_tokens, mean_loss_scale, token_sum_loss};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

struct Model {
    vs: VarStore,
    lm: CausalLm,
}

fn model() -> Model {
    tch::manual_seed(7);
    let vs = VarStore::new(Device::Cpu);
    let cfg = LlmConfig::Llama(LlamaConfig::debug());
    let lm = CausalLm::new(&VarBuilder::new(&vs), &cfg).unwrap();
    Model { vs, lm }
}

fn grads(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.grad().copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn zero(vs: &VarStore) {
    for (_, mut t) in vs.variables() {
        t.zero_grad();
    }
}

/// Largest relative difference between two gradient sets (each tensor relative to its own scale).
fn worst(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    a.iter()
        .zip(b)
        .map(|((n, x), (m, y))| {
            assert_eq!(n, m);
            let d = (x - y).abs().max().double_value(&[]);
            d / y.abs().max().double_value(&[]).max(1e-20)
        })
        .fold(0.0, f64::max)
}

/// 4 sequences of length 12; `uneven`: the first two score 2 tokens, the others 11 (prompt masked).
fn batch(uneven: bool) -> (Tensor, Tensor) {
    tch::manual_seed(11);
    let ids = Tensor::randint_low(3, 128, [4, 12], (Kind::Int64, Device::Cpu));
    let labels = ids.copy();
    if uneven {
        let _ = labels.narrow(0, 0, 2).narrow(1, 0, 10).fill_(IGNORE_INDEX);
    }
    (ids, labels)
}

#[test]
fn token_normalised_accumulation_equals_the_large_batch() {
    let m = model();
    let (ids, labels) = batch(true);
    assert_eq!(count_scored_tokens(&labels.narrow(0, 0, 2)), 2 * 2);
    assert_eq!(count_scored_tokens(&labels.narrow(0, 2, 2)), 2 * 11);

    // One batch of 4: HF's loss (mean over all 26 scored tokens).
    zero(&m.vs);
    let logits = m.lm.forward(&ids, None, None, false).unwrap();
    causal_lm_loss(&logits, &labels).unwrap().backward();
    let full = grads(&m.vs);

    // Two micro-batches of 2, normalised by the accumulation's 26 tokens.
    let halves = [(0, 2), (2, 2)];
    let total: i64 = halves
        .iter()
        .map(|&(s, n)| count_scored_tokens(&labels.narrow(0, s, n)))
        .sum();
    assert_eq!(total, 26);
    zero(&m.vs);
    for &(s, n) in &halves {
        let logits =
            m.lm.forward(&ids.narrow(0, s, n), None, None, false)
                .unwrap();
        token_sum_loss(&logits, &labels.narrow(0, s, n), total)
            .unwrap()
            .backward();
    }
    let acc = grads(&m.vs);
    let d = worst(&acc, &full);
    eprintln!("token-normalised accumulation vs one batch: max relative grad diff {d:e}");
    assert!(d <= 1e-6, "token-normalised accumulation differs by {d:e}");

    // The naive mean of the micro-batches' means weighs the 4 tokens of the first like the 22 of the
    // second: clearly different.
    zero(&m.vs);
    for &(s, n) in &halves {
        let logits =
            m.lm.forward(&ids.narrow(0, s, n), None, None, false)
                .unwrap();
        (causal_lm_loss(&logits, &labels.narrow(0, s, n)).unwrap() * mean_loss_scale(2)).backward();
    }
    let naive = grads(&m.vs);
    let d = worst(&naive, &full);
    assert!(d > 1e-2, "the naive scaling should differ, got {d:e}");
}

#[test]
fn mean_scaled_accumulation_equals_the_large_batch_with_equal_counts() {
    let m = model();
    let (ids, labels) = batch(false);
    zero(&m.vs);
    let logits = m.lm.forward(&ids, None, None, false).unwrap();
    causal_lm_loss(&logits, &labels).unwrap().backward();
    let full = grads(&m.vs);
    zero(&m.vs);
    for s in [0, 2] {
        let logits =
            m.lm.forward(&ids.narrow(0, s, 2), None, None, false)
                .unwrap();
        (causal_lm_loss(&logits, &labels.narrow(0, s, 2)).unwrap() * mean_loss_scale(2)).backward();
    }
    let d = worst(&grads(&m.vs), &full);
    eprintln!(
        "1/k-scaled accumulation (equal token counts) vs one batch: max relative grad diff {d:e}"
    );
    assert!(d <= 1e-6, "mean-scaled accumulation differs by {d:e}");
    // token_sum_loss with a micro-batch's own count is HF's loss.
    let logits = m.lm.forward(&ids, None, None, false).unwrap();
    let a = causal_lm_loss(&logits, &labels).unwrap().double_value(&[]);
    let b = token_sum_loss(&logits, &labels, count_scored_tokens(&labels))
        .unwrap()
        .double_value(&[]);
    assert!((a - b).abs() <= 1e-6 * a.abs(), "{a} vs {b}");
}
