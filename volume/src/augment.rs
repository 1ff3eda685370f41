//! The training-time augmentation of the M3D LaMed datasets, drawn once per sample and applied
//! as a single fused pass.
//!
//! The reference chain is MONAI `RandRotate90(prob 0.5, spatial_axes (1, 2), max_k 3)`, then
//! `RandFlip(prob 0.1)` on spatial axis 0, 1 and 2, then `RandScaleIntensity(factors 0.1,
//! prob 0.5)` and `RandShiftIntensity(offsets 0.1, prob 0.5)`. Rotation and flips are all index
//! permutations of each (channel, depth) plane, so they compose into one affine source-index
//! mapping per output row; scale and shift fold into the same write. Images and masks use the
//! same mapping, so a mask stays aligned with its image.
//!
//! This runs on a data-loader worker per sample; those already run in parallel across samples,
//! so the pass itself is single-threaded.

use rand::Rng;

use crate::{shape_len, Volume};

/// Probabilities and ranges of the reference augmentation. `Default` is the reference setting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentConfig {
    pub rot90_prob: f32,
    /// Rotations are by `k` quarter turns with `k` uniform in `1..=rot90_max_k` (0 disables).
    pub rot90_max_k: u8,
    /// Probability of flipping, drawn separately for each spatial axis.
    pub flip_prob: f32,
    /// The intensity factor `f` is uniform in `[-scale_factor, scale_factor)`; image *= 1 + f.
    pub scale_factor: f32,
    pub scale_prob: f32,
    /// The offset `o` is uniform in `[-shift_offset, shift_offset)`; image += o.
    pub shift_offset: f32,
    pub shift_prob: f32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            rot90_prob: 0.5,
            rot90_max_k: 3,
            flip_prob: 0.1,
            scale_factor: 0.1,
            scale_prob: 0.5,
            shift_offset: 0.1,
            shift_prob: 0.5,
        }
    }
}

/// One draw of the augmentation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentParams {
    /// Quarter turns in the H-W plane, as `torch.rot90(x, k, dims=(2, 3))`; 0 = not rotated.
    pub rot90_k: u8,
    /// Flip of spatial axis D, H, W (applied after the rotation, on the rotated array).
    pub flip: [bool; 3],
    /// Factor `f`: the image is multiplied by `1 + f`.
    pub scale: Option<f32>,
    /// Offset `o`: added to the image after the scaling.
    pub shift: Option<f32>,
}

impl AugmentParams {
    /// No change at all.
    pub fn identity() -> Self {
        Self {
            rot90_k: 0,
            flip: [false; 3],
            scale: None,
            shift: None,
        }
    }

    /// Draws one sample. Always consumes exactly nine values from `rng`, in this order, whatever
    /// the outcomes (so the stream position after a sample does not depend on the sample):
    ///
    /// - `f32` u: rotate if `u < rot90_prob`;
    /// - `f64` u: `k = 1 + floor(u * rot90_max_k)`;
    /// - three `f32` u, for spatial axes D, H, W: flip if `u < flip_prob`;
    /// - `f32` u: scale if `u < scale_prob`; `f32` u: `f = scale_factor * (2u - 1)`;
    /// - `f32` u: shift if `u < shift_prob`; `f32` u: `o = shift_offset * (2u - 1)`.
    pub fn sample<R: Rng + ?Sized>(cfg: &AugmentConfig, rng: &mut R) -> Self {
        let rot_u: f32 = rng.random();
        let k_u: f64 = rng.random();
        let flip_u: [f32; 3] = [rng.random(), rng.random(), rng.random()];
        let scale_u: f32 = rng.random();
        let scale_v: f32 = rng.random();
        let shift_u: f32 = rng.random();
        let shift_v: f32 = rng.random();

        let max_k = u64::from(cfg.rot90_max_k);
        let rot90_k = if max_k > 0 && rot_u < cfg.rot90_prob {
            let k = 1 + ((k_u * max_k as f64) as u64).min(max_k - 1);
            (k % 4) as u8
        } else {
            0
        };
        Self {
            rot90_k,
            flip: flip_u.map(|u| u < cfg.flip_prob),
            scale: (scale_u < cfg.scale_prob).then_some(cfg.scale_factor * (2.0 * scale_v - 1.0)),
            shift: (shift_u < cfg.shift_prob).then_some(cfg.shift_offset * (2.0 * shift_v - 1.0)),
        }
    }

