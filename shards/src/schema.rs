//! The in-memory records of the shard format: one [`VolumeRecord`] per stored volume (with its masks) and
//! one [`SampleRecord`] per training sample, which references a volume by id instead of copying it.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::encode::ImageDtype;
use crate::ShardError;

/// One binary mask of a volume (a segmentation class or a referring-expression region).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskRecord {
    /// Class / region index in the source label map (e.g. the M3D-Seg label id or the RefSeg `Mask_ID`).
    pub class_index: u32,
    /// Human-readable class name.
    pub label: String,
    /// Number of voxels set.
    pub voxels: u64,
    /// [`crate::encode::pack_mask`] output over the volume's spatial shape `shape[1..]`; empty when `voxels == 0`.
    pub bits: Vec<u8>,
}

impl fmt::Debug for MaskRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MaskRecord")
            .field("class_index", &self.class_index)
            .field("label", &self.label)
            .field("voxels", &self.voxels)
            .field("bits", &format_args!("[{} bytes]", self.bits.len()))
            .finish()
    }
}

/// One stored volume.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Unique id within the dataset, e.g. `ct_case/000006/Axial_non_contrast` or `0011/case_00012`.
    pub volume_id: String,
    /// `"cap"`, `"seg"` or `"refseg"`.
    pub dataset: String,
    /// Provenance: source path(s) relative to the source root.
    pub source: String,
    /// (C, D, H, W), normally 1 x 32 x 256 x 256.
    pub shape: [u32; 4],
    pub dtype: ImageDtype,
    /// [`crate::encode::encode_image`] output; empty when a reader was asked not to read images. `Bytes` so that a
    /// reader hands out the decompressed page without copying it, and a cached record clones cheaply.
    pub image: Bytes,
    /// crc32 (IEEE) of `image`, verified when the image is read.
    pub image_crc32: u32,
    /// Masks over the spatial shape `shape[1..]`.
    pub masks: Vec<MaskRecord>,
}

impl VolumeRecord {
    /// Number of voxels, `prod(shape)`.
    pub fn numel(&self) -> usize {
        self.shape.iter().map(|&s| s as usize).product()
    }

    /// Number of spatial voxels, `prod(shape[1..])` (the size of one mask).
    pub fn spatial_numel(&self) -> usize {
        self.shape[1..].iter().map(|&s| s as usize).product()
    }

    /// `shape` as `usize`.
    pub fn shape_usize(&self) -> [usize; 4] {
        self.shape.map(|s| s as usize)
    }

    /// crc32 of `bytes`, as stored in `image_crc32`.
    pub fn crc32(bytes: &[u8]) -> u32 {
        crc32fast::hash(bytes)
    }
}

impl fmt::Debug for VolumeRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeRecord")
            .field("volume_id", &self.volume_id)
            .field("dataset", &self.dataset)
            .field("source", &self.source)
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .field("image", &format_args!("[{} bytes]", self.image.len()))
            .field("image_crc32", &format_args!("{:08x}", self.image_crc32))
            .field("masks", &self.masks)
            .finish()
    }
}

/// The training task of a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Task {
    #[serde(rename = "caption")]
    Caption,
    #[serde(rename = "vqa_closed")]
    VqaClosed,
    #[serde(rename = "vqa_open")]
    VqaOpen,
    #[serde(rename = "vqa_yes_no")]
    VqaYesNo,
    #[serde(rename = "rec")]
    Rec,
    #[serde(rename = "reg")]
    Reg,
    #[serde(rename = "seg")]
    Seg,
    #[serde(rename = "refseg")]
    RefSeg,
}

impl Task {
    /// Every task, in declaration order.
    pub const ALL: [Task; 8] = [
        Task::Caption,
        Task::VqaClosed,
        Task::VqaOpen,
        Task::VqaYesNo,
        Task::Rec,
        Task::Reg,
        Task::Seg,
        Task::RefSeg,
    ];

    /// Whether a recipe's task name (`data.tasks[].task`: `cap`, `vqa`, `seg`, `refseg`) trains on samples of
    /// this stored task: `vqa` takes the three VQA kinds, `seg` the segmentation, REC and REG samples.
    pub fn in_recipe_task(self, name: &str) -> bool {
        match name {
            "cap" => self == Task::Caption,
            "vqa" => matches!(self, Task::VqaClosed | Task::VqaOpen | Task::VqaYesNo),
            "seg" => matches!(self, Task::Seg | Task::Rec | Task::Reg),
            "refseg" => self == Task::RefSeg,
            _ => false,
        }
    }

