//! Word-level vocabularies built from a run's own texts, for the `tiny` and `debug` presets, which have no
//! published tokenizer and must not download one. The result is an ordinary HF `tokenizer.json` (a
//! `WordLevel` model behind BERT's normaliser and pre-tokeniser), so the rest of the stack — and
//! `tokenizers`/`transformers` in Python — loads it like any other.
//!
//! The vocabulary is a pure function of the texts (sorted, deduplicated words), so every worker that reads
//! the same shards builds the same file without talking to the others.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{json, Value};
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::{
    NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
};

/// Which special tokens and template the vocabulary gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabStyle {
    /// BERT's: `[PAD]` 0, `[UNK]` 1, `[CLS]` 2, `[SEP]` 3, `[MASK]` 4; a text becomes `[CLS] … [SEP]`
    /// (M3D-CLIP's text encoder).
    Bert,
    /// Llama-2's: `<unk>` 0, `<s>` 1, `</s>` 2; a text becomes `<s> …` (M3D-LaMed pads with `<unk>`).
    Llama,
}

impl VocabStyle {
    fn specials(self) -> &'static [&'static str] {
        match self {
            VocabStyle::Bert => &["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            VocabStyle::Llama => &["<unk>", "<s>", "</s>"],
        }
    }
}

/// The words of `text` as the tokenizer this module writes will see them: `tokenizers`' own BERT normaliser
/// (lower-cased, accents stripped) and pre-tokeniser (split on whitespace and around punctuation), the same
/// components `tokenizer.json` names, so every word of the texts is in the vocabulary.
fn words(text: &str) -> Vec<String> {
    let mut normalized = NormalizedString::from(text);
    if BertNormalizer::new(true, true, Some(true), true)
        .normalize(&mut normalized)
        .is_err()
    {
        return Vec::new();
    }
    let mut pre = PreTokenizedString::from(normalized);
    if BertPreTokenizer.pre_tokenize(&mut pre).is_err() {
        return Vec::new();
    }
    pre.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(word, _, _)| word.to_string())
        .collect()
}

/// A `tokenizer.json` whose vocabulary is the specials of `style` followed by every word of `texts`, sorted.
pub fn word_level_tokenizer<'a>(
    texts: impl IntoIterator<Item = &'a str>,
    style: VocabStyle,
) -> Value {
    let specials = style.specials();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for t in texts {
        seen.extend(words(t));
    }
    let mut vocab = serde_json::Map::new();
    for (id, tok) in specials
        .iter()
        .map(|s| s.to_string())
        .chain(seen.into_iter().filter(|w| !specials.contains(&w.as_str())))
        .enumerate()
    {
        vocab.insert(tok, json!(id));
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(id, s)| {
            json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let (unk, post) = match style {
        VocabStyle::Bert => (
            "[UNK]",
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                         {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
                "special_tokens": {
                    "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                    "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
                }
            }),
        ),
        VocabStyle::Llama => (
            "<unk>",
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
            }),
        ),
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": true, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": post,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": unk}
    })
}

/// Writes `tokenizer` to `path` (through a temporary file and a rename, so a reader never sees half of it).
pub fn write_tokenizer(path: &Path, tokenizer: &Value) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(tokenizer)?)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use m3d_models::tokenizer::{Padding, Tokenizer};

    #[test]
    fn builds_a_tokenizer_the_stack_loads() {
        let texts = [
            "There is a 4.5 cm cyst in the liver.",
            "Café, naïve: the LIVER!",
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        write_tokenizer(&path, &word_level_tokenizer(texts, VocabStyle::Bert)).unwrap();
        let tok = Tokenizer::from_file(&path).unwrap();
        // specials + is there a 4 . 5 cm cyst in the liver cafe , naive : !
        assert_eq!(tok.vocab_size(true), 5 + 16);
        let ids = tok.encode("the liver zebra", true).unwrap();
        let (the, liver) = (
            tok.token_to_id("the").unwrap(),
            tok.token_to_id("liver").unwrap(),
        );
        assert_eq!(ids, vec![2, the, liver, 1, 3]);
        let enc = tok
            .encode_batch(&["cafe cyst"], 6, Padding::MaxLength, true)
            .unwrap();
        assert_eq!(enc.input_ids.size(), vec![1, 6]);
        assert_eq!(enc.input_ids.int64_value(&[0, 5]), 0, "padded with [PAD]");

        let llama = word_level_tokenizer(texts, VocabStyle::Llama);
        write_tokenizer(&path, &llama).unwrap();
        let tok = Tokenizer::from_file(&path).unwrap();
        assert_eq!(tok.encode("liver", true).unwrap()[0], 1, "<s> first");
        assert_eq!(tok.token_to_id("</s>"), Some(2));
    }
}
