//! Control plane: plans a training job (ranks, data shards per worker, checkpoints, restarts).
//!
//! Empty until the distributed runtime lands (issue 4). **Invariant: the coordinator never touches tensors.**
