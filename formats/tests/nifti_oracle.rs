//! NIfTI against nibabel, both directions.

mod common;

use m3d_formats::nifti::{read_nifti, write_nifti, NiftiDtype};

#[test]
fn nibabel_files_read_as_get_fdata() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::run_oracle("nifti_oracle.py", &["gen", d.to_str().unwrap()]);
    let rows = common::manifest(d);
    assert_eq!(rows.len(), 10);
    for row in rows {
        let (name, shape) = (&row[0], common::parse_shape(&row[1]));
        let zooms: Vec<f32> = row[2].split(',').map(|z| z.parse().unwrap()).collect();
        let v = read_nifti(&d.join(name)).unwrap();
        assert_eq!(v.shape, shape, "{name}");
        assert_eq!(v.pixdim.to_vec(), zooms, "{name}");
        assert_eq!(v.space.pixdim, v.pixdim, "{name}");
        // The world space: nibabel's affine from the same header fields. From NIfTI-1's float32 fields both
        // compute in float64 (a qform through its quaternion), so they agree to a few ulps of float64: 1e-9
        // relative. NIfTI-2 stores float64, which `NiftiSpace` holds as f32 (rounded once: 2^-24 relative),
        // so there 1.2e-7 (2^-23) relative.
        let rel = if name.contains("_n2") { 1.2e-7 } else { 1e-9 };
        let want: Vec<f64> = row[3].split(',').map(|x| x.parse().unwrap()).collect();
        let ours: Vec<f64> = v.space.affine().iter().flatten().copied().collect();
        assert_eq!(ours.len(), want.len(), "{name}");
        for (k, (&g, &w)) in ours.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= rel * w.abs().max(1.0),
                "{name} affine[{}][{}]: ours {g}, nibabel {w}",
                k / 4,
                k % 4
            );
        }
        let raw = std::fs::read(d.join(format!("{name}.bin"))).unwrap();
        let want: Vec<f64> = raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(v.data.len(), want.len(), "{name}");
        // Our f32 is the float64 result of get_fdata rounded once, so the relative error is at most
        // 2^-24 (about 6e-8); 1e-6 relative leaves room without hiding an indexing or scaling error.
        for (i, (&g, &w)) in v.data.iter().zip(&want).enumerate() {
            let tol = 1e-6 * w.abs().max(1.0);
            assert!(
                (f64::from(g) - w).abs() <= tol,
                "{name}[{i}]: ours {g}, nibabel {w}"
            );
        }
        // The scaled file really is scaled (guards against a test that reads raw values by accident).
        if name == "ct_i16_scaled.nii.gz" {
            assert!(want.iter().any(|w| w.fract() != 0.0));
        }
    }
}

#[test]
fn our_files_read_exactly_by_nibabel() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut lines = Vec::new();
    let shape = [5usize, 4, 3];
    let n: usize = shape.iter().product();
    type Case<'a> = (&'a str, NiftiDtype, &'a str, Vec<f32>, Vec<usize>);
    let cases: Vec<Case> = vec![
        (
            "u8.nii.gz",
            NiftiDtype::U8,
            "uint8",
            (0..n).map(|i| ((i * 37) % 256) as f32).collect(),
            shape.to_vec(),
        ),
        (
            "i16.nii",
            NiftiDtype::I16,
            "int16",
            (0..n)
                .map(|i| (i as f32 * 613.0) % 60000.0 - 30000.0)
                .collect(),
            shape.to_vec(),
        ),
        (
            "f32.nii.gz",
            NiftiDtype::F32,
            "float32",
            (0..n).map(|i| (i as f32).sin() * 1e3).collect(),
            shape.to_vec(),
        ),
        (
            "f32_4d.nii",
            NiftiDtype::F32,
            "float32",
            (0..n * 2).map(|i| i as f32 / 3.0).collect(),
            vec![5, 4, 3, 2],
        ),
    ];
    for (name, dt, np_dtype, data, shape) in &cases {
        let pixdim = [0.75, 1.25, 2.5];
        write_nifti(&d.join(name), shape, data, *dt, pixdim).unwrap();
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(d.join(format!("{name}.bin")), raw).unwrap();
        let s: Vec<String> = shape.iter().map(|x| x.to_string()).collect();
        lines.push(format!(
            "{name}\t{}\t0.75,1.25,2.5\t{np_dtype}",
            s.join(",")
        ));
        // Round trip through our reader too.
        let v = read_nifti(&d.join(name)).unwrap();
        assert_eq!(&v.data, data);
        assert_eq!(&v.shape, shape);
    }
    let raw = std::fs::read(d.join("f32.nii.gz")).unwrap();
    assert_eq!(&raw[..2], &[0x1f, 0x8b], ".gz output must be gzip");
    std::fs::write(d.join("manifest.txt"), lines.join("\n") + "\n").unwrap();
    let out = common::run_oracle("nifti_oracle.py", &["check", d.to_str().unwrap()]);
    assert!(out.contains("checked 4 volumes"), "{out}");
}
