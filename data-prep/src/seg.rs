//! M3D-Seg: 25 public segmentation datasets in one layout (`<code>/<code>.json`, `<case>/image.npy` of shape
//! `1 x H x W x D`, masks as scipy CSR in `mask_(C, H, W, D).npz`). One `f16` volume per case with one bit-packed
//! mask per foreground class; per non-empty class a segmentation, a REC and a REG sample.
//!
//! Follows the reference `m3d_seg_data_prepare.py`: swap axes (C, H, W, D) -> (C, D, W, H), min-max normalise the
//! image, CropForeground using the image for both, Resize to 32 x 256 x 256 (image trilinear, mask nearest), mask to
//! bool. Mask channel `i` is the class `labels[str(i + 1)]` of the dataset JSON ("0" is background); the reference
//! saves only non-empty channels, we keep every channel (empty ones cost nothing) and derive samples only for the
//! non-empty ones, as it does.

use std::path::{Path, PathBuf};

use m3d_formats::paths::safe_join;
use m3d_shards::encode::ImageDtype;
use m3d_shards::schema::{SampleRecord, Task};
use m3d_volume::transforms::BBox;
use m3d_volume::transforms::{
    foreground_bbox, min_max_normalise, permute_spatial, try_resize_nearest_box,
    try_resize_trilinear_box,
};
use m3d_volume::Volume;
use serde::Deserialize;

use crate::boxes::mask_box;
use crate::cap::{relative, TARGET};
use crate::error::{PrepError, Result};
use crate::pipeline::{mask_record, volume_record, Converted, VolumeSource};

#[derive(Clone, Debug)]
pub struct SegOptions {
    /// Root holding `<code>/<code>.json`.
    pub src: PathBuf,
    /// Dataset codes to convert (`0000`..`0024`); empty = every code found.
    pub codes: Vec<String>,
    /// Storage dtype of the images; default `f16`. `f32` keeps the exact values.
    pub dtype: Option<ImageDtype>,
}

pub struct SegItem {
    code: String,
    split: String,
    image: String,
    label: String,
    classes: Vec<String>,
    volume_id: String,
}

pub struct SegSource {
    opts: SegOptions,
    items: Vec<SegItem>,
    jsons: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct DatasetJson {
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    train: Vec<Pair>,
    #[serde(default)]
    test: Vec<Pair>,
}

#[derive(Deserialize)]
struct Pair {
    image: String,
    label: String,
}

impl SegSource {
    pub fn new(opts: SegOptions) -> Result<Self> {
        let codes = if opts.codes.is_empty() {
            let mut found = Vec::new();
            let listing = std::fs::read_dir(&opts.src).map_err(|e| PrepError::io(&opts.src, e))?;
            for entry in listing {
                let entry = entry.map_err(|e| PrepError::io(&opts.src, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.path().join(format!("{name}.json")).is_file() {
                    found.push(name);
                }
            }
            found.sort();
            if found.is_empty() {
                return Err(PrepError::input(
                    &opts.src,
                    "no <code>/<code>.json dataset found",
                ));
            }
            found
        } else {
            opts.codes.clone()
        };
        let mut items = Vec::new();
        let mut jsons = Vec::new();
        for code in codes {
            let path = opts.src.join(&code).join(format!("{code}.json"));
            let raw = std::fs::read(&path).map_err(|e| PrepError::io(&path, e))?;
            let ds: DatasetJson =
                serde_json::from_slice(&raw).map_err(|source| PrepError::Json {
                    path: path.clone(),
                    source,
                })?;
            jsons.push(serde_json::json!({"file": relative(&opts.src, &path), "sha256": m3d_shards::sha256_hex(&raw)}));
            let mut classes = Vec::new();
            for i in 1..ds.labels.len() {
                let name = ds.labels.get(&i.to_string()).ok_or_else(|| {
                    PrepError::input(
                        &path,
                        format!(
                            "labels must be numbered 0..{}; \"{i}\" is missing",
                            ds.labels.len() - 1
                        ),
                    )
                })?;
                classes.push(name.clone());
            }
            for (split, pairs) in [("train", &ds.train), ("test", &ds.test)] {
                for pair in pairs {
                    safe_join(&opts.src, &pair.image)?;
                    safe_join(&opts.src, &pair.label)?;
                    let case = Path::new(&pair.image)
                        .parent()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| pair.image.clone());
                    items.push(SegItem {
                        code: code.clone(),
                        split: split.to_string(),
                        image: pair.image.clone(),
                        label: pair.label.clone(),
                        classes: classes.clone(),
                        volume_id: case,
                    });
                }
            }
        }
        Ok(SegSource { opts, items, jsons })
    }
}

/// The reference chain for the image of one case: swap axes (C, H, W, D) -> (C, D, W, H), min-max, CropForeground,
/// trilinear resize. Returns the 1 x 32 x 256 x 256 image and the crop box, which the masks share.
pub fn preprocess_image(image: Volume<f32>, name: &Path) -> Result<(Volume<f32>, BBox)> {
    // np.swapaxes(x, -1, -3): (C, H, W, D) -> (C, D, W, H).
    let mut image = permute_spatial(&image, [2, 1, 0]);
    min_max_normalise(&mut image);
    let bbox = foreground_bbox(&image).ok_or_else(|| {
        PrepError::input(
            name,
            "image is constant: nothing is foreground after min-max",
        )
    })?;
    let image = try_resize_trilinear_box(&image, &bbox, TARGET, |x| x)
        .map_err(|e| PrepError::input(name, e.to_string()))?;
    Ok((image, bbox))
}

/// The same chain for one mask channel (1 x H x W x D, 0/1): swap axes, crop to the image's box, nearest resize.
pub fn preprocess_mask(mask: Volume<u8>, bbox: &BBox, name: &Path) -> Result<Volume<u8>> {
    let mask = permute_spatial(&mask, [2, 1, 0]);
    try_resize_nearest_box(&mask, bbox, TARGET).map_err(|e| PrepError::input(name, e.to_string()))
}

impl VolumeSource for SegSource {
    type Item = SegItem;

