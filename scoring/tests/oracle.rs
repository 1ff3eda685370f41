//! The text metrics against the Python packages M3D-Bench uses (sacrebleu 2.6.0 + tensorflow/nmt's
//! compute_bleu, rouge-score 0.1.2, NLTK 3.10.4), pair by pair on tests/data/corpus.jsonl, through
//! tests/oracle/metrics_oracle.py. Scores must agree to 1e-9; tokens, sentences, stems and synonyms exactly.

use m3d_scoring::bleu::{bleu, tokenize_13a, BleuParams};
use m3d_scoring::meteor::{Meteor, MeteorParams};
use m3d_scoring::punkt::Punkt;
use m3d_scoring::rouge::{rouge1, rouge_tokenize};
use m3d_scoring::tokenize::WordTokenizer;
use m3d_scoring::wordnet::{WordNet, DEBIAN_DIR};
use m3d_scoring::{porter, Convention, ScoreError};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::OnceLock;

const TOLERANCE: f64 = 1e-9;

struct Oracle {
    /// Holds the NLTK data folder the oracle built (its Punkt model is read from there too).
    nltk_data: tempfile::TempDir,
    json: Value,
    pairs: Vec<Pair>,
}

struct Pair {
    id: u64,
    prediction: String,
    references: Vec<String>,
}

impl Pair {
    fn refs(&self) -> Vec<&str> {
        self.references.iter().map(String::as_str).collect()
    }
}

fn wordnet_dir() -> PathBuf {
    std::env::var_os("M3D_WORDNET").map_or_else(|| PathBuf::from(DEBIAN_DIR), PathBuf::from)
}

fn corpus_path() -> PathBuf {
    m3d_testkit::package_dir().join("tests/data/corpus.jsonl")
}

fn oracle() -> &'static Oracle {
    static ORACLE: OnceLock<Oracle> = OnceLock::new();
    ORACLE.get_or_init(|| {
        let nltk_data = tempfile::tempdir().expect("temp dir");
        let script = m3d_testkit::package_dir().join("tests/oracle/metrics_oracle.py");
        let corpus = corpus_path();
        let wordnet = wordnet_dir();
        let stdout = m3d_testkit::run_python(
            &script,
            &[
                corpus.to_str().expect("utf-8 path"),
                nltk_data.path().to_str().expect("utf-8 path"),
                "--wordnet",
                wordnet.to_str().expect("utf-8 path"),
            ],
        );
        let json: Value = serde_json::from_str(&stdout).expect("oracle JSON");
        let text = std::fs::read_to_string(&corpus).expect("read corpus");
        let pairs: Vec<Pair> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("corpus line");
                Pair {
                    id: v["id"].as_u64().expect("id"),
                    prediction: v["prediction"].as_str().expect("prediction").to_owned(),
                    references: v["references"]
                        .as_array()
                        .expect("references")
                        .iter()
                        .map(|r| r.as_str().expect("reference").to_owned())
                        .collect(),
                }
            })
            .collect();
        assert!(pairs.len() >= 200, "the corpus has {} pairs", pairs.len());
        assert_eq!(json["pairs"].as_array().expect("pairs").len(), pairs.len());
        Oracle {
            nltk_data,
            json,
            pairs,
        }
    })
}

fn expected(pair: &Pair) -> &'static Value {
    let o = oracle();
    let e = &o.json["pairs"][usize::try_from(pair.id).expect("id")];
    assert_eq!(e["id"].as_u64(), Some(pair.id));
    e
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Records the largest difference seen and fails on any above the tolerance.
struct Worst {
    what: &'static str,
    diff: f64,
    at: u64,
    compared: usize,
}

impl Worst {
    fn new(what: &'static str) -> Worst {
        Worst {
            what,
            diff: 0.0,
            at: 0,
            compared: 0,
        }
    }

    fn check(&mut self, id: u64, ours: f64, theirs: f64) {
        let d = (ours - theirs).abs();
        assert!(
            d <= TOLERANCE,
            "{}, pair {id}: ours {ours}, oracle {theirs}",
            self.what
        );
        self.compared += 1;
        if d >= self.diff {
            (self.diff, self.at) = (d, id);
        }
    }
}

impl Drop for Worst {
    fn drop(&mut self) {
        println!(
            "{}: {} values, worst |difference| {:e} (pair {})",
            self.what, self.compared, self.diff, self.at
        );
    }
}

