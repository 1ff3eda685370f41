//! M3D-RefSeg in its published layout: per case `ct.nii.gz` (int16 HU, (H, W, D)), `mask.nii.gz` (region ids
//! 0..k), `text.json` (a description per region id), and the question/answer CSVs whose answers carry the
//! `[SEG]` token. Regions are lesions, so descriptions, questions and masks all come from the same phantom.

use std::path::Path;

use m3d_formats::nifti::{write_nifti, NiftiDtype};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::anatomy::{Grid, Lesion, Organ, Phantom, PhantomSpec, Tissue};
use crate::cap::{create_dir, write_json};
use crate::error::SynthError;
use crate::rng::{stream, Stream, SynthRng};
use crate::seg::{render, volume_grid};
use crate::text::lesion_sentence;
use crate::SynthConfig;

/// Columns of the RefSeg CSVs, in order.
pub use m3d_formats::tables::REFSEG_COLUMNS;

pub const REFSEG_TRAIN: &str = "M3D_RefSeg_train.csv";
pub const REFSEG_TEST: &str = "M3D_RefSeg_test.csv";

/// One region of a case's mask.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefSegRegion {
    /// Value of the region in `mask.nii.gz`.
    pub id: u8,
    pub lesion: Lesion,
    /// Number of voxels with this id.
    pub voxels: usize,
    /// The `text.json` description.
    pub description: String,
}

/// One RefSeg case.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefSegCase {
    /// `s0000`.
    pub case: String,
    /// Axes (H, W, D) = body (x, y, z).
    pub grid: Grid,
    pub pixdim: [f32; 3],
    pub phantom: Phantom,
    pub regions: Vec<RefSegRegion>,
    pub test: bool,
}

/// One CSV row.
#[derive(Debug, Clone, PartialEq)]
pub struct RefSegRow {
    pub image: String,
    pub mask: String,
    pub mask_id: u8,
    /// 0 description, 1 reasoning.
    pub question_type: u8,
    pub question: String,
    pub answer: String,
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Regions are the lesions with at least one voxel on the grid, numbered 1.. in lesion order.
fn regions(phantom: &Phantom, tissues: &[Tissue]) -> Vec<RefSegRegion> {
    let mut counts = vec![0usize; phantom.lesions.len()];
    for t in tissues {
        if let Tissue::Lesion(l) = t {
            counts[*l as usize] += 1;
        }
    }
    let mut out = Vec::new();
    for (lesion, &voxels) in phantom.lesions.iter().zip(&counts) {
        if voxels == 0 {
            continue;
        }
        out.push(RefSegRegion {
            id: out.len() as u8 + 1,
            lesion: *lesion,
            voxels,
            description: format!("{}.", capitalise(&lesion_sentence(lesion))),
        });
    }
    out
}

/// The RefSeg cases of `cfg`, without writing anything (the grid is sampled once to find visible regions).
pub fn plan_refseg(cfg: &SynthConfig) -> Vec<RefSegCase> {
    let mut cases = Vec::with_capacity(cfg.refseg_cases);
    for c in 0..cfg.refseg_cases {
        let mut rng = stream(cfg.seed, Stream::RefSegCase, c as u64 + 1);
        let (grid, pixdim) = volume_grid(&mut rng, cfg.seg_size);
        let lesions = rng.random_range(2..=3);
        let phantom = Phantom::sample(
            &mut rng,
            &PhantomSpec {
                lesions,
                absent: Vec::new(),
                random_cholecystectomy: true,
                first_lesion: None,
            },
        );
        let regions = regions(&phantom, &grid.tissues(&phantom));
        cases.push(RefSegCase {
            case: format!("s{c:04}"),
            grid,
            pixdim,
            phantom,
            regions,
            test: false,
        });
    }
    let n = cases.len();
    let n_test = if n >= 2 {
        ((n as f64 * 0.2).round() as usize).max(1)
    } else {
        0
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut stream(cfg.seed, Stream::RefSegCase, 0));
    for &i in order.iter().take(n_test) {
        cases[i].test = true;
    }
    cases
}

fn organ_riddle(organ: Organ) -> &'static str {
    match organ {
        Organ::Liver => "the largest solid organ of the abdomen",
        Organ::Spleen => "the organ in the left upper quadrant that filters the blood",
        Organ::RightKidney => "the bean-shaped organ on the patient's right that makes urine",
        Organ::LeftKidney => "the bean-shaped organ on the patient's left that makes urine",
        Organ::Pancreas => "the gland behind the stomach that secretes insulin",
        Organ::Aorta => "the largest artery of the body",
        Organ::Gallbladder => "the organ that stores bile",
        Organ::Bladder => "the organ that stores urine",
    }
}

fn kind_noun(lesion: &Lesion) -> &'static str {
    match lesion.kind {
        crate::anatomy::LesionKind::Cyst => "cyst",
        crate::anatomy::LesionKind::HyperdenseMass => "hyperdense mass",
        crate::anatomy::LesionKind::Calcification => "calcification",
    }
}

