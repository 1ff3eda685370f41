//! Parquet encoding of volume shards and sample shards (schema version [`crate::SHARD_SCHEMA_VERSION`]),
//! and the streaming volume-shard reader.
//!
//! Both kinds carry the file key-value metadata `m3d.format = "m3d-shards"`,
//! `m3d.shard_schema_version = "1"` and `m3d.shard_kind = "volumes" | "samples"`; readers refuse files
//! without it or with a newer version. The column layout is documented in the crate README.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, LargeBinaryArray, ListArray,
    RecordBatch, StringArray, StructArray, UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use bytes::Bytes;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::encode::{packed_len, ImageDtype};
use crate::schema::{MaskRecord, SampleRecord, Task, VolumeRecord};
use crate::{ShardError, SHARD_SCHEMA_VERSION};

/// File metadata key holding the format name.
pub const META_FORMAT: &str = "m3d.format";
/// File metadata key holding the shard schema version (decimal).
pub const META_SCHEMA_VERSION: &str = "m3d.shard_schema_version";
/// File metadata key holding the shard kind.
pub const META_KIND: &str = "m3d.shard_kind";
/// Value of [`META_FORMAT`] (and of `Manifest::format`).
pub const FORMAT_NAME: &str = "m3d-shards";
/// Value of [`META_KIND`] for volume shards.
pub const KIND_VOLUMES: &str = "volumes";
/// Value of [`META_KIND`] for sample shards.
pub const KIND_SAMPLES: &str = "samples";
/// Rows per row group of sample shards: rows are small, so large groups compress better.
/// ([`WriteOptions::rows_per_row_group`] applies to volume shards.)
pub const SAMPLE_ROWS_PER_ROW_GROUP: usize = 65_536;

/// Parquet writer settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// Volumes per row group of a volume shard: the unit a reader fetches and decodes at a time (1, the default,
    /// lets a reader fetch one volume's bytes and nothing else: see [`crate::index`]).
    pub rows_per_row_group: usize,
    /// zstd compression level (1..=22) of every column but `image`.
    pub zstd_level: i32,
    /// Codec of the `image` column.
    pub image_codec: ImageCodec,
}

/// How the `image` column is compressed. Readers need no setting: Parquet records the codec per column chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageCodec {
    /// LZ4 (raw block format): 3-4x faster to decompress than zstd, which is what bounds the reader, for about
    /// 1.3x the bytes on M3D volumes. The default.
    Lz4,
    /// zstd at `zstd_level`: smallest files, for archival copies.
    Zstd,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            rows_per_row_group: 1,
            zstd_level: 3,
            image_codec: ImageCodec::Lz4,
        }
    }
}

fn mask_struct_fields() -> Fields {
    Fields::from(vec![
        Field::new("class_index", DataType::UInt32, false),
        Field::new("label", DataType::Utf8, false),
        Field::new("voxels", DataType::UInt64, false),
        Field::new("bits", DataType::LargeBinary, false),
    ])
}

fn mask_item_field() -> Arc<Field> {
    Arc::new(Field::new(
        "item",
        DataType::Struct(mask_struct_fields()),
        false,
    ))
}

fn shape_item_field() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::UInt32, false))
}

fn bbox_item_field() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Float32, false))
}

/// The Arrow schema of a volume shard.
pub fn volume_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("volume_id", DataType::Utf8, false),
        Field::new("dataset", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new(
            "shape",
            DataType::FixedSizeList(shape_item_field(), 4),
            false,
        ),
        Field::new("dtype", DataType::Utf8, false),
        Field::new("image", DataType::LargeBinary, false),
        Field::new("image_crc32", DataType::UInt32, false),
        Field::new("masks", DataType::List(mask_item_field()), false),
    ]))
}

/// The Arrow schema of a sample shard.
pub fn sample_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("sample_id", DataType::Utf8, false),
        Field::new("dataset", DataType::Utf8, false),
        Field::new("task", DataType::Utf8, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("volume_id", DataType::Utf8, false),
        Field::new("mask_index", DataType::UInt32, true),
        Field::new("question", DataType::Utf8, true),
        Field::new("answer", DataType::Utf8, true),
        Field::new("answer_choice", DataType::Utf8, true),
        Field::new("question_type", DataType::Utf8, true),
        Field::new("class_name", DataType::Utf8, true),
        // A variable list rather than a fixed-size one: pyarrow rejects null fixed-size lists written by
        // parquet-rs (it reads them back as size 0).
        Field::new("bbox", DataType::List(bbox_item_field()), true),
        Field::new("report", DataType::Utf8, true),
        Field::new("source_row", DataType::Utf8, true),
    ]))
}

