//! Generates the tonic/prost code for `proto/m3d/v1/coordinator.proto` and `proto/m3d/v2/coordinator.proto`. The
//! FileDescriptorSets come from `protox` (a protobuf compiler in Rust), so the build needs no `protoc` on the system.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    for version in ["v1", "v2"] {
        let proto = format!("proto/m3d/{version}/coordinator.proto");
        println!("cargo:rerun-if-changed={proto}");
        let fds = protox::compile([&proto], ["proto"])?;
        let fds_path = out.join(format!("m3d_{version}_descriptor.bin"));
        // Written as bytes (not passed as a value) so protox's and tonic-prost-build's prost-types need not be the
        // same version.
        std::fs::write(&fds_path, fds.encode_to_vec())?;
        tonic_prost_build::configure()
            .file_descriptor_set_path(&fds_path)
            .skip_protoc_run()
            .compile_protos(&[proto.as_str()], &["proto"])?;
    }
    Ok(())
}
