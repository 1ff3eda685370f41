//! Training-time augmentation of one volume, as the reference's MONAI pipeline does it (M3D-REFERENCE.md,
//! "Training-time augmentation"), in this order:
//!
//! 1. `RandRotate90(prob=0.5, spatial_axes=(1, 2))`: `torch.rot90(img, k, (H, W))` with `k` in {1, 2, 3}
//!    (MONAI draws `randint(max_k=3) + 1`);
//! 2. `RandFlip(prob=0.1, spatial_axis=0)`, then `=1`, then `=2`: `torch.flip` along D, H, W;
//! 3. `RandScaleIntensity(factors=0.1, prob=0.5)`: `img * (1 + f)`, `f ~ U[-0.1, 0.1)`;
//! 4. `RandShiftIntensity(offsets=0.1, prob=0.5)`: `img + o`, `o ~ U[-0.1, 0.1)`.
//!
//! This module owns the random choices ([`AugmentParams::draw`]) and their application. The choices for a
//! sample are a pure function of `(seed, epoch, global sample index)`, so a sample is augmented the same way
//! whichever rank, world size or loader worker reads it, and a run can be reproduced (or the choices logged).
//!
//! **The random stream** (kept stable: changing it changes every run's augmentation). The 32-byte ChaCha8 key
//! is the little-endian concatenation of `splitmix64(seed)`, `splitmix64(epoch)`, `splitmix64(index)` and the
//! constant [`STREAM_TAG`]; splitmix64's finaliser is a bijection of `u64`, so distinct `(seed, epoch, index)`
//! give distinct keys (no hash collisions between samples). From `ChaCha8Rng::from_seed(key)` exactly nine
//! `next_u64` words `w0..w8` are drawn, always all nine (so a choice never shifts the others), each mapped to
//! `u(w) = (w >> 11) * 2^-53` in `[0, 1)`:
//!
//! | word | use |
//! |------|-----|
//! | `w0` | rotate iff `u < 0.5` |
//! | `w1` | `k = 1 + floor(3 u)` (used only when rotating) |
//! | `w2`, `w3`, `w4` | flip D / H / W iff `u < 0.1` |
//! | `w5` | scale iff `u < 0.5` |
//! | `w6` | `f = -0.1 + 0.2 u` |
//! | `w7` | shift iff `u < 0.5` |
//! | `w8` | `o = -0.1 + 0.2 u` |
//!
//! The spatial axes are always the **last three** tensor dimensions (D, H, W), so the same code serves a
//! `C x D x H x W` image and a `D x H x W` or `1 x D x H x W` mask. As in MONAI, an odd `k` swaps H and W
//! (the reference's volumes have H == W, so their shape is kept).

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

/// Probability of `RandRotate90`.
pub const ROTATE_PROB: f64 = 0.5;
/// Probability of each `RandFlip` (one per spatial axis).
pub const FLIP_PROB: f64 = 0.1;
/// Probability of `RandScaleIntensity`.
pub const SCALE_PROB: f64 = 0.5;
/// `RandScaleIntensity(factors=0.1)`: `f ~ U[-0.1, 0.1)`.
pub const SCALE_RANGE: f64 = 0.1;
/// Probability of `RandShiftIntensity`.
pub const SHIFT_PROB: f64 = 0.5;
/// `RandShiftIntensity(offsets=0.1)`: `o ~ U[-0.1, 0.1)`.
pub const SHIFT_RANGE: f64 = 0.1;
/// Last word of the ChaCha8 key: separates this stream from any other stream keyed by the same numbers.
pub const STREAM_TAG: u64 = u64::from_le_bytes(*b"m3daug01");

/// The random choices for one sample (so they can be logged / tested / reproduced).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentParams {
    /// Quarter turns in the H-W plane, as `torch.rot90(img, k, (H, W))`; 0 = no rotation.
    pub rot90_k: u8,
    /// Flip along D, H, W (applied after the rotation).
    pub flip: [bool; 3],
    /// `Some(f)`: multiply by `1 + f`.
    pub scale: Option<f64>,
    /// `Some(o)`: add `o` (after the scaling).
    pub shift: Option<f64>,
}

