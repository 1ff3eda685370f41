//! M3D-VQA: question-answer tables over M3D-Cap volumes. Writes samples only (they reference Cap volumes by id,
//! never copying them): each row of a multiple-choice table becomes a closed-ended and an open-ended sample, each
//! row of the yes/no table a yes/no sample. Prompts are built exactly as the reference `VQADataset` builds them.

use std::collections::BTreeSet;
use std::path::PathBuf;

use m3d_shards::schema::{SampleRecord, Task};

use crate::csv_table::Table;
use crate::error::{PrepError, Result};
use crate::pipeline::{convert_samples_only, ConvertOptions, ConvertReport, Skipped};

use m3d_formats::tables::VQA_COLUMNS;

/// Published tables and the split each holds.
pub const TABLES: [(&str, &str, Task); 5] = [
    ("M3D_VQA_train.csv", "train", Task::VqaClosed),
    ("M3D_VQA_val.csv", "validation", Task::VqaClosed),
    ("M3D_VQA_test.csv", "test", Task::VqaClosed),
    ("M3D_VQA_test5k.csv", "test5k", Task::VqaClosed),
    ("M3D_VQA_yn_train.csv", "train", Task::VqaYesNo),
];

#[derive(Clone, Debug)]
pub struct VqaOptions {
    /// Folder holding the CSV tables.
    pub src: PathBuf,
    /// Volume ids that exist (from the converted M3D-Cap dataset); when given, every row must reference one.
    pub known_volumes: Option<BTreeSet<String>>,
    /// The converted M3D-Cap dataset's volume index: when given, the sample lookup records where each row's
    /// volume is, so that training opens M3D-VQA without a sample table or Cap's index.
    pub volumes_from: Option<m3d_shards::ForeignVolumes>,
}

/// The closed-ended prompt and answer of the reference: `question + " Choices: A. a B. b C. c D. d"`, `"X. answer"`.
pub fn closed_prompt(
    question: &str,
    choices: [&str; 4],
    answer_choice: &str,
    answer: &str,
) -> (String, String) {
    (
        format!(
            "{question} Choices: A. {} B. {} C. {} D. {}",
            choices[0], choices[1], choices[2], choices[3]
        ),
        format!("{answer_choice}. {answer}"),
    )
}

/// Parses every present table into samples. Missing tables are skipped (subsets are published separately), but
/// at least one must exist.
pub fn read_samples(
    opts: &VqaOptions,
    skip_bad: bool,
) -> Result<(Vec<SampleRecord>, Vec<Skipped>, serde_json::Value)> {
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    let mut files = Vec::new();
    for (name, split, task) in TABLES {
        let path = opts.src.join(name);
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| PrepError::io(&path, e))?;
        files.push(serde_json::json!({"file": name, "sha256": m3d_shards::sha256_hex(&bytes)}));
        let table = Table::read(&path, &VQA_COLUMNS)?;
        for row in 0..table.rows.len() {
            match row_samples(&table, row, split, task, opts) {
                Ok(s) => samples.extend(s),
                Err(e) if skip_bad => skipped.push(Skipped {
                    item: table.row_ref(row),
                    error: e.to_string(),
                }),
                Err(e) => return Err(e),
            }
        }
    }
    if files.is_empty() {
        return Err(PrepError::input(
            &opts.src,
            format!(
                "no M3D-VQA table found (expected one of {:?})",
                TABLES.map(|t| t.0)
            ),
        ));
    }
    let source = serde_json::json!({"root": opts.src.display().to_string(), "tables": files});
    Ok((samples, skipped, source))
}

fn row_samples(
    table: &Table,
    row: usize,
    split: &str,
    task: Task,
    opts: &VqaOptions,
) -> Result<Vec<SampleRecord>> {
    let image = table.get(row, "Image Path");
    if image.is_empty() {
        return Err(table.row_error(row, "empty Image Path"));
    }
    m3d_formats::paths::safe_join(&opts.src, image)
        .map_err(|e| table.row_error(row, e.to_string()))?;
    let volume_id = image.strip_suffix(".npy").unwrap_or(image).to_string();
    if let Some(known) = &opts.known_volumes {
        if !known.contains(&volume_id) {
            return Err(table.row_error(
                row,
                format!("Image Path {image:?} is not a volume of the given M3D-Cap dataset"),
            ));
        }
    }
    let qtype = table.get(row, "Question Type").trim();
    let qtype_n: u8 = qtype
        .parse()
        .ok()
        .filter(|n| (1..=5).contains(n))
        .ok_or_else(|| table.row_error(row, format!("Question Type {qtype:?} is not 1..5")))?;
    let question = table.get(row, "Question");
    if question.trim().is_empty() {
        return Err(table.row_error(row, "empty Question"));
    }
    let answer = table.get(row, "Answer");
    let base = |task: Task, q: String, a: String, choice: Option<String>| SampleRecord {
        sample_id: format!(
            "vqa/{split}/{}/{row}/{task}",
            crate::cap::file_name(&table.path)
        ),
        dataset: "vqa".to_string(),
        task,
        split: split.to_string(),
        volume_id: volume_id.clone(),
        mask_index: None,
        question: Some(q),
        answer: Some(a),
        answer_choice: choice,
        question_type: Some(qtype_n.to_string()),
        class_name: None,
        bbox: None,
        report: None,
        source_row: Some(table.row_ref(row)),
    };
    if task == Task::VqaYesNo {
        return Ok(vec![base(
            task,
            question.to_string(),
            answer.to_string(),
            None,
        )]);
    }
    let choice = table.get(row, "Answer Choice").trim();
    if !matches!(choice, "A" | "B" | "C" | "D") {
        return Err(table.row_error(row, format!("Answer Choice {choice:?} is not A, B, C or D")));
    }
    let choices = [
        table.get(row, "Choice A"),
        table.get(row, "Choice B"),
        table.get(row, "Choice C"),
        table.get(row, "Choice D"),
    ];
    let (cq, ca) = closed_prompt(question, choices, choice, answer);
    Ok(vec![
        base(Task::VqaClosed, cq, ca, Some(choice.to_string())),
        base(
            Task::VqaOpen,
            question.to_string(),
            answer.to_string(),
            Some(choice.to_string()),
        ),
    ])
}

/// Converts the M3D-VQA tables into sample shards under `opts.out`.
pub fn convert(vqa: &VqaOptions, opts: &ConvertOptions) -> Result<ConvertReport> {
    let (samples, skipped, source) = read_samples(vqa, opts.skip_bad)?;
    let preprocessing = serde_json::json!({
        "reference": "M3D LaMed/src/dataset/multi_dataset.py VQADataset / VQAYNDataset",
        "closed": "Question + ' Choices: A. {A} B. {B} C. {C} D. {D}' -> '{Answer Choice}. {Answer}'",
        "open": "Question -> Answer",
        "volume_id": "Image Path without .npy (an M3D-Cap volume id)",
    });
    convert_samples_only(
        "vqa",
        source,
        preprocessing,
        samples,
        skipped,
        opts,
        vqa.volumes_from.as_ref(),
    )
}
