//! Spatial resampling as `torch.nn.functional.interpolate` does it on the CPU (what MONAI
//! `Resize` calls): "area" (adaptive average pooling), "trilinear" (align_corners=False) and
//! legacy "nearest".
//!
//! Each mode is written so that every output value goes through the same float32 operations in
//! the same order as torch's kernels, which makes the results bit-identical to torch on machines
//! where torch uses its AVX2/AVX-512 kernels (those contract `a * b + c` into an FMA, which the
//! `fma` module reproduces). Index and weight tables are computed once per axis.

use rayon::prelude::*;

use super::BBox;
use crate::fma::{fma_f32, fma_f32_flagged, FmaKernel};
use crate::{Volume, VolumeError};

/// Below this many output voxels, rayon's task overhead outweighs the parallel speed-up.
const PAR_MIN_VOXELS: usize = 1 << 15;

/// The part of a volume a resize reads: the spatial box `start .. start + size` of every channel.
/// Resizing a box directly saves the copy a separate crop would make.
struct BoxView<'a, T> {
    data: &'a [T],
    /// Full spatial dims of `data` per channel.
    dims: [usize; 3],
    start: [usize; 3],
    size: [usize; 3],
}

impl<'a, T: Copy> BoxView<'a, T> {
    fn new(v: &'a Volume<T>, b: &BBox) -> Result<Self, VolumeError> {
        let spatial = v.spatial();
        if !b.fits(spatial) {
            return Err(VolumeError::BadBBox {
                start: b.start,
                end: b.end,
                spatial,
            });
        }
        Ok(BoxView {
            data: v.data(),
            dims: spatial,
            start: b.start,
            size: b.size(),
        })
    }

    /// Row `h` of plane `d` of channel `c`, box coordinates, restricted to the box's W range.
    #[inline]
    fn row(&self, c: usize, d: usize, h: usize) -> &'a [T] {
        let [dd, dh, dw] = self.dims;
        let off = ((c * dd + self.start[0] + d) * dh + self.start[1] + h) * dw + self.start[2];
        &self.data[off..off + self.size[2]]
    }
}

fn full_box(spatial: [usize; 3]) -> BBox {
    BBox {
        start: [0; 3],
        end: spatial,
    }
}

/// Validates the request; `Ok(true)` means the output has no voxels and nothing needs computing.
fn check_resize(
    spatial: [usize; 3],
    size: [usize; 3],
    channels: usize,
) -> Result<bool, VolumeError> {
    let out_empty = channels == 0 || size.contains(&0);
    if !out_empty && spatial.contains(&0) {
        return Err(VolumeError::EmptyInput { spatial, size });
    }
    Ok(out_empty)
}

/// The box itself, values mapped: MONAI returns the input unchanged when the size already matches.
fn copy_box<T: Copy, U>(src: &BoxView<'_, T>, channels: usize, f: impl Fn(T) -> U) -> Vec<U> {
    let [d, h, _] = src.size;
    let mut out = Vec::with_capacity(channels * src.size.iter().product::<usize>());
    for c in 0..channels {
        for di in 0..d {
            for hi in 0..h {
                out.extend(src.row(c, di, hi).iter().map(|&x| f(x)));
            }
        }
    }
    out
}

/// Runs `f(plane_index, plane)` over the `plane_len`-sized chunks of `out`, in parallel when the
/// output is large enough to pay for it.
fn for_each_plane<T: Send>(
    out: &mut [T],
    plane_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    for_each_plane_init(out, plane_len, || (), |_, i, p| f(i, p));
}

/// [`for_each_plane`] with a per-task scratch value made by `init` (once per rayon job, or once
/// when serial) instead of once per plane.
fn for_each_plane_init<T: Send, S>(
    out: &mut [T],
    plane_len: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync + Send,
) {
    if plane_len == 0 {
        return;
    }
    if out.len() >= PAR_MIN_VOXELS {
        out.par_chunks_mut(plane_len)
            .enumerate()
            .for_each_init(&init, |s, (i, p)| f(s, i, p));
    } else {
        let mut s = init();
        out.chunks_mut(plane_len)
            .enumerate()
            .for_each(|(i, p)| f(&mut s, i, p));
    }
}

// ---------------------------------------------------------------------------------------------
// area

