//! Where checkpoints live under a checkpoint URL and which of them are complete: the naming that the worker's
//! writer (`m3d_worker::checkpoint`) and the coordinator's recovery share, torch-free.
//!
//! A checkpoint is the folder `step-NNNNNNNNN/`; it is complete once its `COMMIT` record exists (written
//! last). The coordinator lists them when it starts, so that a checkpoint whose commit call never reached it
//! (its process was stopped while the workers saved on SIGTERM) is still the one the next round resumes from.

use m3d_store::{Store, StoreError};

use crate::job::CheckpointRef;

/// The record a checkpoint folder gets last.
pub const COMMIT: &str = "COMMIT";

/// The folder of step `step`'s checkpoint.
pub fn step_dir(step: u64) -> String {
    format!("step-{step:09}")
}

/// The URL of step `step`'s checkpoint under `base`.
pub fn step_url(base: &str, step: u64) -> String {
    format!("{}/{}", base.trim_end_matches('/'), step_dir(step))
}

/// The step of a key under a step folder (`step-000000020/...`).
pub fn step_of(key: &str) -> Option<u64> {
    key.split('/').next()?.strip_prefix("step-")?.parse().ok()
}

/// Committed steps among listed keys, ascending.
pub fn committed_in(keys: &[(String, u64)]) -> Vec<u64> {
    let suffix = format!("/{COMMIT}");
    let mut steps: Vec<u64> = keys
        .iter()
        .filter(|(key, _)| key.ends_with(&suffix))
        .filter_map(|(key, _)| step_of(key))
        .collect();
    steps.sort_unstable();
    steps.dedup();
    steps
}

/// The newest committed checkpoint under `base`, if any (a base that does not exist yet has none).
pub fn latest_committed(base: &str) -> Result<Option<CheckpointRef>, StoreError> {
    let store = Store::open_existing(base);
    let store = match store {
        Ok(s) => s,
        Err(StoreError::MissingFolder { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(committed_in(&store.list("")?)
        .last()
        .map(|&step| CheckpointRef {
            step,
            url: step_url(base, step),
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_committed_folders_count() {
        let keys: Vec<(String, u64)> = [
            "step-000000020/model.safetensors",
            "step-000000020/COMMIT",
            "step-000000040/model.safetensors",
            "step-000000010/COMMIT",
            "other/COMMIT",
        ]
        .iter()
        .map(|k| (k.to_string(), 1))
        .collect();
        assert_eq!(committed_in(&keys), vec![10, 20]);
        assert_eq!(step_url("s3://b/ck/", 20), "s3://b/ck/step-000000020");
    }

    #[test]
    fn the_latest_committed_checkpoint_is_found_in_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("ck");
        assert_eq!(latest_committed(base.to_str().unwrap()).unwrap(), None);
        for (step, commit) in [(10u64, true), (20, true), (30, false)] {
            let d = base.join(step_dir(step));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("model.safetensors"), b"x").unwrap();
            if commit {
                std::fs::write(d.join(COMMIT), b"{}").unwrap();
            }
        }
        let got = latest_committed(base.to_str().unwrap()).unwrap().unwrap();
        assert_eq!(got.step, 20);
        assert!(got.url.ends_with("ck/step-000000020"), "{}", got.url);
    }
}
