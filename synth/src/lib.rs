//! Synthetic M3D-Data in the published raw layouts.
//!
//! [`write_all`] writes a small dataset with the exact file names, JSON keys and CSV columns of M3D-Cap,
//! M3D-VQA, M3D-Seg and M3D-RefSeg, plus `synth_truth.json`. Content is learnable and self-consistent: every
//! volume is sampled from one phantom body (organs as ellipsoids, lesions as spheres; see [`anatomy`]), and
//! report text, VQA answers, masks and referring descriptions are derived from that same phantom.
//!
//! **Invariant: the output is a pure function of [`SynthConfig`]** — the same config gives byte-identical
//! files. Each dataset part draws from its own random stream ([`rng`]), and the plans (`plan_cap`,
//! `plan_seg`, `plan_refseg`) are computed without touching the disk, so `write_vqa` alone agrees with
//! `write_cap` alone.

pub mod anatomy;
pub mod cap;
mod error;
pub mod refseg;
pub mod rng;
pub mod seg;
pub mod text;
pub mod truth;
pub mod vqa;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use cap::{plan_cap, CapPlan};
pub use error::SynthError;
pub use refseg::{plan_refseg, RefSegCase};
pub use seg::{plan_seg, SegDataset};
pub use truth::{write_truth, TRUTH_FILE};

/// What to generate. The defaults make a ~17 MB dataset that writes in a few seconds and still exercises every
/// layout quirk (diacritic series names, stray slices, JPEG/RGB slices, all three text-rule branches, an
/// empty Seg channel). Deserialising fills missing fields from the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    pub seed: u64,
    /// Cap cases (id folders); each holds 1-2 series.
    pub cap_cases: usize,
    /// Seg datasets, coded `0000`.. with the official names (at most 25).
    pub seg_datasets: usize,
    /// Cases per Seg dataset.
    pub seg_cases: usize,
    pub refseg_cases: usize,
    /// (H, W) of Cap slices.
    pub slice_size: (usize, usize),
    /// (min, max) slices per Cap series.
    pub slices: (usize, usize),
    /// [H, W, D] of Seg and RefSeg volumes.
    pub seg_size: [usize; 3],
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            seed: 0,
            cap_cases: 16,
            seg_datasets: 2,
            seg_cases: 5,
            refseg_cases: 4,
            slice_size: (96, 96),
            slices: (24, 40),
            seg_size: [80, 80, 40],
        }
    }
}

impl SynthConfig {
    /// Rejects configs whose output would break a promised property (numeric vs lexical slice order,
    /// visible organs, the 25 official dataset codes).
    pub fn validate(&self) -> Result<(), SynthError> {
        if self.slices.0 < 10 {
            return Err(SynthError::config(
                "slices",
                format!(
                    "at least 10 slices per series are needed so lexical and numeric order differ, got min {}",
                    self.slices.0
                ),
            ));
        }
        if self.slices.0 > self.slices.1 {
            return Err(SynthError::config(
                "slices",
                format!("min {} exceeds max {}", self.slices.0, self.slices.1),
            ));
        }
        if self.slice_size.0 < 32 || self.slice_size.1 < 32 {
            return Err(SynthError::config(
                "slice_size",
                format!(
                    "slices must be at least 32 x 32 for organs to be resolved, got {:?}",
                    self.slice_size
                ),
            ));
        }
        if self.seg_size.iter().any(|&s| s < 16) {
            return Err(SynthError::config(
                "seg_size",
                format!("each axis must be at least 16, got {:?}", self.seg_size),
            ));
        }
        if self.seg_datasets > seg::SEG_DATASET_NAMES.len() {
            return Err(SynthError::config(
                "seg_datasets",
                format!(
                    "M3D-Seg has {} datasets, got {}",
                    seg::SEG_DATASET_NAMES.len(),
                    self.seg_datasets
                ),
            ));
        }
        Ok(())
    }
}

/// Counts of what was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct SynthSummary {
    pub seed: u64,
    pub cap_cases: usize,
    /// Cap series (one `.npy` each once prepared).
    pub cap_volumes: usize,
    /// Rows per VQA CSV file name.
    pub vqa_rows: BTreeMap<String, usize>,
    pub seg_datasets: usize,
    /// Seg cases over all datasets.
    pub seg_cases: usize,
    pub refseg_cases: usize,
    /// RefSeg CSV rows (train + test).
    pub refseg_rows: usize,
}

/// Writes `M3D_Cap/` under `dir`; returns the plan written.
pub fn write_cap(dir: &Path, cfg: &SynthConfig) -> Result<CapPlan, SynthError> {
    cap::write_cap_plan(dir, cfg)
}

/// Writes `M3D_VQA/` under `dir`; returns rows per CSV file name.
pub fn write_vqa(dir: &Path, cfg: &SynthConfig) -> Result<BTreeMap<String, usize>, SynthError> {
    vqa::write_vqa_files(dir, cfg)
}

/// Writes `M3D_Seg/` under `dir`; returns the datasets written.
pub fn write_seg(dir: &Path, cfg: &SynthConfig) -> Result<Vec<SegDataset>, SynthError> {
    seg::write_seg_plan(dir, cfg)
}

/// Writes `M3D_RefSeg/` under `dir`; returns the cases written and the number of CSV rows.
pub fn write_refseg(dir: &Path, cfg: &SynthConfig) -> Result<(Vec<RefSegCase>, usize), SynthError> {
    refseg::write_refseg_plan(dir, cfg)
}

/// Writes all four datasets and `synth_truth.json` under `dir`.
pub fn write_all(dir: &Path, cfg: &SynthConfig) -> Result<SynthSummary, SynthError> {
    cfg.validate()?;
    cap::create_dir(dir)?;
    let plan = write_cap(dir, cfg)?;
    let vqa_rows = write_vqa(dir, cfg)?;
    let seg = write_seg(dir, cfg)?;
    let (refseg, refseg_rows) = write_refseg(dir, cfg)?;
    write_truth(dir, cfg)?;
    Ok(SynthSummary {
        seed: cfg.seed,
        cap_cases: plan.cases.len(),
        cap_volumes: plan.volumes().count(),
        vqa_rows,
        seg_datasets: seg.len(),
        seg_cases: seg.iter().map(|d| d.cases.len()).sum(),
        refseg_cases: refseg.len(),
        refseg_rows,
    })
}
