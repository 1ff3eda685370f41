//! M3D-Cap: image-text pairs. Reads the split file (`M3D_Cap.json`) and, per referenced series, either the raw
//! slice folder (`ct_case/<id>/<series>/1.png ...`) or an already prepared `<series>.npy`; writes one `u8` volume
//! per series and one caption sample per (split, entry).
//!
//! Raw series follow the reference `m3d_cap_data_prepare.py` exactly: slices ordered by the integer value of the
//! file stem (only `.png` and `.jpeg`, as there), each read as 8-bit grey and divided by 255 in float32, only slices
//! of the most common shape kept, min-max normalised, CropForeground (voxels > 0), then MONAI `Resize` to
//! 32 x 256 x 256 with **trilinear interpolation** (align_corners false, no anti-aliasing): the script's current
//! version (2024-06-12, still HEAD) passes `mode="bilinear"`, which MONAI applies as trilinear in 3-D.
//! `--resize-mode area` reproduces its first release (2024-04-28), which passed no mode (MONAI's default "area").
//! Where the reference prints and carries on (an unreadable slice is dropped, a folder that fails is skipped), we stop with an error naming the file, or skip the whole series under `--skip-bad`;
//! a volume is never silently changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use m3d_formats::paths::safe_join;
use m3d_shards::encode::ImageDtype;
use m3d_shards::schema::{SampleRecord, Task};
use m3d_volume::transforms::{prepare_cap_u8_with, CapResize};
use m3d_volume::Volume;
use serde::{Deserialize, Serialize};

use crate::error::{PrepError, Result};
use crate::pipeline::{volume_record, Converted, VolumeSource};
use crate::text::{extract_report, read_text, unidecode};

/// The model input size of every M3D volume (D, H, W).
pub const TARGET: [usize; 3] = [32, 256, 256];

/// How volumes are resized to [`TARGET`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// MONAI's default (adaptive average pooling), used by the first release of the reference Cap script.
    Area,
    /// Trilinear, align_corners = false: the current reference Cap script (`mode="bilinear"`). The default.
    #[default]
    Trilinear,
}

/// Options of the Cap converter.
#[derive(Clone, Debug)]
pub struct CapOptions {
    /// Root holding `ct_case/`, `ct_quizze/` (raw or prepared) and the split file.
    pub src: PathBuf,
    /// Split file; default `<src>/M3D_Cap.json`.
    pub split_file: Option<PathBuf>,
    pub resize: ResizeMode,
    /// Storage dtype of the images; default `u8` (the slices are 8-bit). `f32` keeps the exact values.
    pub dtype: Option<ImageDtype>,
}

/// One series to convert.
pub struct CapItem {
    /// `ct_case/000006/Axial_non_contrast.npy` as written in the split file.
    image: String,
    volume_id: String,
    /// Every (split, index in that split, text path) that references this series.
    uses: Vec<(String, usize, String)>,
}

pub struct CapSource {
    opts: CapOptions,
    split_path: PathBuf,
    split_sha256: String,
    items: Vec<CapItem>,
}

#[derive(Deserialize)]
struct SplitEntry {
    image: String,
    text: String,
}

impl CapSource {
    pub fn new(opts: CapOptions) -> Result<Self> {
        let split_path = opts
            .split_file
            .clone()
            .unwrap_or_else(|| opts.src.join("M3D_Cap.json"));
        let raw = std::fs::read(&split_path).map_err(|e| PrepError::io(&split_path, e))?;
        let splits: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&raw).map_err(|source| PrepError::Json {
                path: split_path.clone(),
                source,
            })?;
        // Published files use train/validation/test/hard_test, older ones also test1k/test500/test100: keep every key,
        // the known ones first so volume order does not depend on extra subsets.
        let known = ["train", "validation", "test", "hard_test"];
        let mut keys: Vec<&String> = splits
            .keys()
            .filter(|k| known.contains(&k.as_str()))
            .collect();
        keys.sort_by_key(|k| known.iter().position(|n| n == k));
        keys.extend(splits.keys().filter(|k| !known.contains(&k.as_str())));

