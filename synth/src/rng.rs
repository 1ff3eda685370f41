//! Deterministic random streams. Each part of the dataset (a Cap case's plan, one series' noise, one Seg
//! case, ...) draws from its own ChaCha stream derived from the user seed, a part tag and an index, so a
//! part's content does not depend on which other parts were generated before it, and `write_vqa` alone sees
//! exactly the Cap plan that `write_cap` wrote.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The generator used everywhere in this crate.
pub type SynthRng = ChaCha8Rng;

/// Parts of the dataset; the discriminant only separates the streams.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    CapPlan = 1,
    CapNoise = 2,
    SegCase = 3,
    SegNoise = 4,
    RefSegCase = 5,
    RefSegNoise = 6,
    Vqa = 7,
    RefSegText = 8,
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The stream for `(seed, part, index)`.
pub(crate) fn stream(seed: u64, part: Stream, index: u64) -> SynthRng {
    let mut state = seed ^ (part as u64).wrapping_mul(0xA24B_AED4_963E_E407);
    state = splitmix64(&mut state) ^ index.wrapping_mul(0x9FB2_1C65_1E98_DF25);
    let mut key = [0u8; 32];
    for chunk in key.chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// Roughly Gaussian noise with standard deviation `sigma`: the Irwin–Hall sum of three uniforms, which needs
/// no transcendental functions and so is bit-identical on every platform.
pub(crate) fn noise(rng: &mut SynthRng, sigma: f64) -> f64 {
    let s: f64 = rng.random::<f64>() + rng.random::<f64>() + rng.random::<f64>() - 1.5;
    // The sum of three U(0,1) has variance 1/4.
    s * 2.0 * sigma
}

/// A uniform draw in `[lo, hi)`.
pub(crate) fn uniform(rng: &mut SynthRng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}
