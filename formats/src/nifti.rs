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
    /// `pixdim[1..=3]`: voxel spacing along the first three axes (also in `space`).
    pub pixdim: [f32; 3],
    /// The header's spatial fields: where the voxels lie in the world.
    pub space: NiftiSpace,
}

/// The spatial fields of a NIfTI header (NIfTI-2 values rounded to `f32`), everything a volume needs to overlay
/// another in a viewer.
#[derive(Debug, Clone, PartialEq)]
pub struct NiftiSpace {
    /// `pixdim[1..=3]`.
    pub pixdim: [f32; 3],
    /// `pixdim[0]`: the qform's handedness (`-1` flips the third axis; `0` counts as `1`).
    pub qfac: f32,
    pub xyzt_units: u8,
    pub qform_code: i16,
    /// `quatern_b`, `quatern_c`, `quatern_d`.
    pub quatern: [f32; 3],
    /// `qoffset_x`, `qoffset_y`, `qoffset_z`.
    pub qoffset: [f32; 3],
    pub sform_code: i16,
    /// `srow_x`, `srow_y`, `srow_z`.
    pub srow: [[f32; 4]; 3],
}

impl NiftiSpace {
    /// Millimetre voxels of `pixdim` on the axes: no qform, an aligned sform `diag(pixdim)`.
    pub fn diagonal(pixdim: [f32; 3]) -> NiftiSpace {
        let mut srow = [[0.0; 4]; 3];
        for (i, row) in srow.iter_mut().enumerate() {
            row[i] = pixdim[i];
        }
        NiftiSpace {
            pixdim,
            qfac: 1.0,
            xyzt_units: 2,
            qform_code: 0,
            quatern: [0.0; 3],
            qoffset: [0.0; 3],
            sform_code: 2,
            srow,
        }
    }

    /// The voxel-to-world affine a viewer uses: the sform when `sform_code > 0`, else the qform when
    /// `qform_code > 0`, else `diag(pixdim)` (NIfTI's "method 1").
    pub fn affine(&self) -> [[f64; 4]; 4] {
        let mut a = [[0.0; 4]; 4];
        a[3][3] = 1.0;
        if self.sform_code > 0 {
            for (row, src) in a.iter_mut().zip(&self.srow) {
                *row = src.map(f64::from);
            }
        } else if self.qform_code > 0 {
            let [b, c, d] = self.quatern.map(f64::from);
            let aa = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
            let r = [
                [
                    aa * aa + b * b - c * c - d * d,
                    2.0 * (b * c - aa * d),
                    2.0 * (b * d + aa * c),
                ],
                [
                    2.0 * (b * c + aa * d),
                    aa * aa + c * c - b * b - d * d,
                    2.0 * (c * d - aa * b),
                ],
                [
                    2.0 * (b * d - aa * c),
                    2.0 * (c * d + aa * b),
                    aa * aa + d * d - c * c - b * b,
                ],
            ];
            let qfac = if self.qfac < 0.0 { -1.0 } else { 1.0 };
            let scale = [
                f64::from(self.pixdim[0]),
                f64::from(self.pixdim[1]),
                qfac * f64::from(self.pixdim[2]),
            ];
            for ((row, rot), offset) in a.iter_mut().zip(&r).zip(self.qoffset) {
                for j in 0..3 {
                    row[j] = rot[j] * scale[j];
                }
                row[3] = f64::from(offset);
            }
        } else {
            for (i, (row, spacing)) in a.iter_mut().zip(self.pixdim).enumerate() {
                row[i] = f64::from(spacing);
            }
        }
        a
    }
}

/// NIfTI-1 byte offsets of the spatial fields (`nifti1.h`).
mod n1 {
    pub const PIXDIM0: usize = 76;
    pub const XYZT_UNITS: usize = 123;
    pub const QFORM_CODE: usize = 252;
    pub const SFORM_CODE: usize = 254;
    pub const QUATERN_B: usize = 256;
    pub const QOFFSET_X: usize = 268;
    pub const SROW_X: usize = 280;
    pub const PIXDIM1: usize = 80;
}

