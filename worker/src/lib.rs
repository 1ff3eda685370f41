//! A training job's tensor side: turns the samples `m3d-data` loads into libtorch tensors, and the training
//! components the loop is built from: [`optim::AdamW`] (torch's update, f32 master weights),
//! [`schedule`] (transformers' warmup + cosine), [`grad`] (clipping as torch, loss normalisation for
//! gradient accumulation), [`metrics`] (JSONL), [`output`] (the run's
//! results in a local folder or an object store), [`plot`] (loss curves to PNG) and [`step`] (the
//! data-parallel step: CLIP gathering over a collective, the gradient reduction each loss needs, bucketed
//! all-reduce, clipping, AdamW).
//!
//! **Invariant: `worker` knows nothing about Kubernetes or about how shards were produced**; it reads them only
//! through `m3d-shards`.

pub mod batch;
pub mod checkpoint;
pub mod eval;
pub mod export;
pub mod failpoint;
pub mod grad;
pub mod job;
pub mod metrics;
pub mod optim;
pub mod output;
pub mod plot;
pub mod role;
pub mod schedule;
pub mod step;
pub mod train;
pub mod vocab;
