//! The volume index: where each volume's bytes are, so that a reader fetches one volume with one ranged request
//! and opening a dataset never touches a volume shard.
//!
//! `index/volumes.parquet` (listed in the manifest as `volume_index`, checksummed like a shard) has one row per
//! volume: its id, its shard, its row group, the row group's byte range in the shard and that range's crc32,
//! and its shard's Parquet footer range and crc32 (repeated per row; dictionary-encoded, so nearly free). Volume
//! shards are written one volume per row group, so a volume's range is its own compressed bytes and nothing
//! else. The footer (the schema and the row groups' column offsets a Parquet decoder needs) is fetched once per
//! shard and kept by the reader. [`shard_layout`] derives a shard's rows from its bytes at conversion time;
//! `m3d data-prep reindex` does it for datasets converted before the index existed.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::parquet_io::VolumeShardReader;
use crate::ShardError;

/// Key of the index in a dataset.
pub const INDEX_KEY: &str = "index/volumes.parquet";

/// A byte range of a shard object with its crc32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    pub offset: u64,
    pub length: u64,
    pub crc32: u32,
}

impl ByteRange {
    fn of(bytes: &Bytes, offset: u64, length: u64) -> Result<ByteRange, ShardError> {
        let start = usize::try_from(offset).map_err(|_| ShardError::Invalid("offset".into()))?;
        let end =
            usize::try_from(offset + length).map_err(|_| ShardError::Invalid("length".into()))?;
        let slice = bytes.get(start..end).ok_or_else(|| {
            ShardError::Invalid(format!(
                "range {start}..{end} past the end ({} bytes)",
                bytes.len()
            ))
        })?;
        Ok(ByteRange {
            offset,
            length,
            crc32: crc32fast::hash(slice),
        })
    }

    /// `offset..offset + length`.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.length
    }

    /// Checks fetched `bytes` against this range's length and crc32.
    pub fn check(&self, key: &str, bytes: &[u8]) -> Result<(), ShardError> {
        let actual = crc32fast::hash(bytes);
        if bytes.len() as u64 != self.length || actual != self.crc32 {
            return Err(ShardError::Checksum {
                key: format!("{key} bytes {}..{}", self.offset, self.offset + self.length),
                expected: format!("crc32 {:08x}, {} bytes", self.crc32, self.length),
                actual: format!("crc32 {actual:08x}, {} bytes", bytes.len()),
            });
        }
        Ok(())
    }
}

/// Where one volume is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeLocation {
    pub volume_id: String,
    /// Index into the manifest's `volume_shards`.
    pub shard: u32,
    pub row_group: u32,
    /// The row group's bytes (all of its column chunks).
    pub bytes: ByteRange,
}

/// The index rows of one volume shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLayout {
    /// The Parquet footer: metadata and the 8-byte tail.
    pub footer: ByteRange,
    pub volumes: Vec<VolumeLocation>,
}

/// Derives the index rows of volume shard number `shard` from its bytes (`key` names it in errors).
pub fn shard_layout(bytes: &Bytes, key: &str, shard: u32) -> Result<ShardLayout, ShardError> {
    let reader = VolumeShardReader::new(bytes.clone(), key)?;
    let meta = Arc::clone(reader.metadata());
    let len = bytes.len() as u64;
    let tail = bytes
        .get(bytes.len().saturating_sub(8)..)
        .filter(|t| t.len() == 8 && &t[4..] == b"PAR1")
        .ok_or_else(|| ShardError::schema(key, "no Parquet footer"))?;
    let meta_len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    let footer = ByteRange::of(bytes, len - 8 - meta_len, meta_len + 8)?;
    // Row r of the shard is in the row group whose row span covers r.
    let mut group_of_row = Vec::new();
    let mut ranges = Vec::new();
    for (g, rg) in meta.row_groups().iter().enumerate() {
        let (mut start, mut end) = (u64::MAX, 0u64);
        for col in rg.columns() {
            let (s, l) = col.byte_range();
            start = start.min(s);
            end = end.max(s + l);
        }
        if start == u64::MAX {
            return Err(ShardError::schema(
                key,
                format!("row group {g} has no columns"),
            ));
        }
        ranges.push(ByteRange::of(bytes, start, end - start)?);
        group_of_row.extend(std::iter::repeat_n(g as u32, rg.num_rows().max(0) as usize));
    }
    let mut volumes = Vec::new();
    for (row, rec) in reader.with_images(false).with_masks(false).enumerate() {
        let rec = rec?;
        let g = *group_of_row
            .get(row)
            .ok_or_else(|| ShardError::schema(key, format!("row {row} in no row group")))?;
        volumes.push(VolumeLocation {
            volume_id: rec.volume_id,
            shard,
            row_group: g,
            bytes: ranges[g as usize],
        });
    }
    Ok(ShardLayout { footer, volumes })
}

/// The index of a dataset: every volume's location and every shard's footer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeIndex {
    /// By shard number.
    pub footers: Vec<ByteRange>,
    pub volumes: Vec<VolumeLocation>,
}

