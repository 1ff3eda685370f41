//! BLEU as M3D-Bench computes it: Hugging Face evaluate's `bleu` metric, which tokenizes with sacrebleu's
//! `Tokenizer13a` and scores with tensorflow/nmt's `compute_bleu`
//! (`bleu.compute(predictions=[pred], references=[[ref]], max_order=1)` in the reference's
//! `Bench/eval/eval_caption.py`, `eval_vqa.py` and `eval_pos.py`, one sample at a time).

use crate::pytext::{py_split, re_static, sub};
use crate::{Convention, ScoreError, Segment};
use regex::Regex;
use std::collections::HashMap;
use std::sync::LazyLock;

/// The n-gram order M3D-Bench passes to `bleu.compute` (BLEU-1).
pub const M3D_MAX_ORDER: usize = 1;

/// How [`bleu`] scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BleuParams {
    /// Longest n-gram counted; evaluate's default is 4, M3D-Bench uses [`M3D_MAX_ORDER`].
    pub max_order: usize,
    /// Lin & Och (2004) add-one smoothing of the precisions of order 2 and up, as `compute_bleu(smooth=True)`.
    pub smooth: bool,
    /// What an empty side does; see [`bleu`].
    pub convention: Convention,
}

impl BleuParams {
    /// M3D-Bench's settings: BLEU-1, no smoothing, corrected handling of empty segments.
    pub const fn m3d() -> BleuParams {
        BleuParams {
            max_order: M3D_MAX_ORDER,
            smooth: false,
            convention: Convention::Corrected,
        }
    }
}

impl Default for BleuParams {
    fn default() -> BleuParams {
        BleuParams::m3d()
    }
}

/// Everything evaluate's `bleu` returns for one prediction.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BleuScore {
    pub bleu: f64,
    /// Modified n-gram precision of each order, 1 first.
    pub precisions: Vec<f64>,
    pub brevity_penalty: f64,
    /// Prediction length over the shortest reference's length (0 where that reference is empty).
    pub length_ratio: f64,
    pub translation_length: usize,
    pub reference_length: usize,
}

static RE_PUNCT: LazyLock<Regex> = LazyLock::new(|| re_static(r"[{-~\[-` -&(-+:-@/]"));
static RE_PERIOD_COMMA_AFTER_NON_DIGIT: LazyLock<Regex> =
    LazyLock::new(|| re_static(r"([^0-9])([.,])"));
static RE_PERIOD_COMMA_BEFORE_NON_DIGIT: LazyLock<Regex> =
    LazyLock::new(|| re_static(r"([.,])([^0-9])"));
static RE_DASH_AFTER_DIGIT: LazyLock<Regex> = LazyLock::new(|| re_static(r"([0-9])(-)"));

/// sacrebleu 2.6.0's `Tokenizer13a` (mteval-v13a), split into tokens as evaluate's copy of it returns them.
///
/// Drops `<skipped>`, joins `-\n` hyphenations, turns newlines into spaces, unescapes `&quot;` `&amp;`
/// `&lt;` `&gt;` (in that order, once each), pads ASCII punctuation with spaces, splits `.` and `,` off unless
/// they sit between digits (`3.5` and `1,000` stay whole), splits a `-` that follows a digit, and splits on
/// Python's whitespace.
pub fn tokenize_13a(line: &str) -> Vec<String> {
    let mut line = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let line = format!(" {line} ");
    let line = sub(&RE_PUNCT, " $0 ", &line);
    let line = sub(&RE_PERIOD_COMMA_AFTER_NON_DIGIT, "$1 $2 ", &line);
    let line = sub(&RE_PERIOD_COMMA_BEFORE_NON_DIGIT, " $1 $2", &line);
    let line = sub(&RE_DASH_AFTER_DIGIT, "$1 $2 ", &line);
    py_split(&line).map(str::to_owned).collect()
}