fn writer_props(
    opts: &WriteOptions,
    kind: &str,
    key: &str,
    rows_per_group: usize,
) -> Result<WriterProperties, ShardError> {
    let level = ZstdLevel::try_new(opts.zstd_level).map_err(|e| ShardError::parquet(key, e))?;
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_size(rows_per_group.max(1))
        .set_key_value_metadata(Some(vec![
            KeyValue::new(META_FORMAT.to_string(), FORMAT_NAME.to_string()),
            KeyValue::new(
                META_SCHEMA_VERSION.to_string(),
                SHARD_SCHEMA_VERSION.to_string(),
            ),
            KeyValue::new(META_KIND.to_string(), kind.to_string()),
        ]));
    if kind == KIND_VOLUMES {
        // Images and mask bits are large, unique blobs: dictionaries only cost time. Nothing reads min/max
        // statistics of a volume shard, and with one volume per row group they would fill the footer (which a
        // reader fetches once per shard) with a copy of every row's small columns.
        b = b
            .set_dictionary_enabled(false)
            .set_statistics_enabled(EnabledStatistics::None);
        // A volume's small columns are a few bytes each per row group, which no codec shrinks; compressed, each
        // costs a reader a decompression context per volume (zstd's was 5 % of reading a volume).
        for small in [
            "volume_id",
            "dataset",
            "source",
            "shape.list.item",
            "dtype",
            "image_crc32",
        ] {
            let path = ColumnPath::new(small.split('.').map(str::to_string).collect());
            b = b.set_column_compression(path, Compression::UNCOMPRESSED);
        }
        if opts.image_codec == ImageCodec::Lz4 {
            b = b.set_column_compression(ColumnPath::from("image"), Compression::LZ4_RAW);
        }
    }
    Ok(b.build())
}

fn finish_writer(writer: ArrowWriter<Vec<u8>>, key: &str) -> Result<Bytes, ShardError> {
    let buf = writer
        .into_inner()
        .map_err(|e| ShardError::parquet(key, e))?;
    Ok(Bytes::from(buf))
}

fn check_volume_for_write(r: &VolumeRecord, row: usize) -> Result<(), ShardError> {
    let row_err = |reason: String| ShardError::Row {
        key: "<volume shard being written>".into(),
        row,
        reason: format!("volume `{}`: {reason}", r.volume_id),
    };
    if r.volume_id.is_empty() {
        return Err(row_err("empty volume_id".into()));
    }
    let expected = r.numel() * r.dtype.size();
    if r.image.len() != expected {
        return Err(row_err(format!(
            "image has {} bytes, shape {:?} as {} needs {expected}",
            r.image.len(),
            r.shape,
            r.dtype
        )));
    }
    let mask_bytes = packed_len(r.spatial_numel());
    for m in &r.masks {
        let want = if m.voxels == 0 { 0 } else { mask_bytes };
        if m.bits.len() != want {
            return Err(row_err(format!(
                "mask {} (`{}`) has {} bytes of bits, expected {want} for {} voxels set",
                m.class_index,
                m.label,
                m.bits.len(),
                m.voxels
            )));
        }
    }
    Ok(())
}

fn volume_batch(records: &[VolumeRecord], key: &str) -> Result<RecordBatch, ShardError> {
    let strings = |f: fn(&VolumeRecord) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(records.iter().map(f)))
    };
    let shape_values = UInt32Array::from_iter_values(records.iter().flat_map(|r| r.shape));
    let shape = FixedSizeListArray::try_new(shape_item_field(), 4, Arc::new(shape_values), None)
        .map_err(|e| ShardError::arrow(key, e))?;
    let image = LargeBinaryArray::from_iter_values(records.iter().map(|r| &r.image[..]));
    let crc = UInt32Array::from_iter_values(records.iter().map(|r| r.image_crc32));

    // Collected first: arrow's from_iter_values needs an exactly sized iterator.
    let mask_list: Vec<&MaskRecord> = records.iter().flat_map(|r| r.masks.iter()).collect();
    let all_masks = || mask_list.iter().copied();
    let mask_struct = StructArray::try_new(
        mask_struct_fields(),
        vec![
            Arc::new(UInt32Array::from_iter_values(
                all_masks().map(|m| m.class_index),
            )),
            Arc::new(StringArray::from_iter_values(
                all_masks().map(|m| m.label.as_str()),
            )),
            Arc::new(UInt64Array::from_iter_values(all_masks().map(|m| m.voxels))),
            Arc::new(LargeBinaryArray::from_iter_values(
                all_masks().map(|m| m.bits.as_slice()),
            )),
        ],
        None,
    )
    .map_err(|e| ShardError::arrow(key, e))?;
    let masks = ListArray::try_new(
        mask_item_field(),
        OffsetBuffer::from_lengths(records.iter().map(|r| r.masks.len())),
        Arc::new(mask_struct),
        None,
    )
    .map_err(|e| ShardError::arrow(key, e))?;

    RecordBatch::try_new(
        volume_schema(),
        vec![
            strings(|r| &r.volume_id),
            strings(|r| &r.dataset),
            strings(|r| &r.source),
            Arc::new(shape),
            strings(|r| r.dtype.as_str()),
            Arc::new(image),
            Arc::new(crc),
            Arc::new(masks),
        ],
    )
    .map_err(|e| ShardError::arrow(key, e))
}

