//! `synth_truth.json`: what each written volume holds, in the voxel coordinates of the array a reader
//! builds from the files (Cap: the stacked kept slices (D, H, W); Seg and RefSeg: the NIfTI/npy (H, W, D)),
//! so later tests can check what a model learnt without re-deriving the phantom.

use std::path::Path;

use serde::Serialize;

use crate::anatomy::{Grid, Lesion, LesionKind, Location, Organ, Phantom, Tissue};
use crate::cap::{plan_cap, write_json, Plane, SliceFormat, Split};
use crate::error::SynthError;
use crate::refseg::plan_refseg;
use crate::seg::plan_seg;
use crate::text::TextStyle;
use crate::SynthConfig;

/// Name of the truth file at the dataset root.
pub const TRUTH_FILE: &str = "synth_truth.json";

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn r3v(v: [f64; 3]) -> [f64; 3] {
    v.map(r3)
}

/// An organ in voxel coordinates: centre as (fractional) array indices, semi-axes in voxels per array axis.
#[derive(Debug, Serialize)]
pub struct OrganTruth {
    pub name: &'static str,
    pub centre_vox: [f64; 3],
    pub radii_vox: [f64; 3],
    /// Number of voxels labelled with this organ (after painting order).
    pub voxels: usize,
}

/// A lesion in voxel coordinates.
#[derive(Debug, Serialize)]
pub struct LesionTruth {
    pub organ: &'static str,
    pub kind: LesionKind,
    pub location: Location,
    pub diameter_cm: f64,
    pub centre_vox: [f64; 3],
    pub radius_vox: [f64; 3],
    pub voxels: usize,
}

fn organs_on(grid: &Grid, phantom: &Phantom, tissues: &[Tissue]) -> Vec<OrganTruth> {
    phantom
        .organs
        .iter()
        .map(|o| {
            let (c, r) = grid.to_voxels(o.shape.centre, o.shape.radii);
            OrganTruth {
                name: o.organ.name(),
                centre_vox: r3v(c),
                radii_vox: r3v(r),
                voxels: tissues
                    .iter()
                    .filter(|t| phantom.organ_of(**t) == Some(o.organ))
                    .count(),
            }
        })
        .collect()
}

fn lesion_on(grid: &Grid, phantom: &Phantom, tissues: &[Tissue], l: usize) -> LesionTruth {
    let lesion: &Lesion = &phantom.lesions[l];
    let (c, r) = grid.to_voxels(lesion.centre, [lesion.radius; 3]);
    LesionTruth {
        organ: lesion.organ.name(),
        kind: lesion.kind,
        location: lesion.location,
        diameter_cm: r3(lesion.diameter_cm()),
        centre_vox: r3v(c),
        radius_vox: r3v(r),
        voxels: tissues
            .iter()
            .filter(|t| **t == Tissue::Lesion(l as u8))
            .count(),
    }
}

#[derive(Serialize)]
struct CapTruth {
    image: String,
    text: String,
    series_dir: String,
    split: Split,
    hard_test: bool,
    plane: Plane,
    phase: crate::anatomy::Phase,
    format: SliceFormat,
    rgb: bool,
    /// (D, H, W) of the stacked kept slices.
    shape: [usize; 3],
    /// Kept slice files in numeric order.
    slice_files: Vec<String>,
    stray_slice: Option<String>,
    text_style: TextStyle,
    caption: String,
    organs: Vec<OrganTruth>,
    absent_organs: Vec<&'static str>,
    lesion: Option<LesionTruth>,
}

#[derive(Serialize)]
struct SegTruth {
    code: String,
    case: String,
    image: String,
    label: String,
    test: bool,
    /// (H, W, D).
    shape: [usize; 3],
    labels: Vec<&'static str>,
    /// Channels (0-based) with no voxel.
    empty_channels: Vec<usize>,
    organs: Vec<OrganTruth>,
}

#[derive(Serialize)]
struct RegionTruth {
    id: u8,
    description: String,
    lesion: LesionTruth,
}

