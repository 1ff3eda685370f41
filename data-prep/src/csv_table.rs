//! Strict CSV reading for the dataset tables (M3D-VQA, M3D-RefSeg): exact header check, every row as a map from
//! column name to value, and errors naming the file and the 1-based data row.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{PrepError, Result};

/// A CSV file read whole (the published tables are at most tens of MB).
pub struct Table {
    pub path: PathBuf,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
    index: HashMap<String, usize>,
}

impl Table {
    /// Reads `path`, requiring every column of `required` to be present (extra columns are kept).
    pub fn read(path: &Path, required: &[&str]) -> Result<Table> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .from_path(path)
            .map_err(|e| PrepError::input(path, format!("cannot open CSV: {e}")))?;
        let columns: Vec<String> = reader
            .headers()
            .map_err(|e| PrepError::input(path, format!("unreadable CSV header: {e}")))?
            .iter()
            .map(|c| c.trim_start_matches('\u{feff}').to_string())
            .collect();
        let missing: Vec<String> = required
            .iter()
            .filter(|r| !columns.iter().any(|c| c == *r))
            .map(|r| r.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(PrepError::MissingColumns {
                path: path.to_path_buf(),
                missing,
                found: columns,
            });
        }
        let mut rows = Vec::new();
        for (i, record) in reader.records().enumerate() {
            let record = record.map_err(|e| PrepError::Row {
                path: path.to_path_buf(),
                row: i + 1,
                reason: format!("unparsable CSV row: {e}"),
            })?;
            rows.push(record.iter().map(str::to_string).collect());
        }
        let index = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), i))
            .collect();
        Ok(Table {
            path: path.to_path_buf(),
            columns,
            rows,
            index,
        })
    }

    /// The value of `column` in data row `row` (0-based here; errors report it 1-based).
    pub fn get(&self, row: usize, column: &str) -> &str {
        match (self.index.get(column), self.rows.get(row)) {
            (Some(&c), Some(r)) => r.get(c).map(String::as_str).unwrap_or(""),
            _ => "",
        }
    }

    /// An error about data row `row` (0-based).
    pub fn row_error(&self, row: usize, reason: impl Into<String>) -> PrepError {
        PrepError::Row {
            path: self.path.clone(),
            row: row + 1,
            reason: reason.into(),
        }
    }

    /// `file.csv:N` for provenance.
    pub fn row_ref(&self, row: usize) -> String {
        format!("{}:{}", crate::cap::file_name(&self.path), row + 1)
    }
}
