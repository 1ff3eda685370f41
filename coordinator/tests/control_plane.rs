//! The coordinator over real sockets: an in-process gRPC server on loopback and real tonic clients.
//!
//! Nothing here measures time: timeouts are set so that the asserted outcome follows from the order of events,
//! and waiting is on the job's own status stream (bounded by a generous guard against hangs).

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use m3d_coordinator::{
    spawn_heartbeats, Assignment, CheckpointRef, Client, ControlPlane, Coordinator, JobConfig,
    JobPhase, JobStatus, PlanSpec, Progress, Token, WorkerAction, WorkerInfo,
};

const GUARD: Duration = Duration::from_secs(30);

fn cfg(min: u32, max: u32, rendezvous: Duration, heartbeat: Duration, restarts: u32) -> JobConfig {
    JobConfig {
        data_fingerprint: None,
        initial_checkpoint: None,
        min_workers: min,
        max_workers: max,
        rendezvous_timeout: rendezvous,
        heartbeat_timeout: heartbeat,
        max_restarts: restarts,
        plan: PlanSpec {
            kind: m3d_coordinator::PlanKind::Train,
            max_steps: None,
            samples: 100,
            global_batch: 12,
            seed: 5,
            epochs: 2,
            shuffle: Default::default(),
        },
    }
}

fn worker(id: &str, host: &str) -> WorkerInfo {
    WorkerInfo {
        worker_id: id.to_string(),
        host: host.to_string(),
        collective_addr: format!("{host}:{}", 9000 + id.len()),
        gpus: 0,
        nccl_unique_id: format!("uid-of-{id}").into_bytes(),
    }
}

struct Server {
    url: String,
    coord: Coordinator,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(cfg: JobConfig, state: Option<&str>, token: Option<Token>) -> Server {
        let coord = Coordinator::open(cfg, state)
            .await
            .expect("open coordinator");
        let (listener, addr) = m3d_coordinator::grpc::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let c = coord.clone();
        let task = tokio::spawn(async move {
            m3d_coordinator::serve(c, listener, token, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });
        Server {
            url: format!("http://{addr}"),
            coord,
            stop: Some(stop),
            task,
        }
    }

    async fn client(&self) -> Client {
        Client::connect(&self.url, None).await.expect("connect")
    }

    async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }
}

/// Waits (on the status stream) until `pred` holds, and returns that status.
async fn wait_for(client: &mut Client, what: &str, pred: impl Fn(&JobStatus) -> bool) -> JobStatus {
    let mut stream = client.watch().await.expect("watch");
    let found = tokio::time::timeout(GUARD, async {
        while let Some(s) = stream.next().await {
            let s = s.expect("status");
            if pred(&s) {
                return s;
            }
        }
        panic!("status stream ended while waiting for {what}");
    })
    .await;
    found.unwrap_or_else(|_| panic!("gave up waiting for {what}"))
}

/// What `beats` were told once the coordinator stopped answering "continue".
async fn told_by(beats: &mut m3d_coordinator::client::Heartbeats) -> WorkerAction {
    tokio::time::timeout(
        GUARD,
        beats.actions.wait_for(|a| *a != WorkerAction::Continue),
    )
    .await
    .expect("heartbeats hang")
    .map(|a| *a)
    .expect("heartbeat task")
}

