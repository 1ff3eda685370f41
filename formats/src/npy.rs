//! NumPy `.npy` arrays: our own parser and writer for the format (versions 1.0, 2.0 and 3.0).
//!
//! Owns [`NpyArray`] / [`NpyData`], the in-memory form every other reader of this crate builds on. Data is
//! always held in C order and native values: big-endian files are byte-swapped and `fortran_order` files are
//! transposed on read, so callers never see either. Writing always produces little-endian, C-order files
//! (version 1.0, or 2.0 when the header does not fit a 16-bit length).

use std::path::Path;

use half::f16;

use crate::error::FormatError;

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// The elements of an array, one variant per supported dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    Bool(Vec<bool>),
    U8(Vec<u8>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    U16(Vec<u16>),
    I32(Vec<i32>),
    U32(Vec<u32>),
    I64(Vec<i64>),
    U64(Vec<u64>),
    F16(Vec<f16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    /// Fixed-width strings: read from `|S<n>` (bytes; UTF-8, or Latin-1 when not valid UTF-8) and `<U<n>` /
    /// `>U<n>` (UCS-4), trailing NULs removed as numpy does. Written as `<U<n>` with `n` the longest string.
    Str(Vec<String>),
}

impl NpyData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            NpyData::Bool(v) => v.len(),
            NpyData::U8(v) => v.len(),
            NpyData::I8(v) => v.len(),
            NpyData::I16(v) => v.len(),
            NpyData::U16(v) => v.len(),
            NpyData::I32(v) => v.len(),
            NpyData::U32(v) => v.len(),
            NpyData::I64(v) => v.len(),
            NpyData::U64(v) => v.len(),
            NpyData::F16(v) => v.len(),
            NpyData::F32(v) => v.len(),
            NpyData::F64(v) => v.len(),
            NpyData::Str(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// numpy `descr` of the dtype as we write it. Strings give `"<U"`: their width depends on the contents
    /// (see [`NpyData::descr`] for the full descr).
    pub fn dtype_str(&self) -> &'static str {
        match self {
            NpyData::Bool(_) => "|b1",
            NpyData::U8(_) => "|u1",
            NpyData::I8(_) => "|i1",
            NpyData::I16(_) => "<i2",
            NpyData::U16(_) => "<u2",
            NpyData::I32(_) => "<i4",
            NpyData::U32(_) => "<u4",
            NpyData::I64(_) => "<i8",
            NpyData::U64(_) => "<u8",
            NpyData::F16(_) => "<f2",
            NpyData::F32(_) => "<f4",
            NpyData::F64(_) => "<f8",
            NpyData::Str(_) => "<U",
        }
    }

    /// Full numpy `descr` as written by [`encode_npy`], including the width of string dtypes.
    pub fn descr(&self) -> String {
        match self {
            NpyData::Str(v) => format!("<U{}", str_width(v)),
            other => other.dtype_str().to_string(),
        }
    }

    /// Values as `f64` (exact for every numeric dtype except 64-bit integers beyond 2^53); `None` for strings.
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        Some(match self {
            NpyData::Bool(v) => v.iter().map(|&b| f64::from(u8::from(b))).collect(),
            NpyData::U8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::I8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::I16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::U16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::I32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::U32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            NpyData::U64(v) => v.iter().map(|&x| x as f64).collect(),
            NpyData::F16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            NpyData::F64(v) => v.clone(),
            NpyData::Str(_) => return None,
        })
    }

    /// Integer values as `i64`; `None` for floats, strings, or a `u64` above `i64::MAX`.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        Some(match self {
            NpyData::Bool(v) => v.iter().map(|&b| i64::from(b)).collect(),
            NpyData::U8(v) => v.iter().map(|&x| i64::from(x)).collect(),
            NpyData::I8(v) => v.iter().map(|&x| i64::from(x)).collect(),
            NpyData::I16(v) => v.iter().map(|&x| i64::from(x)).collect(),
            NpyData::U16(v) => v.iter().map(|&x| i64::from(x)).collect(),
            NpyData::I32(v) => v.iter().map(|&x| i64::from(x)).collect(),
            NpyData::U32(v) => v.iter().map(|&x| i64::from(x)).collect(),
            NpyData::I64(v) => v.clone(),
            NpyData::U64(v) => v
                .iter()
                .map(|&x| i64::try_from(x).ok())
                .collect::<Option<Vec<_>>>()?,
            _ => return None,
        })
    }

    /// True where the value is nonzero (NaN counts as nonzero, as in numpy); `None` for strings.
    pub fn nonzero_mask(&self) -> Option<Vec<bool>> {
        Some(match self {
            NpyData::Bool(v) => v.clone(),
            NpyData::U8(v) => v.iter().map(|&x| x != 0).collect(),
            NpyData::I8(v) => v.iter().map(|&x| x != 0).collect(),
            NpyData::I16(v) => v.iter().map(|&x| x != 0).collect(),
            NpyData::U16(v) => v.iter().map(|&x| x != 0).collect(),
            NpyData::I32(v) => v.iter().map(|&x| x != 0).collect(),
            NpyData::U32(v) => v.iter().map(|&x| x != 0).collect(),
            NpyData::I64(v) => v.iter().map(|&x| x != 0).collect(),
            NpyData::U64(v) => v.iter().map(|&x| x != 0).collect(),
            NpyData::F16(v) => v.iter().map(|&x| f32::from(x) != 0.0).collect(),
            NpyData::F32(v) => v.iter().map(|&x| x != 0.0).collect(),
            NpyData::F64(v) => v.iter().map(|&x| x != 0.0).collect(),
            NpyData::Str(_) => return None,
        })
    }
}

