//! Spatial resampling as `torch.nn.functional.interpolate` does it on the CPU (what MONAI
//! `Resize` calls): "area" (adaptive average pooling), "trilinear" (align_corners=False) and
//! legacy "nearest".
//!
//! Each mode is written so that every output value goes through the same float32 operations in
//! the same order as torch's kernels, which makes the results bit-identical to torch on machines
//! where torch uses its AVX2/AVX-512 kernels (those contract `a * b + c` into an FMA; see
//! [`crate::fma`]). Index and weight tables are computed once per axis.

use rayon::prelude::*;

use crate::fma::fma_f32;
use crate::{Volume, VolumeError};

/// Below this many output voxels, rayon's task overhead outweighs the parallel speed-up.
const PAR_MIN_VOXELS: usize = 1 << 15;

fn check_resize(spatial: [usize; 3], size: [usize; 3], channels: usize) -> Result<bool, VolumeError> {
    let out_empty = channels == 0 || size.contains(&0);
    if !out_empty && spatial.contains(&0) {
        return Err(VolumeError::EmptyInput { spatial, size });
    }
    Ok(out_empty)
}

/// Runs `f(plane_index, plane)` over the `plane_len`-sized chunks of `out`, in parallel when the
/// output is large enough to pay for it.
fn for_each_plane<T: Send>(
    out: &mut [T],
    plane_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if plane_len == 0 {
        return;
    }
    if out.len() >= PAR_MIN_VOXELS {
        out.par_chunks_mut(plane_len)
            .enumerate()
            .for_each(|(i, p)| f(i, p));
    } else {
        out.chunks_mut(plane_len)
            .enumerate()
            .for_each(|(i, p)| f(i, p));
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

/// Adds one input row into the per-output accumulators of an output row, window by window.
/// For each accumulator the additions happen in input order, which is torch's order.
#[inline]
fn accumulate_row(acc: &mut [f32], row: &[f32], ws: &[usize], we: &[usize], uniform: Option<usize>) {
    match uniform {
        // Integer down-sampling factor: windows tile the row, no table lookups.
        Some(2) => {
            for (a, pair) in acc.iter_mut().zip(row.chunks_exact(2)) {
                *a = (*a + pair[0]) + pair[1];
            }
        }
        Some(k) => {
            for (a, win) in acc.iter_mut().zip(row.chunks_exact(k)) {
                let mut s = *a;
                for &x in win {
                    s += x;
                }
                *a = s;
            }
        }
        None => {
            for ((a, &s0), &s1) in acc.iter_mut().zip(ws).zip(we) {
                let mut s = *a;
                for &x in &row[s0..s1] {
                    s += x;
                }
                *a = s;
            }
        }
    }
}

/// MONAI `Resize(mode="area")`, i.e. torch `adaptive_avg_pool3d`: every output voxel is the
/// float32 sum of its window (in D, H, W order) divided by the window extents one after another.
/// Works for down- and up-sampling.
///
/// # Panics
/// If the input has no voxels along some axis but the output has some; see [`try_resize_area`].
pub fn resize_area(v: &Volume<f32>, size: [usize; 3]) -> Volume<f32> {
    try_resize_area(v, size).unwrap_or_else(|e| panic!("{e}"))
}

/// [`resize_area`] returning an error instead of panicking on an empty input.
pub fn try_resize_area(v: &Volume<f32>, size: [usize; 3]) -> Result<Volume<f32>, VolumeError> {
    let [c, d, h, w] = v.shape();
    let [od, oh, ow] = size;
    let out_shape = [c, od, oh, ow];
    if check_resize([d, h, w], size, c)? {
        return Volume::new(out_shape, Vec::new());
    }
    if [d, h, w] == size {
        return Ok(v.clone());
    }
    if size == [1, 1, 1] {
        return Ok(channel_means(v));
    }
    let (ds, de) = area_windows(d, od);
    let (hs, he) = area_windows(h, oh);
    let (ws, we) = area_windows(w, ow);
    let kw: Vec<f32> = ws.iter().zip(&we).map(|(&a, &b)| (b - a) as f32).collect();
    let uniform = (w % ow == 0).then_some(w / ow);
    let src = v.data();
    let chan_len = d * h * w;
    let mut out = vec![0f32; c * od * oh * ow];
    for_each_plane(&mut out, oh * ow, |plane, dst| {
        let (ci, odi) = (plane / od, plane % od);
        let chan = &src[ci * chan_len..(ci + 1) * chan_len];
        let (d0, d1) = (ds[odi], de[odi]);
        let kd = (d1 - d0) as f32;
        let mut acc = vec![0f32; ow];
        for ((dst_row, &h0), &h1) in dst.chunks_exact_mut(ow).zip(&hs).zip(&he) {
            acc.fill(0.0);
            for id in d0..d1 {
                for ih in h0..h1 {
                    let row = &chan[(id * h + ih) * w..(id * h + ih + 1) * w];
                    accumulate_row(&mut acc, row, &ws, &we, uniform);
                }
            }
            let kh = (h1 - h0) as f32;
            for ((o, &a), &k) in dst_row.iter_mut().zip(&acc).zip(&kw) {
                *o = a / kd / kh / k;
            }
        }
    });
    Volume::new(out_shape, out)
}

/// torch routes a 1x1x1 adaptive pool to `mean`; a pairwise f64 sum is within an ulp of it.
fn channel_means(v: &Volume<f32>) -> Volume<f32> {
    let c = v.channels();
    let means = (0..c)
        .map(|ci| {
            let ch = v.channel(ci);
            (ch.iter().map(|&x| f64::from(x)).sum::<f64>() / ch.len() as f64) as f32
        })
        .collect();
    Volume {
        shape: [c, 1, 1, 1],
        data: means,
    }
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

/// MONAI `Resize(mode="trilinear")` = torch `interpolate(mode="trilinear", align_corners=False)`
/// without anti-aliasing. Computed as separable W, H, D passes, which is exactly torch's nesting
/// (its innermost interpolation is along W), so the passes reproduce its rounding.
///
/// # Panics
/// If the input has no voxels along some axis but the output has some; see [`try_resize_trilinear`].
pub fn resize_trilinear(v: &Volume<f32>, size: [usize; 3]) -> Volume<f32> {
    try_resize_trilinear(v, size).unwrap_or_else(|e| panic!("{e}"))
}

/// [`resize_trilinear`] returning an error instead of panicking on an empty input.
pub fn try_resize_trilinear(v: &Volume<f32>, size: [usize; 3]) -> Result<Volume<f32>, VolumeError> {
    let [c, d, h, w] = v.shape();
    let [od, oh, ow] = size;
    let out_shape = [c, od, oh, ow];
    if check_resize([d, h, w], size, c)? {
        return Volume::new(out_shape, Vec::new());
    }
    if [d, h, w] == size {
        return Ok(v.clone());
    }
    let td = linear_taps(d, od);
    let th = linear_taps(h, oh);
    let tw = linear_taps(w, ow);

    // Only the input D-planes some output plane reads need the W and H passes.
    let mut slot = vec![usize::MAX; d];
    let mut needed = Vec::new();
    for &i in td.i0.iter().chain(&td.i1) {
        if slot[i] == usize::MAX {
            slot[i] = 0;
        }
    }
    for (i, s) in slot.iter_mut().enumerate() {
        if *s != usize::MAX {
            *s = needed.len();
            needed.push(i);
        }
    }

    let src = v.data();
    let plane_in = h * w;
    let plane_out = oh * ow;
    let nslots = needed.len();
    // tmp[c][slot] = input plane `needed[slot]` of channel c after the W and H passes.
    let mut tmp = vec![0f32; c * nslots * plane_out];
    for_each_plane(&mut tmp, plane_out, |p, dst| {
        let (ci, si) = (p / nslots, p % nslots);
        let base = (ci * d + needed[si]) * plane_in;
        let plane = &src[base..base + plane_in];
        let mut rows = vec![0f32; h * ow];
        for (row_out, row_in) in rows.chunks_exact_mut(ow).zip(plane.chunks_exact(w)) {
            for (o, j) in row_out.iter_mut().zip(0..ow) {
                *o = blend(row_in[tw.i0[j]], tw.l0[j], row_in[tw.i1[j]], tw.l1[j]);
            }
        }
        for (oi, dst_row) in dst.chunks_exact_mut(ow).enumerate() {
            let r0 = &rows[th.i0[oi] * ow..(th.i0[oi] + 1) * ow];
            let r1 = &rows[th.i1[oi] * ow..(th.i1[oi] + 1) * ow];
            let (w0, w1) = (th.l0[oi], th.l1[oi]);
            for ((o, &a), &b) in dst_row.iter_mut().zip(r0).zip(r1) {
                *o = blend(a, w0, b, w1);
            }
        }
    });

    let mut out = vec![0f32; c * od * plane_out];
    for_each_plane(&mut out, plane_out, |p, dst| {
        let (ci, odi) = (p / od, p % od);
        let s0 = (ci * nslots + slot[td.i0[odi]]) * plane_out;
        let s1 = (ci * nslots + slot[td.i1[odi]]) * plane_out;
        let (p0, p1) = (&tmp[s0..s0 + plane_out], &tmp[s1..s1 + plane_out]);
        let (w0, w1) = (td.l0[odi], td.l1[odi]);
        for ((o, &a), &b) in dst.iter_mut().zip(p0).zip(p1) {
            *o = blend(a, w0, b, w1);
        }
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
    let [c, d, h, w] = v.shape();
    let [od, oh, ow] = size;
    let out_shape = [c, od, oh, ow];
    if check_resize([d, h, w], size, c)? {
        return Volume::new(out_shape, Vec::new());
    }
    if [d, h, w] == size {
        return Ok(v.clone());
    }
    let sd = nearest_index(d, od);
    let sh = nearest_index(h, oh);
    let sw = nearest_index(w, ow);
    let src = v.data();
    let plane_out = oh * ow;
    // A placeholder value to size the buffer; every element is overwritten below.
    let mut out = vec![src[0]; c * od * plane_out];
    for_each_plane(&mut out, plane_out, |p, dst| {
        let (ci, odi) = (p / od, p % od);
        let plane = &src[(ci * d + sd[odi]) * h * w..(ci * d + sd[odi] + 1) * h * w];
        for (dst_row, &ih) in dst.chunks_exact_mut(ow).zip(&sh) {
            let row = &plane[ih * w..(ih + 1) * w];
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
        let v = Volume::from_fn([2, 3, 5, 7], |c, d, h, w| (c * 1000 + d * 100 + h * 10 + w) as u16);
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
        assert!(matches!(try_resize_area(&v, [2, 2, 2]), Err(VolumeError::EmptyInput { .. })));
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
        let win = |i: usize, n_in: usize, n_out: usize| ((i * n_in) / n_out, ((i + 1) * n_in).div_ceil(n_out));
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
        let (td, th, tw) = (linear_taps(d, size[0]), linear_taps(h, size[1]), linear_taps(w, size[2]));
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
    fn plane_kernels_match_per_voxel_definitions() {
        // Sizes on both sides of PAR_MIN_VOXELS so the serial and the rayon path are both checked,
        // and factors that hit the uniform-window fast paths (2, 3) and the table path.
        let v = Volume::from_fn([2, 9, 70, 66], |c, d, h, w| {
            ((c * 13 + d * 7 + h * 3 + w * 5) % 17) as f32 / 17.0 + 0.01 * w as f32
        });
        for size in [[8, 64, 64], [3, 35, 33], [3, 35, 22], [4, 7, 5], [13, 71, 67], [20, 140, 132]] {
            assert_eq!(resize_area(&v, size), naive_area(&v, size), "area {size:?}");
            assert_eq!(resize_trilinear(&v, size), naive_trilinear(&v, size), "trilinear {size:?}");
        }
    }
}
