//! Closed-ended VQA accuracy (reference: `Bench/eval/eval_vqa.py`, close-ended branch).
//!
//! The model is asked `"... Choices: A. x B. y C. z D. w"` and trained to answer `"{letter}. {answer}"`
//! (`Bench/dataset/multi_dataset.py` lines 303-305).

use crate::Convention;

/// The choice letters of M3D-VQA's closed questions.
pub const CHOICE_LETTERS: [char; 4] = ['A', 'B', 'C', 'D'];

/// The choice the prediction commits to: the first choice letter standing on its own (at the start or after a
/// character that is not an ASCII letter or digit) and followed by a period, as in `"B. Sagittal"` or
/// `"The answer is C."`.
pub fn predicted_choice(prediction: &str) -> Option<char> {
    let mut prev: Option<char> = None;
    let mut chars = prediction.chars().peekable();
    while let Some(c) = chars.next() {
        let standalone = prev.is_none_or(|p| !p.is_ascii_alphanumeric());
        if standalone && CHOICE_LETTERS.contains(&c) && chars.peek() == Some(&'.') {
            return Some(c);
        }
        prev = Some(c);
    }
    None
}

/// Whether a closed-VQA prediction is correct.
///
/// [`Convention::Corrected`]: the [`predicted_choice`] equals `answer_choice` (surrounding whitespace
/// ignored).
///
/// [`Convention::Reference`] (`eval_vqa.py` line 114, `answer_choice[0] + '.' in generated_texts[0]`): the
/// substring `"{choice}."` occurs anywhere in the prediction. A prediction that lists every option
/// (`"A. liver B. spleen ..."`) is right whatever the answer, and `"A."` is found inside `"DNA."` or
/// `"... segment A."`.
pub fn closed_vqa_correct(prediction: &str, answer_choice: &str, convention: Convention) -> bool {
    let choice = answer_choice.trim();
    match convention {
        Convention::Reference => prediction.contains(&format!("{answer_choice}.")),
        Convention::Corrected => {
            let mut letters = choice.chars();
            match (letters.next(), letters.next()) {
                (Some(c), None) => predicted_choice(prediction) == Some(c),
                _ => false,
            }
        }
    }
}

/// Share of correct predictions over `(prediction, answer_choice)` pairs; 0 for none.
pub fn closed_vqa_accuracy<'a>(
    samples: impl IntoIterator<Item = (&'a str, &'a str)>,
    convention: Convention,
) -> f64 {
    let (mut correct, mut total) = (0usize, 0usize);
    for (prediction, choice) in samples {
        total += 1;
        correct += usize::from(closed_vqa_correct(prediction, choice, convention));
    }
    if total == 0 {
        0.0
    } else {
        correct as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_standalone_marker_is_the_answer() {
        assert_eq!(predicted_choice("B. Sagittal"), Some('B'));
        assert_eq!(predicted_choice("  The answer is C. Kidney"), Some('C'));
        assert_eq!(predicted_choice("DNA. A. liver"), Some('A'));
        assert_eq!(predicted_choice("Axial plane."), None);
        assert_eq!(predicted_choice("(D.) spleen"), Some('D'));
        assert_eq!(predicted_choice("E. none"), None);
    }

    #[test]
    fn substring_matching_versus_the_committed_choice() {
        let cases = [
            ("A. Axial", "A", true, true),
            ("B. Sagittal", "A", false, false),
            (
                "A. Axial B. Sagittal C. Coronal D. Oblique",
                "C",
                false,
                true,
            ),
            ("The DNA. B. Coronal", "A", false, true),
            ("Coronal", "C", false, false),
            ("C", "C", false, false),
        ];
        for (pred, choice, ours, theirs) in cases {
            assert_eq!(
                closed_vqa_correct(pred, choice, Convention::Corrected),
                ours,
                "{pred:?}"
            );
            assert_eq!(
                closed_vqa_correct(pred, choice, Convention::Reference),
                theirs,
                "{pred:?}"
            );
        }
        let samples = cases.iter().map(|c| (c.0, c.1));
        assert!(
            (closed_vqa_accuracy(samples.clone(), Convention::Corrected) - 1.0 / 6.0).abs() < 1e-15
        );
        assert!((closed_vqa_accuracy(samples, Convention::Reference) - 0.5).abs() < 1e-15);
        assert_eq!(closed_vqa_accuracy([], Convention::Corrected), 0.0);
    }
}
