//! [`SampleTable`]: a dataset's sample records kept compact in memory, the form the worker holds them in.
//!
//! A worker holds its training set's sample table for the whole run, and at M3D scale (662K samples: reports,
//! questions, answers and their ids) a `Vec<SampleRecord>` is ~400 MiB: 300 bytes of struct per record and
//! about nine heap allocations. Here the records are encoded back to back (lengths as varints, absent fields as
//! one byte) in blocks of [`BLOCK_ROWS`], each block compressed with zstd; what the index and the filters need
//! for every sample without decoding (its task and split) is kept beside them as one byte and an interned
//! number. A record is materialised when a batch asks for it: one block decompressed per lookup (tens of
//! microseconds), a cost per sample of a step, not per step of a run.
//!
//! The worker's tables keep their compressed blocks in an unlinked file in the temp folder
//! ([`SampleTableBuilder::spilling`]; the space is freed when the process ends, however it ends), read back with
//! positioned reads that the page cache serves: memory then holds only each sample's task and split and each
//! block's place, as Mosaic Streaming keeps its shards on local disk. Tables built with
//! [`SampleTableBuilder::default`] hold their blocks in memory.

use m3d_shards::records::{decode_record, encode_record, skip_record};
use m3d_shards::schema::{SampleRecord, Task};

/// Records per compressed block: large enough for zstd to find the repeats between neighbouring records
/// (ids, dataset and split names, templates), small enough that a lookup decompresses a few tens of KiB.
pub const BLOCK_ROWS: usize = 128;

/// zstd level: 3 is zstd's default, compressing at hundreds of MB/s, so opening 662K samples costs well under a
/// second more than decoding them.
const LEVEL: i32 = 3;

/// Errors of the table: these are failures of this process (an allocation, a codec), not of the data, which
/// was checked when its shard was decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SampleTableError {
    #[error("sample {index} out of range ({len} samples)")]
    OutOfRange { index: usize, len: usize },
    #[error("compressing or decompressing block {block} of the sample table: {reason}")]
    Codec { block: usize, reason: String },
    #[error("more than {max} distinct splits")]
    TooManySplits { max: usize },
    /// Writing or reading the table's file in the temp folder failed.
    #[error("the sample table's file in the temp folder: {0}")]
    Spill(String),
}

/// Where the compressed blocks are, back to back.
enum Blocks {
    Memory(Vec<u8>),
    /// An unlinked file of the temp folder.
    File(std::fs::File),
}

impl Default for Blocks {
    fn default() -> Self {
        Blocks::Memory(Vec::new())
    }
}

/// The records of a dataset, compressed in blocks; see the module docs.
#[derive(Default)]
pub struct SampleTable {
    store: Blocks,
    /// Each block's offset in `store`, compressed length and decoded length.
    blocks: Vec<(u64, u32, u32)>,
    tasks: Vec<Task>,
    /// Interned: index into `split_names`.
    splits: Vec<u16>,
    split_names: Vec<String>,
}

impl std::fmt::Debug for SampleTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampleTable")
            .field("samples", &self.len())
            .field("stored_bytes", &self.stored_bytes())
            .finish()
    }
}

impl SampleTable {
    /// The number of samples.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Sample `i`'s task, without decoding it.
    pub fn task(&self, i: usize) -> Option<Task> {
        self.tasks.get(i).copied()
    }

    /// Sample `i`'s split, without decoding it.
    pub fn split(&self, i: usize) -> Option<&str> {
        let s = *self.splits.get(i)?;
        self.split_names.get(usize::from(s)).map(String::as_str)
    }

    /// Bytes of the compressed blocks, in memory or in the spill file.
    pub fn stored_bytes(&self) -> usize {
        self.blocks.iter().map(|&(_, len, _)| len as usize).sum()
    }

    /// Bytes the table holds in memory: the per-sample task and split, each block's place and, unless they
    /// are spilled to a file, the blocks.
    pub fn memory_bytes(&self) -> usize {
        let blocks = match &self.store {
            Blocks::Memory(v) => v.len(),
            Blocks::File(_) => 0,
        };
        blocks + self.tasks.len() * 3 + self.blocks.len() * 16
    }

