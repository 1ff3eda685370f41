//! M3D-Seg in its published layout: per dataset `<code>/<code>.json`, per case `image.npy` (1, H, W, D)
//! normalised the way the published files are, the one-hot labels as a scipy CSR `.npz` whose shape lives
//! only in its file name, and the NIfTI sources (`source/image.nii.gz`, `source/label.nii.gz`).
//! Array axes are (H, W, D) = body (x, y, z), the order nibabel returns for an axial CT.

use std::path::Path;

use m3d_formats::nifti::{write_nifti, NiftiDtype};
use m3d_formats::npy::{write_npy, NpyArray};
use m3d_formats::sparse::{write_csr_npz, CsrMatrix};
use rand::seq::SliceRandom;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::anatomy::{AxisMap, Grid, Organ, Phantom, PhantomSpec, Phase, Tissue, MM_PER_UNIT};
use crate::cap::{create_dir, write_json, NOISE_HU};
use crate::error::SynthError;
use crate::rng::{noise, stream, uniform, Stream, SynthRng};
use crate::SynthConfig;

pub use m3d_formats::tables::SEG_DATASET_NAMES;

/// Label lists by dataset index modulo 4. Their orders differ from the painting order on purpose, so a
/// reader that confuses channel order with anything but label ids is caught.
fn labels_for(dataset: usize) -> Vec<Organ> {
    match dataset % 4 {
        0 => vec![
            Organ::Liver,
            Organ::RightKidney,
            Organ::LeftKidney,
            Organ::Spleen,
        ],
        1 => vec![
            Organ::Liver,
            Organ::Spleen,
            Organ::Pancreas,
            Organ::Aorta,
            Organ::Gallbladder,
            Organ::Bladder,
        ],
        2 => vec![
            Organ::Spleen,
            Organ::RightKidney,
            Organ::Liver,
            Organ::Pancreas,
            Organ::Aorta,
            Organ::Gallbladder,
            Organ::LeftKidney,
        ],
        _ => vec![Organ::LeftKidney, Organ::RightKidney],
    }
}

/// One Seg case.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SegCase {
    pub code: String,
    pub case: String,
    /// Axes (H, W, D) = body (x, y, z).
    pub grid: Grid,
    pub phantom: Phantom,
    /// Label `i + 1` is `labels[i]`.
    pub labels: Vec<Organ>,
    pub test: bool,
    /// Voxel size in mm, as written into the NIfTI header.
    pub pixdim: [f32; 3],
}

impl SegCase {
    /// `mask_(C, H, W, D).npz`, spelled as Python prints the shape tuple.
    pub fn mask_file(&self) -> String {
        let [h, w, d] = self.grid.shape();
        format!("mask_({}, {h}, {w}, {d}).npz", self.labels.len())
    }
}

/// One Seg dataset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SegDataset {
    pub code: String,
    pub name: String,
    pub labels: Vec<Organ>,
    pub cases: Vec<SegCase>,
}

/// A body-frame grid of `size` = [H, W, D] over the torso, with a random axial coverage.
pub(crate) fn volume_grid(rng: &mut SynthRng, size: [usize; 3]) -> (Grid, [f32; 3]) {
    let z0 = uniform(rng, -0.95, -0.85);
    let z1 = uniform(rng, 0.85, 0.95);
    let grid = Grid {
        axes: [
            AxisMap::covering(0, -1.0, 1.0, size[0]),
            AxisMap::covering(1, -1.0, 1.0, size[1]),
            AxisMap::covering(2, z0, z1, size[2]),
        ],
    };
    let pixdim = [0, 1, 2].map(|a| (grid.axes[a].step * MM_PER_UNIT) as f32);
    (grid, pixdim)
}

