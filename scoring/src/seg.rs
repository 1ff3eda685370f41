//! Segmentation Dice (reference: `BinaryDice` in `Bench/eval/metrics.py`, called by `Bench/eval/eval_seg.py`).

use crate::{Convention, ScoreError};

/// Dice of one predicted mask, given as logits, against its label volume (1 foreground; 0 and the datasets'
/// -1 "unlabelled" are background, as the reference's `target_[target == -1] = 0`).
///
/// [`Convention::Corrected`]: hard Dice `2|P ∩ T| / (|P| + |T|)` of the thresholded prediction
/// `P = sigmoid(logit) > 0.5` (evaluated in f32, the reference's own thresholding expression for its saved
/// masks); 1 when prediction and label are both empty (a correctly empty answer), 0 when exactly one is.
///
/// [`Convention::Reference`] (`BinaryDice.forward`, `Bench/eval/metrics.py` lines 17-32, smooth = 1): soft
/// Dice `2 Σ σ(x)·t / (Σ σ(x) + Σ t + 1)` on the unthresholded sigmoid, so a confident correct mask scores
/// below 1 and every sample whose label is empty (a target absent from the volume) scores exactly 0 whatever
/// is predicted. Summed here in f64, where torch sums f32: expect differences around 1e-6 relative.
pub fn dice(logits: &[f32], target: &[f32], convention: Convention) -> Result<f64, ScoreError> {
    if logits.len() != target.len() {
        return Err(ScoreError::LengthMismatch {
            what: "dice target",
            expected: logits.len(),
            got: target.len(),
        });
    }
    let labels = target
        .iter()
        .map(|&t| if t == -1.0 { 0.0 } else { f64::from(t) });
    match convention {
        Convention::Reference => {
            let (mut num, mut sum_p, mut sum_t) = (0.0, 0.0, 0.0);
            for (&x, t) in logits.iter().zip(labels) {
                let p = 1.0 / (1.0 + (-f64::from(x)).exp());
                num += p * t;
                sum_p += p;
                sum_t += t;
            }
            Ok(2.0 * num / (sum_p + sum_t + 1.0))
        }
        Convention::Corrected => {
            let (mut both, mut pred, mut truth) = (0usize, 0usize, 0usize);
            for (&x, t) in logits.iter().zip(labels) {
                let p = 1.0f32 / (1.0 + (-x).exp()) > 0.5;
                let t = t > 0.5;
                both += usize::from(p && t);
                pred += usize::from(p);
                truth += usize::from(t);
            }
            Ok(if pred + truth == 0 {
                1.0
            } else {
                2.0 * both as f64 / (pred + truth) as f64
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_dice_by_hand() {
        // Predicted foreground: voxels 0, 1 (logit > 0); label foreground: 1, 2; voxel 3 is -1 (background).
        let logits = [3.0, 0.2, -1.0, 5.0];
        let target = [0.0, 1.0, 1.0, -1.0];
        // P = {0, 1, 3}, T = {1, 2}: 2 * 1 / (3 + 2).
        assert_eq!(dice(&logits, &target, Convention::Corrected).unwrap(), 0.4);
        assert_eq!(
            dice(&[-4.0, -2.0], &[0.0, -1.0], Convention::Corrected).unwrap(),
            1.0
        );
        assert_eq!(
            dice(&[4.0, -2.0], &[0.0, 0.0], Convention::Corrected).unwrap(),
            0.0
        );
        // A logit so small that sigmoid rounds to exactly 0.5 in f32 is background, as in the reference.
        assert_eq!(dice(&[1e-9], &[1.0], Convention::Corrected).unwrap(), 0.0);
    }

    #[test]
    fn soft_dice_like_the_reference() {
        let s = |x: f64| 1.0 / (1.0 + (-x).exp());
        let logits = [3.0f32, 0.0, -1.0];
        let target = [1.0, 1.0, -1.0];
        let want = 2.0 * (s(3.0) + 0.5) / (s(3.0) + 0.5 + s(-1.0) + 2.0 + 1.0);
        assert!((dice(&logits, &target, Convention::Reference).unwrap() - want).abs() < 1e-15);
        // A perfect, confident mask stays below 1; a negative sample is 0 even when predicted empty.
        // 2 * 2 / (2 + 2 + 1), up to sigmoid(20) = 1 - 2e-9.
        assert!(
            (dice(&[20.0, 20.0], &[1.0, 1.0], Convention::Reference).unwrap() - 0.8).abs() < 1e-8
        );
        assert_eq!(
            dice(&[-20.0, -20.0], &[0.0, -1.0], Convention::Reference).unwrap(),
            0.0
        );
        assert_eq!(
            dice(&[-20.0, -20.0], &[0.0, -1.0], Convention::Corrected).unwrap(),
            1.0
        );
        assert!(matches!(
            dice(&[0.0], &[], Convention::Corrected),
            Err(ScoreError::LengthMismatch { .. })
        ));
    }
}