    /// The `[C, D, H, W]` shape after the rotation (odd quarter turns swap H and W).
    pub fn output_shape(&self, shape: [usize; 4]) -> [usize; 4] {
        let [c, d, h, w] = shape;
        if self.rot90_k % 2 == 1 {
            [c, d, w, h]
        } else {
            shape
        }
    }
}

/// Source index of output `(i, j)` within a plane: `base + i * si + j * sj`.
struct PlaneMap {
    base: isize,
    si: isize,
    sj: isize,
}

fn plane_map(k: u8, flip_h: bool, flip_w: bool, h: usize, w: usize) -> PlaneMap {
    let (h, w) = (h as isize, w as isize);
    // Rotated (pre-flip) output (r, s) reads source `off + cr * r + cs * s`, torch.rot90 rules:
    // k=1: x[s, W-1-r]; k=2: x[H-1-r, W-1-s]; k=3: x[H-1-s, r].
    let (off, cr, cs, oh, ow) = match k % 4 {
        0 => (0, w, 1, h, w),
        1 => (w - 1, -1, w, w, h),
        2 => ((h - 1) * w + w - 1, -w, -1, h, w),
        _ => ((h - 1) * w, 1, -w, w, h),
    };
    // A flip maps output i to r = oh-1-i.
    let (ai, bi) = if flip_h { (oh - 1, -1) } else { (0, 1) };
    let (aj, bj) = if flip_w { (ow - 1, -1) } else { (0, 1) };
    PlaneMap {
        base: off + cr * ai + cs * aj,
        si: cr * bi,
        sj: cs * bj,
    }
}

// `inline(always)`: the u8 path calls these from an AVX2-enabled function, and only inlined code is compiled with
// that function's instruction set.
#[inline(always)]
fn geometric_into<S: Copy, T: Copy>(
    p: &AugmentParams,
    src: &[S],
    shape: [usize; 4],
    dst: &mut [T],
    f: impl Fn(S) -> T,
) -> [usize; 4] {
    let n = shape_len(shape).unwrap_or_else(|| panic!("shape {shape:?} overflows usize"));
    assert_eq!(
        src.len(),
        n,
        "augment: source has {} values, shape {shape:?} needs {n}",
        src.len()
    );
    assert_eq!(
        dst.len(),
        n,
        "augment: destination has {} values, shape {shape:?} needs {n}",
        dst.len()
    );
    let out_shape = p.output_shape(shape);
    if n == 0 {
        return out_shape;
    }
    let [c, d, h, w] = shape;
    let [_, _, oh, ow] = out_shape;
    let plane = h * w;
    let m = plane_map(p.rot90_k, p.flip[1], p.flip[2], h, w);
    for ci in 0..c {
        for di in 0..d {
            let sd = if p.flip[0] { d - 1 - di } else { di };
            let src_plane = &src[(ci * d + sd) * plane..(ci * d + sd + 1) * plane];
            let dst_plane = &mut dst[(ci * d + di) * plane..(ci * d + di + 1) * plane];
            map_plane(&m, src_plane, dst_plane, oh, ow, &f);
        }
    }
    out_shape
}

#[inline(always)]
fn map_plane<S: Copy, T: Copy>(
    m: &PlaneMap,
    src: &[S],
    dst: &mut [T],
    oh: usize,
    ow: usize,
    f: &impl Fn(S) -> T,
) {
    // All indices below are in range by construction of `plane_map`; slicing still checks them.
    let at = |i: usize, j: usize| (m.base + i as isize * m.si + j as isize * m.sj) as usize;
    match m.sj {
        1 => {
            for (i, row) in dst.chunks_exact_mut(ow).enumerate() {
                let s = at(i, 0);
                for (o, &x) in row.iter_mut().zip(&src[s..s + ow]) {
                    *o = f(x);
                }
            }
        }
        -1 => {
            for (i, row) in dst.chunks_exact_mut(ow).enumerate() {
                let s = at(i, ow - 1);
                for (o, &x) in row.iter_mut().zip(src[s..s + ow].iter().rev()) {
                    *o = f(x);
                }
            }
        }
        _ => {
            // Transposing mapping (|si| == 1): 8x8 blocks are read as 8 contiguous source runs
            // (one per output column) and written as 8 contiguous output row pieces.
            const B: usize = 8;
            let (rows_end, cols_end) = (oh - oh % B, ow - ow % B);
            let mut tile = [[src[0]; B]; B];
            for i0 in (0..rows_end).step_by(B) {
                for j0 in (0..cols_end).step_by(B) {
                    for (jj, run) in tile.iter_mut().enumerate() {
                        let (a, b) = (at(i0, j0 + jj), at(i0 + B - 1, j0 + jj));
                        if m.si > 0 {
                            run.copy_from_slice(&src[a..a + B]);
                        } else {
                            run.copy_from_slice(&src[b..b + B]);
                            run.reverse();
                        }
                    }
                    // Transposed first, so each output piece converts from a contiguous run (one vector
                    // operation when `f` vectorises) instead of gathering a column of the tile.
                    let tile_t: [[S; B]; B] =
                        std::array::from_fn(|ii| std::array::from_fn(|jj| tile[jj][ii]));
                    for (ii, run) in tile_t.iter().enumerate() {
                        let piece = &mut dst[(i0 + ii) * ow + j0..(i0 + ii) * ow + j0 + B];
                        for (o, &x) in piece.iter_mut().zip(run) {
                            *o = f(x);
                        }
                    }
                }
                for i in i0..i0 + B {
                    for j in cols_end..ow {
                        dst[i * ow + j] = f(src[at(i, j)]);
                    }
                }
            }
            for i in rows_end..oh {
                for j in 0..ow {
                    dst[i * ow + j] = f(src[at(i, j)]);
                }
            }
        }
    }
}

