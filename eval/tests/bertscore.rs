//! BERTScore against bert_score 0.3.13 (tests/oracle/bertscore_oracle.py) on a tiny RoBERTa the oracle saves in
//! the Hub's roberta-large layout (`roberta.` prefix, MLM head, 3 layers cut to 2, texts truncated at 24
//! tokens), over scoring's 264-pair corpus (empty strings, unicode, numbers, punctuation) and its candidates
//! scored against their first reference.
//!
//! Tokens must be identical. Scores agree to 2e-6: both sides run the same float32 network on one sentence at
//! a time, but through different libtorch builds and kernels (and on another CPU, other SIMD paths), so matrix
//! products may differ in summation order. Each embedding is within a few float32 ulps (~1e-7 relative) after the two layers and LayerNorms, and
//! a score is a mean of cosines in [-1, 1] each carrying that error; 2e-6 is an order of magnitude above it
//! and far below any real difference (a wrong token or layer moves a score by 1e-2 or more).

use std::path::Path;

use m3d_eval::bertscore::BertScorer;
use m3d_testkit::{run_python, workspace_root};
use serde_json::Value;
use tch::Device;

const TOLERANCE: f64 = 2e-6;

fn oracle() -> std::path::PathBuf {
    workspace_root().join("eval/tests/oracle/bertscore_oracle.py")
}

fn corpus_pairs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(workspace_root().join("scoring/tests/data/corpus.jsonl"))
        .expect("scoring's corpus");
    let mut pairs: Vec<(String, String)> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("corpus line");
            let pred = v["prediction"].as_str().expect("prediction").to_string();
            let reference = v["references"][0].as_str().expect("reference").to_string();
            (pred, reference)
        })
        .collect();
    // Past model_max_length (24) on both sides, so truncation is exercised.
    let long =
        "the liver shows multiple hypodense lesions in segments four and seven, the largest \
                measuring 3.2 cm, with no biliary dilatation and a normal portal vein";
    pairs.push((long.to_string(), format!("{long} and spleen")));
    pairs
}

fn make_model(dir: &Path) {
    let corpus = workspace_root().join("scoring/tests/data/corpus.jsonl");
    run_python(
        &oracle(),
        &["make", dir.to_str().unwrap(), corpus.to_str().unwrap()],
    );
}

#[test]
fn bertscore_equals_bert_score_on_the_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("roberta");
    make_model(&model);
    let pairs = corpus_pairs();
    let pairs_file = tmp.path().join("pairs.json");
    std::fs::write(&pairs_file, serde_json::to_vec(&pairs).unwrap()).unwrap();
    let out = run_python(
        &oracle(),
        &[
            "score",
            model.to_str().unwrap(),
            "2",
            pairs_file.to_str().unwrap(),
        ],
    );
    let expected: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();

    let scorer = BertScorer::load(&model, Some(2), Device::Cpu).unwrap();
    for (sentence, ids) in expected["tokens"].as_object().unwrap() {
        let want: Vec<i64> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(
            scorer.token_ids(sentence).unwrap(),
            want,
            "tokens of {sentence:?}"
        );
    }
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(c, r)| (c.as_str(), r.as_str()))
        .collect();
    let got = scorer.score(&refs).unwrap();
    let want = expected["scores"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    let mut worst = 0f64;
    let mut zeros = 0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let w: Vec<f64> = w
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (name, a, b) in [
            ("P", g.precision, w[0]),
            ("R", g.recall, w[1]),
            ("F", g.f1, w[2]),
        ] {
            assert!(
                (a - b).abs() <= TOLERANCE,
                "pair {i} {:?}: {name} {a} vs bert_score {b}",
                pairs[i]
            );
            worst = worst.max((a - b).abs());
        }
        zeros += usize::from(w[2] == 0.0);
    }
    // The corpus has empty candidates and references (scored 0) and real pairs (scored otherwise).
    assert!(zeros > 0 && zeros < got.len() / 4, "{zeros} zero scores");
    eprintln!("{} pairs, worst difference {worst:e}", got.len());
}

#[test]
fn bertscore_layers_and_folders_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("roberta");
    make_model(&model);
    // A 3-layer encoder: layer 4 does not exist, and no default layer is known for this shape.
    let err = BertScorer::load(&model, Some(4), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 4") && err.contains("1..=3"), "{err}");
    let err = BertScorer::load(&model, None, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("name the layer"),
        "{err}"
    );
    let err = BertScorer::load(&tmp.path().join("none"), Some(2), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("none") && err.contains("no such"), "{err}");
    // The last layer alone differs from the second: the cut is where bert_score makes it.
    let two = BertScorer::load(&model, Some(2), Device::Cpu).unwrap();
    let three = BertScorer::load(&model, Some(3), Device::Cpu).unwrap();
    let pair = [("the liver is normal", "no acute findings in the abdomen")];
    let (a, b) = (two.score(&pair).unwrap()[0], three.score(&pair).unwrap()[0]);
    assert!((a.f1 - b.f1).abs() > 1e-4, "{a:?} {b:?}");
}
