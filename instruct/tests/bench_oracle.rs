//! The M3D-Bench prompts against a line-for-line Python reimplementation of the reference's test datasets
//! (tests/oracle/bench_prompts.py, from Bench/dataset/multi_dataset.py and Bench/utils.py at 63e72005).
//!
//! About 60 samples over every prompted task are built twice: as the reference reads them (CSV row, report file,
//! mask file name and mask corners) for the oracle, and as m3d-data-prep stores them (a `SampleRecord`) for
//! `bench_prompts`. The oracle is given the template indices our per-sample RNG chose, so the two random streams
//! do not matter, and the prompt, answer, question type, class and closed-VQA letter must match exactly.

use std::path::Path;

use m3d_instruct::bench::{bench_prompts, BenchPrompt, BenchTask};
use m3d_shards::schema::{SampleRecord, Task};
use serde_json::{json, Value};

const TOK: &str = "<im_patch>";
const SHAPE: [usize; 3] = [32, 256, 256];

/// One sample in both forms.
struct Case {
    task: BenchTask,
    sample: SampleRecord,
    /// The reference's input: CSV row, Cap json entry, or mask file + corners.
    row: Value,
    /// M3D-Seg code (mask tasks).
    tag: Option<&'static str>,
    image_tokens: usize,
}

fn base(id: String, task: Task, volume_id: String) -> SampleRecord {
    SampleRecord {
        sample_id: id,
        dataset: String::new(),
        task,
        split: "test".into(),
        volume_id,
        mask_index: None,
        question: None,
        answer: None,
        answer_choice: None,
        question_type: None,
        class_name: None,
        bbox: None,
        report: None,
        source_row: None,
    }
}

/// Reports with the awkward parts of real ones: trailing whitespace, several lines, a CRLF file, non-ASCII.
const REPORTS: [&str; 8] = [
    "Findings: The liver is enlarged.",
    "Findings: No acute abnormality.\nImpression: Normal study. ",
    "Mild cardiomegaly.\r\nSmall left pleural effusion.\r\n",
    "Lesion in segment VII, 2.3 cm × 1.9 cm; Hounsfield ~45.",
    "  Leading spaces, then text with \"quotes\" and {braces}.",
    "Comparison: none.\n\nFindings: see above.\n",
    "Ø 5 mm nodule in the right upper lobe — stable.",
    "Kidneys: symmetric. Spleen: normal.",
];

fn caption_cases(root: &Path) -> Vec<Case> {
    REPORTS
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let rel = format!("M3D_Cap_npy/ct_case/{i:06}/text.txt");
            let path = root.join(&rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
            // m3d-data-prep reads reports with universal newlines (data-prep/src/text.rs read_text), as Python's
            // text-mode open() does.
            let stored = text.replace("\r\n", "\n");
            let sample = SampleRecord {
                report: Some(stored),
                ..base(
                    format!("cap/test/{i}"),
                    Task::Caption,
                    format!("ct_case/{i:06}"),
                )
            };
            Case {
                task: BenchTask::Cap,
                sample,
                row: json!({"image": "unused.npy", "text": rel}),
                tag: None,
                image_tokens: [256, 256, 1, 0][i % 4],
            }
        })
        .collect()
}

/// M3D-VQA test rows: (type, question, choices, answer letter).
const VQA_ROWS: [(u8, &str, [&str; 4], &str); 8] = [
    (
        1,
        "What plane is this image in?",
        ["Axial", "Sagittal", "Coronal", "Oblique"],
        "A",
    ),
    (
        2,
        "Which phase of contrast is used?",
        ["Arterial", "Portal venous", "Delayed", "Non-contrast"],
        "B",
    ),
    (
        3,
        "Which organ shows the abnormality?",
        ["Liver", "Spleen", "Left kidney", "Pancreas"],
        "C",
    ),
    (
        4,
        "What is the abnormality in the left lung?",
        ["Nodule", "Consolidation", "Effusion", "Pneumothorax"],
        "D",
    ),
    (
        5,
        "Where is the mass located?",
        [
            "Right lobe, segment VII",
            "Left lobe",
            "Caudate lobe",
            "Gallbladder fossa",
        ],
        "A",
    ),
    (
        3,
        "Is the lesion enhancing?  ",
        [
            "Yes, peripherally.",
            "No.",
            "Cannot be determined",
            "Partially, centrally",
        ],
        "B",
    ),
    (
        1,
        "Which view: \"axial\" or \"coronal\"?",
        ["axial", "coronal", "sagittal", "none of them"],
        "A",
    ),
    (
        4,
        "What is seen at 2.5 cm?",
        [
            "A 2.5 cm cyst",
            "A 1.0 cm stone",
            "Nothing",
            "A hematoma (resolving)",
        ],
        "C",
    ),
];

