//! Referring expression comprehension (REC): boxes in text, box IoU, the benchmark's mean IoU and Acc@0.5, and
//! the mask-to-box conversion that writes the ground-truth boxes (reference: `Bench/utils.py`,
//! `Bench/eval/eval_pos.py`).
//!
//! A box is `[x1, y1, z1, x2, y2, z2]`: minimum then maximum corner, each coordinate normalized by the volume's
//! size along that axis (axes in the order of the mask's dimensions, `D, H, W` for M3D-Seg).

use crate::pytext::re_static;
use crate::{Convention, ScoreError};
use regex::Regex;
use serde::Serialize;
use std::sync::LazyLock;

/// `[x1, y1, z1, x2, y2, z2]`.
pub type Box3 = [f64; 6];

/// The threshold of Acc@0.5.
pub const ACC_IOU_THRESHOLD: f64 = 0.5;

static RE_BOX: LazyLock<Regex> = LazyLock::new(|| {
    let num = r"([-+]?\d*\.\d+|[-+]?\d+)";
    re_static(&format!(r"\[{num}, {num}, {num}, {num}, {num}, {num}\]"))
});
static RE_DECIMAL_DIGIT: LazyLock<Regex> = LazyLock::new(|| re_static(r"^\d$"));

/// The first box written as `[a, b, c, d, e, f]` anywhere in `text`, as the reference's
/// `extract_box_from_text` finds it: six numbers (`1`, `-2`, `+.5`, `0.125`, but not `1.` or `1e-3`)
/// separated by exactly `", "`. The `<bx_start>`/`<bx_end>` markers are neither needed nor looked at: the
/// model's output is decoded with `skip_special_tokens=True`, which drops them. Like Python's `\d` and
/// `float()`, digits of any script count (`٣` is 3).
pub fn extract_box(text: &str) -> Option<Box3> {
    let caps = RE_BOX.captures(text)?;
    let mut out = [0.0; 6];
    for (slot, group) in out.iter_mut().zip(caps.iter().skip(1)) {
        *slot = ascii_digits(group?.as_str()).parse().ok()?;
    }
    Some(out)
}

/// Rewrites decimal digits of any script as ASCII. Unicode encodes every decimal digit (`Nd`) in runs of ten,
/// 0 to 9, so a digit's value is its distance from the start of its contiguous block of digits, modulo 10.
fn ascii_digits(s: &str) -> String {
    let is_digit = |c: char| RE_DECIMAL_DIGIT.is_match(c.encode_utf8(&mut [0; 4]));
    s.chars()
        .map(|c| {
            if c.is_ascii() || !is_digit(c) {
                return c;
            }
            let mut start = c as u32;
            while start > 0 && char::from_u32(start - 1).is_some_and(is_digit) {
                start -= 1;
            }
            char::from_digit((c as u32 - start) % 10, 10).unwrap_or(c)
        })
        .collect()
}

/// Intersection over union of two boxes.
///
/// [`Convention::Corrected`]: the volume of the intersection over the volume of the union
/// (`|A| + |B| - |A ∩ B|`); extents below zero count as zero; 0 when the union has no volume.
///
/// [`Convention::Reference`] (`calculate_iou`, `Bench/utils.py` lines 38-54): the intersection over the
/// volume of the smallest box *enclosing* both, plus 1e-6. The enclosing box is the union only when the union
/// is itself a box (boxes shifted along a single axis, or nested); otherwise it adds corners neither box covers
/// and the score drops (cubes of side 2 shifted by 1 along every axis: 1/15 true, 1/27 here). Extents are not
/// clamped, and the 1e-6 keeps identical boxes just below 1.
pub fn iou(a: &Box3, b: &Box3, convention: Convention) -> f64 {
    let [x1, y1, z1, x2, y2, z2] = *a;
    let [x3, y3, z3, x4, y4, z4] = *b;
    let inter_x = (x2.min(x4) - x1.max(x3)).max(0.0);
    let inter_y = (y2.min(y4) - y1.max(y3)).max(0.0);
    let inter_z = (z2.min(z4) - z1.max(z3)).max(0.0);
    let inter = inter_x * inter_y * inter_z;
    match convention {
        Convention::Reference => {
            let enclosing =
                (x2.max(x4) - x1.min(x3)) * (y2.max(y4) - y1.min(y3)) * (z2.max(z4) - z1.min(z3));
            inter / (enclosing + 1e-6)
        }
        Convention::Corrected => {
            let volume = |b: &Box3| (0..3).map(|i| (b[i + 3] - b[i]).max(0.0)).product::<f64>();
            let union = volume(a) + volume(b) - inter;
            if union > 0.0 {
                inter / union
            } else {
                0.0
            }
        }
    }
}

