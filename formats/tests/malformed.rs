//! One test per malformed input: each asserts the error variant and that the message names the file (or,
//! for paths, the offending value). Inputs are built here from valid encodings, then damaged.

use std::path::Path;

use m3d_formats::nifti::{read_nifti, write_nifti, NiftiDtype};
use m3d_formats::npy::{encode_npy, read_npy, NpyArray, NpyData};
use m3d_formats::npz::write_npz;
use m3d_formats::paths::safe_join;
use m3d_formats::slice::decode_slice;
use m3d_formats::sparse::{read_csr_npz, read_mask_npz, write_csr_npz, CsrMatrix};
use m3d_formats::FormatError;

fn names(e: &FormatError, file: &Path) {
    let name = file.file_name().unwrap().to_str().unwrap();
    assert!(
        e.to_string().contains(name),
        "message does not name {name}: {e}"
    );
}

fn gradient_rgb(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
    })
}

#[test]
fn corrupt_png() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("slice_7.png");
    gradient_rgb(40, 30).save(&p).unwrap();
    assert!(decode_slice(&p).is_ok(), "undamaged PNG must decode");
    let mut bytes = std::fs::read(&p).unwrap();
    let idat = bytes.windows(4).position(|w| w == b"IDAT").unwrap();
    for b in &mut bytes[idat + 8..idat + 20] {
        *b ^= 0x5a;
    }
    std::fs::write(&p, &bytes).unwrap();
    let e = decode_slice(&p).unwrap_err();
    assert!(matches!(e, FormatError::Image { .. }), "{e:?}");
    names(&e, &p);
}

#[test]
fn truncated_jpeg() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("12.jpeg");
    let img = image::DynamicImage::ImageRgb8(gradient_rgb(64, 48));
    img.save_with_format(&p, image::ImageFormat::Jpeg).unwrap();
    assert!(decode_slice(&p).is_ok(), "undamaged JPEG must decode");
    let bytes = std::fs::read(&p).unwrap();
    // Cut inside the scan, and also just before the end-of-image marker.
    for cut in [bytes.len() * 3 / 5, bytes.len() - 2] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = decode_slice(&p).unwrap_err();
        assert!(matches!(e, FormatError::Image { .. }), "{e:?}");
        names(&e, &p);
    }
}

#[test]
fn truncated_npy() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("Axial_non_contrast.npy");
    let bytes = encode_npy(&NpyArray::f32(
        vec![4, 5],
        (0..20).map(|v| v as f32).collect(),
    ));
    std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
    let e = read_npy(&p).unwrap_err();
    assert!(matches!(e, FormatError::Npy { .. }), "{e:?}");
    assert!(e.to_string().contains("truncated"), "{e}");
    names(&e, &p);
    // Truncated inside the header as well.
    std::fs::write(&p, &bytes[..30]).unwrap();
    let e = read_npy(&p).unwrap_err();
    assert!(matches!(e, FormatError::Npy { .. }), "{e:?}");
    names(&e, &p);
}

#[test]
fn npy_with_bad_magic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("image.npy");
    let mut bytes = encode_npy(&NpyArray::u8(vec![3], vec![1, 2, 3]));
    bytes[1] = b'X';
    std::fs::write(&p, &bytes).unwrap();
    let e = read_npy(&p).unwrap_err();
    assert!(matches!(e, FormatError::Npy { .. }), "{e:?}");
    assert!(e.to_string().contains("magic"), "{e}");
    names(&e, &p);
}

#[test]
fn npy_with_bad_header() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("hdr.npy");
    let mut bytes = encode_npy(&NpyArray::u8(vec![3], vec![1, 2, 3]));
    let at = bytes.windows(5).position(|w| w == b"shape").unwrap();
    bytes[at..at + 5].copy_from_slice(b"shaqe");
    std::fs::write(&p, &bytes).unwrap();
    let e = read_npy(&p).unwrap_err();
    assert!(
        matches!(e, FormatError::Npy { .. }) && e.to_string().contains("shape"),
        "{e}"
    );
    names(&e, &p);
}

#[test]
fn mask_npz_disagreeing_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let dense: Vec<u8> = (0..2 * 60).map(|i| u8::from(i % 7 == 0)).collect();
    let m = CsrMatrix::from_dense_u8(2, 60, &dense);
    // 3 * 4 * 6 = 72 columns expected by the name, 60 stored.
    let p = dir.path().join("mask_(2, 3, 4, 6).npz");
    write_csr_npz(&p, &m).unwrap();
    let e = read_mask_npz(&p).unwrap_err();
    assert!(matches!(e, FormatError::ShapeMismatch { .. }), "{e:?}");
    names(&e, &p);
    // Shape right, but a column index beyond the row length.
    let mut m72 = CsrMatrix::from_dense_u8(2, 72, &[dense.clone(), vec![0; 24]].concat());
    let last = m72.indices.len() - 1;
    m72.indices[last] = 72;
    let p = dir.path().join("mask_(2, 4, 3, 6).npz");
    write_csr_npz(&p, &m72).unwrap();
    let e = read_mask_npz(&p).unwrap_err();
    assert!(matches!(e, FormatError::ShapeMismatch { .. }), "{e:?}");
    names(&e, &p);
    // Class count in the name differs from the matrix rows.
    let p = dir.path().join("mask_(3, 3, 4, 5).npz");
    write_csr_npz(&p, &m).unwrap();
    let e = read_mask_npz(&p).unwrap_err();
    assert!(matches!(e, FormatError::ShapeMismatch { .. }), "{e:?}");
    names(&e, &p);
}

