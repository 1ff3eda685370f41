//! Wire contract between the coordinator and the workers: `proto/m3d/{v1,v2}/coordinator.proto` and the
//! tonic/prost code generated from them (packages `m3d.v1` and `m3d.v2`).
//!
//! **Invariant: only this crate and the thin gRPC adapters (`m3d_coordinator::grpc`, `m3d_coordinator::client`)
//! touch prost types**; everything else works with the coordinator's plain-Rust domain types.
//!
//! Versioning: fields are only added; a breaking change is a new package served side by side. `m3d.v2` is the
//! current contract; `m3d.v1` (deprecated) has the same messages under older names, wire-identical field by
//! field, and is still served for existing clients (see the header of `m3d/v2/coordinator.proto`).

/// The prost of the generated code (its `Message` trait, for code that converts or inspects messages).
pub use prost;

/// Package `m3d.v1` (deprecated: use [`v2`]).
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("m3d.v1");

    /// The serialized FileDescriptorSet of `m3d.v1` (for reflection or schema checks).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/m3d_v1_descriptor.bin"));
}

/// Package `m3d.v2`.
pub mod v2 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("m3d.v2");

    /// The serialized FileDescriptorSet of `m3d.v2` (for reflection or schema checks).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/m3d_v2_descriptor.bin"));
}

/// Re-encodes `message` as `T`: for a message of one package and its wire-identical counterpart in the other
/// (same field numbers and types), the conversion between them, field by field. (A field that `T` does not have
/// is dropped: prost keeps no unknown fields.)
pub fn transcode<T: prost::Message + Default>(
    message: &impl prost::Message,
) -> Result<T, prost::DecodeError> {
    T::decode(message.encode_to_vec().as_slice())
}