fn str_width(v: &[String]) -> usize {
    v.iter()
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(0)
        .max(1)
}

/// An n-dimensional array: `shape` plus the elements in C order. A 0-d array has `shape == []` and one element.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

impl NpyArray {
    /// Builds an array, checking that the number of elements matches the shape.
    pub fn new(shape: Vec<usize>, data: NpyData) -> Result<Self, String> {
        let expected = shape_len(&shape).ok_or_else(|| format!("shape {shape:?} overflows"))?;
        if expected != data.len() {
            return Err(format!(
                "shape {shape:?} needs {expected} elements, got {}",
                data.len()
            ));
        }
        Ok(NpyArray { shape, data })
    }

    /// An `f32` array.
    ///
    /// # Panics
    /// When `data.len()` is not the product of `shape` (a programming error, not a data error).
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self::new(shape, NpyData::F32(data)).unwrap_or_else(|e| panic!("NpyArray::f32: {e}"))
    }

    /// A `u8` array.
    ///
    /// # Panics
    /// When `data.len()` is not the product of `shape` (a programming error, not a data error).
    pub fn u8(shape: Vec<usize>, data: Vec<u8>) -> Self {
        Self::new(shape, NpyData::U8(data)).unwrap_or_else(|e| panic!("NpyArray::u8: {e}"))
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Values cast to `f32` as numpy's `astype(np.float32)` does (bool -> 0/1). Strings have no numeric value
    /// and give NaN; use [`NpyData::to_f64`] to detect that case.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            NpyData::Bool(v) => v.iter().map(|&b| f32::from(u8::from(b))).collect(),
            NpyData::U8(v) => v.iter().map(|&x| f32::from(x)).collect(),
            NpyData::I8(v) => v.iter().map(|&x| f32::from(x)).collect(),
            NpyData::I16(v) => v.iter().map(|&x| f32::from(x)).collect(),
            NpyData::U16(v) => v.iter().map(|&x| f32::from(x)).collect(),
            NpyData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::U32(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::U64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::F16(v) => v.iter().map(|&x| f32::from(x)).collect(),
            NpyData::F32(v) => v.clone(),
            NpyData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::Str(v) => vec![f32::NAN; v.len()],
        }
    }

    /// numpy `descr` of the dtype, e.g. `"<f4"`, `"|u1"`, `"|b1"` (see [`NpyData::dtype_str`]).
    pub fn dtype_str(&self) -> &'static str {
        self.data.dtype_str()
    }
}