#[test]
fn npz_that_is_not_csr() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mask_(1, 2, 2, 2).npz");
    let fmt = NpyArray::new(vec![], NpyData::Str(vec!["coo".into()])).unwrap();
    let shape = NpyArray::new(vec![2], NpyData::I64(vec![1, 8])).unwrap();
    let row = NpyArray::new(vec![1], NpyData::I32(vec![0])).unwrap();
    let data = NpyArray::u8(vec![1], vec![1]);
    write_npz(
        &p,
        &[
            ("row", &row),
            ("col", &row),
            ("format", &fmt),
            ("shape", &shape),
            ("data", &data),
        ],
        true,
    )
    .unwrap();
    let e = read_csr_npz(&p).unwrap_err();
    assert!(matches!(e, FormatError::Sparse { .. }), "{e:?}");
    assert!(e.to_string().contains("\"coo\""), "{e}");
    names(&e, &p);
    let e = read_mask_npz(&p).unwrap_err();
    assert!(matches!(e, FormatError::Sparse { .. }), "{e:?}");
    // A plain array archive, no sparse members at all.
    let p = dir.path().join("plain.npz");
    write_npz(&p, &[("x", &data)], false).unwrap();
    let e = read_csr_npz(&p).unwrap_err();
    assert!(matches!(e, FormatError::Sparse { .. }), "{e:?}");
    names(&e, &p);
}

#[test]
fn npz_that_is_not_a_zip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("junk.npz");
    std::fs::write(&p, b"PK\x03\x04 definitely not a zip").unwrap();
    let e = m3d_formats::npz::read_npz(&p).unwrap_err();
    assert!(matches!(e, FormatError::Npz { .. }), "{e:?}");
    names(&e, &p);
}

#[test]
fn nifti_with_broken_header() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("ct.nii");
    write_nifti(&good, &[4, 4, 4], &[0.0; 64], NiftiDtype::I16, [1.0; 3]).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    assert!(read_nifti(&good).is_ok());

    // (file name, byte offset in the header, replacement bytes)
    let damage = [
        ("sizeof_hdr.nii", 0, 999i32.to_le_bytes().to_vec()),
        ("magic.nii", 344, b"xyz\0".to_vec()),
        ("dim0.nii", 40, 9i16.to_le_bytes().to_vec()),
        ("datatype.nii", 70, 128i16.to_le_bytes().to_vec()),
    ];
    for (name, at, patch) in damage {
        let mut b = bytes.clone();
        b[at..at + patch.len()].copy_from_slice(&patch);
        let p = dir.path().join(name);
        std::fs::write(&p, &b).unwrap();
        let e = read_nifti(&p).unwrap_err();
        assert!(matches!(e, FormatError::Nifti { .. }), "{name}: {e:?}");
        names(&e, &p);
    }
    // Header cut short, data cut short, and a gzip stream cut short.
    let p = dir.path().join("short_header.nii");
    std::fs::write(&p, &bytes[..200]).unwrap();
    let e = read_nifti(&p).unwrap_err();
    assert!(matches!(e, FormatError::Nifti { .. }), "{e:?}");
    names(&e, &p);
    let p = dir.path().join("short_data.nii");
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    let e = read_nifti(&p).unwrap_err();
    assert!(
        matches!(e, FormatError::Nifti { .. }) && e.to_string().contains("truncated"),
        "{e}"
    );
    names(&e, &p);
    let gz = dir.path().join("ct.nii.gz");
    write_nifti(&gz, &[4, 4, 4], &[1.0; 64], NiftiDtype::F32, [1.0; 3]).unwrap();
    let b = std::fs::read(&gz).unwrap();
    let p = dir.path().join("cut.nii.gz");
    std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    let e = read_nifti(&p).unwrap_err();
    assert!(matches!(e, FormatError::Nifti { .. }), "{e:?}");
    names(&e, &p);
}

#[test]
fn safe_join_rejects_escapes() {
    let root = Path::new("/data/M3D_Cap");
    for bad in [
        "../etc/passwd",
        "ct_case/../../secret",
        "/etc/passwd",
        "",
        "ct_case/..",
    ] {
        let e = safe_join(root, bad).unwrap_err();
        assert!(
            matches!(e, FormatError::UnsafePath { .. }),
            "{bad:?}: {e:?}"
        );
        assert!(
            e.to_string().contains(&format!("{bad:?}")),
            "message must quote {bad:?}: {e}"
        );
    }
    assert_eq!(
        safe_join(root, "ct_case/000006/Axial_non_contrast.npy").unwrap(),
        root.join("ct_case/000006/Axial_non_contrast.npy")
    );
}