async fn register_all(url: &str, workers: Vec<WorkerInfo>) -> Vec<(WorkerInfo, Assignment)> {
    let mut tasks = Vec::new();
    for w in workers {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&url, None).await.expect("connect");
            let a = c.register(&w).await.expect("register");
            (w, a)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(
            tokio::time::timeout(GUARD, t)
                .await
                .expect("rendezvous hangs")
                .expect("task"),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendezvous_assigns_ranks_by_host_and_id_with_consistent_peers() {
    let server = Server::start(
        cfg(4, 4, Duration::from_secs(600), Duration::from_secs(30), 0),
        None,
        None,
    )
    .await;
    // Arrival order differs from the rank order on purpose.
    let workers = vec![
        worker("w3", "hostA"),
        worker("w0", "hostB"),
        worker("w2", "hostA"),
        worker("w1", "hostB"),
    ];
    let got = register_all(&server.url, workers).await;
    let ranks: BTreeSet<u32> = got.iter().map(|(_, a)| a.rank).collect();
    assert_eq!(ranks, (0..4).collect::<BTreeSet<u32>>());
    let mut c = server.client().await;
    let peers = c.all_peers(&got[0].0.worker_id, 0).await.expect("peers");
    let order: Vec<&str> = peers.iter().map(|p| p.worker_id.as_str()).collect();
    assert_eq!(
        order,
        ["w2", "w3", "w0", "w1"],
        "ranks ordered by (host, worker id)"
    );
    for (w, a) in &got {
        assert_eq!(a.world_size, 4);
        assert_eq!(a.generation, 0);
        let all = c.all_peers(&w.worker_id, 0).await.expect("peers");
        assert_eq!(all, peers, "every rank sees the same peer list");
        assert_eq!(peers[a.rank as usize].worker_id, w.worker_id);
        assert_eq!(peers[a.rank as usize].collective_addr, w.collective_addr);
        let r = a.rank as usize;
        let ring = vec![peers[(r + 3) % 4].clone(), peers[(r + 1) % 4].clone()];
        assert_eq!(a.peers, ring, "rank {r}'s ring neighbours");
        assert_eq!(
            (a.local_rank, a.local_world_size),
            (a.rank % 2, 2),
            "two ranks per host"
        );
        assert_eq!(
            a.nccl_unique_id.as_slice(),
            b"uid-of-w2",
            "rank 0's NCCL id for everyone"
        );
        assert_eq!(a.resume_step, 0);
        assert!(a.resume_checkpoint.is_none());
    }
    let s = server.client().await.status().await.expect("status");
    assert_eq!(s.phase, JobPhase::Running);
    assert_eq!(s.world_size, 4);
    assert_eq!(s.members, peers);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_starter_joins_before_the_timeout_and_the_round_waits_for_it() {
    // The rendezvous timeout never passes in this test: the round may only start when the third worker arrives.
    let server = Server::start(
        cfg(2, 3, Duration::from_secs(600), Duration::from_secs(30), 0),
        None,
        None,
    )
    .await;
    let mut early = Vec::new();
    for id in ["a", "b"] {
        let url = server.url.clone();
        early.push(tokio::spawn(async move {
            let mut c = Client::connect(&url, None).await.expect("connect");
            c.register(&worker(id, "h")).await.expect("register")
        }));
    }
    let mut c = server.client().await;
    let s = wait_for(&mut c, "two waiting workers", |s| s.waiting == 2).await;
    assert_eq!(s.phase, JobPhase::Rendezvous);
    assert!(
        early.iter().all(|t| !t.is_finished()),
        "min workers must not start before the timeout"
    );
    let late = register_all(&server.url, vec![worker("c", "h")]).await;
    assert_eq!(late[0].1.world_size, 3);
    assert_eq!(late[0].1.rank, 2);
    for t in early {
        let a = tokio::time::timeout(GUARD, t)
            .await
            .expect("hang")
            .expect("task");
        assert_eq!(a.world_size, 3, "the slow starter is part of the round");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_workers_start_once_the_rendezvous_timeout_passes() {
    let server = Server::start(
        cfg(2, 4, Duration::from_millis(300), Duration::from_secs(30), 0),
        None,
        None,
    )
    .await;
    let got = register_all(&server.url, vec![worker("a", "h"), worker("b", "h")]).await;
    for (_, a) in &got {
        assert_eq!(a.world_size, 2);
    }
    // The round is training: a latecomer is refused, not silently added.
    let mut late = server.client().await;
    let err = late
        .register(&worker("c", "h"))
        .await
        .expect_err("late worker");
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_worker_triggers_a_restart_round_then_the_budget_fails_the_job() {
    let hb = Duration::from_millis(1500);
    let server = Server::start(cfg(2, 2, Duration::from_secs(600), hb, 1), None, None).await;
    let got = register_all(&server.url, vec![worker("a", "h"), worker("b", "h")]).await;
    assert!(got.iter().all(|(_, a)| a.generation == 0));
    // `a` keeps beating, `b` never does.
    let beat = Duration::from_millis(100);
    let mut beats = spawn_heartbeats(server.client().await, "a".into(), 0, beat);
    let mut c = server.client().await;
    let s = wait_for(&mut c, "a restart round", |s| {
        s.phase == JobPhase::Restarting
    })
    .await;
    assert_eq!(s.generation, 1);
    assert_eq!(s.restarts, 1);
    let failure = s.failure.clone().unwrap_or_default();
    assert!(
        failure.contains("`b` (rank 1)"),
        "failure names the silent worker: {failure}"
    );
    // The surviving worker is told to re-register; its old round's requests are refused.
    let told = told_by(&mut beats).await;
    assert_eq!(told, WorkerAction::Reregister);
    let h = c.heartbeat("a", 0).await.expect("heartbeat");
    assert_eq!((h.action, h.generation), (WorkerAction::Reregister, 1));
    let err = c.data_plan("a", 0, 0, 1).await.expect_err("stale round");
    assert_eq!(err.code(), Some(tonic::Code::Aborted), "{err}");

    let again = register_all(&server.url, vec![worker("a", "h"), worker("b", "h")]).await;
    assert!(again
        .iter()
        .all(|(_, a)| a.generation == 1 && a.world_size == 2));
    let mut beats = spawn_heartbeats(server.client().await, "a".into(), 1, beat);
    let s = wait_for(&mut c, "the job to fail", |s| s.phase == JobPhase::Failed).await;
    assert_eq!(s.restarts, 1);
    assert!(s.failure.unwrap_or_default().contains("restart budget"));
    let told = told_by(&mut beats).await;
    assert_eq!(told, WorkerAction::Stop);
    let err = c.register(&worker("z", "h")).await.expect_err("job over");
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_right_token_are_unauthenticated() {
    let secret = "tok-9f8e7d6c5b4a";
    let server = Server::start(
        cfg(1, 1, Duration::from_secs(600), Duration::from_secs(30), 0),
        None,
        Token::new(secret),
    )
    .await;
    for token in [None, Token::new("tok-9f8e7d6c5b4b"), Token::new("tok")] {
        let mut c = Client::connect(&server.url, token).await.expect("connect");
        let err = c.status().await.expect_err("no token");
        assert_eq!(err.code(), Some(tonic::Code::Unauthenticated), "{err}");
        assert!(!err.is_transient(), "a refusal is final: {err}");
        assert!(!err.to_string().contains(secret));
        let err = c.register(&worker("a", "h")).await.expect_err("no token");
        assert_eq!(err.code(), Some(tonic::Code::Unauthenticated));
    }
    assert_eq!(
        server.coord.status().waiting,
        0,
        "refused calls never reach the job"
    );
    let mut c = Client::connect(&server.url, Token::new(secret))
        .await
        .expect("connect");
    let a = c
        .register(&worker("a", "h"))
        .await
        .expect("register with the token");
    assert_eq!(a.world_size, 1);
    assert_eq!(
        format!("{:?}", Token::new(secret)),
        "Some(Token(<redacted>))"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_barrier_commit_and_a_restart_resumes_from_the_commit() {
    let server = Server::start(
        cfg(2, 2, Duration::from_secs(600), Duration::from_secs(30), 2),
        None,
        None,
    )
    .await;
    register_all(&server.url, vec![worker("a", "h"), worker("b", "h")]).await;
    let mut c = server.client().await;
    for id in ["a", "b"] {
        let act = c
            .report_progress(
                id,
                0,
                Progress {
                    step: 4,
                    loss: 1.5,
                    samples: 24,
                },
            )
            .await
            .expect("progress");
        assert_eq!(act, WorkerAction::Continue);
    }
    let first = {
        let url = server.url.clone();
        tokio::spawn(async move {
            Client::connect(&url, None)
                .await
                .expect("c")
                .checkpoint_barrier("a", 0, 4)
                .await
        })
    };
    let s = wait_for(&mut c, "checkpointing", |s| {
        s.phase == JobPhase::Checkpointing
    })
    .await;
    assert_eq!(s.step, 4);
    assert!(!first.is_finished(), "the barrier waits for rank 1");
    assert_eq!(c.checkpoint_barrier("b", 0, 4).await.expect("barrier"), 4);
    assert_eq!(first.await.expect("task").expect("barrier"), 4);
    let ckpt = CheckpointRef {
        step: 4,
        url: "file:///ckpt/step-4".into(),
    };
    assert_eq!(c.commit_checkpoint("a", 0, &ckpt).await.expect("commit"), 4);
    let s = c.status().await.expect("status");
    assert_eq!(s.phase, JobPhase::Running);
    assert_eq!(s.last_checkpoint, Some(ckpt.clone()));
    let err = c
        .commit_checkpoint(
            "a",
            0,
            &CheckpointRef {
                step: 3,
                url: "x".into(),
            },
        )
        .await
        .expect_err("older commit");
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition));
    for id in ["a", "b"] {
        c.report_progress(
            id,
            0,
            Progress {
                step: 6,
                loss: 1.2,
                samples: 36,
            },
        )
        .await
        .expect("progress");
    }
    // `b` restarted (same id, new process): the round breaks at once and everyone resumes from the commit.
    let b = {
        let url = server.url.clone();
        tokio::spawn(async move {
            Client::connect(&url, None)
                .await
                .expect("c")
                .register(&worker("b", "h"))
                .await
        })
    };
    wait_for(&mut c, "a restart round", |s| {
        s.phase == JobPhase::Restarting && s.waiting == 1
    })
    .await;
    assert_eq!(
        c.heartbeat("a", 0).await.expect("hb").action,
        WorkerAction::Reregister
    );
    let a = c.register(&worker("a", "h")).await.expect("re-register");
    let b = b.await.expect("task").expect("re-register");
    for x in [&a, &b] {
        assert_eq!(x.generation, 1);
        assert_eq!(x.resume_step, 4);
        assert_eq!(x.resume_checkpoint, Some(ckpt.clone()));
    }
    let s = c.status().await.expect("status");
    assert_eq!(
        (s.step, s.epoch, s.step_in_epoch, s.resume_step),
        (4, 0, 4, 4)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_coordinator_continues_the_job_from_its_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("job").display().to_string();
    let config = cfg(2, 2, Duration::from_secs(600), Duration::from_secs(30), 2);
    let server = Server::start(config.clone(), Some(&state), None).await;
    register_all(&server.url, vec![worker("a", "h"), worker("b", "h")]).await;
    let mut c = server.client().await;
    for id in ["a", "b"] {
        c.report_progress(
            id,
            0,
            Progress {
                step: 5,
                loss: 0.75,
                samples: 30,
            },
        )
        .await
        .expect("progress");
    }
    let ckpt = CheckpointRef {
        step: 5,
        url: "file:///ckpt/5".into(),
    };
    c.commit_checkpoint("a", 0, &ckpt).await.expect("commit");
    let before = c.status().await.expect("status");
    server.shutdown().await;
    // A coordinator that is gone is worth waiting for (workers retry these), unlike one that refuses.
    let err = c.status().await.expect_err("the coordinator is down");
    assert!(err.is_transient(), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("job").join("job.json")).expect("job.json"),
    )
    .expect("job document");
    assert_eq!(
        (doc["phase"].as_str(), doc["step"].as_u64()),
        (Some("running"), Some(5))
    );
    assert_eq!(
        (doc["epoch"].as_u64(), doc["step_in_epoch"].as_u64()),
        (Some(0), Some(5))
    );
    drop(c);

    let server = Server::start(config.clone(), Some(&state), None).await;
    let mut c = server.client().await;
    let s = c.status().await.expect("status");
    assert_eq!(s.phase, JobPhase::Running);
    assert_eq!(
        (s.generation, s.step, s.epoch, s.step_in_epoch),
        (0, 5, 0, 5)
    );
    assert_eq!(s.last_checkpoint, Some(ckpt));
    assert_eq!(s.members, before.members);
    // The round's workers carry on without re-registering.
    assert_eq!(
        c.heartbeat("a", 0).await.expect("hb").action,
        WorkerAction::Continue
    );
    let plan = c.data_plan("b", 0, 5, 1).await.expect("plan");
    assert_eq!(plan.rank, 1);
    assert_eq!(
        plan.steps[0].samples,
        config.plan.rank_slice(5, 1, 2).expect("slice")
    );
    server.shutdown().await;

    // A different data plan under the same state URL is another job: refused.
    let mut other = config.clone();
    other.plan.seed += 1;
    let err = Coordinator::open(other, Some(&state))
        .await
        .err()
        .expect("plan mismatch");
    assert!(err.to_string().contains("data plan"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_plans_over_grpc_are_the_same_global_order_for_one_two_and_three_workers() {
    let mut per_world = Vec::new();
    for world in 1..=3u32 {
        let config = cfg(
            world,
            world,
            Duration::from_secs(600),
            Duration::from_secs(30),
            0,
        );
        let total = config.plan.total_steps();
        let server = Server::start(config.clone(), None, None).await;
        let workers: Vec<WorkerInfo> = (0..world).map(|i| worker(&format!("w{i}"), "h")).collect();
        let got = register_all(&server.url, workers).await;
        let mut c = server.client().await;
        let mut plans = vec![Vec::new(); world as usize];
        for (w, a) in &got {
            let p = c
                .data_plan(&w.worker_id, a.generation, 0, total as u32 + 5)
                .await
                .expect("plan");
            assert_eq!(
                p.steps.len() as u64,
                total,
                "every rank gets every step, no more"
            );
            plans[a.rank as usize] = p.steps;
        }
        let mut order = Vec::new();
        for step in 0..total as usize {
            let mut batch = Vec::new();
            for rank_plan in &plans {
                assert_eq!(rank_plan[step].step, step as u64);
                assert_eq!(rank_plan[step].samples.len() as u64, 12 / u64::from(world));
                batch.extend_from_slice(&rank_plan[step].samples);
            }
            assert_eq!(
                batch,
                config.plan.global_batch_at(step as u64).expect("batch")
            );
            order.push(batch);
        }
        per_world.push(order);
        server.shutdown().await;
    }
    assert_eq!(per_world[0], per_world[1]);
    assert_eq!(per_world[0], per_world[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_shuffle_reaches_the_workers_with_its_plan() {
    let mut config = cfg(2, 2, Duration::from_secs(600), Duration::from_secs(30), 0);
    config.plan.shuffle = m3d_coordinator::Shuffle::Blocks {
        block: 32,
        window: 3,
    };
    let total = config.plan.total_steps();
    let server = Server::start(config.clone(), None, None).await;
    let workers: Vec<WorkerInfo> = (0..2).map(|i| worker(&format!("w{i}"), "h")).collect();
    let got = register_all(&server.url, workers).await;
    let mut c = server.client().await;
    let mut plans = vec![Vec::new(); 2];
    for (w, a) in &got {
        // The spec a worker records in its checkpoints carries the shuffle.
        assert_eq!(a.plan, config.plan);
        plans[a.rank as usize] = c
            .data_plan(&w.worker_id, a.generation, 0, total as u32)
            .await
            .expect("plan")
            .steps;
    }
    for step in 0..total as usize {
        let batch: Vec<u64> = plans.iter().flat_map(|p| p[step].samples.clone()).collect();
        assert_eq!(
            batch,
            config.plan.global_batch_at(step as u64).expect("batch")
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_invalid_arguments() {
    use m3d_proto::v1 as pb;
    let server = Server::start(
        cfg(1, 1, Duration::from_secs(600), Duration::from_secs(30), 0),
        None,
        None,
    )
    .await;
    let mut raw = pb::coordinator_client::CoordinatorClient::connect(server.url.clone())
        .await
        .expect("connect");
    let no_caps = pb::RegisterRequest {
        worker_id: "a".into(),
        capabilities: None,
        ..Default::default()
    };
    let err = raw
        .register(no_caps)
        .await
        .expect_err("missing capabilities");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("capabilities"));
    let err = raw
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .expect_err("missing worker id");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // The same through m3d.v2 (the v1 calls above reach the same checks through it).
    use m3d_proto::v2;
    let mut raw2 =
        v2::coordinator_service_client::CoordinatorServiceClient::connect(server.url.clone())
            .await
            .expect("connect");
    let err = raw2
        .register(v2::RegisterRequest {
            worker_id: "a".into(),
            capabilities: None,
            ..Default::default()
        })
        .await
        .expect_err("missing capabilities");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = raw2
        .send_heartbeat(v2::SendHeartbeatRequest::default())
        .await
        .expect_err("missing worker id");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let mut c = server.client().await;
    c.register(&worker("a", "h")).await.expect("register");
    let err = c
        .data_plan("a", 0, 0, 100_000)
        .await
        .expect_err("too many steps");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    let err = c
        .data_plan("nobody", 0, 0, 1)
        .await
        .expect_err("unknown worker");
    assert_eq!(err.code(), Some(tonic::Code::NotFound));
    let err = c
        .report_progress(
            "a",
            0,
            Progress {
                step: 10_000,
                loss: 0.0,
                samples: 0,
            },
        )
        .await
        .expect_err("past the end");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_completes_when_every_rank_reports_the_last_step() {
    let server = Server::start(
        cfg(2, 2, Duration::from_secs(600), Duration::from_secs(30), 0),
        None,
        None,
    )
    .await;
    register_all(&server.url, vec![worker("a", "h"), worker("b", "h")]).await;
    let mut c = server.client().await;
    let total = server.coord.config().plan.total_steps();
    let p = Progress {
        step: total,
        loss: 0.1,
        samples: 0,
    };
    assert_eq!(
        c.report_progress("a", 0, p).await.expect("a"),
        WorkerAction::Continue
    );
    assert_eq!(
        c.report_progress("b", 0, p).await.expect("b"),
        WorkerAction::Stop
    );
    let s = c.status().await.expect("status");
    assert_eq!(s.phase, JobPhase::Completed);
    assert_eq!(s.step, total);
    assert!(
        server.coord.unheard().is_empty(),
        "a completed job has no one left to tell"
    );
    assert_eq!(
        c.heartbeat("a", 0).await.expect("hb").action,
        WorkerAction::Stop
    );
    server.shutdown().await;
}

/// A job that fails keeps the list of the round's members that have not heard it yet (what `--exit-on-finish`
/// serves for): the silent member blamed is not on it, a survivor leaves it with its next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_lists_the_members_that_have_not_heard_until_they_call() {
    let hb = Duration::from_millis(800);
    let server = Server::start(cfg(3, 3, Duration::from_secs(600), hb, 0), None, None).await;
    register_all(
        &server.url,
        vec![worker("a", "h"), worker("b", "h"), worker("c", "h")],
    )
    .await;
    assert!(server.coord.unheard().is_empty(), "the job runs");
    // `a` keeps beating; `b` (rank 1) and `c` (rank 2) fall silent together, so `b` is the one blamed.
    let mut beats = spawn_heartbeats(
        server.client().await,
        "a".into(),
        0,
        Duration::from_millis(100),
    );
    let mut c = server.client().await;
    let s = wait_for(&mut c, "the job to fail", |s| s.phase == JobPhase::Failed).await;
    assert!(
        s.failure
            .clone()
            .unwrap_or_default()
            .contains("`b` (rank 1)"),
        "{:?}",
        s.failure
    );
    let told = told_by(&mut beats).await;
    assert_eq!(told, WorkerAction::Stop);
    assert_eq!(server.coord.unheard(), vec!["c".to_string()]);
    // A lease (or any call of the round) tells it just as a heartbeat does.
    let err = c
        .data_plan("c", 0, 0, 1)
        .await
        .expect_err("the job is over");
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    assert!(server.coord.unheard().is_empty());
    server.shutdown().await;
}

/// The deprecated `m3d.v1` service is served beside `m3d.v2`, on the same port, behind the same token and answered
/// by the same job: a worker registered through v1 is a member for a v2 client, and v1's answers are v2's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_is_served_beside_v2_by_the_same_job_behind_the_same_token() {
    use m3d_proto::v1;
    let secret = "tok-v1-0a1b2c";
    let server = Server::start(
        cfg(1, 1, Duration::from_secs(600), Duration::from_secs(30), 0),
        None,
        Token::new(secret),
    )
    .await;
    let mut raw = v1::coordinator_client::CoordinatorClient::connect(server.url.clone())
        .await
        .expect("connect");
    fn with<T>(token: &str, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        let value = format!("Bearer {token}").parse().expect("header");
        req.metadata_mut().insert("authorization", value);
        req
    }
    let err = raw
        .job_status(v1::JobStatusRequest {})
        .await
        .expect_err("no token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = raw
        .job_status(with("tok-v1-0a1b2d", v1::JobStatusRequest {}))
        .await
        .expect_err("wrong token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let a = raw
        .register(with(
            secret,
            v1::RegisterRequest {
                worker_id: "a".into(),
                host: "h".into(),
                collective_addr: "h:9001".into(),
                capabilities: Some(v1::Capabilities { gpus: 2 }),
                nccl_unique_id: b"uid-of-a".to_vec(),
            },
        ))
        .await
        .expect("v1 register")
        .into_inner();
    assert_eq!((a.rank, a.world_size, a.generation), (0, 1, 0));
    assert_eq!(a.nccl_unique_id, b"uid-of-a");
    let plan = a.plan.expect("plan");
    assert_eq!((plan.samples, plan.global_batch, plan.seed), (100, 12, 5));

    let mut c = Client::connect(&server.url, Token::new(secret))
        .await
        .expect("connect");
    let s = c.status().await.expect("v2 status");
    assert_eq!(s.phase, JobPhase::Running);
    assert_eq!(s.members.len(), 1);
    assert_eq!(
        (s.members[0].worker_id.as_str(), s.members[0].gpus),
        ("a", 2)
    );

    let s1 = raw
        .job_status(with(secret, v1::JobStatusRequest {}))
        .await
        .expect("v1 status")
        .into_inner();
    assert_eq!(s1.state, v1::JobState::Running as i32);
    assert_eq!((s1.generation, s1.world_size), (s.generation, s.world_size));
    assert_eq!(s1.members.len(), 1);
    assert_eq!(s1.members[0].collective_addr, "h:9001");
    assert_eq!(s1.plan.as_ref().map(|p| p.total_steps), Some(s.total_steps));
    let mut watch = raw
        .watch(with(secret, v1::WatchRequest {}))
        .await
        .expect("v1 watch")
        .into_inner();
    let first = tokio::time::timeout(GUARD, watch.next())
        .await
        .expect("a first status")
        .expect("stream open")
        .expect("status");
    assert_eq!(first, s1);
    drop(watch); // an open stream would hold the server's graceful shutdown

    let h = raw
        .heartbeat(with(
            secret,
            v1::HeartbeatRequest {
                worker_id: "a".into(),
                generation: 0,
            },
        ))
        .await
        .expect("v1 heartbeat")
        .into_inner();
    assert_eq!(h.action, v1::WorkerAction::Continue as i32);
    let p1 = raw
        .get_data_plan(with(
            secret,
            v1::DataPlanRequest {
                worker_id: "a".into(),
                generation: 0,
                start_step: 1,
                steps: 2,
            },
        ))
        .await
        .expect("v1 data plan")
        .into_inner();
    let p2 = c.data_plan("a", 0, 1, 2).await.expect("v2 data plan");
    assert_eq!(p1.steps.len(), 2);
    for (a, b) in p1.steps.iter().zip(&p2.steps) {
        assert_eq!((a.step, &a.samples), (b.step, &b.samples));
    }
    // Refusals keep their codes through v1.
    let err = raw
        .get_data_plan(with(
            secret,
            v1::DataPlanRequest {
                worker_id: "nobody".into(),
                generation: 0,
                start_step: 0,
                steps: 1,
            },
        ))
        .await
        .expect_err("unknown worker");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let peers = raw
        .get_peers(with(
            secret,
            v1::PeersRequest {
                worker_id: "a".into(),
                generation: 0,
                start_rank: 0,
                count: 10,
            },
        ))
        .await
        .expect("v1 peers")
        .into_inner();
    assert_eq!((peers.world_size, peers.peers.len()), (1, 1));
    server.shutdown().await;
}

/// Kubernetes' `grpc` readiness probe asks `grpc.health.v1.Health/Check` without any token: the coordinator
/// answers SERVING even when workers must present one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_service_answers_a_probe_without_the_token() {
    let token = Token::new("probe-test-token");
    let server = Server::start(
        cfg(1, 1, Duration::from_secs(5), Duration::from_secs(5), 0),
        None,
        token,
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(server.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(
        answer.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // The job's own service still refuses a call without the token.
    let mut c = server.client().await;
    assert!(c.status().await.is_err());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_job_forms_any_world_size_and_completes_when_every_rank_reports_its_one_step()
{
    let mut config = cfg(3, 3, Duration::from_secs(600), Duration::from_secs(30), 0);
    config.plan = PlanSpec::evaluation(7, 11);
    config.data_fingerprint = Some("data=abc\ntasks=cap\n".into());
    let server = Server::start(config, None, None).await;
    let workers: Vec<WorkerInfo> = (0..3).map(|i| worker(&format!("e{i}"), "h")).collect();
    let got = register_all(&server.url, workers).await;
    for (_, a) in &got {
        // The plan's kind and the evaluation's settings reach every rank over the wire.
        assert_eq!(a.plan, PlanSpec::evaluation(7, 11));
        assert_eq!(a.data_fingerprint.as_deref(), Some("data=abc\ntasks=cap\n"));
        assert_eq!(a.world_size, 3);
    }
    let mut c = server.client().await;
    for (i, (w, a)) in got.iter().enumerate() {
        assert_ne!(c.status().await.expect("status").phase, JobPhase::Completed);
        let action = c
            .report_progress(
                &w.worker_id,
                a.generation,
                Progress {
                    step: 1,
                    loss: 0.0,
                    samples: 7,
                },
            )
            .await
            .expect("report");
        let last = i == got.len() - 1;
        assert_eq!(
            action,
            if last {
                WorkerAction::Stop
            } else {
                WorkerAction::Continue
            }
        );
    }
    assert_eq!(c.status().await.expect("status").phase, JobPhase::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_round_leases_its_pass_in_order_once_and_a_new_round_leases_it_again() {
    let hb = Duration::from_millis(1500);
    let mut config = cfg(1, 2, Duration::from_millis(300), hb, 1);
    config.plan = PlanSpec::evaluation(10, 11);
    let server = Server::start(config, None, None).await;
    let got = register_all(&server.url, vec![worker("a", "h"), worker("b", "h")]).await;
    assert!(got
        .iter()
        .all(|(_, a)| a.world_size == 2 && a.generation == 0));
    let mut c = server.client().await;
    // Whoever asks gets the next items, and the pass is handed out once: a then b then a then b.
    let mut leased = Vec::new();
    for (who, max) in [("a", 4), ("b", 4), ("a", 4), ("b", 4)] {
        let l = c.lease_work(who, 0, max).await.expect("lease");
        assert_eq!(l.items, 10);
        leased.push((l.start, l.end));
    }
    assert_eq!(leased, vec![(0, 4), (4, 8), (8, 10), (10, 10)]);
    let err = c.lease_work("a", 0, 0).await.expect_err("an empty lease");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    let err = c.lease_work("z", 0, 1).await.expect_err("a stranger");
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");

    // `b` falls silent: the round breaks, `a`'s old round is refused, and the next round starts the pass over.
    let _beats = spawn_heartbeats(
        server.client().await,
        "a".into(),
        0,
        Duration::from_millis(100),
    );
    wait_for(&mut c, "a restart round", |s| {
        s.phase == JobPhase::Restarting
    })
    .await;
    let err = c
        .lease_work("a", 0, 4)
        .await
        .expect_err("a lease of a broken round");
    assert_eq!(err.code(), Some(tonic::Code::Aborted), "{err}");
    let again = register_all(&server.url, vec![worker("a", "h")]).await;
    let generation = again[0].1.generation;
    assert_eq!(generation, 1);
    let l = c.lease_work("a", generation, 100).await.expect("lease");
    assert_eq!((l.start, l.end, l.items), (0, 10, 10));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_job_leases_no_work() {
    let server = Server::start(
        cfg(1, 1, Duration::from_secs(600), Duration::from_secs(30), 0),
        None,
        None,
    )
    .await;
    let got = register_all(&server.url, vec![worker("a", "h")]).await;
    let mut c = server.client().await;
    let err = c
        .lease_work("a", got[0].1.generation, 4)
        .await
        .expect_err("a training job's lease");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("training"), "{err}");
    server.shutdown().await;
}
