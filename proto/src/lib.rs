//! Wire contract between the coordinator and the workers.
//!
//! Owns the `.proto` files and the generated tonic/prost code. Empty until the distributed runtime lands
//! (issue 4): nothing else in the workspace may depend on prost types directly.
