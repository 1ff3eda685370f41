//! M3D-RefSeg: referring segmentation. One `f16` volume per case (`ct.nii.gz`) with one bit-packed mask per region
//! id of `mask.nii.gz`; one sample per row of the split tables (see [`TABLES`]), pointing at the mask of its
//! `Mask_ID`.
//!
//! Follows the reference `m3d_refseg_data_prepare.py`: axes reordered, then ScaleIntensityRangePercentiles(0.5,
//! 99.5, 0, 1, clip) on the float64 values of `get_fdata()` (percentiles and scaling in float64, then float32),
//! CropForeground from the image, Resize to 32 x 256 x 256 (image trilinear, mask nearest).
//!
//! **Quirk** (axis order): the reference reads `get_fdata().transpose(2, 0, 1)`, i.e. NIfTI (x, y, z) -> (z, x, y),
//! while its M3D-Seg preparation gives (z, y, x) — the radiological in-plane orientation, rows = y, columns = x,
//! which is also how M3D-Cap slices are stored. RefSeg volumes therefore come out transposed in-plane relative to
//! every other dataset. Default here: [`AxisOrder::Consistent`], (z, y, x) like M3D-Seg; the switch
//! [`AxisOrder::Reference`] (`--axis-order reference`) reproduces the published (z, x, y) so that models and
//! numbers trained on the published RefSeg data stay comparable.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use m3d_formats::paths::safe_join;
use m3d_shards::encode::ImageDtype;
use m3d_shards::schema::{SampleRecord, Task};
use m3d_volume::transforms::{
    foreground_bbox, permute_spatial, scale_intensity_range_percentiles_f64,
    try_resize_nearest_box, try_resize_trilinear_box,
};
use m3d_volume::Volume;

use crate::cap::TARGET;
use crate::csv_table::Table;
use crate::error::{PrepError, Result};
use crate::pipeline::{mask_record, volume_record, Converted, VolumeSource};

use m3d_formats::tables::REFSEG_COLUMNS;

/// The table of each split, by the file names accepted for it. The train split is `M3D_RefSeg_train.csv` or
/// `M3D_RefSeg.csv`, the name the reference's training default reads (`LaMed/src/train/train.py`:
/// `M3D_RefSeg_npy/M3D_RefSeg.csv`); a source with both is refused. A split without a table is reported (log and
/// the manifest's `source.missing_tables`); a source without any table is an error.
pub const TABLES: [(&str, &[&str]); 2] = [
    ("train", &["M3D_RefSeg_train.csv", "M3D_RefSeg.csv"]),
    ("test", &["M3D_RefSeg_test.csv"]),
];

/// How NIfTI (x, y, z) becomes (D, H, W); see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AxisOrder {
    /// (z, y, x), as M3D-Seg and M3D-Cap: the default.
    Consistent,
    /// (z, x, y), the reference RefSeg script's `transpose(2, 0, 1)` (quirk).
    Reference,
}

impl AxisOrder {
    fn perm(self) -> [usize; 3] {
        match self {
            AxisOrder::Consistent => [2, 1, 0],
            AxisOrder::Reference => [2, 0, 1],
        }
    }
}

#[derive(Clone, Debug)]
pub struct RefSegOptions {
    /// Root holding the case folders and the CSV tables.
    pub src: PathBuf,
    /// Storage dtype of the images; default `f16`. `f32` keeps the exact values.
    pub dtype: Option<ImageDtype>,
    pub axis_order: AxisOrder,
}

struct Row {
    split: String,
    mask_id: u32,
    question_type: String,
    question: String,
    answer: String,
    source_row: String,
}

pub struct RefSegItem {
    case: String,
    image: String,
    mask: String,
    rows: Vec<Row>,
}

