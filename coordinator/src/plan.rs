//! The data plan: which samples every rank trains on at every global step.
//!
//! The global sample order of an epoch is a keyed pseudo-random permutation of `0..samples` that depends only on
//! `(seed, epoch)`, never on the world size, so 1, 2 or 3 workers with the same global batch see the same batches
//! in the same order. The permutation is a Feistel network over the smallest power of four >= `samples`, restricted
//! to `0..samples` by cycle walking: position -> sample is computed in O(1) time and memory, so a plan never
//! materialises an epoch (any dataset size, no cache, no lock).
//!
//! Two orders ([`Shuffle`], the recipe's `data.shuffle`):
//!
//! - **global** (the default, as the reference's random sampler): one permutation of all samples per epoch.
//! - **blocks** (in the style of Mosaic Streaming, for object storage): the samples are cut into blocks of
//!   `block` consecutive indices (`[b*block, (b+1)*block)`, the last one shorter when `block` does not divide
//!   `samples`); the blocks are permuted (keyed by `(seed, epoch)`); the permuted block sequence is cut into
//!   windows of `window` blocks; and the samples of each window are permuted among themselves (keyed by
//!   `(seed, epoch, window)`). Consecutive sample indices are stored together (conversion writes them shard by
//!   shard), so a window touches at most `window` blocks' volumes, and a loader whose cache holds one window's
//!   volumes reads each of them about once per epoch instead of once per use. Also O(1) per position: see
//!   [`BlockOrder`].
//!
//! Epoch `e` has `samples / global_batch` steps: **the last partial batch is dropped** (which samples fall into
//! it differs from epoch to epoch, because the order does). Global step `s` is epoch `s / steps_per_epoch`, step
//! `s % steps_per_epoch` in it; its global batch is positions `[k*G, (k+1)*G)` of the epoch's order, and rank `r`
//! of `W` gets the contiguous slice `[r*G/W, (r+1)*G/W)` of it (so concatenating the ranks' slices in rank order
//! gives the global batch in order). `G % W == 0` is required: every rank gets the same number of samples and
//! steps, and no rank waits on another's extra batch.
//!
//! An evaluation job ([`PlanKind::Eval`], `m3d eval bench`) uses the same rendezvous, liveness and completion,
//! with a plan of its own: one pass over samples `0..samples` in order (no shuffle), rank `r` of `W` taking
//! `r, r + W, r + 2W, ...`, as one step that a rank completes when its results are written. Any world size up
//! to `samples` fits: ranks differ by at most one sample, and nothing waits on a peer.

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
    /// How each epoch's order is drawn. Default (and what a `job.json` or `state.json` written before the
    /// field existed reads as): [`Shuffle::Global`].
    #[serde(default)]
    pub shuffle: Shuffle,
    /// Training or evaluation. Default (and what state written before the field existed reads as):
    /// [`PlanKind::Train`].
    #[serde(default)]
    pub kind: PlanKind,
}

/// What the ranks do with a plan; see the module docs.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PlanKind {
    /// Global batches of the epoch's order, each cut into equal contiguous rank slices.
    #[default]
    Train,
    /// One in-order pass; one step. m3d's ranks take items from the round's work queue
    /// ([`crate::ControlPlane::lease_work`]); the static plan (rank `r` of `W` taking every `W`-th sample from `r`)
    /// is what `GetDataPlan` answers, for clients without leases.
    Eval,
}

impl std::fmt::Display for PlanKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlanKind::Train => "training",
            PlanKind::Eval => "evaluation",
        })
    }
}

/// How an epoch's sample order is drawn; see the module docs.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Shuffle {
    /// One keyed permutation of all samples.
    #[default]
    Global,
    /// Blocks of `block` consecutive samples in a keyed order, the samples of every `window` consecutive
    /// blocks of that order shuffled among themselves. Both at least 1.
    Blocks { block: u64, window: u64 },
}

impl Shuffle {
    /// The order a recipe's `data.shuffle` (with `shuffle_block`, `shuffle_window`) asks the data plan for: the
    /// one mapping from the recipe, shared by the plan and the checkpoints' run identity.
    pub fn of_recipe(d: &m3d_recipes::DataSection) -> Shuffle {
        match d.shuffle {
            m3d_recipes::ShuffleMode::Global => Shuffle::Global,
            m3d_recipes::ShuffleMode::Blocks => Shuffle::Blocks {
                block: d.shuffle_block,
                window: d.shuffle_window,
            },
        }
    }
}