    /// Whether the compressed blocks are in a file rather than in memory.
    pub fn is_spilled(&self) -> bool {
        matches!(self.store, Blocks::File(_))
    }

    /// Sample `i`, decoded.
    pub fn get(&self, i: usize) -> Result<SampleRecord, SampleTableError> {
        let mut one = self.get_many(&[i])?;
        one.pop().ok_or_else(|| self.corrupt(i / BLOCK_ROWS))
    }

    /// Samples `indices` (in that order, repeats allowed), decoded, each block decompressed once however many
    /// of them it holds: a step's samples under a block shuffle are neighbours.
    pub fn get_many(&self, indices: &[usize]) -> Result<Vec<SampleRecord>, SampleTableError> {
        if let Some(&index) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(SampleTableError::OutOfRange {
                index,
                len: self.len(),
            });
        }
        let mut by_position: Vec<usize> = (0..indices.len()).collect();
        by_position.sort_unstable_by_key(|&k| indices[k]);
        let mut out: Vec<Option<SampleRecord>> = vec![None; indices.len()];
        let mut open: Option<(usize, Vec<u8>)> = None;
        for k in by_position {
            let (i, b) = (indices[k], indices[k] / BLOCK_ROWS);
            let block = match &open {
                Some((ob, block)) if *ob == b => block,
                _ => &open.insert((b, self.block(b)?)).1,
            };
            let mut rest = block.as_slice();
            for _ in 0..i % BLOCK_ROWS {
                skip_record(&mut rest).ok_or_else(|| self.corrupt(b))?;
            }
            out[k] = Some(decode_record(&mut rest).ok_or_else(|| self.corrupt(b))?);
        }
        // Every position was filled above.
        Ok(out.into_iter().flatten().collect())
    }

    /// Every sample, in order, decoding each block once.
    pub fn iter(&self) -> impl Iterator<Item = Result<SampleRecord, SampleTableError>> + '_ {
        (0..self.blocks.len()).flat_map(move |b| {
            let rows = (self.len() - b * BLOCK_ROWS).min(BLOCK_ROWS);
            let decoded: Vec<Result<SampleRecord, SampleTableError>> = match self.block(b) {
                Ok(block) => {
                    let mut rest = block.as_slice();
                    (0..rows)
                        .map(|_| decode_record(&mut rest).ok_or_else(|| self.corrupt(b)))
                        .collect()
                }
                Err(e) => vec![Err(e)],
            };
            decoded
        })
    }

    fn block(&self, b: usize) -> Result<Vec<u8>, SampleTableError> {
        let &(offset, len, size) = self.blocks.get(b).ok_or_else(|| self.corrupt(b))?;
        let codec = |reason: String| SampleTableError::Codec { block: b, reason };
        let read;
        let compressed: &[u8] = match &self.store {
            Blocks::Memory(v) => v
                .get(offset as usize..offset as usize + len as usize)
                .ok_or_else(|| self.corrupt(b))?,
            Blocks::File(f) => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, offset)
                    .map_err(|e| SampleTableError::Spill(e.to_string()))?;
                read = buf;
                &read
            }
        };
        zstd::bulk::decompress(compressed, size as usize).map_err(|e| codec(e.to_string()))
    }

    fn corrupt(&self, block: usize) -> SampleTableError {
        SampleTableError::Codec {
            block,
            reason: "a record does not decode (a bug: the table is written by this process)".into(),
        }
    }
}

/// Builds a [`SampleTable`] record by record.
#[derive(Default)]
pub struct SampleTableBuilder {
    table: SampleTable,
    open: Vec<u8>,
    open_rows: usize,
    /// Bytes written to `table.store` so far.
    written: u64,
}