/// Product of the dimensions, `None` on overflow.
pub(crate) fn shape_len(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Reads a `.npy` file.
pub fn read_npy(path: &Path) -> Result<NpyArray, FormatError> {
    let bytes = std::fs::read(path).map_err(|e| FormatError::io(path, e))?;
    parse_npy(&bytes, path)
}

/// Writes a `.npy` file (see [`encode_npy`]).
pub fn write_npy(path: &Path, arr: &NpyArray) -> Result<(), FormatError> {
    std::fs::write(path, encode_npy(arr)).map_err(|e| FormatError::io(path, e))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Int,
    Uint,
    Float,
    Bytes,
    Unicode,
}

#[derive(Debug, Clone, Copy)]
struct Dtype {
    kind: Kind,
    big_endian: bool,
    /// Bytes per element.
    itemsize: usize,
}

fn parse_descr(descr: &str) -> Result<Dtype, String> {
    let bad = || format!("unsupported dtype descr {descr:?}");
    let (order, rest) = match descr.chars().next() {
        Some(c @ ('<' | '>' | '|' | '=')) => (c, &descr[1..]),
        _ => ('=', descr),
    };
    let big_endian = match order {
        '>' => true,
        '=' => cfg!(target_endian = "big"),
        _ => false,
    };
    let mut chars = rest.chars();
    let kind_char = chars.next().ok_or_else(bad)?;
    let width_str = chars.as_str();
    let width: usize = if width_str.is_empty() && kind_char == '?' {
        1
    } else {
        width_str.parse().map_err(|_| bad())?
    };
    let kind = match kind_char {
        'b' | '?' => Kind::Bool,
        'i' => Kind::Int,
        'u' => Kind::Uint,
        'f' => Kind::Float,
        'S' | 'a' => Kind::Bytes,
        'U' => Kind::Unicode,
        _ => return Err(bad()),
    };
    let itemsize = match kind {
        Kind::Bool if width == 1 => 1,
        Kind::Int | Kind::Uint if matches!(width, 1 | 2 | 4 | 8) => width,
        Kind::Float if matches!(width, 2 | 4 | 8) => width,
        Kind::Bytes => width,
        Kind::Unicode => width.checked_mul(4).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    Ok(Dtype {
        kind,
        big_endian,
        itemsize,
    })
}

/// A value of the header's Python dict literal.
#[derive(Debug, Clone, PartialEq)]
enum PyValue {
    Str(String),
    Bool(bool),
    Tuple(Vec<u64>),
    Other,
}

/// Minimal parser for the Python literal numpy writes as header: a dict with string keys whose values are
/// strings, booleans or tuples of ints. Anything else (e.g. structured dtypes given as lists) is `Other`, so
/// the caller can say precisely what is unsupported.
struct HeaderParser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl<'a> HeaderParser<'a> {
    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.pos).copied()
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        match self.peek() {
            Some(x) if x == c => {
                self.pos += 1;
                Ok(())
            }
            Some(x) => Err(format!(
                "expected {:?} at byte {} of header, found {:?}",
                c as char, self.pos, x as char
            )),
            None => Err(format!("expected {:?}, header ended", c as char)),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a string at byte {} of header", self.pos)),
        };
        self.pos += 1;
        let start = self.pos;
        while self.pos < self.s.len() && self.s[self.pos] != quote {
            if self.s[self.pos] == b'\\' {
                return Err("escape sequences in header strings are not supported".into());
            }
            self.pos += 1;
        }
        if self.pos >= self.s.len() {
            return Err("unterminated string in header".into());
        }
        let out = String::from_utf8_lossy(&self.s[start..self.pos]).into_owned();
        self.pos += 1;
        Ok(out)
    }

    fn int(&mut self) -> Result<u64, String> {
        self.skip_ws();
        let start = self.pos;
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_digit() {
            self.pos += 1;
        }
        if start == self.pos {
            return Err(format!(
                "expected a non-negative integer at byte {start} of header"
            ));
        }
        let text = std::str::from_utf8(&self.s[start..self.pos]).map_err(|e| e.to_string())?;
        let v = text
            .parse::<u64>()
            .map_err(|_| format!("integer {text} out of range"))?;
        // Python 2 wrote longs as `3L`.
        if self.pos < self.s.len() && self.s[self.pos] == b'L' {
            self.pos += 1;
        }
        Ok(v)
    }

    /// Skips a value we do not interpret, keeping brackets balanced.
    fn skip_value(&mut self) -> Result<(), String> {
        let mut depth = 0usize;
        loop {
            match self.peek() {
                None => return Err("header ended inside a value".into()),
                Some(b'\'' | b'"') => {
                    self.string()?;
                }
                Some(b'(' | b'[' | b'{') => {
                    depth += 1;
                    self.pos += 1;
                }
                Some(b')' | b']' | b'}') => {
                    if depth == 0 {
                        return Ok(());
                    }
                    depth -= 1;
                    self.pos += 1;
                }
                Some(b',') if depth == 0 => return Ok(()),
                Some(_) => self.pos += 1,
            }
        }
    }

    fn value(&mut self) -> Result<PyValue, String> {
        match self.peek() {
            Some(b'\'' | b'"') => Ok(PyValue::Str(self.string()?)),
            Some(b'(') => {
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    if self.peek() == Some(b')') {
                        self.pos += 1;
                        break;
                    }
                    items.push(self.int()?);
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b')') => {}
                        _ => return Err("malformed shape tuple in header".into()),
                    }
                }
                Ok(PyValue::Tuple(items))
            }
            Some(_) => {
                let rest = &self.s[self.pos..];
                if rest.starts_with(b"True") {
                    self.pos += 4;
                    Ok(PyValue::Bool(true))
                } else if rest.starts_with(b"False") {
                    self.pos += 5;
                    Ok(PyValue::Bool(false))
                } else {
                    self.skip_value()?;
                    Ok(PyValue::Other)
                }
            }
            None => Err("header ended where a value was expected".into()),
        }
    }

    fn dict(&mut self) -> Result<Vec<(String, PyValue)>, String> {
        self.expect(b'{')?;
        let mut out = Vec::new();
        loop {
            if self.peek() == Some(b'}') {
                self.pos += 1;
                break;
            }
            let key = self.string()?;
            self.expect(b':')?;
            let value = self.value()?;
            out.push((key, value));
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {}
                _ => {
                    return Err(format!(
                        "expected ',' or '}}' at byte {} of header",
                        self.pos
                    ))
                }
            }
        }
        if self.peek().is_some() {
            return Err("unexpected text after the header dict".into());
        }
        Ok(out)
    }
}

