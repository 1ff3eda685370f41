//! .npy / .npz / scipy CSR against numpy and scipy, both directions.

mod common;

use half::f16;
use m3d_formats::npy::{read_npy, write_npy, NpyArray, NpyData};
use m3d_formats::npz::{read_npz, write_npz};
use m3d_formats::sparse::{read_csr_npz, read_mask_npz, write_csr_npz, CsrMatrix};
use m3d_formats::FormatError;

/// Raw little-endian bytes of our data, independent of the .npy encoder.
fn raw_le(d: &NpyData) -> Vec<u8> {
    let mut out = Vec::new();
    match d {
        NpyData::Bool(v) => out.extend(v.iter().map(|&b| b as u8)),
        NpyData::U8(v) => out.extend_from_slice(v),
        NpyData::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        NpyData::I16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        NpyData::U16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        NpyData::I32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        NpyData::U32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        NpyData::I64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        NpyData::U64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        NpyData::F16(v) => v.iter().for_each(|x| out.extend(x.to_bits().to_le_bytes())),
        NpyData::F32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        NpyData::F64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        NpyData::Str(v) => out.extend(v.join("\n").into_bytes()),
    }
    out
}

#[test]
fn numpy_and_scipy_files_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::run_oracle("npy_npz.py", &["gen", d.to_str().unwrap()]);
    let mut seen = 0;
    for row in common::manifest(d) {
        let (name, kind, descr, shape) = (&row[0], &row[1], &row[2], common::parse_shape(&row[3]));
        match kind.as_str() {
            "npy" => {
                let a = read_npy(&d.join(format!("{name}.npy"))).unwrap();
                assert_eq!(a.shape, shape, "{name}");
                assert_eq!(a.dtype_str(), descr, "{name}");
                assert_eq!(a.len(), shape.iter().product::<usize>(), "{name}");
                let raw = std::fs::read(d.join(format!("{name}.bin"))).unwrap();
                assert!(raw_le(&a.data) == raw, "{name}: values differ from numpy's");
            }
            "str" => {
                let a = read_npy(&d.join(format!("{name}.npy"))).unwrap();
                let text = std::fs::read_to_string(d.join(format!("{name}.txt"))).unwrap();
                let want: Vec<String> = text.split('\n').map(str::to_string).collect();
                assert_eq!(a.data, NpyData::Str(want), "{name} ({descr})");
                assert_eq!(a.shape, shape);
            }
            "npzmember" => {
                let key = name.strip_prefix("npz_").unwrap();
                let raw = std::fs::read(d.join(format!("{name}.bin"))).unwrap();
                for archive in ["plain.npz", "comp.npz"] {
                    let m = read_npz(&d.join(archive)).unwrap();
                    assert_eq!(m.keys().collect::<Vec<_>>(), vec!["x", "y"]);
                    let a = &m[key];
                    assert_eq!(a.shape, shape);
                    assert_eq!(a.dtype_str(), descr);
                    assert!(raw_le(&a.data) == raw, "{archive}/{key}");
                }
            }
            "mask" => {
                let p = d.join(name);
                let (s, dense) = read_mask_npz(&p).unwrap();
                assert_eq!(s, shape, "{name}");
                let want = std::fs::read(p.parent().unwrap().join("dense.bin")).unwrap();
                assert!(dense == want, "{name}: dense mask differs from scipy's");
                assert!(dense.contains(&1));
            }
            other => panic!("unknown manifest kind {other}"),
        }
        seen += 1;
    }
    assert!(seen >= 20, "manifest too short: {seen}");

    // The name/matrix mismatch and the non-CSR file written by scipy.
    let bad = d.join("mask_(2, 3, 4, 6).npz");
    let e = read_mask_npz(&bad).unwrap_err();
    assert!(matches!(e, FormatError::ShapeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("mask_(2, 3, 4, 6).npz"), "{e}");
    let csc = d.join("csc.npz");
    let e = read_csr_npz(&csc).unwrap_err();
    assert!(matches!(e, FormatError::Sparse { .. }), "{e}");
    assert!(
        e.to_string().contains("csc.npz") && e.to_string().contains("\"csc\""),
        "{e}"
    );
}

/// Deterministic pseudo-random values (a small LCG) so the test needs no extra dependency.
fn lcg(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed;
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s >> 11
    }
}