fn rows_for(case: &RefSegCase, rng: &mut SynthRng) -> Vec<RefSegRow> {
    let image = format!("{}/ct.nii.gz", case.case);
    let mask = format!("{}/mask.nii.gz", case.case);
    let mut rows = Vec::new();
    for region in &case.regions {
        let l = &region.lesion;
        let organ = l.organ.name();
        let noun = kind_noun(l);
        let place = l.location.phrase();
        let row = |question_type: u8, question: String, answer: String| RefSegRow {
            image: image.clone(),
            mask: mask.clone(),
            mask_id: region.id,
            question_type,
            question,
            answer,
        };
        let describe = [
            (
                format!("Please segment the {noun} in the {organ}."),
                "It is [SEG].".to_string(),
            ),
            (
                format!("Where is the {noun} of the {organ}? Please output the segmentation mask."),
                format!("Sure, it is [SEG], in the {place} of the {organ}."),
            ),
            (
                format!(
                    "Can you segment the {}?",
                    lesion_sentence(l).trim_start_matches("a ")
                ),
                "Sure, [SEG].".to_string(),
            ),
        ];
        let reason = [
            (
                format!(
                    "If there is a lesion in {}, please segment it and explain why.",
                    organ_riddle(l.organ)
                ),
                format!(
                    "{} is the {organ}, and the lesion is [SEG]: a {noun} in its {place}.",
                    capitalise(organ_riddle(l.organ))
                ),
            ),
            (
                "Can you segment the unusual part in this image and explain why?".to_string(),
                format!(
                    "Sure, it is [SEG]. In the image, the unusual part is a {}, which differs in density from the surrounding {organ}.",
                    l.kind.phrase()
                ),
            ),
        ];
        // Two of each type per region, drawn so the CSVs do not repeat one template.
        for (q, a) in describe.choose_multiple(rng, 2) {
            rows.push(row(0, q.clone(), a.clone()));
        }
        for (q, a) in reason.iter() {
            rows.push(row(1, q.clone(), a.clone()));
        }
    }
    rows
}

struct TextJson<'a>(&'a [RefSegRegion]);

impl Serialize for TextJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for r in self.0 {
            m.serialize_entry(&r.id.to_string(), &r.description)?;
        }
        m.end()
    }
}

fn write_csv(path: &Path, rows: &[RefSegRow]) -> Result<usize, SynthError> {
    let csv_err = |source| SynthError::Csv {
        path: path.to_path_buf(),
        source,
    };
    let mut w = csv::Writer::from_path(path).map_err(csv_err)?;
    w.write_record(REFSEG_COLUMNS).map_err(csv_err)?;
    for r in rows {
        w.write_record([
            r.image.as_str(),
            r.mask.as_str(),
            &r.mask_id.to_string(),
            &r.question_type.to_string(),
            &r.question,
            &r.answer,
        ])
        .map_err(csv_err)?;
    }
    w.flush().map_err(|e| SynthError::io(path, e))?;
    Ok(rows.len())
}

/// Writes `M3D_RefSeg/` under `dir`; returns the cases and the number of CSV rows written.
pub fn write_refseg_plan(
    dir: &Path,
    cfg: &SynthConfig,
) -> Result<(Vec<RefSegCase>, usize), SynthError> {
    cfg.validate()?;
    let plan = plan_refseg(cfg);
    let root = dir.join("M3D_RefSeg");
    create_dir(&root)?;
    let mut train = Vec::new();
    let mut test = Vec::new();
    for (c, case) in plan.iter().enumerate() {
        let dir = root.join(&case.case);
        create_dir(&dir)?;
        let mut rng = stream(cfg.seed, Stream::RefSegNoise, c as u64);
        let (hu, mask) = render(&case.phantom, &case.grid, &mut rng, |t| match t {
            Tissue::Lesion(l) => {
                let lesion = &case.phantom.lesions[l as usize];
                case.regions
                    .iter()
                    .find(|r| r.lesion == *lesion)
                    .map_or(0, |r| r.id)
            }
            _ => 0,
        });
        let shape = case.grid.shape();
        let hu32: Vec<f32> = hu.iter().map(|v| *v as f32).collect();
        write_nifti(
            &dir.join("ct.nii.gz"),
            &shape,
            &hu32,
            NiftiDtype::I16,
            case.pixdim,
        )?;
        let mask32: Vec<f32> = mask.iter().map(|v| f32::from(*v)).collect();
        write_nifti(
            &dir.join("mask.nii.gz"),
            &shape,
            &mask32,
            NiftiDtype::U8,
            case.pixdim,
        )?;
        write_json(&dir.join("text.json"), &TextJson(&case.regions))?;
        let mut text_rng = stream(cfg.seed, Stream::RefSegText, c as u64);
        let rows = rows_for(case, &mut text_rng);
        if case.test {
            test.extend(rows);
        } else {
            train.extend(rows);
        }
    }
    let n =
        write_csv(&root.join(REFSEG_TRAIN), &train)? + write_csv(&root.join(REFSEG_TEST), &test)?;
    Ok((plan, n))
}
