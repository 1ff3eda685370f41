//! scipy.sparse CSR matrices in the `.npz` layout of `scipy.sparse.save_npz` (members `indices`, `indptr`,
//! `format`, `shape`, `data`), and the M3D-Seg masks stored that way: `mask_(C, H, W, D).npz` holds the
//! one-hot labels as a `(C, H*W*D)` CSR matrix, with the dense shape only in the file name.

use std::path::Path;

use crate::error::FormatError;
use crate::npy::{shape_len, NpyArray, NpyData};
use crate::npz::{read_npz, write_npz};

/// A compressed-sparse-row matrix. Row `r` holds the entries `indptr[r]..indptr[r+1]` of `indices`
/// (column numbers) and `data` (values).
#[derive(Debug, Clone, PartialEq)]
pub struct CsrMatrix {
    pub shape: (usize, usize),
    pub indptr: Vec<i64>,
    pub indices: Vec<i64>,
    pub data: NpyData,
}

fn sparse_err(path: &Path, reason: String) -> FormatError {
    FormatError::Sparse {
        path: path.to_path_buf(),
        reason,
    }
}

impl CsrMatrix {
    /// Builds the CSR form of a row-major dense `rows x cols` matrix, keeping nonzero entries only (values
    /// are kept as they are, dtype `u8`).
    ///
    /// # Panics
    /// When `dense.len() != rows * cols` (a programming error).
    pub fn from_dense_u8(rows: usize, cols: usize, dense: &[u8]) -> Self {
        assert_eq!(
            Some(dense.len()),
            rows.checked_mul(cols),
            "CsrMatrix::from_dense_u8: buffer length does not match {rows}x{cols}"
        );
        let mut indptr = Vec::with_capacity(rows + 1);
        let mut indices = Vec::new();
        let mut data = Vec::new();
        indptr.push(0i64);
        if cols > 0 {
            for row in dense.chunks_exact(cols) {
                for (c, &v) in row.iter().enumerate() {
                    if v != 0 {
                        indices.push(c as i64);
                        data.push(v);
                    }
                }
                indptr.push(indices.len() as i64);
            }
        } else {
            indptr.resize(rows + 1, 0);
        }
        CsrMatrix {
            shape: (rows, cols),
            indptr,
            indices,
            data: NpyData::U8(data),
        }
    }

    /// Number of stored entries (including explicit zeros).
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// Dense row-major `rows x cols` matrix with 1 where a stored value is nonzero and 0 elsewhere. Validates
    /// the structure first: `indptr` must have `rows + 1` non-decreasing entries from 0 to `nnz`, and every
    /// column index must be in `0..cols` ([`FormatError::ShapeMismatch`] naming `path` otherwise).
    pub fn to_dense_u8(&self, path: &Path) -> Result<Vec<u8>, FormatError> {
        let (total, nonzero) = self.checked(path)?;
        let cols = self.shape.1;
        let mut dense = vec![0u8; total];
        for r in 0..self.shape.0 {
            self.fill_row(r, &nonzero, &mut dense[r * cols..(r + 1) * cols], path)?;
        }
        Ok(dense)
    }