/// Adaptive-pooling windows `[start, end)` along one axis: `start = floor(i * in / out)`,
/// `end = ceil((i + 1) * in / out)`, exactly torch's integer formulas.
fn area_windows(n_in: usize, n_out: usize) -> (Vec<usize>, Vec<usize>) {
    (0..n_out)
        .map(|i| {
            let start = (i / n_out) * n_in + ((i % n_out) * n_in) / n_out;
            let end = 1 + ((i + 1) * n_in - 1) / n_out;
            (start, end)
        })
        .unzip()
}

/// The W windows of an area resize as a gather table: `k` = widest window, and `idx[t * ow + j]`
/// is the position of the `t`-th value of window `j`, or `w` (where the row buffer holds a
/// trailing zero) past the window's end. Adding +0.0 to an accumulator that starts at +0.0 is
/// exact, so the padding changes no bit, and fixed trip counts keep the loops branch-free.
struct WGather {
    k: usize,
    idx: Vec<usize>,
}

impl WGather {
    fn new(w: usize, ow: usize) -> Self {
        let (ws, we) = area_windows(w, ow);
        let k = ws.iter().zip(&we).map(|(a, b)| b - a).max().unwrap_or(1);
        let mut idx = vec![w; k * ow];
        for (j, (&s0, &s1)) in ws.iter().zip(&we).enumerate() {
            for (t, i) in (s0..s1).enumerate() {
                idx[t * ow + j] = i;
            }
        }
        Self { k, idx }
    }
}

/// `acc[j] += row[K*j] + ... + row[K*j + K-1]`, added one by one in order; `K` known at compile
/// time so the loop unrolls and vectorises.
#[inline]
fn add_chunks<const K: usize>(acc: &mut [f32], row: &[f32]) {
    for (a, chunk) in acc.iter_mut().zip(row.chunks_exact(K)) {
        let mut s = *a;
        for &x in chunk {
            s += x;
        }
        *a = s;
    }
}

/// MONAI `Resize(mode="area")`, i.e. torch `adaptive_avg_pool3d`: every output voxel is the
/// float32 sum of its window (in D, H, W order) divided by the window extents one after another.
/// Works for down- and up-sampling. Bit-identical to torch (except the 1x1x1 output, which torch
/// computes with `mean`; there it agrees within an ulp).
///
/// # Panics
/// If the input has no voxels along some axis but the output has some; see [`try_resize_area`].
pub fn resize_area(v: &Volume<f32>, size: [usize; 3]) -> Volume<f32> {
    try_resize_area(v, size).unwrap_or_else(|e| panic!("{e}"))
}

/// [`resize_area`] returning an error instead of panicking on an empty input.
pub fn try_resize_area(v: &Volume<f32>, size: [usize; 3]) -> Result<Volume<f32>, VolumeError> {
    try_resize_area_box(v, &full_box(v.spatial()), size, |x| x)
}

