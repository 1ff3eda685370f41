//! Correctly rounded single-precision fused multiply-add without a libm call.
//!
//! torch's CPU kernels are built per ISA level and the compiler contracts `a * b + c` into an FMA
//! instruction on AVX2/AVX-512 machines; reproducing torch's results bit for bit therefore needs
//! an FMA. `f32::mul_add` is exact but, without `-C target-feature=+fma`, is an out-of-line libm
//! call per element; this version stays in registers and inlines into the resampling loops.

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

#[cfg(test)]
mod tests {
    use super::fma_f32;
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_hardware_fma_on_random_and_tie_inputs() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200_000 {
            let a: f32 = rng.random_range(-4.0..4.0);
            let b: f32 = rng.random_range(-4.0..4.0);
            let c: f32 = rng.random_range(-4.0..4.0);
            assert_eq!(fma_f32(a, b, c).to_bits(), a.mul_add(b, c).to_bits());
        }
        // Constructed double-rounding traps: the f64 sum is a tie for f32 but the exact value
        // is not (1 + 2^-24 + 2^-60 style values).
        let one_plus = f32::from_bits(1.0f32.to_bits() + 1); // 1 + 2^-23
        for &(a, b, c) in &[
            (one_plus, one_plus, -1.0f32),
            (1.0 + f32::EPSILON, 1.0 - f32::EPSILON / 2.0, 2.0f32.powi(-24)),
            (3.0f32.powi(5), 1.0 / 3.0f32.powi(5), 2.0f32.powi(-24)),
            (0.1, 10.0, 2.0f32.powi(-25)),
            (-0.1, 10.0, -(2.0f32.powi(-25))),
        ] {
            assert_eq!(
                fma_f32(a, b, c).to_bits(),
                a.mul_add(b, c).to_bits(),
                "{a} * {b} + {c}"
            );
        }
        // Exhaustive-ish sweep around ties: a * b exactly half an f32 ulp above 1 plus tiny c.
        for k in 1..2000u32 {
            let a = f32::from_bits(1.0f32.to_bits() + k);
            let b = f32::from_bits(1.0f32.to_bits() + (k * 7919) % 4096);
            for &c in &[2.0f32.powi(-30), -(2.0f32.powi(-30)), 2.0f32.powi(-50), 0.0] {
                assert_eq!(fma_f32(a, b, c).to_bits(), a.mul_add(b, c).to_bits());
            }
        }
    }
}