/// Encodes volume records as one Parquet volume shard, `opts.rows_per_row_group` volumes per row group.
/// Checks image and mask sizes against the shapes and that volume ids are unique in the shard; the
/// `image_crc32` values are written as given (compute them with [`VolumeRecord::crc32`] when encoding).
pub fn write_volume_shard(
    records: &[VolumeRecord],
    opts: &WriteOptions,
) -> Result<Bytes, ShardError> {
    const KEY: &str = "<volume shard being written>";
    let mut seen = HashSet::new();
    for (row, r) in records.iter().enumerate() {
        check_volume_for_write(r, row)?;
        if !seen.insert(r.volume_id.as_str()) {
            return Err(ShardError::Row {
                key: KEY.into(),
                row,
                reason: format!("duplicate volume_id `{}` in one shard", r.volume_id),
            });
        }
    }
    let per_group = opts.rows_per_row_group.max(1);
    let props = writer_props(opts, KIND_VOLUMES, KEY, per_group)?;
    let mut writer = ArrowWriter::try_new(Vec::new(), volume_schema(), Some(props))
        .map_err(|e| ShardError::parquet(KEY, e))?;
    // One batch per row group keeps the arrow copy of the data bounded to one group.
    for chunk in records.chunks(per_group) {
        let batch = volume_batch(chunk, KEY)?;
        writer
            .write(&batch)
            .map_err(|e| ShardError::parquet(KEY, e))?;
        writer.flush().map_err(|e| ShardError::parquet(KEY, e))?;
    }
    finish_writer(writer, KEY)
}

fn opt_strings(records: &[SampleRecord], f: fn(&SampleRecord) -> Option<&str>) -> ArrayRef {
    Arc::new(records.iter().map(f).collect::<StringArray>())
}

/// Encodes sample records as one Parquet sample shard ([`SAMPLE_ROWS_PER_ROW_GROUP`] rows per group).
pub fn write_sample_shard(
    records: &[SampleRecord],
    opts: &WriteOptions,
) -> Result<Bytes, ShardError> {
    const KEY: &str = "<sample shard being written>";
    let props = writer_props(opts, KIND_SAMPLES, KEY, SAMPLE_ROWS_PER_ROW_GROUP)?;
    let mut writer = ArrowWriter::try_new(Vec::new(), sample_schema(), Some(props))
        .map_err(|e| ShardError::parquet(KEY, e))?;
    for chunk in records.chunks(SAMPLE_ROWS_PER_ROW_GROUP) {
        let strings = |f: fn(&SampleRecord) -> &str| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(chunk.iter().map(f)))
        };
        let bbox_values =
            Float32Array::from_iter_values(chunk.iter().flat_map(|r| r.bbox.into_iter().flatten()));
        let bbox_valid =
            arrow::buffer::NullBuffer::from_iter(chunk.iter().map(|r| r.bbox.is_some()));
        let bbox = ListArray::try_new(
            bbox_item_field(),
            OffsetBuffer::from_lengths(chunk.iter().map(|r| if r.bbox.is_some() { 6 } else { 0 })),
            Arc::new(bbox_values),
            Some(bbox_valid),
        )
        .map_err(|e| ShardError::arrow(KEY, e))?;
        let batch = RecordBatch::try_new(
            sample_schema(),
            vec![
                strings(|r| &r.sample_id),
                strings(|r| &r.dataset),
                strings(|r| r.task.as_str()),
                strings(|r| &r.split),
                strings(|r| &r.volume_id),
                Arc::new(chunk.iter().map(|r| r.mask_index).collect::<UInt32Array>()),
                opt_strings(chunk, |r| r.question.as_deref()),
                opt_strings(chunk, |r| r.answer.as_deref()),
                opt_strings(chunk, |r| r.answer_choice.as_deref()),
                opt_strings(chunk, |r| r.question_type.as_deref()),
                opt_strings(chunk, |r| r.class_name.as_deref()),
                Arc::new(bbox),
                opt_strings(chunk, |r| r.report.as_deref()),
                opt_strings(chunk, |r| r.source_row.as_deref()),
            ],
        )
        .map_err(|e| ShardError::arrow(KEY, e))?;
        writer
            .write(&batch)
            .map_err(|e| ShardError::parquet(KEY, e))?;
    }
    finish_writer(writer, KEY)
}

/// Loads the footer and checks format name, schema version and kind.
fn open_shard(bytes: &Bytes, key: &str, kind: &str) -> Result<ArrowReaderMetadata, ShardError> {
    let meta = ArrowReaderMetadata::load(bytes, ArrowReaderOptions::new())
        .map_err(|e| ShardError::parquet(key, e))?;
    check_shard_meta(meta, key, kind)
}

/// The footer of a volume shard fetched on its own (`footer`: the Parquet metadata and the 8-byte tail, see
/// [`crate::index`]), checked as a whole shard's is.
pub fn volume_footer(footer: &[u8], key: &str) -> Result<ArrowReaderMetadata, ShardError> {
    let body = footer
        .len()
        .checked_sub(8)
        .and_then(|n| footer.get(..n))
        .ok_or_else(|| ShardError::schema(key, "footer shorter than 8 bytes"))?;
    let meta = parquet::file::metadata::ParquetMetaDataReader::decode_metadata(body)
        .map_err(|e| ShardError::parquet(key, e))?;
    let meta = ArrowReaderMetadata::try_new(Arc::new(meta), ArrowReaderOptions::new())
        .map_err(|e| ShardError::parquet(key, e))?;
    check_shard_meta(meta, key, KIND_VOLUMES)
}