    /// The stored tasks a recipe task (`data.tasks[].task`) trains on: every one [`Task::in_recipe_task`]
    /// admits, or, when `kinds` (`data.tasks[].kinds`) names some, those alone. A kind that is not a stored
    /// task of the recipe task is an error naming the kinds it has.
    pub fn selection(recipe_task: &str, kinds: &[String]) -> Result<Vec<Task>, String> {
        let all: Vec<Task> = Task::ALL
            .into_iter()
            .filter(|t| t.in_recipe_task(recipe_task))
            .collect();
        if kinds.is_empty() {
            return Ok(all);
        }
        kinds
            .iter()
            .map(|k| {
                all.iter()
                    .copied()
                    .find(|t| t.as_str() == k)
                    .ok_or_else(|| {
                        let names: Vec<&str> = all.iter().map(|t| t.as_str()).collect();
                        format!(
                            "`{k}` is not a kind of task `{recipe_task}` ({})",
                            names.join(", ")
                        )
                    })
            })
            .collect()
    }

    /// The stored name (`"caption"`, `"vqa_closed"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Caption => "caption",
            Task::VqaClosed => "vqa_closed",
            Task::VqaOpen => "vqa_open",
            Task::VqaYesNo => "vqa_yes_no",
            Task::Rec => "rec",
            Task::Reg => "reg",
            Task::Seg => "seg",
            Task::RefSeg => "refseg",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Task {
    type Err = ShardError;
    fn from_str(s: &str) -> Result<Self, ShardError> {
        Task::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| ShardError::Invalid(format!("unknown task `{s}`")))
    }
}

/// One training sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    pub sample_id: String,
    pub dataset: String,
    pub task: Task,
    /// `"train"`, `"validation"`, `"test"`, ...
    pub split: String,
    pub volume_id: String,
    /// Index into that volume's `masks`.
    pub mask_index: Option<u32>,
    /// Materialised prompt (VQA, RefSeg); `None` = derived at load time from templates.
    pub question: Option<String>,
    pub answer: Option<String>,
    pub answer_choice: Option<String>,
    pub question_type: Option<String>,
    /// Seg / REC / REG target class.
    pub class_name: Option<String>,
    /// `[d1, h1, w1, d2, h2, w2]` as fractions of the axis sizes, rounded to 3 decimals.
    pub bbox: Option<[f32; 6]>,
    /// Caption text.
    pub report: Option<String>,
    /// Provenance, e.g. `M3D_VQA_train.csv:1234`.
    pub source_row: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_match_the_format() {
        let names = [
            "caption",
            "vqa_closed",
            "vqa_open",
            "vqa_yes_no",
            "rec",
            "reg",
            "seg",
            "refseg",
        ];
        for (t, name) in Task::ALL.into_iter().zip(names) {
            assert_eq!(t.to_string(), name);
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{name}\""));
            assert_eq!(
                serde_json::from_str::<Task>(&format!("\"{name}\"")).unwrap(),
                t
            );
            assert_eq!(name.parse::<Task>().unwrap(), t);
        }
        assert!("ref_seg".parse::<Task>().is_err());
    }

    #[test]
    fn debug_summarises_payloads() {
        let v = VolumeRecord {
            volume_id: "a".into(),
            dataset: "seg".into(),
            source: "s".into(),
            shape: [1, 1, 1, 3],
            dtype: ImageDtype::U8,
            image: vec![7, 8, 9].into(),
            image_crc32: 0xdead_beef,
            masks: vec![MaskRecord {
                class_index: 1,
                label: "x".into(),
                voxels: 1,
                bits: vec![1],
            }],
        };
        let d = format!("{v:?}");
        assert!(
            d.contains("[3 bytes]") && d.contains("deadbeef") && !d.contains("7, 8, 9"),
            "{d}"
        );
        assert_eq!(v.numel(), 3);
        assert_eq!(v.spatial_numel(), 3);
    }
}
