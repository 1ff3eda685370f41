//! Text rules of the reference M3D-Cap preparation: which part of a raw report becomes the caption, and how a
//! series folder name becomes an ASCII file name.

use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Non-space characters the reference requires before it accepts a report section.
const MIN_CHARS: usize = 5;

/// The reference rule: what follows `study_findings:`; if that has fewer than 5 characters other than spaces and
/// newlines, what follows `discussion:`; if still too short, the whole text. Newlines become spaces, then strip.
/// A missing marker yields the whole text at that step, exactly as the reference does.
pub fn extract_report(raw: &str) -> String {
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

/// The reference's `remove_diacritics`: NFD, then drop every non-spacing mark ("Pöschl" -> "Poschl").
pub fn fold_diacritics(name: &str) -> String {
    name.nfd()
        .filter(|c| c.general_category() != GeneralCategory::NonspacingMark)
        .collect()
}

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
    fn folds_diacritics() {
        assert_eq!(fold_diacritics("Axial_Pöschl_é"), "Axial_Poschl_e");
        assert_eq!(fold_diacritics("Coronal_C__portal"), "Coronal_C__portal");
    }
}
