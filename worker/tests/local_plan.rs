//! Workers compute their own samples: for every rank of every world size, under both shuffles, the slices a
//! worker computes from its `Register` answer ([`RoundInfo::of`] + [`RoundInfo::steps`], what `run_round`
//! trains on) equal what the coordinator's `GetDataPlan` answers for that rank, step by step — so training
//! never needs to ask.

use std::time::Duration;

use m3d_coordinator::{
    Assignment, ControlPlane, Coordinator, JobConfig, PlanSpec, Shuffle, WorkerInfo,
};
use m3d_worker::train::RoundInfo;

fn config(world: u32, plan: PlanSpec) -> JobConfig {
    JobConfig {
        data_fingerprint: Some("f".repeat(64)),
        initial_checkpoint: None,
        min_workers: world,
        max_workers: world,
        rendezvous_timeout: Duration::from_secs(10),
        heartbeat_timeout: Duration::from_secs(60),
        max_restarts: 0,
        plan,
    }
}

/// Registers `world` workers at once; their assignments by rank.
async fn round(coord: &Coordinator, world: u32) -> Vec<(String, Assignment)> {
    let joins: Vec<_> = (0..world)
        .map(|i| {
            let c = coord.clone();
            tokio::spawn(async move {
                let id = format!("w{i}");
                let info = WorkerInfo {
                    worker_id: id.clone(),
                    host: format!("h{}", i / 2),
                    collective_addr: format!("127.0.0.1:{}", 1000 + i),
                    gpus: 0,
                    nccl_unique_id: Vec::new(),
                };
                (id, c.register(info).await.expect("register"))
            })
        })
        .collect();
    let mut out = Vec::new();
    for j in joins {
        out.push(j.await.expect("join"));
    }
    out.sort_by_key(|(_, a)| a.rank);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ranks_computed_slices_equal_the_coordinators_plan_under_both_shuffles() {
    for shuffle in [
        Shuffle::Global,
        Shuffle::Blocks {
            block: 7,
            window: 3,
        },
    ] {
        for (world, max_steps) in [(1u32, None), (2, None), (3, Some(20)), (4, None)] {
            let plan = PlanSpec {
                kind: m3d_coordinator::PlanKind::Train,
                samples: 101,
                global_batch: 12,
                seed: 9,
                epochs: 3,
                max_steps,
                shuffle,
            };
            let coord = Coordinator::open(config(world, plan), None)
                .await
                .expect("coordinator");
            let members = round(&coord, world).await;
            assert_eq!(members.len(), world as usize);
            let total = plan.total_steps();
            assert_eq!(total, max_steps.unwrap_or(8 * 3));
            let mut whole: Vec<Vec<u64>> = vec![Vec::new(); total as usize];
            for (id, a) in &members {
                assert_eq!(a.data_fingerprint.as_deref(), Some("f".repeat(64).as_str()));
                let r = RoundInfo::of(a);
                // In chunks, as the loop computes them, and past the end (the last chunk stops there).
                let mut mine = Vec::new();
                let mut s = 0;
                while s < total {
                    let chunk = r.steps(s, 5).expect("local plan");
                    assert!(!chunk.is_empty());
                    s += chunk.len() as u64;
                    mine.extend(chunk);
                }
                let theirs = coord
                    .data_plan(id, a.generation, 0, total as u32 + 3)
                    .expect("coordinator plan");
                assert_eq!(theirs.rank, a.rank);
                assert_eq!(
                    mine, theirs.steps,
                    "{shuffle} world {world} rank {}",
                    a.rank
                );
                for p in &mine {
                    assert_eq!(p.samples.len() as u64, 12 / u64::from(world));
                    whole[p.step as usize].extend(&p.samples);
                }
            }
            // The ranks' slices, in rank order, are the global batch.
            for (step, batch) in whole.iter().enumerate() {
                assert_eq!(
                    batch,
                    &plan.global_batch_at(step as u64).unwrap(),
                    "{shuffle} world {world} step {step}"
                );
            }
        }
    }
}