    fn dataset(&self) -> &'static str {
        "seg"
    }

    fn items(&self) -> &[SegItem] {
        &self.items
    }

    fn item_id(&self, item: &SegItem) -> String {
        item.volume_id.clone()
    }

    fn convert(&self, item: &SegItem) -> Result<Converted> {
        let image_path = safe_join(&self.opts.src, &item.image)?;
        let mask_path = safe_join(&self.opts.src, &item.label)?;
        let arr = m3d_formats::npy::read_npy(&image_path)?;
        let ishape: [usize; 4] = match arr.shape.as_slice() {
            [1, h, w, d] => [1, *h, *w, *d],
            other => {
                return Err(PrepError::input(
                    &image_path,
                    format!("image must be 1 x H x W x D, found {other:?}"),
                ))
            }
        };
        let image = Volume::new(ishape, arr.to_f32())
            .map_err(|e| PrepError::input(&image_path, e.to_string()))?;
        // One class at a time: a full-resolution mask of 100+ classes is gigabytes dense.
        let (mshape, csr) = m3d_formats::sparse::open_mask_npz(&mask_path)?;
        let mshape: [usize; 4] = match mshape.as_slice() {
            [c, h, w, d] => [*c, *h, *w, *d],
            other => {
                return Err(PrepError::input(
                    &mask_path,
                    format!("mask shape must be (C, H, W, D), found {other:?}"),
                ))
            }
        };
        if mshape[1..] != ishape[1..] {
            return Err(PrepError::input(
                &mask_path,
                format!(
                    "mask spatial shape {:?} differs from the image's {:?} ({})",
                    &mshape[1..],
                    &ishape[1..],
                    image_path.display()
                ),
            ));
        }
        if mshape[0] != item.classes.len() {
            return Err(PrepError::input(
                &mask_path,
                format!(
                    "{} mask channels, but {}/{}.json names {} foreground labels",
                    mshape[0],
                    item.code,
                    item.code,
                    item.classes.len()
                ),
            ));
        }
        let (image, crop_box) = preprocess_image(image, &image_path)?;
        let spatial = image.spatial();
        let mut masks = Vec::with_capacity(mshape[0]);
        let mut samples = Vec::new();
        let source_shape = [1, mshape[1], mshape[2], mshape[3]];
        csr.for_each_dense_row(&mask_path, |c, row| -> Result<()> {
            let channel = Volume::new(source_shape, row.to_vec())
                .map_err(|e| PrepError::input(&mask_path, e.to_string()))?;
            let channel = preprocess_mask(channel, &crop_box, &mask_path)?;
            let class = &item.classes[c];
            let record = mask_record(c as u32, class.clone(), channel.data());
            let empty = record.voxels == 0;
            masks.push(record);
            if empty {
                return Ok(());
            }
            let channel = channel.data();
            let bbox = mask_box(channel, spatial);
            for task in [Task::Seg, Task::Rec, Task::Reg] {
                samples.push(SampleRecord {
                    sample_id: format!("seg/{}/{task}/{c}", item.volume_id),
                    dataset: "seg".to_string(),
                    task,
                    split: item.split.clone(),
                    volume_id: item.volume_id.clone(),
                    mask_index: Some(c as u32),
                    question: None,
                    answer: None,
                    answer_choice: None,
                    question_type: None,
                    class_name: Some(class.clone()),
                    bbox: if task == Task::Seg { None } else { bbox },
                    report: None,
                    source_row: Some(format!("{}/{}.json:{}", item.code, item.code, item.split)),
                });
            }
            Ok(())
        })?;
        let volume = volume_record(
            &item.volume_id,
            "seg",
            format!("{} + {}", item.image, item.label),
            &image,
            self.dtype(),
            masks,
        );
        Ok(Converted { volume, samples })
    }

    fn preprocessing(&self) -> serde_json::Value {
        serde_json::json!({
            "reference": "M3D Data/process/m3d_seg_data_prepare.py",
            "axes": "swapaxes(-1, -3): (C, H, W, D) -> (C, D, W, H)",
            "normalise": "min-max, max clipped at 1e-8",
            "crop_foreground": "image > 0, applied to image and mask",
            "resize": {"size": TARGET, "image": "trilinear", "mask": "nearest"},
            "masks": "channel i = labels[str(i+1)], bit-packed, empty channels kept with 0 voxels",
            "boxes": "[d1,h1,w1,d2,h2,w2] = min/max index / size, rounded to 3 decimals",
            "storage": {"dtype": self.dtype()},
        })
    }

    fn source(&self) -> serde_json::Value {
        serde_json::json!({"root": self.opts.src.display().to_string(), "datasets": self.jsons})
    }
}

impl SegSource {
    fn dtype(&self) -> ImageDtype {
        self.opts.dtype.unwrap_or(ImageDtype::F16)
    }
}
