//! A reader of the WordNet 3.0 database files (`index.{noun,verb,adj,adv}`, `data.*`, `*.exc`) that answers
//! the one question METEOR asks: the lemma names of every synset of a word, found as NLTK 3.10.4's
//! `wordnet.synsets(word)` finds them (its `morphy`: the exception list, else one round of suffix rules,
//! over noun, verb, adjective and adverb).
//!
//! Debian's `wordnet-base` package installs these files in [`DEBIAN_DIR`]; NLTK's `wordnet` download holds
//! the same Princeton 3.0 files.

use crate::LoadError;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Where Debian's `wordnet-base` puts the database.
pub const DEBIAN_DIR: &str = "/usr/share/wordnet";

/// NLTK's `POS_LIST` order; only the file names depend on it.
const POS_FILES: [&str; 4] = ["noun", "verb", "adj", "adv"];
const POS_TAGS: [&str; 4] = ["n", "v", "a", "r"];

/// NLTK's `MORPHOLOGICAL_SUBSTITUTIONS` per part of speech (adverbs have none).
const SUBSTITUTIONS: [&[(&str, &str)]; 4] = [
    &[
        ("s", ""),
        ("ses", "s"),
        ("ves", "f"),
        ("xes", "x"),
        ("zes", "z"),
        ("ches", "ch"),
        ("shes", "sh"),
        ("men", "man"),
        ("ies", "y"),
    ],
    &[
        ("s", ""),
        ("ies", "y"),
        ("es", "e"),
        ("es", ""),
        ("ed", "e"),
        ("ed", ""),
        ("ing", "e"),
        ("ing", ""),
    ],
    &[("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
    &[],
];

/// The WordNet database, loaded: lemma index and exception lists parsed, data files kept as bytes and read at
/// the synset offsets the index gives.
pub struct WordNet {
    dir: PathBuf,
    /// lemma -> synset offsets, per part of speech.
    index: HashMap<String, [Vec<u64>; 4]>,
    exceptions: [HashMap<String, Vec<String>>; 4],
    data: [Vec<u8>; 4],
}

impl std::fmt::Debug for WordNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WordNet")
            .field("dir", &self.dir)
            .field("lemmas", &self.index.len())
            .finish()
    }
}

impl WordNet {
    /// Loads the database in `dir`, the folder that holds `index.noun`, `data.noun`, `noun.exc` and their
    /// verb, adjective and adverb counterparts.
    pub fn open(dir: impl AsRef<Path>) -> Result<WordNet, LoadError> {
        let dir = dir.as_ref().to_path_buf();
        let read = |name: String| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| LoadError::Io { path, source })
        };
        let mut index: HashMap<String, [Vec<u64>; 4]> = HashMap::new();
        let mut exceptions: [HashMap<String, Vec<String>>; 4] = Default::default();
        let mut data: [Vec<u8>; 4] = Default::default();
        for (pos, file) in POS_FILES.iter().enumerate() {
            let name = format!("index.{file}");
            let text = read(name.clone())?;
            parse_index(&text, &mut index, &dir.join(&name))?;
            let text = read(format!("{file}.exc"))?;
            // Later lines win, as NLTK fills a dict line by line.
            for line in String::from_utf8_lossy(&text).lines() {
                let mut terms = line.split_whitespace();
                if let Some(form) = terms.next() {
                    exceptions[pos].insert(form.to_owned(), terms.map(str::to_owned).collect());
                }
            }
            data[pos] = read(format!("data.{file}"))?;
        }
        Ok(WordNet {
            dir,
            index,
            exceptions,
            data,
        })
    }

    /// The folder the database was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// NLTK's `_morphy(form, pos)`: the base forms of `form` that the index lists for part of speech `pos`
    /// (0 noun, 1 verb, 2 adjective, 3 adverb), `form` itself first when listed.
    fn morphy(&self, form: &str, pos: usize) -> Vec<String> {
        let mut candidates = vec![form.to_owned()];
        if let Some(bases) = self.exceptions[pos].get(form) {
            candidates.extend(bases.iter().cloned());
        } else {
            for (old, new) in SUBSTITUTIONS[pos] {
                if let Some(stem) = form.strip_suffix(old) {
                    candidates.push(format!("{stem}{new}"));
                }
            }
        }
        let mut out: Vec<String> = Vec::new();
        for c in candidates {
            if self.index.get(&c).is_some_and(|p| !p[pos].is_empty()) && !out.contains(&c) {
                out.push(c);
            }
        }
        out
    }

    /// The names of the lemmas of every synset of `word` in every part of speech, as
    /// `{l.name() for s in wordnet.synsets(word) for l in s.lemmas()}`: case kept (`"Party"`), multi-word
    /// lemmas with `_`, adjective markers such as `(a)` removed.
    pub fn lemma_names(&self, word: &str) -> Result<BTreeSet<String>, LoadError> {
        let word = word.to_lowercase();
        let mut names = BTreeSet::new();
        for pos in 0..4 {
            for form in self.morphy(&word, pos) {
                let offsets = self
                    .index
                    .get(&form)
                    .map(|p| p[pos].as_slice())
                    .unwrap_or_default();
                for &offset in offsets {
                    self.synset_lemmas(pos, offset, &mut names)?;
                }
            }
        }
        Ok(names)
    }

    /// Adds the lemma names of the synset at `offset` in `data.<pos>`.
    fn synset_lemmas(
        &self,
        pos: usize,
        offset: u64,
        names: &mut BTreeSet<String>,
    ) -> Result<(), LoadError> {
        let bad = |what: &str| LoadError::Format {
            path: self.dir.join(format!("data.{}", POS_FILES[pos])),
            line: 0,
            message: format!("synset at offset {offset}: {what}"),
        };
        let data = &self.data[pos];
        let start = usize::try_from(offset)
            .ok()
            .filter(|&s| s < data.len())
            .ok_or_else(|| bad("past the end"))?;
        let end = data[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |n| start + n);
        let line = std::str::from_utf8(&data[start..end]).map_err(|_| bad("not UTF-8"))?;
        let columns = line.split('|').next().unwrap_or_default();
        let mut fields = columns.split_whitespace();
        // NLTK checks the line starts with the zero-padded offset; a mismatch means a corrupt index.
        if fields.next() != Some(format!("{offset:08}").as_str()) {
            return Err(bad("the line there does not start with that offset"));
        }
        let _lex_filenum = fields.next();
        let _ss_type = fields.next();
        let count = fields
            .next()
            .and_then(|c| usize::from_str_radix(c, 16).ok())
            .ok_or_else(|| bad("no word count"))?;
        for _ in 0..count {
            let name = fields
                .next()
                .ok_or_else(|| bad("fewer words than counted"))?;
            let _lex_id = fields.next();
            names.insert(strip_marker(name).to_owned());
        }
        Ok(())
    }
}