/// Sentence-level BLEU of `prediction` against `references`, as evaluate's `bleu` computes it for a batch of
/// one: both sides tokenized by [`tokenize_13a`], clipped n-gram matches against the per-n-gram maximum over
/// the references, brevity penalty against the *shortest* reference (tensorflow/nmt's choice, not the
/// closest), geometric mean of the precisions that is 0 when any precision is 0.
///
/// An empty side (no tokens after tokenization) makes the reference divide by zero: an empty prediction in
/// the brevity penalty `exp(1 - 1/ratio)`, an empty shortest reference in `ratio` itself, and either raises
/// `ZeroDivisionError` and ends the evaluation run. With [`Convention::Corrected`] such a pair scores 0 (no
/// n-gram can match; brevity penalty and length ratio are reported as 0); with [`Convention::Reference`] it
/// is [`ScoreError::EmptyBleuSegment`].
pub fn bleu(
    prediction: &str,
    references: &[&str],
    params: &BleuParams,
) -> Result<BleuScore, ScoreError> {
    let refs: Vec<Vec<String>> = references.iter().map(|r| tokenize_13a(r)).collect();
    compute_bleu(&refs, &tokenize_13a(prediction), params)
}

/// tensorflow/nmt's `compute_bleu` for one translation, on tokens; see [`bleu`].
pub fn compute_bleu(
    references: &[Vec<String>],
    translation: &[String],
    params: &BleuParams,
) -> Result<BleuScore, ScoreError> {
    let max_order = params.max_order;
    if max_order == 0 {
        return Err(ScoreError::ZeroMaxOrder);
    }
    let reference_length = references
        .iter()
        .map(Vec::len)
        .min()
        .ok_or(ScoreError::NoReferences)?;
    let translation_length = translation.len();

    let mut merged: HashMap<&[String], usize> = HashMap::new();
    for reference in references {
        for (ngram, count) in ngram_counts(reference, max_order) {
            let slot = merged.entry(ngram).or_default();
            *slot = (*slot).max(count);
        }
    }
    let mut matches = vec![0usize; max_order];
    for (ngram, count) in ngram_counts(translation, max_order) {
        if let Some(&ref_count) = merged.get(ngram) {
            matches[ngram.len() - 1] += count.min(ref_count);
        }
    }
    let precisions: Vec<f64> = (0..max_order)
        .map(|i| {
            let possible = translation_length.saturating_sub(i);
            if params.smooth && i > 0 {
                (matches[i] as f64 + 1.0) / (possible as f64 + 1.0)
            } else if possible > 0 {
                matches[i] as f64 / possible as f64
            } else {
                0.0
            }
        })
        .collect();
    let geo_mean = if precisions.iter().all(|&p| p > 0.0) {
        // Summed left to right from 0 like Python's sum(), so the last bits agree.
        let log_sum = precisions
            .iter()
            .fold(0.0, |acc, &p| acc + (1.0 / max_order as f64) * p.ln());
        log_sum.exp()
    } else {
        0.0
    };

    if reference_length == 0 || translation_length == 0 {
        return match params.convention {
            Convention::Reference => Err(ScoreError::EmptyBleuSegment {
                side: if translation_length == 0 {
                    Segment::Prediction
                } else {
                    Segment::Reference
                },
            }),
            Convention::Corrected => Ok(BleuScore {
                bleu: 0.0,
                precisions,
                brevity_penalty: 0.0,
                length_ratio: 0.0,
                translation_length,
                reference_length,
            }),
        };
    }
    let ratio = translation_length as f64 / reference_length as f64;
    let brevity_penalty = if ratio > 1.0 {
        1.0
    } else {
        (1.0 - 1.0 / ratio).exp()
    };
    Ok(BleuScore {
        bleu: geo_mean * brevity_penalty,
        precisions,
        brevity_penalty,
        length_ratio: ratio,
        translation_length,
        reference_length,
    })
}

