//! Instruction-response pairs derived at load time from shard samples.
//!
//! Shards store what a sample *is* (a report, a class and its box, a stored VQA question); the wording is chosen
//! here, per draw, from prompt templates — so templates can change without re-converting data, and each epoch can
//! phrase a sample differently, as the reference datasets do with `random.choice`. The default templates are our
//! own; `Templates::from_json` loads a replacement set.
//!
//! Placeholders: `{class}` (class name), `{description}` (a phrase from the term dictionary for that class),
//! `{box}` (the box text `<bx_start>[d1, h1, w1, d2, h2, w2]<bx_end>`). Segmentation answers contain `[SEG]`.

use std::collections::BTreeMap;
use std::path::Path;

use m3d_shards::schema::{SampleRecord, Task};
use rand::seq::IndexedRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

pub mod bench;

/// Errors deriving an instruction.
#[derive(Debug, thiserror::Error)]
pub enum InstructError {
    #[error("sample {sample}: {reason}")]
    Sample { sample: String, reason: String },
    #[error("{path}: {reason}")]
    Templates { path: String, reason: String },
}

/// One question/answer family (class-name or description prompts).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QaTemplates {
    pub questions: Vec<String>,
    pub answers: Vec<String>,
}

/// Which wording family positioning and segmentation prompts use (the reference's `description` flag).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// The class is named: "Where is the liver?"
    Cls,
    /// The class is described: "Where is the organ that filters blood?"
    Des,
}

/// Every template set, plus the term dictionary used by `Des` prompts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Templates {
    pub caption: Vec<String>,
    pub rec_cls: QaTemplates,
    pub rec_des: QaTemplates,
    pub reg_cls: QaTemplates,
    pub reg_des: QaTemplates,
    pub seg_cls: QaTemplates,
    pub seg_des: QaTemplates,
    /// Class name -> descriptive phrases. A class without an entry falls back to its name.
    pub terms: BTreeMap<String, Vec<String>>,
}

/// A derived instruction-response pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instruction {
    pub question: String,
    pub answer: String,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl Default for Templates {
    fn default() -> Self {
        let qa = |q: &[&str], a: &[&str]| QaTemplates {
            questions: strings(q),
            answers: strings(a),
        };
        let mut terms = BTreeMap::new();
        for (class, phrases) in [
            (
                "liver",
                &[
                    "the largest solid organ of the upper abdomen",
                    "the organ that produces bile",
                ][..],
            ),
            (
                "spleen",
                &[
                    "the lymphoid organ in the left upper abdomen",
                    "the organ that filters old red blood cells",
                ][..],
            ),
            (
                "kidney",
                &[
                    "the bean-shaped organ that filters blood",
                    "the organ that produces urine",
                ][..],
            ),
            (
                "left kidney",
                &["the bean-shaped organ on the left that filters blood"][..],
            ),
            (
                "right kidney",
                &["the bean-shaped organ on the right that filters blood"][..],
            ),
            (
                "pancreas",
                &["the gland behind the stomach that makes insulin"][..],
            ),
            (
                "bladder",
                &["the hollow organ in the pelvis that stores urine"][..],
            ),
            ("stomach", &["the muscular organ that begins digestion"][..]),
            (
                "gallbladder",
                &["the small sac under the liver that stores bile"][..],
            ),
            ("lung", &["the organ of gas exchange in the chest"][..]),
            ("heart", &["the muscular organ that pumps blood"][..]),
            ("aorta", &["the largest artery of the body"][..]),
        ] {
            terms.insert(class.to_string(), strings(phrases));
        }
        Templates {
            caption: strings(&[
                "Describe the findings of this medical scan.",
                "Write a radiology report for this image.",
                "What does this CT scan show?",
                "Summarise the key findings in this volume.",
                "Please provide a report of this scan.",
                "Give a detailed description of this image.",
                "Report the observations in this 3D image.",
                "What are the findings in this study?",
                "Generate a caption for this medical image.",
                "Interpret this scan for a clinician.",
                "Describe what you see in this CT volume.",
                "Provide a findings section for this examination.",
            ]),
            rec_cls: qa(
                &[
                    "Where is the {class} in this image? Answer with a bounding box.",
                    "Locate the {class} and give its box.",
                    "Find the {class}; output its coordinates.",
                ],
                &[
                    "The {class} is at {box}.",
                    "Box: {box}.",
                    "It is located at {box}.",
                ],
            ),
            rec_des: qa(
                &[
                    "Where is {description}? Answer with a bounding box.",
                    "Locate {description} and give its box.",
                ],
                &["It is at {box}.", "Box: {box}."],
            ),
            reg_cls: qa(
                &[
                    "What is the structure inside {box}?",
                    "Name the organ in the region {box}.",
                ],
                &["It is the {class}.", "The {class}."],
            ),
            reg_des: qa(
                &[
                    "What is the structure inside {box}? Describe it.",
                    "Identify and describe the region {box}.",
                ],
                &[
                    "It is the {class}, {description}.",
                    "The {class}: {description}.",
                ],
            ),
            seg_cls: qa(
                &[
                    "Segment the {class}.",
                    "Can you segment the {class} in this image?",
                    "Please output a mask of the {class}.",
                ],
                &["It is [SEG].", "Sure, [SEG].", "Here is the mask: [SEG]."],
            ),
            seg_des: qa(
                &["Segment {description}.", "Can you segment {description}?"],
                &["It is the {class}, [SEG].", "That is the {class}: [SEG]."],
            ),
            terms,
        }
    }
}