/// Removes a trailing syntactic marker such as `(a)`, `(p)` or `(ip)`, as NLTK's
/// `(.*?)(\([^()]*\))?$` does.
fn strip_marker(name: &str) -> &str {
    if let Some(body) = name.strip_suffix(')') {
        if let Some(open) = body.rfind('(') {
            if !body[open + 1..].contains(')') {
                return &name[..open];
            }
        }
    }
    name
}

/// Parses one `index.<pos>` file: `lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt
/// synset_offset...`; lines starting with a space are the licence header.
fn parse_index(
    text: &[u8],
    index: &mut HashMap<String, [Vec<u64>; 4]>,
    path: &Path,
) -> Result<(), LoadError> {
    let text = String::from_utf8_lossy(text);
    for (n, line) in text.lines().enumerate() {
        if line.starts_with(' ') || line.is_empty() {
            continue;
        }
        let bad = |message: &str| LoadError::Format {
            path: path.to_path_buf(),
            line: n + 1,
            message: message.to_owned(),
        };
        let mut f = line.split_whitespace();
        let (Some(lemma), Some(tag)) = (f.next(), f.next()) else {
            return Err(bad("missing lemma or part of speech"));
        };
        let mut number = || {
            f.next()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| bad("bad number"))
        };
        let synsets = number()?;
        let pointers = number()?;
        for _ in 0..pointers {
            f.next().ok_or_else(|| bad("fewer pointers than counted"))?;
        }
        let mut number = || {
            f.next()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| bad("bad number"))
        };
        let senses = number()?;
        if synsets == 0 || senses != synsets {
            return Err(bad("synset and sense counts disagree"));
        }
        let _tagged = number()?;
        let offsets = (0..synsets)
            .map(|_| number())
            .collect::<Result<Vec<u64>, _>>()?;
        let pos = POS_TAGS
            .iter()
            .position(|t| *t == tag)
            .ok_or_else(|| bad("unknown part of speech"))?;
        index.entry(lemma.to_owned()).or_default()[pos] = offsets;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::strip_marker;

    #[test]
    fn markers_are_stripped_like_nltk() {
        assert_eq!(strip_marker("galore(ip)"), "galore");
        assert_eq!(strip_marker("elect(p)"), "elect");
        assert_eq!(strip_marker("a(b)c"), "a(b)c");
        assert_eq!(strip_marker("x(a)(b)"), "x(a)");
        assert_eq!(strip_marker("plain"), "plain");
    }
}
