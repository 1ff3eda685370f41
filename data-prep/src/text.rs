//! Text rules of the reference M3D-Cap preparation: which part of a raw report becomes the caption, and how a
//! series folder name becomes an ASCII file name.

use std::borrow::Cow;
use std::path::Path;

use crate::error::{PrepError, Result};

/// Non-space characters the reference requires before it accepts a report section.
const MIN_CHARS: usize = 5;

/// The reference rule: what follows `study_findings:`; if that has fewer than 5 characters other than spaces and
/// newlines, what follows `discussion:`; if still too short, the whole text. Newlines become spaces, then strip.
/// A missing marker yields the whole text at that step, exactly as the reference does. Line endings are first
/// normalised as the reference's text-mode read does ([`universal_newlines`]).
pub fn extract_report(raw: &str) -> String {
    let raw = universal_newlines(raw);
    let raw = raw.as_ref();
    let section = |marker: &str| match raw.find(marker) {
        Some(i) => clean(&raw[i + marker.len()..]),
        None => clean(raw),
    };
    let long_enough = |s: &str| s.chars().filter(|c| *c != ' ' && *c != '\n').count() >= MIN_CHARS;
    let findings = section("study_findings:");
    if long_enough(&findings) {
        return findings;
    }
    let discussion = section("discussion:");
    if long_enough(&discussion) {
        return discussion;
    }
    clean(raw)
}

/// Newlines to spaces, then Python's `str.strip()` (Unicode whitespace on both ends).
fn clean(s: &str) -> String {
    s.replace('\n', " ").trim().to_string()
}

/// Python's text-mode read (`open(path, 'r')`, universal newlines): `\r\n` and a lone `\r` become `\n`.
pub fn universal_newlines(s: &str) -> Cow<'_, str> {
    if !s.contains('\r') {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.replace("\r\n", "\n").replace('\r', "\n"))
}

/// Reads a text file as the reference scripts do (`open(path, 'r').read()`): UTF-8, universal newlines.
pub fn read_text(path: &Path) -> Result<String> {
    let raw = std::fs::read_to_string(path).map_err(|e| PrepError::io(path, e))?;
    Ok(universal_newlines(&raw).into_owned())
}

/// Version of Python's `Unidecode` whose output [`unidecode`] reproduces (pinned in scripts/requirements.txt).
pub const UNIDECODE_VERSION: &str = "1.4.0";

/// Code points where [`unidecode`] is verified to equal Python's `unidecode` [`UNIDECODE_VERSION`] character
/// by character (data-prep/tests/unidecode_oracle.rs): ASCII, Latin-1, Latin Extended-A and -B, IPA, spacing
/// modifiers, combining marks, Greek, Cyrillic, Latin Extended Additional, and U+2000-U+22FF (punctuation,
/// super/subscripts, currency, letterlike symbols, number forms, arrows, mathematical operators).
pub const UNIDECODE_VERIFIED: [(u32, u32); 3] =
    [(0x0000, 0x052F), (0x1E00, 0x1EFF), (0x2000, 0x22FF)];

/// The series file name of HEAD's `m3d_cap_data_prepare.py`: `unidecode(subsubfolder)` (Python package
/// `Unidecode`), e.g. "Pöschl" -> "Poschl", "Straße" -> "Strasse", "Ø" -> "O", "Æ" -> "AE", "Ł" -> "L".
///
/// The tables are those of the `unidecode` crate (a port of Perl's Text::Unidecode, from which Python's package
/// also descends), with unknown characters ("[?]") mapped to "" as Python's package does, and [`UNIDECODE_FIXES`]
/// where Python's `Unidecode` [`UNIDECODE_VERSION`] has since changed an entry. Exact within
/// [`UNIDECODE_VERIFIED`]; elsewhere (other scripts, CJK, symbols, emoji) the output may differ from Python's,
/// in which case a split entry is not found and the converter says so, listing the folders it saw.
pub fn unidecode(name: &str) -> String {
    name.chars().map(unidecode_char).collect()
}

fn unidecode_char(c: char) -> &'static str {
    if let Ok(i) = UNIDECODE_FIXES.binary_search_by_key(&c, |(k, _)| *k) {
        return UNIDECODE_FIXES[i].1;
    }
    match ::unidecode::unidecode_char(c) {
        "[?]" | "[?] " => "",
        s => s,
    }
}

