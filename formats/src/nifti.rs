//! NIfTI-1 (and NIfTI-2, read only) volumes, `.nii` or gzip-compressed `.nii.gz`, with the semantics of
//! nibabel's `nib.load(p).get_fdata()`: shape `dim[1..=dim[0]]`, values scaled by `scl_slope`/`scl_inter`
//! (ignored when the slope is 0 or not finite), and the array returned in C order of that numpy array
//! (the file stores it in Fortran order). Our own parser: the header fields involved are few, and owning
//! them keeps the scaling rules and the errors exact.

use std::io::{Read, Write};
use std::path::Path;

use crate::error::FormatError;
use crate::npy::{shape_len, transpose_fortran, transpose_to_fortran};

/// A volume as nibabel's `get_fdata()` sees it (values rounded from float64 to `f32`).
#[derive(Debug, Clone, PartialEq)]
pub struct NiftiVolume {
    /// `dim[1..=dim[0]]`, e.g. `[X, Y, Z]`.
    pub shape: Vec<usize>,
    /// Scaled values in C order: for 3-D, index `((x * Y) + y) * Z + z`.
    pub data: Vec<f32>,
    /// `pixdim[1..=3]`: voxel spacing along the first three axes.
    pub pixdim: [f32; 3],
}

/// Storage types [`write_nifti`] can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NiftiDtype {
    U8,
    I16,
    F32,
}

fn nerr(path: &Path, reason: impl Into<String>) -> FormatError {
    FormatError::Nifti {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn is_gz(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}

/// Reads a `.nii` or `.nii.gz` file (gzip is detected from the content, not the name).
pub fn read_nifti(path: &Path) -> Result<NiftiVolume, FormatError> {
    let raw = std::fs::read(path).map_err(|e| FormatError::io(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| nerr(path, format!("gzip decompression failed: {e}")))?;
        out
    } else {
        raw
    };
    parse_nifti(&bytes, path)
}

/// Fields of either header version that matter for reading the data.
struct Header {
    /// Bytes before the data when `vox_offset` is unset: header plus the 4-byte extension flag.
    min_offset: usize,
    big_endian: bool,
    dims: Vec<i64>,
    datatype: i16,
    pixdim: [f64; 3],
    vox_offset: f64,
    slope: f64,
    inter: f64,
}

struct Fields<'a> {
    b: &'a [u8],
    be: bool,
}

impl Fields<'_> {
    fn arr<const N: usize>(&self, off: usize) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.b[off..off + N]);
        if self.be {
            a.reverse();
        }
        a
    }
    fn i16(&self, off: usize) -> i16 {
        i16::from_le_bytes(self.arr(off))
    }
    fn i64(&self, off: usize) -> i64 {
        i64::from_le_bytes(self.arr(off))
    }
    fn f32(&self, off: usize) -> f64 {
        f64::from(f32::from_le_bytes(self.arr(off)))
    }
    fn f64(&self, off: usize) -> f64 {
        f64::from_le_bytes(self.arr(off))
    }
}

fn parse_header(b: &[u8], path: &Path) -> Result<Header, FormatError> {
    if b.len() < 4 {
        return Err(nerr(
            path,
            format!("file of {} bytes has no header", b.len()),
        ));
    }
    let le = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let be = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let (version, big_endian) = match (le, be) {
        (348, _) => (1, false),
        (_, 348) => (1, true),
        (540, _) => (2, false),
        (_, 540) => (2, true),
        _ => {
            return Err(nerr(
                path,
                format!("sizeof_hdr is {le}, expected 348 (NIfTI-1) or 540 (NIfTI-2): broken or not a NIfTI header"),
            ))
        }
    };
    let need = if version == 1 { 348 } else { 540 };
    if b.len() < need {
        return Err(nerr(
            path,
            format!("truncated header: {} of {need} bytes", b.len()),
        ));
    }
    let f = Fields { b, be: big_endian };
    let h = if version == 1 {
        let magic = &b[344..348];
        if magic == b"ni1\0" {
            return Err(nerr(
                path,
                "header/image pair (.hdr/.img) files are not supported, only single-file .nii",
            ));
        }
        if magic != b"n+1\0" {
            return Err(nerr(path, format!("bad magic {magic:?}, expected \"n+1\"")));
        }
        Header {
            min_offset: 352,
            big_endian,
            dims: (0..8).map(|i| i64::from(f.i16(40 + 2 * i))).collect(),
            datatype: f.i16(70),
            pixdim: [f.f32(80), f.f32(84), f.f32(88)],
            vox_offset: f.f32(108),
            slope: f.f32(112),
            inter: f.f32(116),
        }
    } else {
        let magic = &b[4..12];
        if magic != b"n+2\0\r\n\x1a\n" {
            return Err(nerr(path, format!("bad NIfTI-2 magic {magic:?}")));
        }
        Header {
            min_offset: 544,
            big_endian,
            dims: (0..8).map(|i| f.i64(16 + 8 * i)).collect(),
            datatype: f.i16(12),
            pixdim: [f.f64(112), f.f64(120), f.f64(128)],
            vox_offset: f.i64(168) as f64,
            slope: f.f64(176),
            inter: f.f64(184),
        }
    };
    Ok(h)
}