impl SampleTableBuilder {
    /// A builder whose table keeps its compressed blocks in a new unlinked file in folder `dir` (see the
    /// module docs).
    pub fn spilling(dir: &std::path::Path) -> Result<Self, SampleTableError> {
        let spill = |e: std::io::Error| SampleTableError::Spill(format!("{}: {e}", dir.display()));
        let path = dir.join(format!(
            ".m3d-samples-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(spill)?;
        // Unlinked at once: the file lives as long as the handle, whatever way the process ends.
        std::fs::remove_file(&path).map_err(spill)?;
        Ok(SampleTableBuilder {
            table: SampleTable {
                store: Blocks::File(file),
                ..SampleTable::default()
            },
            ..SampleTableBuilder::default()
        })
    }

    /// Reserves the per-sample arrays for `n` samples (the manifest's count).
    pub fn reserve(&mut self, n: usize) {
        self.table.tasks.reserve_exact(n);
        self.table.splits.reserve_exact(n);
        self.table.blocks.reserve_exact(n.div_ceil(BLOCK_ROWS));
    }

    /// Appends `record`.
    pub fn push(&mut self, record: &SampleRecord) -> Result<(), SampleTableError> {
        let split = match self
            .table
            .split_names
            .iter()
            .position(|s| *s == record.split)
        {
            Some(p) => p,
            None => {
                self.table.split_names.push(record.split.clone());
                self.table.split_names.len() - 1
            }
        };
        let split = u16::try_from(split).map_err(|_| SampleTableError::TooManySplits {
            max: usize::from(u16::MAX),
        })?;
        self.table.splits.push(split);
        self.table.tasks.push(record.task);
        encode_record(&mut self.open, record);
        self.open_rows += 1;
        if self.open_rows == BLOCK_ROWS {
            self.seal()?;
        }
        Ok(())
    }

    fn seal(&mut self) -> Result<(), SampleTableError> {
        if self.open_rows == 0 {
            return Ok(());
        }
        let block = self.table.blocks.len();
        let codec = |reason: String| SampleTableError::Codec { block, reason };
        let compressed =
            zstd::bulk::compress(&self.open, LEVEL).map_err(|e| codec(e.to_string()))?;
        let len = u32::try_from(compressed.len()).map_err(|e| codec(e.to_string()))?;
        let size = u32::try_from(self.open.len()).map_err(|e| codec(e.to_string()))?;
        match &mut self.table.store {
            Blocks::Memory(v) => v.extend_from_slice(&compressed),
            Blocks::File(f) => {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&compressed, self.written)
                    .map_err(|e| SampleTableError::Spill(e.to_string()))?;
            }
        }
        self.table.blocks.push((self.written, len, size));
        self.written += u64::from(len);
        self.open.clear();
        self.open_rows = 0;
        Ok(())
    }

    /// The table.
    pub fn finish(mut self) -> Result<SampleTable, SampleTableError> {
        self.seal()?;
        if let Blocks::Memory(v) = &mut self.table.store {
            v.shrink_to_fit();
        }
        self.table.blocks.shrink_to_fit();
        self.table.tasks.shrink_to_fit();
        self.table.splits.shrink_to_fit();
        Ok(self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> SampleRecord {
        let task = Task::ALL[i % Task::ALL.len()];
        SampleRecord {
            sample_id: format!("sample-{i}"),
            dataset: if i % 3 == 0 { "vqa" } else { "cap" }.into(),
            task,
            split: ["train", "validation", "test"][i % 3].into(),
            volume_id: format!("ct_case/{i:06}/Axial"),
            mask_index: (i % 4 == 0).then_some(i as u32 * 1000),
            question: (i % 2 == 0).then(|| format!("what is in image {i}? ünïcödé")),
            answer: (i % 5 != 0).then(|| "a".repeat(i % 300)),
            answer_choice: (i % 7 == 0).then(|| "B".into()),
            question_type: (i % 7 == 0).then(String::new),
            class_name: (i % 11 == 0).then(|| "liver".into()),
            bbox: (i % 6 == 0).then_some([0.1, -0.0, f32::MAX, 1e-9, 0.5, i as f32]),
            report: (i % 3 != 2).then(|| format!("report {i} ").repeat(i % 50)),
            source_row: Some(format!("M3D_Cap.json:{i}")),
        }
    }

    #[test]
    fn every_record_comes_back_identical_by_index_and_in_order() {
        // Not a multiple of the block size, so the last block is partial.
        let n = 3 * BLOCK_ROWS + 17;
        let records: Vec<SampleRecord> = (0..n).map(record).collect();
        let mut b = SampleTableBuilder::default();
        b.reserve(n);
        for r in &records {
            b.push(r).unwrap();
        }
        let t = b.finish().unwrap();
        assert_eq!(t.len(), n);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(&t.get(i).unwrap(), r, "record {i}");
            assert_eq!(t.task(i), Some(r.task));
            assert_eq!(t.split(i), Some(r.split.as_str()));
        }
        let all: Vec<SampleRecord> = t.iter().map(Result::unwrap).collect();
        assert_eq!(all, records);
        assert!(matches!(
            t.get(n),
            Err(SampleTableError::OutOfRange { index, len }) if index == n && len == n
        ));
        assert_eq!(t.task(n), None);
        assert_eq!(t.split(n), None);
    }

    #[test]
    fn many_at_once_come_back_in_the_order_asked_with_repeats() {
        let n = 2 * BLOCK_ROWS + 3;
        let records: Vec<SampleRecord> = (0..n).map(record).collect();
        let mut b = SampleTableBuilder::default();
        for r in &records {
            b.push(r).unwrap();
        }
        let t = b.finish().unwrap();
        let asked = [n - 1, 0, BLOCK_ROWS + 1, 1, 0, BLOCK_ROWS - 1];
        let got = t.get_many(&asked).unwrap();
        let want: Vec<SampleRecord> = asked.iter().map(|&i| records[i].clone()).collect();
        assert_eq!(got, want);
        assert!(matches!(
            t.get_many(&[0, n]),
            Err(SampleTableError::OutOfRange { index, .. }) if index == n
        ));
    }

    #[test]
    fn repetitive_records_take_a_fraction_of_their_text() {
        let records: Vec<SampleRecord> = (0..4 * BLOCK_ROWS).map(record).collect();
        let text: usize = records
            .iter()
            .map(|r| {
                r.sample_id.len()
                    + r.volume_id.len()
                    + r.report.as_ref().map_or(0, String::len)
                    + r.answer.as_ref().map_or(0, String::len)
            })
            .sum();
        let mut b = SampleTableBuilder::default();
        for r in &records {
            b.push(r).unwrap();
        }
        let t = b.finish().unwrap();
        assert!(
            t.stored_bytes() * 4 < text,
            "{} of {text}",
            t.stored_bytes()
        );
    }

    #[test]
    fn a_spilled_table_reads_back_the_same_and_holds_only_its_index_in_memory() {
        let dir = std::env::temp_dir();
        let n = 2 * BLOCK_ROWS + 5;
        let records: Vec<SampleRecord> = (0..n).map(record).collect();
        let mut b = SampleTableBuilder::spilling(&dir).unwrap();
        for r in &records {
            b.push(r).unwrap();
        }
        let t = b.finish().unwrap();
        assert!(t.is_spilled());
        // The file is unlinked from the start: nothing of it is left in the folder.
        let leftovers = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!(".m3d-samples-{}-", std::process::id()))
            })
            .count();
        assert_eq!(leftovers, 0);
        for i in [0, 1, BLOCK_ROWS - 1, BLOCK_ROWS, n - 1] {
            assert_eq!(t.get(i).unwrap(), records[i], "record {i}");
        }
        let all: Vec<SampleRecord> = t.iter().map(Result::unwrap).collect();
        assert_eq!(all, records);
        assert!(t.stored_bytes() > 0);
        assert_eq!(t.memory_bytes(), n * 3 + 3 * 16);
    }

    #[test]
    fn a_spill_folder_that_does_not_exist_is_an_error_naming_it() {
        let err = SampleTableBuilder::spilling(std::path::Path::new("/nonexistent/m3d-spill"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/m3d-spill"), "{err}");
    }

    #[test]
    fn an_empty_table_is_empty() {
        let t = SampleTableBuilder::default().finish().unwrap();
        assert!(t.is_empty());
        assert_eq!(t.iter().count(), 0);
        assert!(t.get(0).is_err());
    }
}