#[derive(Debug)]
struct Header {
    dtype: Dtype,
    fortran_order: bool,
    shape: Vec<usize>,
}

fn parse_header(text: &[u8]) -> Result<Header, String> {
    let entries = HeaderParser { s: text, pos: 0 }.dict()?;
    let get = |k: &str| entries.iter().find(|(key, _)| key == k).map(|(_, v)| v);
    let descr = match get("descr") {
        Some(PyValue::Str(s)) => s.clone(),
        Some(_) => return Err("structured/compound dtypes are not supported".into()),
        None => return Err("header has no 'descr'".into()),
    };
    let fortran_order = match get("fortran_order") {
        Some(PyValue::Bool(b)) => *b,
        Some(_) => return Err("'fortran_order' is not a bool".into()),
        None => return Err("header has no 'fortran_order'".into()),
    };
    let shape = match get("shape") {
        Some(PyValue::Tuple(t)) => t
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| format!("dimension {d} too large")))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err("'shape' is not a tuple of integers".into()),
        None => return Err("header has no 'shape'".into()),
    };
    Ok(Header {
        dtype: parse_descr(&descr)?,
        fortran_order,
        shape,
    })
}

/// Parses the bytes of a `.npy` file. `name` is used only in error messages.
pub fn parse_npy(bytes: &[u8], name: &Path) -> Result<NpyArray, FormatError> {
    let err = |reason: String| FormatError::Npy {
        path: name.to_path_buf(),
        reason,
    };
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(err(
            "bad magic: not a .npy file (expected \\x93NUMPY)".into()
        ));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, header_start): (usize, usize) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(err("file ends inside the header length".into()));
            }
            let n = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            let n = usize::try_from(n).map_err(|_| err("header length too large".into()))?;
            (n, 12)
        }
        _ => return Err(err(format!("unsupported format version {major}.{minor}"))),
    };
    let data_start = header_start
        .checked_add(header_len)
        .ok_or_else(|| err("header length overflows".into()))?;
    if bytes.len() < data_start {
        return Err(err(format!(
            "truncated header: declares {header_len} bytes, file has {}",
            bytes.len() - header_start
        )));
    }
    let header_bytes = &bytes[header_start..data_start];
    // Versions 1 and 2 encode the header as Latin-1, version 3 as UTF-8; the parts we interpret are ASCII.
    if major == 3 && std::str::from_utf8(header_bytes).is_err() {
        return Err(err("version 3.0 header is not valid UTF-8".into()));
    }
    let header = parse_header(header_bytes).map_err(|r| err(format!("bad header: {r}")))?;

    let count = shape_len(&header.shape)
        .ok_or_else(|| err(format!("shape {:?} overflows", header.shape)))?;
    let nbytes = count
        .checked_mul(header.dtype.itemsize)
        .ok_or_else(|| err(format!("shape {:?} overflows", header.shape)))?;
    let payload = &bytes[data_start..];
    if payload.len() < nbytes {
        return Err(err(format!(
            "truncated data: shape {:?} of {} bytes per element needs {nbytes} bytes, file has {}",
            header.shape,
            header.dtype.itemsize,
            payload.len()
        )));
    }
    if payload.len() > nbytes {
        return Err(err(format!(
            "{} unexpected bytes after the data of shape {:?}",
            payload.len() - nbytes,
            header.shape
        )));
    }
    let data = decode_data(payload, header.dtype).map_err(err)?;
    let data = if header.fortran_order && header.shape.len() > 1 {
        fortran_to_c(data, &header.shape)
    } else {
        data
    };
    Ok(NpyArray {
        shape: header.shape,
        data,
    })
}

