//! The reference preprocessing transforms of the M3D data scripts: min-max normalisation,
//! MONAI `CropForeground`, MONAI `Resize` (area / trilinear / nearest), spatial axis permutation
//! and MONAI `ScaleIntensityRangePercentiles`.
//!
//! Results match MONAI 1.6.1 on torch CPU in float32; each function says where that holds bit
//! for bit and where it is only within rounding.

mod intensity;
mod resize;

pub use intensity::{
    monai_percentiles, scale_intensity_range_percentiles, scale_intensity_range_percentiles_f64,
    Real, MONAI_TORCH_QUANTILE_MAX,
};
pub use resize::{
    resize_area, resize_nearest, resize_trilinear, try_resize_area, try_resize_area_box,
    try_resize_nearest, try_resize_nearest_box, try_resize_trilinear, try_resize_trilinear_box,
};

use rayon::prelude::*;

use crate::{Volume, VolumeError};

/// A spatial bounding box `[start, end)` over `[D, H, W]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BBox {
    pub start: [usize; 3],
    pub end: [usize; 3],
}

impl BBox {
    /// Extent along each spatial axis (zero where `end <= start`).
    pub fn size(&self) -> [usize; 3] {
        [0, 1, 2].map(|i| self.end[i].saturating_sub(self.start[i]))
    }

    /// True when the box lies inside a volume of spatial shape `spatial` and `start <= end`.
    pub fn fits(&self, spatial: [usize; 3]) -> bool {
        (0..3).all(|i| self.start[i] <= self.end[i] && self.end[i] <= spatial[i])
    }
}

/// The reference scripts' normalisation: `x - min`, then divide by `max(max', 1e-8)` where `max'`
/// is the maximum after the shift, both in float32 as numpy computes them. A NaN anywhere makes
/// every value NaN, as numpy's `min` / `max` propagate it.
pub fn min_max_normalise(v: &mut Volume<f32>) {
    let data = v.data_mut();
    let Some(&first) = data.first() else {
        return;
    };
    let (mut lo, mut hi) = (first, first);
    let mut nan = false;
    for &x in data.iter() {
        nan |= x.is_nan();
        lo = if x < lo { x } else { lo };
        hi = if x > hi { x } else { hi };
    }
    if nan {
        data.fill(f32::NAN);
        return;
    }
    // Rounding is monotonic, so the maximum of the shifted array is the shifted maximum.
    let denom = (hi - lo).max(1e-8f32);
    for x in data.iter_mut() {
        *x = (*x - lo) / denom;
    }
}

/// MONAI `CropForeground()` with its defaults: a voxel is foreground when `x > 0` on any channel;
/// the box is the tight bounding box of the foreground (margin 0). `None` when nothing is
/// foreground (MONAI would then crop to an empty volume).
pub fn foreground_bbox(v: &Volume<f32>) -> Option<BBox> {
    foreground_bbox_by(v, |x| x > 0.0)
}

/// Tight bounding box of the voxels for which `is_fg` holds on any channel (`None` if none).
pub fn foreground_bbox_by<T: Copy + Sync>(
    v: &Volume<T>,
    is_fg: impl Fn(T) -> bool + Sync,
) -> Option<BBox> {
    let [c, d, h, w] = v.shape();
    if v.is_empty() {
        return None;
    }
    let data = v.data();
    // Per D-plane partial boxes, merged afterwards; planes are independent so they parallelise.
    let plane_box = |di: usize| -> Option<([usize; 3], [usize; 3])> {
        let mut lo = [usize::MAX; 3];
        let mut hi = [0usize; 3];
        let mut any = false;
        for ci in 0..c {
            let plane = &data[(ci * d + di) * h * w..(ci * d + di + 1) * h * w];
            for (hi_idx, row) in plane.chunks_exact(w).enumerate() {
                let Some(first) = row.iter().position(|&x| is_fg(x)) else {
                    continue;
                };
                // `first` exists, so `rposition` finds at least that one.
                let last = row.iter().rposition(|&x| is_fg(x)).unwrap_or(first);
                any = true;
                lo[1] = lo[1].min(hi_idx);
                hi[1] = hi[1].max(hi_idx);
                lo[2] = lo[2].min(first);
                hi[2] = hi[2].max(last);
            }
        }
        any.then(|| {
            lo[0] = di;
            hi[0] = di;
            (lo, hi)
        })
    };
    let merge =
        |a: Option<([usize; 3], [usize; 3])>, b: Option<([usize; 3], [usize; 3])>| match (a, b) {
            (Some((alo, ahi)), Some((blo, bhi))) => Some((
                [0, 1, 2].map(|i| alo[i].min(blo[i])),
                [0, 1, 2].map(|i| ahi[i].max(bhi[i])),
            )),
            (x, None) | (None, x) => x,
        };
    let found = if v.len() >= 1 << 20 {
        (0..d).into_par_iter().map(plane_box).reduce(|| None, merge)
    } else {
        (0..d).map(plane_box).fold(None, merge)
    };
    found.map(|(lo, hi)| BBox {
        start: lo,
        end: hi.map(|x| x + 1),
    })
}

