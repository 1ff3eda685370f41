//! The S3 backend against a real S3-protocol server on loopback (moto, from the Python venv): a dataset
//! written through `s3://bucket/prefix` reads back through `ShardDataset`, large objects go through
//! multipart upload, and credentials never show in `Debug` output or error messages.
//!
//! Everything here runs in one test function because it configures the process environment (AWS_*).
mod common;

use bytes::Bytes;
use m3d_shards::{ShardDataset, Store, VolumeRecord};

#[test]
fn dataset_round_trip_through_s3() {
    let tmp = tempfile::tempdir().unwrap();
    let server = m3d_testkit::S3Server::start(&tmp.path().join("moto.log"));
    server.create_bucket("m3d-test");

    const SECRET: &str = "s3cr3t-Should-Never-Be-Printed-7f3a";
    std::env::set_var("AWS_ACCESS_KEY_ID", "AKIATESTKEY");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET);
    std::env::remove_var("AWS_SESSION_TOKEN");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_ENDPOINT_URL", server.endpoint());

    let url = "s3://m3d-test/datasets/seg";
    let store = Store::open(url).unwrap();
    let dbg = format!("{store:?}");
    assert!(!dbg.contains(SECRET), "secret in Debug output: {dbg}");
    assert!(dbg.contains("m3d-test"), "{dbg}");

    let (shards, samples) = common::small_dataset(40);
    let manifest = common::write_dataset(&store, &shards, &samples);

    let ds = ShardDataset::open(url).unwrap();
    assert_eq!(ds.manifest(), &manifest);
    assert_eq!(ds.samples(), samples.as_slice());
    for (n, expected) in shards.iter().enumerate() {
        let got: Vec<VolumeRecord> = ds.stream_volumes(n).unwrap().map(Result::unwrap).collect();
        assert_eq!(&got, expected);
    }
    assert!(ds.verify().unwrap().is_ok());

    // Keys are relative to the prefix, which really is a prefix inside the bucket.
    let keys: Vec<String> = store
        .list("volumes")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        keys,
        ["volumes/part-00000.parquet", "volumes/part-00001.parquet"]
    );
    let root = Store::open("s3://m3d-test").unwrap();
    assert!(root
        .list("datasets/seg")
        .unwrap()
        .iter()
        .any(|(k, _)| k == "datasets/seg/manifest.json"));

    assert_eq!(store.get_opt("nope.bin").unwrap(), None);
    assert_eq!(store.size("nope.bin").unwrap(), None);
    assert!(matches!(
        store.get("nope.bin"),
        Err(m3d_store::StoreError::NotFound { .. })
    ));

    // Above the multipart threshold: several parts, reassembled exactly.
    let big: Vec<u8> = (0..(m3d_store::MULTIPART_THRESHOLD + 3 * 1024 * 1024 + 17))
        .map(|i| (i % 251) as u8)
        .collect();
    store.put("big/blob.bin", Bytes::from(big.clone())).unwrap();
    assert_eq!(store.size("big/blob.bin").unwrap(), Some(big.len() as u64));
    assert!(store.get("big/blob.bin").unwrap() == big.as_slice());
    store.delete("big/blob.bin").unwrap();
    assert_eq!(store.get_opt("big/blob.bin").unwrap(), None);
    // The same object given as many buffers (a header and tensors) crosses part boundaries unjoined.
    let parts: Vec<Bytes> = big
        .chunks(5 * 1024 * 1024 + 3)
        .map(Bytes::copy_from_slice)
        .collect();
    store.put_parts("big/parts.bin", parts).unwrap();
    assert!(store.get("big/parts.bin").unwrap() == big.as_slice());
    store.delete("big/parts.bin").unwrap();

    // Conditional put (If-None-Match: *): the first writer wins, the second writes nothing.
    assert!(store
        .put_if_absent("commit", Bytes::from_static(b"one"))
        .unwrap());
    assert!(!store
        .put_if_absent("commit", Bytes::from_static(b"two"))
        .unwrap());
    assert_eq!(store.get("commit").unwrap(), Bytes::from_static(b"one"));

    // The async variants work from the caller's runtime.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        store
            .put_async("async.txt", Bytes::from_static(b"hi"))
            .await
            .unwrap();
        assert_eq!(
            store.get_async("async.txt").await.unwrap(),
            Bytes::from_static(b"hi")
        );
    });

    // Errors (here: a bucket that does not exist) do not leak the secret either.
    let missing = Store::open("s3://no-such-bucket-m3d/x").unwrap();
    let err = missing.put("k", Bytes::from_static(b"v")).unwrap_err();
    let msg = format!("{err} {err:?}");
    assert!(msg.contains("no-such-bucket-m3d"), "{msg}");
    assert!(!msg.contains(SECRET), "secret in error: {msg}");
}