/// `resize_area(&crop(&v.map(f), b), size)` in one pass, bit for bit: no cropped copy and no
/// mapped copy are made (`f` is applied on the fly; with a 256-entry table it turns 8-bit slices
/// into the reference's float32 values while reading).
pub fn try_resize_area_box<T: Copy + Sync>(
    v: &Volume<T>,
    b: &BBox,
    size: [usize; 3],
    f: impl Fn(T) -> f32 + Sync,
) -> Result<Volume<f32>, VolumeError> {
    let src = BoxView::new(v, b)?;
    let c = v.channels();
    let [d, h, w] = src.size;
    let [od, oh, ow] = size;
    let out_shape = [c, od, oh, ow];
    if check_resize(src.size, size, c)? {
        return Volume::new(out_shape, Vec::new());
    }
    if src.size == size {
        return Volume::new(out_shape, copy_box(&src, c, f));
    }
    if size == [1, 1, 1] {
        return Volume::new(out_shape, channel_means(&src, c, f));
    }
    let (ds, de) = area_windows(d, od);
    let (hs, he) = area_windows(h, oh);
    let (ws, we) = area_windows(w, ow);
    let kw: Vec<f32> = ws.iter().zip(&we).map(|(&a, &b)| (b - a) as f32).collect();
    let gather = WGather::new(w, ow);
    let uniform = (w % ow == 0).then_some(w / ow);
    // Output rows whose H window contains input row ih: a contiguous range, as windows are monotone.
    let h_targets: Vec<(usize, usize)> = (0..h)
        .map(|ih| {
            let lo = he.partition_point(|&e| e <= ih);
            let hi = hs.partition_point(|&s| s <= ih);
            debug_assert!(lo < hi, "the windows cover every input row");
            (lo, hi)
        })
        .collect();
    let mut out = vec![0f32; c * od * oh * ow];
    for_each_plane(&mut out, oh * ow, |plane, dst| {
        let (ci, odi) = (plane / od, plane % od);
        let (d0, d1) = (ds[odi], de[odi]);
        let kd = (d1 - d0) as f32;
        // `dst` doubles as the accumulator plane. Each input row is mapped to f32 and gathered
        // window-position-major once, then added with contiguous (vectorisable) loops into every
        // output row whose window holds it. Per output value the additions still run in torch's
        // order: D, then H, then W position, all ascending.
        dst.fill(0.0);
        let mut mapped = vec![0f32; w + 1];
        let mut g = vec![0f32; gather.k * ow];
        for id in d0..d1 {
            for (ih, &(lo, hi)) in h_targets.iter().enumerate() {
                for (m, &x) in mapped.iter_mut().zip(src.row(ci, id, ih)) {
                    *m = f(x);
                }
                let targets = dst[lo * ow..hi * ow].chunks_exact_mut(ow);
                if let Some(k) = uniform {
                    // Windows tile the row: read them as contiguous chunks, no gather needed.
                    for acc in targets {
                        match k {
                            1 => add_chunks::<1>(acc, &mapped),
                            2 => add_chunks::<2>(acc, &mapped),
                            3 => add_chunks::<3>(acc, &mapped),
                            4 => add_chunks::<4>(acc, &mapped),
                            _ => {
                                for (a, chunk) in acc.iter_mut().zip(mapped.chunks_exact(k)) {
                                    let mut s = *a;
                                    for &x in chunk {
                                        s += x;
                                    }
                                    *a = s;
                                }
                            }
                        }
                    }
                    continue;
                }
                for (gv, &i) in g.iter_mut().zip(&gather.idx) {
                    *gv = mapped[i];
                }
                for acc in targets {
                    for gt in g.chunks_exact(ow) {
                        for (a, &x) in acc.iter_mut().zip(gt) {
                            *a += x;
                        }
                    }
                }
            }
        }
        for ((row, &h0), &h1) in dst.chunks_exact_mut(ow).zip(&hs).zip(&he) {
            let kh = (h1 - h0) as f32;
            for (o, &k) in row.iter_mut().zip(&kw) {
                *o = *o / kd / kh / k;
            }
        }
    });
    Volume::new(out_shape, out)
}

