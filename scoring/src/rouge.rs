//! ROUGE-N as rouge-score 0.1.2 computes it with its default tokenizer and `use_stemmer=False`, which is how
//! Hugging Face evaluate's `rouge` metric calls it in M3D-Bench (`rouge.compute(predictions=[pred],
//! references=[[ref]], rouge_types=['rouge1'])`).
//!
//! evaluate passes the references as a list of lists, so rouge-score's `score_multi` picks, per prediction,
//! the reference with the highest F-measure (the first on ties), and evaluate's `BootstrapAggregator` then
//! reports the middle of 1000 resamples of that single value, which is the value itself: for one pair the
//! reported `rouge1` is exactly [`rouge_n_multi`]'s `fmeasure`.

use serde::Serialize;
use std::collections::HashMap;

/// Precision, recall and F1 of n-gram overlap.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RougeScore {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

/// rouge-score's default tokenizer: Python-lowercase the text, replace every run of characters other than
/// ASCII `a-z0-9` with a space, split. Everything non-ASCII therefore vanishes (accents break words:
/// `"hépatique"` gives `h`, `patique`), except what lowercases to ASCII, such as the Kelvin sign.
pub fn rouge_tokenize(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// ROUGE-N of `prediction` against one `reference` (the target), as rouge-score's `_score_ngrams`: clipped
/// n-gram overlap over the prediction's n-gram count (precision) and the reference's (recall), each
/// denominator at least 1, F-measure 0 where both are 0.
pub fn rouge_n(prediction: &str, reference: &str, n: usize) -> RougeScore {
    let (pred_tokens, target_tokens) = (rouge_tokenize(prediction), rouge_tokenize(reference));
    let pred = ngrams(&pred_tokens, n);
    let target = ngrams(&target_tokens, n);
    let overlap: usize = target
        .iter()
        .map(|(g, &c)| c.min(pred.get(g).copied().unwrap_or(0)))
        .sum();
    let precision = overlap as f64 / pred.values().sum::<usize>().max(1) as f64;
    let recall = overlap as f64 / target.values().sum::<usize>().max(1) as f64;
    RougeScore {
        precision,
        recall,
        fmeasure: fmeasure(precision, recall),
    }
}

/// ROUGE-N against several references as rouge-score's `score_multi`: the score of the reference with the
/// highest F-measure, the first one on ties. `None` without references (rouge-score fails there).
pub fn rouge_n_multi(prediction: &str, references: &[&str], n: usize) -> Option<RougeScore> {
    let mut best: Option<RougeScore> = None;
    for reference in references {
        let score = rouge_n(prediction, reference, n);
        if best.is_none_or(|b| score.fmeasure > b.fmeasure) {
            best = Some(score);
        }
    }
    best
}

/// ROUGE-1 as M3D-Bench reports it; see [`rouge_n_multi`].
pub fn rouge1(prediction: &str, references: &[&str]) -> Option<RougeScore> {
    rouge_n_multi(prediction, references, 1)
}

fn fmeasure(precision: f64, recall: f64) -> f64 {
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

fn ngrams(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    if n > 0 {
        for g in tokens.windows(n) {
            *counts.entry(g).or_default() += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_drops_non_ascii_and_punctuation() {
        assert_eq!(
            rouge_tokenize("Hépatique 3.5cm, NO-lesion!"),
            ["h", "patique", "3", "5cm", "no", "lesion"]
        );
        // KELVIN SIGN lowercases to ASCII k.
        assert_eq!(rouge_tokenize("300\u{212a} 肝脏 🙂"), ["300k"]);
        assert!(rouge_tokenize("").is_empty());
    }

    #[test]
    fn rouge1_by_hand() {
        // pred [the, liver, the, liver] vs ref [the, liver, is, normal]: overlap the 1 + liver 1 = 2.
        let s = rouge_n("the liver the liver", "The liver is normal.", 1);
        assert_eq!((s.precision, s.recall, s.fmeasure), (0.5, 0.5, 0.5));
        let s = rouge_n("", "liver", 1);
        assert_eq!((s.precision, s.recall, s.fmeasure), (0.0, 0.0, 0.0));
        let s = rouge_n("a b c", "a b d", 2);
        assert_eq!((s.precision, s.recall), (0.5, 0.5));
    }

    #[test]
    fn multi_reference_takes_the_best_f_first_on_ties() {
        let s = rouge1("a b", &["a c", "a b c", "b a"]).unwrap();
        // "a c": F 0.5; "a b c": P 1, R 2/3, F 0.8; "b a": F 1.
        assert_eq!(s.fmeasure, 1.0);
        let s = rouge1("a", &["a b", "b a"]).unwrap();
        assert_eq!((s.precision, s.recall), (1.0, 0.5));
        assert!(rouge1("a", &[]).is_none());
    }
}
