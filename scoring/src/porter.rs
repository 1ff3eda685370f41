//! NLTK 3.10.4's `PorterStemmer` in its default mode, `NLTK_EXTENSIONS`: Porter (1980) with Martin Porter's
//! later changes and NLTK's own (a pool of irregular forms, `ies`/`ied` on four-letter words, `y -> i` only
//! after a consonant, `fulli`, `logi`, a two-letter `*o` condition). METEOR's second matching stage uses it.
//!
//! Words are handled as Python strings are: sequences of code points, lowercased with Python's (full
//! Unicode) `lower()`; any character other than `a e i o u` and `y` is a consonant, digits and letters of
//! other scripts included.

/// NLTK's `irregular_forms`, inverted: form -> stem.
const POOL: [(&str, &str); 16] = [
    ("sky", "sky"),
    ("skies", "sky"),
    ("dying", "die"),
    ("lying", "lie"),
    ("tying", "tie"),
    ("news", "news"),
    ("innings", "inning"),
    ("inning", "inning"),
    ("outings", "outing"),
    ("outing", "outing"),
    ("cannings", "canning"),
    ("canning", "canning"),
    ("howe", "howe"),
    ("proceed", "proceed"),
    ("exceed", "exceed"),
    ("succeed", "succeed"),
];

/// `PorterStemmer().stem(word)` (with `to_lowercase=True`).
pub fn stem(word: &str) -> String {
    let lowered = word.to_lowercase();
    if let Some((_, s)) = POOL.iter().find(|(form, _)| *form == lowered) {
        return (*s).to_owned();
    }
    // NLTK tests the length of the word as given, before lowercasing (which can lengthen it).
    if word.chars().count() <= 2 {
        return lowered;
    }
    let mut w: Vec<char> = lowered.chars().collect();
    w = step1a(w);
    w = step1b(w);
    w = step1c(w);
    w = step2(w);
    w = step3(w);
    w = step4(w);
    w = step5a(w);
    w = step5b(w);
    w.into_iter().collect()
}

fn is_vowel(c: char) -> bool {
    matches!(c, 'a' | 'e' | 'i' | 'o' | 'u')
}

/// Consonant flags of every position: a `y` is a consonant at the start or after a vowel.
fn consonant_flags(w: &[char]) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(w.len());
    for (i, &c) in w.iter().enumerate() {
        let f = if is_vowel(c) {
            false
        } else if c == 'y' {
            i == 0 || !flags[i - 1]
        } else {
            true
        };
        flags.push(f);
    }
    flags
}

fn is_consonant(w: &[char], i: usize) -> bool {
    consonant_flags(&w[..=i])[i]
}

/// The measure m of `[C](VC){m}[V]`: the number of vowel-to-consonant transitions.
fn measure(stem: &[char]) -> usize {
    consonant_flags(stem)
        .windows(2)
        .filter(|p| !p[0] && p[1])
        .count()
}

fn contains_vowel(stem: &[char]) -> bool {
    consonant_flags(stem).iter().any(|c| !c)
}

fn ends_double_consonant(w: &[char]) -> bool {
    w.len() >= 2 && w[w.len() - 1] == w[w.len() - 2] && is_consonant(w, w.len() - 1)
}

/// Condition `*o`: consonant-vowel-consonant at the end, the last not `w`, `x` or `y`; or (NLTK) a two-letter
/// vowel-consonant word.
fn ends_cvc(w: &[char]) -> bool {
    let n = w.len();
    (n >= 3
        && is_consonant(w, n - 3)
        && !is_consonant(w, n - 2)
        && is_consonant(w, n - 1)
        && !matches!(w[n - 1], 'w' | 'x' | 'y'))
        || (n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
}

fn ends_with(w: &[char], suffix: &str) -> bool {
    let n = suffix.chars().count();
    w.len() >= n && w[w.len() - n..].iter().copied().eq(suffix.chars())
}

/// `w` without its last `n` characters.
fn cut(w: &[char], n: usize) -> Vec<char> {
    w[..w.len() - n].to_vec()
}

fn join(stem: Vec<char>, replacement: &str) -> Vec<char> {
    let mut out = stem;
    out.extend(replacement.chars());
    out
}

type Condition<'a> = &'a dyn Fn(&[char]) -> bool;

/// One suffix rule: suffix, replacement, and a condition on the stem (`None`: always).
struct Rule<'a>(&'a str, &'a str, Option<Condition<'a>>);