#[test]
fn our_files_read_by_numpy_and_scipy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = lcg(42);
    let mut lines = Vec::new();
    let arrays: Vec<(&str, NpyArray)> = vec![
        (
            "f32",
            NpyArray::f32(
                vec![2, 3, 4],
                (0..24).map(|_| (r() % 2000) as f32 / 7.0 - 100.0).collect(),
            ),
        ),
        (
            "u8",
            NpyArray::u8(vec![5, 7], (0..35).map(|_| r() as u8).collect()),
        ),
        (
            "bool",
            NpyArray::new(
                vec![3, 3],
                NpyData::Bool((0..9).map(|_| r() % 2 == 0).collect()),
            )
            .unwrap(),
        ),
        (
            "i8",
            NpyArray::new(vec![4], NpyData::I8((0..4).map(|_| r() as i8).collect())).unwrap(),
        ),
        (
            "i16",
            NpyArray::new(
                vec![2, 2],
                NpyData::I16((0..4).map(|_| r() as i16).collect()),
            )
            .unwrap(),
        ),
        (
            "u16",
            NpyArray::new(vec![3], NpyData::U16((0..3).map(|_| r() as u16).collect())).unwrap(),
        ),
        (
            "i32",
            NpyArray::new(vec![3], NpyData::I32((0..3).map(|_| r() as i32).collect())).unwrap(),
        ),
        (
            "u32",
            NpyArray::new(vec![3], NpyData::U32((0..3).map(|_| r() as u32).collect())).unwrap(),
        ),
        (
            "i64",
            NpyArray::new(
                vec![3],
                NpyData::I64((0..3).map(|_| r() as i64 - (1 << 40)).collect()),
            )
            .unwrap(),
        ),
        (
            "u64",
            NpyArray::new(vec![3], NpyData::U64((0..3).map(|_| r() << 11).collect())).unwrap(),
        ),
        (
            "f16",
            NpyArray::new(
                vec![3],
                NpyData::F16(
                    (0..3)
                        .map(|_| f16::from_f32((r() % 100) as f32 / 3.0))
                        .collect(),
                ),
            )
            .unwrap(),
        ),
        (
            "f64",
            NpyArray::new(vec![2, 1], NpyData::F64(vec![std::f64::consts::PI, -1e300])).unwrap(),
        ),
        ("zero_d", NpyArray::f32(vec![], vec![7.5])),
        ("empty", NpyArray::f32(vec![0, 5], vec![])),
    ];
    for (name, a) in &arrays {
        write_npy(&d.join(format!("{name}.npy")), a).unwrap();
        std::fs::write(d.join(format!("{name}.bin")), raw_le(&a.data)).unwrap();
        let shape: Vec<String> = a.shape.iter().map(|s| s.to_string()).collect();
        lines.push(format!(
            "{name}\tnpy\t{}\t{}",
            a.data.descr(),
            shape.join(",")
        ));
    }
    let s = NpyArray::new(
        vec![3],
        NpyData::Str(vec!["csr".into(), "héllo".into(), "".into()]),
    )
    .unwrap();
    write_npy(&d.join("strs.npy"), &s).unwrap();
    std::fs::write(d.join("strs.bin"), raw_le(&s.data)).unwrap();
    lines.push("strs\tstr\t<U5\t3".to_string());

    for (archive, compressed) in [("ours_plain.npz", false), ("ours_comp.npz", true)] {
        let members: Vec<(&str, &NpyArray)> = arrays[..3].iter().map(|(n, a)| (*n, a)).collect();
        write_npz(&d.join(archive), &members, compressed).unwrap();
        for (n, a) in &members {
            let name = format!("{}__{n}", archive.trim_end_matches(".npz"));
            std::fs::write(d.join(format!("{name}.bin")), raw_le(&a.data)).unwrap();
            let shape: Vec<String> = a.shape.iter().map(|s| s.to_string()).collect();
            lines.push(format!(
                "{name}\tnpz:{archive}\t{}\t{}",
                a.data.descr(),
                shape.join(",")
            ));
        }
        // And our own reader agrees with our writer.
        let back = read_npz(&d.join(archive)).unwrap();
        for (n, a) in &members {
            assert_eq!(&&back[*n], a);
        }
    }

    let (rows, cols) = (4usize, 300usize);
    let dense: Vec<u8> = (0..rows * cols).map(|_| u8::from(r() % 5 == 0)).collect();
    let m = CsrMatrix::from_dense_u8(rows, cols, &dense);
    assert_eq!(m.nnz(), dense.iter().filter(|&&v| v != 0).count());
    write_csr_npz(&d.join("csr_ours.npz"), &m).unwrap();
    std::fs::write(d.join("csr_ours.bin"), &dense).unwrap();
    lines.push(format!("csr_ours\tcsr\t|u1\t{rows},{cols}"));
    assert_eq!(read_csr_npz(&d.join("csr_ours.npz")).unwrap(), m);

    // Our mask written under an M3D-Seg name reads back as the dense volume.
    let mpath = d.join("mask_(4, 10, 5, 6).npz");
    write_csr_npz(&mpath, &m).unwrap();
    let (shape, back) = read_mask_npz(&mpath).unwrap();
    assert_eq!(shape, vec![4, 10, 5, 6]);
    assert_eq!(back, dense);

    std::fs::write(d.join("manifest.txt"), lines.join("\n") + "\n").unwrap();
    let out = common::run_oracle("npy_npz.py", &["check", d.to_str().unwrap()]);
    assert!(
        out.contains(&format!("checked {} arrays", lines.len())),
        "{out}"
    );
}

#[test]
fn f32_cast_follows_numpy() {
    let a = NpyArray::new(vec![3], NpyData::Bool(vec![true, false, true])).unwrap();
    assert_eq!(a.to_f32(), vec![1.0, 0.0, 1.0]);
    let a = NpyArray::new(vec![2], NpyData::I16(vec![-3, 9])).unwrap();
    assert_eq!(a.to_f32(), vec![-3.0, 9.0]);
}
