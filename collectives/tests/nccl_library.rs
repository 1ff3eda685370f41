//! `M3D_NCCL_LIB` is used alone: a file that is not a loadable NCCL is an error naming it and the variable, never
//! a silent fallback to another NCCL. (Its own test binary: the library is looked up once per process.)

use m3d_collectives::{nccl_library, CollectiveError};

#[test]
fn an_explicit_library_that_does_not_load_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libnccl.so.2");
    std::fs::write(&fake, b"not a real library").unwrap();
    std::env::set_var("M3D_NCCL_LIB", &fake);
    let err = nccl_library().unwrap_err();
    assert!(matches!(err, CollectiveError::NcclUnavailable(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{} (from M3D_NCCL_LIB)", fake.display())),
        "{msg}"
    );
    assert!(
        msg.contains("M3D_NCCL_LIB must name a loadable NCCL library"),
        "{msg}"
    );
    // Nothing else was tried: the message lists only the explicit file.
    assert!(!msg.contains("dynamic linker search path"), "{msg}");
    assert!(!msg.contains("libtorch"), "{msg}");
}
