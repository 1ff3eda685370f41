//! M3D-Cap in its raw layout: `M3D_Cap/<ct_case|ct_quizze>/<id>/text.txt` plus one folder of numbered PNG/JPEG
//! slices per series, and the split file `M3D_Cap/M3D_Cap.json`. The plan (cases, series, splits, texts) is
//! pure and cheap, so VQA and the truth file rebuild it instead of reading the slices back.

use std::fs;
use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;

use crate::anatomy::{AxisMap, Grid, LesionKind, Organ, Phantom, PhantomSpec, Phase, Tissue};
use crate::error::SynthError;
use crate::rng::{noise, stream, uniform, Stream, SynthRng};
use crate::text::{ascii_fold, cap_report, reference_text, TextStyle};
use crate::SynthConfig;

/// Soft-tissue window used to turn HU into 8-bit slice pixels.
pub const WINDOW_LEVEL: f64 = 40.0;
pub const WINDOW_WIDTH: f64 = 400.0;
/// Standard deviation of the added noise, in HU.
pub const NOISE_HU: f64 = 8.0;

/// The acquisition plane of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Plane {
    Axial,
    Coronal,
    Sagittal,
}

impl Plane {
    pub const ALL: [Plane; 3] = [Plane::Axial, Plane::Coronal, Plane::Sagittal];

    /// The plane as written in folder names and VQA answers.
    pub fn answer(self) -> &'static str {
        match self {
            Plane::Axial => "Axial",
            Plane::Coronal => "Coronal",
            Plane::Sagittal => "Sagittal",
        }
    }
}

/// The two Cap collections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Collection {
    #[serde(rename = "ct_case")]
    CtCase,
    #[serde(rename = "ct_quizze")]
    CtQuizze,
}

impl Collection {
    pub fn dir(self) -> &'static str {
        match self {
            Collection::CtCase => "ct_case",
            Collection::CtQuizze => "ct_quizze",
        }
    }
}

/// The split a series belongs to (a case's series always share one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Validation,
    Test,
}

/// Slice file format of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SliceFormat {
    Png,
    Jpeg,
}

impl SliceFormat {
    pub fn ext(self) -> &'static str {
        match self {
            SliceFormat::Png => "png",
            SliceFormat::Jpeg => "jpeg",
        }
    }
}

/// A slice of a shape different from the rest of its series (a localiser), which the reference drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StraySlice {
    /// Its file number (`<number>.<ext>`).
    pub number: usize,
    /// Its (height, width).
    pub shape: (usize, usize),
}

/// One series: a folder of slices.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapSeries {
    /// Folder name as written (may hold a diacritic).
    pub folder: String,
    pub plane: Plane,
    pub phase: Phase,
    pub format: SliceFormat,
    /// Slices written as RGB (grey values in all three channels) instead of 8-bit grey.
    pub rgb: bool,
    /// The grid of the kept slices: axes (slice, row, column).
    pub grid: Grid,
    pub stray: Option<StraySlice>,
    pub split: Split,
    pub hard_test: bool,
}

impl CapSeries {
    /// Number of slices the reference keeps.
    pub fn kept_slices(&self) -> usize {
        self.grid.axes[0].len
    }

    /// File numbers in numeric order with whether each is the stray slice.
    pub fn files(&self) -> Vec<(usize, bool)> {
        let total = self.kept_slices() + usize::from(self.stray.is_some());
        (1..=total)
            .map(|n| (n, self.stray.is_some_and(|s| s.number == n)))
            .collect()
    }
}

/// One case folder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapCase {
    pub collection: Collection,
    /// Six-digit id.
    pub id: String,
    pub phantom: Phantom,
    pub style: TextStyle,
    /// The `text.txt` content.
    pub raw_text: String,
    /// The caption the reference derives from `raw_text`.
    pub caption: String,
    pub series: Vec<CapSeries>,
}

impl CapCase {
    /// `ct_case/000006`.
    pub fn rel_dir(&self) -> String {
        format!("{}/{}", self.collection.dir(), self.id)
    }