        let mut items: Vec<CapItem> = Vec::new();
        let mut index: BTreeMap<String, usize> = BTreeMap::new();
        for split in keys {
            let entries: Vec<SplitEntry> =
                serde_json::from_value(splits[split].clone()).map_err(|e| {
                    PrepError::input(
                        &split_path,
                        format!("split {split:?}: expected a list of {{image, text}}: {e}"),
                    )
                })?;
            for (i, entry) in entries.into_iter().enumerate() {
                // Validate early: a path that escapes the root is an error in the split file, not in a volume.
                safe_join(&opts.src, &entry.image)?;
                safe_join(&opts.src, &entry.text)?;
                let slot = *index.entry(entry.image.clone()).or_insert_with(|| {
                    items.push(CapItem {
                        volume_id: entry
                            .image
                            .strip_suffix(".npy")
                            .unwrap_or(&entry.image)
                            .to_string(),
                        image: entry.image.clone(),
                        uses: Vec::new(),
                    });
                    items.len() - 1
                });
                items[slot].uses.push((split.clone(), i, entry.text));
            }
        }
        Ok(CapSource {
            split_sha256: m3d_shards::sha256_hex(&raw),
            opts,
            split_path,
            items,
        })
    }

    /// Finds the input of a series: the prepared `.npy` if it exists, else the raw slice folder whose name becomes
    /// the series name under the reference's `unidecode` ([`unidecode`]).
    fn locate(&self, item: &CapItem) -> Result<SeriesInput> {
        let npy = safe_join(&self.opts.src, &item.image)?;
        if npy.is_file() {
            return Ok(SeriesInput::Prepared(npy));
        }
        let parent = npy
            .parent()
            .ok_or_else(|| PrepError::input(&npy, "series path has no parent folder"))?;
        let stem = npy
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| PrepError::input(&npy, "series path has no file name"))?;
        let listing = std::fs::read_dir(parent).map_err(|e| PrepError::io(parent, e))?;
        let mut found = Vec::new();
        let mut seen = Vec::new();
        for entry in listing {
            let entry = entry.map_err(|e| PrepError::io(parent, e))?;
            let path = entry.path();
            if path.is_dir() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let ascii = unidecode(&name);
                if ascii == stem {
                    found.push(path);
                }
                seen.push(format!("{name:?} -> {ascii:?}"));
            }
        }
        match found.len() {
            1 => Ok(SeriesInput::Raw(found.remove(0))),
            0 => {
                seen.sort();
                Err(PrepError::input(
                    &npy,
                    format!(
                        "neither this prepared .npy nor a raw series folder whose unidecode'd name is {stem:?} \
                         exists (folders here: [{}])",
                        seen.join(", ")
                    ),
                ))
            }
            _ => Err(PrepError::input(
                parent,
                format!("several series folders transliterate to the name {stem:?}: {found:?}"),
            )),
        }
    }
}

enum SeriesInput {
    Raw(PathBuf),
    Prepared(PathBuf),
}

