//! One image in, one model input out, and a predicted mask back onto that image: what `m3d generate --image`
//! needs, without torch.
//!
//! This module owns the mapping between *one* user-supplied image and the model's input space, in both
//! directions:
//! - [`ImageSource::parse`] reads the `--image` argument (a `.npy`, a `.nii`/`.nii.gz`, or `<dataset>#<volume id>`);
//! - [`prepare`] turns it into the `(1, D, H, W)` volume the model takes, through **the same code as
//!   `m3d data-prep`** ([`crate::seg::preprocess_image`]: swap axes, min-max, CropForeground, trilinear resize),
//!   and records in a [`Geometry`] what that did;
//! - [`mask_to_input`] inverts the geometric part (nearest resize back to the crop, paste into the original
//!   extent, swap the axes back), [`write_mask_nifti`] writes the result over the input's voxel grid and world
//!   space, and [`write_overlay_png`] draws a quick-look montage in model space.
//!
//! Axis convention (that of M3D-Seg, whose `image.npy` files are MONAI's channel-first `(1, X, Y, Z)` loads of
//! NIfTI): a NIfTI `(X, Y, Z)` is read as the array `(1, X, Y, Z)`, exactly as a raw M3D-Seg `.npy`
//! `(1, H, W, D)` is, and the preprocessing's `swapaxes(-1, -3)` makes it `(1, Z, Y, X)`. The voxel order is
//! taken as stored: like the reference, nothing is reoriented to a canonical orientation from the affine.

use std::path::{Path, PathBuf};

use m3d_formats::nifti::{read_nifti, write_nifti_in, NiftiDtype, NiftiSpace};
use m3d_formats::npy::{read_npy, NpyArray, NpyData};
use m3d_formats::FormatError;
use m3d_shards::{ShardDataset, ShardError, VolumeReader};
use m3d_volume::transforms::{permute_spatial, try_resize_nearest, BBox};
use m3d_volume::{Volume, VolumeError};

use crate::cap::TARGET;
use crate::error::PrepError;
use crate::seg::preprocess_image;

/// `np.swapaxes(x, -1, -3)` on the spatial axes, as [`preprocess_image`] applies it; its own inverse.
const SWAP: [usize; 3] = [2, 1, 0];

/// The accepted forms of an image argument, for error messages.
const ACCEPTED: &str = "a path ending in .npy, .nii or .nii.gz, or <dataset url>#<volume id>";

/// Errors of the single-image path. Each names the input (file, or `dataset#volume`) or output file it is about.
#[derive(Debug, thiserror::Error)]
pub enum SingleError {
    /// The `--image` argument is none of the accepted forms.
    #[error("image argument `{arg}` not understood: expected {ACCEPTED}")]
    Argument { arg: String },
    /// Reading or writing a `.npy` / NIfTI failed (the message names the file).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The preprocessing refused the image (e.g. a constant image: nothing is foreground).
    #[error(transparent)]
    Prep(#[from] PrepError),
    /// Opening or reading the shard dataset failed.
    #[error("dataset `{dataset}`: {source}")]
    Dataset {
        dataset: String,
        #[source]
        source: ShardError,
    },
    /// The dataset has no volume of that id.
    #[error("dataset `{dataset}` has no volume `{volume_id}` ({volumes} volumes in its index)")]
    UnknownVolume {
        dataset: String,
        volume_id: String,
        volumes: usize,
    },
    /// The array does not have a rank/layout we can read as one 3-D volume.
    #[error("{input}: expected {expected}, found shape {shape:?}")]
    Rank {
        input: String,
        shape: Vec<usize>,
        expected: &'static str,
    },
    /// A `.npy` whose elements are not numbers.
    #[error("{input}: dtype {dtype} is not numeric")]
    Dtype { input: String, dtype: &'static str },
    /// NaN or infinite intensities: min-max normalisation would turn the whole volume into NaN.
    #[error("{input}: {count} non-finite value(s), the first at flat index {first}")]
    NonFinite {
        input: String,
        count: usize,
        first: usize,
    },
    /// A stored (already preprocessed) volume whose shape is not the model's input.
    #[error("{input}: volume of shape {shape:?} is not the model input (1, {}, {}, {})", target[0], target[1], target[2])]
    NotModelShaped {
        input: String,
        shape: [usize; 4],
        target: [usize; 3],
    },
    /// The data-prep preprocessing produces only its own output size.
    #[error(
        "{input}: the M3D-Seg preprocessing produces {supported:?}, but the model takes {target:?}; \
         pass an already preprocessed .npy of the model's shape instead"
    )]
    UnsupportedTarget {
        input: String,
        target: [usize; 3],
        supported: [usize; 3],
    },
    /// A mask or image handed to the inverse mapping or the writers has the wrong shape.
    #[error("{what}: expected shape {expected:?}, found {found:?}")]
    Shape {
        what: &'static str,
        expected: [usize; 4],
        found: [usize; 4],
    },
    #[error("{}: cannot write PNG: {reason}", path.display())]
    Png { path: PathBuf, reason: String },
    /// A volume does not fit its geometry (a resize or paste of the inverse mapping with inconsistent shapes).
    #[error("volume geometry: {0}")]
    Volume(#[from] VolumeError),
}

type Result<T, E = SingleError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// The argument

/// Where the image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A `.npy`: an already preprocessed model-shaped float array, or a raw array to preprocess.
    Npy(PathBuf),
    /// A `.nii` / `.nii.gz` to preprocess.
    Nifti(PathBuf),
    /// A volume of a converted shard dataset (already preprocessed by `m3d data-prep`).
    Volume { dataset: String, volume_id: String },
}

