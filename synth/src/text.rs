//! Report text: the raw `text.txt` sections a Radiopaedia-style case carries, the reference rule that turns
//! them into the caption used for training, and the ASCII folding of series names. Reports only state what
//! the phantom holds, so captions, VQA answers and voxels agree.

use crate::anatomy::{Lesion, Organ, Phantom};
use crate::rng::SynthRng;
use rand::Rng;

/// Which branch of the reference text rule a report exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TextStyle {
    /// `study_findings:` is followed by the findings (the usual case).
    Findings,
    /// `study_findings:` ends the text with almost nothing after it, so the rule falls back to `discussion:`.
    Discussion,
    /// Neither marker occurs: the whole text is the caption.
    Plain,
}

const MARK_FINDINGS: &str = "study_findings:";
const MARK_DISCUSSION: &str = "discussion:";

/// The caption the reference derives from a raw report: what follows `study_findings:`; if that has fewer
/// than 5 characters other than spaces and newlines, what follows `discussion:`; if still too short, the
/// whole text. Newlines become spaces and the result is trimmed.
pub fn reference_text(raw: &str) -> String {
    fn flat(s: &str) -> String {
        s.replace('\n', " ").trim().to_string()
    }
    fn long_enough(s: &str) -> bool {
        s.chars().filter(|c| *c != ' ' && *c != '\n').count() >= 5
    }
    fn after(raw: &str, marker: &str) -> String {
        match raw.find(marker) {
            Some(i) => flat(&raw[i + marker.len()..]),
            None => flat(raw),
        }
    }
    let text = after(raw, MARK_FINDINGS);
    if long_enough(&text) {
        return text;
    }
    let text = after(raw, MARK_DISCUSSION);
    if long_enough(&text) {
        return text;
    }
    flat(raw)
}

/// Folds a series name to ASCII the way the reference does (Unicode NFD, then drop combining marks), for
/// the Latin-1 letters that decompose; other characters are kept, as the reference keeps them.
pub fn ascii_fold(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            'À'..='Å' => 'A',
            'Ç' => 'C',
            'È'..='Ë' => 'E',
            'Ì'..='Ï' => 'I',
            'Ñ' => 'N',
            'Ò'..='Ö' => 'O',
            'Ù'..='Ü' => 'U',
            'Ý' => 'Y',
            'à'..='å' => 'a',
            'ç' => 'c',
            'è'..='ë' => 'e',
            'ì'..='ï' => 'i',
            'ñ' => 'n',
            'ò'..='ö' => 'o',
            'ù'..='ü' => 'u',
            'ý' | 'ÿ' => 'y',
            other => other,
        })
        .collect()
}

/// Joins names as English prose: "a", "a and b", "a, b and c".
pub(crate) fn join_prose(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} and {}", init.join(", "), last),
    }
}

fn history(rng: &mut SynthRng, lesion: Option<&Lesion>) -> String {
    let age = rng.random_range(24..86);
    let sex = if rng.random_bool(0.5) { "man" } else { "woman" };
    let complaint = match lesion.map(|l| l.organ) {
        Some(Organ::Liver) => "right upper quadrant pain, nausea and mildly raised liver enzymes",
        Some(Organ::Spleen) => "left upper quadrant discomfort after a fall",
        Some(Organ::RightKidney) | Some(Organ::LeftKidney) => {
            "flank pain and microscopic haematuria"
        }
        _ => "weight loss; referred to \"rule out malignancy\"",
    };
    format!("{age}-year-old {sex} with {complaint}.")
}

/// The sentence describing one lesion, shared by Cap reports and RefSeg region texts.
pub fn lesion_sentence(lesion: &Lesion) -> String {
    format!(
        "a {:.1} cm {} in the {} of the {}",
        lesion.diameter_cm(),
        lesion.kind.phrase(),
        lesion.location.phrase(),
        lesion.organ.name()
    )
}

fn findings(phantom: &Phantom) -> String {
    let mut out = String::new();
    for lesion in &phantom.lesions {
        let s = lesion_sentence(lesion);
        out.push_str(&format!("There is {s}. "));
    }
    let normal: Vec<&str> = phantom
        .organs
        .iter()
        .map(|o| o.organ)
        .filter(|o| {
            matches!(
                o,
                Organ::Liver
                    | Organ::Spleen
                    | Organ::RightKidney
                    | Organ::LeftKidney
                    | Organ::Pancreas
            ) && !phantom.lesions.iter().any(|l| l.organ == *o)
        })
        .map(Organ::name)
        .collect();
    if !normal.is_empty() {
        out.push_str(&format!(
            "The {} {} unremarkable. ",
            join_prose(&normal),
            if normal.len() == 1 { "is" } else { "are" }
        ));
    }
    if phantom.organ(Organ::Gallbladder).is_some() {
        out.push_str("The gallbladder is normal. ");
    } else {
        out.push_str("The gallbladder is surgically absent (status post cholecystectomy). ");
    }
    out.push_str("No free fluid; the aorta is of normal calibre.");
    out
}

fn discussion(phantom: &Phantom) -> String {
    match phantom.lesions.first() {
        Some(l) => format!(
            "Appearances are typical of a {} of the {}, located in its {}.",
            l.kind.answer().to_lowercase(),
            l.organ.name(),
            l.location.phrase()
        ),
        None => "No focal abnormality.".to_string(),
    }
}

/// A raw `text.txt` for a Cap case in the given style.
pub fn cap_report(rng: &mut SynthRng, phantom: &Phantom, style: TextStyle) -> String {
    let h = history(rng, phantom.lesions.first());
    let f = findings(phantom);
    let d = discussion(phantom);
    match style {
        TextStyle::Findings => {
            format!("patient_history: {h}\n{MARK_FINDINGS} {f}\n{MARK_DISCUSSION} {d}\n")
        }
        // The findings section is left (nearly) empty and last, as in real cases whose description sits in
        // the discussion only.
        TextStyle::Discussion => {
            format!("patient_history: {h}\n{MARK_DISCUSSION} {f}\n{d}\n{MARK_FINDINGS} \n")
        }
        TextStyle::Plain => format!("CT abdomen and pelvis.\n{f}\nImpression: {d}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_takes_findings_then_discussion_then_all() {
        assert_eq!(
            reference_text("a: x\nstudy_findings: big\nliver\n"),
            "big liver"
        );
        assert_eq!(
            reference_text("discussion: cyst here\nstudy_findings: n/a\n"),
            "cyst here study_findings: n/a"
        );
        assert_eq!(reference_text("plain\ntext\n"), "plain text");
        // A short findings section with no discussion marker falls back to the whole text.
        assert_eq!(reference_text("study_findings: x\n"), "study_findings: x");
    }

    #[test]
    fn fold_drops_diacritics_only() {
        assert_eq!(
            ascii_fold("Axial_Pöschl_C__arterial_phase"),
            "Axial_Poschl_C__arterial_phase"
        );
        assert_eq!(ascii_fold("Straße_Ø"), "Straße_Ø");
    }

    #[test]
    fn prose_joins() {
        assert_eq!(join_prose(&["a", "b", "c"]), "a, b and c");
        assert_eq!(join_prose(&["a"]), "a");
    }
}
