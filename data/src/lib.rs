//! A job's training data, without libtorch: what a worker reads and what the supervisor and tools need to know
//! about it.
//!
//! - [`dataset`]: the recipe's training set (its tasks' shard datasets) behind one global sample index, the
//!   index the data plan permutes.
//! - [`draws`]: per-sample random draws keyed by (seed, epoch, index), among them the augmentation.
//! - [`loader`]: [`loader::ShardLoader`] serves decoded (and augmented) samples of one shard dataset by index:
//!   records and volume places from the dataset's sample lookup (a block at a time; opening reads
//!   `manifest.json` alone) or from its sample table and volume index, ranged reads of the volumes (nearby
//!   volumes of a shard in one request), a byte-bounded cache of decoded volumes and a read-ahead thread.
//! - [`samples`]: [`samples::SampleTable`], the sample records as a worker holds them: compressed in blocks,
//!   decoded per lookup.
//!
//! The sample order itself (global or block shuffle) is part of the data plan, `m3d_coordinator::plan`, which
//! the coordinator and every worker compute alike; this crate only serves the indices it is handed.
//!
//! **Invariant: no libtorch here** — the coordinator's and the tools' processes stay small, and the worker
//! turns samples into tensors itself (`m3d_worker::batch`).

pub mod dataset;
pub mod draws;
pub mod loader;
pub mod samples;

pub use dataset::{DatasetError, TrainData};
pub use loader::{LoadError, LoadedSample, LoaderOptions, ShardLoader};
pub use samples::{SampleTable, SampleTableError};