impl ImageSource {
    /// Reads an `--image` argument: a path ending in `.npy`, `.nii` or `.nii.gz` (any case), or
    /// `<dataset url>#<volume id>` split at the first `#`. A file path containing `#` is taken as a path when that
    /// file exists (a `#` in a file name is legal), otherwise as a dataset reference. No file is opened here.
    pub fn parse(arg: &str) -> Result<ImageSource> {
        let lower = arg.to_ascii_lowercase();
        let file = if lower.ends_with(".npy") {
            Some(ImageSource::Npy(PathBuf::from(arg)))
        } else if lower.ends_with(".nii") || lower.ends_with(".nii.gz") {
            Some(ImageSource::Nifti(PathBuf::from(arg)))
        } else {
            None
        };
        if let Some(file) = file {
            if !arg.contains('#') || Path::new(arg).is_file() {
                return Ok(file);
            }
        }
        match arg.split_once('#') {
            Some((dataset, id)) if !dataset.is_empty() && !id.is_empty() => {
                Ok(ImageSource::Volume {
                    dataset: dataset.to_string(),
                    volume_id: id.to_string(),
                })
            }
            _ => Err(SingleError::Argument {
                arg: arg.to_string(),
            }),
        }
    }

    /// The name used in messages: the path, or `dataset#volume id`.
    pub fn name(&self) -> String {
        match self {
            ImageSource::Npy(p) | ImageSource::Nifti(p) => p.display().to_string(),
            ImageSource::Volume { dataset, volume_id } => format!("{dataset}#{volume_id}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Geometry

/// Which kind of input a [`Geometry`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Npy,
    Nifti,
    Volume,
}

/// What the M3D-Seg preprocessing did to the voxel grid, in the axis order *after* its swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegCrop {
    /// Spatial shape after `swapaxes(-1, -3)`: the input's `(X, Y, Z)` as `(Z, Y, X)`.
    pub swapped_shape: [usize; 3],
    /// The CropForeground box within `swapped_shape`, which was resized to the model shape.
    pub bbox: BBox,
}

/// How a prepared volume relates to its input: enough to map a model-space mask back ([`mask_to_input`]) and
/// to write it where the input lies ([`write_mask_nifti`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Geometry {
    pub kind: SourceKind,
    /// The input's name ([`ImageSource::name`]).
    pub input: String,
    /// The array's shape as read: the `.npy` shape, the NIfTI `dim` (`[X, Y, Z]` or `[X, Y, Z, 1]`), or the
    /// stored volume's `(1, D, H, W)`.
    pub input_shape: Vec<usize>,
    /// The three spatial axes of `input_shape`, in its order: the grid of [`mask_to_input`]'s output.
    pub input_spatial: [usize; 3],
    /// The model's `(D, H, W)`.
    pub model_shape: [usize; 3],
    /// `None` when the input was used as is (a model-shaped `.npy`, a stored volume).
    pub crop: Option<SegCrop>,
    /// The input's spatial header, for NIfTI inputs.
    pub nifti: Option<NiftiSpace>,
}

/// A model input and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedImage {
    /// `(1, D, H, W)`, as the model takes it.
    pub volume: Volume<f32>,
    pub geometry: Geometry,
}

// ---------------------------------------------------------------------------------------------
// Preparing