macro_rules! decode_num {
    ($payload:expr, $big:expr, $t:ty, $n:literal) => {{
        let it = $payload.chunks_exact($n).map(|c| {
            let mut a = [0u8; $n];
            a.copy_from_slice(c);
            a
        });
        if $big {
            it.map(<$t>::from_be_bytes).collect::<Vec<$t>>()
        } else {
            it.map(<$t>::from_le_bytes).collect::<Vec<$t>>()
        }
    }};
}

fn decode_data(payload: &[u8], dt: Dtype) -> Result<NpyData, String> {
    let be = dt.big_endian;
    Ok(match (dt.kind, dt.itemsize) {
        (Kind::Bool, _) => NpyData::Bool(payload.iter().map(|&b| b != 0).collect()),
        (Kind::Uint, 1) => NpyData::U8(payload.to_vec()),
        (Kind::Int, 1) => NpyData::I8(payload.iter().map(|&b| b as i8).collect()),
        (Kind::Int, 2) => NpyData::I16(decode_num!(payload, be, i16, 2)),
        (Kind::Uint, 2) => NpyData::U16(decode_num!(payload, be, u16, 2)),
        (Kind::Int, 4) => NpyData::I32(decode_num!(payload, be, i32, 4)),
        (Kind::Uint, 4) => NpyData::U32(decode_num!(payload, be, u32, 4)),
        (Kind::Int, 8) => NpyData::I64(decode_num!(payload, be, i64, 8)),
        (Kind::Uint, 8) => NpyData::U64(decode_num!(payload, be, u64, 8)),
        (Kind::Float, 2) => NpyData::F16(
            decode_num!(payload, be, u16, 2)
                .into_iter()
                .map(f16::from_bits)
                .collect(),
        ),
        (Kind::Float, 4) => NpyData::F32(decode_num!(payload, be, f32, 4)),
        (Kind::Float, 8) => NpyData::F64(decode_num!(payload, be, f64, 8)),
        (Kind::Bytes, 0) => NpyData::Str(Vec::new()),
        (Kind::Bytes, n) => NpyData::Str(
            payload
                .chunks_exact(n)
                .map(|c| {
                    let end = c.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                    let c = &c[..end];
                    match std::str::from_utf8(c) {
                        Ok(s) => s.to_string(),
                        Err(_) => c.iter().map(|&b| char::from(b)).collect(),
                    }
                })
                .collect(),
        ),
        (Kind::Unicode, 0) => NpyData::Str(Vec::new()),
        (Kind::Unicode, n) => {
            let mut out = Vec::with_capacity(payload.len() / n);
            for c in payload.chunks_exact(n) {
                let units = decode_num!(c, be, u32, 4);
                let end = units.iter().rposition(|&u| u != 0).map_or(0, |i| i + 1);
                let s = units[..end]
                    .iter()
                    .map(|&u| char::from_u32(u).ok_or_else(|| format!("invalid code point {u:#x}")))
                    .collect::<Result<String, _>>()?;
                out.push(s);
            }
            NpyData::Str(out)
        }
        (k, n) => return Err(format!("unsupported dtype {k:?} of {n} bytes")),
    })
}

