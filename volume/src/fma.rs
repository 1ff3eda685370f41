//! Correctly rounded single-precision fused multiply-add without a libm call, and the choice
//! between it and the CPU's FMA instruction ([`FmaKernel`]).
//!
//! torch's CPU kernels are built per ISA level and the compiler contracts `a * b + c` into an FMA
//! instruction on AVX2/AVX-512 machines; reproducing torch's results bit for bit therefore needs
//! an FMA. `f32::mul_add` is exact but, without `-C target-feature=+fma`, is an out-of-line libm
//! call per element; this version stays in registers and inlines into the resampling loops.
//! Where the CPU has FMA (and AVX2), loops compiled for those features use the instruction
//! itself: the same correctly rounded result, eight lanes at a time and no fix-up pass.

/// How the resampling loops compute a fused `a * b + c`: both give the correctly rounded result,
/// so outputs are bit-identical whichever runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FmaKernel {
    /// [`fma_f32_flagged`] in f64, then [`fma_f32`] for the flagged values: any x86-64 CPU.
    Emulated,
    /// The FMA instruction, in loops compiled for AVX2 + FMA (only chosen where the CPU has both).
    Hardware,
}

impl FmaKernel {
    /// The fastest kernel this CPU runs.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return FmaKernel::Hardware;
        }
        FmaKernel::Emulated
    }
}

/// `a * b + c` rounded once to f32 (for results in the normal f32 range).
///
/// The product of two f32 values is exact in f64, so the only error is the rounding of the f64
/// sum followed by the rounding to f32. Double rounding can only go wrong when the f64 sum lands
/// exactly on a midpoint between two f32 values; in that case the exact residual of the sum
/// (Knuth's two-sum) says on which side the true value lies.
#[inline(always)]
pub(crate) fn fma_f32(a: f32, b: f32, c: f32) -> f32 {
    let p = f64::from(a) * f64::from(b);
    let cd = f64::from(c);
    let s = p + cd;
    let bits = s.to_bits();
    // f64 has 29 more fraction bits than f32: a midpoint has exactly the top one of them set.
    if bits & 0x1FFF_FFFF == 0x1000_0000 {
        let bv = s - p;
        let av = s - bv;
        let err = (p - av) + (cd - bv);
        if err != 0.0 {
            let away_from_zero = (err > 0.0) == (s > 0.0);
            let nudged = if away_from_zero { bits + 1 } else { bits - 1 };
            return f64::from_bits(nudged) as f32;
        }
    }
    s as f32
}

/// Fast form of [`fma_f32`] for vectorisable loops: the f64 result rounded to f32, plus a flag
/// that is set only when that rounding may be wrong (the f64 sum sat exactly on an f32 rounding
/// midpoint and was itself inexact). Callers recompute flagged values with [`fma_f32`]. All
/// operations are branch-free so loops over rows of these vectorise.
#[inline(always)]
pub(crate) fn fma_f32_flagged(a: f32, b: f32, c: f32) -> (f32, bool) {
    let p = f64::from(a) * f64::from(b);
    let cd = f64::from(c);
    let s = p + cd;
    let bv = s - p;
    let av = s - bv;
    let err = (p - av) + (cd - bv);
    // The midpoint pattern lives entirely in the low 32 bits of the f64 encoding.
    let midpoint = (s.to_bits() as u32) & 0x1FFF_FFFF == 0x1000_0000;
    (s as f32, midpoint & (err != 0.0))
}

#[cfg(test)]
mod tests {
    use super::{fma_f32, fma_f32_flagged};
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_hardware_fma_on_random_and_tie_inputs() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200_000 {
            let a: f32 = rng.random_range(-4.0..4.0);
            let b: f32 = rng.random_range(-4.0..4.0);
            let c: f32 = rng.random_range(-4.0..4.0);
            assert_eq!(fma_f32(a, b, c).to_bits(), a.mul_add(b, c).to_bits());
            let (fast, suspect) = fma_f32_flagged(a, b, c);
            if !suspect {
                assert_eq!(fast.to_bits(), a.mul_add(b, c).to_bits());
            }
        }
        // Constructed double-rounding traps: the f64 sum is a tie for f32 but the exact value
        // is not (1 + 2^-24 + 2^-60 style values).
        let one_plus = f32::from_bits(1.0f32.to_bits() + 1); // 1 + 2^-23
        let q = 1.0 + 2.0f32.powi(-12);
        let mut needed_fix = 0;
        for &(a, b, c) in &[
            // (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 is an exact f32 midpoint; +-2^-60 vanishes in the
            // f64 sum but decides the correct rounding.
            (q, q, 2.0f32.powi(-60)),
            (q, q, -(2.0f32.powi(-60))),
            (-q, q, 2.0f32.powi(-60)),
            (one_plus, one_plus, -1.0f32),
            (
                1.0 + f32::EPSILON,
                1.0 - f32::EPSILON / 2.0,
                2.0f32.powi(-24),
            ),
            (3.0f32.powi(5), 1.0 / 3.0f32.powi(5), 2.0f32.powi(-24)),
            (0.1, 10.0, 2.0f32.powi(-25)),
            (-0.1, 10.0, -(2.0f32.powi(-25))),
        ] {
            assert_eq!(
                fma_f32(a, b, c).to_bits(),
                a.mul_add(b, c).to_bits(),
                "{a} * {b} + {c}"
            );
            let (fast, suspect) = fma_f32_flagged(a, b, c);
            assert!(suspect || fast.to_bits() == a.mul_add(b, c).to_bits());
            needed_fix += usize::from(fast.to_bits() != a.mul_add(b, c).to_bits());
        }
        // Double rounding does occur here, so the exact path above was exercised.
        assert!(needed_fix >= 1);
        // Sweep of products near 1 with tiny addends.
        for k in 1..2000u32 {
            let a = f32::from_bits(1.0f32.to_bits() + k);
            let b = f32::from_bits(1.0f32.to_bits() + (k * 7919) % 4096);
            for &c in &[2.0f32.powi(-30), -(2.0f32.powi(-30)), 2.0f32.powi(-50), 0.0] {
                assert_eq!(fma_f32(a, b, c).to_bits(), a.mul_add(b, c).to_bits());
                let (fast, suspect) = fma_f32_flagged(a, b, c);
                assert!(suspect || fast.to_bits() == a.mul_add(b, c).to_bits());
            }
        }
    }
}