    /// The JSON `image` path of a series: `ct_case/000006/Axial_non_contrast.npy`.
    pub fn image_rel(&self, series: &CapSeries) -> String {
        format!("{}/{}.npy", self.rel_dir(), ascii_fold(&series.folder))
    }

    /// The JSON `text` path: `ct_case/000006/text.txt`.
    pub fn text_rel(&self) -> String {
        format!("{}/text.txt", self.rel_dir())
    }
}

/// All Cap cases of a configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapPlan {
    pub cases: Vec<CapCase>,
}

impl CapPlan {
    /// Every series with its case, in case order.
    pub fn volumes(&self) -> impl Iterator<Item = (&CapCase, &CapSeries)> {
        self.cases
            .iter()
            .flat_map(|c| c.series.iter().map(move |s| (c, s)))
    }
}

fn style_for(case_index: usize) -> TextStyle {
    // Fixed positions guarantee every branch of the text rule appears in the default 16 cases.
    if case_index % 5 == 3 {
        TextStyle::Discussion
    } else if case_index % 7 == 5 {
        TextStyle::Plain
    } else {
        TextStyle::Findings
    }
}

fn series_grid(rng: &mut SynthRng, plane: Plane, slices: usize, size: (usize, usize)) -> Grid {
    let (h, w) = size;
    match plane {
        Plane::Axial => Grid {
            axes: [
                AxisMap::covering(
                    2,
                    uniform(rng, -0.98, -0.85),
                    uniform(rng, 0.85, 0.98),
                    slices,
                ),
                AxisMap::covering(1, -1.0, 1.0, h),
                AxisMap::covering(0, -1.0, 1.0, w),
            ],
        },
        Plane::Coronal => {
            let e = uniform(rng, 0.5, 0.58);
            Grid {
                axes: [
                    AxisMap::covering(1, -e, e, slices),
                    AxisMap::covering(2, -1.0, 1.0, h),
                    AxisMap::covering(0, -1.0, 1.0, w),
                ],
            }
        }
        Plane::Sagittal => {
            let e = uniform(rng, 0.7, 0.78);
            Grid {
                axes: [
                    AxisMap::covering(0, -e, e, slices),
                    AxisMap::covering(2, -1.0, 1.0, h),
                    AxisMap::covering(1, -1.0, 1.0, w),
                ],
            }
        }
    }
}

/// Builds the Cap plan of `cfg` without touching the disk.
pub fn plan_cap(cfg: &SynthConfig) -> CapPlan {
    let mut top = stream(cfg.seed, Stream::CapPlan, 0);
    let mut next_id = [0u32; 2];
    next_id[0] = top.random_range(1..40);
    next_id[1] = top.random_range(1..40);
    let mut cases = Vec::with_capacity(cfg.cap_cases);
    let mut global_series = 0usize;
    for i in 0..cfg.cap_cases {
        let mut rng = stream(cfg.seed, Stream::CapPlan, i as u64 + 1);
        let collection = if i % 4 == 3 {
            Collection::CtQuizze
        } else {
            Collection::CtCase
        };
        let slot = &mut next_id[collection as usize];
        let id = format!("{:06}", *slot);
        *slot += top.random_range(1..400);

        let phantom = Phantom::sample(
            &mut rng,
            &PhantomSpec {
                lesions: 1,
                absent: Vec::new(),
                random_cholecystectomy: true,
                // Cycling hosts and kinds keeps the organ and abnormality answers balanced.
                first_lesion: Some((
                    Organ::LESION_HOSTS[i % Organ::LESION_HOSTS.len()],
                    LesionKind::ALL[(i + i / Organ::LESION_HOSTS.len()) % LesionKind::ALL.len()],
                )),
            },
        );
        let style = style_for(i);
        let raw_text = cap_report(&mut rng, &phantom, style);
        let caption = reference_text(&raw_text);

        let n_series = if i == 0 || rng.random_bool(0.5) { 2 } else { 1 };
        let mut series: Vec<CapSeries> = Vec::with_capacity(n_series);
        while series.len() < n_series {
            let plane = if rng.random_bool(0.5) {
                Plane::Axial
            } else {
                Plane::ALL[rng.random_range(1..3)]
            };
            let phase = Phase::ALL[rng.random_range(0..Phase::ALL.len())];
            if series.iter().any(|s| s.plane == plane && s.phase == phase) {
                continue;
            }
            let folder = if i == 1 && series.is_empty() {
                // The reference folds such names to ASCII for the .npy name.
                format!("{}_Pöschl_{}", plane.answer(), phase.folder_part())
            } else {
                format!("{}_{}", plane.answer(), phase.folder_part())
            };
            let slices = rng.random_range(cfg.slices.0..=cfg.slices.1);
            let grid = series_grid(&mut rng, plane, slices, cfg.slice_size);
            let s = global_series;
            global_series += 1;
            let stray = (s % 5 == 0).then(|| StraySlice {
                number: rng.random_range(2..=slices),
                shape: (cfg.slice_size.0 / 2, cfg.slice_size.1 * 3 / 4),
            });
            series.push(CapSeries {
                folder,
                plane,
                phase,
                format: if s % 3 == 1 {
                    SliceFormat::Jpeg
                } else {
                    SliceFormat::Png
                },
                rgb: s % 4 == 2,
                grid,
                stray,
                split: Split::Train,
                hard_test: false,
            });
        }
        cases.push(CapCase {
            collection,
            id,
            phantom,
            style,
            raw_text,
            caption,
            series,
        });
    }
    assign_splits(&mut top, &mut cases);
    CapPlan { cases }
}

