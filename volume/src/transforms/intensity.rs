//! MONAI `ScaleIntensityRangePercentiles` (relative=False, channel_wise=False) and the percentile
//! it is built on.
//!
//! MONAI's `percentile` dispatches on size: up to 1,000,000 voxels it calls `torch.quantile`
//! (arithmetic in the data type), above that `np.percentile` (index and interpolation in float64).
//! Both are reproduced, so the scaling bounds are the ones MONAI derives for the same input.

use std::cmp::Ordering;
use std::ops::{Add, Div, Mul, Neg, Sub};

use crate::fma::fma_f32;
use crate::Volume;

/// MONAI calls numpy instead of torch for tensors with more elements than this (pytorch#64947).
pub const MONAI_TORCH_QUANTILE_MAX: usize = 1_000_000;

/// The float types the reference pipelines run this transform in (float32 images; float64 for
/// NIfTI data read with nibabel's `get_fdata`).
pub trait Real:
    Copy
    + PartialOrd
    + Send
    + Sync
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    const HALF: Self;
    const NAN: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn to_f32(self) -> f32;
    /// `a * b + c` rounded once, as the contracted C++ in torch's kernels computes it.
    fn fused(a: Self, b: Self, c: Self) -> Self;
    fn total_order(&self, other: &Self) -> Ordering;
    fn is_nan(self) -> bool;
    fn abs(self) -> Self;
    fn floor(self) -> Self;
    fn ceil(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const HALF: Self = 0.5;
    const NAN: Self = f32::NAN;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn fused(a: Self, b: Self, c: Self) -> Self {
        fma_f32(a, b, c)
    }
    fn total_order(&self, other: &Self) -> Ordering {
        self.total_cmp(other)
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    fn abs(self) -> Self {
        f32::abs(self)
    }
    fn floor(self) -> Self {
        f32::floor(self)
    }
    fn ceil(self) -> Self {
        f32::ceil(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const HALF: Self = 0.5;
    const NAN: Self = f64::NAN;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn fused(a: Self, b: Self, c: Self) -> Self {
        // Called a handful of times per volume, so libm's out-of-line fma is fine here.
        a.mul_add(b, c)
    }
    fn total_order(&self, other: &Self) -> Ordering {
        self.total_cmp(other)
    }
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    fn abs(self) -> Self {
        f64::abs(self)
    }
    fn floor(self) -> Self {
        f64::floor(self)
    }
    fn ceil(self) -> Self {
        f64::ceil(self)
    }
}

/// Values at the given ascending ranks of `buf` (as if sorted), reordering `buf` in the process.
fn values_at_ranks<T: Real>(buf: &mut [T], ranks: &[usize]) -> Vec<T> {
    let mut out = Vec::with_capacity(ranks.len());
    let mut from = 0;
    for &r in ranks {
        // After selecting rank `from`, everything right of it is >= it, so later (larger) ranks
        // can be selected within that suffix.
        let (_, v, _) = buf[from..].select_nth_unstable_by(r - from, T::total_order);
        out.push(*v);
        from = r;
    }
    out
}

/// How to turn the sorted values into one percentile.
enum Plan<T> {
    /// torch.quantile: ranks and weight in the data type, torch's lerp.
    Torch {
        below: usize,
        above: usize,
        weight: T,
    },
    /// np.percentile "linear": float64 virtual index, float64 interpolation.
    Numpy {
        prev: usize,
        next: usize,
        gamma: f64,
    },
}

fn plan<T: Real>(n: usize, q_percent: f64) -> Plan<T> {
    if n <= MONAI_TORCH_QUANTILE_MAX {
        let q = T::from_f64(q_percent / 100.0);
        // torch computes q * (n - 1) with the integer converted to the data type.
        let rank = q * T::from_f64((n - 1) as f64);
        let below = rank.to_f64() as usize; // truncation, as `toType(kLong)`
        let weight = rank - T::from_f64(below as f64);
        let above = rank.ceil().to_f64() as usize;
        Plan::Torch {
            below: below.min(n - 1),
            above: above.min(n - 1),
            weight,
        }
    } else {
        let virt = (n - 1) as f64 * (q_percent / 100.0);
        let (prev, next, prev_f) = if virt >= (n - 1) as f64 {
            // numpy indexes the last element as -1, which also enters gamma.
            (n - 1, n - 1, -1.0)
        } else if virt < 0.0 {
            (0, 0, 0.0)
        } else {
            let p = virt.floor();
            (p as usize, p as usize + 1, p)
        };
        Plan::Numpy {
            prev,
            next,
            gamma: virt - prev_f,
        }
    }
}

fn plan_ranks<T>(p: &Plan<T>) -> [usize; 2] {
    match *p {
        Plan::Torch { below, above, .. } => [below, above],
        Plan::Numpy { prev, next, .. } => [prev, next],
    }
}

fn finish<T: Real>(p: &Plan<T>, lo: T, hi: T) -> T {
    match *p {
        Plan::Torch { weight, .. } => {
            // torch's lerp, with the compiler's FMA contraction of both branches.
            let diff = hi - lo;
            if weight.abs() < T::HALF {
                T::fused(weight, diff, lo)
            } else {
                T::fused(-diff, T::ONE - weight, hi)
            }
        }
        Plan::Numpy { gamma, .. } => {
            // numpy's _lerp: the difference in the array dtype, the rest in float64.
            let diff = (hi - lo).to_f64();
            let r = if gamma >= 0.5 {
                hi.to_f64() - diff * (1.0 - gamma)
            } else {
                lo.to_f64() + diff * gamma
            };
            T::from_f64(r)
        }
    }
}

/// Percentiles of all values as MONAI's `percentile(x, q)` returns them for a tensor of this
/// dtype (`q` in percent). NaN if any value is NaN or `data` is empty.
pub fn monai_percentiles<T: Real>(data: &[T], qs: &[f64]) -> Vec<T> {
    percentiles_as::<T, T>(data, qs)
}

/// [`monai_percentiles`] of `data` converted to the type `T`, without making that copy: values
/// are selected in the storage type `S` and converted exactly (`S` no wider than `T`), which
/// keeps their order, so the result is the one `T` data would give.
fn percentiles_as<S: Real, T: Real>(data: &[S], qs: &[f64]) -> Vec<T> {
    let n = data.len();
    if n == 0 || data.iter().any(|x| x.is_nan()) {
        return vec![T::NAN; qs.len()];
    }
    let plans: Vec<Plan<T>> = qs.iter().map(|&q| plan(n, q)).collect();
    let mut ranks: Vec<usize> = plans.iter().flat_map(plan_ranks).collect();
    ranks.sort_unstable();
    ranks.dedup();
    let mut buf = data.to_vec();
    let vals = values_at_ranks(&mut buf, &ranks);
    let value_of = |r: usize| T::from_f64(vals[ranks.partition_point(|&x| x < r)].to_f64());
    plans
        .iter()
        .map(|p| {
            let [a, b] = plan_ranks(p);
            finish(p, value_of(a), value_of(b))
        })
        .collect()
}

/// The arithmetic of MONAI `ScaleIntensityRange` in the type `T` (the data's, or a wider one the
/// data is exactly converted to), with bounds from [`monai_percentiles`].
fn scale_range<S: Real, T: Real>(
    data: &[S],
    lower: f64,
    upper: f64,
    b_min: f64,
    b_max: f64,
    clip: bool,
    mut out: impl FnMut(usize, T),
) {
    let p = percentiles_as::<S, T>(data, &[lower, upper]);
    let (a_min, a_max) = (p[0], p[1]);
    let bmin = T::from_f64(b_min);
    let bmax = T::from_f64(b_max);
    let span = a_max - a_min;
    let widen = |x: S| T::from_f64(x.to_f64());
    if span == T::ZERO {
        // MONAI warns and only shifts; no clipping on this path.
        for (i, &x) in data.iter().enumerate() {
            out(i, widen(x) - a_min + bmin);
        }
        return;
    }
    let scale = T::from_f64(b_max - b_min);
    for (i, &x) in data.iter().enumerate() {
        let mut y = (widen(x) - a_min) / span * scale + bmin;
        if clip {
            // torch.clamp keeps NaN.
            y = if y < bmin {
                bmin
            } else if y > bmax {
                bmax
            } else {
                y
            };
        }
        out(i, y);
    }
}

/// MONAI `ScaleIntensityRangePercentiles(lower, upper, b_min, b_max, clip, relative=False)` on a
/// float32 volume: the `lower` / `upper` percentiles of all voxels are mapped linearly onto
/// `[b_min, b_max]` (clipped if `clip`). When both percentiles are equal, MONAI only shifts by
/// `b_min - a_min` and does not clip; so does this.
pub fn scale_intensity_range_percentiles(
    v: &mut Volume<f32>,
    lower: f64,
    upper: f64,
    b_min: f32,
    b_max: f32,
    clip: bool,
) {
    let data = v.data_mut();
    let mut res = vec![0f32; data.len()];
    scale_range::<f32, f32>(
        data,
        lower,
        upper,
        f64::from(b_min),
        f64::from(b_max),
        clip,
        |i, y| res[i] = y,
    );
    data.copy_from_slice(&res);
}

/// The same transform applied to float64 data, as the M3D-RefSeg script runs it on nibabel's
/// `get_fdata()` output: percentiles and scaling in float64, result cast to float32 (MONAI's
/// default output dtype). `v` may also be float32 holding those float64 values exactly (a NIfTI
/// read as `f32`, e.g. any int16 CT): the result is the same as for the float64 copy, which is
/// never made.
pub fn scale_intensity_range_percentiles_f64<S: Real>(
    v: &Volume<S>,
    lower: f64,
    upper: f64,
    b_min: f64,
    b_max: f64,
    clip: bool,
) -> Volume<f32> {
    let mut res = vec![0f32; v.len()];
    scale_range::<S, f64>(v.data(), lower, upper, b_min, b_max, clip, |i, y| {
        res[i] = y.to_f32()
    });
    Volume {
        shape: v.shape(),
        data: res,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_permuted_ramp_are_linear_interpolation() {
        // 0..n shuffled: the q-th percentile of 0..n-1 is q/100 * (n-1) on both code paths.
        for n in [11usize, 1_000_001] {
            let data: Vec<f64> = (0..n).map(|i| ((i * 7919) % n) as f64).collect();
            let p = monai_percentiles(&data, &[0.0, 0.5, 50.0, 99.5, 100.0]);
            for (got, q) in p.iter().zip([0.0, 0.5, 50.0, 99.5, 100.0]) {
                let want = q / 100.0 * (n - 1) as f64;
                assert!(
                    (got - want).abs() < 1e-6 * n as f64,
                    "n={n} q={q}: {got} vs {want}"
                );
            }
        }
        assert!(monai_percentiles(&[1.0f32, f32::NAN], &[50.0])[0].is_nan());
        assert!(monai_percentiles::<f32>(&[], &[50.0])[0].is_nan());
    }

    #[test]
    fn scaling_maps_percentiles_to_the_target_range() {
        let data: Vec<f32> = (0..101).map(|i| i as f32).collect();
        let mut v = Volume::new([1, 1, 1, 101], data).unwrap();
        scale_intensity_range_percentiles(&mut v, 10.0, 90.0, 0.0, 1.0, true);
        assert_eq!(v.data()[10], 0.0);
        assert_eq!(v.data()[90], 1.0);
        assert_eq!(v.data()[0], 0.0);
        assert_eq!(v.data()[100], 1.0);
        assert!((v.data()[50] - 0.5).abs() < 1e-7);
        // Equal percentiles: shift only, no clip.
        let mut c = Volume::new([1, 1, 1, 5], vec![2.0f32, 2.0, 2.0, 2.0, 7.0]).unwrap();
        scale_intensity_range_percentiles(&mut c, 10.0, 50.0, 1.0, 2.0, true);
        assert_eq!(c.data(), &[1.0, 1.0, 1.0, 1.0, 6.0]);
    }

    #[test]
    fn f64_scaling_of_f32_data_equals_scaling_its_f64_copy() {
        // Both percentile paths (torch.quantile up to 1e6 voxels, numpy above), CT-like values with
        // ties and fractions, and a constant volume (shift only).
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for n in [1usize, 997, 1_000_000, 1_000_003] {
            let data: Vec<f32> = (0..n)
                .map(|_| match next() % 5 {
                    0 => -1024.0,
                    1 => (next() % 4000) as f32 * 0.37 - 900.0,
                    _ => (next() % 3400) as f32 - 900.0,
                })
                .collect();
            let v32 = Volume::new([1, 1, 1, n], data.clone()).unwrap();
            let v64 =
                Volume::new([1, 1, 1, n], data.iter().map(|&x| f64::from(x)).collect()).unwrap();
            for (lo, hi, bmin, bmax, clip) in
                [(0.5, 99.5, 0.0, 1.0, true), (7.0, 93.0, -1.0, 2.5, false)]
            {
                let a = scale_intensity_range_percentiles_f64(&v32, lo, hi, bmin, bmax, clip);
                let b = scale_intensity_range_percentiles_f64(&v64, lo, hi, bmin, bmax, clip);
                assert!(
                    a.data()
                        .iter()
                        .zip(b.data())
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "n={n} {lo}/{hi}"
                );
            }
        }
        let c32 = Volume::new([1, 1, 1, 3], vec![5.5f32; 3]).unwrap();
        let c64 = Volume::new([1, 1, 1, 3], vec![5.5f64; 3]).unwrap();
        assert_eq!(
            scale_intensity_range_percentiles_f64(&c32, 0.5, 99.5, 0.0, 1.0, true).data(),
            scale_intensity_range_percentiles_f64(&c64, 0.5, 99.5, 0.0, 1.0, true).data()
        );
    }

    #[test]
    fn f64_scaling_can_differ_from_f32_scaling() {
        // Why RefSeg uses the float64 path: the same f32 values, scaled in f32 and in f64, do not
        // always round to the same f32 (the reference scales nibabel's float64 array).
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<f32> = (0..10_001)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 4000.0 - 1024.0
            })
            .collect();
        let mut a = Volume::new([1, 1, 1, data.len()], data.clone()).unwrap();
        scale_intensity_range_percentiles(&mut a, 0.5, 99.5, 0.0, 1.0, true);
        let b = scale_intensity_range_percentiles_f64(
            &Volume::new([1, 1, 1, data.len()], data).unwrap(),
            0.5,
            99.5,
            0.0,
            1.0,
            true,
        );
        assert!(a.data().iter().zip(b.data()).any(|(x, y)| x != y));
    }
}