/// torch routes a 1x1x1 adaptive pool to `mean`; an f64 sum is within an ulp of it.
fn channel_means<T: Copy>(src: &BoxView<'_, T>, channels: usize, f: impl Fn(T) -> f32) -> Vec<f32> {
    let [d, h, _] = src.size;
    let n = src.size.iter().product::<usize>() as f64;
    (0..channels)
        .map(|c| {
            let mut s = 0f64;
            for di in 0..d {
                for hi in 0..h {
                    s += src
                        .row(c, di, hi)
                        .iter()
                        .map(|&x| f64::from(f(x)))
                        .sum::<f64>();
                }
            }
            (s / n) as f32
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// trilinear

/// Linear-interpolation taps along one axis, as torch's `compute_indices_weights_linear` with
/// align_corners=False and no explicit scale.
struct LinearTaps {
    i0: Vec<usize>,
    i1: Vec<usize>,
    l0: Vec<f32>,
    l1: Vec<f32>,
}

fn linear_taps(n_in: usize, n_out: usize) -> LinearTaps {
    let scale = n_in as f32 / n_out as f32;
    let mut t = LinearTaps {
        i0: Vec::with_capacity(n_out),
        i1: Vec::with_capacity(n_out),
        l0: Vec::with_capacity(n_out),
        l1: Vec::with_capacity(n_out),
    };
    for i in 0..n_out {
        // torch: scale * (i + 0.5f) - 0.5f, contracted to one FMA, clamped at 0.
        let src = fma_f32(scale, i as f32 + 0.5, -0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n_in - 1);
        let l1 = (src - i0 as f32).clamp(0.0, 1.0);
        let i1 = if i0 + 1 < n_in { i0 + 1 } else { i0 };
        t.i0.push(i0);
        t.i1.push(i1);
        t.l0.push(1.0 - l1);
        t.l1.push(l1);
    }
    t
}

/// torch's two-tap blend `t0 * w0 + t1 * w1`, contracted by the compiler to `fma(t0, w0, t1 * w1)`.
#[inline(always)]
fn blend(t0: f32, w0: f32, t1: f32, w1: f32) -> f32 {
    fma_f32(t0, w0, t1 * w1)
}

/// `out[j] = blend(a[j], w0, b[j], w1)` over two rows with fixed weights: a branch-free f64 pass
/// the compiler vectorises, then exact recomputation of the rare values it flagged.
#[inline]
fn blend_rows(out: &mut [f32], a: &[f32], b: &[f32], w0: f32, w1: f32) {
    let mut suspect = false;
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        let (r, s) = fma_f32_flagged(x, w0, y * w1);
        *o = r;
        suspect |= s;
    }
    if suspect {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = blend(x, w0, y, w1);
        }
    }
}

/// [`blend_rows`] with the FMA instruction (the same results).
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`FmaKernel::detect`]).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn blend_rows_fma(out: &mut [f32], a: &[f32], b: &[f32], w0: f32, w1: f32) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x.mul_add(w0, y * w1);
    }
}

/// [`blend_row_taps`] with the FMA instruction (the same results).
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`FmaKernel::detect`]).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn blend_row_taps_fma<T: Copy>(
    out: &mut [f32],
    row: &[T],
    t: &LinearTaps,
    f: &impl Fn(T) -> f32,
) {
    for ((((o, &i0), &i1), &l0), &l1) in out.iter_mut().zip(&t.i0).zip(&t.i1).zip(&t.l0).zip(&t.l1)
    {
        *o = f(row[i0]).mul_add(l0, f(row[i1]) * l1);
    }
}

/// [`blend_rows`] on `kernel`.
#[inline]
fn blend_rows_on(kernel: FmaKernel, out: &mut [f32], a: &[f32], b: &[f32], w0: f32, w1: f32) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Hardware` is only chosen where the CPU has AVX2 and FMA (`FmaKernel::detect`).
        #[allow(unsafe_code)]
        FmaKernel::Hardware => unsafe { blend_rows_fma(out, a, b, w0, w1) },
        _ => blend_rows(out, a, b, w0, w1),
    }
}

/// [`blend_row_taps`] on `kernel`.
#[inline]
fn blend_row_taps_on<T: Copy>(
    kernel: FmaKernel,
    out: &mut [f32],
    row: &[T],
    t: &LinearTaps,
    f: &impl Fn(T) -> f32,
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Hardware` is only chosen where the CPU has AVX2 and FMA (`FmaKernel::detect`).
        #[allow(unsafe_code)]
        FmaKernel::Hardware => unsafe { blend_row_taps_fma(out, row, t, f) },
        _ => blend_row_taps(out, row, t, f),
    }
}

/// The W pass over one row: per-output taps and weights.
#[inline]
fn blend_row_taps<T: Copy>(out: &mut [f32], row: &[T], t: &LinearTaps, f: &impl Fn(T) -> f32) {
    let mut suspect = false;
    for ((((o, &i0), &i1), &l0), &l1) in out.iter_mut().zip(&t.i0).zip(&t.i1).zip(&t.l0).zip(&t.l1)
    {
        let (r, s) = fma_f32_flagged(f(row[i0]), l0, f(row[i1]) * l1);
        *o = r;
        suspect |= s;
    }
    if suspect {
        for ((((o, &i0), &i1), &l0), &l1) in
            out.iter_mut().zip(&t.i0).zip(&t.i1).zip(&t.l0).zip(&t.l1)
        {
            *o = blend(f(row[i0]), l0, f(row[i1]), l1);
        }
    }
}