/// splitmix64 (Steele et al.): a bijective 64-bit mixer, used to spread the key words.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform in `[0, 1)` from the top 53 bits of a word (every value exactly representable).
fn unit(w: u64) -> f64 {
    (w >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

impl AugmentParams {
    /// Draws the choices for one sample from a generator seeded by (seed, epoch, global sample index) — so the
    /// augmentation of a sample does not depend on which rank or world size loads it. See the module doc for
    /// the exact stream.
    pub fn draw(seed: u64, epoch: u64, index: u64) -> AugmentParams {
        let mut key = [0u8; 32];
        for (chunk, word) in key.chunks_exact_mut(8).zip([
            splitmix64(seed),
            splitmix64(epoch),
            splitmix64(index),
            STREAM_TAG,
        ]) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        let mut rng = ChaCha8Rng::from_seed(key);
        let mut u = [0f64; 9];
        for x in &mut u {
            *x = unit(rng.next_u64());
        }
        // floor(3u) is 0, 1 or 2 since u < 1.
        let k = 1 + (3.0 * u[1]) as u8;
        AugmentParams {
            rot90_k: if u[0] < ROTATE_PROB { k } else { 0 },
            flip: [u[2] < FLIP_PROB, u[3] < FLIP_PROB, u[4] < FLIP_PROB],
            scale: (u[5] < SCALE_PROB).then(|| SCALE_RANGE * (2.0 * u[6] - 1.0)),
            shift: (u[7] < SHIFT_PROB).then(|| SHIFT_RANGE * (2.0 * u[8] - 1.0)),
        }
    }

    /// No augmentation (evaluation, or augmentation turned off).
    pub fn identity() -> AugmentParams {
        AugmentParams {
            rot90_k: 0,
            flip: [false; 3],
            scale: None,
            shift: None,
        }
    }

    /// Applies the choices in the reference's order to one C x D x H x W volume (and the same geometric part to an
    /// optional D x H x W or 1 x D x H x W mask: rotation/flips only, no intensity change).
    ///
    /// The result may share storage with `image` when nothing changes it (identity); otherwise it is a new
    /// contiguous tensor of `image`'s kind. Panics if `image` has fewer than 3 dimensions.
    pub fn apply(&self, image: &Tensor) -> Tensor {
        let mut out = self.apply_geometry(image);
        // `tensor * python_float` in MONAI: the scalar is rounded to the tensor's kind, exactly as tch's
        // tensor-scalar ops do, so the arithmetic matches bit for bit.
        // Out of place on purpose: with no geometric change `out` shares the caller's storage.
        if let Some(f) = self.scale {
            out = &out * (1.0 + f);
        }
        if let Some(o) = self.shift {
            out = &out + o;
        }
        out
    }

    /// The geometric part of [`AugmentParams::apply`] (rotation, flips) on a mask of shape D x H x W or
    /// 1 x D x H x W; values are moved, never changed. Panics if `mask` has fewer than 3 dimensions.
    pub fn apply_mask(&self, mask: &Tensor) -> Tensor {
        self.apply_geometry(mask)
    }

    fn apply_geometry(&self, t: &Tensor) -> Tensor {
        let n = t.dim() as i64;
        assert!(
            n >= 3,
            "augment: a volume needs its last 3 dimensions to be D x H x W, got shape {:?}",
            t.size()
        );
        let (d, h, w) = (n - 3, n - 2, n - 1);
        let mut out = if self.rot90_k % 4 == 0 {
            t.shallow_clone()
        } else {
            t.rot90(i64::from(self.rot90_k % 4), [h, w])
        };
        // Flips along distinct axes commute, so MONAI's three successive RandFlips are one torch.flip.
        let dims: Vec<i64> = [d, h, w]
            .into_iter()
            .zip(self.flip)
            .filter_map(|(dim, on)| on.then_some(dim))
            .collect();
        if !dims.is_empty() {
            out = out.flip(dims.as_slice());
        }
        if self.rot90_k % 4 != 0 {
            // rot90 returns a transposed view; callers stack samples into batches.
            out = out.contiguous();
        }
        out
    }
}