/// Bytes per voxel of the NIfTI datatypes we read.
fn itemsize(datatype: i16) -> Option<usize> {
    Some(match datatype {
        2 | 256 => 1,
        4 | 512 => 2,
        8 | 16 | 768 => 4,
        64 | 1024 | 1280 => 8,
        _ => return None,
    })
}

/// Parses an uncompressed NIfTI file held in memory; `name` is used only in error messages.
pub fn parse_nifti(bytes: &[u8], name: &Path) -> Result<NiftiVolume, FormatError> {
    let h = parse_header(bytes, name)?;
    let ndim = h.dims[0];
    if !(1..=7).contains(&ndim) {
        return Err(nerr(name, format!("dim[0] = {ndim}, expected 1..7")));
    }
    let shape = h.dims[1..=ndim as usize]
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| {
                nerr(
                    name,
                    format!("negative dimension in dim {:?}", &h.dims[..=ndim as usize]),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let size = itemsize(h.datatype).ok_or_else(|| {
        nerr(
            name,
            format!(
                "unsupported datatype code {} (only scalar integer/float types)",
                h.datatype
            ),
        )
    })?;
    let count =
        shape_len(&shape).ok_or_else(|| nerr(name, format!("shape {shape:?} overflows")))?;
    let nbytes = count
        .checked_mul(size)
        .ok_or_else(|| nerr(name, format!("shape {shape:?} overflows")))?;
    if !(h.vox_offset.is_finite() && h.vox_offset >= 0.0) {
        return Err(nerr(name, format!("invalid vox_offset {}", h.vox_offset)));
    }
    // nibabel truncates the float offset; an unset offset in a single file means "right after the header".
    let offset = match h.vox_offset as usize {
        0 => h.min_offset,
        o => o,
    };
    let end = offset
        .checked_add(nbytes)
        .ok_or_else(|| nerr(name, "data size overflows"))?;
    if bytes.len() < end {
        return Err(nerr(
            name,
            format!(
                "truncated data: shape {shape:?} of datatype {} needs {nbytes} bytes from offset {offset}, file has {}",
                h.datatype,
                bytes.len().saturating_sub(offset)
            ),
        ));
    }
    let payload = &bytes[offset..end];
    let mut raw = decode_f64(payload, h.datatype, h.big_endian);
    let scaling = if h.slope != 0.0 && h.slope.is_finite() {
        if !h.inter.is_finite() {
            return Err(nerr(
                name,
                format!(
                    "valid scl_slope {} but invalid scl_inter {}",
                    h.slope, h.inter
                ),
            ));
        }
        Some((h.slope, h.inter))
    } else {
        None
    };
    if let Some((slope, inter)) = scaling {
        // nibabel multiplies and adds in float64 as separate numpy operations, skipping identity steps.
        if slope != 1.0 {
            raw.iter_mut().for_each(|v| *v *= slope);
        }
        if inter != 0.0 {
            raw.iter_mut().for_each(|v| *v += inter);
        }
    }
    let fortran: Vec<f32> = raw.into_iter().map(|v| v as f32).collect();
    let data = if shape.len() > 1 {
        transpose_fortran(&fortran, &shape)
    } else {
        fortran
    };
    Ok(NiftiVolume {
        shape,
        data,
        pixdim: [h.pixdim[0] as f32, h.pixdim[1] as f32, h.pixdim[2] as f32],
    })
}

fn decode_f64(p: &[u8], datatype: i16, be: bool) -> Vec<f64> {
    macro_rules! conv {
        ($t:ty, $n:literal) => {
            p.chunks_exact($n)
                .map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    if be {
                        <$t>::from_be_bytes(a) as f64
                    } else {
                        <$t>::from_le_bytes(a) as f64
                    }
                })
                .collect()
        };
    }
    match datatype {
        2 => p.iter().map(|&x| f64::from(x)).collect(),
        256 => p.iter().map(|&x| f64::from(x as i8)).collect(),
        4 => conv!(i16, 2),
        512 => conv!(u16, 2),
        8 => conv!(i32, 4),
        768 => conv!(u32, 4),
        16 => conv!(f32, 4),
        64 => conv!(f64, 8),
        1024 => conv!(i64, 8),
        1280 => conv!(u64, 8),
        // `itemsize` has already rejected every other code.
        _ => Vec::new(),
    }
}