/// Reorders Fortran-order elements (first axis fastest) into C order (last axis fastest).
pub(crate) fn transpose_fortran<T: Clone>(src: &[T], shape: &[usize]) -> Vec<T> {
    let n = src.len();
    if n == 0 {
        return Vec::new();
    }
    let nd = shape.len();
    let mut fstride = vec![1usize; nd];
    for k in 1..nd {
        fstride[k] = fstride[k - 1] * shape[k - 1];
    }
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; nd];
    let mut off = 0usize;
    for _ in 0..n {
        out.push(src[off].clone());
        // Odometer over C order: bump the last axis, carrying into earlier ones.
        for k in (0..nd).rev() {
            idx[k] += 1;
            off += fstride[k];
            if idx[k] < shape[k] {
                break;
            }
            off -= fstride[k] * shape[k];
            idx[k] = 0;
        }
    }
    out
}

/// Reorders C-order elements (last axis fastest) into Fortran order (first axis fastest).
pub(crate) fn transpose_to_fortran<T: Clone + Default>(src: &[T], shape: &[usize]) -> Vec<T> {
    let n = src.len();
    let nd = shape.len();
    let mut fstride = vec![1usize; nd];
    for k in 1..nd {
        fstride[k] = fstride[k - 1] * shape[k - 1];
    }
    let mut out = vec![T::default(); n];
    let mut idx = vec![0usize; nd];
    let mut off = 0usize;
    for v in src {
        out[off] = v.clone();
        for k in (0..nd).rev() {
            idx[k] += 1;
            off += fstride[k];
            if idx[k] < shape[k] {
                break;
            }
            off -= fstride[k] * shape[k];
            idx[k] = 0;
        }
    }
    out
}

fn fortran_to_c(data: NpyData, shape: &[usize]) -> NpyData {
    match data {
        NpyData::Bool(v) => NpyData::Bool(transpose_fortran(&v, shape)),
        NpyData::U8(v) => NpyData::U8(transpose_fortran(&v, shape)),
        NpyData::I8(v) => NpyData::I8(transpose_fortran(&v, shape)),
        NpyData::I16(v) => NpyData::I16(transpose_fortran(&v, shape)),
        NpyData::U16(v) => NpyData::U16(transpose_fortran(&v, shape)),
        NpyData::I32(v) => NpyData::I32(transpose_fortran(&v, shape)),
        NpyData::U32(v) => NpyData::U32(transpose_fortran(&v, shape)),
        NpyData::I64(v) => NpyData::I64(transpose_fortran(&v, shape)),
        NpyData::U64(v) => NpyData::U64(transpose_fortran(&v, shape)),
        NpyData::F16(v) => NpyData::F16(transpose_fortran(&v, shape)),
        NpyData::F32(v) => NpyData::F32(transpose_fortran(&v, shape)),
        NpyData::F64(v) => NpyData::F64(transpose_fortran(&v, shape)),
        NpyData::Str(v) => NpyData::Str(transpose_fortran(&v, shape)),
    }
}

fn shape_literal(shape: &[usize]) -> String {
    match shape {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            format!("({})", parts.join(", "))
        }
    }
}

