//! `m3d data-prep` writing to and reading from a real S3-protocol server on loopback (moto): conversion, resume
//! and verification through `s3://` URLs, with credentials from the standard AWS variables and never printed.

mod common;

use common::{m3d_bin, s, synth_small};
use m3d_shards::dataset::ShardDataset;

const SECRET: &str = "m3d-secret-key-must-not-leak";

fn m3d_s3(endpoint: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(m3d_bin())
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "AKIAM3DTEST")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("RUST_LOG", "debug")
        .output()
        .expect("spawn m3d")
}

#[test]
fn converts_resumes_and_verifies_through_s3() {
    let tmp = tempfile::tempdir().unwrap();
    let server = m3d_testkit::S3Server::start(&tmp.path().join("moto.log"));
    server.create_bucket("m3d-data");
    let raw = tmp.path().join("raw");
    synth_small(&raw);
    let url = "s3://m3d-data/shards/seg";
    let src = raw.join("M3D_Seg");
    let args = [
        "data-prep",
        "seg",
        "--src",
        s(&src),
        "--out",
        url,
        "--shard-volumes",
        "2",
        "--json",
    ];
    let first = m3d_s3(&server.endpoint(), &args);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    assert!(!stderr.contains(SECRET), "secret leaked into the logs");
    let report: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert!(report["shards_written"].as_u64().unwrap() >= 2);

    // A second run reuses every shard from the store.
    let second = m3d_s3(&server.endpoint(), &args);
    assert!(second.status.success());
    let report2: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(report2["shards_written"].as_u64(), Some(0));
    assert_eq!(report2["shards_reused"], report["shards_written"]);

    let inspect = m3d_s3(
        &server.endpoint(),
        &["data-prep", "inspect", url, "--verify"],
    );
    let out = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    assert!(out.contains("verified"), "{out}");

    // The same dataset converted locally is identical shard for shard (same bytes, same checksums).
    let local = tmp.path().join("local");
    common::m3d_ok(&[
        "data-prep",
        "seg",
        "--src",
        s(&raw.join("M3D_Seg")),
        "--out",
        s(&local),
        "--shard-volumes",
        "2",
    ]);
    let local_ds = ShardDataset::open(s(&local)).unwrap();
    let m = m3d_s3(&server.endpoint(), &["data-prep", "inspect", url, "--json"]);
    let remote: serde_json::Value = serde_json::from_slice(&m.stdout).unwrap();
    assert_eq!(
        remote["volumes"].as_u64(),
        Some(local_ds.manifest().totals.volumes)
    );
    assert_eq!(
        remote["bytes"].as_u64(),
        Some(local_ds.manifest().totals.bytes)
    );

    // An unreachable store: the error names the bucket, never the secret.
    let bad = std::process::Command::new(m3d_bin())
        .args(["data-prep", "inspect", url])
        .env("AWS_ACCESS_KEY_ID", "AKIAM3DTEST")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(msg.contains("m3d-data") && !msg.contains(SECRET), "{msg}");
}

/// Without credentials in the environment, `object_store` falls back to the instance-metadata service; when
/// that fails too the error says the credentials are missing (once), not only how the fallback failed. The
/// metadata endpoint is pointed at a closed loopback port so nothing leaves the machine.
#[test]
fn missing_credentials_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let server = m3d_testkit::S3Server::start(&tmp.path().join("moto.log"));
    server.create_bucket("m3d-data");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metadata = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = std::process::Command::new(m3d_bin())
        .args(["data-prep", "inspect", "s3://m3d-data/shards/cap"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_WEB_IDENTITY_TOKEN_FILE")
        .env_remove("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        .env_remove("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        .env("AWS_METADATA_ENDPOINT", &metadata)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", server.endpoint())
        .env("RUST_LOG", "error")
        .output()
        .expect("spawn m3d");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(
        error.contains("no S3 credentials in the environment"),
        "{stderr}"
    );
    assert!(error.contains("manifest.json"), "{stderr}");
    assert_eq!(
        error.matches("error sending request").count(),
        1,
        "{stderr}"
    );
}
