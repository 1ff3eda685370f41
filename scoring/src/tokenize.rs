//! NLTK 3.10.4's `word_tokenize`: Punkt sentence splitting ([`crate::punkt`]), then `NLTKWordTokenizer` (the
//! improved Treebank tokenizer) on each sentence. This is what evaluate's `meteor` feeds METEOR.
//!
//! NLTK runs most of these patterns through the third-party `regex` module (`nltk.redos`), whose `\w`, `\s`,
//! `\d`, `\b` and case folding the `regex` crate shares; the contraction rules use the standard `re` module,
//! whose `\b` is rebuilt with [`crate::pytext`]. Rules with look-around, which the `regex` crate lacks, are
//! written out by hand.

use crate::punkt::Punkt;
use crate::pytext::{is_re_word, is_regex_word, py_split, re_static, sub};
use regex::Regex;
use std::sync::LazyLock;

/// `word_tokenize(text)` with or without sentence splitting.
#[derive(Clone, Debug, Default)]
pub struct WordTokenizer {
    punkt: Option<Punkt>,
}

impl WordTokenizer {
    /// `word_tokenize(text)` as NLTK runs it by default: sentences from `punkt` (the English `punkt_tab` model
    /// for evaluate's `meteor`), then the Treebank rules on each.
    pub fn with_punkt(punkt: Punkt) -> WordTokenizer {
        WordTokenizer { punkt: Some(punkt) }
    }

    /// `word_tokenize(text, preserve_line=True)`: the whole text as one sentence. Only the text's last period
    /// is split off a word (`"normal. No"` stays `["normal.", "No"]`), so this differs from the default on
    /// any text of several sentences.
    pub fn preserve_line() -> WordTokenizer {
        WordTokenizer { punkt: None }
    }

    /// Whether sentences are split first.
    pub fn splits_sentences(&self) -> bool {
        self.punkt.is_some()
    }

    /// The tokens of `text`.
    pub fn tokenize(&self, text: &str) -> Vec<String> {
        match &self.punkt {
            Some(p) => p
                .sentences(text)
                .into_iter()
                .flat_map(treebank_tokenize)
                .collect(),
            None => treebank_tokenize(text),
        }
    }
}