/// The bytes of a shard object of `file_len` bytes that a reader holds: `bytes` from `offset` (a row group's
/// range). Asking for anything else is an error, never a silent read elsewhere.
#[derive(Clone)]
struct RangeChunk {
    file_len: u64,
    offset: u64,
    bytes: Bytes,
}

impl RangeChunk {
    fn slice(&self, start: u64, length: u64) -> parquet::errors::Result<Bytes> {
        let end = start.saturating_add(length);
        if start < self.offset || end > self.offset + self.bytes.len() as u64 {
            return Err(parquet::errors::ParquetError::General(format!(
                "bytes {start}..{end} requested outside the fetched range {}..{}",
                self.offset,
                self.offset + self.bytes.len() as u64
            )));
        }
        Ok(self
            .bytes
            .slice((start - self.offset) as usize..(end - self.offset) as usize))
    }
}

impl parquet::file::reader::Length for RangeChunk {
    fn len(&self) -> u64 {
        self.file_len
    }
}

impl parquet::file::reader::ChunkReader for RangeChunk {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        use bytes::Buf;
        let rest = (self.offset + self.bytes.len() as u64).saturating_sub(start);
        Ok(self.slice(start, rest)?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.slice(start, length as u64)
    }
}

/// Decodes row group `row_group` of a volume shard (`key`, `file_len` bytes, footer `meta` from
/// [`volume_footer`]) from that row group's bytes alone (`bytes`, starting at `offset` in the shard).
#[allow(clippy::too_many_arguments)]
pub fn read_volume_row_group(
    meta: &ArrowReaderMetadata,
    key: &str,
    file_len: u64,
    offset: u64,
    bytes: Bytes,
    row_group: usize,
    images: bool,
    masks: bool,
) -> Result<Vec<VolumeRecord>, ShardError> {
    let groups = meta.metadata().row_groups();
    let rg = groups
        .get(row_group)
        .ok_or_else(|| ShardError::schema(key, format!("no row group {row_group}")))?;
    let first_row: usize = groups[..row_group]
        .iter()
        .map(|g| usize::try_from(g.num_rows()).unwrap_or(0))
        .sum();
    let chunk = RangeChunk {
        file_len,
        offset,
        bytes,
    };
    // A row group of one volume (what data-prep writes) has its image as the single value of one data page: that
    // value is taken straight from the decompressed page, where Arrow would copy it twice more (into its array,
    // then out into the record). Anything else goes through Arrow.
    let page_image = if images && rg.num_rows() == 1 {
        single_image_value(&chunk, meta, rg, key)?
    } else {
        None
    };
    let arrow_images = images && page_image.is_none();
    let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(chunk, meta.clone())
        .with_projection(volume_projection(meta, arrow_images, masks))
        .with_row_groups(vec![row_group])
        .with_batch_size(usize::try_from(rg.num_rows()).unwrap_or(1).clamp(1, 1024))
        .build()
        .map_err(|e| ShardError::parquet(key, e))?;
    let mut pending = VecDeque::new();
    let mut next_row = first_row;
    for batch in reader {
        let batch = batch.map_err(|e| ShardError::arrow(key, e))?;
        decode_volume_batch(
            &batch,
            key,
            arrow_images,
            masks,
            &mut next_row,
            &mut pending,
        )?;
    }
    if let (Some(image), Some(Ok(rec))) = (page_image, pending.front_mut()) {
        if let Err(e) = attach_image(rec, image, key, first_row) {
            pending[0] = Err(e);
        }
    }
    pending.into_iter().collect()
}

/// The image of a one-row row group read from its column chunk's pages: `None` when the chunk is not laid out
/// as data-prep writes it (one PLAIN-encoded data page holding the one value), which the caller then decodes
/// through Arrow. An LZ4_RAW page (M3D-Cap's `u8` volumes) is decompressed here rather than by parquet's codec,
/// which zero-fills its whole output buffer first (4 % of a volume read, measured): lz4 writes every byte of it.
fn single_image_value(
    chunk: &RangeChunk,
    meta: &ArrowReaderMetadata,
    rg: &parquet::file::metadata::RowGroupMetaData,
    key: &str,
) -> Result<Option<Bytes>, ShardError> {
    use parquet::basic::Encoding;
    use parquet::column::page::{Page, PageReader};
    use parquet::file::serialized_reader::SerializedPageReader;

    let Some(column) = meta
        .parquet_schema()
        .columns()
        .iter()
        .position(|c| c.path().parts() == ["image"])
    else {
        return Ok(None);
    };
    let meta_of_chunk = rg.column(column);
    // Pages of a chunk declared uncompressed come back as stored, for `lz4_block` below.
    let lz4 = meta_of_chunk.compression() == Compression::LZ4_RAW;
    let as_stored;
    let chunk_meta = if lz4 {
        as_stored = meta_of_chunk
            .clone()
            .into_builder()
            .set_compression(Compression::UNCOMPRESSED)
            .build()
            .map_err(|e| ShardError::parquet(key, e))?;
        &as_stored
    } else {
        meta_of_chunk
    };
    // The chunk's uncompressed size bounds its one page's: the capacity the decompressed value may fill.
    let bound = usize::try_from(meta_of_chunk.uncompressed_size()).unwrap_or(0);
    let lz4_block = |compressed: &[u8]| -> Result<Bytes, ShardError> {
        lz4_flex::block::decompress(compressed, bound)
            .map(Bytes::from)
            .map_err(|e| {
                ShardError::parquet(key, parquet::errors::ParquetError::External(Box::new(e)))
            })
    };
    let mut pages = SerializedPageReader::new(Arc::new(chunk.clone()), chunk_meta, 1, None)
        .map_err(|e| ShardError::parquet(key, e))?;
    let page = pages
        .get_next_page()
        .map_err(|e| ShardError::parquet(key, e))?;
    let value = match page {
        Some(Page::DataPage {
            buf,
            num_values: 1,
            encoding: Encoding::PLAIN,
            ..
        }) => {
            if lz4 {
                lz4_block(&buf)?
            } else {
                buf
            }
        }
        Some(Page::DataPageV2 {
            buf,
            num_values: 1,
            encoding: Encoding::PLAIN,
            def_levels_byte_len,
            rep_levels_byte_len,
            is_compressed,
            ..
        }) => {
            let values = buf.slice((def_levels_byte_len + rep_levels_byte_len) as usize..);
            if lz4 && is_compressed {
                lz4_block(&values)?
            } else {
                values
            }
        }
        _ => return Ok(None),
    };
    // PLAIN BYTE_ARRAY: a little-endian u32 length, then the bytes.
    let Some((len, rest)) = value.split_first_chunk::<4>() else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() != len
        || pages
            .get_next_page()
            .map_err(|e| ShardError::parquet(key, e))?
            .is_some()
    {
        return Ok(None);
    }
    Ok(Some(value.slice(4..)))
}

