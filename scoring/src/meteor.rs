//! METEOR as Hugging Face evaluate's `meteor` metric computes it with NLTK 3.10.4
//! (`meteor.compute(predictions=[pred], references=[[ref]])` in M3D-Bench): both texts through
//! `word_tokenize`, then `nltk.translate.meteor_score.meteor_score` with alpha 0.9, beta 3, gamma 0.5.

use crate::porter;
use crate::tokenize::WordTokenizer;
use crate::wordnet::WordNet;
use crate::ScoreError;
use std::collections::HashMap;

/// METEOR's weights, evaluate's defaults by [`Default`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MeteorParams {
    /// Balance of precision and recall in their harmonic mean `P R / (alpha P + (1 - alpha) R)`.
    pub alpha: f64,
    /// Shape of the fragmentation penalty.
    pub beta: f64,
    /// Weight of the fragmentation penalty.
    pub gamma: f64,
}

impl Default for MeteorParams {
    fn default() -> MeteorParams {
        MeteorParams {
            alpha: 0.9,
            beta: 3.0,
            gamma: 0.5,
        }
    }
}

/// A METEOR scorer: the WordNet database, the tokenizer, the weights.
#[derive(Debug)]
pub struct Meteor {
    wordnet: WordNet,
    tokenizer: WordTokenizer,
    params: MeteorParams,
}

/// A word with its position in the sentence.
type Enum = (usize, String);

impl Meteor {
    /// A scorer; evaluate's `meteor` is `Meteor::new(wordnet, WordTokenizer::with_punkt(english),
    /// MeteorParams::default())`.
    pub fn new(wordnet: WordNet, tokenizer: WordTokenizer, params: MeteorParams) -> Meteor {
        Meteor {
            wordnet,
            tokenizer,
            params,
        }
    }

    /// The tokenizer both texts go through.
    pub fn tokenizer(&self) -> &WordTokenizer {
        &self.tokenizer
    }

    /// evaluate's `meteor` for one prediction and its references: the best [`Meteor::single`] over the
    /// references, each text tokenized by the [`WordTokenizer`]. `references` must not be empty.
    pub fn score(&self, prediction: &str, references: &[&str]) -> Result<f64, ScoreError> {
        let hypothesis = self.tokenizer.tokenize(prediction);
        let mut best: Option<f64> = None;
        for reference in references {
            let s = self.single(&self.tokenizer.tokenize(reference), &hypothesis)?;
            best = Some(best.map_or(s, |b: f64| b.max(s)));
        }
        best.ok_or(ScoreError::NoReferences)
    }

    /// NLTK's `single_meteor_score(reference, hypothesis)` on tokens.
    ///
    /// Both sides are lowercased; words are aligned in three stages, each on what the previous left
    /// unmatched: identical words, identical Porter stems ([`porter::stem`]), then WordNet synonyms
    /// ([`WordNet::lemma_names`] of the hypothesis word, single words only). As in NLTK the synonym stage
    /// looks up the *stems* the second stage produced (`"enlarg"`, not `"enlarged"`), and each stage walks
    /// the hypothesis from its last word, pairing it with the last still-free reference word that qualifies.
    /// With `m` matches the score is `F (1 - gamma (chunks / m)^beta)`, `F = P R / (alpha P + (1 - alpha) R)`,
    /// where chunks are runs of matches adjacent on both sides; 0 when nothing matches or a side is empty.
    pub fn single(&self, reference: &[String], hypothesis: &[String]) -> Result<f64, ScoreError> {
        let hyp: Vec<Enum> = hypothesis
            .iter()
            .map(|w| w.to_lowercase())
            .enumerate()
            .collect();
        let refs: Vec<Enum> = reference
            .iter()
            .map(|w| w.to_lowercase())
            .enumerate()
            .collect();
        let (translation_length, reference_length) = (hyp.len(), refs.len());

        let (mut matches, hyp, refs) = match_enums(hyp, refs);
        let stemmed = |list: Vec<Enum>| {
            list.into_iter()
                .map(|(i, w)| (i, porter::stem(&w)))
                .collect::<Vec<_>>()
        };
        let (stem_matches, hyp, refs) = match_enums(stemmed(hyp), stemmed(refs));
        matches.extend(stem_matches);
        matches.extend(self.synonym_matches(&hyp, &refs)?);
        matches.sort_by_key(|m| m.0);

        let m = matches.len();
        if m == 0 || translation_length == 0 || reference_length == 0 {
            return Ok(0.0);
        }
        let MeteorParams { alpha, beta, gamma } = self.params;
        let precision = m as f64 / translation_length as f64;
        let recall = m as f64 / reference_length as f64;
        let fmean = (precision * recall) / (alpha * precision + (1.0 - alpha) * recall);
        let frag_frac = count_chunks(&matches) as f64 / m as f64;
        let penalty = gamma * frag_frac.powf(beta);
        Ok((1.0 - penalty) * fmean)
    }