/// MONAI `Resize(mode="trilinear")` = torch `interpolate(mode="trilinear", align_corners=False)`
/// without anti-aliasing. Computed as separable W, H, D passes, which is exactly torch's nesting
/// (its innermost interpolation is along W), so the passes reproduce its rounding bit for bit.
///
/// # Panics
/// If the input has no voxels along some axis but the output has some; see [`try_resize_trilinear`].
pub fn resize_trilinear(v: &Volume<f32>, size: [usize; 3]) -> Volume<f32> {
    try_resize_trilinear(v, size).unwrap_or_else(|e| panic!("{e}"))
}

/// [`resize_trilinear`] returning an error instead of panicking on an empty input.
pub fn try_resize_trilinear(v: &Volume<f32>, size: [usize; 3]) -> Result<Volume<f32>, VolumeError> {
    try_resize_trilinear_box(v, &full_box(v.spatial()), size, |x| x)
}

/// `resize_trilinear(&crop(&v.map(f), b), size)` in one pass, bit for bit.
pub fn try_resize_trilinear_box<T: Copy + Sync>(
    v: &Volume<T>,
    b: &BBox,
    size: [usize; 3],
    f: impl Fn(T) -> f32 + Sync,
) -> Result<Volume<f32>, VolumeError> {
    trilinear_box_on(FmaKernel::detect(), v, b, size, f)
}

/// [`try_resize_trilinear_box`] on a given FMA kernel (the tests run both).
fn trilinear_box_on<T: Copy + Sync>(
    kernel: FmaKernel,
    v: &Volume<T>,
    b: &BBox,
    size: [usize; 3],
    f: impl Fn(T) -> f32 + Sync,
) -> Result<Volume<f32>, VolumeError> {
    let src = BoxView::new(v, b)?;
    let c = v.channels();
    let [d, h, w] = src.size;
    let [od, oh, ow] = size;
    let out_shape = [c, od, oh, ow];
    if check_resize(src.size, size, c)? {
        return Volume::new(out_shape, Vec::new());
    }
    if src.size == size {
        return Volume::new(out_shape, copy_box(&src, c, f));
    }
    let td = linear_taps(d, od);
    let th = linear_taps(h, oh);
    let tw = linear_taps(w, ow);

    // Only the input D-planes some output plane reads need the W and H passes.
    let mut slot = vec![usize::MAX; d];
    let mut needed = Vec::new();
    for &i in td.i0.iter().chain(&td.i1) {
        slot[i] = 0;
    }
    for (i, s) in slot.iter_mut().enumerate() {
        if *s != usize::MAX {
            *s = needed.len();
            needed.push(i);
        }
    }

    let plane_out = oh * ow;
    let nslots = needed.len();
    // tmp[c][slot] = input plane `needed[slot]` of channel c after the W and H passes.
    let mut tmp = vec![0f32; c * nslots * plane_out];
    // `rows`: the plane after the W pass, every value written before it is read.
    let rows_init = || vec![0f32; h * ow];
    for_each_plane_init(&mut tmp, plane_out, rows_init, |rows, p, dst| {
        let (ci, di) = (p / nslots, needed[p % nslots]);
        for (hi, row_out) in rows.chunks_exact_mut(ow).enumerate() {
            blend_row_taps_on(kernel, row_out, src.row(ci, di, hi), &tw, &f);
        }
        for (oi, dst_row) in dst.chunks_exact_mut(ow).enumerate() {
            let r0 = &rows[th.i0[oi] * ow..(th.i0[oi] + 1) * ow];
            let r1 = &rows[th.i1[oi] * ow..(th.i1[oi] + 1) * ow];
            blend_rows_on(kernel, dst_row, r0, r1, th.l0[oi], th.l1[oi]);
        }
    });

    let mut out = vec![0f32; c * od * plane_out];
    for_each_plane(&mut out, plane_out, |p, dst| {
        let (ci, odi) = (p / od, p % od);
        let s0 = (ci * nslots + slot[td.i0[odi]]) * plane_out;
        let s1 = (ci * nslots + slot[td.i1[odi]]) * plane_out;
        blend_rows_on(
            kernel,
            dst,
            &tmp[s0..s0 + plane_out],
            &tmp[s1..s1 + plane_out],
            td.l0[odi],
            td.l1[odi],
        );
    });
    Volume::new(out_shape, out)
}

// ---------------------------------------------------------------------------------------------
// nearest