static RE_OPEN_QUOTES: LazyLock<Regex> = LazyLock::new(|| re_static(r"([«“‘„]|`+)"));
static RE_DOUBLE_BACKTICK: LazyLock<Regex> = LazyLock::new(|| re_static(r"``"));
static RE_QUOTE_AFTER_OPENER: LazyLock<Regex> = LazyLock::new(|| re_static(r#"([ (\[{<])("|'')"#));
static RE_QUOTE_CLITIC: LazyLock<Regex> =
    LazyLock::new(|| re_static(r"(?i)^(?:re|ve|ll|m|t|s|d|n)\b"));
static RE_CLOSE_QUOTES: LazyLock<Regex> = LazyLock::new(|| re_static(r"([»”’])"));
static RE_TWO_SINGLE_QUOTES: LazyLock<Regex> = LazyLock::new(|| re_static(r"''"));
static RE_DOUBLE_QUOTE: LazyLock<Regex> = LazyLock::new(|| re_static(r#"""#));
static RE_SPACES: LazyLock<Regex> = LazyLock::new(|| re_static(r"\s+"));
static RE_CLITIC_SMD: LazyLock<Regex> =
    LazyLock::new(|| re_static(r"([^' ])('[sS]|'[mM]|'[dD]|') "));
static RE_CLITIC_LONG: LazyLock<Regex> =
    LazyLock::new(|| re_static(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "));
static RE_COLON_COMMA: LazyLock<Regex> = LazyLock::new(|| re_static(r"([:,])([^\d])"));
static RE_ELLIPSIS: LazyLock<Regex> = LazyLock::new(|| re_static(r"\.{2,}"));
static RE_SYMBOLS: LazyLock<Regex> = LazyLock::new(|| re_static(r"[;@#$%&]"));
static RE_DASHES: LazyLock<Regex> = LazyLock::new(|| re_static(r"[\u{2012}-\u{2015}]"));
static RE_QUESTION_BANG: LazyLock<Regex> = LazyLock::new(|| re_static(r"[?!]"));
static RE_SINGLE_QUOTE_SPACE: LazyLock<Regex> = LazyLock::new(|| re_static(r"([^'])' "));
static RE_STAR: LazyLock<Regex> = LazyLock::new(|| re_static(r"[*]"));
static RE_BRACKETS: LazyLock<Regex> = LazyLock::new(|| re_static(r"[\]\[(){}<>]"));
static RE_DOUBLE_DASH: LazyLock<Regex> = LazyLock::new(|| re_static(r"--"));

/// MacIntyre's contractions NLTK splits (`CONTRACTIONS2`, `CONTRACTIONS3`): the two halves, and whether the
/// second must be followed by whitespace rather than a word boundary (`wanna`) or the first preceded by a
/// space rather than a word boundary (`'tis`, `'twas`).
const CONTRACTIONS: [(&str, &str, Edge); 10] = [
    ("can", "not", Edge::Boundary),
    ("d", "'ye", Edge::Boundary),
    ("gim", "me", Edge::Boundary),
    ("gon", "na", Edge::Boundary),
    ("got", "ta", Edge::Boundary),
    ("lem", "me", Edge::Boundary),
    ("more", "'n", Edge::Boundary),
    ("wan", "na", Edge::SpaceAfter),
    ("'t", "is", Edge::SpaceBefore),
    ("'t", "was", Edge::SpaceBefore),
];

#[derive(Clone, Copy, PartialEq)]
enum Edge {
    /// `\b(first)(second)\b`.
    Boundary,
    /// `\b(first)(second)(?=\s)`.
    SpaceAfter,
    /// ` (first)(second)\b`.
    SpaceBefore,
}

static RE_CONTRACTIONS: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    CONTRACTIONS
        .iter()
        .map(|(a, b, _)| re_static(&format!("(?i)({})({})", regex::escape(a), regex::escape(b))))
        .collect()
});

/// `NLTKWordTokenizer().tokenize(text)` (without `convert_parentheses`).
pub fn treebank_tokenize(text: &str) -> Vec<String> {
    // Starting quotes.
    let mut t = sub(&RE_OPEN_QUOTES, " $1 ", text);
    if let Some(rest) = t.strip_prefix('"') {
        t = format!("``{rest}");
    }
    t = sub(&RE_DOUBLE_BACKTICK, " `` ", &t);
    t = sub(&RE_QUOTE_AFTER_OPENER, "$1 `` ", &t);
    t = split_opening_single_quotes(&t);

    // Punctuation.
    t = final_period(&t, is_closer_or_space, true);
    t = sub(&RE_COLON_COMMA, " $1 $2", &t);
    t = colon_comma_at_end(&t);
    t = sub(&RE_ELLIPSIS, " $0 ", &t);
    t = sub(&RE_SYMBOLS, " $0 ", &t);
    t = sub(&RE_DASHES, " $0 ", &t);
    t = final_period(&t, is_ascii_closer, false);
    t = sub(&RE_QUESTION_BANG, " $0 ", &t);
    t = sub(&RE_SINGLE_QUOTE_SPACE, "$1 ' ", &t);
    t = sub(&RE_STAR, " $0 ", &t);

    t = sub(&RE_BRACKETS, " $0 ", &t);
    t = sub(&RE_DOUBLE_DASH, " -- ", &t);

    // Ending quotes.
    t = format!(" {t} ");
    t = sub(&RE_CLOSE_QUOTES, " $1 ", &t);
    t = sub(&RE_TWO_SINGLE_QUOTES, " '' ", &t);
    t = sub(&RE_DOUBLE_QUOTE, " '' ", &t);
    t = sub(&RE_SPACES, " ", &t);
    t = sub(&RE_CLITIC_SMD, "$1 $2 ", &t);
    t = sub(&RE_CLITIC_LONG, "$1 $2 ", &t);

    for (re, &(_, _, edge)) in RE_CONTRACTIONS.iter().zip(CONTRACTIONS.iter()) {
        t = split_contraction(&t, re, edge);
    }
    py_split(&t).map(str::to_owned).collect()
}

/// What the first final-period rule carries after the period: closing brackets and quotes, and spaces.
fn is_closer_or_space(c: char) -> bool {
    matches!(
        c,
        ']' | ')' | '}' | '>' | '"' | '\'' | '»' | '”' | '’' | ' '
    )
}

/// What the second final-period rule carries after the period.
fn is_ascii_closer(c: char) -> bool {
    matches!(c, ']' | ')' | '}' | '>' | '"' | '\'')
}

/// `(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)` -> `"\1 "`: a quote opening a word, unless it starts a
/// clitic such as `'re` or `'s`.
fn split_opening_single_quotes(t: &str) -> String {
    let mut out = String::with_capacity(t.len() + 8);
    let mut prev: Option<char> = None;
    for (i, c) in t.char_indices() {
        out.push(c);
        if c == '\'' {
            let rest = &t[i + 1..];
            let opens = !prev.is_some_and(is_regex_word)
                && rest.chars().next().is_some_and(is_regex_word)
                && !RE_QUOTE_CLITIC.is_match(rest);
            if opens {
                out.push(' ');
            }
        }
        prev = Some(c);
    }
    out
}

/// The two final-period rules, `([^\.])(\.)([<closers>]*+)\s*$` -> `"\1 \2 \3 "` (`spaced`, the closers
/// include a space) and `([^\.])(\.)([<closers>]*)\s*$` -> `"\1 \2\3 "`: the first period, not preceded by a
/// period, after which only closing brackets and quotes, then whitespace, remain. The match always runs to
/// the end of the text, `\s*` consuming any final newline before `$` is tested.
fn final_period(t: &str, closer: impl Fn(char) -> bool, spaced: bool) -> String {
    let chars: Vec<(usize, char)> = t.char_indices().collect();
    for i in 0..chars.len().saturating_sub(1) {
        let (start, c) = chars[i];
        if c == '.' || chars[i + 1].1 != '.' {
            continue;
        }
        let mut j = i + 2;
        while j < chars.len() && closer(chars[j].1) {
            j += 1;
        }
        if chars[j..].iter().all(|&(_, c)| c.is_whitespace()) {
            let closers_end = chars.get(j).map_or(t.len(), |&(b, _)| b);
            let closers = &t[chars[i + 1].0 + 1..closers_end];
            let gap = if spaced { " " } else { "" };
            return format!("{}{c} .{gap}{closers} ", &t[..start]);
        }
    }
    t.to_owned()
}

/// `([:,])$` -> `" \1 "`, where Python's `$` also matches before a final newline.
fn colon_comma_at_end(t: &str) -> String {
    let body = t.strip_suffix('\n').unwrap_or(t);
    for candidate in [body, t] {
        if let Some(last) = candidate.chars().last().filter(|c| matches!(c, ':' | ',')) {
            let at = candidate.len() - last.len_utf8();
            return format!("{} {last} {}", &t[..at], &t[candidate.len()..]);
        }
    }
    t.to_owned()
}

/// One contraction rule (`" \1 \2 "`), with the standard `re` module's word boundaries.
fn split_contraction(t: &str, re: &Regex, edge: Edge) -> String {
    let mut out = String::with_capacity(t.len() + 8);
    let mut copied = 0;
    let mut from = 0;
    while let Some(caps) = re.captures_at(t, from) {
        let (Some(whole), Some(a), Some(b)) = (caps.get(0), caps.get(1), caps.get(2)) else {
            break;
        };
        let before = t[..whole.start()].chars().next_back();
        let after = t[whole.end()..].chars().next();
        let first_is_word = a.as_str().chars().next().is_some_and(is_re_word);
        let last_is_word = b.as_str().chars().next_back().is_some_and(is_re_word);
        let lead_ok = match edge {
            Edge::SpaceBefore => before == Some(' '),
            _ => first_is_word != before.is_some_and(is_re_word),
        };
        let tail_ok = match edge {
            Edge::SpaceAfter => after.is_some_and(crate::pytext::is_py_space),
            _ => last_is_word != after.is_some_and(is_re_word),
        };
        if lead_ok && tail_ok {
            let start = if edge == Edge::SpaceBefore {
                whole.start() - 1
            } else {
                whole.start()
            };
            out.push_str(&t[copied..start]);
            out.push(' ');
            out.push_str(a.as_str());
            out.push(' ');
            out.push_str(b.as_str());
            out.push(' ');
            copied = whole.end();
            from = whole.end();
        } else {
            from = whole.start() + t[whole.start()..].chars().next().map_or(1, char::len_utf8);
        }
    }
    out.push_str(&t[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(s: &str) -> Vec<String> {
        treebank_tokenize(s)
    }

    #[test]
    fn nltk_docstring_example() {
        let s = "Good muffins cost $3.88 (roughly 3,36 euros)\nin New York.  Please buy me\ntwo of them.\nThanks.";
        let want = [
            "Good", "muffins", "cost", "$", "3.88", "(", "roughly", "3,36", "euros", ")", "in",
            "New", "York.", "Please", "buy", "me", "two", "of", "them.", "Thanks", ".",
        ];
        assert_eq!(tok(s), want);
    }

    #[test]
    fn quotes_clitics_and_contractions() {
        assert_eq!(
            tok("\"It's\" 'quoted' they're"),
            ["``", "It", "'s", "''", "'", "quoted", "'", "they", "'re"]
        );
        assert_eq!(
            tok("I cannot, gonna wanna go"),
            ["I", "can", "not", ",", "gon", "na", "wan", "na", "go"]
        );
        // The opening-quote rule splits the quote off before the 'tis rule could see it.
        assert_eq!(tok("'Tis fine"), ["'", "Tis", "fine"]);
        assert_eq!(tok("it was 'twas"), ["it", "was", "'", "twas"]);
        assert_eq!(
            tok("He said “no” — twice…"),
            ["He", "said", "“", "no", "”", "—", "twice…"]
        );
        assert_eq!(
            tok("Size: 3.5cm, 10%."),
            ["Size", ":", "3.5cm", ",", "10", "%", "."]
        );
        assert_eq!(tok("end...\n"), ["end", "..."]);
        assert!(tok("").is_empty());
    }
}