/// Checks `img` against `rec`'s crc32 and shape, then makes it `rec`'s image.
fn attach_image(
    rec: &mut VolumeRecord,
    img: Bytes,
    key: &str,
    row: usize,
) -> Result<(), ShardError> {
    let actual = crc32fast::hash(&img);
    if actual != rec.image_crc32 {
        return Err(ShardError::ImageCrc {
            key: key.to_string(),
            row,
            volume_id: rec.volume_id.clone(),
            expected: rec.image_crc32,
            actual,
        });
    }
    let expected = rec.numel() * rec.dtype.size();
    if img.len() != expected {
        return Err(ShardError::Row {
            key: key.to_string(),
            row,
            reason: format!(
                "volume `{}`: image has {} bytes, shape {:?} as {} needs {expected}",
                rec.volume_id,
                img.len(),
                rec.shape,
                rec.dtype
            ),
        });
    }
    rec.image = img;
    Ok(())
}

/// The columns of a volume shard to read.
fn volume_projection(meta: &ArrowReaderMetadata, images: bool, masks: bool) -> ProjectionMask {
    let keep: Vec<usize> = meta
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| (images || f.name() != "image") && (masks || f.name() != "masks"))
        .map(|(i, _)| i)
        .collect();
    ProjectionMask::roots(meta.parquet_schema(), keep)
}

fn check_shard_meta(
    meta: ArrowReaderMetadata,
    key: &str,
    kind: &str,
) -> Result<ArrowReaderMetadata, ShardError> {
    let kv = meta.metadata().file_metadata().key_value_metadata();
    let get = |k: &str| {
        kv.and_then(|kv| kv.iter().find(|e| e.key == k))
            .and_then(|e| e.value.as_deref())
    };
    if get(META_FORMAT) != Some(FORMAT_NAME) {
        return Err(ShardError::schema(
            key,
            format!("not an m3d shard (file metadata `{META_FORMAT}` is not `{FORMAT_NAME}`)"),
        ));
    }
    let version = get(META_SCHEMA_VERSION)
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            ShardError::schema(
                key,
                format!("missing or invalid `{META_SCHEMA_VERSION}` metadata"),
            )
        })?;
    if version > u64::from(SHARD_SCHEMA_VERSION) {
        return Err(ShardError::SchemaVersion {
            what: key.to_string(),
            found: version,
            supported: SHARD_SCHEMA_VERSION,
        });
    }
    if get(META_KIND) != Some(kind) {
        return Err(ShardError::schema(
            key,
            format!(
                "expected a `{kind}` shard, file metadata `{META_KIND}` is {:?}",
                get(META_KIND)
            ),
        ));
    }
    let expected = if kind == KIND_VOLUMES {
        volume_schema()
    } else {
        sample_schema()
    };
    let actual = meta.schema();
    for field in expected.fields() {
        match actual.field_with_name(field.name()) {
            Ok(f) if f.data_type().equals_datatype(field.data_type()) => {}
            Ok(f) => {
                return Err(ShardError::schema(
                    key,
                    format!(
                        "column `{}` has type {}, expected {}",
                        field.name(),
                        f.data_type(),
                        field.data_type()
                    ),
                ))
            }
            Err(_) => {
                return Err(ShardError::schema(
                    key,
                    format!("missing column `{}`", field.name()),
                ))
            }
        }
    }
    Ok(meta)
}

fn column<'a, T: Array + 'static>(
    batch: &'a RecordBatch,
    name: &str,
    key: &str,
) -> Result<&'a T, ShardError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            ShardError::schema(key, format!("column `{name}` missing or of the wrong type"))
        })
}