const COLUMNS: [&str; 10] = [
    "volume_id",
    "shard",
    "row_group",
    "offset",
    "length",
    "crc32",
    "footer_offset",
    "footer_length",
    "footer_crc32",
    "format",
];

impl VolumeIndex {
    /// The index of the shards whose layouts are given, in shard order (`layouts[i]` is shard `i`).
    pub fn from_layouts(layouts: &[ShardLayout]) -> VolumeIndex {
        VolumeIndex {
            footers: layouts.iter().map(|l| l.footer).collect(),
            volumes: layouts
                .iter()
                .flat_map(|l| l.volumes.iter().cloned())
                .collect(),
        }
    }

    /// Volume id -> position in [`VolumeIndex::volumes`] (the first, should an id occur twice).
    pub fn by_id(&self) -> HashMap<&str, usize> {
        let mut map = HashMap::with_capacity(self.volumes.len());
        for (i, v) in self.volumes.iter().enumerate() {
            map.entry(v.volume_id.as_str()).or_insert(i);
        }
        map
    }

    fn schema() -> Arc<Schema> {
        let u = |n: &str, t: DataType| Field::new(n, t, false);
        Arc::new(Schema::new(vec![
            u(COLUMNS[0], DataType::Utf8),
            u(COLUMNS[1], DataType::UInt32),
            u(COLUMNS[2], DataType::UInt32),
            u(COLUMNS[3], DataType::UInt64),
            u(COLUMNS[4], DataType::UInt64),
            u(COLUMNS[5], DataType::UInt32),
            u(COLUMNS[6], DataType::UInt64),
            u(COLUMNS[7], DataType::UInt64),
            u(COLUMNS[8], DataType::UInt32),
            u(COLUMNS[9], DataType::Utf8),
        ]))
    }

    /// The index as a Parquet file.
    pub fn to_parquet(&self) -> Result<Bytes, ShardError> {
        let key = INDEX_KEY;
        let v = &self.volumes;
        let footer = |v: &VolumeLocation| -> Result<ByteRange, ShardError> {
            self.footers.get(v.shard as usize).copied().ok_or_else(|| {
                ShardError::Invalid(format!(
                    "volume `{}`: no footer for shard {}",
                    v.volume_id, v.shard
                ))
            })
        };
        let footers = v.iter().map(footer).collect::<Result<Vec<_>, _>>()?;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                v.iter().map(|x| x.volume_id.as_str()),
            )),
            Arc::new(UInt32Array::from_iter_values(v.iter().map(|x| x.shard))),
            Arc::new(UInt32Array::from_iter_values(v.iter().map(|x| x.row_group))),
            Arc::new(UInt64Array::from_iter_values(
                v.iter().map(|x| x.bytes.offset),
            )),
            Arc::new(UInt64Array::from_iter_values(
                v.iter().map(|x| x.bytes.length),
            )),
            Arc::new(UInt32Array::from_iter_values(
                v.iter().map(|x| x.bytes.crc32),
            )),
            Arc::new(UInt64Array::from_iter_values(
                footers.iter().map(|f| f.offset),
            )),
            Arc::new(UInt64Array::from_iter_values(
                footers.iter().map(|f| f.length),
            )),
            Arc::new(UInt32Array::from_iter_values(
                footers.iter().map(|f| f.crc32),
            )),
            Arc::new(StringArray::from_iter_values(
                v.iter().map(|_| "m3d-volume-index-v1"),
            )),
        ];
        let batch =
            RecordBatch::try_new(Self::schema(), columns).map_err(|e| ShardError::arrow(key, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(3).map_err(|e| ShardError::parquet(key, e))?,
            ))
            .build();
        let mut out = Vec::new();
        let mut w = ArrowWriter::try_new(&mut out, Self::schema(), Some(props))
            .map_err(|e| ShardError::parquet(key, e))?;
        w.write(&batch).map_err(|e| ShardError::parquet(key, e))?;
        w.close().map_err(|e| ShardError::parquet(key, e))?;
        Ok(Bytes::from(out))
    }

    /// Reads an index written by [`VolumeIndex::to_parquet`] for a dataset whose volume shards hold `shard_rows`
    /// volumes each (the manifest's counts): every shard must have exactly that many rows in the index. A shard of
    /// no volumes (all of them skipped under `--skip-bad`) has no rows, so its footer stays unknown (zero range).
    pub fn from_parquet(bytes: Bytes, shard_rows: &[u64]) -> Result<VolumeIndex, ShardError> {
        let shards = shard_rows.len();
        let key = INDEX_KEY;
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .map_err(|e| ShardError::parquet(key, e))?
            .with_batch_size(65_536)
            .build()
            .map_err(|e| ShardError::parquet(key, e))?;
        let mut index = VolumeIndex {
            footers: vec![
                ByteRange {
                    offset: 0,
                    length: 0,
                    crc32: 0
                };
                shards
            ],
            volumes: Vec::new(),
        };
        let mut seen = vec![false; shards];
        let mut rows = vec![0u64; shards];
        for batch in reader {
            let batch = batch.map_err(|e| ShardError::arrow(key, e))?;
            let col = |name: &str| -> Result<&ArrayRef, ShardError> {
                batch
                    .column_by_name(name)
                    .filter(|c| c.null_count() == 0)
                    .ok_or_else(|| {
                        ShardError::schema(key, format!("column `{name}` missing or with nulls"))
                    })
            };
            fn typed<'a, T: 'static>(a: &'a ArrayRef, name: &str) -> Result<&'a T, ShardError> {
                a.as_any().downcast_ref::<T>().ok_or_else(|| {
                    ShardError::schema(INDEX_KEY, format!("column `{name}` has the wrong type"))
                })
            }
            let ids = typed::<StringArray>(col("volume_id")?, "volume_id")?;
            let u32s = |n: &'static str| col(n).and_then(|a| typed::<UInt32Array>(a, n));
            let u64s = |n: &'static str| col(n).and_then(|a| typed::<UInt64Array>(a, n));
            let (shard, group, crc, fcrc) = (
                u32s("shard")?,
                u32s("row_group")?,
                u32s("crc32")?,
                u32s("footer_crc32")?,
            );
            let (off, len, foff, flen) = (
                u64s("offset")?,
                u64s("length")?,
                u64s("footer_offset")?,
                u64s("footer_length")?,
            );
            for i in 0..batch.num_rows() {
                let s = shard.value(i) as usize;
                let footer = ByteRange {
                    offset: foff.value(i),
                    length: flen.value(i),
                    crc32: fcrc.value(i),
                };
                match index.footers.get_mut(s) {
                    Some(f) if !seen[s] => {
                        *f = footer;
                        seen[s] = true;
                    }
                    Some(f) if *f != footer => {
                        return Err(ShardError::schema(
                            key,
                            format!("shard {s} has two different footers"),
                        ))
                    }
                    Some(_) => {}
                    None => {
                        return Err(ShardError::schema(
                            key,
                            format!(
                                "volume `{}` in shard {s}, but the manifest lists {shards} shards",
                                ids.value(i)
                            ),
                        ))
                    }
                }
                rows[s] += 1;
                index.volumes.push(VolumeLocation {
                    volume_id: ids.value(i).to_string(),
                    shard: s as u32,
                    row_group: group.value(i),
                    bytes: ByteRange {
                        offset: off.value(i),
                        length: len.value(i),
                        crc32: crc.value(i),
                    },
                });
            }
        }
        if let Some(s) = (0..shards).find(|&s| rows[s] != shard_rows[s]) {
            return Err(ShardError::schema(
                key,
                format!(
                    "volume shard {s} has {} rows in the index, the manifest says {}",
                    rows[s], shard_rows[s]
                ),
            ));
        }
        Ok(index)
    }
}

