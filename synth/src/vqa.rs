//! M3D-VQA in its published CSV layout. Questions are built from the Cap plan, so every answer is true of
//! the volume `Image Path` names: its plane and phase (from how it was sampled) and its lesion's organ, kind
//! and position (from the phantom). Fields contain commas and quotes on purpose, to exercise real CSV quoting.

use std::collections::BTreeMap;
use std::path::Path;

use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;

use crate::anatomy::{LesionKind, Location, Organ, Phase};
use crate::cap::{create_dir, plan_cap, CapCase, CapPlan, CapSeries, Plane, Split};
use crate::error::SynthError;
use crate::rng::{stream, Stream, SynthRng};
use crate::SynthConfig;

pub use m3d_formats::tables::VQA_COLUMNS;

/// The extra last column of `M3D_VQA_test.csv`.
pub const VQA_NOTE_COLUMN: &str = "Note";

/// One CSV row.
#[derive(Debug, Clone, PartialEq)]
pub struct VqaRow {
    pub image_path: String,
    pub text: String,
    pub question_type: u8,
    pub question: String,
    pub choices: [String; 4],
    pub answer: String,
    /// `A`..`D`, or empty for yes/no rows.
    pub answer_choice: String,
}

impl VqaRow {
    fn record(&self) -> Vec<String> {
        let mut r = vec![
            self.image_path.clone(),
            self.text.clone(),
            self.question_type.to_string(),
            self.question.clone(),
        ];
        r.extend(self.choices.iter().cloned());
        r.push(self.answer.clone());
        r.push(self.answer_choice.clone());
        r
    }
}

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// Four choices holding `correct` at a random position and three other members of `pool`.
fn choices(rng: &mut SynthRng, correct: &str, pool: &[&str]) -> ([String; 4], String) {
    let mut others: Vec<&str> = pool.iter().copied().filter(|p| *p != correct).collect();
    others.shuffle(rng);
    let at = rng.random_range(0..4);
    let mut out: [String; 4] = Default::default();
    let mut o = others.into_iter();
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = if i == at {
            correct.to_string()
        } else {
            o.next().unwrap_or("None of the above").to_string()
        };
    }
    (out, LETTERS[at].to_string())
}

fn closed_rows(rng: &mut SynthRng, case: &CapCase, series: &CapSeries) -> Vec<VqaRow> {
    let image_path = case.image_rel(series);
    let mut rows = Vec::with_capacity(5);
    let mut push =
        |question_type: u8, question: String, correct: &str, pool: &[&str], rng: &mut SynthRng| {
            let (choices, letter) = choices(rng, correct, pool);
            rows.push(VqaRow {
                image_path: image_path.clone(),
                text: case.caption.clone(),
                question_type,
                question,
                choices,
                answer: correct.to_string(),
                answer_choice: letter,
            });
        };
    let plane_q = [
        "In which plane is this CT image displayed?",
        "What is the imaging plane of this scan?",
    ];
    let q = plane_q.choose(rng).copied().unwrap_or(plane_q[0]);
    push(
        1,
        q.to_string(),
        series.plane.answer(),
        &["Axial", "Coronal", "Sagittal", "Oblique"],
        rng,
    );
    let phases: Vec<&str> = Phase::ALL.iter().map(|p| p.answer()).collect();
    push(
        2,
        "Which contrast phase was this CT scan acquired in?".to_string(),
        series.phase.answer(),
        &phases,
        rng,
    );
    if let Some(lesion) = case.phantom.lesions.first() {
        let organs: Vec<&str> = Organ::ALL.iter().map(|o| o.display()).collect();
        push(
            3,
            format!(
                "Which organ contains the lesion that appears as a \"{}\"?",
                lesion.kind.phrase()
            ),
            lesion.organ.display(),
            &organs,
            rng,
        );
        let mut kinds: Vec<&str> = LesionKind::ALL.iter().map(|k| k.answer()).collect();
        kinds.push("Abscess");
        push(
            4,
            format!(
                "What type of abnormality is seen in the {}?",
                lesion.organ.name()
            ),
            lesion.kind.answer(),
            &kinds,
            rng,
        );
        let locations: Vec<&str> = Location::ALL.iter().map(|l| l.answer()).collect();
        push(
            5,
            format!(
                "Where is the lesion in the {} located, from the patient's perspective?",
                lesion.organ.name()
            ),
            lesion.location.answer(),
            &locations,
            rng,
        );
    }
    rows
}