fn child<'a, T: Array + 'static>(
    s: &'a StructArray,
    name: &str,
    key: &str,
) -> Result<&'a T, ShardError> {
    s.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            ShardError::schema(
                key,
                format!("mask field `{name}` missing or of the wrong type"),
            )
        })
}

fn no_nulls(arr: &dyn Array, name: &str, key: &str) -> Result<(), ShardError> {
    if arr.null_count() > 0 {
        return Err(ShardError::schema(
            key,
            format!("column `{name}` has nulls"),
        ));
    }
    Ok(())
}

fn opt_str(a: &StringArray, i: usize) -> Option<String> {
    a.is_valid(i).then(|| a.value(i).to_string())
}

/// Decodes a whole sample shard.
pub fn read_sample_shard(bytes: Bytes, key: &str) -> Result<Vec<SampleRecord>, ShardError> {
    // Exactly sized (a hint: bounded by the bytes, the footer is not trusted yet): growing by doubling would
    // hold twice the records for a moment.
    let mut out = Vec::new();
    read_sample_shard_batches(bytes, key, |rows, batch| {
        if out.is_empty() {
            out.reserve_exact(rows);
        }
        out.extend(batch);
        Ok(())
    })?;
    Ok(out)
}

/// Decodes a sample shard a batch of at most 8,192 records at a time, handing each batch to `f` with the
/// shard's row count (from its footer; a hint bounded by its size): a reader that keeps the samples in
/// another form never holds the whole shard as records. Returns the number of rows decoded.
pub fn read_sample_shard_batches(
    bytes: Bytes,
    key: &str,
    mut f: impl FnMut(usize, Vec<SampleRecord>) -> Result<(), ShardError>,
) -> Result<usize, ShardError> {
    let meta = open_shard(&bytes, key, KIND_SAMPLES)?;
    let rows = usize::try_from(meta.metadata().file_metadata().num_rows())
        .unwrap_or(0)
        .min(bytes.len());
    let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(bytes, meta)
        .with_batch_size(8192)
        .build()
        .map_err(|e| ShardError::parquet(key, e))?;
    let mut done = 0usize;
    for batch in reader {
        let mut out = Vec::with_capacity(batch.as_ref().map_or(0, |b| b.num_rows()));
        let batch = batch.map_err(|e| ShardError::arrow(key, e))?;
        let s = |name| column::<StringArray>(&batch, name, key);
        let (sample_id, dataset, task, split, volume_id) = (
            s("sample_id")?,
            s("dataset")?,
            s("task")?,
            s("split")?,
            s("volume_id")?,
        );
        for (name, a) in [
            ("sample_id", sample_id),
            ("dataset", dataset),
            ("task", task),
            ("split", split),
            ("volume_id", volume_id),
        ] {
            no_nulls(a, name, key)?;
        }
        let (question, answer, answer_choice, question_type, class_name, report, source_row) = (
            s("question")?,
            s("answer")?,
            s("answer_choice")?,
            s("question_type")?,
            s("class_name")?,
            s("report")?,
            s("source_row")?,
        );
        let mask_index = column::<UInt32Array>(&batch, "mask_index", key)?;
        let bbox = column::<ListArray>(&batch, "bbox", key)?;
        let bbox_offsets = bbox.value_offsets();
        let bbox_values = bbox
            .values()
            .as_any()
            .downcast_ref::<Float32Array>()
            .ok_or_else(|| ShardError::schema(key, "column `bbox` values are not float32"))?;
        for i in 0..batch.num_rows() {
            let row = done + out.len();
            let task = task.value(i).parse::<Task>().map_err(|e| ShardError::Row {
                key: key.to_string(),
                row,
                reason: e.to_string(),
            })?;
            let bbox = if bbox.is_valid(i) {
                let bad = |reason: &str| ShardError::Row {
                    key: key.to_string(),
                    row,
                    reason: format!("bbox: {reason}"),
                };
                let (start, end) = (bbox_offsets[i], bbox_offsets[i + 1]);
                let (start, end) = (
                    usize::try_from(start).map_err(|_| bad("negative offset"))?,
                    usize::try_from(end).map_err(|_| bad("negative offset"))?,
                );
                let slice = bbox_values
                    .values()
                    .get(start..end)
                    .ok_or_else(|| bad("values truncated"))?;
                let b: [f32; 6] = slice
                    .try_into()
                    .map_err(|_| bad(&format!("{} values, expected 6", slice.len())))?;
                Some(b)
            } else {
                None
            };
            out.push(SampleRecord {
                sample_id: sample_id.value(i).to_string(),
                dataset: dataset.value(i).to_string(),
                task,
                split: split.value(i).to_string(),
                volume_id: volume_id.value(i).to_string(),
                mask_index: mask_index.is_valid(i).then(|| mask_index.value(i)),
                question: opt_str(question, i),
                answer: opt_str(answer, i),
                answer_choice: opt_str(answer_choice, i),
                question_type: opt_str(question_type, i),
                class_name: opt_str(class_name, i),
                bbox,
                report: opt_str(report, i),
                source_row: opt_str(source_row, i),
            });
        }
        done += out.len();
        f(rows, out)?;
    }
    Ok(done)
}