/// `1 + f` as MONAI forms it (in float64, then used as a float32 scalar by torch).
fn scale_multiplier(f: f32) -> f32 {
    (1.0 + f64::from(f)) as f32
}

/// Applies rotation, flips, scale and shift to an image in one pass from `src` to `dst` (both of
/// `shape`'s length); returns the output shape. Scale then shift are two float32 operations, as
/// MONAI's two transforms.
///
/// # Panics
/// If `src` or `dst` does not have exactly the number of elements of `shape`.
pub fn augment_image_into(
    p: &AugmentParams,
    src: &[f32],
    shape: [usize; 4],
    dst: &mut [f32],
) -> [usize; 4] {
    match (p.scale, p.shift) {
        (None, None) => geometric_into(p, src, shape, dst, |x| x),
        (Some(f), None) => {
            let s = scale_multiplier(f);
            geometric_into(p, src, shape, dst, move |x| x * s)
        }
        (None, Some(o)) => geometric_into(p, src, shape, dst, move |x| x + o),
        (Some(f), Some(o)) => {
            let s = scale_multiplier(f);
            geometric_into(p, src, shape, dst, move |x| x * s + o)
        }
    }
}

/// [`augment_image_into`] straight from 8-bit storage: each source value `q` is read as `q / 255` (in float32,
/// exactly as `m3d-shards` decodes `u8` images) and augmented in the same single pass, so a `u8` shard is
/// decoded and augmented without an intermediate float volume. Identical results to decoding first.
///
/// # Panics
/// If `src` or `dst` does not have exactly the number of elements of `shape`.
pub fn augment_u8_image_into(
    p: &AugmentParams,
    src: &[u8],
    shape: [usize; 4],
    dst: &mut [f32],
) -> [usize; 4] {
    // The same float32 operations in the same order as decoding (`q / 255`) and then MONAI's scale and shift, so
    // the same results; an absent scale or shift is `* 1` or `+ 0`, both exact on these non-negative values. Written
    // as arithmetic rather than a 256-entry table so that rows vectorise (a table lookup per voxel does not).
    let s = p.scale.map_or(1.0, scale_multiplier);
    let o = p.shift.unwrap_or(0.0);
    let f = move |q: u8| f32::from(q) / 255.0 * s + o;
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above); the function differs from the portable path only in the
        // instructions it is compiled to.
        return unsafe { geometric_u8_avx2(p, src, shape, dst, f) };
    }
    geometric_into(p, src, shape, dst, f)
}

/// [`geometric_into`] compiled for AVX2: the build targets baseline x86-64 (SSE2), where the u8 -> f32 rows
/// vectorise four values at a time; AVX2 widens that to eight and adds the byte-to-int widening in one instruction.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2")]
unsafe fn geometric_u8_avx2(
    p: &AugmentParams,
    src: &[u8],
    shape: [usize; 4],
    dst: &mut [f32],
    f: impl Fn(u8) -> f32,
) -> [usize; 4] {
    geometric_into(p, src, shape, dst, f)
}

/// The geometric part only (rotation and flips), identical mapping to [`augment_image_into`].
///
/// # Panics
/// If `src` or `dst` does not have exactly the number of elements of `shape`.
pub fn augment_mask_into<T: Copy>(
    p: &AugmentParams,
    src: &[T],
    shape: [usize; 4],
    dst: &mut [T],
) -> [usize; 4] {
    geometric_into(p, src, shape, dst, |x| x)
}

