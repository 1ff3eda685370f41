//! Converts the published M3D-Data into m3d volume shards (see `m3d-shards` for the format).
//!
//! One module per dataset (`cap`, `vqa`, `seg`, `refseg`), each faithful to the reference preprocessing script it
//! names; `pipeline` owns sharding, parallelism, resume and the bad-input policy; `parts` splits a conversion across machines (`--part I/N`, `finalize`); `inspect` reads a converted
//! dataset back (statistics, checksum verification, PNG rendering).
//!
//! **Invariant: a converter never substitutes or silently drops an input.** A bad input stops the run with an error
//! naming the file (and row), or, with `skip_bad`, is listed in `skipped.json` and counted in the manifest.

pub mod boxes;
pub mod cap;
pub mod csv_table;
pub mod error;
pub mod inspect;
pub mod parts;
pub mod pipeline;
pub mod progress;
pub mod refseg;
pub mod seg;
pub mod single;
pub mod text;
pub mod vqa;

pub use error::{PrepError, Result};
pub use parts::{finalize, wait_for_parts, Part};
pub use pipeline::{convert_volumes, ConvertOptions, ConvertReport};