/// One REC sample, from the model's output and the ground-truth answer text.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum RecOutcome {
    /// Both texts hold a box: their IoU.
    Scored(f64),
    /// The answer holds a box and the prediction none.
    Unparsable,
    /// The answer holds no box: a sample whose target is absent from the volume (the datasets' "no such
    /// organ" answers). `predicted_box` tells whether the model drew one anyway.
    Negative { predicted_box: bool },
}

impl RecOutcome {
    /// The `IOU` column of the reference's `eval_rec.csv`: the IoU, or -1 when either text has no box
    /// (`Bench/eval/eval_pos.py` lines 123-126).
    pub fn reference_value(&self) -> f64 {
        match self {
            RecOutcome::Scored(v) => *v,
            _ => -1.0,
        }
    }
}

/// Scores one REC sample as `eval_pos.py` does: boxes from both texts by [`extract_box`], IoU by [`iou`].
pub fn rec_outcome(prediction: &str, answer: &str, convention: Convention) -> RecOutcome {
    match (extract_box(prediction), extract_box(answer)) {
        (Some(p), Some(a)) => RecOutcome::Scored(iou(&p, &a, convention)),
        (None, Some(_)) => RecOutcome::Unparsable,
        (p, None) => RecOutcome::Negative {
            predicted_box: p.is_some(),
        },
    }
}

/// Mean IoU and Acc@0.5 over REC samples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RecSummary {
    /// Mean IoU over the samples counted (0 when none is).
    pub mean_iou: f64,
    /// Share of the samples counted whose IoU is at least [`ACC_IOU_THRESHOLD`] (0 when none is counted).
    pub acc_at_05: f64,
    /// Samples the two figures average over.
    pub counted: usize,
    pub scored: usize,
    pub unparsable: usize,
    pub negatives: usize,
    /// Negatives where the model drew no box (correct rejections).
    pub negatives_without_box: usize,
}

/// Aggregates REC samples.
///
/// [`Convention::Corrected`]: over the samples whose answer has a box; a prediction without a box counts as
/// IoU 0 (a miss); negatives are left out of both figures and counted separately.
///
/// [`Convention::Reference`]: the plain mean of the `IOU` column the reference writes, where every negative
/// and every unparsable prediction is -1 ([`RecOutcome::reference_value`]), and Acc@0.5 over all rows. The
/// -1 entries pull the mean below what any IoU could give (it can be negative) and make a correct rejection
/// of an absent target cost more than a wrong box.
pub fn rec_summary(outcomes: &[RecOutcome], convention: Convention) -> RecSummary {
    let mut summary = RecSummary {
        mean_iou: 0.0,
        acc_at_05: 0.0,
        counted: 0,
        scored: 0,
        unparsable: 0,
        negatives: 0,
        negatives_without_box: 0,
    };
    let (mut sum, mut hits) = (0.0, 0usize);
    for outcome in outcomes {
        match outcome {
            RecOutcome::Scored(_) => summary.scored += 1,
            RecOutcome::Unparsable => summary.unparsable += 1,
            RecOutcome::Negative { predicted_box } => {
                summary.negatives += 1;
                summary.negatives_without_box += usize::from(!predicted_box);
            }
        }
        let value = match (convention, outcome) {
            (Convention::Reference, o) => o.reference_value(),
            (Convention::Corrected, RecOutcome::Scored(v)) => *v,
            (Convention::Corrected, RecOutcome::Unparsable) => 0.0,
            (Convention::Corrected, RecOutcome::Negative { .. }) => continue,
        };
        summary.counted += 1;
        sum += value;
        hits += usize::from(value >= ACC_IOU_THRESHOLD);
    }
    if summary.counted > 0 {
        summary.mean_iou = sum / summary.counted as f64;
        summary.acc_at_05 = hits as f64 / summary.counted as f64;
    }
    summary
}

