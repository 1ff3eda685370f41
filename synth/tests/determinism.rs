//! Same config, same bytes: every file of two runs is compared byte for byte.

mod common;

use m3d_synth::{write_all, write_vqa, SynthConfig};

#[test]
fn same_seed_gives_identical_files() {
    let cfg = SynthConfig {
        seed: 7,
        ..SynthConfig::default()
    };
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let sa = write_all(a.path(), &cfg).unwrap();
    let sb = write_all(b.path(), &cfg).unwrap();
    assert_eq!(sa, sb);
    let ta = common::read_tree(a.path());
    let tb = common::read_tree(b.path());
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "file lists differ"
    );
    for (path, bytes) in &ta {
        assert!(
            bytes == &tb[path],
            "{} differs between runs",
            path.display()
        );
    }
    // Every part is present (a run that wrote nothing would also be "deterministic").
    for part in ["M3D_Cap", "M3D_VQA", "M3D_Seg", "M3D_RefSeg"] {
        assert!(ta.keys().any(|p| p.starts_with(part)), "{part} missing");
    }
    assert!(ta.len() > 500, "only {} files", ta.len());
}

#[test]
fn other_seed_changes_content_and_parts_are_independent() {
    let cfg = SynthConfig {
        seed: 7,
        ..SynthConfig::default()
    };
    let a = tempfile::tempdir().unwrap();
    write_all(a.path(), &cfg).unwrap();
    let ta = common::read_tree(a.path());

    let b = tempfile::tempdir().unwrap();
    write_all(
        b.path(),
        &SynthConfig {
            seed: 8,
            ..cfg.clone()
        },
    )
    .unwrap();
    let tb = common::read_tree(b.path());
    let json = std::path::Path::new("M3D_Cap/M3D_Cap.json");
    assert_ne!(ta[json], tb[json], "seed does not reach the Cap plan");

    // write_vqa alone rebuilds the same Cap plan that write_all used.
    let c = tempfile::tempdir().unwrap();
    write_vqa(c.path(), &cfg).unwrap();
    let tc = common::read_tree(c.path());
    assert!(!tc.is_empty());
    for (path, bytes) in &tc {
        assert!(
            bytes == &ta[path],
            "{} differs when written alone",
            path.display()
        );
    }
}
