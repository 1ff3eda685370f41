//! A training job's tensor side: turns the samples `m3d-data` loads into libtorch tensors, and the training
//! components the loop is built from: [`optim::AdamW`] (torch's update, f32 master weights),
//! [`schedule`] (transformers' warmup + cosine), [`grad`] (clipping as torch, loss normalisation for
//! gradient accumulation) and [`step`] (the data-parallel step: CLIP gathering over a collective, the
//! gradient reduction each loss needs, bucketed all-reduce, clipping, AdamW). A run's metrics, results and
//! loss plots are in `m3d-runs`; evaluating and exporting trained weights, in `m3d-eval` and `m3d-export`.
//!
//! **Invariant: `worker` knows nothing about Kubernetes or about how shards were produced**; it reads them only
//! through `m3d-shards`.

pub mod batch;
pub mod checkpoint;
pub mod failpoint;
pub mod grad;
pub mod job;
pub mod objective;
pub mod optim;
pub mod record;
pub mod role;
pub mod schedule;
pub mod step;
pub mod train;
pub mod vocab;
