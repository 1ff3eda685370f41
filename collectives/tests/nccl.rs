//! The NCCL backend where no GPU is present: clear typed errors, never a panic from a missing library.

use std::time::Duration;

use m3d_collectives::{nccl_available, AbortSignal, CollectiveError, Nccl, NcclId};

const T: Duration = Duration::from_secs(5);

#[test]
fn missing_nccl_is_a_clear_error_not_a_panic() {
    match nccl_available() {
        Err(e) => {
            assert!(matches!(e, CollectiveError::NcclUnavailable(_)));
            let msg = e.to_string();
            assert!(msg.contains("libcuda") || msg.contains("libnccl"), "{msg}");
            let err = NcclId::new().unwrap_err();
            assert!(matches!(err, CollectiveError::NcclUnavailable(_)), "{err}");
            let id = NcclId::from_bytes(&[0u8; 128]).unwrap();
            let err = Nccl::new(0, 1, &id, 0, T, &AbortSignal::new()).unwrap_err();
            assert!(matches!(err, CollectiveError::NcclUnavailable(_)), "{err}");
        }
        // On a machine with NCCL the id must be creatable and round-trip through bytes.
        Ok(()) => {
            let id = NcclId::new().unwrap();
            assert_eq!(NcclId::from_bytes(id.as_bytes()).unwrap(), id);
        }
    }
}

#[test]
fn nccl_arguments_are_checked_before_loading() {
    assert!(NcclId::from_bytes(&[0u8; 12]).is_err());
    let id = NcclId::from_bytes(&[0u8; 128]).unwrap();
    assert!(matches!(
        Nccl::new(3, 2, &id, 0, T, &AbortSignal::new()),
        Err(CollectiveError::InvalidRank { rank: 3, world: 2 })
    ));
    assert!(matches!(
        Nccl::new(0, 0, &id, 0, T, &AbortSignal::new()),
        Err(CollectiveError::InvalidWorld { world: 0 })
    ));
}