/// Reads a raw series folder into the `1 x D x H x W` stack of 8-bit slices the reference builds (before its
/// division by 255).
pub fn load_raw_series(dir: &Path) -> Result<Volume<u8>> {
    let listing = std::fs::read_dir(dir).map_err(|e| PrepError::io(dir, e))?;
    let mut slices: Vec<(i64, PathBuf)> = Vec::new();
    for entry in listing {
        let entry = entry.map_err(|e| PrepError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // The reference keeps exactly these two extensions; `.jpg` files are not part of a series there either.
        if !(name.ends_with(".png") || name.ends_with(".jpeg")) {
            continue;
        }
        let path = entry.path();
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n: i64 = stem.trim().parse().map_err(|_| {
            PrepError::input(
                &path,
                "slice file name is not a number (slices are ordered by it)",
            )
        })?;
        slices.push((n, path));
    }
    if slices.is_empty() {
        return Err(PrepError::input(dir, "series has no .png or .jpeg slices"));
    }
    slices.sort_by_key(|(n, _)| *n);
    // Slices are decoded straight into the stack (no per-slice buffers); the file and colour-row buffers are
    // reused across slices.
    let mut scratch = m3d_formats::slice::SliceScratch::default();
    let mut data: Vec<u8> = Vec::new();
    let mut shapes: Vec<(usize, usize)> = Vec::with_capacity(slices.len());
    for (i, (_, path)) in slices.iter().enumerate() {
        let (h, w) = m3d_formats::slice::decode_slice_append(path, &mut scratch, &mut data)?;
        if i == 0 {
            data.reserve(slices.len().saturating_sub(1) * h * w);
        }
        shapes.push((h, w));
    }
    // Most common shape; ties go to the shape seen first, as `Counter.most_common` does.
    let mut counts: Vec<((usize, usize), usize)> = Vec::new();
    for &shape in &shapes {
        match counts.iter_mut().find(|(k, _)| *k == shape) {
            Some((_, c)) => *c += 1,
            None => counts.push((shape, 1)),
        }
    }
    let mut best = counts[0];
    for c in &counts[1..] {
        if c.1 > best.1 {
            best = *c;
        }
    }
    let (h, w) = best.0;
    let kept = best.1;
    if kept != shapes.len() {
        tracing::debug!(series = %dir.display(), dropped = shapes.len() - kept, "slices of a minority shape dropped, as the reference does");
        // Compact the stack in place: kept slices move down over the dropped ones, in order.
        let (mut read, mut write) = (0, 0);
        for &(sh, sw) in &shapes {
            let len = sh * sw;
            if (sh, sw) == (h, w) {
                data.copy_within(read..read + len, write);
                write += len;
            }
            read += len;
        }
        data.truncate(write);
    }
    Volume::new([1, kept, h, w], data).map_err(|e| PrepError::input(dir, e.to_string()))
}

/// The reference chain after loading: `/ 255` in float32, min-max, CropForeground, Resize, fused into one pass
/// straight from the 8-bit slices (bit-identical to the step-by-step chain).
pub fn preprocess(v: &Volume<u8>, resize: ResizeMode, name: &Path) -> Result<Volume<f32>> {
    let mode = match resize {
        ResizeMode::Area => CapResize::Area,
        ResizeMode::Trilinear => CapResize::Trilinear,
    };
    prepare_cap_u8_with(v, TARGET, mode).ok_or_else(|| {
        PrepError::input(
            name,
            "volume is constant: nothing is foreground after min-max",
        )
    })
}

fn load_prepared(path: &Path) -> Result<Volume<f32>> {
    let arr = m3d_formats::npy::read_npy(path)?;
    let shape: [usize; 4] = match arr.shape.as_slice() {
        [c, d, h, w] => [*c, *d, *h, *w],
        [d, h, w] => [1, *d, *h, *w],
        other => {
            return Err(PrepError::input(
                path,
                format!("prepared volume must be 1 x D x H x W, found shape {other:?}"),
            ))
        }
    };
    if shape[0] != 1 {
        return Err(PrepError::input(
            path,
            format!("expected one channel, found {}", shape[0]),
        ));
    }
    let data = arr.to_f32();
    if let Some(bad) = data.iter().position(|v| !(0.0..=1.0).contains(v)) {
        return Err(PrepError::input(
            path,
            format!(
                "prepared volumes hold values in [0, 1]; element {bad} is {}",
                data[bad]
            ),
        ));
    }
    Volume::new(shape, data).map_err(|e| PrepError::input(path, e.to_string()))
}

impl VolumeSource for CapSource {
    type Item = CapItem;

    fn dataset(&self) -> &'static str {
        "cap"
    }

    fn items(&self) -> &[CapItem] {
        &self.items
    }

    fn item_id(&self, item: &CapItem) -> String {
        item.volume_id.clone()
    }

    fn convert(&self, item: &CapItem) -> Result<Converted> {
        let (volume, source, prepared) = match self.locate(item)? {
            SeriesInput::Raw(dir) => {
                let v = load_raw_series(&dir)?;
                (preprocess(&v, self.opts.resize, &dir)?, dir, false)
            }
            SeriesInput::Prepared(path) => (load_prepared(&path)?, path, true),
        };
        let record = volume_record(
            &item.volume_id,
            "cap",
            relative(&self.opts.src, &source),
            &volume,
            self.dtype(),
            Vec::new(),
        );
        let mut samples = Vec::with_capacity(item.uses.len());
        let mut texts: BTreeMap<&str, String> = BTreeMap::new();
        for (split, i, text_rel) in &item.uses {
            if !texts.contains_key(text_rel.as_str()) {
                let path = safe_join(&self.opts.src, text_rel)?;
                // Read as the reference does (`open(path, 'r')`: universal newlines).
                let raw = read_text(&path)?;
                // A prepared tree already holds the extracted report; the rule is for raw reports.
                let report = if prepared {
                    raw.trim().to_string()
                } else {
                    extract_report(&raw)
                };
                texts.insert(text_rel, report);
            }
            samples.push(SampleRecord {
                sample_id: format!("cap/{split}/{i}"),
                dataset: "cap".to_string(),
                task: Task::Caption,
                split: split.clone(),
                volume_id: item.volume_id.clone(),
                mask_index: None,
                question: None,
                answer: None,
                answer_choice: None,
                question_type: None,
                class_name: None,
                bbox: None,
                report: texts.get(text_rel.as_str()).cloned(),
                source_row: Some(format!("{}:{split}[{i}]", file_name(&self.split_path))),
            });
        }
        Ok(Converted {
            volume: record,
            samples,
        })
    }

    fn preprocessing(&self) -> serde_json::Value {
        serde_json::json!({
            "reference": "M3D Data/process/m3d_cap_data_prepare.py",
            "slices": "png|jpeg ordered by integer stem, PIL convert('L') / 255, most common shape kept",
            "normalise": "min-max, max clipped at 1e-8",
            "crop_foreground": "x > 0, margin 0",
            "resize": { "size": TARGET, "mode": self.opts.resize },
            "text": "study_findings -> discussion -> whole text (>= 5 non-space chars)",
            "storage": { "dtype": self.dtype() },
        })
    }

    fn source(&self) -> serde_json::Value {
        serde_json::json!({
            "root": self.opts.src.display().to_string(),
            "split_file": self.split_path.display().to_string(),
            "split_file_sha256": self.split_sha256,
        })
    }
}

pub(crate) fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

pub(crate) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

impl CapSource {
    fn dtype(&self) -> ImageDtype {
        self.opts.dtype.unwrap_or(ImageDtype::U8)
    }
}