/// The normalized box of a mask's non-zero voxels, rounded to 3 decimals as the reference writes boxes into
/// the REC/REG texts (Python's `round(v, 3)`: round half to even on the exact binary value). `mask` is
/// row-major with shape `dims`.
///
/// [`Convention::Corrected`]: the maximum corner is the far edge of the last voxel, `(max_index + 1) / size`,
/// so a mask filling the volume is `[0, 0, 0, 1, 1, 1]` and a box is never empty.
///
/// [`Convention::Reference`] (`mask2box`, `Bench/utils.py` lines 4-27): `max_index / size`, the near edge of
/// the last voxel: every box loses one voxel along each axis, a full mask ends at `(size - 1) / size`, and a
/// one-voxel-thick mask gets a box of zero volume.
///
/// A mask without a non-zero voxel has no box: [`ScoreError::EmptyMask`] (the reference never calls it on
/// one; `torch.min` would raise).
pub fn mask_to_box<T: Copy + Default + PartialEq>(
    mask: &[T],
    dims: [usize; 3],
    convention: Convention,
) -> Result<Box3, ScoreError> {
    let [d0, d1, d2] = dims;
    let len = d0
        .checked_mul(d1)
        .and_then(|n| n.checked_mul(d2))
        .ok_or(ScoreError::ShapeOverflow)?;
    if mask.len() != len {
        return Err(ScoreError::LengthMismatch {
            what: "mask",
            expected: len,
            got: mask.len(),
        });
    }
    let zero = T::default();
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    for (flat, _) in mask.iter().enumerate().filter(|(_, v)| **v != zero) {
        let idx = [flat / (d1 * d2), flat / d2 % d1, flat % d2];
        for axis in 0..3 {
            lo[axis] = lo[axis].min(idx[axis]);
            hi[axis] = hi[axis].max(idx[axis]);
        }
    }
    if lo[0] == usize::MAX {
        return Err(ScoreError::EmptyMask);
    }
    let far_edge = usize::from(convention == Convention::Corrected);
    let mut out = [0.0; 6];
    for axis in 0..3 {
        out[axis] = py_round3(lo[axis] as f64 / dims[axis] as f64);
        out[axis + 3] = py_round3((hi[axis] + far_edge) as f64 / dims[axis] as f64);
    }
    Ok(out)
}