impl Templates {
    /// Loads a complete template set from JSON (same shape as `Templates`; unknown keys are errors).
    pub fn from_json(path: &Path) -> Result<Self, InstructError> {
        let err = |reason: String| InstructError::Templates {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let t: Templates = serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?;
        t.validate().map_err(err)?;
        Ok(t)
    }

    /// Every text the templates can produce words from (templates with their placeholders, and the term
    /// phrases), e.g. for building a vocabulary that covers every prompt.
    pub fn all_texts(&self) -> Vec<String> {
        let mut out = self.caption.clone();
        for qa in [
            &self.rec_cls,
            &self.rec_des,
            &self.reg_cls,
            &self.reg_des,
            &self.seg_cls,
            &self.seg_des,
        ] {
            out.extend(qa.questions.iter().cloned());
            out.extend(qa.answers.iter().cloned());
        }
        for (class, phrases) in &self.terms {
            out.push(class.clone());
            out.extend(phrases.iter().cloned());
        }
        out
    }

    /// Every family must have at least one question and one answer, and use only known placeholders.
    pub fn validate(&self) -> Result<(), String> {
        if self.caption.is_empty() {
            return Err("caption: no templates".to_string());
        }
        for (name, qa) in [
            ("rec_cls", &self.rec_cls),
            ("rec_des", &self.rec_des),
            ("reg_cls", &self.reg_cls),
            ("reg_des", &self.reg_des),
            ("seg_cls", &self.seg_cls),
            ("seg_des", &self.seg_des),
        ] {
            if qa.questions.is_empty() || qa.answers.is_empty() {
                return Err(format!(
                    "{name}: needs at least one question and one answer"
                ));
            }
            for t in qa.questions.iter().chain(&qa.answers) {
                let stripped = t
                    .replace("{class}", "")
                    .replace("{description}", "")
                    .replace("{box}", "");
                if stripped.contains('{') || stripped.contains('}') {
                    return Err(format!("{name}: unknown placeholder in {t:?}"));
                }
            }
        }
        for t in &self.seg_cls.answers {
            if !t.contains("[SEG]") {
                return Err(format!("seg_cls: answer {t:?} lacks [SEG]"));
            }
        }
        Ok(())
    }
}

/// The reference text of a box: `<bx_start>[0.156, 0.2, 0.0, 0.5, 0.9, 1.0]<bx_end>` (Python's str of a list).
pub fn box_text(b: &[f32; 6]) -> String {
    let parts: Vec<String> = b
        .iter()
        .map(|v| {
            let s = format!("{v}");
            if s.contains('.') || s.contains('e') || !v.is_finite() {
                s
            } else {
                format!("{s}.0")
            }
        })
        .collect();
    format!("<bx_start>[{}]<bx_end>", parts.join(", "))
}

fn pick<'a, R: Rng + ?Sized>(v: &'a [String], rng: &mut R) -> &'a str {
    v.choose(rng).map(String::as_str).unwrap_or("")
}

