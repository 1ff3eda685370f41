//! The data plan: which samples every rank trains on at every global step.
//!
//! The global sample order of an epoch is a keyed pseudo-random permutation of `0..samples` that depends only on
//! `(seed, epoch)`, never on the world size, so 1, 2 or 3 workers with the same global batch see the same batches
//! in the same order. The permutation is a Feistel network over the smallest power of four >= `samples`, restricted
//! to `0..samples` by cycle walking: position -> sample is computed in O(1) time and memory, so a plan never
//! materialises an epoch (any dataset size, no cache, no lock).
//!
//! Epoch `e` has `samples / global_batch` steps: **the last partial batch is dropped** (which samples fall into
//! it differs from epoch to epoch, because the order does). Global step `s` is epoch `s / steps_per_epoch`, step
//! `s % steps_per_epoch` in it; its global batch is positions `[k*G, (k+1)*G)` of the epoch's order, and rank `r`
//! of `W` gets the contiguous slice `[r*G/W, (r+1)*G/W)` of it (so concatenating the ranks' slices in rank order
//! gives the global batch in order). `G % W == 0` is required: every rank gets the same number of samples and
//! steps, and no rank waits on another's extra batch.

use crate::error::PlanError;

/// What the data plan is computed from; the same for every rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlanSpec {
    /// Samples in the dataset.
    pub samples: u64,
    /// Samples per global step, over all ranks.
    pub global_batch: u64,
    /// Seed of the sample order.
    pub seed: u64,
    /// Epochs the sample order covers.
    pub epochs: u64,
    /// Stop after this many global steps, before the end of `epochs` (transformers' `max_steps`). Default:
    /// none (every step of every epoch).
    #[serde(default)]
    pub max_steps: Option<u64>,
}

/// One step of one rank's plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepPlan {
    /// Global step (counted over all epochs).
    pub step: u64,
    pub epoch: u64,
    pub step_in_epoch: u64,
    /// Global sample indices, in order.
    pub samples: Vec<u64>,
}

impl PlanSpec {
    /// Checks the spec on its own (world size aside).
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.samples == 0 {
            return Err(PlanError::Invalid("the dataset has no samples".into()));
        }
        if self.global_batch == 0 {
            return Err(PlanError::Invalid("global batch must be at least 1".into()));
        }
        if self.samples < self.global_batch {
            return Err(PlanError::Invalid(format!(
                "{} samples are fewer than one global batch of {}",
                self.samples, self.global_batch
            )));
        }
        if self.epochs == 0 {
            return Err(PlanError::Invalid("epochs must be at least 1".into()));
        }
        Ok(())
    }

    /// Full global batches per epoch (the partial last batch is dropped).
    pub fn steps_per_epoch(&self) -> u64 {
        self.samples.checked_div(self.global_batch).unwrap_or(0)
    }

    /// Global steps in the whole job: every step of every epoch, or `max_steps` when that is fewer.
    pub fn total_steps(&self) -> u64 {
        let all = self.steps_per_epoch().saturating_mul(self.epochs);
        self.max_steps.map_or(all, |m| m.min(all))
    }

    /// The spec that runs exactly `max_steps` steps: as many epochs as they need, stopped at `max_steps`.
    pub fn with_max_steps(mut self, max_steps: u64) -> PlanSpec {
        let spe = self.steps_per_epoch().max(1);
        self.epochs = max_steps.div_ceil(spe).max(1);
        self.max_steps = Some(max_steps);
        self
    }

    /// `(epoch, step in epoch)` of a global step.
    pub fn position(&self, step: u64) -> (u64, u64) {
        let spe = self.steps_per_epoch().max(1);
        (step / spe, step % spe)
    }

    /// Whether `world_size` ranks can split the global batch evenly.
    pub fn fits(&self, world_size: u32) -> bool {
        world_size > 0 && self.global_batch % u64::from(world_size) == 0
    }

    /// The sample at `position` of the global order of `epoch` (`position < samples`).
    pub fn sample_at(&self, epoch: u64, position: u64) -> u64 {
        EpochOrder::new(self.seed, epoch, self.samples).get(position)
    }

    /// The whole global batch of a step, in order.
    pub fn global_batch_at(&self, step: u64) -> Result<Vec<u64>, PlanError> {
        self.rank_slice(step, 0, 1)
    }

    /// Rank `rank` of `world_size`'s samples at global step `step`.
    pub fn rank_slice(&self, step: u64, rank: u32, world_size: u32) -> Result<Vec<u64>, PlanError> {
        self.validate()?;
        if !self.fits(world_size) {
            return Err(PlanError::WorldSize {
                global_batch: self.global_batch,
                world_size,
            });
        }
        if rank >= world_size {
            return Err(PlanError::Invalid(format!(
                "rank {rank} is not below world size {world_size}"
            )));
        }
        if step >= self.total_steps() {
            return Err(PlanError::StepOutOfRange {
                step,
                total_steps: self.total_steps(),
            });
        }
        let (epoch, k) = self.position(step);
        let per_rank = self.global_batch / u64::from(world_size);
        let start = k * self.global_batch + u64::from(rank) * per_rank;
        let order = EpochOrder::new(self.seed, epoch, self.samples);
        Ok((start..start + per_rank).map(|p| order.get(p)).collect())
    }

    /// Steps `[start, start + count)` of a rank's plan, stopping at the last step of the job.
    pub fn rank_plan(
        &self,
        start: u64,
        count: u64,
        rank: u32,
        world_size: u32,
    ) -> Result<Vec<StepPlan>, PlanError> {
        let end = start.saturating_add(count).min(self.total_steps());
        let mut out = Vec::with_capacity(end.saturating_sub(start) as usize);
        for step in start..end {
            let (epoch, step_in_epoch) = self.position(step);
            out.push(StepPlan {
                step,
                epoch,
                step_in_epoch,
                samples: self.rank_slice(step, rank, world_size)?,
            });
        }
        Ok(out)
    }
}