fn vqa_cases() -> Vec<Case> {
    let mut out = Vec::new();
    for (i, (qtype, question, choices, letter)) in VQA_ROWS.iter().enumerate() {
        let k = (letter.as_bytes()[0] - b'A') as usize;
        let answer = choices[k];
        let row = json!({
            "Image Path": format!("ct_case/{i:06}/Axial.npy"), "Question Type": qtype, "Question": question,
            "Choice A": choices[0], "Choice B": choices[1], "Choice C": choices[2], "Choice D": choices[3],
            "Answer": answer, "Answer Choice": letter,
        });
        let common = |task: Task, q: String, a: String| SampleRecord {
            question: Some(q),
            answer: Some(a),
            answer_choice: Some(letter.to_string()),
            question_type: Some(qtype.to_string()),
            ..base(
                format!("vqa/test/M3D_VQA_test.csv/{i}/{task}"),
                task,
                format!("ct_case/{i:06}/Axial"),
            )
        };
        // As m3d-data-prep's vqa::closed_prompt stores a closed row: question + " Choices: ...", "X. answer".
        let closed_q = format!(
            "{question} Choices: A. {} B. {} C. {} D. {}",
            choices[0], choices[1], choices[2], choices[3]
        );
        out.push(Case {
            task: BenchTask::VqaClosed,
            sample: common(Task::VqaClosed, closed_q, format!("{letter}. {answer}")),
            row: row.clone(),
            tag: None,
            image_tokens: if i == 5 { 0 } else { 256 },
        });
        if i < 6 {
            out.push(Case {
                task: BenchTask::VqaOpen,
                sample: common(Task::VqaOpen, question.to_string(), answer.to_string()),
                row,
                tag: None,
                image_tokens: 256,
            });
        }
    }
    out
}

/// m3d-data-prep's `boxes::round3` (Python's `round(x, 3)`) of a corner over its axis size.
fn round3(i: usize, n: usize) -> f32 {
    format!("{:.3}", i as f64 / n as f64)
        .parse::<f64>()
        .unwrap() as f32
}

/// Mask samples: (tag, channel, lo corner, hi corner). Corners include exact ties of round(., 3) (2/32 = 0.0625,
/// 6/32, 16/256, 48/256), zeros and the last index.
const MASKS: [(&str, u32, [usize; 3], [usize; 3]); 8] = [
    ("0003", 0, [2, 16, 48], [20, 200, 180]),
    ("0003", 1, [0, 0, 0], [31, 255, 255]),
    ("0003", 2, [6, 100, 17], [10, 130, 77]),
    ("0003", 3, [14, 64, 128], [14, 64, 128]),
    ("0011", 57, [3, 40, 90], [29, 211, 250]),
    ("0011", 103, [8, 1, 3], [27, 99, 101]),
    ("0012", 4, [1, 128, 5], [30, 129, 251]),
    ("0012", 5, [0, 33, 66], [12, 99, 199]),
];

fn mask_cases(root: &Path) -> Vec<Case> {
    let mut out = Vec::new();
    for (i, (tag, channel, lo, hi)) in MASKS.iter().enumerate() {
        let bbox = [
            round3(lo[0], SHAPE[0]),
            round3(lo[1], SHAPE[1]),
            round3(lo[2], SHAPE[2]),
            round3(hi[0], SHAPE[0]),
            round3(hi[1], SHAPE[1]),
            round3(hi[2], SHAPE[2]),
        ];
        let case = format!("case_{i:03}");
        let label = root.join(format!("M3D_Seg_npy/{tag}/{case}/masks/mask_{channel}.npy"));
        let row =
            json!({"image": "unused.npy", "label": label, "shape": SHAPE, "lo": lo, "hi": hi});
        let sample = |task: Task| SampleRecord {
            mask_index: Some(*channel),
            // The label-json name; the reference prompt uses dataset_info's, which must win.
            class_name: Some(format!("label {channel}")),
            bbox: (task != Task::Seg).then_some(bbox),
            ..base(
                format!("seg/{tag}/{case}/{task}/{channel}"),
                task,
                format!("{tag}/{case}"),
            )
        };
        let mut push = |task: BenchTask, stored: Task, tokens: usize| {
            out.push(Case {
                task,
                sample: sample(stored),
                row: row.clone(),
                tag: Some(tag),
                image_tokens: tokens,
            })
        };
        let tokens = if i == 3 { 2 } else { 256 };
        if *tag == "0003" || i % 2 == 0 {
            push(BenchTask::Rec, Task::Rec, tokens);
            push(BenchTask::Reg, Task::Reg, tokens);
        }
        push(BenchTask::Seg, Task::Seg, tokens);
        push(BenchTask::RefSeg, Task::Seg, tokens);
    }
    out
}