/// torch's legacy "nearest" source index: `min(floor(i * (float)in / out), in - 1)` in float32,
/// with its exact shortcuts for equal sizes and exact 2x up-sampling.
fn nearest_index(n_in: usize, n_out: usize) -> Vec<usize> {
    if n_in == n_out {
        return (0..n_out).collect();
    }
    if n_out == 2 * n_in {
        return (0..n_out).map(|i| i >> 1).collect();
    }
    let scale = n_in as f32 / n_out as f32;
    (0..n_out)
        .map(|i| ((i as f32 * scale).floor() as usize).min(n_in - 1))
        .collect()
}

/// MONAI `Resize(mode="nearest")` = torch `interpolate(mode="nearest")`; a pure gather, so any
/// element type (labels, masks) is copied unchanged.
///
/// # Panics
/// If the input has no voxels along some axis but the output has some; see [`try_resize_nearest`].
pub fn resize_nearest<T: Copy + Send + Sync>(v: &Volume<T>, size: [usize; 3]) -> Volume<T> {
    try_resize_nearest(v, size).unwrap_or_else(|e| panic!("{e}"))
}

/// [`resize_nearest`] returning an error instead of panicking on an empty input.
pub fn try_resize_nearest<T: Copy + Send + Sync>(
    v: &Volume<T>,
    size: [usize; 3],
) -> Result<Volume<T>, VolumeError> {
    try_resize_nearest_box(v, &full_box(v.spatial()), size)
}