/// Derives the question and answer of `sample`. VQA and RefSeg samples carry their text; the others are worded
/// from `templates` with `rng` (one draw per call).
pub fn instruction<R: Rng + ?Sized>(
    sample: &SampleRecord,
    templates: &Templates,
    family: Family,
    rng: &mut R,
) -> Result<Instruction, InstructError> {
    let missing = |what: &str| InstructError::Sample {
        sample: sample.sample_id.clone(),
        reason: format!("{} sample without {what}", sample.task),
    };
    match sample.task {
        Task::VqaClosed | Task::VqaOpen | Task::VqaYesNo | Task::RefSeg => Ok(Instruction {
            question: sample
                .question
                .clone()
                .ok_or_else(|| missing("a question"))?,
            answer: sample.answer.clone().ok_or_else(|| missing("an answer"))?,
        }),
        Task::Caption => Ok(Instruction {
            question: pick(&templates.caption, rng).to_string(),
            answer: sample.report.clone().ok_or_else(|| missing("a report"))?,
        }),
        Task::Rec | Task::Reg | Task::Seg => {
            let class = sample
                .class_name
                .as_deref()
                .ok_or_else(|| missing("a class"))?;
            let qa = match (sample.task, family) {
                (Task::Rec, Family::Cls) => &templates.rec_cls,
                (Task::Rec, Family::Des) => &templates.rec_des,
                (Task::Reg, Family::Cls) => &templates.reg_cls,
                (Task::Reg, Family::Des) => &templates.reg_des,
                (_, Family::Cls) => &templates.seg_cls,
                (_, Family::Des) => &templates.seg_des,
            };
            let boxed = match sample.task {
                Task::Seg => String::new(),
                _ => box_text(sample.bbox.as_ref().ok_or_else(|| missing("a box"))?),
            };
            let description = templates
                .terms
                .get(class)
                .map(|v| pick(v, rng).to_string())
                .unwrap_or_else(|| format!("the {class}"));
            let fill = |t: &str| {
                t.replace("{class}", class)
                    .replace("{description}", &description)
                    .replace("{box}", &boxed)
            };
            let question = fill(pick(&qa.questions, rng));
            let answer = fill(pick(&qa.answers, rng));
            Ok(Instruction { question, answer })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn sample(task: Task) -> SampleRecord {
        SampleRecord {
            sample_id: "s".into(),
            dataset: "seg".into(),
            task,
            split: "train".into(),
            volume_id: "0000/case".into(),
            mask_index: Some(0),
            question: None,
            answer: None,
            answer_choice: None,
            question_type: None,
            class_name: Some("liver".into()),
            bbox: Some([0.062, 0.2, 0.0, 0.5, 0.9, 1.0]),
            report: Some("Liver enlarged.".into()),
            source_row: None,
        }
    }

    #[test]
    fn defaults_are_valid_and_fill_every_placeholder() {
        let t = Templates::default();
        t.validate().unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for task in [Task::Caption, Task::Rec, Task::Reg, Task::Seg] {
            for family in [Family::Cls, Family::Des] {
                for _ in 0..20 {
                    let i = instruction(&sample(task), &t, family, &mut rng).unwrap();
                    for s in [&i.question, &i.answer] {
                        assert!(!s.contains('{'), "{task} {family:?}: unfilled {s}");
                    }
                    match task {
                        Task::Rec => assert!(i
                            .answer
                            .contains("<bx_start>[0.062, 0.2, 0.0, 0.5, 0.9, 1.0]<bx_end>")),
                        Task::Reg => {
                            assert!(i.question.contains("<bx_start>"));
                            assert!(i.answer.contains("liver"));
                        }
                        Task::Seg => assert!(i.answer.contains("[SEG]")),
                        _ => assert_eq!(i.answer, "Liver enlarged."),
                    }
                }
            }
        }
    }

    #[test]
    fn same_seed_same_wording_and_wording_varies() {
        let t = Templates::default();
        let draw = |seed| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            (0..8)
                .map(|_| {
                    instruction(&sample(Task::Caption), &t, Family::Cls, &mut rng)
                        .unwrap()
                        .question
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let distinct: std::collections::BTreeSet<_> = draw(3).into_iter().collect();
        assert!(distinct.len() > 1);
    }

    #[test]
    fn stored_text_passes_through_and_missing_fields_are_errors() {
        let t = Templates::default();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let mut s = sample(Task::VqaClosed);
        s.question = Some("Q? Choices: A. a B. b C. c D. d".into());
        s.answer = Some("A. a".into());
        let i = instruction(&s, &t, Family::Cls, &mut rng).unwrap();
        assert_eq!(
            (i.question.as_str(), i.answer.as_str()),
            ("Q? Choices: A. a B. b C. c D. d", "A. a")
        );
        s.answer = None;
        assert!(matches!(
            instruction(&s, &t, Family::Cls, &mut rng),
            Err(InstructError::Sample { .. })
        ));
        let mut r = sample(Task::Rec);
        r.bbox = None;
        assert!(instruction(&r, &t, Family::Des, &mut rng).is_err());
    }

    #[test]
    fn template_files_are_strict() {
        let dir = std::env::temp_dir().join(format!("m3d-instruct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(&good, serde_json::to_vec(&Templates::default()).unwrap()).unwrap();
        assert_eq!(Templates::from_json(&good).unwrap(), Templates::default());
        let mut v = serde_json::to_value(Templates::default()).unwrap();
        v["extra"] = serde_json::json!(1);
        let bad = dir.join("bad.json");
        std::fs::write(&bad, v.to_string()).unwrap();
        let e = Templates::from_json(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.json") && e.contains("extra"), "{e}");
        let mut v = serde_json::to_value(Templates::default()).unwrap();
        v["seg_cls"]["answers"] = serde_json::json!(["no mask here"]);
        std::fs::write(&bad, v.to_string()).unwrap();
        assert!(Templates::from_json(&bad)
            .unwrap_err()
            .to_string()
            .contains("[SEG]"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
