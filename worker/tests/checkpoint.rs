//! Checkpoint files in a store: a checkpoint exists only once its commit record is written, every file is
//! checked against the record when loaded, retention keeps the last K and every M-th, and interrupted writes
//! are cleaned up.

use bytes::Bytes;
use m3d_coordinator::plan::PlanSpec;
use m3d_store::Store;
use m3d_worker::checkpoint::{
    check_identity, committed_steps, delete_checkpoints, discard_after, load, read_state, retain,
    step_dir, write, CheckpointError, CheckpointState, IdentityCheck, RunIdentity, Staged,
    UploadOptions, Uploader, STATE_FORMAT,
};
use tch::{Kind, Tensor};

fn identity() -> RunIdentity {
    RunIdentity {
        data: "ab".repeat(32),
        global_batch: 4,
        seed: 1,
        shuffle: "global".into(),
    }
}

fn state(step: u64) -> CheckpointState {
    CheckpointState {
        format: STATE_FORMAT,
        identity: Some(identity()),
        step,
        epoch: 0,
        step_in_epoch: step,
        world_size: 2,
        plan: PlanSpec {
            kind: m3d_coordinator::PlanKind::Train,
            samples: 100,
            global_batch: 4,
            seed: 1,
            epochs: 1,
            max_steps: None,
            shuffle: Default::default(),
        },
        recipe: "model: {}\n".into(),
        version: "test".into(),
    }
}

fn tensors(v: f32) -> Vec<(String, Tensor)> {
    vec![
        (
            "a.weight".into(),
            Tensor::from_slice(&[v, v + 1.0, v + 2.0]).view([3, 1]),
        ),
        ("b.step".into(), Tensor::from_slice(&[7i64])),
    ]
}

fn opts(keep_last: usize, attempts: u32) -> UploadOptions {
    UploadOptions {
        keep_last,
        attempts,
        ..UploadOptions::default()
    }
}

fn staged(step: u64) -> Staged {
    Staged::new(
        &state(step),
        &tensors(step as f32),
        &tensors(-(step as f32)),
    )
    .unwrap()
}

#[test]
fn only_committed_checkpoints_exist_and_load_checked() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    write(&store, &staged(10)).unwrap();
    // An interrupted write: files but no commit record.
    store
        .put(
            &format!("{}/model.safetensors", step_dir(20)),
            Bytes::from_static(b"partial"),
        )
        .unwrap();
    assert_eq!(committed_steps(&store).unwrap(), vec![10]);
    let l = load(&store, 10).unwrap();
    assert_eq!(l.state, state(10));
    let get = |v: &[(String, Tensor)], k: &str| {
        v.iter()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t.shallow_clone())
            .unwrap()
    };
    assert_eq!(get(&l.model, "a.weight").double_value(&[2, 0]), 12.0);
    assert_eq!(get(&l.optimizer, "a.weight").double_value(&[0, 0]), -10.0);
    assert_eq!(get(&l.optimizer, "b.step").kind(), Kind::Int64);
    let e = load(&store, 20).err().unwrap().to_string();
    assert!(e.contains("not committed"), "{e}");
    // A file changed after the commit is named.
    store
        .put(
            &format!("{}/optimizer.safetensors", step_dir(10)),
            Bytes::from_static(b"tampered"),
        )
        .unwrap();
    let e = load(&store, 10).err().unwrap().to_string();
    assert!(
        e.contains("optimizer.safetensors") && e.contains("CRC-32"),
        "{e}"
    );
}

#[test]
fn retention_keeps_the_last_and_every_mth() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    for step in [10, 20, 30, 40, 50] {
        write(&store, &staged(step)).unwrap();
    }
    store
        .put(
            &format!("{}/state.json", step_dir(35)),
            Bytes::from_static(b"{}"),
        )
        .unwrap();
    let deleted = retain(&store, 2, Some(20)).unwrap();
    assert_eq!(deleted, vec![10, 30]);
    assert_eq!(committed_steps(&store).unwrap(), vec![20, 40, 50]);
    let left: Vec<String> = store
        .list("")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(
        !left.iter().any(|k| k.starts_with("step-000000010/")
            || k.starts_with("step-000000030/")
            || k.starts_with("step-000000035/")),
        "{left:?}"
    );
}

#[test]
fn uploads_run_one_at_a_time_and_report_their_step() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    let mut up = Uploader::new(store.clone(), opts(1, 2));
    assert_eq!(up.submit(staged(1)).unwrap(), None);
    // The second submit waits for the first and hands back its step.
    assert_eq!(up.submit(staged(2)).unwrap(), Some(1));
    assert_eq!(up.wait().unwrap(), Some(2));
    assert_eq!(up.wait().unwrap(), None);
    assert_eq!(committed_steps(&store).unwrap(), vec![2], "keep_last 1");
}

#[test]
fn a_failing_store_is_retried_then_reported() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ckpt");
    let store = Store::open(root.to_str().unwrap()).unwrap();
    // A file where the step folder must go: every write fails.
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join(step_dir(3)), b"not a folder").unwrap();
    let mut up = Uploader::new(store, opts(1, 3));
    up.submit(staged(3)).unwrap();
    let e = up.wait().unwrap_err().to_string();
    assert!(e.contains("after 3 attempts"), "{e}");
}