/// The global order of one epoch: a bijection `0..n -> 0..n` keyed by `(seed, epoch)`.
#[derive(Clone, Copy, Debug)]
pub struct EpochOrder {
    n: u64,
    half_bits: u32,
    keys: [u64; ROUNDS],
}

const ROUNDS: usize = 6;

/// SplitMix64's finaliser: a fixed, well-mixing 64-bit hash (the order must never change between versions,
/// so no library RNG whose algorithm could).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl EpochOrder {
    pub fn new(seed: u64, epoch: u64, n: u64) -> EpochOrder {
        // Domain 4^half_bits >= n, at least 4, so both Feistel halves have at least one bit.
        let mut half_bits = 1;
        while half_bits < 32 && (1u64 << (2 * half_bits)) < n {
            half_bits += 1;
        }
        let base = mix(seed ^ mix(epoch ^ 0x6D33_6450_4C41_4E00));
        let mut keys = [0u64; ROUNDS];
        for (i, k) in keys.iter_mut().enumerate() {
            *k = mix(base.wrapping_add(i as u64));
        }
        EpochOrder { n, half_bits, keys }
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            let f = mix(r ^ k) & mask;
            (l, r) = (r, l ^ f);
        }
        (l << self.half_bits) | r
    }

    /// The sample at `position` (`position < n`). Cycle walking: apply the permutation of the power-of-four
    /// domain until the value lands in `0..n`; it terminates because `position` itself is on the cycle.
    pub fn get(&self, position: u64) -> u64 {
        debug_assert!(position < self.n);
        let mut y = self.feistel(position);
        while y >= self.n {
            y = self.feistel(y);
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_permutation_for_awkward_sizes() {
        for n in [1u64, 2, 3, 4, 5, 7, 16, 17, 100, 1000, 4097] {
            let order = EpochOrder::new(7, 3, n);
            let mut seen = vec![false; n as usize];
            for p in 0..n {
                let s = order.get(p);
                assert!(s < n, "n={n}: {s} out of range");
                assert!(!seen[s as usize], "n={n}: {s} repeated");
                seen[s as usize] = true;
            }
        }
    }

    #[test]
    fn order_depends_on_seed_and_epoch() {
        let a: Vec<u64> = (0..100)
            .map(|p| EpochOrder::new(1, 0, 100).get(p))
            .collect();
        let b: Vec<u64> = (0..100)
            .map(|p| EpochOrder::new(1, 1, 100).get(p))
            .collect();
        let c: Vec<u64> = (0..100)
            .map(|p| EpochOrder::new(2, 0, 100).get(p))
            .collect();
        let again: Vec<u64> = (0..100)
            .map(|p| EpochOrder::new(1, 0, 100).get(p))
            .collect();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, again);
        assert_ne!(a, (0..100).collect::<Vec<_>>(), "not shuffled");
    }
}