/// Writes a single-file NIfTI-1 volume (little-endian, `vox_offset` 352, no scaling, sform = diag(pixdim)),
/// gzip-compressed when `path` ends in `.gz`. `data_c_order` is in C order of `shape`, like
/// [`NiftiVolume::data`]. For `U8`/`I16` every value must be an integer in range, so that nibabel reads back
/// exactly the values given; anything else is an error naming the file.
pub fn write_nifti(
    path: &Path,
    shape: &[usize],
    data_c_order: &[f32],
    dtype: NiftiDtype,
    pixdim: [f32; 3],
) -> Result<(), FormatError> {
    if shape.is_empty() || shape.len() > 7 {
        return Err(nerr(
            path,
            format!("cannot write {} dimensions (1..7)", shape.len()),
        ));
    }
    if let Some(d) = shape.iter().find(|&&d| d > i16::MAX as usize) {
        return Err(nerr(
            path,
            format!("dimension {d} exceeds the NIfTI-1 limit of 32767"),
        ));
    }
    if shape_len(shape) != Some(data_c_order.len()) {
        return Err(FormatError::ShapeMismatch {
            path: path.to_path_buf(),
            expected: format!("{shape:?}"),
            found: format!("{} values", data_c_order.len()),
        });
    }
    let (code, bitpix, lo, hi): (i16, i16, f32, f32) = match dtype {
        NiftiDtype::U8 => (2, 8, 0.0, 255.0),
        NiftiDtype::I16 => (4, 16, -32768.0, 32767.0),
        NiftiDtype::F32 => (16, 32, f32::NEG_INFINITY, f32::INFINITY),
    };
    if dtype != NiftiDtype::F32 {
        if let Some((i, v)) = data_c_order
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.fract() == 0.0 && **v >= lo && **v <= hi))
        {
            return Err(nerr(
                path,
                format!("value {v} at index {i} is not representable as {dtype:?}"),
            ));
        }
    }

    let mut h = vec![0u8; 352];
    let put = |h: &mut Vec<u8>, off: usize, b: &[u8]| h[off..off + b.len()].copy_from_slice(b);
    put(&mut h, 0, &348i32.to_le_bytes());
    h[38] = b'r';
    let mut dim = [1i16; 8];
    dim[0] = shape.len() as i16;
    for (k, &d) in shape.iter().enumerate() {
        dim[k + 1] = d as i16;
    }
    for (k, d) in dim.iter().enumerate() {
        put(&mut h, 40 + 2 * k, &d.to_le_bytes());
    }
    put(&mut h, 70, &code.to_le_bytes());
    put(&mut h, 72, &bitpix.to_le_bytes());
    let mut pd = [1.0f32; 8];
    pd[1..4].copy_from_slice(&pixdim);
    for (k, v) in pd.iter().enumerate() {
        put(&mut h, 76 + 4 * k, &v.to_le_bytes());
    }
    put(&mut h, 108, &352.0f32.to_le_bytes());
    put(&mut h, 112, &1.0f32.to_le_bytes());
    put(&mut h, 116, &0.0f32.to_le_bytes());
    h[123] = 2; // xyzt_units: millimetres
    put(&mut h, 254, &2i16.to_le_bytes()); // sform_code: aligned
    for (row, &z) in pixdim.iter().enumerate() {
        put(&mut h, 280 + 16 * row + 4 * row, &z.to_le_bytes());
    }
    put(&mut h, 344, b"n+1\0");

    let fortran = if shape.len() > 1 {
        transpose_to_fortran(data_c_order, shape)
    } else {
        data_c_order.to_vec()
    };
    let mut out = h;
    out.reserve(fortran.len() * usize::from(bitpix.unsigned_abs() / 8));
    match dtype {
        NiftiDtype::U8 => out.extend(fortran.iter().map(|&v| v as u8)),
        NiftiDtype::I16 => fortran
            .iter()
            .for_each(|&v| out.extend_from_slice(&(v as i16).to_le_bytes())),
        NiftiDtype::F32 => fortran
            .iter()
            .for_each(|&v| out.extend_from_slice(&v.to_le_bytes())),
    }
    let file = std::fs::File::create(path).map_err(|e| FormatError::io(path, e))?;
    let mut w = std::io::BufWriter::new(file);
    if is_gz(path) {
        let mut gz = flate2::write::GzEncoder::new(w, flate2::Compression::default());
        gz.write_all(&out).map_err(|e| FormatError::io(path, e))?;
        w = gz.finish().map_err(|e| FormatError::io(path, e))?;
    } else {
        w.write_all(&out).map_err(|e| FormatError::io(path, e))?;
    }
    w.flush().map_err(|e| FormatError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let shape = [2usize, 3, 4];
        let data: Vec<f32> = (0..24).map(|v| v as f32 - 5.0).collect();
        for (name, dt) in [("a.nii", NiftiDtype::I16), ("b.nii.gz", NiftiDtype::F32)] {
            let p = dir.path().join(name);
            write_nifti(&p, &shape, &data, dt, [0.5, 0.7, 2.0]).unwrap();
            let v = read_nifti(&p).unwrap();
            assert_eq!(v.shape, shape);
            assert_eq!(v.data, data);
            assert_eq!(v.pixdim, [0.5, 0.7, 2.0]);
        }
        let e = write_nifti(
            &dir.path().join("c.nii"),
            &shape,
            &data,
            NiftiDtype::U8,
            [1.0; 3],
        );
        assert!(matches!(e, Err(FormatError::Nifti { .. })));
    }
}
