//! Python's string primitives where they differ from Rust's, so the ports split, strip and classify text
//! exactly as the reference packages do.
//!
//! Two regular-expression dialects meet in the reference code: the standard `re` module (sacrebleu,
//! rouge-score, NLTK's contraction rules) and the third-party `regex` module (every other NLTK pattern, through
//! `nltk.redos`). Their `\w` and `\s` differ; the `regex` module's match the `regex` crate's, so only the
//! standard module's need a helper here.

use regex::Regex;
use std::sync::LazyLock;

/// `str.isspace()` for one character: Unicode White_Space (Rust's [`char::is_whitespace`]) plus the four ASCII
/// separators U+001C..U+001F, which Python counts as whitespace and Unicode does not. This is what
/// `str.split()`, `str.strip()` and the standard `re` module's `\s` use.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `str.split()` without arguments.
pub fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_space).filter(|t| !t.is_empty())
}

/// `str.strip()` without arguments: what the reference's `postprocess_text` applies to predictions and
/// references before scoring.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// `str.rstrip()` without arguments.
pub(crate) fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(is_py_space)
}

static RE_WORD: LazyLock<Regex> = LazyLock::new(|| re_static(r"^[\p{L}\p{N}_]$"));
static REGEX_WORD: LazyLock<Regex> = LazyLock::new(|| re_static(r"^\w$"));

/// `\w` of Python's standard `re` module on `str` patterns: `str.isalnum()` or `_`, i.e. letters and numbers
/// of every kind, but no combining marks.
pub(crate) fn is_re_word(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || c == '_'
        || (!c.is_ascii() && RE_WORD.is_match(c.encode_utf8(&mut [0; 4])))
}

/// `\w` of the third-party `regex` module (Unicode's definition, which the `regex` crate shares): letters,
/// marks, decimal digits, connector punctuation and joiners.
pub(crate) fn is_regex_word(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || c == '_'
        || (!c.is_ascii() && REGEX_WORD.is_match(c.encode_utf8(&mut [0; 4])))
}

/// Compiles a pattern written in this crate. A failure is a bug in the pattern, caught by every test that
/// touches it.
pub(crate) fn re_static(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|e| panic!("invalid built-in pattern {pattern:?}: {e}"))
}

/// `pattern.sub(replacement, text)` for a replacement template in the `regex` crate's syntax.
pub(crate) fn sub(re: &Regex, replacement: &str, text: &str) -> String {
    re.replace_all(text, replacement).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_whitespace_includes_the_ascii_separators() {
        assert!(is_py_space('\u{1f}') && is_py_space('\u{3000}') && is_py_space('\u{85}'));
        assert!(!is_py_space('\u{200b}') && !is_py_space('\u{180e}'));
        assert_eq!(
            py_split(" a\u{1c}b \u{a0}c ").collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(py_strip("\u{1d} x y\u{2003}"), "x y");
    }

    #[test]
    fn word_classes_differ_on_marks_and_numbers() {
        // U+0301 COMBINING ACUTE ACCENT: a mark; U+00B2 SUPERSCRIPT TWO: a number (No), not a decimal digit.
        assert!(!is_re_word('\u{301}') && is_regex_word('\u{301}'));
        assert!(is_re_word('\u{b2}') && !is_regex_word('\u{b2}'));
        assert!(is_re_word('é') && is_regex_word('é') && is_re_word('_') && !is_re_word('-'));
    }
}