fn yes_no_rows(rng: &mut SynthRng, case: &CapCase, series: &CapSeries) -> Vec<VqaRow> {
    let image_path = case.image_rel(series);
    let row = |question_type: u8, question: String, yes: bool| VqaRow {
        image_path: image_path.clone(),
        text: case.caption.clone(),
        question_type,
        question,
        choices: Default::default(),
        answer: if yes { "Yes" } else { "No" }.to_string(),
        answer_choice: String::new(),
    };
    let mut rows = Vec::with_capacity(4);
    let plane = *Plane::ALL.choose(rng).unwrap_or(&Plane::Axial);
    rows.push(row(
        1,
        format!(
            "Is this image shown in the {} plane?",
            plane.answer().to_lowercase()
        ),
        plane == series.plane,
    ));
    let phase = *Phase::ALL.choose(rng).unwrap_or(&Phase::NonContrast);
    rows.push(row(
        2,
        format!(
            "Was this scan acquired in the {} phase?",
            phase.answer().to_lowercase().trim_end_matches(" phase")
        ),
        phase == series.phase,
    ));
    if let Some(lesion) = case.phantom.lesions.first() {
        rows.push(row(
            3,
            format!("Is there a lesion in the {}?", lesion.organ.name()),
            true,
        ));
        let others: Vec<Organ> = Organ::LESION_HOSTS
            .iter()
            .copied()
            .filter(|o| *o != lesion.organ)
            .collect();
        if let Some(other) = others.choose(rng) {
            rows.push(row(
                3,
                format!("Is there a lesion in the {}?", other.name()),
                false,
            ));
        }
    }
    rows
}

fn rows_for(plan: &CapPlan, seed: u64, split: Split, yes_no: bool) -> Vec<VqaRow> {
    let mut rows = Vec::new();
    for (index, (case, series)) in plan.volumes().enumerate() {
        if series.split != split {
            continue;
        }
        // One stream per (volume, csv kind) so adding a split or a file elsewhere changes nothing here.
        let mut rng = stream(seed, Stream::Vqa, index as u64 * 2 + u64::from(yes_no));
        if yes_no {
            rows.extend(yes_no_rows(&mut rng, case, series));
        } else {
            rows.extend(closed_rows(&mut rng, case, series));
        }
    }
    rows
}

fn write_csv(path: &Path, rows: &[VqaRow], note: Option<&str>) -> Result<usize, SynthError> {
    let csv_err = |source| SynthError::Csv {
        path: path.to_path_buf(),
        source,
    };
    let mut w = csv::Writer::from_path(path).map_err(csv_err)?;
    let mut header: Vec<&str> = VQA_COLUMNS.to_vec();
    if note.is_some() {
        header.push(VQA_NOTE_COLUMN);
    }
    w.write_record(&header).map_err(csv_err)?;
    for row in rows {
        let mut rec = row.record();
        if let Some(n) = note {
            rec.push(n.to_string());
        }
        w.write_record(&rec).map_err(csv_err)?;
    }
    w.flush().map_err(|e| SynthError::io(path, e))?;
    Ok(rows.len())
}

/// File names of the VQA CSVs.
pub const VQA_TRAIN: &str = "M3D_VQA_train.csv";
pub const VQA_VAL: &str = "M3D_VQA_val.csv";
pub const VQA_TEST: &str = "M3D_VQA_test.csv";
pub const VQA_TEST5K: &str = "M3D_VQA_test5k.csv";
pub const VQA_YN_TRAIN: &str = "M3D_VQA_yn_train.csv";

/// Writes `M3D_VQA/` under `dir`; returns rows per file name.
pub fn write_vqa_files(
    dir: &Path,
    cfg: &SynthConfig,
) -> Result<BTreeMap<String, usize>, SynthError> {
    cfg.validate()?;
    let plan = plan_cap(cfg);
    let root = dir.join("M3D_VQA");
    create_dir(&root)?;
    let mut counts = BTreeMap::new();
    let train = rows_for(&plan, cfg.seed, Split::Train, false);
    counts.insert(
        VQA_TRAIN.to_string(),
        write_csv(&root.join(VQA_TRAIN), &train, None)?,
    );
    let val = rows_for(&plan, cfg.seed, Split::Validation, false);
    counts.insert(
        VQA_VAL.to_string(),
        write_csv(&root.join(VQA_VAL), &val, None)?,
    );
    let test = rows_for(&plan, cfg.seed, Split::Test, false);
    counts.insert(
        VQA_TEST.to_string(),
        write_csv(
            &root.join(VQA_TEST),
            &test,
            Some("Checked against the synthetic ground truth"),
        )?,
    );
    // The published test5k is a sample of the test set; here every other test row, capped at 5000.
    let test5k: Vec<VqaRow> = test.iter().step_by(2).take(5000).cloned().collect();
    counts.insert(
        VQA_TEST5K.to_string(),
        write_csv(&root.join(VQA_TEST5K), &test5k, None)?,
    );
    let yn = rows_for(&plan, cfg.seed, Split::Train, true);
    counts.insert(
        VQA_YN_TRAIN.to_string(),
        write_csv(&root.join(VQA_YN_TRAIN), &yn, None)?,
    );
    Ok(counts)
}