#[test]
fn bleu_matches_evaluate() {
    let o = oracle();
    let mut worst1 = Worst::new("BLEU-1");
    let mut worst4 = Worst::new("BLEU-4");
    let mut crashes = 0;
    for pair in &o.pairs {
        let e = expected(pair);
        assert_eq!(
            tokenize_13a(&pair.prediction),
            strings(&e["tokens_13a"]["prediction"]),
            "13a tokens, pair {}",
            pair.id
        );
        for (r, want) in pair
            .references
            .iter()
            .zip(e["tokens_13a"]["references"].as_array().expect("refs"))
        {
            assert_eq!(
                tokenize_13a(r),
                strings(want),
                "13a tokens of a reference, pair {}",
                pair.id
            );
        }
        for (max_order, key, worst) in [(1, "bleu1", &mut worst1), (4, "bleu4", &mut worst4)] {
            let corrected = BleuParams {
                max_order,
                ..BleuParams::m3d()
            };
            let reference = BleuParams {
                convention: Convention::Reference,
                ..corrected
            };
            let ours = bleu(&pair.prediction, &pair.refs(), &corrected)
                .expect("corrected BLEU never fails");
            match &e[key] {
                Value::Null => {
                    crashes += usize::from(max_order == 1);
                    assert_eq!(ours.bleu, 0.0, "pair {}", pair.id);
                    let err = bleu(&pair.prediction, &pair.refs(), &reference);
                    assert!(
                        matches!(err, Err(ScoreError::EmptyBleuSegment { .. })),
                        "pair {}: {err:?}",
                        pair.id
                    );
                }
                want => {
                    let theirs =
                        bleu(&pair.prediction, &pair.refs(), &reference).expect("reference BLEU");
                    assert_eq!(
                        ours, theirs,
                        "conventions agree where the reference does not crash"
                    );
                    worst.check(pair.id, ours.bleu, num(&want["bleu"]));
                    worst.check(pair.id, ours.brevity_penalty, num(&want["brevity_penalty"]));
                    worst.check(pair.id, ours.length_ratio, num(&want["length_ratio"]));
                    for (p, w) in ours
                        .precisions
                        .iter()
                        .zip(want["precisions"].as_array().expect("precisions"))
                    {
                        worst.check(pair.id, *p, num(w));
                    }
                    assert_eq!(
                        ours.translation_length as u64,
                        want["translation_length"].as_u64().expect("length")
                    );
                    assert_eq!(
                        ours.reference_length as u64,
                        want["reference_length"].as_u64().expect("length")
                    );
                }
            }
        }
    }
    assert!(
        crashes >= 3,
        "the corpus must hold empty sides ({crashes} crashing pairs)"
    );
    println!(
        "BLEU: {} pairs, {crashes} where the reference raises ZeroDivisionError",
        o.pairs.len()
    );
}

#[test]
fn rouge1_matches_rouge_score() {
    let o = oracle();
    let mut worst = Worst::new("ROUGE-1 P/R/F");
    for pair in &o.pairs {
        let e = expected(pair);
        assert_eq!(
            rouge_tokenize(&pair.prediction),
            strings(&e["rouge_tokens"]["prediction"]),
            "pair {}",
            pair.id
        );
        for (r, want) in pair
            .references
            .iter()
            .zip(e["rouge_tokens"]["references"].as_array().expect("refs"))
        {
            assert_eq!(rouge_tokenize(r), strings(want), "pair {}", pair.id);
        }
        let s = rouge1(&pair.prediction, &pair.refs()).expect("references");
        worst.check(pair.id, s.precision, num(&e["rouge1"]["precision"]));
        worst.check(pair.id, s.recall, num(&e["rouge1"]["recall"]));
        worst.check(pair.id, s.fmeasure, num(&e["rouge1"]["fmeasure"]));
        worst.check(pair.id, s.fmeasure, num(&e["rouge1_evaluate"]));
    }
}

#[test]
fn porter_stems_match_nltk() {
    let stems = oracle().json["stems"].as_object().expect("stems");
    assert!(stems.len() > 300, "{} tokens", stems.len());
    for (token, want) in stems {
        assert_eq!(
            porter::stem(token),
            want.as_str().expect("stem"),
            "stem of {token:?}"
        );
    }
    println!("Porter: {} distinct tokens, all stems equal", stems.len());
}

