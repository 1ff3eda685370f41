//! Data plane of a training job: turns decoded shard samples into libtorch tensors (and, from the next
//! milestones on, owns the models, the collectives and the training loop).
//!
//! **Invariant: `worker` knows nothing about Kubernetes or about how shards were produced**; it reads them only
//! through `m3d-shards`.

pub mod batch;