/// Builds the model input for `source`; `target` is the model's `(D, H, W)`, normally `(32, 256, 256)`.
///
/// - `.npy` of a float dtype (f16/f32/f64) of shape `(1, D, H, W)` or `(D, H, W)` equal to `target`: used as is
///   (what the reference's `demo.py` feeds the model). Any other `(1, H, W, D)` or `(H, W, D)` numeric array: the
///   M3D-Seg preprocessing, as `m3d data-prep` runs it.
/// - NIfTI `(X, Y, Z)` or `(X, Y, Z, 1)`: read as `(1, X, Y, Z)`, then the M3D-Seg preprocessing.
/// - `dataset#volume id`: the stored volume, which must have the model's shape.
///
/// The preprocessing produces [`TARGET`] only; another `target` with a raw input is an error.
pub fn prepare(source: &ImageSource, target: [usize; 3]) -> Result<PreparedImage> {
    match source {
        ImageSource::Npy(path) => prepare_npy(path, target),
        ImageSource::Nifti(path) => prepare_nifti(path, target),
        ImageSource::Volume { dataset, volume_id } => prepare_volume(dataset, volume_id, target),
    }
}

fn prepare_npy(path: &Path, target: [usize; 3]) -> Result<PreparedImage> {
    let input = path.display().to_string();
    let arr = read_npy(path)?;
    let spatial = match arr.shape.as_slice() {
        [1, a, b, c] | [a, b, c] => [*a, *b, *c],
        other => {
            return Err(SingleError::Rank {
                input,
                shape: other.to_vec(),
                expected: "a 3-D array or a 4-D array with one channel",
            })
        }
    };
    let is_float = match &arr.data {
        NpyData::F16(_) | NpyData::F32(_) | NpyData::F64(_) => true,
        NpyData::Str(_) => {
            return Err(SingleError::Dtype {
                input,
                dtype: arr.dtype_str(),
            })
        }
        _ => false,
    };
    let NpyArray { shape, data } = arr;
    // f32 (the usual case) moves as is: a full-size CT is hundreds of megabytes.
    let values = match data {
        NpyData::F32(v) => v,
        other => NpyArray {
            shape: shape.clone(),
            data: other,
        }
        .to_f32(),
    };
    check_finite(&input, &values)?;
    let volume = Volume::new([1, spatial[0], spatial[1], spatial[2]], values)?;
    let geometry = Geometry {
        kind: SourceKind::Npy,
        input,
        input_shape: shape,
        input_spatial: spatial,
        model_shape: target,
        crop: None,
        nifti: None,
    };
    // A float array already of the model's shape is what a preprocessing left; a raw scan of exactly that shape
    // cannot be told apart from it.
    if is_float && spatial == target {
        return Ok(PreparedImage { volume, geometry });
    }
    seg_preprocess(volume, path, geometry)
}

fn prepare_nifti(path: &Path, target: [usize; 3]) -> Result<PreparedImage> {
    let input = path.display().to_string();
    let nii = read_nifti(path)?;
    // The shapes `refseg` accepts: a 3-D volume, or 4-D with a single time point.
    let spatial = match nii.shape.as_slice() {
        [x, y, z] | [x, y, z, 1] => [*x, *y, *z],
        other => {
            return Err(SingleError::Rank {
                input,
                shape: other.to_vec(),
                expected: "a 3-D NIfTI volume (or 4-D with one time point)",
            })
        }
    };
    check_finite(&input, &nii.data)?;
    let volume = Volume::new([1, spatial[0], spatial[1], spatial[2]], nii.data)?;
    let geometry = Geometry {
        kind: SourceKind::Nifti,
        input,
        input_shape: nii.shape,
        input_spatial: spatial,
        model_shape: target,
        crop: None,
        nifti: Some(nii.space),
    };
    seg_preprocess(volume, path, geometry)
}

/// Runs data-prep's own M3D-Seg image chain on `(1, H, W, D)` and records its crop in `geometry`.
fn seg_preprocess(
    volume: Volume<f32>,
    path: &Path,
    mut geometry: Geometry,
) -> Result<PreparedImage> {
    if geometry.model_shape != TARGET {
        return Err(SingleError::UnsupportedTarget {
            input: geometry.input,
            target: geometry.model_shape,
            supported: TARGET,
        });
    }
    let spatial = volume.spatial();
    let (volume, bbox) = preprocess_image(volume, path)?;
    geometry.crop = Some(SegCrop {
        swapped_shape: SWAP.map(|i| spatial[i]),
        bbox,
    });
    Ok(PreparedImage { volume, geometry })
}