/// Writes `index` as the dataset's volume index and records it in `manifest` (which the caller saves last, so a
/// dataset never lists an index that is not there).
pub fn write_index(
    store: &crate::Store,
    manifest: &mut crate::Manifest,
    index: &VolumeIndex,
) -> Result<(), ShardError> {
    let bytes = index.to_parquet()?;
    let entry = crate::ShardEntry::describe(INDEX_KEY, index.volumes.len() as u64, &bytes);
    store.put(INDEX_KEY, bytes)?;
    manifest.volume_index = Some(entry);
    Ok(())
}

/// What [`reindex`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReindexReport {
    pub url: String,
    pub shards: usize,
    pub volumes: usize,
    /// The dataset had an index already (it was rebuilt).
    pub replaced: bool,
}

/// Adds the volume index and the sample lookup to the dataset in `store` (converted before they existed): reads
/// every shard once, checked against the manifest, writes `index/volumes.parquet` and `index/samples.lookup`,
/// then the manifest listing them (and its shard lists in their own object).
pub fn reindex(store: &crate::Store) -> Result<ReindexReport, ShardError> {
    let mut manifest = crate::Manifest::load(store)?;
    let mut layouts = Vec::with_capacity(manifest.volume_shards.len());
    for (n, entry) in manifest.volume_shards.iter().enumerate() {
        let bytes = crate::fetch_checked(store, entry)?;
        let layout = shard_layout(&bytes, &entry.key, n as u32)?;
        if layout.volumes.len() as u64 != entry.rows {
            return Err(ShardError::Manifest {
                key: crate::Manifest::KEY.to_string(),
                reason: format!(
                    "shard `{}` has {} volumes, manifest says {}",
                    entry.key,
                    layout.volumes.len(),
                    entry.rows
                ),
            });
        }
        layouts.push(layout);
    }
    let index = VolumeIndex::from_layouts(&layouts);
    let replaced = manifest.volume_index.is_some();
    write_index(store, &mut manifest, &index)?;
    let mut samples = Vec::new();
    for entry in &manifest.sample_shards {
        let bytes = crate::fetch_checked(store, entry)?;
        samples.extend(crate::read_sample_shard(bytes, &entry.key)?);
    }
    crate::lookup::write_lookup(store, &mut manifest, &samples, &index, None)?;
    manifest.save(store)?;
    Ok(ReindexReport {
        url: store.url().to_string(),
        shards: layouts.len(),
        volumes: index.volumes.len(),
        replaced,
    })
}