/// Entries where Python's `Unidecode` [`UNIDECODE_VERSION`] differs from the `unidecode` crate inside
/// [`UNIDECODE_VERIFIED`] (sorted by code point; regenerate with the oracle test, which prints them on failure).
#[rustfmt::skip]
pub const UNIDECODE_FIXES: &[(char, &str)] = &[
    ('\u{0080}', ""), ('\u{0082}', ""), ('\u{0083}', ""), ('\u{0084}', ""), ('\u{0085}', ""), ('\u{0086}', ""),
    ('\u{0087}', ""), ('\u{0088}', ""), ('\u{0089}', ""), ('\u{008a}', ""), ('\u{008b}', ""), ('\u{008c}', ""),
    ('\u{008e}', ""), ('\u{0091}', ""), ('\u{0092}', ""), ('\u{0093}', ""), ('\u{0094}', ""), ('\u{0095}', ""),
    ('\u{0096}', ""), ('\u{0097}', ""), ('\u{0098}', ""), ('\u{0099}', ""), ('\u{009a}', ""), ('\u{009b}', ""),
    ('\u{009c}', ""), ('\u{009e}', ""), ('\u{009f}', ""), ('\u{00bc}', " 1/4"), ('\u{00bd}', " 1/2"),
    ('\u{00be}', " 3/4"), ('\u{014a}', "NG"), ('\u{014b}', "ng"), ('\u{02e5}', ""), ('\u{02e6}', ""),
    ('\u{02e7}', ""), ('\u{02e8}', ""), ('\u{02e9}', ""), ('\u{02ea}', ""), ('\u{02eb}', ""), ('\u{02ef}', ""),
    ('\u{02f0}', ""), ('\u{02f1}', ""), ('\u{02f2}', ""), ('\u{02f3}', ""), ('\u{02f4}', ""), ('\u{02f5}', ""),
    ('\u{02f6}', ""), ('\u{02f7}', ""), ('\u{02f8}', ""), ('\u{02f9}', ""), ('\u{02fa}', ""), ('\u{02fb}', ""),
    ('\u{02fc}', ""), ('\u{02fd}', ""), ('\u{02fe}', ""), ('\u{02ff}', ""), ('\u{03f4}', ""), ('\u{03f5}', ""),
    ('\u{03f6}', ""), ('\u{03f7}', ""), ('\u{03f8}', ""), ('\u{03f9}', ""), ('\u{03fc}', ""), ('\u{03fd}', ""),
    ('\u{03fe}', ""), ('\u{03ff}', ""), ('\u{0404}', "Ie"), ('\u{042a}', "'"), ('\u{044a}', "'"), ('\u{1e9b}', "S"),
    ('\u{1e9c}', ""), ('\u{1e9d}', ""), ('\u{1e9e}', "SS"), ('\u{1e9f}', ""), ('\u{1efa}', ""), ('\u{1efb}', ""),
    ('\u{1efc}', ""), ('\u{1efd}', ""), ('\u{1efe}', ""), ('\u{1eff}', ""), ('\u{2047}', "??"), ('\u{204a}', "&"),
    ('\u{204e}', "*"), ('\u{2052}', "%"), ('\u{2053}', "~"), ('\u{2057}', "''''"), ('\u{205f}', " "),
    ('\u{2071}', "i"), ('\u{2090}', "a"), ('\u{2091}', "e"), ('\u{2092}', "o"), ('\u{2093}', "x"), ('\u{2095}', "h"),
    ('\u{2096}', "k"), ('\u{2097}', "l"), ('\u{2098}', "m"), ('\u{2099}', "n"), ('\u{209a}', "p"), ('\u{209b}', "s"),
    ('\u{209c}', "t"), ('\u{20b0}', "Pf"), ('\u{20b1}', "P"), ('\u{20b2}', "G"), ('\u{20b3}', "A"),
    ('\u{20b4}', "UAH"), ('\u{20b5}', "C|"), ('\u{20b6}', "L"), ('\u{20b7}', "Sm"), ('\u{20b8}', "T"),
    ('\u{20b9}', "Rs"), ('\u{20ba}', "L"), ('\u{20bb}', "M"), ('\u{20bc}', "m"), ('\u{20bd}', "R"),
    ('\u{20be}', "l"), ('\u{20bf}', "BTC"), ('\u{2100}', " a/c "), ('\u{2101}', " a/s "), ('\u{2102}', "C"),
    ('\u{2103}', "degC"), ('\u{2105}', " c/o "), ('\u{2106}', " c/u "), ('\u{2109}', "degF"), ('\u{210a}', "g"),
    ('\u{210b}', "H"), ('\u{210c}', "H"), ('\u{210d}', "H"), ('\u{210e}', "h"), ('\u{2110}', "I"), ('\u{2111}', "I"),
    ('\u{2112}', "L"), ('\u{2113}', "l"), ('\u{2115}', "N"), ('\u{2116}', "No. "), ('\u{2117}', "(p)"),
    ('\u{2119}', "P"), ('\u{211a}', "Q"), ('\u{211b}', "R"), ('\u{211c}', "R"), ('\u{211d}', "R"),
    ('\u{211f}', "R/"), ('\u{2120}', "(sm)"), ('\u{2121}', "TEL"), ('\u{2122}', "(tm)"), ('\u{2123}', "V/"),
    ('\u{2124}', "Z"), ('\u{2126}', "ohm"), ('\u{2128}', "Z"), ('\u{212a}', "K"), ('\u{212b}', "A"),
    ('\u{212c}', "B"), ('\u{212d}', "C"), ('\u{212e}', "e"), ('\u{212f}', "e"), ('\u{2130}', "E"), ('\u{2131}', "F"),
    ('\u{2132}', "F"), ('\u{2133}', "M"), ('\u{2134}', "o"), ('\u{2139}', "i"), ('\u{213b}', "FAX"),
    ('\u{2145}', "D"), ('\u{2146}', "d"), ('\u{2147}', "e"), ('\u{2148}', "i"), ('\u{2149}', "j"),
    ('\u{214d}', "A/S"), ('\u{214e}', "F"), ('\u{2150}', " 1/7 "), ('\u{2151}', " 1/9 "), ('\u{2152}', " 1/10 "),
    ('\u{2189}', " 0/3 "), ('\u{2212}', "-"), ('\u{2215}', "/"), ('\u{2216}', "\\"), ('\u{2217}', "*"),
    ('\u{2223}', "|"), ('\u{2236}', ":"), ('\u{223c}', "~"), ('\u{2264}', "<="), ('\u{2265}', ">="),
    ('\u{2266}', "<="), ('\u{2267}', ">="),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_preferred() {
        let raw = "history: x\nstudy_findings: Liver is\nenlarged.\ndiscussion: none";
        assert_eq!(extract_report(raw), "Liver is enlarged. discussion: none");
    }

    #[test]
    fn short_findings_fall_back_to_discussion_then_whole() {
        // Findings too short: everything after "discussion:" (the reference takes the rest of the text).
        assert_eq!(
            extract_report("discussion: Cyst seen.\nstudy_findings: ab"),
            "Cyst seen. study_findings: ab"
        );
        // Findings too short and no discussion: the whole text.
        assert_eq!(extract_report("study_findings: a\n"), "study_findings: a");
        assert_eq!(extract_report("  plain report\n"), "plain report");
    }

    #[test]
    fn crlf_and_cr_reports_give_the_lf_caption() {
        let lf = "history: x\nstudy_findings: Liver is\nenlarged.\n\ndiscussion: none\n";
        let want = extract_report(lf);
        assert_eq!(want, "Liver is enlarged.  discussion: none");
        assert_eq!(extract_report(&lf.replace('\n', "\r\n")), want);
        assert_eq!(extract_report(&lf.replace('\n', "\r")), want);
        // Short findings: the length rule counts characters after the same normalisation (a `\r` would count).
        let short = "discussion: Cyst seen.\nstudy_findings: ab\n\nc\n";
        let want = "Cyst seen. study_findings: ab  c";
        assert_eq!(extract_report(short), want);
        assert_eq!(extract_report(&short.replace('\n', "\r\n")), want);
        assert_eq!(extract_report(&short.replace('\n', "\r")), want);
        assert_eq!(universal_newlines("a\r\r\nb\n\rc"), "a\n\nb\n\nc");
        assert!(matches!(universal_newlines("a\nb"), Cow::Borrowed(_)));
    }

    #[test]
    fn read_text_normalises_line_endings() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("text.txt");
        std::fs::write(&p, "study_findings: Liver\r\nis enlarged.\rEnd").unwrap();
        assert_eq!(
            read_text(&p).unwrap(),
            "study_findings: Liver\nis enlarged.\nEnd"
        );
        let err = read_text(&dir.path().join("missing.txt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.txt"), "{err}");
    }

    #[test]
    fn unidecode_transliterates_as_python() {
        // Values of Python's `unidecode` 1.4.0 (the oracle test checks every verified code point).
        assert_eq!(unidecode("Axial_Pöschl_é"), "Axial_Poschl_e");
        assert_eq!(unidecode("Coronal_C__portal"), "Coronal_C__portal");
        // NFD keeps these (the first release's fold left them in the name); unidecode transliterates them.
        assert_eq!(
            unidecode("Straße_Øre_æ_Łódź_Đ_þ"),
            "Strasse_Ore_ae_Lodz_D_th"
        );
        assert_eq!(unidecode("Ŋ_ŋ_¼_ẞ_≤_℃_\u{0080}"), "NG_ng_ 1/4_SS_<=_degC_");
        // Unknown characters vanish, as in Python.
        assert_eq!(unidecode("a\u{0800}b\u{e000}c"), "abc");
        // Decomposed input (a macOS file name) gives the same name as composed input.
        assert_eq!(unidecode("Po\u{0308}schl"), "Poschl");
    }

    #[test]
    fn unidecode_fixes_are_sorted_and_inside_the_verified_ranges() {
        for w in UNIDECODE_FIXES.windows(2) {
            assert!(w[0].0 < w[1].0, "{:?} before {:?}", w[0], w[1]);
        }
        for &(c, s) in UNIDECODE_FIXES {
            let cp = u32::from(c);
            assert!(
                UNIDECODE_VERIFIED
                    .iter()
                    .any(|(lo, hi)| (*lo..=*hi).contains(&cp)),
                "U+{cp:04X}"
            );
            assert!(
                s.bytes().all(|b| (0x20..0x7f).contains(&b)),
                "U+{cp:04X} -> {s:?}"
            );
        }
    }
}
