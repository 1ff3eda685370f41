//! Gradient utilities: clipping by the total norm (exactly `torch.nn.utils.clip_grad_norm_`) and the loss
//! normalisation that makes gradient accumulation equal to one large batch.
//!
//! ## Accumulation
//! Accumulating k micro-batches (per worker, over W workers) must give the gradient of one batch of all of
//! them. Gradients add up over backward passes (and over workers in an all-reduce *sum*), so each
//! micro-batch's loss must be its share of the big batch's loss:
//!
//! - **Mean over samples** (CLIP-style per-sample means, MSE, ...) with equal micro-batches: scale each
//!   micro-batch's mean loss by `1 / k` ([`mean_loss_scale`]); with an all-reduce that *averages* over the W
//!   workers this gives the mean over the k·W micro-batches.
//! - **Token-level LM loss** (HF's causal-LM cross-entropy, a mean over the *scored* tokens): micro-batches
//!   score different numbers of tokens, so the mean of per-micro-batch means is wrong. Sum the token losses
//!   of each micro-batch and divide by the number of scored tokens of the *whole* accumulation
//!   ([`count_scored_tokens`] over every micro-batch, summed over workers first when the gradients are
//!   all-reduced by sum; × W when they are averaged): [`token_sum_loss`]. This equals HF's loss on the
//!   concatenated batch, gradient for gradient.
//!
//! A contrastive loss (M3D-CLIP) does not split this way at all: each micro-batch only sees its own
//! negatives, so accumulation changes the objective (as it does in the reference with HF's accumulation).

use tch::{Kind, Tensor};

use m3d_models::lamed::IGNORE_INDEX;

/// Errors of the gradient helpers.
#[derive(Debug, thiserror::Error)]
pub enum GradError {
    #[error("labels {labels:?} do not fit logits {logits:?} (expected (B, T) and (B, T, V))")]
    Shape { logits: Vec<i64>, labels: Vec<i64> },
    #[error("the accumulation scores no token (normaliser {0})")]
    NoTokens(i64),
    #[error(transparent)]
    Tch(#[from] tch::TchError),
    #[error(transparent)]
    Model(#[from] m3d_models::ModelError),
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` over the given gradients: the total 2-norm over all
/// of them (the norm of the per-tensor norms), then every gradient multiplied in place by
/// `min(1, max_norm / (total + 1e-6))` (always multiplied, as torch does). Returns the total norm before
/// clipping (f64 of torch's 0-d tensor, in the gradients' kind). An empty list has norm 0.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<f64, GradError> {
    let total = total_norm(grads)?;
    let Some(total) = total else { return Ok(0.0) };
    tch::no_grad(|| -> Result<(), GradError> {
        // Python's `max_norm / (total + 1e-6)` on a tensor is `reciprocal(total + 1e-6) * max_norm`.
        let coef = total
            .f_add_scalar(1e-6)?
            .f_reciprocal()?
            .f_mul_scalar(max_norm)?
            .f_clamp_max(1.0)?;
        for g in grads {
            let mut g = g.shallow_clone();
            let _ = g.f_mul_(&coef.to_device(g.device()))?;
        }
        Ok(())
    })?;
    Ok(total.double_value(&[]))
}

/// The total 2-norm of `grads` without clipping (torch's `get_total_norm`); `None` for an empty list.
pub fn total_norm(grads: &[Tensor]) -> Result<Option<Tensor>, GradError> {
    let Some(first) = grads.first() else {
        return Ok(None);
    };
    let device = first.device();
    tch::no_grad(|| {
        let norms = grads
            .iter()
            .map(|g| Ok(g.f_norm()?.to_device(device)))
            .collect::<Result<Vec<_>, GradError>>()?;
        Ok(Some(Tensor::f_stack(&norms, 0)?.f_norm()?))
    })
}

/// The scale of one micro-batch's mean loss when k equal micro-batches are accumulated: `1 / k`.
pub fn mean_loss_scale(micro_batches: usize) -> f64 {
    1.0 / micro_batches.max(1) as f64
}

/// Number of tokens the causal-LM loss scores in `labels` (B, T): positions 1.. that are not
/// [`IGNORE_INDEX`] (the loss predicts label t + 1 from position t).
pub fn count_scored_tokens(labels: &Tensor) -> i64 {
    let t = labels.size().get(1).copied().unwrap_or(0);
    if t < 2 {
        return 0;
    }
    labels
        .narrow(1, 1, t - 1)
        .ne(IGNORE_INDEX)
        .sum(Kind::Int64)
        .int64_value(&[])
}

/// HF's shifted causal-LM cross-entropy, summed over this micro-batch's scored tokens and divided by
/// `normaliser`, the scored tokens of the whole accumulation (see the module docs). With `normaliser`
/// equal to this micro-batch's own count it is `m3d_models::lamed::causal_lm_loss`. In f32.
pub fn token_sum_loss(
    logits: &Tensor,
    labels: &Tensor,
    normaliser: i64,
) -> Result<Tensor, GradError> {
    let s = logits.size();
    if s.len() != 3 || labels.size() != s[..2] || s[1] < 2 {
        return Err(GradError::Shape {
            logits: s,
            labels: labels.size(),
        });
    }
    if normaliser < 1 {
        return Err(GradError::NoTokens(normaliser));
    }
    let sum = m3d_models::lamed::causal_lm_loss_sum(logits, labels)?;
    Ok(sum.f_div_scalar(normaliser as f64)?)
}