/// Counts of every n-gram of order 1..=max_order.
fn ngram_counts(tokens: &[String], max_order: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    for order in 1..=max_order {
        for ngram in tokens.windows(order) {
            *counts.entry(ngram).or_default() += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<String> {
        tokenize_13a(s)
    }

    #[test]
    fn tokenizer_13a_keeps_numbers_whole_and_splits_punctuation() {
        assert_eq!(
            toks("Lesion of 3.5cm, 1,000 (10%)."),
            ["Lesion", "of", "3.5cm", ",", "1,000", "(", "10", "%", ")", "."]
        );
        assert_eq!(
            toks("2020-01-05 x-ray"),
            ["2020", "-", "01", "-", "05", "x-ray"]
        );
        assert_eq!(
            toks("a &amp;quot; &lt;b&gt; <skipped>c"),
            ["a", "&", "quot", ";", "<", "b", ">", "c"]
        );
        assert_eq!(toks("well-\nknown\nline"), ["wellknown", "line"]);
        assert!(toks(" \u{1f} ").is_empty());
    }

    #[test]
    fn bleu_one_by_hand() {
        // 13a tokens: pred [the, liver, is, the, liver] (5), ref [the, liver, is, normal, .] (5).
        // Clipped unigram matches: the 1, liver 1, is 1 = 3 of 5; ratio 1 -> brevity penalty exp(0) = 1.
        let s = bleu(
            "the liver is the liver",
            &["the liver is normal."],
            &BleuParams::m3d(),
        )
        .unwrap();
        assert!((s.bleu - 0.6).abs() < 1e-15, "{s:?}");
        assert_eq!((s.translation_length, s.reference_length), (5, 5));
        // A 2-token prediction against that reference: precision 1, brevity penalty exp(1 - 5/2).
        let s = bleu(
            "liver normal",
            &["the liver is normal."],
            &BleuParams::m3d(),
        )
        .unwrap();
        assert!((s.bleu - (1.0f64 - 2.5).exp()).abs() < 1e-15);
    }

    #[test]
    fn shortest_reference_sets_the_brevity_penalty_and_counts_merge_by_maximum() {
        let s = bleu("a a b", &["a b", "a a c d"], &BleuParams::m3d()).unwrap();
        // a: min(2, max(1, 2)) = 2, b: 1 -> 3/3; ratio 3/2 > 1 -> penalty 1.
        assert_eq!((s.bleu, s.reference_length), (1.0, 2));
    }

    #[test]
    fn higher_orders_and_smoothing() {
        let p = BleuParams {
            max_order: 2,
            smooth: false,
            convention: Convention::Corrected,
        };
        let s = bleu("a b c", &["a b d"], &p).unwrap();
        // p1 = 2/3, p2 = 1/2; geometric mean sqrt(1/3).
        assert!((s.bleu - (1.0f64 / 3.0).sqrt()).abs() < 1e-12);
        let s = bleu("a c", &["a b"], &p).unwrap();
        assert_eq!(s.bleu, 0.0);
        let s = bleu("a c", &["a b"], &BleuParams { smooth: true, ..p }).unwrap();
        // p1 = 1/2 (never smoothed), p2 = (0 + 1) / (1 + 1).
        assert!((s.bleu - 0.5).abs() < 1e-12);
    }

    #[test]
    fn empty_segments_score_zero_or_fail_like_the_reference() {
        let corrected = BleuParams::m3d();
        let reference = BleuParams {
            convention: Convention::Reference,
            ..corrected
        };
        for (pred, refr, side) in [
            ("", "liver", Segment::Prediction),
            ("liver", " ", Segment::Reference),
            ("", "", Segment::Prediction),
        ] {
            assert_eq!(bleu(pred, &[refr], &corrected).unwrap().bleu, 0.0);
            match bleu(pred, &[refr], &reference) {
                Err(ScoreError::EmptyBleuSegment { side: got }) => assert_eq!(got, side),
                other => panic!("{pred:?} / {refr:?}: {other:?}"),
            }
        }
        assert!(matches!(
            bleu("a", &[], &corrected),
            Err(ScoreError::NoReferences)
        ));
    }
}