/// The float32 values the M3D-Cap script gives each 8-bit grey level after `x / 255` and the
/// min-max normalisation, for a volume whose darkest level is `lo` and brightest `hi`.
pub fn cap_u8_lut(lo: u8, hi: u8) -> [f32; 256] {
    let level = |x: u8| f32::from(x) / 255.0;
    let denom = (level(hi) - level(lo)).max(1e-8f32);
    std::array::from_fn(|x| (level(x as u8) - level(lo)) / denom)
}

/// The M3D-Cap preparation of a stacked series of 8-bit slices, fused into one pass over the
/// data: `x / 255` in float32, min-max normalisation, `CropForeground()`, then
/// `Resize(size)` in MONAI's default "area" mode. Bit-identical to running those steps one after
/// another (and so to the reference script). `None` when the series has no foreground (every
/// voxel has the same level), where the reference script fails and skips the series.
pub fn prepare_cap_u8(v: &Volume<u8>, size: [usize; 3]) -> Option<Volume<f32>> {
    prepare_cap_u8_with(v, size, CapResize::Area)
}

/// How [`prepare_cap_u8_with`] resizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapResize {
    /// MONAI's default mode, which the reference script uses.
    Area,
    /// Trilinear, align_corners = false.
    Trilinear,
}

/// [`prepare_cap_u8`] with a choice of resize mode, in the same single fused pass.
pub fn prepare_cap_u8_with(
    v: &Volume<u8>,
    size: [usize; 3],
    mode: CapResize,
) -> Option<Volume<f32>> {
    let lo = v.data().iter().copied().min()?;
    let hi = v.data().iter().copied().max()?;
    let lut = cap_u8_lut(lo, hi);
    // lut[x] > 0 exactly when x > lo: the levels x / 255 are strictly increasing in float32.
    let b = foreground_bbox_by(v, |x| x > lo)?;
    let level = |x: u8| lut[usize::from(x)];
    match mode {
        CapResize::Area => try_resize_area_box(v, &b, size, level).ok(),
        CapResize::Trilinear => try_resize_trilinear_box(v, &b, size, level).ok(),
    }
}

/// Copies the spatial box `b` of every channel.
///
/// # Panics
/// If `b` does not fit the volume; see [`try_crop`].
pub fn crop<T: Copy>(v: &Volume<T>, b: &BBox) -> Volume<T> {
    try_crop(v, b).unwrap_or_else(|e| panic!("{e}"))
}

/// [`crop`] returning an error for a box outside the volume.
pub fn try_crop<T: Copy>(v: &Volume<T>, b: &BBox) -> Result<Volume<T>, VolumeError> {
    let spatial = v.spatial();
    if !b.fits(spatial) {
        return Err(VolumeError::BadBBox {
            start: b.start,
            end: b.end,
            spatial,
        });
    }
    let [c, d, h, w] = v.shape();
    let [sd, sh, sw] = b.size();
    let mut out = Vec::with_capacity(c * sd * sh * sw);
    let data = v.data();
    for ci in 0..c {
        for di in b.start[0]..b.end[0] {
            for hi in b.start[1]..b.end[1] {
                let row = ((ci * d + di) * h + hi) * w;
                out.extend_from_slice(&data[row + b.start[2]..row + b.end[2]]);
            }
        }
    }
    Volume::new([c, sd, sh, sw], out)
}

/// Reorders the spatial axes: output spatial axis `i` is input spatial axis `perm[i]`, like
/// `np.transpose(x, (0, 1 + perm[0], 1 + perm[1], 1 + perm[2]))` made contiguous.
///
/// # Panics
/// If `perm` is not a permutation of `0, 1, 2`; see [`try_permute_spatial`].
pub fn permute_spatial<T: Copy + Send + Sync>(v: &Volume<T>, perm: [usize; 3]) -> Volume<T> {
    try_permute_spatial(v, perm).unwrap_or_else(|e| panic!("{e}"))
}