pub struct RefSegSource {
    opts: RefSegOptions,
    items: Vec<RefSegItem>,
    tables: Vec<serde_json::Value>,
    /// Splits without a table: (split, file names looked for).
    missing: Vec<(&'static str, &'static [&'static str])>,
    skipped: Vec<crate::pipeline::Skipped>,
}

/// A table path may name the NIfTI source (`s0000/ct.nii.gz`) or the reference's prepared file (`s0000/ct.npy`);
/// both mean the case folder's NIfTI.
fn nifti_path(rel: &str, stem: &str) -> String {
    let case = Path::new(rel)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if case.is_empty() {
        format!("{stem}.nii.gz")
    } else {
        format!("{case}/{stem}.nii.gz")
    }
}

impl RefSegSource {
    pub fn new(opts: RefSegOptions, skip_bad: bool) -> Result<Self> {
        let mut by_case: BTreeMap<String, RefSegItem> = BTreeMap::new();
        let mut tables = Vec::new();
        let mut missing = Vec::new();
        let mut skipped = Vec::new();
        for (split, names) in TABLES {
            let mut present = Vec::new();
            for name in names {
                let path = opts.src.join(name);
                if path.try_exists().map_err(|e| PrepError::io(&path, e))? {
                    present.push(*name);
                }
            }
            let name = match present[..] {
                [] => {
                    missing.push((split, names));
                    continue;
                }
                [name] => name,
                _ => {
                    return Err(PrepError::input(
                        &opts.src,
                        format!(
                            "{} both hold the {split} split of M3D-RefSeg: keep only one of them",
                            present.join(" and ")
                        ),
                    ))
                }
            };
            let path = opts.src.join(name);
            let bytes = std::fs::read(&path).map_err(|e| PrepError::io(&path, e))?;
            tables.push(serde_json::json!({
                "file": name,
                "split": split,
                "sha256": m3d_shards::sha256_hex(&bytes),
            }));
            let table = Table::read(&path, &REFSEG_COLUMNS)?;
            for r in 0..table.rows.len() {
                let parsed = (|| -> Result<(String, String, String, Row)> {
                    let image = table.get(r, "Image");
                    let mask = table.get(r, "Mask");
                    safe_join(&opts.src, image).map_err(|e| table.row_error(r, e.to_string()))?;
                    safe_join(&opts.src, mask).map_err(|e| table.row_error(r, e.to_string()))?;
                    let id_text = table.get(r, "Mask_ID").trim();
                    let mask_id: u32 = id_text
                        .parse::<f64>()
                        .ok()
                        .filter(|v| v.fract() == 0.0 && *v >= 1.0 && *v <= u32::MAX as f64)
                        .map(|v| v as u32)
                        .ok_or_else(|| {
                            table.row_error(
                                r,
                                format!("Mask_ID {id_text:?} is not a positive integer"),
                            )
                        })?;
                    let qt = table.get(r, "Question_Type").trim();
                    if !matches!(qt, "0" | "1") {
                        return Err(
                            table.row_error(r, format!("Question_Type {qt:?} is not 0 or 1"))
                        );
                    }
                    let question = table.get(r, "Question");
                    if question.trim().is_empty() {
                        return Err(table.row_error(r, "empty Question"));
                    }
                    let case = Path::new(image)
                        .parent()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    Ok((
                        case,
                        nifti_path(image, "ct"),
                        nifti_path(mask, "mask"),
                        Row {
                            split: split.to_string(),
                            mask_id,
                            question_type: qt.to_string(),
                            question: question.to_string(),
                            answer: table.get(r, "Answer").to_string(),
                            source_row: table.row_ref(r),
                        },
                    ))
                })();
                match parsed {
                    Ok((case, image, mask, row)) => by_case
                        .entry(case.clone())
                        .or_insert_with(|| RefSegItem {
                            case,
                            image,
                            mask,
                            rows: Vec::new(),
                        })
                        .rows
                        .push(row),
                    Err(e) if skip_bad => skipped.push(crate::pipeline::Skipped {
                        item: table.row_ref(r),
                        error: e.to_string(),
                    }),
                    Err(e) => return Err(e),
                }
            }
        }
        if tables.is_empty() {
            return Err(PrepError::input(
                &opts.src,
                format!(
                    "no M3D-RefSeg table found: looked for {}",
                    looked_for(&missing)
                ),
            ));
        }
        for (split, names) in &missing {
            tracing::warn!(
                src = %opts.src.display(),
                "M3D-RefSeg has no {split} table ({} not found): converting without a {split} split",
                names.join(" or ")
            );
        }
        Ok(RefSegSource {
            opts,
            items: by_case.into_values().collect(),
            tables,
            missing,
            skipped,
        })
    }
}

fn read_volume(path: &Path) -> Result<Volume<f32>> {
    let nii = m3d_formats::nifti::read_nifti(path)?;
    let shape: [usize; 4] = match nii.shape.as_slice() {
        [h, w, d] => [1, *h, *w, *d],
        [h, w, d, 1] => [1, *h, *w, *d],
        other => {
            return Err(PrepError::input(
                path,
                format!("expected a 3-D volume, found shape {other:?}"),
            ))
        }
    };
    Volume::new(shape, nii.data).map_err(|e| PrepError::input(path, e.to_string()))
}

/// "M3D_RefSeg_train.csv or M3D_RefSeg.csv (train), M3D_RefSeg_test.csv (test)".
fn looked_for(splits: &[(&str, &[&str])]) -> String {
    splits
        .iter()
        .map(|(split, names)| format!("{} ({split})", names.join(" or ")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The reference chain for one case: image (1 x 32 x 256 x 256 in [0, 1]) and region-id map (same shape).
///
/// The percentiles and the scaling run in float64, as the reference runs them on `get_fdata()`; `image` holds
/// those float64 values rounded to float32 by the NIfTI reader, which is exact for integer CTs (int16 with a unit
/// or integer slope).
pub fn preprocess_case(
    image: Volume<f32>,
    ids: Volume<f32>,
    axes: AxisOrder,
    name: &Path,
) -> Result<(Volume<f32>, Volume<f32>)> {
    let image = permute_spatial(&image, axes.perm());
    let ids = permute_spatial(&ids, axes.perm());
    let image = scale_intensity_range_percentiles_f64(&image, 0.5, 99.5, 0.0, 1.0, true);
    let bbox = foreground_bbox(&image)
        .ok_or_else(|| PrepError::input(name, "nothing is foreground after intensity scaling"))?;
    let resize_err = |e: m3d_volume::VolumeError| PrepError::input(name, e.to_string());
    let image = try_resize_trilinear_box(&image, &bbox, TARGET, |x| x).map_err(resize_err)?;
    let ids = try_resize_nearest_box(&ids, &bbox, TARGET).map_err(resize_err)?;
    Ok((image, ids))
}

impl VolumeSource for RefSegSource {
    type Item = RefSegItem;

    fn dataset(&self) -> &'static str {
        "refseg"
    }

    fn items(&self) -> &[RefSegItem] {
        &self.items
    }

    fn item_id(&self, item: &RefSegItem) -> String {
        item.case.clone()
    }

    fn convert(&self, item: &RefSegItem) -> Result<Converted> {
        let image_path = safe_join(&self.opts.src, &item.image)?;
        let mask_path = safe_join(&self.opts.src, &item.mask)?;
        let image = read_volume(&image_path)?;
        let ids = read_volume(&mask_path)?;
        if image.shape() != ids.shape() {
            return Err(PrepError::input(
                &mask_path,
                format!(
                    "mask shape {:?} differs from the image's {:?}",
                    ids.shape(),
                    image.shape()
                ),
            ));
        }
        let text_path = image_path.with_file_name("text.json");
        let descriptions: BTreeMap<String, serde_json::Value> = match std::fs::read(&text_path) {
            Ok(raw) => serde_json::from_slice(&raw).map_err(|source| PrepError::Json {
                path: text_path.clone(),
                source,
            })?,
            Err(_) => BTreeMap::new(),
        };
        let present: BTreeSet<u32> = ids
            .data()
            .iter()
            .filter(|v| **v > 0.0)
            .map(|v| v.round() as u32)
            .collect();
        for row in &item.rows {
            if !present.contains(&row.mask_id) {
                return Err(PrepError::input(
                    &mask_path,
                    format!("{} refers to Mask_ID {}, which the mask does not contain (ids present: {present:?})", row.source_row, row.mask_id),
                ));
            }
        }
        let (image, ids) = preprocess_case(image, ids, self.opts.axis_order, &image_path)?;
        let per: usize = image.spatial().iter().product();
        let mut region = vec![0u8; per];
        let mut masks = Vec::new();
        let mut index_of = BTreeMap::new();
        for id in &present {
            for (dst, v) in region.iter_mut().zip(ids.data()) {
                *dst = u8::from(v.round() as u32 == *id);
            }
            index_of.insert(*id, masks.len() as u32);
            let label = descriptions
                .get(&id.to_string())
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                })
                .unwrap_or_else(|| format!("region {id}"));
            masks.push(mask_record(*id, label, &region));
        }
        let samples = item
            .rows
            .iter()
            .enumerate()
            .map(|(i, row)| SampleRecord {
                sample_id: format!("refseg/{}/{}/{i}", item.case, row.split),
                dataset: "refseg".to_string(),
                task: Task::RefSeg,
                split: row.split.clone(),
                volume_id: item.case.clone(),
                mask_index: index_of.get(&row.mask_id).copied(),
                question: Some(row.question.clone()),
                answer: Some(row.answer.clone()),
                answer_choice: None,
                question_type: Some(row.question_type.clone()),
                class_name: None,
                bbox: None,
                report: None,
                source_row: Some(row.source_row.clone()),
            })
            .collect();
        let volume = volume_record(
            &item.case,
            "refseg",
            format!("{} + {}", item.image, item.mask),
            &image,
            self.dtype(),
            masks,
        );
        Ok(Converted { volume, samples })
    }

    fn preprocessing(&self) -> serde_json::Value {
        serde_json::json!({
            "reference": "M3D Data/process/m3d_refseg_data_prepare.py",
            "axis_order": self.opts.axis_order,
            "axes": match self.opts.axis_order {
                AxisOrder::Consistent => "NIfTI (x, y, z) -> (z, y, x), as M3D-Seg",
                AxisOrder::Reference => "NIfTI (x, y, z) -> (z, x, y): the reference's transpose(2, 0, 1) (quirk)",
            },
            "intensity": "ScaleIntensityRangePercentiles(0.5, 99.5, b_min 0, b_max 1, clip), in float64",
            "crop_foreground": "image > 0, applied to image and mask",
            "resize": {"size": TARGET, "image": "trilinear", "mask": "nearest"},
            "masks": "one per region id present in mask.nii.gz; target = mask == Mask_ID",
            "storage": {"dtype": self.dtype()},
        })
    }

    fn source(&self) -> serde_json::Value {
        let missing: Vec<serde_json::Value> = self
            .missing
            .iter()
            .map(|(split, names)| serde_json::json!({"split": split, "looked_for": names}))
            .collect();
        serde_json::json!({
            "root": self.opts.src.display().to_string(),
            "tables": self.tables,
            "missing_tables": missing,
        })
    }

    fn planning_skipped(&self) -> Vec<crate::pipeline::Skipped> {
        self.skipped.clone()
    }
}

impl RefSegSource {
    fn dtype(&self) -> ImageDtype {
        self.opts.dtype.unwrap_or(ImageDtype::F16)
    }
}