fn prepare_volume(dataset: &str, volume_id: &str, target: [usize; 3]) -> Result<PreparedImage> {
    let input = format!("{dataset}#{volume_id}");
    let shard_err = |source| SingleError::Dataset {
        dataset: dataset.to_string(),
        source,
    };
    // Only the volume is needed: the sample table (possibly millions of rows) is not read.
    let ds = ShardDataset::open_for_volumes(dataset).map_err(shard_err)?;
    let reader = VolumeReader::open(&ds).map_err(shard_err)?;
    let index = reader
        .locate(volume_id)
        .ok_or_else(|| SingleError::UnknownVolume {
            dataset: dataset.to_string(),
            volume_id: volume_id.to_string(),
            volumes: reader.len(),
        })?;
    let record = reader.read(index, true, false).map_err(shard_err)?;
    let shape = record.shape_usize();
    if shape != [1, target[0], target[1], target[2]] {
        return Err(SingleError::NotModelShaped {
            input,
            shape,
            target,
        });
    }
    let mut data = vec![0f32; record.numel()];
    // No augmentation: the volume exactly as stored, decoded as a training worker decodes it.
    m3d_shards::dataset::decode_sample_into(&record, None, None, &mut Vec::new(), &mut data, None)
        .map_err(shard_err)?;
    check_finite(&input, &data)?;
    Ok(PreparedImage {
        volume: Volume::new(shape, data)?,
        geometry: Geometry {
            kind: SourceKind::Volume,
            input,
            input_shape: shape.to_vec(),
            input_spatial: target,
            model_shape: target,
            crop: None,
            nifti: None,
        },
    })
}

fn check_finite(input: &str, values: &[f32]) -> Result<()> {
    let Some(first) = values.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    Err(SingleError::NonFinite {
        input: input.to_string(),
        count: values[first..].iter().filter(|v| !v.is_finite()).count(),
        first,
    })
}

// ---------------------------------------------------------------------------------------------
// Mapping back

/// Maps a model-space mask `(1, D, H, W)` (0/1; any values are carried as they are) onto the input's voxel grid:
/// nearest resize back to the crop box's size, pasted into zeros of the swapped full extent, axes swapped back.
/// The result is `(1, A, B, C)` with `(A, B, C)` = [`Geometry::input_spatial`]: for NIfTI the voxel `(x, y, z)`
/// of the file. Inputs used as is come back unchanged. Voxels outside the foreground crop are 0: the model never
/// saw them.
pub fn mask_to_input(mask: &Volume<u8>, geometry: &Geometry) -> Result<Volume<u8>> {
    let [d, h, w] = geometry.model_shape;
    expect_shape("model-space mask", mask.shape(), [1, d, h, w])?;
    let [a, b, c] = geometry.input_spatial;
    let Some(crop) = &geometry.crop else {
        return Ok(Volume::new([1, a, b, c], mask.data().to_vec())?);
    };
    // The same torch-style nearest gather the preprocessing used for the training masks, in reverse.
    let back = try_resize_nearest(mask, crop.bbox.size())?;
    let [sd, sh, sw] = crop.swapped_shape;
    let mut full = Volume::filled([1, sd, sh, sw], 0u8);
    paste(&mut full, &back, &crop.bbox)?;
    Ok(permute_spatial(&full, SWAP))
}

/// Copies `part` (one channel, the box's size) into `full` at `bbox`.
fn paste(full: &mut Volume<u8>, part: &Volume<u8>, bbox: &BBox) -> Result<()> {
    let spatial = full.spatial();
    if !bbox.fits(spatial) || part.spatial() != bbox.size() {
        return Err(VolumeError::BadBBox {
            start: bbox.start,
            end: bbox.end,
            spatial,
        }
        .into());
    }
    let [_, h, w] = spatial;
    let row_len = bbox.size()[2];
    if row_len == 0 {
        return Ok(());
    }
    let mut rows = part.data().chunks_exact(row_len);
    let data = full.data_mut();
    for di in bbox.start[0]..bbox.end[0] {
        for hi in bbox.start[1]..bbox.end[1] {
            let start = (di * h + hi) * w + bbox.start[2];
            if let Some(row) = rows.next() {
                data[start..start + row_len].copy_from_slice(row);
            }
        }
    }
    Ok(())
}