/// [`permute_spatial`] returning an error for an invalid permutation.
pub fn try_permute_spatial<T: Copy + Send + Sync>(
    v: &Volume<T>,
    perm: [usize; 3],
) -> Result<Volume<T>, VolumeError> {
    let mut seen = [false; 3];
    for &p in &perm {
        if p > 2 || seen[p] {
            return Err(VolumeError::BadPermutation { perm });
        }
        seen[p] = true;
    }
    let [c, d, h, w] = v.shape();
    let in_dims = [d, h, w];
    let in_strides = [h * w, w, 1];
    let out_dims = perm.map(|p| in_dims[p]);
    let st = perm.map(|p| in_strides[p]);
    let out_shape = [c, out_dims[0], out_dims[1], out_dims[2]];
    if v.is_empty() {
        return Volume::new(out_shape, Vec::new());
    }
    if perm == [0, 1, 2] {
        return Ok(v.clone());
    }
    let src = v.data();
    let [n0, n1, n2] = out_dims;
    let chan = d * h * w;
    // Tiles of TILE^3 keep both the reads and the writes of a block within L1, whichever input
    // axis ends up innermost.
    const TILE: usize = 16;
    let slabs_per_chan = n0.div_ceil(TILE);
    // A placeholder value to size the buffer; every element is overwritten below.
    let mut out = vec![src[0]; c * chan];
    let fill_slab = |(k, dst): (usize, &mut [T])| {
        let (ci, t0) = (k / slabs_per_chan, (k % slabs_per_chan) * TILE);
        let base = ci * chan;
        let a_end = (t0 + TILE).min(n0);
        for b0 in (0..n1).step_by(TILE) {
            for e0 in (0..n2).step_by(TILE) {
                for a in t0..a_end {
                    for b in b0..(b0 + TILE).min(n1) {
                        let row_out = ((a - t0) * n1 + b) * n2;
                        let row_in = base + a * st[0] + b * st[1];
                        for e in e0..(e0 + TILE).min(n2) {
                            dst[row_out + e] = src[row_in + e * st[2]];
                        }
                    }
                }
            }
        }
    };
    // Slabs of TILE output planes; the last slab of a channel may be shorter, so split by channel.
    let mut chunks: Vec<(usize, &mut [T])> = Vec::with_capacity(c * slabs_per_chan);
    for (ci, chan_out) in out.chunks_mut(chan).enumerate() {
        let mut rest = chan_out;
        for s in 0..slabs_per_chan {
            let len = (TILE.min(n0 - s * TILE)) * n1 * n2;
            let (head, tail) = rest.split_at_mut(len);
            chunks.push((ci * slabs_per_chan + s, head));
            rest = tail;
        }
    }
    if v.len() >= 1 << 18 {
        chunks.into_par_iter().for_each(fill_slab);
    } else {
        chunks.into_iter().for_each(fill_slab);
    }
    Volume::new(out_shape, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_max_maps_onto_unit_interval() {
        let mut v = Volume::new([1, 1, 2, 3], vec![3.0f32, 5.0, 7.0, 4.0, 11.0, 3.0]).unwrap();
        min_max_normalise(&mut v);
        assert_eq!(v.data(), &[0.0, 0.25, 0.5, 0.125, 1.0, 0.0]);
        // Constant input: divided by 1e-8 after subtracting the constant, so all zeros.
        let mut c = Volume::filled([1, 2, 2, 2], 0.7f32);
        min_max_normalise(&mut c);
        assert!(c.data().iter().all(|&x| x == 0.0));
        let mut n = Volume::new([1, 1, 1, 3], vec![1.0f32, f32::NAN, 2.0]).unwrap();
        min_max_normalise(&mut n);
        assert!(n.data().iter().all(|x| x.is_nan()));
    }

    #[test]
    fn foreground_box_is_tight_over_all_channels() {
        let mut v = Volume::filled([2, 6, 7, 8], 0.0f32);
        let idx = |c: usize, d: usize, h: usize, w: usize| ((c * 6 + d) * 7 + h) * 8 + w;
        v.data_mut()[idx(0, 2, 3, 4)] = 0.5;
        v.data_mut()[idx(1, 4, 1, 6)] = 2.0;
        v.data_mut()[idx(1, 5, 6, 0)] = -1.0; // negative is background
        v.data_mut()[idx(0, 1, 6, 0)] = 0.0;
        let b = foreground_bbox(&v).unwrap();
        assert_eq!(
            b,
            BBox {
                start: [2, 1, 4],
                end: [5, 4, 7]
            }
        );
        let cropped = crop(&v, &b);
        assert_eq!(cropped.shape(), [2, 3, 3, 3]);
        assert_eq!(cropped.get([0, 0, 2, 0]), Some(0.5));
        assert_eq!(cropped.get([1, 2, 0, 2]), Some(2.0));
        // Everything outside the box is background.
        let total: usize = v.data().iter().filter(|&&x| x > 0.0).count();
        let kept: usize = cropped.data().iter().filter(|&&x| x > 0.0).count();
        assert_eq!(total, kept);
        assert_eq!(foreground_bbox(&Volume::filled([1, 3, 3, 3], -0.5)), None);
    }

    #[test]
    fn fused_cap_preparation_equals_the_step_by_step_chain() {
        let v = Volume::from_fn([1, 9, 40, 33], |_, d, h, w| {
            if (2..7).contains(&d) && (5..31).contains(&h) && (3..30).contains(&w) {
                (((d * 31 + h * 17 + w * 7) % 200) + 20) as u8
            } else {
                20
            }
        });
        let mut steps = v.map(|x| f32::from(x) / 255.0);
        min_max_normalise(&mut steps);
        let b = foreground_bbox(&steps).unwrap();
        assert_eq!(b.start, [2, 5, 3]);
        for size in [[4, 16, 16], [32, 64, 64], [5, 26, 27]] {
            let want = resize_area(&crop(&steps, &b), size);
            assert_eq!(prepare_cap_u8(&v, size).unwrap(), want, "{size:?}");
        }
        assert_eq!(
            prepare_cap_u8(&Volume::filled([1, 3, 4, 5], 9u8), [2, 2, 2]),
            None
        );
    }

    #[test]
    fn crop_rejects_boxes_outside_the_volume() {
        let v = Volume::filled([1, 4, 4, 4], 1u8);
        let bad = BBox {
            start: [0, 0, 2],
            end: [4, 4, 5],
        };
        assert!(matches!(
            try_crop(&v, &bad),
            Err(VolumeError::BadBBox { .. })
        ));
        let inverted = BBox {
            start: [2, 0, 0],
            end: [1, 4, 4],
        };
        assert!(try_crop(&v, &inverted).is_err());
        let empty = BBox {
            start: [1, 1, 1],
            end: [1, 4, 4],
        };
        assert_eq!(crop(&v, &empty).shape(), [1, 0, 3, 3]);
    }

    #[test]
    fn permute_matches_index_definition_and_inverts() {
        // Sizes above one tile and not multiples of it.
        let small = Volume::from_fn([2, 19, 5, 37], |c, d, h, w| {
            (c * 100_000 + d * 1000 + h * 100 + w) as u32
        });
        // Large enough for the rayon path.
        let large = Volume::from_fn([1, 40, 70, 101], |_, d, h, w| {
            (d * 100_000 + h * 1000 + w) as u32
        });
        for v in [small, large] {
            check_permutations(&v);
        }
    }

    fn check_permutations(v: &Volume<u32>) {
        for perm in [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ] {
            let p = permute_spatial(v, perm);
            let s = v.spatial();
            assert_eq!(p.spatial(), perm.map(|i| s[i]));
            for c in 0..v.channels() {
                for a in 0..p.spatial()[0] {
                    for b in 0..p.spatial()[1] {
                        for e in 0..p.spatial()[2] {
                            let mut src = [0; 3];
                            src[perm[0]] = a;
                            src[perm[1]] = b;
                            src[perm[2]] = e;
                            assert_eq!(p.get([c, a, b, e]), v.get([c, src[0], src[1], src[2]]));
                        }
                    }
                }
            }
            let mut inv = [0; 3];
            for (i, &q) in perm.iter().enumerate() {
                inv[q] = i;
            }
            assert_eq!(&permute_spatial(&p, inv), v);
        }
        assert!(matches!(
            try_permute_spatial(v, [0, 0, 1]),
            Err(VolumeError::BadPermutation { .. })
        ));
    }
}
