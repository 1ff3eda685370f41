//! Decoding with a KV cache: greedy (the reference's evaluation setting) and sampling (temperature, top-k,
//! top-p, as HF `generate(do_sample=True)` filters logits), for a batch of left-padded prompts.
//!
//! One prefill over the padded prompts, then one token per row per step. Rows finish independently: after a
//! row's end-of-sequence token it is fed the pad id (HF's `unfinished_sequences` rule) and its output stops
//! there; decoding ends when every row has finished or after `max_new_tokens`. Positions count real tokens
//! only (from the attention mask, see [`CausalLm::forward_embeds`]), so a left-padded row decodes exactly as
//! it would alone.
//!
//! Sampling draws on the host from a ChaCha8 stream seeded by [`Sampling::seed`], one uniform value per row
//! per step: the same seed gives the same text on any device and whatever else used torch's generator, which
//! torch's `multinomial` cannot promise. The draws therefore differ from HF's for the same seed; the
//! distribution they sample is the same.

use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::llm::CausalLm;

/// Sampling settings (HF `GenerationConfig` names and defaults: `top_k` 50, `top_p` 1.0, temperature 1.0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1.0: all).
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Input(format!("sampling: {m}")));
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!("temperature must be > 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// A row stops after producing any of these (the token is returned, as HF does).
    pub eos_ids: Vec<i64>,
    /// Fed to finished rows while others go on.
    pub pad_id: i64,
    /// `None`: greedy.
    pub sampling: Option<Sampling>,
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_new_tokens`, stopping at `eos_ids`.
    pub fn greedy(max_new_tokens: usize, eos_ids: &[i64]) -> Self {
        GenerateOptions {
            max_new_tokens,
            eos_ids: eos_ids.to_vec(),
            pad_id: eos_ids.first().copied().unwrap_or(0),
            sampling: None,
        }
    }
}

/// Left-pads per-prompt embeddings `(1, T_i, H)` into one `(B, T_max, H)` batch (zeros in the padding) and
/// its attention mask `(B, T_max)` (int64, 0 on padding).
pub fn left_pad_embeds(prompts: &[Tensor]) -> Result<(Tensor, Tensor)> {
    let first = prompts
        .first()
        .ok_or_else(|| ModelError::Input("no prompt to generate from".into()))?;
    let longest = prompts.iter().map(|p| p.size()[1]).max().unwrap_or(0);
    let hidden = first.size()[2];
    let mut rows = Vec::with_capacity(prompts.len());
    let mut masks = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let s = p.size();
        if s.len() != 3 || s[0] != 1 || s[1] < 1 || s[2] != hidden {
            return Err(ModelError::Shape {
                name: format!("prompt {i} embeddings"),
                expected: vec![1, -1, hidden],
                got: s,
            });
        }
        let pad = longest - s[1];
        let opts = (p.kind(), p.device());
        rows.push(Tensor::cat(
            &[Tensor::zeros([1, pad, hidden], opts), p.shallow_clone()],
            1,
        ));
        masks.push(Tensor::cat(
            &[
                Tensor::zeros([1, pad], (Kind::Int64, p.device())),
                Tensor::ones([1, s[1]], (Kind::Int64, p.device())),
            ],
            1,
        ));
    }
    Ok((Tensor::cat(&rows, 0), Tensor::cat(&masks, 0)))
}

/// Generates from a batch of prompt embeddings `(B, T, H)` with attention mask `(B, T)` (1 real, 0 left
/// padding; `None` when no row is padded). Returns each row's new tokens, up to and including its end token.
pub fn generate(
    model: &CausalLm,
    embeds: &Tensor,
    attention_mask: Option<&Tensor>,
    opts: &GenerateOptions,
) -> Result<Vec<Vec<i64>>> {
    if let Some(s) = &opts.sampling {
        s.validate()?;
    }
    tch::no_grad(|| {
        let size = embeds.size();
        if size.len() != 3 || size[0] < 1 || size[1] < 1 {
            return Err(ModelError::Input(format!(
                "generate takes (batch, tokens, hidden) prompt embeddings, got {size:?}"
            )));
        }
        let (b, t) = (size[0], size[1]);
        let device = embeds.device();
        let mut mask = match attention_mask {
            Some(m) if m.size() == [b, t] => m.to_kind(Kind::Int64).to_device(device),
            Some(m) => {
                return Err(ModelError::Shape {
                    name: "attention_mask".into(),
                    expected: vec![b, t],
                    got: m.size(),
                })
            }
            None => Tensor::ones([b, t], (Kind::Int64, device)),
        };
        let mut rng = opts
            .sampling
            .map(|s| rand_chacha::ChaCha8Rng::seed_from_u64(s.seed));
        let rows = b as usize;
        let mut out: Vec<Vec<i64>> = vec![Vec::with_capacity(opts.max_new_tokens); rows];
        let mut done = vec![false; rows];
        let mut cache = model.new_cache();
        let mut hidden = model.forward_embeds(embeds, Some(&mask), Some(&mut cache), false)?;
        for _ in 0..opts.max_new_tokens {
            let last = hidden.narrow(1, hidden.size()[1] - 1, 1);
            let logits = model.logits(&last).squeeze_dim(1).to_kind(Kind::Float);
            let next: Vec<i64> = match (&opts.sampling, rng.as_mut()) {
                (Some(s), Some(rng)) => sample_rows(&logits, s, rng)?,
                _ => Vec::<i64>::try_from(logits.argmax(-1, false))?,
            };
            let mut feed = Vec::with_capacity(rows);
            for (r, &token) in next.iter().enumerate() {
                if done[r] {
                    feed.push(opts.pad_id);
                    continue;
                }
                out[r].push(token);
                done[r] = opts.eos_ids.contains(&token);
                feed.push(token);
            }
            if done.iter().all(|&d| d) || out.iter().all(|o| o.len() == opts.max_new_tokens) {
                break;
            }
            let ids = Tensor::from_slice(&feed).view([b, 1]).to_device(device);
            mask = Tensor::cat(&[mask, Tensor::ones([b, 1], (Kind::Int64, device))], 1);
            let step = model.embed_tokens(&ids)?;
            hidden = model.forward_embeds(&step, Some(&mask), Some(&mut cache), false)?;
        }
        Ok(out)
    })
}

/// One draw per row from `logits` (B, V) after HF's warpers, in HF's order: temperature, top-k, top-p.
fn sample_rows(
    logits: &Tensor,
    s: &Sampling,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<Vec<i64>> {
    let probs = filtered_probs(logits, s);
    let probs = Vec::<Vec<f32>>::try_from(probs.to_device(tch::Device::Cpu))?;
    Ok(probs
        .iter()
        .map(|row| {
            // Inverse CDF in f64 over the renormalised row; the last kept token takes any rounding slack.
            let total: f64 = row.iter().map(|&p| f64::from(p)).sum();
            let u = rng.random::<f64>() * total;
            let mut acc = 0.0;
            let mut pick = row.iter().rposition(|&p| p > 0.0).unwrap_or(0);
            for (i, &p) in row.iter().enumerate() {
                acc += f64::from(p);
                if p > 0.0 && u < acc {
                    pick = i;
                    break;
                }
            }
            pick as i64
        })
        .collect())
}

/// The probabilities HF samples from: `softmax(warped logits)` with the tokens removed by top-k and top-p at
/// zero. Top-p as `TopPLogitsWarper`: sorted ascending, a token is removed when the cumulative probability up
/// to and including it is at most `1 - top_p`, and the most likely token is always kept.
pub fn filtered_probs(logits: &Tensor, s: &Sampling) -> Tensor {
    let mut scores = logits.to_kind(Kind::Float) / s.temperature;
    let vocab = scores.size()[scores.dim() - 1];
    let neg_inf = f64::NEG_INFINITY;
    if s.top_k > 0 && (s.top_k as i64) < vocab {
        let kth = scores
            .topk(s.top_k as i64, -1, true, true)
            .0
            .narrow(-1, s.top_k as i64 - 1, 1);
        scores = scores.masked_fill(&scores.lt_tensor(&kth), neg_inf);
    }
    if s.top_p < 1.0 {
        let (sorted, order) = scores.sort(-1, false);
        let cumulative = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let remove_sorted = cumulative.le(1.0 - s.top_p);
        // Keep at least the most likely token (the last in ascending order).
        let remove_sorted = remove_sorted.index_fill(
            -1,
            &Tensor::from_slice(&[vocab - 1]).to_device(scores.device()),
            0,
        );
        let remove = remove_sorted.scatter(-1, &order, &remove_sorted);
        scores = scores.masked_fill(&remove, neg_inf);
    }
    scores.softmax(-1, Kind::Float)
}
