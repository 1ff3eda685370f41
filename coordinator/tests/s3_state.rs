//! The job state on S3 (moto on loopback): a coordinator reopened on `s3://bucket/prefix` continues the job.
//! Its own test binary, because it sets the process's AWS_* environment.

use m3d_coordinator::{
    CheckpointRef, ControlPlane, Coordinator, JobConfig, JobPhase, PlanSpec, Progress, WorkerInfo,
};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_state_on_s3_survives_a_coordinator_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = m3d_testkit::S3Server::start(&tmp.path().join("moto.log"));
    server.create_bucket("m3d-jobs");
    std::env::set_var("AWS_ACCESS_KEY_ID", "AKIATESTKEY");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test-secret");
    std::env::remove_var("AWS_SESSION_TOKEN");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_ENDPOINT_URL", server.endpoint());

    let cfg = JobConfig {
        data_fingerprint: None,
        initial_checkpoint: None,
        min_workers: 1,
        max_workers: 1,
        rendezvous_timeout: Duration::from_secs(60),
        heartbeat_timeout: Duration::from_secs(60),
        max_restarts: 1,
        plan: PlanSpec {
            kind: m3d_coordinator::PlanKind::Train,
            max_steps: None,
            samples: 64,
            global_batch: 4,
            seed: 1,
            epochs: 1,
            shuffle: Default::default(),
        },
    };
    let url = "s3://m3d-jobs/runs/job-1";
    let coord = Coordinator::open(cfg.clone(), Some(url))
        .await
        .expect("open");
    let w = WorkerInfo {
        worker_id: "w".into(),
        host: "h".into(),
        ..Default::default()
    };
    let a = coord.register(w).await.expect("register");
    assert_eq!(a.world_size, 1);
    let p = Progress {
        step: 7,
        loss: 2.0,
        samples: 28,
    };
    coord.report_progress("w", 0, p).await.expect("progress");
    let ckpt = CheckpointRef {
        step: 6,
        url: "s3://m3d-jobs/runs/job-1/ckpt/6".into(),
    };
    coord
        .commit_checkpoint("w", 0, ckpt.clone())
        .await
        .expect("commit");
    drop(coord);

    let again = Coordinator::open(cfg, Some(url)).await.expect("reopen");
    let s = again.status();
    assert_eq!(s.phase, JobPhase::Running);
    assert_eq!((s.generation, s.step), (0, 7));
    assert_eq!(s.last_checkpoint, Some(ckpt));
    assert_eq!(s.members.len(), 1);
}