fn assign_splits(rng: &mut SynthRng, cases: &mut [CapCase]) {
    let n = cases.len();
    let (n_test, n_val) = match n {
        0 | 1 => (0, 0),
        2 => (1, 0),
        _ => (
            ((n as f64 * 0.2).round() as usize).max(1),
            ((n as f64 * 0.1).round() as usize).max(1),
        ),
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    for (rank, &i) in order.iter().enumerate() {
        let split = if rank < n_test {
            Split::Test
        } else if rank < n_test + n_val {
            Split::Validation
        } else {
            Split::Train
        };
        for s in &mut cases[i].series {
            s.split = split;
        }
    }
    // Every other test series (in file order) is also "hard".
    let mut k = 0usize;
    for case in cases.iter_mut() {
        for s in &mut case.series {
            if s.split == Split::Test {
                s.hard_test = k % 2 == 0;
                k += 1;
            }
        }
    }
}

#[derive(Serialize)]
struct CapEntry {
    image: String,
    text: String,
}

#[derive(Serialize)]
struct CapSplits {
    train: Vec<CapEntry>,
    validation: Vec<CapEntry>,
    test: Vec<CapEntry>,
    hard_test: Vec<CapEntry>,
}

pub(crate) fn create_dir(path: &Path) -> Result<(), SynthError> {
    fs::create_dir_all(path).map_err(|e| SynthError::io(path, e))
}

pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SynthError> {
    fs::write(path, bytes).map_err(|e| SynthError::io(path, e))
}

pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), SynthError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| SynthError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    bytes.push(b'\n');
    write_file(path, &bytes)
}

/// Maps HU to an 8-bit pixel with the soft-tissue window; body voxels never map to 0 so the reference's
/// foreground crop finds exactly the body.
pub fn hu_to_pixel(hu: f64) -> u8 {
    let v = ((hu - (WINDOW_LEVEL - WINDOW_WIDTH / 2.0)) / WINDOW_WIDTH * 255.0).round();
    v.clamp(1.0, 255.0) as u8
}

fn encode_slice(
    path: &Path,
    pixels: &[u8],
    (h, w): (usize, usize),
    format: SliceFormat,
    rgb: bool,
) -> Result<(), SynthError> {
    let (data, color) = if rgb {
        (
            pixels.iter().flat_map(|&v| [v, v, v]).collect::<Vec<u8>>(),
            ExtendedColorType::Rgb8,
        )
    } else {
        (pixels.to_vec(), ExtendedColorType::L8)
    };
    let mut buf = Vec::new();
    let image_err = |source| SynthError::Image {
        path: path.to_path_buf(),
        source,
    };
    match format {
        SliceFormat::Png => {
            PngEncoder::new_with_quality(&mut buf, CompressionType::Default, FilterType::Adaptive)
                .write_image(&data, w as u32, h as u32, color)
                .map_err(image_err)?
        }
        SliceFormat::Jpeg => JpegEncoder::new_with_quality(&mut buf, 92)
            .write_image(&data, w as u32, h as u32, color)
            .map_err(image_err)?,
    }
    write_file(path, &buf)
}

