//! The m3d volume-shard format: the Parquet schema of volume and sample shards (see `README.md` for the
//! versioned column layout), image/mask encodings, the dataset manifest, the volume index and the
//! ranged volume reader that training workers use (object storage itself is `m3d-store`).

/// Version of the shard and manifest schema written by this crate; readers refuse newer versions.
pub const SHARD_SCHEMA_VERSION: u32 = 1;

pub mod dataset;
mod decode;
pub mod encode;
pub mod error;
pub mod index;
pub mod lookup;
pub mod manifest;
pub mod parquet_io;
pub mod reader;
pub mod records;
pub mod schema;

pub use dataset::{decode_sample_into, fetch_checked, write_dataset, ShardDataset, VerifyReport};
pub use encode::ImageDtype;
pub use error::ShardError;
pub use index::{
    reindex, shard_layout, write_index, ByteRange, ReindexReport, ShardLayout, VolumeIndex,
    VolumeLocation, INDEX_KEY,
};
pub use lookup::{
    ForeignVolumes, LookedUpVolume, LookupEntry, LookupGroup, LookupReader, LookupRow, LOOKUP_KEY,
};
pub use m3d_store::{IoEvent, IoLog, Store, StoreError};
pub use manifest::{sha256_hex, Manifest, ShardEntry, Totals, MANIFEST_VERSION, SHARD_LIST_KEY};
pub use parquet_io::{
    read_sample_shard, read_sample_shard_batches, write_sample_shard, write_volume_shard,
    VolumeShardReader, WriteOptions,
};
pub use reader::{ReadSpan, VolumeReader, COALESCE_GAP, COALESCE_MAX};
pub use schema::{MaskRecord, SampleRecord, Task, VolumeRecord};