#[test]
fn word_tokenize_matches_nltk() {
    let o = oracle();
    let punkt =
        Punkt::open(o.nltk_data.path().join("tokenizers/punkt_tab/english")).expect("Punkt model");
    let with_punkt = WordTokenizer::with_punkt(punkt.clone());
    let per_line = WordTokenizer::preserve_line();
    let mut tokens = 0;
    for pair in &o.pairs {
        let e = expected(pair);
        let texts = std::iter::once(&pair.prediction).chain(&pair.references);
        let sentences = std::iter::once(&e["sentences"]["prediction"])
            .chain(e["sentences"]["references"].as_array().expect("refs"));
        let words = std::iter::once(&e["word_tokens"]["prediction"])
            .chain(e["word_tokens"]["references"].as_array().expect("refs"));
        let lines = std::iter::once(&e["word_tokens_preserve_line"]["prediction"]).chain(
            e["word_tokens_preserve_line"]["references"]
                .as_array()
                .expect("refs"),
        );
        for (((text, s), w), l) in texts.zip(sentences).zip(words).zip(lines) {
            assert_eq!(
                punkt.sentences(text),
                strings(s),
                "sentences of {text:?} (pair {})",
                pair.id
            );
            assert_eq!(
                with_punkt.tokenize(text),
                strings(w),
                "word_tokenize({text:?}) (pair {})",
                pair.id
            );
            assert_eq!(
                per_line.tokenize(text),
                strings(l),
                "word_tokenize({text:?}, preserve_line=True) (pair {})",
                pair.id
            );
            tokens += strings(w).len();
        }
    }
    println!(
        "word_tokenize: {} pairs, {tokens} tokens, all equal",
        o.pairs.len()
    );
}

/// The WordNet database, or a failure that says how to install it: METEOR is never skipped.
fn wordnet() -> WordNet {
    let dir = wordnet_dir();
    let missing = oracle().json["wordnet_missing"].as_str().map(str::to_owned);
    assert!(missing.is_none(), "{}", missing.unwrap_or_default());
    WordNet::open(&dir).unwrap_or_else(|e| {
        panic!("WordNet 3.0 not readable in {} ({e}): run scripts/setup.sh (it installs Debian's wordnet-base), or set M3D_WORDNET", dir.display())
    })
}

#[test]
fn wordnet_lemma_names_match_nltk() {
    let wn = wordnet();
    let names = oracle().json["lemma_names"]
        .as_object()
        .expect("lemma_names");
    let mut with_synsets = 0;
    for (word, want) in names {
        let ours: Vec<String> = wn
            .lemma_names(word)
            .expect("lemma names")
            .into_iter()
            .collect();
        assert_eq!(ours, strings(want), "lemma names of {word:?}");
        with_synsets += usize::from(!ours.is_empty());
    }
    assert!(with_synsets > 200, "only {with_synsets} words have synsets");
    println!(
        "WordNet: {} words, {with_synsets} with synsets, all lemma name sets equal",
        names.len()
    );
}

#[test]
fn meteor_matches_nltk() {
    let o = oracle();
    let punkt =
        Punkt::open(o.nltk_data.path().join("tokenizers/punkt_tab/english")).expect("Punkt model");
    let meteor = Meteor::new(
        wordnet(),
        WordTokenizer::with_punkt(punkt),
        MeteorParams::default(),
    );
    let per_line = Meteor::new(
        wordnet(),
        WordTokenizer::preserve_line(),
        MeteorParams::default(),
    );
    let mut worst = Worst::new("METEOR");
    let mut worst_line = Worst::new("METEOR (preserve_line)");
    let mut differ = 0;
    for pair in &o.pairs {
        let e = expected(pair);
        let ours = meteor
            .score(&pair.prediction, &pair.refs())
            .expect("METEOR");
        worst.check(pair.id, ours, num(&e["meteor"]));
        let line = per_line
            .score(&pair.prediction, &pair.refs())
            .expect("METEOR");
        worst_line.check(pair.id, line, num(&e["meteor_preserve_line"]));
        differ += usize::from((ours - line).abs() > TOLERANCE);
    }
    println!(
        "METEOR: sentence splitting changes the score of {differ} of {} pairs",
        o.pairs.len()
    );
}