/// NLTK's `_apply_rule_list`: the first rule whose suffix the word ends with decides (its condition failing
/// leaves the word unchanged). The suffix `"*d"` stands for a double consonant, replaced as a whole.
fn apply_rules(w: Vec<char>, rules: &[Rule]) -> Vec<char> {
    for Rule(suffix, replacement, condition) in rules {
        if *suffix == "*d" && ends_double_consonant(&w) {
            let stem = cut(&w, 2);
            return if condition.is_none_or(|c| c(&stem)) {
                join(stem, replacement)
            } else {
                w
            };
        }
        if ends_with(&w, suffix) {
            let stem = cut(&w, suffix.chars().count());
            return if condition.is_none_or(|c| c(&stem)) {
                join(stem, replacement)
            } else {
                w
            };
        }
    }
    w
}

fn positive_measure(stem: &[char]) -> bool {
    measure(stem) > 0
}

fn step1a(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "ies") && w.len() == 4 {
        return join(cut(&w, 3), "ie");
    }
    apply_rules(
        w,
        &[
            Rule("sses", "ss", None),
            Rule("ies", "i", None),
            Rule("ss", "ss", None),
            Rule("s", "", None),
        ],
    )
}

fn step1b(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "ied") {
        return join(cut(&w, 3), if w.len() == 4 { "ie" } else { "i" });
    }
    if ends_with(&w, "eed") {
        let stem = cut(&w, 3);
        return if measure(&stem) > 0 {
            join(stem, "ee")
        } else {
            w
        };
    }
    let mut intermediate = None;
    for suffix in ["ed", "ing"] {
        if ends_with(&w, suffix) {
            let stem = cut(&w, suffix.len());
            if contains_vowel(&stem) {
                intermediate = Some(stem);
                break;
            }
        }
    }
    let Some(stem) = intermediate else { return w };
    let last = stem[stem.len() - 1];
    let last_str = last.to_string();
    let not_lsz = move |_: &[char]| !matches!(last, 'l' | 's' | 'z');
    let short = |s: &[char]| measure(s) == 1 && ends_cvc(s);
    apply_rules(
        stem,
        &[
            Rule("at", "ate", None),
            Rule("bl", "ble", None),
            Rule("iz", "ize", None),
            Rule("*d", &last_str, Some(&not_lsz)),
            Rule("", "e", Some(&short)),
        ],
    )
}

fn step1c(w: Vec<char>) -> Vec<char> {
    let cond = |s: &[char]| s.len() > 1 && is_consonant(s, s.len() - 1);
    apply_rules(w, &[Rule("y", "i", Some(&cond))])
}

fn step2(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "alli") && positive_measure(&cut(&w, 4)) {
        return step2(join(cut(&w, 4), "al"));
    }
    let pm: Condition = &positive_measure;
    let word = w.clone();
    let logi = move |_: &[char]| positive_measure(&word[..word.len().saturating_sub(3)]);
    apply_rules(
        w,
        &[
            Rule("ational", "ate", Some(pm)),
            Rule("tional", "tion", Some(pm)),
            Rule("enci", "ence", Some(pm)),
            Rule("anci", "ance", Some(pm)),
            Rule("izer", "ize", Some(pm)),
            Rule("bli", "ble", Some(pm)),
            Rule("alli", "al", Some(pm)),
            Rule("entli", "ent", Some(pm)),
            Rule("eli", "e", Some(pm)),
            Rule("ousli", "ous", Some(pm)),
            Rule("ization", "ize", Some(pm)),
            Rule("ation", "ate", Some(pm)),
            Rule("ator", "ate", Some(pm)),
            Rule("alism", "al", Some(pm)),
            Rule("iveness", "ive", Some(pm)),
            Rule("fulness", "ful", Some(pm)),
            Rule("ousness", "ous", Some(pm)),
            Rule("aliti", "al", Some(pm)),
            Rule("iviti", "ive", Some(pm)),
            Rule("biliti", "ble", Some(pm)),
            Rule("fulli", "ful", Some(pm)),
            // NLTK tests the measure of the word without its last three letters, not of the stem.
            Rule("logi", "log", Some(&logi)),
        ],
    )
}

