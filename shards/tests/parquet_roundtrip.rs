//! Volume and sample shards survive a write/read round trip, stream in row groups, and foreign or newer
//! files are refused.
mod common;

use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use bytes::Bytes;
use m3d_shards::parquet_io::{META_FORMAT, META_KIND, META_SCHEMA_VERSION};
use m3d_shards::{
    read_sample_shard, write_sample_shard, write_volume_shard, ImageDtype, SampleRecord,
    ShardError, Task, VolumeRecord, VolumeShardReader, WriteOptions,
};
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

fn volumes() -> Vec<VolumeRecord> {
    let mut rng = common::rng(10);
    let dtypes = [ImageDtype::U8, ImageDtype::F16, ImageDtype::F32];
    (0..5)
        .map(|i| {
            common::synthetic_volume(
                &mut rng,
                &format!("00{i}/case_{i}"),
                [1, 3, 5, 7],
                dtypes[i % 3],
                i % 4,
            )
            .record
        })
        .collect()
}

#[test]
fn volume_shard_round_trip_in_row_groups() {
    let recs = volumes();
    let opts = WriteOptions {
        rows_per_row_group: 2,
        zstd_level: 3,
        image_codec: m3d_shards::parquet_io::ImageCodec::Zstd,
    };
    let bytes = write_volume_shard(&recs, &opts).unwrap();
    let reader = VolumeShardReader::new(bytes.clone(), "volumes/part-00000.parquet").unwrap();
    assert_eq!(reader.num_rows(), 5);
    assert_eq!(reader.num_row_groups(), 3, "5 rows at 2 per group");
    let back: Vec<VolumeRecord> = reader.map(Result::unwrap).collect();
    assert_eq!(back, recs);

    let no_images: Vec<VolumeRecord> = VolumeShardReader::new(bytes.clone(), "k")
        .unwrap()
        .with_images(false)
        .map(Result::unwrap)
        .collect();
    assert_eq!(no_images.len(), 5);
    for (a, b) in no_images.iter().zip(&recs) {
        assert!(a.image.is_empty());
        assert_eq!(a.masks, b.masks);
        assert_eq!(
            (a.volume_id.as_str(), a.shape, a.image_crc32),
            (b.volume_id.as_str(), b.shape, b.image_crc32)
        );
    }
    let no_masks: Vec<VolumeRecord> = VolumeShardReader::new(bytes, "k")
        .unwrap()
        .with_masks(false)
        .map(Result::unwrap)
        .collect();
    assert!(no_masks.iter().all(|r| r.masks.is_empty()));
    assert_eq!(
        no_masks.iter().map(|r| &r.image).collect::<Vec<_>>(),
        recs.iter().map(|r| &r.image).collect::<Vec<_>>()
    );
}

#[test]
fn writer_rejects_inconsistent_records() {
    let mut recs = volumes();
    let shorter = recs[1].image.len() - 1;
    recs[1].image.truncate(shorter);
    let err = write_volume_shard(&recs, &WriteOptions::default()).unwrap_err();
    assert!(err.to_string().contains("001/case_1"), "{err}");

    let mut recs = volumes();
    recs[3].volume_id = recs[0].volume_id.clone();
    let err = write_volume_shard(&recs, &WriteOptions::default()).unwrap_err();
    assert!(err.to_string().contains("duplicate"), "{err}");

    let mut recs = volumes();
    recs[2].masks[0].bits.push(0);
    assert!(write_volume_shard(&recs, &WriteOptions::default()).is_err());
}

#[test]
fn sample_shard_round_trip() {
    let tasks = [
        Task::Caption,
        Task::VqaClosed,
        Task::VqaOpen,
        Task::VqaYesNo,
        Task::Rec,
        Task::Reg,
        Task::Seg,
        Task::RefSeg,
    ];
    let recs: Vec<SampleRecord> = (0..40)
        .map(|i| common::sample(i, &format!("v{}", i % 6), tasks[i % 8]))
        .collect();
    let bytes = write_sample_shard(&recs, &WriteOptions::default()).unwrap();
    let back = read_sample_shard(bytes, "samples/part-00000.parquet").unwrap();
    assert_eq!(back, recs);
    assert!(read_sample_shard(
        write_sample_shard(&[], &WriteOptions::default()).unwrap(),
        "k"
    )
    .unwrap()
    .is_empty());
}

#[test]
fn kinds_are_not_interchangeable() {
    let vol = write_volume_shard(&volumes(), &WriteOptions::default()).unwrap();
    let err = read_sample_shard(vol, "volumes/part-00007.parquet").unwrap_err();
    assert!(
        err.to_string().contains("volumes/part-00007.parquet"),
        "{err}"
    );
    let samples = write_sample_shard(
        &[common::sample(0, "v", Task::Seg)],
        &WriteOptions::default(),
    )
    .unwrap();
    assert!(VolumeShardReader::new(samples, "k").is_err());
}

fn foreign_parquet(meta: Vec<KeyValue>) -> Bytes {
    let schema = Arc::new(Schema::new(vec![Field::new(
        "volume_id",
        DataType::Utf8,
        false,
    )]));
    let batch =
        RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(vec!["a"]))]).unwrap();
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(meta))
        .build();
    let mut w = ArrowWriter::try_new(Vec::new(), schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    Bytes::from(w.into_inner().unwrap())
}

#[test]
fn newer_or_foreign_shards_are_refused() {
    let newer = foreign_parquet(vec![
        KeyValue::new(META_FORMAT.into(), "m3d-shards".to_string()),
        KeyValue::new(META_SCHEMA_VERSION.into(), "2".to_string()),
        KeyValue::new(META_KIND.into(), "volumes".to_string()),
    ]);
    let err = VolumeShardReader::new(newer, "volumes/part-00003.parquet").unwrap_err();
    assert!(
        matches!(
            err,
            ShardError::SchemaVersion {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("volumes/part-00003.parquet"),
        "{err}"
    );

    let plain = foreign_parquet(vec![]);
    let err = VolumeShardReader::new(plain, "x.parquet").unwrap_err();
    assert!(err.to_string().contains("not an m3d shard"), "{err}");

    // Right metadata, wrong columns.
    let current = foreign_parquet(vec![
        KeyValue::new(META_FORMAT.into(), "m3d-shards".to_string()),
        KeyValue::new(META_SCHEMA_VERSION.into(), "1".to_string()),
        KeyValue::new(META_KIND.into(), "volumes".to_string()),
    ]);
    let err = VolumeShardReader::new(current, "y.parquet").unwrap_err();
    assert!(
        err.to_string().contains("missing column `dataset`"),
        "{err}"
    );

    assert!(VolumeShardReader::new(Bytes::from_static(b"not parquet at all"), "z").is_err());
}