/// `resize_nearest(&crop(v, b), size)` without the intermediate crop.
pub fn try_resize_nearest_box<T: Copy + Send + Sync>(
    v: &Volume<T>,
    b: &BBox,
    size: [usize; 3],
) -> Result<Volume<T>, VolumeError> {
    let src = BoxView::new(v, b)?;
    let c = v.channels();
    let [d, h, w] = src.size;
    let [od, oh, ow] = size;
    let out_shape = [c, od, oh, ow];
    if check_resize(src.size, size, c)? {
        return Volume::new(out_shape, Vec::new());
    }
    if src.size == size {
        return Volume::new(out_shape, copy_box(&src, c, |x| x));
    }
    let sd = nearest_index(d, od);
    let sh = nearest_index(h, oh);
    let sw = nearest_index(w, ow);
    let plane_out = oh * ow;
    // A placeholder value to size the buffer (the box is non-empty here); all of it is overwritten.
    let mut out = vec![src.row(0, 0, 0)[0]; c * od * plane_out];
    for_each_plane(&mut out, plane_out, |p, dst| {
        let (ci, odi) = (p / od, p % od);
        for (dst_row, &ih) in dst.chunks_exact_mut(ow).zip(&sh) {
            let row = src.row(ci, sd[odi], ih);
            for (o, &iw) in dst_row.iter_mut().zip(&sw) {
                *o = row[iw];
            }
        }
    });
    Volume::new(out_shape, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transforms::crop;

    #[test]
    fn area_windows_cover_the_axis() {
        for n_in in 1..40 {
            for n_out in 1..40 {
                let (s, e) = area_windows(n_in, n_out);
                assert_eq!(s[0], 0);
                assert_eq!(e[n_out - 1], n_in);
                for i in 0..n_out {
                    assert!(s[i] < e[i] && e[i] <= n_in);
                    // floor / ceil of the real-valued window bounds.
                    assert_eq!(s[i], (i * n_in) / n_out);
                    assert_eq!(e[i], ((i + 1) * n_in).div_ceil(n_out));
                }
            }
        }
    }

    #[test]
    fn area_of_a_constant_is_the_constant_and_exact_2x_is_a_block_mean() {
        let v = Volume::filled([2, 7, 9, 11], 0.375f32);
        for size in [[3, 4, 5], [14, 18, 22], [1, 1, 1], [7, 1, 13]] {
            let r = resize_area(&v, size);
            assert_eq!(r.shape(), [2, size[0], size[1], size[2]]);
            assert!(r.data().iter().all(|&x| x == 0.375), "{size:?}");
        }
        let v = Volume::from_fn([1, 2, 4, 4], |_, d, h, w| (d * 16 + h * 4 + w) as f32);
        let r = resize_area(&v, [1, 2, 2]);
        // mean of the 2x2x2 block starting at (0, 0, 0) = mean of {0,1,4,5,16,17,20,21}
        assert_eq!(r.get([0, 0, 0, 0]), Some(10.5));
        assert_eq!(r.get([0, 0, 1, 1]), Some(10.5 + 8.0 + 2.0));
    }

    #[test]
    fn trilinear_reproduces_linear_functions_inside_and_constants_everywhere() {
        let v = Volume::filled([1, 5, 6, 7], -2.5f32);
        let r = resize_trilinear(&v, [9, 3, 16]);
        assert!(r.data().iter().all(|&x| x == -2.5));
        // A ramp along W: up-sampling 4 -> 8 gives src = (j + 0.5) / 2 - 0.5 clamped to [0, 3].
        let v = Volume::from_fn([1, 1, 1, 4], |_, _, _, w| w as f32);
        let r = resize_trilinear(&v, [1, 1, 8]);
        let expect = [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0];
        assert_eq!(r.data(), &expect);
    }

    #[test]
    fn nearest_picks_existing_values_and_keeps_labels() {
        let v = Volume::from_fn([2, 3, 5, 7], |c, d, h, w| {
            (c * 1000 + d * 100 + h * 10 + w) as u16
        });
        let r = resize_nearest(&v, [6, 4, 3]);
        assert_eq!(r.shape(), [2, 6, 4, 3]);
        for c in 0..2 {
            for d in 0..6 {
                for h in 0..4 {
                    for w in 0..3 {
                        let x = r.get([c, d, h, w]).unwrap() as usize;
                        assert_eq!(x / 1000, c);
                        assert_eq!((x / 100) % 10, d / 2); // exact 2x rule
                        assert_eq!((x / 10) % 10, (h as f32 * 1.25).floor() as usize);
                        assert_eq!(x % 10, (w as f32 * (7.0f32 / 3.0)).floor() as usize);
                    }
                }
            }
        }
    }

    #[test]
    fn empty_inputs_are_reported_and_empty_outputs_are_fine() {
        let v = Volume::new([1, 0, 4, 4], Vec::<f32>::new()).unwrap();
        assert!(matches!(
            try_resize_area(&v, [2, 2, 2]),
            Err(VolumeError::EmptyInput { .. })
        ));
        assert!(matches!(
            try_resize_trilinear(&v, [2, 2, 2]),
            Err(VolumeError::EmptyInput { .. })
        ));
        assert!(matches!(
            try_resize_nearest(&v, [2, 2, 2]),
            Err(VolumeError::EmptyInput { .. })
        ));
        let v = Volume::filled([1, 2, 2, 2], 1.0f32);
        assert_eq!(resize_area(&v, [0, 3, 3]).shape(), [1, 0, 3, 3]);
    }

    /// Per-voxel definitions, written independently of the plane/row structure above.
    fn naive_area(v: &Volume<f32>, size: [usize; 3]) -> Volume<f32> {
        let [_, d, h, w] = v.shape();
        let win = |i: usize, n_in: usize, n_out: usize| {
            ((i * n_in) / n_out, ((i + 1) * n_in).div_ceil(n_out))
        };
        Volume::from_fn([v.channels(), size[0], size[1], size[2]], |c, a, b, e| {
            let (d0, d1) = win(a, d, size[0]);
            let (h0, h1) = win(b, h, size[1]);
            let (w0, w1) = win(e, w, size[2]);
            let mut s = 0f32;
            for x in d0..d1 {
                for y in h0..h1 {
                    for z in w0..w1 {
                        s += v.get([c, x, y, z]).unwrap();
                    }
                }
            }
            s / (d1 - d0) as f32 / (h1 - h0) as f32 / (w1 - w0) as f32
        })
    }

    fn naive_trilinear(v: &Volume<f32>, size: [usize; 3]) -> Volume<f32> {
        let [_, d, h, w] = v.shape();
        let (td, th, tw) = (
            linear_taps(d, size[0]),
            linear_taps(h, size[1]),
            linear_taps(w, size[2]),
        );
        Volume::from_fn([v.channels(), size[0], size[1], size[2]], |c, a, b, e| {
            let at_w = |x: usize, y: usize| {
                let p = |z: usize| v.get([c, x, y, z]).unwrap();
                blend(p(tw.i0[e]), tw.l0[e], p(tw.i1[e]), tw.l1[e])
            };
            let at_h = |x: usize| blend(at_w(x, th.i0[b]), th.l0[b], at_w(x, th.i1[b]), th.l1[b]);
            blend(at_h(td.i0[a]), td.l0[a], at_h(td.i1[a]), td.l1[a])
        })
    }

    #[test]
    fn box_variants_equal_crop_map_then_resize() {
        let v = Volume::from_fn([2, 11, 23, 19], |c, d, h, w| {
            ((c * 31 + d * 7 + h * 3 + w) % 29) as u8 * 8
        });
        let lut: Vec<f32> = (0..256).map(|x| x as f32 / 255.0).collect();
        let map = |x: u8| lut[usize::from(x)];
        let b = BBox {
            start: [1, 4, 2],
            end: [10, 20, 17],
        };
        let mapped = crop(&v.map(map), &b);
        for size in [[4, 8, 5], [9, 16, 15], [18, 7, 40], [1, 1, 1]] {
            assert_eq!(
                try_resize_area_box(&v, &b, size, map).unwrap(),
                resize_area(&mapped, size),
                "area {size:?}"
            );
            assert_eq!(
                try_resize_trilinear_box(&v, &b, size, map).unwrap(),
                resize_trilinear(&mapped, size),
                "trilinear {size:?}"
            );
            assert_eq!(
                try_resize_nearest_box(&v, &b, size).unwrap(),
                resize_nearest(&crop(&v, &b), size),
                "nearest {size:?}"
            );
        }
        let outside = BBox {
            start: [0, 0, 0],
            end: [12, 1, 1],
        };
        assert!(matches!(
            try_resize_area_box(&v, &outside, [2, 2, 2], map),
            Err(VolumeError::BadBBox { .. })
        ));
    }

    /// The FMA instruction and its f64 emulation give the same bits through the whole trilinear
    /// resize (u8 levels through a table, as data-prep reads slices, and arbitrary floats). Where the
    /// CPU has no FMA only the emulation exists, and this checks it against itself.
    #[test]
    fn trilinear_is_the_same_on_both_fma_kernels() {
        use rand::{Rng, SeedableRng};
        let hw = FmaKernel::detect();
        if hw == FmaKernel::Emulated {
            eprintln!("this CPU has no AVX2 + FMA: only the emulated kernel runs here");
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let lut: Vec<f32> = (0..256).map(|x| x as f32 / 255.0).collect();
        let map = |x: u8| lut[usize::from(x)];
        let v8 = Volume::from_fn([1, 13, 97, 83], |_, _, _, _| rng.random::<u8>());
        let vf = Volume::from_fn([2, 7, 41, 39], |_, _, _, _| rng.random_range(-3.0f32..3.0));
        let b = BBox {
            start: [2, 5, 3],
            end: [12, 90, 80],
        };
        for size in [[32, 256, 256], [4, 21, 17], [9, 64, 64], [31, 5, 160]] {
            let one = |k| trilinear_box_on(k, &v8, &b, size, map).unwrap();
            assert_eq!(one(FmaKernel::Emulated), one(hw), "u8 {size:?}");
            let full = full_box(vf.spatial());
            let two = |k| trilinear_box_on(k, &vf, &full, size, |x| x).unwrap();
            assert_eq!(two(FmaKernel::Emulated), two(hw), "f32 {size:?}");
        }
    }

    #[test]
    fn plane_kernels_match_per_voxel_definitions() {
        // Sizes on both sides of PAR_MIN_VOXELS so the serial and the rayon path are both checked,
        // and factors that hit the uniform-window fast paths (2, 3) and the table path.
        let v = Volume::from_fn([2, 9, 70, 66], |c, d, h, w| {
            ((c * 13 + d * 7 + h * 3 + w * 5) % 17) as f32 / 17.0 + 0.01 * w as f32
        });
        for size in [
            [8, 64, 64],
            [3, 35, 33],
            [3, 35, 22],
            [4, 7, 5],
            [13, 71, 67],
            [20, 140, 132],
        ] {
            assert_eq!(resize_area(&v, size), naive_area(&v, size), "area {size:?}");
            assert_eq!(
                resize_trilinear(&v, size),
                naive_trilinear(&v, size),
                "trilinear {size:?}"
            );
        }
    }
}