fn step3(w: Vec<char>) -> Vec<char> {
    let pm: Condition = &positive_measure;
    apply_rules(
        w,
        &[
            Rule("icate", "ic", Some(pm)),
            Rule("ative", "", Some(pm)),
            Rule("alize", "al", Some(pm)),
            Rule("iciti", "ic", Some(pm)),
            Rule("ical", "ic", Some(pm)),
            Rule("ful", "", Some(pm)),
            Rule("ness", "", Some(pm)),
        ],
    )
}

fn step4(w: Vec<char>) -> Vec<char> {
    let gt1 = |s: &[char]| measure(s) > 1;
    let m: Condition = &gt1;
    let ion = |s: &[char]| measure(s) > 1 && matches!(s.last(), Some('s' | 't'));
    apply_rules(
        w,
        &[
            Rule("al", "", Some(m)),
            Rule("ance", "", Some(m)),
            Rule("ence", "", Some(m)),
            Rule("er", "", Some(m)),
            Rule("ic", "", Some(m)),
            Rule("able", "", Some(m)),
            Rule("ible", "", Some(m)),
            Rule("ant", "", Some(m)),
            Rule("ement", "", Some(m)),
            Rule("ment", "", Some(m)),
            Rule("ent", "", Some(m)),
            Rule("ion", "", Some(&ion)),
            Rule("ou", "", Some(m)),
            Rule("ism", "", Some(m)),
            Rule("ate", "", Some(m)),
            Rule("iti", "", Some(m)),
            Rule("ous", "", Some(m)),
            Rule("ive", "", Some(m)),
            Rule("ize", "", Some(m)),
        ],
    )
}

fn step5a(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "e") {
        let stem = cut(&w, 1);
        let m = measure(&stem);
        if m > 1 || (m == 1 && !ends_cvc(&stem)) {
            return stem;
        }
    }
    w
}

fn step5b(w: Vec<char>) -> Vec<char> {
    let word = w.clone();
    let cond = move |_: &[char]| measure(&word[..word.len() - 1]) > 1;
    apply_rules(w, &[Rule("ll", "l", Some(&cond))])
}

#[cfg(test)]
mod tests {
    use super::stem;

    #[test]
    fn classic_examples_and_nltk_extensions() {
        let cases = [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("ties", "tie"),
            ("cats", "cat"),
            ("agreed", "agre"),
            ("plastered", "plaster"),
            ("motoring", "motor"),
            ("hopping", "hop"),
            ("falling", "fall"),
            ("filing", "file"),
            ("happy", "happi"),
            ("relational", "relat"),
            ("generalization", "gener"),
            ("electrical", "electr"),
            ("adjustment", "adjust"),
            ("controlling", "control"),
            ("dying", "die"),
            ("skies", "sky"),
            ("died", "die"),
            ("cried", "cri"),
            ("enlarged", "enlarg"),
            ("lesions", "lesion"),
            ("hepatic", "hepat"),
            ("radiology", "radiolog"),
            ("Abnormalities", "abnorm"),
            ("is", "is"),
            ("CT", "ct"),
            ("3.5cm", "3.5cm"),
            ("fully", "fulli"),
            ("yyy", "yyy"),
        ];
        for (word, want) in cases {
            assert_eq!(stem(word), want, "{word}");
        }
    }
}