const REFSEG_ROWS: [(&str, &str); 4] = [
    (
        "Please segment the hypodense lesion in the right hepatic lobe.",
        "Sure, it is [SEG].",
    ),
    (
        "Where is the left renal cyst? Please output the segmentation mask.",
        "[SEG].",
    ),
    (
        "Can you segment the area with thickened bowel wall?",
        "The thickened bowel wall is [SEG].",
    ),
    (
        "Segment the region described as: round, well-defined, 3 cm.",
        "It is [SEG]. It is a cyst.",
    ),
];

fn refseg_cases() -> Vec<Case> {
    REFSEG_ROWS
        .iter()
        .enumerate()
        .map(|(i, (q, a))| Case {
            task: BenchTask::RefSeg,
            sample: SampleRecord {
                question: Some(q.to_string()),
                answer: Some(a.to_string()),
                question_type: Some((i % 2).to_string()),
                mask_index: Some(0),
                ..base(format!("refseg/s{i:04}/test/0"), Task::RefSeg, format!("s{i:04}"))
            },
            row: json!({"Image": "unused.npy", "Mask": "unused.npy", "Mask_ID": 1, "Question": q, "Answer": a}),
            tag: None,
            image_tokens: 256,
        })
        .collect()
}

fn family_name(p: &BenchPrompt) -> Value {
    match p.family {
        Some(f) => serde_json::to_value(f).unwrap(),
        None => Value::Null,
    }
}

#[test]
fn prompts_match_the_reference_construction() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut cases = caption_cases(root);
    cases.extend(vqa_cases());
    cases.extend(mask_cases(root));
    cases.extend(refseg_cases());

    let mut prompts = Vec::new();
    let mut oracle_cases = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        for p in bench_prompts(c.task, &c.sample, c.image_tokens, TOK, 1000 + i as u64).unwrap() {
            oracle_cases.push(json!({
                "construction": p.construction, "family": family_name(&p), "tag": c.tag,
                "image_tokens": c.image_tokens, "data_root": root, "row": c.row, "draws": p.draws,
            }));
            prompts.push(p);
        }
    }
    assert!(
        cases.len() >= 50 && prompts.len() >= 60,
        "{} samples, {} prompts",
        cases.len(),
        prompts.len()
    );
    let cases_path = root.join("cases.json");
    std::fs::write(&cases_path, serde_json::to_vec(&oracle_cases).unwrap()).unwrap();

    let script = m3d_testkit::package_dir().join("tests/oracle/bench_prompts.py");
    let bench_json = m3d_testkit::package_dir().join("templates/bench.json");
    let out = m3d_testkit::run_python(
        &script,
        &[bench_json.to_str().unwrap(), cases_path.to_str().unwrap()],
    );
    let expected: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(expected.len(), prompts.len());

    let mut constructions = std::collections::BTreeSet::new();
    for (p, e) in prompts.iter().zip(&expected) {
        let ctx = format!("{} {} draws {:?}", p.sample_id, p.construction, p.draws);
        assert_eq!(p.prompt, e["question"].as_str().unwrap(), "prompt of {ctx}");
        assert_eq!(p.answer, e["answer"].as_str().unwrap(), "answer of {ctx}");
        assert_eq!(
            p.question_type,
            e["question_type"].as_str().unwrap(),
            "question_type of {ctx}"
        );
        if let Some(class) = e.get("class_name") {
            assert_eq!(p.class_name.as_deref(), class.as_str(), "class of {ctx}");
        }
        if p.construction == "VQADataset(close_ended=True)" {
            assert_eq!(
                p.answer_choice.as_deref(),
                e["answer_choice"].as_str(),
                "letter of {ctx}"
            );
        }
        constructions.insert(p.construction);
    }
    assert_eq!(constructions.len(), 10, "{constructions:?}");
}