    /// Calls `f(row, dense row)` for every row in order, holding one dense row at a time: an M3D-Seg mask of
    /// 100+ classes at full resolution is gigabytes dense, one class a few tens of megabytes.
    pub fn for_each_dense_row<E: From<FormatError>>(
        &self,
        path: &Path,
        mut f: impl FnMut(usize, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let (_, nonzero) = self.checked(path)?;
        let mut row = vec![0u8; self.shape.1];
        for r in 0..self.shape.0 {
            row.fill(0);
            self.fill_row(r, &nonzero, &mut row, path)?;
            f(r, &row)?;
        }
        Ok(())
    }

    /// Validates the structure (indptr length and ends, data length) and returns the dense size and, per stored
    /// entry, whether its value is nonzero.
    fn checked(&self, path: &Path) -> Result<(usize, Vec<bool>), FormatError> {
        let (rows, cols) = self.shape;
        let mismatch = |expected: String, found: String| FormatError::ShapeMismatch {
            path: path.to_path_buf(),
            expected,
            found,
        };
        let total = rows
            .checked_mul(cols)
            .ok_or_else(|| sparse_err(path, format!("shape ({rows}, {cols}) overflows")))?;
        if self.indptr.len() != rows + 1 {
            return Err(mismatch(
                format!("indptr of {} entries for {rows} rows", rows + 1),
                format!("{} entries", self.indptr.len()),
            ));
        }
        if self.data.len() != self.indices.len() {
            return Err(mismatch(
                format!("{} data values (one per index)", self.indices.len()),
                format!("{}", self.data.len()),
            ));
        }
        let nonzero = self
            .data
            .nonzero_mask()
            .ok_or_else(|| sparse_err(path, "string-typed data".into()))?;
        let nnz = self.indices.len();
        if self.indptr[0] != 0 || self.indptr[rows] != nnz as i64 {
            return Err(mismatch(
                format!("indptr from 0 to nnz = {nnz}"),
                format!("from {} to {}", self.indptr[0], self.indptr[rows]),
            ));
        }
        Ok((total, nonzero))
    }

    /// Writes row `r` (ones where a stored value is nonzero) into `row`, which must be zeroed.
    fn fill_row(
        &self,
        r: usize,
        nonzero: &[bool],
        row: &mut [u8],
        path: &Path,
    ) -> Result<(), FormatError> {
        let (_, cols) = self.shape;
        let nnz = self.indices.len();
        let mismatch = |expected: String, found: String| FormatError::ShapeMismatch {
            path: path.to_path_buf(),
            expected,
            found,
        };
        let (start, end) = (self.indptr[r], self.indptr[r + 1]);
        if end < start {
            return Err(sparse_err(
                path,
                format!("indptr decreases at row {r} ({start} -> {end})"),
            ));
        }
        // In range: 0 <= start <= end <= nnz by the checks in `checked` and monotonicity so far.
        let (start, end) = (start as usize, end as usize);
        if end > nnz {
            return Err(mismatch(format!("indptr <= nnz = {nnz}"), format!("{end}")));
        }
        let entries = self.indices[start..end].iter().zip(&nonzero[start..end]);
        for (k, (&c, &nz)) in (start..).zip(entries) {
            if c < 0 || c as u64 >= cols as u64 {
                return Err(mismatch(
                    format!("column indices in 0..{cols}"),
                    format!("index {c} (entry {k}, row {r})"),
                ));
            }
            if nz {
                row[c as usize] = 1;
            }
        }
        Ok(())
    }
}

fn int_member(
    arrays: &std::collections::BTreeMap<String, NpyArray>,
    key: &str,
    path: &Path,
) -> Result<Vec<i64>, FormatError> {
    let arr = arrays.get(key).ok_or_else(|| {
        sparse_err(
            path,
            format!("no '{key}' member (not a scipy.sparse .npz?)"),
        )
    })?;
    if arr.shape.len() != 1 {
        return Err(sparse_err(
            path,
            format!("'{key}' has shape {:?}, expected 1-D", arr.shape),
        ));
    }
    arr.data.to_i64().ok_or_else(|| {
        sparse_err(
            path,
            format!("'{key}' has dtype {}, expected integers", arr.data.descr()),
        )
    })
}

/// Reads a scipy CSR matrix written by `scipy.sparse.save_npz`. Other sparse formats (csc, coo, bsr, dia)
/// are rejected with [`FormatError::Sparse`] saying which format was found.
pub fn read_csr_npz(path: &Path) -> Result<CsrMatrix, FormatError> {
    let mut arrays = read_npz(path)?;
    let format = match arrays.get("format").map(|a| &a.data) {
        Some(NpyData::Str(v)) if v.len() == 1 => v[0].clone(),
        Some(other) => {
            return Err(sparse_err(
                path,
                format!(
                    "'format' member has dtype {}, expected a string",
                    other.descr()
                ),
            ))
        }
        None => {
            return Err(sparse_err(
                path,
                "no 'format' member: not written by scipy.sparse.save_npz".into(),
            ))
        }
    };
    if format != "csr" {
        return Err(sparse_err(
            path,
            format!("sparse format is {format:?}, only \"csr\" is supported"),
        ));
    }
    let shape = int_member(&arrays, "shape", path)?;
    let shape = match shape.as_slice() {
        [r, c] if *r >= 0 && *c >= 0 => (*r as usize, *c as usize),
        _ => {
            return Err(sparse_err(
                path,
                format!("'shape' is {shape:?}, expected two non-negative integers"),
            ))
        }
    };
    let indptr = int_member(&arrays, "indptr", path)?;
    let indices = int_member(&arrays, "indices", path)?;
    let data = arrays
        .remove("data")
        .ok_or_else(|| sparse_err(path, "no 'data' member".into()))?;
    if data.shape.len() != 1 || matches!(data.data, NpyData::Str(_)) {
        return Err(sparse_err(
            path,
            format!(
                "'data' has shape {:?} and dtype {}, expected 1-D numbers",
                data.shape,
                data.data.descr()
            ),
        ));
    }
    Ok(CsrMatrix {
        shape,
        indptr,
        indices,
        data: data.data,
    })
}

/// Index arrays as scipy stores them: int32 when every value fits, int64 otherwise.
fn index_array(v: &[i64]) -> NpyArray {
    let data = if v.iter().all(|&x| i32::try_from(x).is_ok()) {
        NpyData::I32(v.iter().map(|&x| x as i32).collect())
    } else {
        NpyData::I64(v.to_vec())
    };
    NpyArray {
        shape: vec![v.len()],
        data,
    }
}

/// Writes a CSR matrix in the layout of `scipy.sparse.save_npz` (compressed), readable by
/// `scipy.sparse.load_npz`.
pub fn write_csr_npz(path: &Path, m: &CsrMatrix) -> Result<(), FormatError> {
    if m.data.len() != m.indices.len() || m.indptr.len() != m.shape.0 + 1 {
        return Err(FormatError::ShapeMismatch {
            path: path.to_path_buf(),
            expected: format!(
                "indptr of {} entries and as many data values as indices ({})",
                m.shape.0 + 1,
                m.indices.len()
            ),
            found: format!("indptr of {}, {} data values", m.indptr.len(), m.data.len()),
        });
    }
    let indices = index_array(&m.indices);
    let indptr = index_array(&m.indptr);
    let format = NpyArray {
        shape: vec![],
        data: NpyData::Str(vec!["csr".to_string()]),
    };
    let shape = NpyArray {
        shape: vec![2],
        data: NpyData::I64(vec![m.shape.0 as i64, m.shape.1 as i64]),
    };
    let data = NpyArray {
        shape: vec![m.data.len()],
        data: m.data.clone(),
    };
    write_npz(
        path,
        &[
            ("indices", &indices),
            ("indptr", &indptr),
            ("format", &format),
            ("shape", &shape),
            ("data", &data),
        ],
        true,
    )
}

/// Dense shape encoded in an M3D-Seg mask file name such as `mask_(2, 512, 512, 96).npz`: the integers
/// inside the last pair of parentheses of the file stem.
pub fn parse_mask_shape(path: &Path) -> Result<Vec<usize>, FormatError> {
    let bad = |reason: &str| FormatError::Npz {
        path: path.to_path_buf(),
        reason: format!(
            "file name does not encode a mask shape like 'mask_(C, H, W, D).npz': {reason}"
        ),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| bad("no UTF-8 file name"))?;
    let stem = name.strip_suffix(".npz").unwrap_or(name);
    let open = stem.rfind('(').ok_or_else(|| bad("no '('"))?;
    let close = stem[open..]
        .find(')')
        .map(|i| i + open)
        .ok_or_else(|| bad("no ')'"))?;
    let inner = &stem[open + 1..close];
    let mut parts: Vec<&str> = inner.split(',').map(str::trim).collect();
    // A one-element Python tuple prints as "(5,)".
    if parts.len() > 1 && parts.last() == Some(&"") {
        parts.pop();
    }
    let dims = parts
        .iter()
        .map(|p| {
            p.parse::<usize>()
                .map_err(|_| bad(&format!("{p:?} is not a dimension")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if dims.len() < 2 {
        return Err(bad("need at least two dimensions (classes first)"));
    }
    Ok(dims)
}

/// Reads an M3D-Seg mask: the CSR matrix `(C, H*W*D)` becomes a dense C-order `u8` array (0/1) of the shape
/// in the file name. A matrix shape that disagrees with the name, or an out-of-range index, is
/// [`FormatError::ShapeMismatch`] naming the file.
pub fn read_mask_npz(path: &Path) -> Result<(Vec<usize>, Vec<u8>), FormatError> {
    let (shape, m) = open_mask_npz(path)?;
    let dense = m.to_dense_u8(path)?;
    Ok((shape, dense))
}

/// Reads an M3D-Seg mask file without densifying it: the shape from its name and the CSR matrix, checked to be
/// `(C, H*W*D)`. Use [`CsrMatrix::for_each_dense_row`] to visit one class at a time.
pub fn open_mask_npz(path: &Path) -> Result<(Vec<usize>, CsrMatrix), FormatError> {
    let shape = parse_mask_shape(path)?;
    let m = read_csr_npz(path)?;
    let rest = shape_len(&shape[1..]);
    if Some(m.shape) != rest.map(|r| (shape[0], r)) {
        return Err(FormatError::ShapeMismatch {
            path: path.to_path_buf(),
            expected: format!(
                "CSR matrix ({}, {}) for mask shape {shape:?} in the file name",
                shape[0],
                rest.map_or_else(|| "overflow".to_string(), |r| r.to_string())
            ),
            found: format!("({}, {})", m.shape.0, m.shape.1),
        });
    }
    Ok((shape, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_one_at_a_time_equal_the_dense_matrix() {
        let dense = vec![0u8, 3, 0, 0, 0, 0, 1, 0, 7, 0, 0, 2];
        let m = CsrMatrix::from_dense_u8(4, 3, &dense);
        let whole = m.to_dense_u8(Path::new("x")).unwrap();
        let mut rows = Vec::new();
        m.for_each_dense_row(Path::new("x"), |r, row| -> Result<(), FormatError> {
            rows.push((r, row.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(rows.len(), 4);
        for (r, row) in rows {
            assert_eq!(row, whole[r * 3..(r + 1) * 3]);
        }
        let mut bad = m.clone();
        bad.indices[1] = 9;
        let err = bad
            .for_each_dense_row(Path::new("bad.npz"), |_, _| -> Result<(), FormatError> {
                Ok(())
            })
            .unwrap_err();
        assert!(err.to_string().contains("bad.npz"), "{err}");
    }

    #[test]
    fn dense_round_trip() {
        let dense = vec![0u8, 3, 0, 0, 0, 0, 1, 0, 7];
        let m = CsrMatrix::from_dense_u8(3, 3, &dense);
        assert_eq!(m.nnz(), 3);
        assert_eq!(m.indptr, vec![0, 1, 1, 3]);
        let back = m.to_dense_u8(Path::new("x")).unwrap();
        assert_eq!(back, vec![0, 1, 0, 0, 0, 0, 1, 0, 1]);
    }

    #[test]
    fn rejects_bad_structure() {
        let mut m = CsrMatrix::from_dense_u8(2, 2, &[1, 0, 0, 1]);
        m.indices[1] = 2;
        let e = m.to_dense_u8(Path::new("bad.npz")).unwrap_err();
        assert!(matches!(e, FormatError::ShapeMismatch { .. }), "{e}");
        assert!(e.to_string().contains("bad.npz"));
        let mut m = CsrMatrix::from_dense_u8(2, 2, &[1, 0, 0, 1]);
        m.indptr = vec![0, 2, 1];
        assert!(m.to_dense_u8(Path::new("bad.npz")).is_err());
    }

    #[test]
    fn mask_shape_from_name() {
        assert_eq!(
            parse_mask_shape(Path::new("/d/0000/case/mask_(2, 512, 512, 96).npz")).unwrap(),
            vec![2, 512, 512, 96]
        );
        assert_eq!(
            parse_mask_shape(Path::new("mask_(3,4,).npz")).unwrap(),
            vec![3, 4]
        );
        assert!(parse_mask_shape(Path::new("mask.npz")).is_err());
        assert!(parse_mask_shape(Path::new("mask_(2, x, 3).npz")).is_err());
    }
}