fn expect_shape(what: &'static str, found: [usize; 4], expected: [usize; 4]) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(SingleError::Shape {
            what,
            expected,
            found,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// NIfTI output

/// Writes a mask on the input grid ([`mask_to_input`]'s output) as a uint8 NIfTI (`.nii.gz` when `path` ends in
/// `.gz`). For a NIfTI input: the input's `dim`, `pixdim`, units, qform and sform, so it overlays the input in
/// a viewer. Otherwise: the array's three spatial axes as `(i, j, k)`, unit spacing, identity sform.
pub fn write_mask_nifti(
    mask_in_input: &Volume<u8>,
    geometry: &Geometry,
    path: &Path,
) -> Result<()> {
    let [a, b, c] = geometry.input_spatial;
    expect_shape(
        "mask on the input grid",
        mask_in_input.shape(),
        [1, a, b, c],
    )?;
    let shape = match geometry.kind {
        SourceKind::Nifti => geometry.input_shape.clone(),
        SourceKind::Npy | SourceKind::Volume => vec![a, b, c],
    };
    // `write_nifti` takes f32 values (it checks each is a valid u8): 0/1 convert exactly.
    let values: Vec<f32> = mask_in_input.data().iter().map(|&v| f32::from(v)).collect();
    let space = match &geometry.nifti {
        Some(space) => space.clone(),
        None => NiftiSpace::diagonal([1.0; 3]),
    };
    Ok(write_nifti_in(
        path,
        &shape,
        &values,
        NiftiDtype::U8,
        &space,
    )?)
}

// ---------------------------------------------------------------------------------------------
// PNG overlay

/// Most slices drawn by [`write_overlay_png`], and tiles per montage row.
const OVERLAY_SLICES: usize = 8;
const OVERLAY_COLUMNS: usize = 4;

/// Writes a montage of axial slices of the model-space `image` (grey, values clamped to [0, 1]) with `mask`
/// blended in red: the (up to) 8 slices with the most mask voxels, in slice order, or 8 evenly spaced slices when
/// the mask is empty. Tiles are `W x H` pixels, 4 to a row: the PNG is `min(n, 4) * W` wide and
/// `ceil(n / 4) * H` high for `n` slices. Returns the slice indices drawn.
pub fn write_overlay_png(
    image: &Volume<f32>,
    mask: &Volume<u8>,
    path: &Path,
) -> Result<Vec<usize>> {
    let [_, d, h, w] = image.shape();
    expect_shape("overlay image", image.shape(), [1, d, h, w])?;
    expect_shape("overlay mask", mask.shape(), [1, d, h, w])?;
    let slices = overlay_slices(mask);
    let cols = slices.len().min(OVERLAY_COLUMNS);
    let rows = slices.len().div_ceil(OVERLAY_COLUMNS);
    let png_err = |reason: String| SingleError::Png {
        path: path.to_path_buf(),
        reason,
    };
    let (width, height) = match (u32::try_from(cols * w), u32::try_from(rows * h)) {
        (Ok(x), Ok(y)) if x > 0 && y > 0 => (x, y),
        _ => {
            return Err(png_err(format!(
                "no pixels to draw for a volume of shape {:?}",
                image.shape()
            )))
        }
    };
    let mut canvas = image::RgbImage::new(width, height);
    let plane = h * w;
    for (tile, &s) in slices.iter().enumerate() {
        let (x0, y0) = ((tile % OVERLAY_COLUMNS) * w, (tile / OVERLAY_COLUMNS) * h);
        let img = &image.data()[s * plane..(s + 1) * plane];
        let msk = &mask.data()[s * plane..(s + 1) * plane];
        for (i, (&v, &m)) in img.iter().zip(msk).enumerate() {
            // Both fit u32: the canvas size above did.
            let (x, y) = ((x0 + i % w) as u32, (y0 + i / w) as u32);
            canvas.put_pixel(x, y, image::Rgb(blend(v, m)));
        }
    }
    canvas
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| png_err(e.to_string()))?;
    Ok(slices)
}

/// Grey level of `v`, half-way to pure red where the mask is set.
fn blend(v: f32, m: u8) -> [u8; 3] {
    let g = (v.clamp(0.0, 1.0) * 255.0).round();
    if m == 0 {
        let g = g as u8;
        [g, g, g]
    } else {
        let half = (g * 0.5).round();
        [(half + 127.5).round() as u8, half as u8, half as u8]
    }
}

/// The slices to draw, ascending (see [`write_overlay_png`]).
fn overlay_slices(mask: &Volume<u8>) -> Vec<usize> {
    let [_, d, h, w] = mask.shape();
    let plane = h * w;
    let counts: Vec<usize> = (0..d)
        .map(|s| {
            mask.data()[s * plane..(s + 1) * plane]
                .iter()
                .filter(|&&m| m != 0)
                .count()
        })
        .collect();
    let mut chosen: Vec<usize> = (0..d).filter(|&s| counts[s] > 0).collect();
    if chosen.is_empty() {
        // Centres of n equal bins of the depth: evenly spaced, away from the (usually empty) ends.
        let n = d.min(OVERLAY_SLICES);
        return (0..n).map(|k| ((2 * k + 1) * d) / (2 * n)).collect();
    }
    chosen.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    chosen.truncate(OVERLAY_SLICES);
    chosen.sort_unstable();
    chosen
}
