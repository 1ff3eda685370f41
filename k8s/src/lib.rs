//! Kubernetes manifests for m3d jobs, built from typed structs and validated against the official schemas.
//!
//! Empty until the Kubernetes launcher lands. **Invariant: `worker` knows nothing about Kubernetes.**