/// Streams the volumes of one volume shard, one row group at a time, so at most one group's decoded rows
/// are held in memory (plus the shard's compressed bytes).
///
/// `with_images(false)` skips the image column (records then have an empty `image` and no crc check);
/// `with_masks(false)` skips the masks column (records then have no masks). When images are read, every
/// image's crc32 is verified and a mismatch yields [`ShardError::ImageCrc`] for that row (later rows are
/// still returned). A decoding error ends the iteration after it is returned.
pub struct VolumeShardReader {
    bytes: Bytes,
    key: String,
    meta: ArrowReaderMetadata,
    images: bool,
    masks: bool,
    batch_size: usize,
    reader: Option<ParquetRecordBatchReader>,
    pending: VecDeque<Result<VolumeRecord, ShardError>>,
    next_row: usize,
    done: bool,
}

impl std::fmt::Debug for VolumeShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeShardReader")
            .field("key", &self.key)
            .field("rows", &self.num_rows())
            .field("images", &self.images)
            .field("masks", &self.masks)
            .field("next_row", &self.next_row)
            .finish_non_exhaustive()
    }
}

impl VolumeShardReader {
    /// Opens a volume shard held in `bytes`; `key` names it in errors. Checks the schema version and columns.
    pub fn new(bytes: Bytes, key: &str) -> Result<Self, ShardError> {
        let meta = open_shard(&bytes, key, KIND_VOLUMES)?;
        let batch_size = meta
            .metadata()
            .row_groups()
            .iter()
            .map(|g| usize::try_from(g.num_rows()).unwrap_or(0))
            .max()
            .unwrap_or(1)
            .clamp(1, 1024);
        Ok(VolumeShardReader {
            bytes,
            key: key.to_string(),
            meta,
            images: true,
            masks: true,
            batch_size,
            reader: None,
            pending: VecDeque::new(),
            next_row: 0,
            done: false,
        })
    }

    /// Whether to read (and crc-check) images; default true.
    pub fn with_images(mut self, yes: bool) -> Self {
        self.images = yes;
        self
    }

    /// Whether to read masks; default true.
    pub fn with_masks(mut self, yes: bool) -> Self {
        self.masks = yes;
        self
    }

    /// Number of volumes in the shard.
    pub fn num_rows(&self) -> usize {
        usize::try_from(self.meta.metadata().file_metadata().num_rows()).unwrap_or(0)
    }

    /// Number of row groups in the shard.
    pub fn num_row_groups(&self) -> usize {
        self.meta.metadata().num_row_groups()
    }

    /// The shard key given to [`VolumeShardReader::new`].
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The shard's Parquet metadata.
    pub fn metadata(&self) -> &Arc<parquet::file::metadata::ParquetMetaData> {
        self.meta.metadata()
    }

    fn build_reader(&self) -> Result<ParquetRecordBatchReader, ShardError> {
        let mask = volume_projection(&self.meta, self.images, self.masks);
        ParquetRecordBatchReaderBuilder::new_with_metadata(self.bytes.clone(), self.meta.clone())
            .with_projection(mask)
            .with_batch_size(self.batch_size)
            .build()
            .map_err(|e| ShardError::parquet(&self.key, e))
    }
}