/// The Seg datasets of `cfg`, without touching the disk.
pub fn plan_seg(cfg: &SynthConfig) -> Vec<SegDataset> {
    let mut out = Vec::with_capacity(cfg.seg_datasets);
    for (d, name) in SEG_DATASET_NAMES.iter().enumerate().take(cfg.seg_datasets) {
        let code = format!("{d:04}");
        let labels = labels_for(d);
        // Case 0 of every dataset lacks one labelled organ, so its mask has an empty channel.
        let missing = if labels.contains(&Organ::Gallbladder) {
            Organ::Gallbladder
        } else {
            Organ::LeftKidney
        };
        let mut cases = Vec::with_capacity(cfg.seg_cases);
        for c in 0..cfg.seg_cases {
            let mut rng = stream(cfg.seed, Stream::SegCase, (d * 100_000 + c + 1) as u64);
            let (grid, pixdim) = volume_grid(&mut rng, cfg.seg_size);
            let phantom = Phantom::sample(
                &mut rng,
                &PhantomSpec {
                    lesions: 0,
                    absent: if c == 0 { vec![missing] } else { Vec::new() },
                    random_cholecystectomy: false,
                    first_lesion: None,
                },
            );
            cases.push(SegCase {
                code: code.clone(),
                case: format!("case_{c:05}"),
                grid,
                phantom,
                labels: labels.clone(),
                test: false,
                pixdim,
            });
        }
        // The reference splits 8:2 at random.
        let n = cases.len();
        let n_test = if n >= 2 {
            ((n as f64 * 0.2).round() as usize).max(1)
        } else {
            0
        };
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut stream(cfg.seed, Stream::SegCase, (d * 100_000) as u64));
        for &i in order.iter().take(n_test) {
            cases[i].test = true;
        }
        out.push(SegDataset {
            code,
            name: name.to_string(),
            labels,
            cases,
        });
    }
    out
}

/// The normalisation of the published `image.npy`: statistics of the voxels above the volume mean, the
/// whole volume clipped to their 0.05 / 99.95 percentiles, then z-scored by their mean and std.
pub fn normalize_ct(values: &[f64]) -> Vec<f32> {
    if values.is_empty() {
        return Vec::new();
    }
    let mean_all = values.iter().sum::<f64>() / values.len() as f64;
    let mut fg: Vec<f64> = values.iter().copied().filter(|v| *v > mean_all).collect();
    if fg.is_empty() {
        // A constant volume: nothing lies above its mean; numpy would yield NaN, zeros are the useful answer.
        return vec![0.0; values.len()];
    }
    fg.sort_by(f64::total_cmp);
    let lo = percentile_sorted(&fg, 0.05);
    let hi = percentile_sorted(&fg, 99.95);
    let mean = fg.iter().sum::<f64>() / fg.len() as f64;
    let var = fg.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / fg.len() as f64;
    let std = var.sqrt().max(1e-8);
    values
        .iter()
        .map(|v| ((v.clamp(lo, hi) - mean) / std) as f32)
        .collect()
}

/// numpy's default ("linear") percentile of sorted data.
pub fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    if n == 1 {
        return sorted[0];
    }
    let pos = q / 100.0 * (n - 1) as f64;
    let i = (pos.floor() as usize).min(n - 2);
    let t = pos - i as f64;
    sorted[i] + (sorted[i + 1] - sorted[i]) * t
}

/// HU volume (rounded to int16 values) and label volume of a case, in C order over (H, W, D).
pub(crate) fn render(
    phantom: &Phantom,
    grid: &Grid,
    rng: &mut SynthRng,
    label_of: impl Fn(Tissue) -> u8,
) -> (Vec<f64>, Vec<u8>) {
    let tissues = grid.tissues(phantom);
    let mut hu = Vec::with_capacity(tissues.len());
    let mut labels = Vec::with_capacity(tissues.len());
    for t in tissues {
        let v = match t {
            Tissue::Air => phantom.hu(t, Phase::PortalVenous),
            t => phantom.hu(t, Phase::PortalVenous) + noise(rng, NOISE_HU),
        };
        hu.push(v.round().clamp(-1024.0, 3071.0));
        labels.push(label_of(t));
    }
    (hu, labels)
}

struct Ordered<'a>(&'a [(String, String)]);

impl Serialize for Ordered<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct SegPair {
    image: String,
    label: String,
}

#[derive(Serialize)]
struct SegJson<'a> {
    name: String,
    description: String,
    #[serde(rename = "tensorImageSize")]
    tensor_image_size: &'static str,
    modality: Ordered<'a>,
    labels: Ordered<'a>,
    #[serde(rename = "numTrain")]
    num_train: usize,
    #[serde(rename = "numTest")]
    num_test: usize,
    train: Vec<SegPair>,
    test: Vec<SegPair>,
}