/// NIfTI-2 byte offsets of the same fields (`nifti2.h`; doubles and 32-bit codes).
mod n2 {
    pub const PIXDIM0: usize = 104;
    pub const QFORM_CODE: usize = 344;
    pub const SFORM_CODE: usize = 348;
    pub const QUATERN_B: usize = 352;
    pub const QOFFSET_X: usize = 376;
    pub const SROW_X: usize = 400;
    pub const XYZT_UNITS: usize = 500;
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

/// The spatial fields of a `.nii` / `.nii.gz` (NIfTI-1 or -2, either byte order); only the header is read (and
/// decompressed).
pub fn read_nifti_space(path: &Path) -> Result<NiftiSpace, FormatError> {
    let file = std::fs::File::open(path).map_err(|e| FormatError::io(path, e))?;
    let mut reader = std::io::BufReader::new(file);
    // Peek, not consume: gzip is told from the content, as `read_nifti` tells it.
    let gz = std::io::BufRead::fill_buf(&mut reader)
        .map_err(|e| FormatError::io(path, e))?
        .starts_with(&[0x1f, 0x8b]);
    let head: Box<dyn Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    // A NIfTI-2 header and the NIfTI-1 magic fit in 540 bytes.
    let mut header = Vec::with_capacity(540);
    head.take(540)
        .read_to_end(&mut header)
        .map_err(|e| nerr(path, format!("reading the header: {e}")))?;
    Ok(parse_header(&header, path)?.space)
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
    space: NiftiSpace,
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
    fn i32(&self, off: usize) -> i32 {
        i32::from_le_bytes(self.arr(off))
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
            space: NiftiSpace {
                pixdim: [0, 1, 2].map(|i| f.f32(n1::PIXDIM1 + 4 * i) as f32),
                qfac: f.f32(n1::PIXDIM0) as f32,
                xyzt_units: b[n1::XYZT_UNITS],
                qform_code: f.i16(n1::QFORM_CODE),
                quatern: [0, 1, 2].map(|i| f.f32(n1::QUATERN_B + 4 * i) as f32),
                qoffset: [0, 1, 2].map(|i| f.f32(n1::QOFFSET_X + 4 * i) as f32),
                sform_code: f.i16(n1::SFORM_CODE),
                srow: [0, 1, 2]
                    .map(|r| [0, 1, 2, 3].map(|k| f.f32(n1::SROW_X + 16 * r + 4 * k) as f32)),
            },
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
            // Codes beyond i16 do not exist (0..4); the units fit in the NIfTI-1 byte.
            space: NiftiSpace {
                pixdim: [1, 2, 3].map(|i| f.f64(n2::PIXDIM0 + 8 * i) as f32),
                qfac: f.f64(n2::PIXDIM0) as f32,
                xyzt_units: f.i32(n2::XYZT_UNITS) as u8,
                qform_code: f.i32(n2::QFORM_CODE) as i16,
                quatern: [0, 1, 2].map(|i| f.f64(n2::QUATERN_B + 8 * i) as f32),
                qoffset: [0, 1, 2].map(|i| f.f64(n2::QOFFSET_X + 8 * i) as f32),
                sform_code: f.i32(n2::SFORM_CODE) as i16,
                srow: [0, 1, 2]
                    .map(|r| [0, 1, 2, 3].map(|k| f.f64(n2::SROW_X + 32 * r + 8 * k) as f32)),
            },
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
        space: h.space,
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
    write_nifti_in(
        path,
        shape,
        data_c_order,
        dtype,
        &NiftiSpace::diagonal(pixdim),
    )
}

/// [`write_nifti`] with the spatial fields of `space` (`pixdim`, units, qform and sform), e.g. those of the
/// volume a mask was computed from, so that it overlays that volume in a viewer.
pub fn write_nifti_in(
    path: &Path,
    shape: &[usize],
    data_c_order: &[f32],
    dtype: NiftiDtype,
    space: &NiftiSpace,
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
    pd[0] = space.qfac;
    pd[1..4].copy_from_slice(&space.pixdim);
    for (k, v) in pd.iter().enumerate() {
        put(&mut h, n1::PIXDIM0 + 4 * k, &v.to_le_bytes());
    }
    put(&mut h, 108, &352.0f32.to_le_bytes());
    put(&mut h, 112, &1.0f32.to_le_bytes());
    put(&mut h, 116, &0.0f32.to_le_bytes());
    h[n1::XYZT_UNITS] = space.xyzt_units;
    put(&mut h, n1::QFORM_CODE, &space.qform_code.to_le_bytes());
    put(&mut h, n1::SFORM_CODE, &space.sform_code.to_le_bytes());
    for (i, v) in space.quatern.iter().enumerate() {
        put(&mut h, n1::QUATERN_B + 4 * i, &v.to_le_bytes());
    }
    for (i, v) in space.qoffset.iter().enumerate() {
        put(&mut h, n1::QOFFSET_X + 4 * i, &v.to_le_bytes());
    }
    for (r, row) in space.srow.iter().enumerate() {
        for (k, v) in row.iter().enumerate() {
            put(&mut h, n1::SROW_X + 16 * r + 4 * k, &v.to_le_bytes());
        }
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