/// Converts one record batch of a volume shard into records (or per-row errors) appended to `pending`.
fn decode_volume_batch(
    batch: &RecordBatch,
    key: &str,
    read_images: bool,
    read_masks: bool,
    next_row: &mut usize,
    pending: &mut VecDeque<Result<VolumeRecord, ShardError>>,
) -> Result<(), ShardError> {
    {
        let s = |name| column::<StringArray>(batch, name, key);
        let (volume_id, dataset, source, dtype) =
            (s("volume_id")?, s("dataset")?, s("source")?, s("dtype")?);
        let shape = column::<FixedSizeListArray>(batch, "shape", key)?;
        let crc = column::<UInt32Array>(batch, "image_crc32", key)?;
        for (name, a) in [
            ("volume_id", volume_id as &dyn Array),
            ("dataset", dataset),
            ("source", source),
            ("dtype", dtype),
            ("shape", shape),
            ("image_crc32", crc),
        ] {
            no_nulls(a, name, key)?;
        }
        let shape_values = shape
            .values()
            .as_any()
            .downcast_ref::<UInt32Array>()
            .ok_or_else(|| ShardError::schema(key, "column `shape` values are not uint32"))?;
        let image = if read_images {
            let a = column::<LargeBinaryArray>(batch, "image", key)?;
            no_nulls(a, "image", key)?;
            Some(a)
        } else {
            None
        };
        let masks = if read_masks {
            let list = column::<ListArray>(batch, "masks", key)?;
            no_nulls(list, "masks", key)?;
            let st = list
                .values()
                .as_struct_opt()
                .ok_or_else(|| ShardError::schema(key, "column `masks` items are not structs"))?;
            Some((
                list,
                child::<UInt32Array>(st, "class_index", key)?,
                child::<StringArray>(st, "label", key)?,
                child::<UInt64Array>(st, "voxels", key)?,
                child::<LargeBinaryArray>(st, "bits", key)?,
            ))
        } else {
            None
        };

        for i in 0..batch.num_rows() {
            let row = *next_row;
            *next_row += 1;
            let vid = volume_id.value(i);
            let row_err = |reason: String| ShardError::Row {
                key: key.to_string(),
                row,
                reason: format!("volume `{vid}`: {reason}"),
            };
            let o = usize::try_from(shape.value_offset(i))
                .map_err(|_| row_err("negative shape offset".into()))?;
            let mut shp = [0u32; 4];
            shp.copy_from_slice(
                shape_values
                    .values()
                    .get(o..o + 4)
                    .ok_or_else(|| row_err("shape values truncated".into()))?,
            );
            let dt = match dtype.value(i).parse::<ImageDtype>() {
                Ok(d) => d,
                Err(e) => {
                    pending.push_back(Err(row_err(e.to_string())));
                    continue;
                }
            };
            let mut rec = VolumeRecord {
                volume_id: vid.to_string(),
                dataset: dataset.value(i).to_string(),
                source: source.value(i).to_string(),
                shape: shp,
                dtype: dt,
                image: Bytes::new(),
                image_crc32: crc.value(i),
                masks: Vec::new(),
            };
            if let Some((list, class_index, label, voxels, bits)) = masks {
                let offs = list.value_offsets();
                let (start, end) = (offs[i], offs[i + 1]);
                let mask_bytes = packed_len(rec.spatial_numel());
                let mut bad = None;
                for j in start..end {
                    let j =
                        usize::try_from(j).map_err(|_| row_err("negative mask offset".into()))?;
                    let m = MaskRecord {
                        class_index: class_index.value(j),
                        label: label.value(j).to_string(),
                        voxels: voxels.value(j),
                        bits: bits.value(j).to_vec(),
                    };
                    let want = if m.voxels == 0 { 0 } else { mask_bytes };
                    if m.bits.len() != want && bad.is_none() {
                        bad = Some(format!(
                            "mask {} (`{}`) has {} bytes of bits, expected {want}",
                            m.class_index,
                            m.label,
                            m.bits.len()
                        ));
                    }
                    rec.masks.push(m);
                }
                if let Some(reason) = bad {
                    pending.push_back(Err(row_err(reason)));
                    continue;
                }
            }
            if let Some(image) = image {
                if let Err(e) =
                    attach_image(&mut rec, Bytes::copy_from_slice(image.value(i)), key, row)
                {
                    pending.push_back(Err(e));
                    continue;
                }
            }
            pending.push_back(Ok(rec));
        }
        Ok(())
    }
}

impl Iterator for VolumeShardReader {
    type Item = Result<VolumeRecord, ShardError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            if self.reader.is_none() {
                match self.build_reader() {
                    Ok(r) => self.reader = Some(r),
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
            let batch = match self.reader.as_mut().and_then(|r| r.next()) {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(ShardError::arrow(&self.key, e)));
                }
                Some(Ok(b)) => b,
            };
            if let Err(e) = decode_volume_batch(
                &batch,
                &self.key,
                self.images,
                self.masks,
                &mut self.next_row,
                &mut self.pending,
            ) {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::ImageDtype;

    fn record(id: &str, dtype: ImageDtype, seed: u8) -> VolumeRecord {
        let shape = [1u32, 2, 8, 8];
        let n = 128 * dtype.size();
        // Compressible, and different per volume.
        let image: Vec<u8> = (0..n).map(|i| ((i / 3) as u8).wrapping_mul(seed)).collect();
        VolumeRecord {
            volume_id: id.to_string(),
            dataset: "cap".into(),
            source: id.into(),
            shape,
            dtype,
            image_crc32: VolumeRecord::crc32(&image),
            image: Bytes::from(image),
            masks: Vec::new(),
        }
    }

    /// A shard as data-prep writes it (one volume per row group) has its image taken from the page, LZ4_RAW
    /// (`u8`) pages decompressed here and zstd (`f16`) ones by parquet's codec, with the written bytes; the
    /// Arrow path is only a fallback, so without this a broken page path would go unnoticed.
    #[test]
    fn one_volume_row_groups_take_the_image_from_the_page() {
        for (dtype, codec) in [
            (ImageDtype::U8, ImageCodec::Lz4),
            (ImageDtype::F16, ImageCodec::Zstd),
        ] {
            let records = [record("a", dtype, 3), record("b", dtype, 7)];
            let opts = WriteOptions {
                rows_per_row_group: 1,
                image_codec: codec,
                ..WriteOptions::default()
            };
            let bytes = write_volume_shard(&records, &opts).unwrap();
            let n = bytes.len();
            let footer_len = u32::from_le_bytes(bytes[n - 8..n - 4].try_into().unwrap()) as usize;
            let meta = volume_footer(&bytes[n - 8 - footer_len..], "k").unwrap();
            let chunk = RangeChunk {
                file_len: n as u64,
                offset: 0,
                bytes: bytes.clone(),
            };
            for (g, rec) in records.iter().enumerate() {
                let rg = meta.metadata().row_group(g);
                let image = single_image_value(&chunk, &meta, rg, "k").unwrap();
                assert_eq!(
                    image.as_deref(),
                    Some(&rec.image[..]),
                    "{dtype} row group {g}"
                );
                let read =
                    read_volume_row_group(&meta, "k", n as u64, 0, bytes.clone(), g, true, false)
                        .unwrap();
                assert_eq!(read[0].image, rec.image);
            }
        }
    }
}
