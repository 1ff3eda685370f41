//! Per-sample random draws: a generator keyed by (seed, epoch, global index, purpose), so a sample draws the
//! same whichever rank loads it and whatever the world size, and the reference's augmentation drawn from it.
//! The worker and the data benchmarks draw through here, so both do the same work per sample.

use m3d_volume::augment::{AugmentConfig, AugmentParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Purpose of the instruction-prompt draw (which template a sample's question uses).
pub const PURPOSE_PROMPT: u64 = 1;
/// Purpose of the augmentation draw ([`augment_params`]).
pub const PURPOSE_AUGMENT: u64 = 2;
/// Purpose of the per-step dropout seed (`m3d_worker::job::step_seed`).
pub const PURPOSE_DROPOUT: u64 = 3;

/// SplitMix64's finaliser: the mixing step of every key here.
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A per-sample random generator keyed by (seed, epoch, global index, purpose).
pub fn sample_rng(seed: u64, epoch: u64, index: u64, purpose: u64) -> ChaCha8Rng {
    let mut z = seed ^ 0x6d33_642d_7361_6d70;
    for v in [epoch, index, purpose] {
        z = splitmix(z ^ v);
    }
    ChaCha8Rng::seed_from_u64(z)
}

/// The reference's augmentation of sample `index` in `epoch` (MONAI's RandRotate90, RandFlip × 3,
/// RandScaleIntensity, RandShiftIntensity with M3D's settings), drawn from its own generator.
pub fn augment_params(seed: u64, epoch: u64, index: u64) -> AugmentParams {
    AugmentParams::sample(
        &AugmentConfig::default(),
        &mut sample_rng(seed, epoch, index, PURPOSE_AUGMENT),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn augmentation_is_a_function_of_seed_epoch_and_sample() {
        let a = augment_params(42, 3, 17);
        assert_eq!(a, augment_params(42, 3, 17));
        // Over many samples the draws differ and hit the reference's rates (rotation p = 0.5).
        let draws: Vec<AugmentParams> = (0..2000).map(|i| augment_params(42, 3, i)).collect();
        let rotated = draws.iter().filter(|p| p.rot90_k > 0).count() as f64 / 2000.0;
        assert!((rotated - 0.5).abs() < 0.05, "{rotated}");
        assert_ne!(
            (0..50)
                .map(|i| augment_params(42, 3, i))
                .collect::<Vec<_>>(),
            (0..50)
                .map(|i| augment_params(42, 4, i))
                .collect::<Vec<_>>(),
            "the epoch changes the draws"
        );
    }
}