fn write_series(
    case_dir: &Path,
    phantom: &Phantom,
    series: &CapSeries,
    rng: &mut SynthRng,
) -> Result<(), SynthError> {
    let dir = case_dir.join(&series.folder);
    create_dir(&dir)?;
    let tissues = series.grid.tissues(phantom);
    let [_, h, w] = series.grid.shape();
    let plane = h * w;
    let mut kept = 0usize;
    for (number, stray) in series.files() {
        let path = dir.join(format!("{number}.{}", series.format.ext()));
        if stray {
            let shape = series.stray.map(|s| s.shape).unwrap_or((h, w));
            let pixels = localiser(phantom, series, shape, rng);
            encode_slice(&path, &pixels, shape, series.format, false)?;
            continue;
        }
        let slice = &tissues[kept * plane..(kept + 1) * plane];
        kept += 1;
        let pixels: Vec<u8> = slice
            .iter()
            .map(|&t| match t {
                Tissue::Air => 0,
                t => hu_to_pixel(phantom.hu(t, series.phase) + noise(rng, NOISE_HU)),
            })
            .collect();
        encode_slice(&path, &pixels, (h, w), series.format, series.rgb)?;
    }
    Ok(())
}

/// A coarse mid-series slice at another size, standing in for the scout images real series contain.
fn localiser(
    phantom: &Phantom,
    series: &CapSeries,
    (h, w): (usize, usize),
    rng: &mut SynthRng,
) -> Vec<u8> {
    let mid = series.grid.axes[0];
    let centre = mid.coord(mid.len / 2);
    let r = series.grid.axes[1];
    let c = series.grid.axes[2];
    let grid = Grid {
        axes: [
            AxisMap {
                body_axis: mid.body_axis,
                start: centre - 0.5,
                step: 1.0,
                len: 1,
            },
            AxisMap::covering(r.body_axis, -1.0, 1.0, h),
            AxisMap::covering(c.body_axis, -1.0, 1.0, w),
        ],
    };
    grid.tissues(phantom)
        .into_iter()
        .map(|t| match t {
            Tissue::Air => 0,
            t => hu_to_pixel(phantom.hu(t, series.phase) + noise(rng, NOISE_HU)),
        })
        .collect()
}

/// Writes `M3D_Cap/` under `dir` and returns the plan it wrote.
pub fn write_cap_plan(dir: &Path, cfg: &SynthConfig) -> Result<CapPlan, SynthError> {
    cfg.validate()?;
    let plan = plan_cap(cfg);
    let root = dir.join("M3D_Cap");
    create_dir(&root)?;
    let mut splits = CapSplits {
        train: Vec::new(),
        validation: Vec::new(),
        test: Vec::new(),
        hard_test: Vec::new(),
    };
    let mut global = 0u64;
    for case in &plan.cases {
        let case_dir: PathBuf = root.join(case.collection.dir()).join(&case.id);
        create_dir(&case_dir)?;
        write_file(&case_dir.join("text.txt"), case.raw_text.as_bytes())?;
        for series in &case.series {
            let mut rng = stream(cfg.seed, Stream::CapNoise, global);
            global += 1;
            write_series(&case_dir, &case.phantom, series, &mut rng)?;
            let entry = || CapEntry {
                image: case.image_rel(series),
                text: case.text_rel(),
            };
            match series.split {
                Split::Train => splits.train.push(entry()),
                Split::Validation => splits.validation.push(entry()),
                Split::Test => {
                    splits.test.push(entry());
                    if series.hard_test {
                        splits.hard_test.push(entry());
                    }
                }
            }
        }
    }
    write_json(&root.join("M3D_Cap.json"), &splits)?;
    Ok(plan)
}