    /// `_enum_wordnetsyn_match`.
    fn synonym_matches(
        &self,
        hyp: &[Enum],
        refs: &[Enum],
    ) -> Result<Vec<(usize, usize)>, ScoreError> {
        let mut positions: HashMap<&str, Vec<usize>> = HashMap::new();
        for (j, (_, w)) in refs.iter().enumerate() {
            positions.entry(w.as_str()).or_default().push(j);
        }
        let mut out = Vec::new();
        for (i, word) in hyp.iter().rev() {
            let mut synonyms = self.wordnet.lemma_names(word)?;
            synonyms.retain(|s| !s.contains('_'));
            synonyms.insert(word.clone());
            let best = synonyms
                .iter()
                .filter_map(|s| {
                    positions
                        .get(s.as_str())
                        .and_then(|p| p.last())
                        .map(|&j| (j, s.as_str()))
                })
                .max_by_key(|&(j, _)| j);
            if let Some((j, s)) = best {
                if let Some(p) = positions.get_mut(s) {
                    p.pop();
                }
                out.push((*i, refs[j].0));
            }
        }
        Ok(out)
    }
}

/// `_match_enums`: pairs identical words, the hypothesis from its end, each with the highest-positioned free
/// reference word; returns the pairs (original positions) and what stayed unmatched on each side, in order.
fn match_enums(hyp: Vec<Enum>, refs: Vec<Enum>) -> (Vec<(usize, usize)>, Vec<Enum>, Vec<Enum>) {
    let mut positions: HashMap<&str, Vec<usize>> = HashMap::new();
    for (j, (_, w)) in refs.iter().enumerate() {
        positions.entry(w.as_str()).or_default().push(j);
    }
    let mut matched_hyp = vec![false; hyp.len()];
    let mut matched_ref = vec![false; refs.len()];
    let mut pairs = Vec::new();
    for (i, (pos, w)) in hyp.iter().enumerate().rev() {
        if let Some(j) = positions.get_mut(w.as_str()).and_then(Vec::pop) {
            matched_hyp[i] = true;
            matched_ref[j] = true;
            pairs.push((*pos, refs[j].0));
        }
    }
    let keep = |list: Vec<Enum>, matched: &[bool]| {
        list.into_iter()
            .zip(matched)
            .filter(|(_, &m)| !m)
            .map(|(e, _)| e)
            .collect()
    };
    let hyp_left = keep(hyp, &matched_hyp);
    let ref_left = keep(refs, &matched_ref);
    (pairs, hyp_left, ref_left)
}

/// `_count_chunks` over matches sorted by hypothesis position.
fn count_chunks(matches: &[(usize, usize)]) -> usize {
    1 + matches
        .windows(2)
        .filter(|w| !(w[1].0 == w[0].0 + 1 && w[1].1 == w[0].1 + 1))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enums(words: &[&str]) -> Vec<Enum> {
        words.iter().map(|w| w.to_string()).enumerate().collect()
    }

    #[test]
    fn exact_matching_pairs_from_the_end() {
        let (pairs, h, r) = match_enums(enums(&["a", "b", "a", "c"]), enums(&["a", "a", "b", "d"]));
        // Hypothesis a@2 takes reference a@1, b@1 takes b@2, a@0 takes a@0.
        assert_eq!(pairs, [(2, 1), (1, 2), (0, 0)]);
        assert_eq!(h, [(3, "c".to_owned())]);
        assert_eq!(r, [(3, "d".to_owned())]);
    }

    #[test]
    fn chunks() {
        assert_eq!(count_chunks(&[(0, 0), (1, 1), (2, 3), (3, 4), (5, 2)]), 3);
        assert_eq!(count_chunks(&[(0, 0)]), 1);
    }
}