fn write_case(root: &Path, case: &SegCase, seed: u64, index: u64) -> Result<(), SynthError> {
    let dir = root.join(&case.code).join(&case.case);
    let source = dir.join("source");
    create_dir(&source)?;
    let mut rng = stream(seed, Stream::SegNoise, index);
    let (hu, labels) = render(&case.phantom, &case.grid, &mut rng, |t| {
        case.phantom
            .organ_of(t)
            .and_then(|o| case.labels.iter().position(|l| *l == o))
            .map_or(0, |i| i as u8 + 1)
    });
    let shape = case.grid.shape();
    let hu32: Vec<f32> = hu.iter().map(|v| *v as f32).collect();
    write_nifti(
        &source.join("image.nii.gz"),
        &shape,
        &hu32,
        NiftiDtype::I16,
        case.pixdim,
    )?;
    let lab32: Vec<f32> = labels.iter().map(|v| f32::from(*v)).collect();
    write_nifti(
        &source.join("label.nii.gz"),
        &shape,
        &lab32,
        NiftiDtype::U8,
        case.pixdim,
    )?;
    let image = normalize_ct(&hu);
    write_npy(
        &dir.join("image.npy"),
        &NpyArray::f32(vec![1, shape[0], shape[1], shape[2]], image),
    )?;
    let c = case.labels.len();
    let n = labels.len();
    let mut onehot = vec![0u8; c * n];
    for (v, &l) in labels.iter().enumerate() {
        if l > 0 {
            onehot[(l as usize - 1) * n + v] = 1;
        }
    }
    let csr = CsrMatrix::from_dense_u8(c, n, &onehot);
    write_csr_npz(&dir.join(case.mask_file()), &csr)?;
    Ok(())
}

/// Writes `M3D_Seg/` under `dir`; returns the datasets written.
pub fn write_seg_plan(dir: &Path, cfg: &SynthConfig) -> Result<Vec<SegDataset>, SynthError> {
    cfg.validate()?;
    let plan = plan_seg(cfg);
    let root = dir.join("M3D_Seg");
    create_dir(&root)?;
    let mut index = 0u64;
    for ds in &plan {
        create_dir(&root.join(&ds.code))?;
        let mut train = Vec::new();
        let mut test = Vec::new();
        for case in &ds.cases {
            write_case(&root, case, cfg.seed, index)?;
            index += 1;
            let pair = SegPair {
                image: format!("{}/{}/image.npy", ds.code, case.case),
                label: format!("{}/{}/{}", ds.code, case.case, case.mask_file()),
            };
            if case.test {
                test.push(pair);
            } else {
                train.push(pair);
            }
        }
        let modality = [("0".to_string(), "CT".to_string())];
        let mut labels = vec![("0".to_string(), "background".to_string())];
        labels.extend(
            ds.labels
                .iter()
                .enumerate()
                .map(|(i, o)| ((i + 1).to_string(), o.name().to_string())),
        );
        let json = SegJson {
            name: ds.name.clone(),
            description: format!(
                "Synthetic stand-in for M3D-Seg {} ({}): abdominal CT phantoms.",
                ds.code, ds.name
            ),
            tensor_image_size: "4D",
            modality: Ordered(&modality),
            labels: Ordered(&labels),
            num_train: train.len(),
            num_test: test.len(),
            train,
            test,
        };
        write_json(
            &root.join(&ds.code).join(format!("{}.json", ds.code)),
            &json,
        )?;
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_matches_numpy_definition() {
        // numpy.percentile([1, 2, 3, 4], 25) == 1.75; of [10, 20], 99.95 == 19.995.
        assert!((percentile_sorted(&[1.0, 2.0, 3.0, 4.0], 25.0) - 1.75).abs() < 1e-12);
        assert!((percentile_sorted(&[10.0, 20.0], 99.95) - 19.995).abs() < 1e-9);
        assert_eq!(percentile_sorted(&[10.0, 20.0], 100.0), 20.0);
    }

    #[test]
    fn normalisation_uses_voxels_above_the_mean() {
        // Mean 2.5; above it: [3, 4] -> mean 3.5, std 0.5; clip to [3.0005, 3.9995].
        let out = normalize_ct(&[1.0, 2.0, 3.0, 4.0]);
        let expect = |v: f64| ((v.clamp(3.0005, 3.9995) - 3.5) / 0.5) as f32;
        for (o, v) in out.iter().zip([1.0, 2.0, 3.0, 4.0]) {
            assert!((o - expect(v)).abs() < 1e-5, "{o} vs {}", expect(v));
        }
    }
}
