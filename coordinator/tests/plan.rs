//! The data plan as a pure function: the global order depends on (seed, epoch) only, never on the world size.

use std::collections::BTreeSet;

use m3d_coordinator::{JobConfig, PlanError, PlanSpec};

fn spec(samples: u64, global_batch: u64) -> PlanSpec {
    PlanSpec {
        kind: m3d_coordinator::PlanKind::Train,
        max_steps: None,
        samples,
        global_batch,
        seed: 9,
        epochs: 3,
        shuffle: Default::default(),
    }
}

#[test]
fn the_global_order_is_identical_for_one_two_and_three_workers() {
    let p = spec(1000, 12);
    for step in 0..p.total_steps() {
        let global = p.global_batch_at(step).expect("global batch");
        assert_eq!(global.len(), 12);
        for world in 2..=3u32 {
            let mut union = Vec::new();
            for rank in 0..world {
                union.extend(p.rank_slice(step, rank, world).expect("slice"));
            }
            assert_eq!(
                union, global,
                "step {step}, world {world}: ranks' slices concatenated = the global batch"
            );
        }
    }
}

#[test]
fn an_epoch_has_no_repeats_or_gaps_and_drops_only_the_last_partial_batch() {
    // 96 = 8 full batches: every sample exactly once per epoch.
    let p = spec(96, 12);
    assert_eq!(p.steps_per_epoch(), 8);
    for epoch in 0..p.epochs {
        let steps = (epoch * 8)..(epoch * 8 + 8);
        let seen: Vec<u64> = steps
            .flat_map(|s| p.global_batch_at(s).expect("batch"))
            .collect();
        let distinct: BTreeSet<u64> = seen.iter().copied().collect();
        assert_eq!(seen.len(), 96);
        assert_eq!(
            distinct,
            (0..96).collect::<BTreeSet<u64>>(),
            "epoch {epoch}"
        );
    }
    // 100 samples: 8 full batches, the 4 samples of the partial batch are dropped - different ones each epoch.
    let p = spec(100, 12);
    let mut dropped = Vec::new();
    for epoch in 0..p.epochs {
        let seen: Vec<u64> = (epoch * 8..epoch * 8 + 8)
            .flat_map(|s| p.global_batch_at(s).expect("batch"))
            .collect();
        let distinct: BTreeSet<u64> = seen.iter().copied().collect();
        assert_eq!(distinct.len(), 96, "no repeats in epoch {epoch}");
        assert!(distinct.iter().all(|&s| s < 100));
        dropped.push(
            (0..100)
                .filter(|s| !distinct.contains(s))
                .collect::<Vec<u64>>(),
        );
    }
    assert!(dropped.iter().all(|d| d.len() == 4));
    assert!(
        dropped[0] != dropped[1] || dropped[1] != dropped[2],
        "the dropped samples rotate"
    );
    // Consecutive epochs are ordered differently.
    assert_ne!(p.global_batch_at(0), p.global_batch_at(8));
}

#[test]
fn every_rank_gets_the_same_number_of_steps_and_samples() {
    let p = spec(1000, 12);
    for world in [1u32, 2, 3, 4, 6, 12] {
        let plans: Vec<_> = (0..world)
            .map(|r| p.rank_plan(0, 10_000, r, world).expect("plan"))
            .collect();
        for plan in &plans {
            assert_eq!(plan.len() as u64, p.total_steps(), "world {world}");
            assert!(plan
                .iter()
                .all(|s| s.samples.len() as u64 == 12 / u64::from(world)));
        }
    }
    // A range past the end is cut at the last step.
    assert_eq!(
        p.rank_plan(p.total_steps() - 2, 10, 0, 2)
            .expect("tail")
            .len(),
        2
    );
}

#[test]
fn a_world_size_that_does_not_divide_the_global_batch_is_refused() {
    let p = spec(1000, 12);
    assert_eq!(
        p.rank_slice(0, 0, 5),
        Err(PlanError::WorldSize {
            global_batch: 12,
            world_size: 5
        })
    );
    assert!(matches!(
        p.rank_slice(p.total_steps(), 0, 1),
        Err(PlanError::StepOutOfRange { .. })
    ));
    let cfg = |min, max| JobConfig {
        data_fingerprint: None,
        initial_checkpoint: None,
        min_workers: min,
        max_workers: max,
        rendezvous_timeout: std::time::Duration::from_secs(1),
        heartbeat_timeout: std::time::Duration::from_secs(1),
        max_restarts: 0,
        plan: p,
    };
    // With 5 workers available, a 1..=5 job trains on 4 (the largest world dividing 12).
    assert_eq!(cfg(1, 5).world_size_for(5), Some(4));
    assert_eq!(cfg(5, 5).world_size_for(5), None);
    assert!(cfg(5, 5).validate().is_err());
    assert!(cfg(1, 5).validate().is_ok());
    assert!(
        spec(5, 12).validate().is_err(),
        "fewer samples than one global batch"
    );
}

#[test]
fn an_evaluation_plan_is_one_in_order_pass_split_by_stride_for_any_world_size() {
    let p = PlanSpec::evaluation(10, 3);
    assert_eq!(p.total_steps(), 1);
    for world in 1..=10u32 {
        assert!(p.fits(world), "{world} ranks");
        let mut union = Vec::new();
        for rank in 0..world {
            let mine = p.rank_slice(0, rank, world).expect("slice");
            // Rank r takes r, r + W, r + 2W, ...: ranks differ by at most one item.
            assert!(mine
                .iter()
                .enumerate()
                .all(|(i, &x)| x == u64::from(rank) + i as u64 * u64::from(world)));
            assert!(mine.len().abs_diff(10 / world as usize) <= 1);
            union.extend(mine);
        }
        union.sort_unstable();
        assert_eq!(union, (0..10).collect::<Vec<u64>>(), "world {world}");
    }
    assert!(!p.fits(11) && !p.fits(0));
    assert!(p.rank_slice(0, 0, 11).is_err());
    assert!(p.rank_slice(1, 0, 2).is_err(), "one step only");
    // An evaluation is not shuffled, and covers its items once.
    for bad in [
        PlanSpec { epochs: 2, ..p },
        PlanSpec {
            global_batch: 5,
            ..p
        },
        PlanSpec {
            shuffle: m3d_coordinator::Shuffle::Blocks {
                block: 2,
                window: 2,
            },
            ..p
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    // A training plan of the same numbers is not: the kind decides how ranks split it.
    let train = PlanSpec {
        kind: m3d_coordinator::PlanKind::Train,
        ..p
    };
    assert!(!train.fits(3), "10 is not divisible by 3");
}