/// Allocating form of [`augment_image_into`].
pub fn augment_image(p: &AugmentParams, v: &Volume<f32>) -> Volume<f32> {
    let mut dst = vec![0f32; v.len()];
    let shape = augment_image_into(p, v.data(), v.shape(), &mut dst);
    Volume { shape, data: dst }
}

/// Allocating form of [`augment_mask_into`].
pub fn augment_mask<T: Copy>(p: &AugmentParams, v: &Volume<T>) -> Volume<T> {
    let Some(&first) = v.data().first() else {
        return Volume {
            shape: p.output_shape(v.shape()),
            data: Vec::new(),
        };
    };
    let mut dst = vec![first; v.len()];
    let shape = augment_mask_into(p, v.data(), v.shape(), &mut dst);
    Volume { shape, data: dst }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    // Step-by-step reference operations, each written from its index definition.

    /// torch.rot90(x, 1, dims=(2, 3)): out[c, d, i, j] = x[c, d, j, W-1-i].
    fn rot90_once<T: Copy>(v: &Volume<T>) -> Volume<T> {
        let [c, d, h, w] = v.shape();
        Volume::from_fn([c, d, w, h], |ci, di, i, j| {
            v.get([ci, di, j, w - 1 - i]).unwrap()
        })
    }

    fn rot90<T: Copy>(v: &Volume<T>, k: u8) -> Volume<T> {
        (0..k).fold(v.clone(), |acc, _| rot90_once(&acc))
    }

    fn flip<T: Copy>(v: &Volume<T>, axis: usize) -> Volume<T> {
        let s = v.shape();
        Volume::from_fn(s, |c, d, h, w| {
            let mut idx = [c, d, h, w];
            idx[axis + 1] = s[axis + 1] - 1 - idx[axis + 1];
            v.get(idx).unwrap()
        })
    }

    fn stepwise(p: &AugmentParams, v: &Volume<f32>) -> Volume<f32> {
        let mut x = rot90(v, p.rot90_k);
        for axis in 0..3 {
            if p.flip[axis] {
                x = flip(&x, axis);
            }
        }
        if let Some(f) = p.scale {
            let s = (1.0 + f as f64) as f32;
            x = x.map(|a| a * s);
        }
        if let Some(o) = p.shift {
            x = x.map(|a| a + o);
        }
        x
    }

    fn test_volume(shape: [usize; 4]) -> Volume<f32> {
        Volume::from_fn(shape, |c, d, h, w| {
            (c * 10_000 + d * 1000 + h * 37 + w) as f32 * 0.001
        })
    }

    #[test]
    fn fused_pass_equals_stepwise_composition_for_all_geometric_combinations() {
        // Non-square planes, sizes that are not multiples of TILE, and two channels.
        for shape in [[2, 3, 5, 7], [1, 4, 37, 21], [1, 2, 16, 33]] {
            let v = test_volume(shape);
            for k in 0..4u8 {
                for bits in 0..8u8 {
                    let flip = [bits & 1 != 0, bits & 2 != 0, bits & 4 != 0];
                    for (scale, shift) in [
                        (None, None),
                        (Some(-0.07f32), None),
                        (None, Some(0.03f32)),
                        (Some(0.09), Some(-0.1)),
                    ] {
                        let p = AugmentParams {
                            rot90_k: k,
                            flip,
                            scale,
                            shift,
                        };
                        let want = stepwise(&p, &v);
                        let mut dst = vec![0f32; v.len()];
                        let shape_out = augment_image_into(&p, v.data(), v.shape(), &mut dst);
                        assert_eq!(shape_out, want.shape(), "{p:?}");
                        assert_eq!(dst, want.data(), "{p:?} {shape:?}");
                        assert_eq!(augment_image(&p, &v), want);
                    }
                    let p = AugmentParams {
                        rot90_k: k,
                        flip,
                        scale: None,
                        shift: None,
                    };
                    let labels = v.map(|x| (x * 1000.0).round() as u32);
                    let m = augment_mask(&p, &labels);
                    assert_eq!(m, stepwise(&p, &v).map(|x| (x * 1000.0).round() as u32));
                }
            }
        }
    }

    #[test]
    fn u8_path_equals_decoding_then_augmenting() {
        let shape = [1, 3, 5, 7];
        let q: Vec<u8> = (0..105u32).map(|i| (i * 37 % 256) as u8).collect();
        let decoded: Vec<f32> = q.iter().map(|&v| f32::from(v) / 255.0).collect();
        for k in 0..4u8 {
            for bits in 0..8u8 {
                for (scale, shift) in [(None, None), (Some(0.07f32), Some(-0.03f32))] {
                    let p = AugmentParams {
                        rot90_k: k,
                        flip: [bits & 1 != 0, bits & 2 != 0, bits & 4 != 0],
                        scale,
                        shift,
                    };
                    let (mut a, mut b) = (vec![0f32; 105], vec![0f32; 105]);
                    let sa = augment_u8_image_into(&p, &q, shape, &mut a);
                    let sb = augment_image_into(&p, &decoded, shape, &mut b);
                    assert_eq!(sa, sb);
                    assert!(a == b, "k {k} flips {bits} scale {scale:?}");
                }
            }
        }
    }

    #[test]
    fn four_quarter_turns_and_double_flips_are_identity() {
        let v = test_volume([1, 3, 6, 9]);
        let mut x = v.clone();
        for _ in 0..4 {
            let p = AugmentParams {
                rot90_k: 1,
                ..AugmentParams::identity()
            };
            x = augment_image(&p, &x);
        }
        assert_eq!(x, v);
        let p = AugmentParams {
            rot90_k: 3,
            flip: [true, true, true],
            ..AugmentParams::identity()
        };
        let once = augment_image(&p, &v);
        assert_ne!(once, v);
        assert_eq!(once.shape(), [1, 3, 9, 6]);
        let flips = AugmentParams {
            flip: [true, true, true],
            ..AugmentParams::identity()
        };
        let back = augment_image(
            &AugmentParams {
                rot90_k: 1,
                ..AugmentParams::identity()
            },
            &augment_image(&flips, &once),
        );
        assert_eq!(back, v);
        assert_eq!(augment_image(&AugmentParams::identity(), &v), v);
    }

    #[test]
    fn sampling_is_reproducible_and_follows_the_config() {
        let cfg = AugmentConfig::default();
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..2000)
                .map(|_| AugmentParams::sample(&cfg, &mut rng))
                .collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        let n = a.len() as f32;
        let rot = a.iter().filter(|p| p.rot90_k != 0).count() as f32 / n;
        assert!((rot - 0.5).abs() < 0.05, "{rot}");
        for k in 1..=3u8 {
            let f = a.iter().filter(|p| p.rot90_k == k).count() as f32 / n;
            assert!((f - 1.0 / 6.0).abs() < 0.04, "k={k}: {f}");
        }
        for axis in 0..3 {
            let f = a.iter().filter(|p| p.flip[axis]).count() as f32 / n;
            assert!((f - 0.1).abs() < 0.03, "axis {axis}: {f}");
        }
        let scales: Vec<f32> = a.iter().filter_map(|p| p.scale).collect();
        assert!((scales.len() as f32 / n - 0.5).abs() < 0.05);
        assert!(scales.iter().all(|&f| (-0.1..0.1).contains(&f)));
        assert!(scales.iter().any(|&f| f < -0.05) && scales.iter().any(|&f| f > 0.05));
        let shifts: Vec<f32> = a.iter().filter_map(|p| p.shift).collect();
        assert!(shifts.iter().all(|&o| (-0.1..0.1).contains(&o)));
        // Exactly nine draws per sample: the stream continues identically after a sample.
        let mut r1 = ChaCha8Rng::seed_from_u64(5);
        let _ = AugmentParams::sample(&cfg, &mut r1);
        let mut r2 = ChaCha8Rng::seed_from_u64(5);
        let _: f32 = r2.random();
        let _: f64 = r2.random();
        for _ in 0..7 {
            let _: f32 = r2.random();
        }
        assert_eq!(r1.random::<u64>(), r2.random::<u64>());
        let never = AugmentConfig {
            rot90_prob: 0.0,
            flip_prob: 0.0,
            scale_prob: 0.0,
            shift_prob: 0.0,
            ..cfg
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        assert!(
            (0..100).all(|_| AugmentParams::sample(&never, &mut rng) == AugmentParams::identity())
        );
    }

    #[test]
    #[should_panic(expected = "destination has 3 values")]
    fn wrong_destination_length_is_reported() {
        let v = test_volume([1, 2, 2, 2]);
        let mut dst = vec![0f32; 3];
        augment_image_into(&AugmentParams::identity(), v.data(), v.shape(), &mut dst);
    }
}