#[derive(Serialize)]
struct RefSegTruth {
    case: String,
    test: bool,
    /// (H, W, D).
    shape: [usize; 3],
    organs: Vec<OrganTruth>,
    regions: Vec<RegionTruth>,
}

#[derive(Serialize)]
struct Truth {
    seed: u64,
    body_frame: &'static str,
    cap: Vec<CapTruth>,
    seg: Vec<SegTruth>,
    refseg: Vec<RefSegTruth>,
}

fn absent(phantom: &Phantom) -> Vec<&'static str> {
    Organ::ALL
        .iter()
        .filter(|o| phantom.organ(**o).is_none())
        .map(|o| o.name())
        .collect()
}

/// Writes `synth_truth.json` under `dir` for the whole dataset of `cfg`.
pub fn write_truth(dir: &Path, cfg: &SynthConfig) -> Result<(), SynthError> {
    cfg.validate()?;
    let mut cap = Vec::new();
    for (case, series) in plan_cap(cfg).volumes() {
        let tissues = series.grid.tissues(&case.phantom);
        let ext = series.format.ext();
        cap.push(CapTruth {
            image: case.image_rel(series),
            text: case.text_rel(),
            series_dir: format!("{}/{}", case.rel_dir(), series.folder),
            split: series.split,
            hard_test: series.hard_test,
            plane: series.plane,
            phase: series.phase,
            format: series.format,
            rgb: series.rgb,
            shape: series.grid.shape(),
            slice_files: series
                .files()
                .into_iter()
                .filter(|(_, stray)| !stray)
                .map(|(n, _)| format!("{n}.{ext}"))
                .collect(),
            stray_slice: series.stray.map(|s| format!("{}.{ext}", s.number)),
            text_style: case.style,
            caption: case.caption.clone(),
            organs: organs_on(&series.grid, &case.phantom, &tissues),
            absent_organs: absent(&case.phantom),
            lesion: (!case.phantom.lesions.is_empty())
                .then(|| lesion_on(&series.grid, &case.phantom, &tissues, 0)),
        });
    }
    let mut seg = Vec::new();
    for ds in plan_seg(cfg) {
        for case in &ds.cases {
            let tissues = case.grid.tissues(&case.phantom);
            let organs = organs_on(&case.grid, &case.phantom, &tissues);
            let empty_channels = ds
                .labels
                .iter()
                .enumerate()
                .filter(|(_, l)| !organs.iter().any(|o| o.name == l.name() && o.voxels > 0))
                .map(|(i, _)| i)
                .collect();
            seg.push(SegTruth {
                code: ds.code.clone(),
                case: case.case.clone(),
                image: format!("{}/{}/image.npy", ds.code, case.case),
                label: format!("{}/{}/{}", ds.code, case.case, case.mask_file()),
                test: case.test,
                shape: case.grid.shape(),
                labels: ds.labels.iter().map(|l| l.name()).collect(),
                empty_channels,
                organs,
            });
        }
    }
    let mut refseg = Vec::new();
    for case in plan_refseg(cfg) {
        let tissues = case.grid.tissues(&case.phantom);
        let regions = case
            .regions
            .iter()
            .map(|r| {
                let l = case
                    .phantom
                    .lesions
                    .iter()
                    .position(|x| *x == r.lesion)
                    .unwrap_or(0);
                RegionTruth {
                    id: r.id,
                    description: r.description.clone(),
                    lesion: lesion_on(&case.grid, &case.phantom, &tissues, l),
                }
            })
            .collect();
        refseg.push(RefSegTruth {
            case: case.case.clone(),
            test: case.test,
            shape: case.grid.shape(),
            organs: organs_on(&case.grid, &case.phantom, &tissues),
            regions,
        });
    }
    let truth = Truth {
        seed: cfg.seed,
        body_frame: "x: patient right (-1) to left (+1); y: anterior (-1) to posterior (+1); z: superior (-1) to inferior (+1); 1 unit = 200 mm. Voxel coordinates are array indices of the arrays as written (Cap: stacked kept slices (D, H, W); Seg/RefSeg: (H, W, D)).",
        cap,
        seg,
        refseg,
    };
    write_json(&dir.join(TRUTH_FILE), &truth)
}