/// Python's `round(v, 3)`: the nearest 3-decimal value, ties (exact in binary) to even. Rust's fixed-precision
/// formatting rounds the exact binary value the same way.
fn py_round3(v: f64) -> f64 {
    format!("{v:.3}").parse().unwrap_or(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_the_first_box_as_the_reference_regex_does() {
        let t =
            "Sure, it is <bx_start>[0.125, 0.3, 0, 1, -0.5, +.75]<bx_end> and [1, 2, 3, 4, 5, 6].";
        assert_eq!(extract_box(t), Some([0.125, 0.3, 0.0, 1.0, -0.5, 0.75]));
        assert_eq!(
            extract_box("[1., 0, 0, 1, 1, 1] [1,2,3,4,5,6] [1, 2, 3, 4, 5]"),
            None
        );
        assert_eq!(extract_box("[1e-3, 0, 0, 1, 1, 1]"), None);
        assert_eq!(
            extract_box("x [1., 0, 0, 1, 1, 1] [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]"),
            Some([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
        );
        assert_eq!(
            extract_box("[٠.٥, 0, 0, ١, 1, 1]"),
            Some([0.5, 0.0, 0.0, 1.0, 1.0, 1.0])
        );
        assert_eq!(extract_box("no box here"), None);
    }

    #[test]
    fn iou_union_versus_the_enclosing_box() {
        let a = [0.0, 0.0, 0.0, 2.0, 2.0, 2.0];
        let b = [1.0, 1.0, 1.0, 3.0, 3.0, 3.0];
        // Intersection 1; union 8 + 8 - 1 = 15; enclosing box 3^3 = 27.
        assert!((iou(&a, &b, Convention::Corrected) - 1.0 / 15.0).abs() < 1e-15);
        assert!((iou(&a, &b, Convention::Reference) - 1.0 / (27.0 + 1e-6)).abs() < 1e-15);
        // Identical boxes: exactly 1, and just below 1 in the reference.
        assert_eq!(iou(&a, &a, Convention::Corrected), 1.0);
        assert!((iou(&a, &a, Convention::Reference) - 8.0 / (8.0 + 1e-6)).abs() < 1e-15);
        // Disjoint and degenerate boxes.
        let c = [5.0, 5.0, 5.0, 6.0, 6.0, 6.0];
        assert_eq!(iou(&a, &c, Convention::Corrected), 0.0);
        let flat = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0];
        assert_eq!(iou(&flat, &flat, Convention::Corrected), 0.0);
    }

    #[test]
    fn rec_summary_corrected_versus_minus_one_averaged_in() {
        let box_a = "[0, 0, 0, 0.5, 0.5, 0.5]";
        let outcomes = [
            rec_outcome(box_a, box_a, Convention::Corrected), // 1.0
            rec_outcome("[0, 0, 0, 0.5, 0.5, 0.25]", box_a, Convention::Corrected), // 0.5
            rec_outcome("I cannot find it.", box_a, Convention::Corrected), // unparsable
            rec_outcome(
                "There is no liver.",
                "The liver is absent.",
                Convention::Corrected,
            ), // negative
            rec_outcome(box_a, "The liver is absent.", Convention::Corrected), // negative, box drawn
        ];
        assert_eq!(outcomes[0], RecOutcome::Scored(1.0));
        assert_eq!(outcomes[1], RecOutcome::Scored(0.5));
        assert_eq!(outcomes[2], RecOutcome::Unparsable);
        assert_eq!(
            outcomes[3],
            RecOutcome::Negative {
                predicted_box: false
            }
        );
        let s = rec_summary(&outcomes, Convention::Corrected);
        assert_eq!(
            (
                s.counted,
                s.scored,
                s.unparsable,
                s.negatives,
                s.negatives_without_box
            ),
            (3, 2, 1, 2, 1)
        );
        assert!((s.mean_iou - 0.5).abs() < 1e-15 && (s.acc_at_05 - 2.0 / 3.0).abs() < 1e-15);
        // Reference: (1 + 0.5 - 1 - 1 - 1) / 5 = -0.3; hits 2 of 5.
        let s = rec_summary(&outcomes, Convention::Reference);
        assert_eq!(s.counted, 5);
        assert!((s.mean_iou + 0.3).abs() < 1e-15 && (s.acc_at_05 - 0.4).abs() < 1e-15);
        assert_eq!(rec_summary(&[], Convention::Corrected).mean_iou, 0.0);
    }

    #[test]
    fn mask_to_box_far_edge_versus_max_index() {
        // 2 x 4 x 5 volume; voxels (1, 1, 2) and (1, 2, 4).
        let mut mask = vec![0u8; 40];
        mask[20 + 5 + 2] = 1;
        mask[20 + 10 + 4] = 3;
        let ours = mask_to_box(&mask, [2, 4, 5], Convention::Corrected).unwrap();
        assert_eq!(ours, [0.5, 0.25, 0.4, 1.0, 0.75, 1.0]);
        let theirs = mask_to_box(&mask, [2, 4, 5], Convention::Reference).unwrap();
        assert_eq!(theirs, [0.5, 0.25, 0.4, 0.5, 0.5, 0.8]);
        // Rounding to 3 decimals, ties to even on the binary value: 1/3 -> 0.333, 2/3 -> 0.667, 1/16 = 0.0625 -> 0.062.
        let mut m = vec![0.0f32; 3 * 16 * 3];
        m[16 * 3 + 3 + 1] = 1.0;
        assert_eq!(
            mask_to_box(&m, [3, 16, 3], Convention::Corrected).unwrap(),
            [0.333, 0.062, 0.333, 0.667, 0.125, 0.667]
        );
        assert!(matches!(
            mask_to_box(&[0u8; 8], [2, 2, 2], Convention::Corrected),
            Err(ScoreError::EmptyMask)
        ));
        assert!(matches!(
            mask_to_box(&[1u8; 7], [2, 2, 2], Convention::Corrected),
            Err(ScoreError::LengthMismatch { .. })
        ));
    }
}