impl std::fmt::Display for Shuffle {
    /// `global` or `blocks:<block>x<window>`: the form a checkpoint's run identity records, so a resume under
    /// another order is told apart (and `global` reads as checkpoints written before blocks existed did).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shuffle::Global => f.write_str("global"),
            Shuffle::Blocks { block, window } => write!(f, "blocks:{block}x{window}"),
        }
    }
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
        if self.kind == PlanKind::Eval
            && (self.global_batch != self.samples
                || self.epochs != 1
                || self.max_steps.is_some()
                || self.shuffle != Shuffle::Global)
        {
            return Err(PlanError::Invalid(
                "an evaluation plan is one in-order pass: global batch = samples, 1 epoch, no max steps or shuffle"
                    .into(),
            ));
        }
        if let Shuffle::Blocks { block, window } = self.shuffle {
            if block == 0 {
                return Err(PlanError::Invalid(
                    "shuffle block must be at least 1 sample".into(),
                ));
            }
            if window == 0 {
                return Err(PlanError::Invalid(
                    "shuffle window must be at least 1 block".into(),
                ));
            }
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
        match self.kind {
            PlanKind::Train => world_size > 0 && self.global_batch % u64::from(world_size) == 0,
            PlanKind::Eval => world_size > 0 && u64::from(world_size) <= self.samples,
        }
    }

    /// The plan of an evaluation over `samples` items (see [`PlanKind::Eval`]); `seed` keys whatever the
    /// evaluation draws per sample.
    pub fn evaluation(samples: u64, seed: u64) -> PlanSpec {
        PlanSpec {
            samples,
            global_batch: samples,
            seed,
            epochs: 1,
            max_steps: None,
            shuffle: Shuffle::Global,
            kind: PlanKind::Eval,
        }
    }

    /// The order of `epoch` under this spec's [`Shuffle`].
    pub fn order(&self, epoch: u64) -> SampleOrder {
        match self.shuffle {
            Shuffle::Global => SampleOrder::Global(EpochOrder::new(self.seed, epoch, self.samples)),
            Shuffle::Blocks { block, window } => SampleOrder::Blocks(BlockOrder::new(
                self.seed,
                epoch,
                self.samples,
                block,
                window,
            )),
        }
    }

    /// The sample at `position` of the global order of `epoch` (`position < samples`).
    pub fn sample_at(&self, epoch: u64, position: u64) -> u64 {
        self.order(epoch).get(position)
    }

    /// The whole global batch of a step, in order.
    pub fn global_batch_at(&self, step: u64) -> Result<Vec<u64>, PlanError> {
        self.rank_slice(step, 0, 1)
    }

    /// Rank `rank` of `world_size`'s samples at global step `step`.
    pub fn rank_slice(&self, step: u64, rank: u32, world_size: u32) -> Result<Vec<u64>, PlanError> {
        self.validate()?;
        if self.kind == PlanKind::Eval && !self.fits(world_size) {
            return Err(PlanError::Invalid(format!(
                "{world_size} ranks for an evaluation of {} samples",
                self.samples
            )));
        }
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
        if self.kind == PlanKind::Eval {
            return Ok((u64::from(rank)..self.samples)
                .step_by(world_size as usize)
                .collect());
        }
        let (epoch, k) = self.position(step);
        let per_rank = self.global_batch / u64::from(world_size);
        let start = k * self.global_batch + u64::from(rank) * per_rank;
        let order = self.order(epoch);
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

/// Tags that keep the keys of the orders an epoch uses apart (the global order's is the original one and must
/// never change: it is what existing runs were trained with).
const TAG_GLOBAL: u64 = 0x6D33_6450_4C41_4E00;
const TAG_BLOCKS: u64 = 0x6D33_6442_4C4F_434B;
const TAG_WINDOW: u64 = 0x6D33_6457_494E_444F;

impl EpochOrder {
    pub fn new(seed: u64, epoch: u64, n: u64) -> EpochOrder {
        EpochOrder::keyed(mix(seed ^ mix(epoch ^ TAG_GLOBAL)), n)
    }

    /// The permutation of `0..n` keyed by `base`.
    fn keyed(base: u64, n: u64) -> EpochOrder {
        // Domain 4^half_bits >= n, at least 4, so both Feistel halves have at least one bit.
        let mut half_bits = 1;
        while half_bits < 32 && (1u64 << (2 * half_bits)) < n {
            half_bits += 1;
        }
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

    /// The inverse of [`EpochOrder::feistel`]: the rounds undone in reverse order.
    fn feistel_inv(&self, y: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (y >> self.half_bits, y & mask);
        for k in self.keys.iter().rev() {
            let f = mix(l ^ k) & mask;
            (l, r) = (r ^ f, l);
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

    /// The position of `sample` (`sample < n`): the inverse of [`EpochOrder::get`] (cycle walking backwards).
    pub fn position_of(&self, sample: u64) -> u64 {
        debug_assert!(sample < self.n);
        let mut x = self.feistel_inv(sample);
        while x >= self.n {
            x = self.feistel_inv(x);
        }
        x
    }
}

/// An epoch's order under either [`Shuffle`].
#[derive(Clone, Copy, Debug)]
pub enum SampleOrder {
    Global(EpochOrder),
    Blocks(BlockOrder),
}

impl SampleOrder {
    /// The sample at `position` (`position < samples`).
    pub fn get(&self, position: u64) -> u64 {
        match self {
            SampleOrder::Global(o) => o.get(position),
            SampleOrder::Blocks(o) => o.get(position),
        }
    }
}

/// The block shuffle of one epoch (see the module docs), position -> sample in O(1) time and memory.
///
/// With `B` samples per block, `nb = ceil(n / B)` blocks and `W` blocks per window: slot `j` of the epoch (the
/// `j`-th block of the permuted sequence) holds block `π(j)`, `π` the block permutation keyed by
/// `(seed, epoch)`. Only the last block, `nb - 1`, may be short (`B - d` samples); it sits at slot
/// `s* = π⁻¹(nb - 1)`, so slot `j` starts at position `start(j) = j·B - (d if j > s* else 0)`. Window `w` is
/// slots `[w·W, min((w+1)·W, nb))`, i.e. positions `[start(w·W), start(min((w+1)·W, nb)))`. The sample at
/// position `p`: its window `w` (from its slot), `q = p - start(w·W)`, `q' = σ_w(q)` (`σ_w` the permutation of
/// the window's samples keyed by `(seed, epoch, w)`), and with `(j, o)` the slot and offset of position
/// `start(w·W) + q'`, the sample is `π(j)·B + o`.
#[derive(Clone, Copy, Debug)]
pub struct BlockOrder {
    n: u64,
    /// Samples per block, at most `n`.
    block: u64,
    /// Blocks per window, at most `blocks`.
    window: u64,
    blocks: u64,
    /// Slot of the last block (the only one that may be short).
    short_slot: u64,
    /// Samples the last block lacks to be whole.
    deficit: u64,
    perm: EpochOrder,
    /// Key base of the window permutations.
    window_base: u64,
}

impl BlockOrder {
    /// `block` and `window` of 0 count as 1 ([`PlanSpec::validate`] refuses them before any order is built);
    /// a block larger than the dataset is one block, a window longer than the epoch one window.
    pub fn new(seed: u64, epoch: u64, n: u64, block: u64, window: u64) -> BlockOrder {
        let block = block.clamp(1, n.max(1));
        let blocks = n.div_ceil(block).max(1);
        let window = window.clamp(1, blocks);
        let base = mix(seed ^ mix(epoch ^ TAG_BLOCKS));
        let perm = EpochOrder::keyed(base, blocks);
        BlockOrder {
            n,
            block,
            window,
            blocks,
            short_slot: perm.position_of(blocks - 1),
            deficit: blocks * block - n,
            perm,
            window_base: mix(base ^ TAG_WINDOW),
        }
    }

    /// First position of slot `j` (`j <= blocks`; `start(blocks) = n`).
    fn start(&self, j: u64) -> u64 {
        j * self.block - if j > self.short_slot { self.deficit } else { 0 }
    }

    /// (slot, offset in the slot's block) of position `p`.
    fn slot_of(&self, p: u64) -> (u64, u64) {
        let short_start = self.short_slot * self.block;
        if p < short_start {
            (p / self.block, p % self.block)
        } else if p < short_start + (self.block - self.deficit) {
            (self.short_slot, p - short_start)
        } else {
            let q = p + self.deficit;
            (q / self.block, q % self.block)
        }
    }

    /// Number of windows in the epoch.
    pub fn windows(&self) -> u64 {
        self.blocks.div_ceil(self.window)
    }

    /// Positions `[start, end)` of window `w` (`w < windows()`).
    pub fn window_range(&self, w: u64) -> std::ops::Range<u64> {
        let first = w * self.window;
        let last = (first + self.window).min(self.blocks);
        self.start(first)..self.start(last)
    }

    /// The sample at `position` (`position < n`).
    pub fn get(&self, position: u64) -> u64 {
        debug_assert!(position < self.n);
        let w = self.slot_of(position).0 / self.window;
        let range = self.window_range(w);
        let within = EpochOrder::keyed(mix(self.window_base ^ mix(w)), range.end - range.start);
        let (j, o) = self.slot_of(range.start + within.get(position - range.start));
        self.perm.get(j) * self.block + o
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

    #[test]
    fn the_global_order_never_changes() {
        // Values of the order runs were trained with before block shuffles existed: a resumed run relies on them.
        for (seed, epoch, n, first) in [
            (7u64, 3u64, 100u64, [19u64, 72, 86, 27, 92, 97, 62, 52]),
            (42, 0, 1001, [766, 97, 513, 862, 190, 45, 37, 432]),
            (
                1,
                5,
                65537,
                [56842, 14668, 14231, 53278, 53385, 61495, 28037, 13078],
            ),
        ] {
            let o = EpochOrder::new(seed, epoch, n);
            assert_eq!((0..8).map(|p| o.get(p)).collect::<Vec<_>>(), first);
        }
    }

    #[test]
    fn position_of_inverts_get() {
        for n in [1u64, 2, 5, 17, 1000, 4097] {
            let order = EpochOrder::new(3, 1, n);
            for p in 0..n {
                assert_eq!(order.position_of(order.get(p)), p, "n={n}");
            }
        }
    }

    const BLOCK: u64 = 32;
    const WINDOW: u64 = 3;

    fn spec(samples: u64, global_batch: u64, shuffle: Shuffle) -> PlanSpec {
        PlanSpec {
            kind: PlanKind::Train,
            samples,
            global_batch,
            seed: 11,
            epochs: 2,
            max_steps: None,
            shuffle,
        }
    }

    fn shuffles() -> [Shuffle; 4] {
        [
            Shuffle::Global,
            Shuffle::Blocks {
                block: BLOCK,
                window: WINDOW,
            },
            Shuffle::Blocks {
                block: 1,
                window: 1,
            },
            Shuffle::Blocks {
                block: 7,
                window: 1000,
            },
        ]
    }

    fn epoch(p: &PlanSpec, e: u64) -> Vec<u64> {
        (0..p.samples).map(|i| p.sample_at(e, i)).collect()
    }

    #[test]
    fn every_sample_exactly_once_per_epoch_under_both_shuffles() {
        for shuffle in shuffles() {
            for n in [1u64, 7, 100, 1001] {
                let p = spec(n, 1, shuffle);
                for e in 0..2 {
                    let mut seen = vec![false; n as usize];
                    for s in epoch(&p, e) {
                        assert!(s < n, "{shuffle} n={n}: {s} out of range");
                        assert!(!seen[s as usize], "{shuffle} n={n}: {s} twice");
                        seen[s as usize] = true;
                    }
                }
            }
        }
    }

    #[test]
    fn the_order_does_not_depend_on_the_world_size() {
        for shuffle in shuffles() {
            for n in [7u64, 100, 1001] {
                let p = spec(n, 6, shuffle);
                let whole: Vec<u64> = (0..p.total_steps())
                    .flat_map(|s| p.global_batch_at(s).unwrap())
                    .collect();
                let spe = p.steps_per_epoch() * 6;
                assert_eq!(whole[..spe as usize], epoch(&p, 0)[..spe as usize]);
                for world in 1..=3u32 {
                    let by_ranks: Vec<u64> = (0..p.total_steps())
                        .flat_map(|s| {
                            (0..world).flat_map(move |r| p.rank_slice(s, r, world).unwrap())
                        })
                        .collect();
                    assert_eq!(by_ranks, whole, "{shuffle} n={n} world={world}");
                }
            }
        }
    }

    #[test]
    fn seed_and_epoch_change_the_order() {
        for shuffle in shuffles() {
            for n in [100u64, 1001] {
                let p = spec(n, 1, shuffle);
                let other_seed = PlanSpec { seed: 12, ..p };
                let a = epoch(&p, 0);
                assert_eq!(a, epoch(&p, 0), "{shuffle}: deterministic");
                assert_ne!(a, epoch(&p, 1), "{shuffle} n={n}: epoch");
                assert_ne!(a, epoch(&other_seed, 0), "{shuffle} n={n}: seed");
                assert_ne!(a, (0..n).collect::<Vec<_>>(), "{shuffle} n={n}: shuffled");
            }
        }
        // A single block is still shuffled within its window, by (seed, epoch).
        let p = spec(
            7,
            1,
            Shuffle::Blocks {
                block: BLOCK,
                window: WINDOW,
            },
        );
        assert_ne!(epoch(&p, 0), epoch(&p, 1));
        assert_ne!(epoch(&p, 0), epoch(&PlanSpec { seed: 1, ..p }, 0));
    }

    #[test]
    fn a_window_draws_from_at_most_window_blocks() {
        for n in [1u64, 7, 100, 1001, 4096] {
            for e in 0..3 {
                let order = BlockOrder::new(5, e, n, BLOCK, WINDOW);
                let windows = order.windows();
                assert_eq!(windows, n.div_ceil(BLOCK).div_ceil(WINDOW), "n={n}");
                let mut next = 0;
                let mut block_seen = vec![false; n.div_ceil(BLOCK) as usize];
                for w in 0..windows {
                    let range = order.window_range(w);
                    assert_eq!(range.start, next, "n={n}: windows tile the epoch");
                    next = range.end;
                    let blocks: std::collections::BTreeSet<u64> =
                        range.clone().map(|p| order.get(p) / BLOCK).collect();
                    assert!(
                        blocks.len() as u64 <= WINDOW,
                        "n={n} window {w}: {blocks:?}"
                    );
                    // Whole blocks: the window holds every sample of each block it draws from.
                    let size: u64 = blocks
                        .iter()
                        .map(|b| (b * BLOCK + BLOCK).min(n) - b * BLOCK)
                        .sum();
                    assert_eq!(size, range.end - range.start, "n={n} window {w}");
                    for b in blocks {
                        assert!(!block_seen[b as usize], "block {b} in two windows");
                        block_seen[b as usize] = true;
                    }
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn blocks_and_windows_are_shuffled() {
        let n = 1001;
        let order = BlockOrder::new(5, 0, n, BLOCK, WINDOW);
        let first: Vec<u64> = (0..order.windows())
            .map(|w| order.get(order.window_range(w).start) / BLOCK)
            .collect();
        assert!(
            first.windows(2).any(|x| x[0] > x[1]),
            "blocks permuted: {first:?}"
        );
        // Inside a window the samples are mixed, not block after block.
        let w0: Vec<u64> = order
            .window_range(0)
            .map(|p| order.get(p) / BLOCK)
            .collect();
        assert!(
            w0.windows(2).filter(|x| x[0] != x[1]).count() > 10,
            "{w0:?}"
        );
    }

    #[test]
    fn shuffle_spec_serialises_with_a_global_default() {
        let p = spec(10, 2, Shuffle::Global);
        let old = r#"{"samples":10,"global_batch":2,"seed":11,"epochs":2}"#;
        assert_eq!(
            serde_json::from_str::<PlanSpec>(old).unwrap(),
            PlanSpec {
                kind: PlanKind::Train,
                max_steps: None,
                ..p
            }
        );
        let b = spec(
            10,
            2,
            Shuffle::Blocks {
                block: 4,
                window: 2,
            },
        );
        let text = serde_json::to_string(&b).unwrap();
        assert!(
            text.contains(r#""shuffle":{"kind":"blocks","block":4,"window":2}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<PlanSpec>(&text).unwrap(), b);
        assert_eq!(Shuffle::Global.to_string(), "global");
        assert_eq!(b.shuffle.to_string(), "blocks:4x2");
    }

    #[test]
    fn zero_block_or_window_is_refused() {
        for (block, window, what) in [(0, 1, "block"), (1, 0, "window")] {
            let e = spec(10, 2, Shuffle::Blocks { block, window })
                .validate()
                .unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
    }
}
