//! Wire contract between the coordinator and the workers: `proto/m3d/v1/coordinator.proto` and the
//! tonic/prost code generated from it (package `m3d.v1`).
//!
//! **Invariant: only this crate and the thin gRPC adapters (`m3d_coordinator::grpc`, `m3d_coordinator::client`)
//! touch prost types**; everything else works with the coordinator's plain-Rust domain types.
//!
//! Versioning: fields are only added; a breaking change is a new package (`m3d.v2`) served side by side.

/// Package `m3d.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("m3d.v1");

    /// The serialized FileDescriptorSet of `m3d.v1` (for reflection or schema checks).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/m3d_v1_descriptor.bin"));
}
