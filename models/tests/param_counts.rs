//! Full-size M3D-CLIP built shape-only (nothing allocated) has exactly the parameters — names, shapes and
//! count — of the reference model built by the oracle on PyTorch's meta device. (The LLMs and LaMed have the
//! same check in tests/llama.rs, tests/phi3.rs and tests/lamed.rs.)
mod common;

use std::collections::BTreeMap;

use m3d_models::clip::{M3dClip, M3dClipConfig};
use m3d_models::VarBuilder;
use tch::nn::VarStore;
use tch::Device;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn m3d_clip_full_size_matches_the_reference_without_allocating() {
    let dir = common::run_oracle("clip_count.py", &[]);
    let oracle: BTreeMap<String, Vec<i64>> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("shapes.json")).unwrap())
            .unwrap();

    let before = rss_kib();
    let vs = VarStore::new(Device::Cpu);
    let _model = M3dClip::new(&VarBuilder::shape_only(&vs), &M3dClipConfig::m3d()).unwrap();
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(
        grown_mib < 64,
        "shape-only build grew RSS by {grown_mib} MiB (the f32 weights are ~760 MiB)"
    );

    let ours: BTreeMap<String, Vec<i64>> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.size()))
        .collect();
    let only_ours: Vec<&String> = ours.keys().filter(|k| !oracle.contains_key(*k)).collect();
    let only_oracle: Vec<&String> = oracle.keys().filter(|k| !ours.contains_key(*k)).collect();
    assert!(
        only_ours.is_empty() && only_oracle.is_empty(),
        "ours only: {only_ours:?}\noracle only: {only_oracle:?}"
    );
    for (k, shape) in &oracle {
        assert_eq!(&ours[k], shape, "{k}");
    }
    let count = |m: &BTreeMap<String, Vec<i64>>| -> i64 {
        m.values().map(|s| s.iter().product::<i64>()).sum()
    };
    assert_eq!(count(&ours), count(&oracle));
    eprintln!("M3D-CLIP parameters: {}", count(&ours));
}