/// Encodes an array as a `.npy` file: little-endian, C order, format version 1.0 (2.0 if the header does not
/// fit in 65535 bytes). The header is padded so the data starts on a 64-byte boundary, as numpy does.
pub fn encode_npy(arr: &NpyArray) -> Vec<u8> {
    let dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
        arr.data.descr(),
        shape_literal(&arr.shape)
    );
    // +1 for the terminating newline.
    let unpadded_v1 = 10 + dict.len() + 1;
    let (version, prefix) = if unpadded_v1.div_ceil(64) * 64 - 10 <= usize::from(u16::MAX) {
        (1u8, 10usize)
    } else {
        (2u8, 12usize)
    };
    let total = (prefix + dict.len() + 1).div_ceil(64) * 64;
    let header_len = total - prefix;
    let mut out = Vec::with_capacity(total + arr.len() * 8);
    out.extend_from_slice(MAGIC);
    out.push(version);
    out.push(0);
    if version == 1 {
        // Checked above to fit.
        out.extend_from_slice(&(header_len as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header_len as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    encode_data(&arr.data, &mut out);
    out
}

fn encode_data(data: &NpyData, out: &mut Vec<u8>) {
    match data {
        NpyData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        NpyData::U8(v) => out.extend_from_slice(v),
        NpyData::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        NpyData::I16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        NpyData::U16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        NpyData::I32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        NpyData::U32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        NpyData::I64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        NpyData::U64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        NpyData::F16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_bits().to_le_bytes())),
        NpyData::F32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        NpyData::F64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        NpyData::Str(v) => {
            let width = str_width(v);
            for s in v {
                let mut n = 0;
                for c in s.chars() {
                    out.extend_from_slice(&u32::from(c).to_le_bytes());
                    n += 1;
                }
                out.resize(out.len() + (width - n) * 4, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("t.npy")
    }

    #[test]
    fn round_trip_all_dtypes() {
        let arrays = vec![
            NpyArray::new(vec![2, 2], NpyData::Bool(vec![true, false, false, true])).unwrap(),
            NpyArray::u8(vec![3], vec![1, 2, 255]),
            NpyArray::new(vec![2], NpyData::I8(vec![-128, 127])).unwrap(),
            NpyArray::new(vec![2], NpyData::I16(vec![-300, 300])).unwrap(),
            NpyArray::new(vec![1], NpyData::U16(vec![65535])).unwrap(),
            NpyArray::new(vec![2], NpyData::I32(vec![i32::MIN, 7])).unwrap(),
            NpyArray::new(vec![1], NpyData::U32(vec![u32::MAX])).unwrap(),
            NpyArray::new(vec![1], NpyData::I64(vec![i64::MIN])).unwrap(),
            NpyArray::new(vec![1], NpyData::U64(vec![u64::MAX])).unwrap(),
            NpyArray::new(vec![1], NpyData::F16(vec![f16::from_f32(1.5)])).unwrap(),
            NpyArray::f32(vec![], vec![3.25]),
            NpyArray::new(vec![0, 4], NpyData::F64(vec![])).unwrap(),
            NpyArray::new(
                vec![3],
                NpyData::Str(vec!["csr".into(), "".into(), "héllo".into()]),
            )
            .unwrap(),
        ];
        for a in arrays {
            let bytes = encode_npy(&a);
            let b = parse_npy(&bytes, p()).unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn header_is_64_aligned() {
        let a = NpyArray::f32(vec![2, 3], vec![0.0; 6]);
        let bytes = encode_npy(&a);
        assert_eq!((bytes.len() - 24) % 64, 0);
        assert_eq!(bytes[6], 1);
    }

    #[test]
    fn long_header_uses_version_2() {
        let shape = vec![1usize; 30000];
        let a = NpyArray::u8(shape.clone(), vec![9]);
        let bytes = encode_npy(&a);
        assert_eq!(bytes[6], 2);
        assert_eq!((bytes.len() - 1) % 64, 0);
        assert_eq!(parse_npy(&bytes, p()).unwrap(), a);
    }

    #[test]
    fn fortran_transpose_matches_index_formula() {
        let shape = [2usize, 3, 4];
        // Fortran element at (i, j, k) holds i*100 + j*10 + k, stored at i + 2*(j + 3*k).
        let mut f = vec![0i32; 24];
        for i in 0..2 {
            for j in 0..3 {
                for k in 0..4 {
                    f[i + 2 * (j + 3 * k)] = (i * 100 + j * 10 + k) as i32;
                }
            }
        }
        let c = transpose_fortran(&f, &shape);
        assert_eq!(transpose_to_fortran(&c, &shape), f);
        for i in 0..2 {
            for j in 0..3 {
                for k in 0..4 {
                    assert_eq!(c[(i * 3 + j) * 4 + k], (i * 100 + j * 10 + k) as i32);
                }
            }
        }
    }

    #[test]
    fn header_parser_accepts_python2_longs_and_rejects_structured() {
        let h =
            parse_header(b"{'descr': '>i4', 'fortran_order': True, 'shape': (3L, 4L), }").unwrap();
        assert_eq!(h.shape, vec![3, 4]);
        assert!(h.fortran_order && h.dtype.big_endian);
        let e = parse_header(b"{'descr': [('a', '<i4')], 'fortran_order': False, 'shape': (1,), }");
        assert!(e.unwrap_err().contains("structured"));
    }
}