/// Staging reuses memory: prepared buffers (before the first checkpoint) and then each finished upload's
/// buffers; what is written from reused memory is the new state, not the old one. A second writer of a
/// committed step is refused; checkpoints after a round's starting step are discarded.
#[test]
fn staging_reuses_memory_and_commits_are_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    let mut up = Uploader::new(store.clone(), opts(5, 1));
    up.prepare(&tensors(0.0), &tensors(0.0));
    for step in 1..=3u64 {
        let spare = up.spare();
        assert!(spare.is_some(), "step {step}: memory to reuse");
        let s = Staged::new_reusing(
            &state(step),
            &tensors(step as f32),
            &tensors(-(step as f32)),
            spare,
        )
        .unwrap();
        up.submit(s).unwrap();
        assert_eq!(up.wait().unwrap(), Some(step));
        let l = load(&store, step).unwrap();
        assert_eq!(l.model[0].1.double_value(&[0, 0]), step as f64);
        assert_eq!(l.optimizer[0].1.double_value(&[0, 0]), -(step as f64));
    }
    // The same step written again with other contents: the first commit stands.
    let other = Staged::new(&state(3), &tensors(100.0), &tensors(100.0)).unwrap();
    let e = write(&store, &other).unwrap_err().to_string();
    assert!(e.contains("already committed by another writer"), "{e}");
    // Rewriting identical contents (a retry whose reply was lost) is fine.
    write(&store, &staged(3)).unwrap_or_else(|e| panic!("{e}"));
    // Without exclusive commits (stores that refuse conditional puts) the last writer wins.
    let mut plain = Uploader::new(
        store.clone(),
        UploadOptions {
            exclusive_commit: false,
            ..opts(5, 1)
        },
    );
    plain
        .submit(Staged::new(&state(3), &tensors(100.0), &tensors(100.0)).unwrap())
        .unwrap();
    assert_eq!(plain.wait().unwrap(), Some(3));
    assert_eq!(
        load(&store, 3).unwrap().model[0].1.double_value(&[0, 0]),
        100.0
    );
    assert_eq!(discard_after(&store, 1).unwrap(), vec![2, 3]);
    assert_eq!(committed_steps(&store).unwrap(), vec![1]);
}

/// `--fresh` deletes the checkpoint folders and nothing else under the checkpoint URL (which may be a bucket
/// or a prefix shared with other data): commit records, files, uncommitted leftovers.
#[test]
fn delete_checkpoints_keeps_every_other_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    write(&store, &staged(10)).unwrap();
    write(&store, &staged(20)).unwrap();
    let other = [
        "other/keep.txt",
        "notes.txt",
        "step-notes/a.txt",
        "step-7/model.safetensors",
    ];
    for key in other.iter().chain(&["step-000000030/model.safetensors"]) {
        store.put(key, Bytes::from_static(b"x")).unwrap();
    }
    let deleted = delete_checkpoints(&store).unwrap();
    assert_eq!(deleted.steps, vec![10, 20, 30]);
    let mut left: Vec<String> = store
        .list("")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    left.sort();
    let mut want: Vec<String> = other.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(left, want);
    // Two committed checkpoints of three files and a commit record each, and one leftover.
    assert_eq!(deleted.objects, 2 * 4 + 1);
    assert_eq!(delete_checkpoints(&store).unwrap().steps, Vec::<u64>::new());
}

/// A checkpoint's state records its run; a resume that changed part of it is refused, listing every change
/// with both values, unless every change is accepted. Records written before identities existed still load.
#[test]
fn checkpoint_identity_is_recorded_checked_and_optional_in_old_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    write(&store, &staged(10)).unwrap();
    let recorded = read_state(&store, 10).unwrap();
    assert_eq!(recorded, state(10));
    let url = "ckpt/step-000000010";
    let same = check_identity(&recorded, url, &identity(), &[]).unwrap();
    assert_eq!(same, IdentityCheck::Same);

    let now = RunIdentity {
        global_batch: 8,
        seed: 2,
        ..identity()
    };
    let e = check_identity(&recorded, url, &now, &["train.seed".into()]).unwrap_err();
    let CheckpointError::Changed { changes, .. } = &e else {
        panic!("{e}");
    };
    let fields: Vec<&str> = changes.iter().map(|c| c.field).collect();
    assert_eq!(fields, ["train.global_batch", "train.seed"]);
    let text = e.to_string();
    assert!(
        text.contains(url)
            && text.contains("train.global_batch: checkpoint 4, recipe 8")
            && text.contains("train.seed: checkpoint 1, recipe 2"),
        "{text}"
    );
    let both = ["train.global_batch".to_string(), "train.seed".to_string()];
    match check_identity(&recorded, url, &now, &both).unwrap() {
        IdentityCheck::Accepted(c) => assert_eq!(c.len(), 2),
        other => panic!("{other:?}"),
    }
    let other_data = RunIdentity {
        data: "cd".repeat(32),
        ..identity()
    };
    let e = check_identity(&recorded, url, &other_data, &[]).unwrap_err();
    assert!(e.to_string().contains("data: checkpoint abab"), "{e}");

    // A record of format 0: no format, no identity.
    let mut old = serde_json::to_value(state(10)).unwrap();
    let obj = old.as_object_mut().unwrap();
    obj.remove("format");
    obj.remove("identity");
    let old: CheckpointState = serde_json::from_value(old).unwrap();
    assert_eq!((old.format, old.identity.is_none()), (0, true));
    assert_eq!(
        check_identity(&old, url, &now, &[]).unwrap(),
        IdentityCheck::Unrecorded
    );
}
