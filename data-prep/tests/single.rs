//! The single-image path of `m3d generate --image`: the same preprocessing as data-prep for every input form,
//! the inverse mapping of a model-space mask onto the input grid, the mask NIfTI in the input's world space,
//! and the overlay PNG.

use std::io::Read;
use std::path::{Path, PathBuf};

use m3d_data_prep::cap::TARGET;
use m3d_data_prep::pipeline::volume_record;
use m3d_data_prep::seg::preprocess_image;
use m3d_data_prep::single::{
    mask_to_input, prepare, write_mask_nifti, write_overlay_png, ImageSource, SingleError,
    SourceKind,
};
use m3d_formats::nifti::{read_nifti, read_nifti_space, write_nifti, NiftiDtype, NiftiSpace};
use m3d_formats::npy::{write_npy, NpyArray, NpyData};
use m3d_shards::{ImageDtype, Manifest, Store, WriteOptions};
use m3d_volume::Volume;

/// Deterministic pseudo-random values (xorshift), so the tests need no RNG crate.
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// A CT-like `(X, Y, Z)` array in C order: air (-1024, the minimum) around an integer-valued body box, so the
/// foreground crop is a proper sub-box away from the centre.
fn ct_like(shape: [usize; 3]) -> Vec<f32> {
    let [sx, sy, sz] = shape;
    let values = noise(sx * sy * sz, 0x853c_49e6_748f_ea9b);
    let mut data = Vec::with_capacity(values.len());
    for x in 0..sx {
        for y in 0..sy {
            for z in 0..sz {
                let inside = (9..sx - 2).contains(&x)
                    && (3..sy - 5).contains(&y)
                    && (1..sz - 4).contains(&z);
                let v = values[(x * sy + y) * sz + z];
                data.push(if inside {
                    (v * 2000.0 - 900.0).round()
                } else {
                    -1024.0
                });
            }
        }
    }
    data
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn npy(dir: &Path, name: &str, shape: Vec<usize>, data: NpyData) -> PathBuf {
    let path = dir.join(name);
    write_npy(&path, &NpyArray::new(shape, data).unwrap()).unwrap();
    path
}

fn gunzip(path: &Path) -> Vec<u8> {
    let raw = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(raw.as_slice())
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn parse_accepts_the_documented_forms_only() {
    assert_eq!(
        ImageSource::parse("a/b.npy").unwrap(),
        ImageSource::Npy("a/b.npy".into())
    );
    assert_eq!(
        ImageSource::parse("ct.NII.GZ").unwrap(),
        ImageSource::Nifti("ct.NII.GZ".into())
    );
    assert_eq!(
        ImageSource::parse("ct.nii").unwrap(),
        ImageSource::Nifti("ct.nii".into())
    );
    assert_eq!(
        ImageSource::parse("s3://bucket/seg#0011/case_00012").unwrap(),
        ImageSource::Volume {
            dataset: "s3://bucket/seg".into(),
            volume_id: "0011/case_00012".into()
        }
    );
    for bad in ["scan.txt", "ds#", "#id", "plain"] {
        let err = ImageSource::parse(bad).unwrap_err();
        assert!(matches!(err, SingleError::Argument { .. }), "{bad}: {err}");
        let msg = err.to_string();
        assert!(
            msg.contains(bad) && msg.contains(".nii.gz") && msg.contains("#<volume id>"),
            "{msg}"
        );
    }
}

#[test]
fn model_shaped_npy_is_used_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let [d, h, w] = TARGET;
    let data = noise(d * h * w, 7);
    let p4 = npy(
        dir.path(),
        "in4.npy",
        vec![1, d, h, w],
        NpyData::F32(data.clone()),
    );
    let f64s: Vec<f64> = data.iter().map(|&v| f64::from(v)).collect();
    let p3 = npy(dir.path(), "in3.npy", vec![d, h, w], NpyData::F64(f64s));
    for path in [p4, p3] {
        let prepared = prepare(&ImageSource::Npy(path.clone()), TARGET).unwrap();
        assert_eq!(prepared.volume.shape(), [1, d, h, w]);
        assert_eq!(
            bits(prepared.volume.data()),
            bits(&data),
            "{}",
            path.display()
        );
        let g = &prepared.geometry;
        assert_eq!(
            (g.kind, g.crop, g.input_spatial),
            (SourceKind::Npy, None, TARGET)
        );
        // Used as is, so a mask comes back as it went in.
        let mask = Volume::from_fn([1, d, h, w], |_, z, y, x| u8::from((z + y + x) % 3 == 0));
        assert_eq!(mask_to_input(&mask, g).unwrap().data(), mask.data());
    }
}

#[test]
fn nifti_and_raw_npy_match_the_seg_preprocessing_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [30, 26, 18];
    let data = ct_like(shape);
    let (expected, bbox) = preprocess_image(
        Volume::new([1, shape[0], shape[1], shape[2]], data.clone()).unwrap(),
        Path::new("x"),
    )
    .unwrap();
    assert_eq!(expected.shape(), [1, TARGET[0], TARGET[1], TARGET[2]]);

    let i16s: Vec<i16> = data.iter().map(|&v| v as i16).collect();
    let mut sources = vec![
        ImageSource::Npy(npy(
            dir.path(),
            "raw4.npy",
            vec![1, 30, 26, 18],
            NpyData::F32(data.clone()),
        )),
        ImageSource::Npy(npy(
            dir.path(),
            "raw3.npy",
            vec![30, 26, 18],
            NpyData::F32(data.clone()),
        )),
        ImageSource::Npy(npy(
            dir.path(),
            "raw_i16.npy",
            vec![1, 30, 26, 18],
            NpyData::I16(i16s),
        )),
    ];
    for (name, nshape, dtype) in [
        ("ct.nii", vec![30, 26, 18], NiftiDtype::F32),
        ("ct.nii.gz", vec![30, 26, 18], NiftiDtype::I16),
        ("ct4.nii.gz", vec![30, 26, 18, 1], NiftiDtype::I16),
    ] {
        let p = dir.path().join(name);
        write_nifti(&p, &nshape, &data, dtype, [0.7, 0.7, 3.0]).unwrap();
        sources.push(ImageSource::Nifti(p));
    }
    for source in &sources {
        let prepared = prepare(source, TARGET).unwrap();
        assert_eq!(
            bits(prepared.volume.data()),
            bits(expected.data()),
            "{}",
            source.name()
        );
        let crop = prepared.geometry.crop.expect("preprocessed");
        assert_eq!(crop.bbox, bbox);
        assert_eq!(crop.swapped_shape, [18, 26, 30]);
        assert_eq!(prepared.geometry.input_spatial, shape);
    }
}

/// Affine fields of the round-trip input: flipped x/y, a qfac of -1, offsets; sform = the same matrix.
const QUATERN: [f32; 3] = [0.0, 0.0, 1.0];
const QOFFSET: [f32; 3] = [120.5, -80.25, 33.0];
const PIXDIM: [f32; 3] = [0.8, 0.9, 2.5];
const SROW: [[f32; 4]; 3] = [
    [-0.8, 0.0, 0.0, 120.5],
    [0.0, -0.9, 0.0, -80.25],
    [0.0, 0.0, -2.5, 33.0],
];

/// Writes `ct.nii.gz` with the affine above: `write_nifti` (sform = diag(pixdim)), then its spatial fields set.
fn nifti_with_affine(dir: &Path, shape: [usize; 3], data: &[f32]) -> PathBuf {
    let plain = dir.join("plain.nii");
    write_nifti(&plain, &shape, data, NiftiDtype::I16, PIXDIM).unwrap();
    let mut b = std::fs::read(&plain).unwrap();
    let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
    put(76, &(-1.0f32).to_le_bytes()); // qfac
    put(252, &1i16.to_le_bytes()); // qform_code: scanner
    put(254, &4i16.to_le_bytes()); // sform_code: MNI
    for (i, v) in QUATERN.iter().chain(&QOFFSET).enumerate() {
        put(256 + 4 * i, &v.to_le_bytes());
    }
    for (i, v) in SROW.iter().flatten().enumerate() {
        put(280 + 4 * i, &v.to_le_bytes());
    }
    let path = dir.join("ct.nii.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::fast(),
    );
    std::io::Write::write_all(&mut enc, &b).unwrap();
    enc.finish().unwrap();
    path
}

#[test]
fn a_mask_maps_back_onto_the_input_grid_and_world_space() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [48, 40, 20];
    // Body (100) in an off-centre box on air (0, the minimum); a lesion (300) inside it.
    let body = [20..44, 4..30, 10..19];
    let lesion = [30..40, 10..20, 12..16];
    let inside =
        |b: &[std::ops::Range<usize>; 3], p: [usize; 3]| (0..3).all(|i| b[i].contains(&p[i]));
    let mut data = Vec::new();
    for x in 0..shape[0] {
        for y in 0..shape[1] {
            for z in 0..shape[2] {
                let p = [x, y, z];
                data.push(if inside(&lesion, p) {
                    300.0
                } else if inside(&body, p) {
                    100.0
                } else {
                    0.0
                });
            }
        }
    }
    let input = nifti_with_affine(dir.path(), shape, &data);
    let space = read_nifti_space(&input).unwrap();
    assert_eq!(
        (space.srow, space.qoffset, space.qfac),
        (SROW, QOFFSET, -1.0)
    );
    // The qform and the sform describe the same matrix here.
    let q = NiftiSpace {
        sform_code: 0,
        ..space.clone()
    }
    .affine();
    assert_eq!(q, space.affine(), "qform matrix");

    let prepared = prepare(
        &ImageSource::parse(input.to_str().unwrap()).unwrap(),
        TARGET,
    )
    .unwrap();
    let g = &prepared.geometry;
    let crop = g.crop.expect("preprocessed");
    // The crop is the body box, in (z, y, x).
    assert_eq!(
        (crop.bbox.start, crop.bbox.end),
        ([10, 4, 20], [19, 30, 44])
    );

    // The model's "prediction": the lesion as it appears in the prepared volume (body 1/3, lesion 1).
    let mask = prepared.volume.map(|v| u8::from(v > 2.0 / 3.0));
    let back = mask_to_input(&mask, g).unwrap();
    assert_eq!(back.shape(), [1, 48, 40, 20]);
    // Every voxel decided right, except within one voxel of the lesion's faces (nearest resize rounding).
    let near = |p: [usize; 3], grow: isize| {
        (0..3).all(|i| {
            let (s, e) = (
                lesion[i].start as isize - grow,
                lesion[i].end as isize + grow,
            );
            (s..e).contains(&(p[i] as isize))
        })
    };
    let mut found = 0;
    for x in 0..shape[0] {
        for y in 0..shape[1] {
            for z in 0..shape[2] {
                let v = back.get([0, x, y, z]).unwrap();
                found += usize::from(v);
                if near([x, y, z], -1) {
                    assert_eq!(v, 1, "inside the lesion at {:?}", [x, y, z]);
                }
                if !near([x, y, z], 1) {
                    assert_eq!(v, 0, "outside the lesion at {:?}", [x, y, z]);
                }
            }
        }
    }
    assert!(found >= 8 * 8 * 2, "{found} voxels");

    // Written over the input: same shape, spacing and world space; uint8; the same voxels.
    let out = dir.path().join("mask.nii.gz");
    write_mask_nifti(&back, g, &out).unwrap();
    let read = read_nifti(&out).unwrap();
    assert_eq!(read.shape, vec![48, 40, 20]);
    assert_eq!(read.pixdim, PIXDIM);
    assert_eq!(
        read.data,
        back.data()
            .iter()
            .map(|&v| f32::from(v))
            .collect::<Vec<_>>()
    );
    assert_eq!(read_nifti_space(&out).unwrap(), space);
    assert_eq!(
        read.space, space,
        "read_nifti gives the same spatial fields"
    );
    let raw = gunzip(&out);
    assert_eq!(i16::from_le_bytes([raw[70], raw[71]]), 2, "datatype uint8");
    let srow_x: Vec<f32> = (0..4)
        .map(|k| f32::from_le_bytes(raw[280 + 4 * k..284 + 4 * k].try_into().unwrap()))
        .collect();
    assert_eq!(srow_x, SROW[0]);

    // A mask of the wrong shape is refused.
    let small = Volume::filled([1, 4, 4, 4], 0u8);
    assert!(matches!(
        mask_to_input(&small, g),
        Err(SingleError::Shape { .. })
    ));
}

#[test]
fn a_volume_of_a_shard_dataset_is_found_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("ds").to_str().unwrap().to_string();
    let target = [4, 8, 8];
    let make = |id: &str, seed| {
        let image = Volume::new([1, 4, 8, 8], noise(256, seed)).unwrap();
        (
            volume_record(
                id,
                "seg",
                format!("{id}/image.npy"),
                &image,
                ImageDtype::F32,
                Vec::new(),
            ),
            image,
        )
    };
    let (a, _) = make("0000/case_a", 3);
    let (b, image_b) = make("0000/case_b", 5);
    let opts = WriteOptions {
        rows_per_row_group: 1,
        ..Default::default()
    };
    m3d_shards::write_dataset(
        &Store::open(&url).unwrap(),
        Manifest::new("seg", "single tests"),
        &[vec![a, b]],
        &[],
        &opts,
    )
    .unwrap();

    let source = ImageSource::parse(&format!("{url}#0000/case_b")).unwrap();
    let prepared = prepare(&source, target).unwrap();
    assert_eq!(bits(prepared.volume.data()), bits(image_b.data()));
    assert_eq!(
        (prepared.geometry.kind, prepared.geometry.crop),
        (SourceKind::Volume, None)
    );

    let unknown = ImageSource::Volume {
        dataset: url.clone(),
        volume_id: "0000/case_zz".into(),
    };
    let err = prepare(&unknown, target).unwrap_err();
    assert!(matches!(err, SingleError::UnknownVolume { .. }), "{err}");
    assert!(err.to_string().contains("0000/case_zz"), "{err}");

    let err = prepare(&source, TARGET).unwrap_err();
    assert!(matches!(err, SingleError::NotModelShaped { .. }), "{err}");
}

#[test]
fn bad_inputs_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let flat = npy(
        dir.path(),
        "flat.npy",
        vec![5, 7],
        NpyData::F32(vec![0.5; 35]),
    );
    let err = prepare(&ImageSource::Npy(flat), TARGET).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, SingleError::Rank { .. })
            && msg.contains("flat.npy")
            && msg.contains("[5, 7]"),
        "{msg}"
    );

    for (name, shape) in [
        ("five.npy", vec![1, 1, 2, 3, 4]),
        ("two_channels.npy", vec![2, 3, 4, 5]),
    ] {
        let n = shape.iter().product();
        let p = npy(dir.path(), name, shape, NpyData::F32(vec![0.5; n]));
        let err = prepare(&ImageSource::Npy(p), TARGET).unwrap_err();
        assert!(
            matches!(err, SingleError::Rank { .. }) && err.to_string().contains(name),
            "{err}"
        );
    }

    let five_d = dir.path().join("five_d.nii");
    write_nifti(
        &five_d,
        &[2, 3, 4, 1, 2],
        &[1.0; 48],
        NiftiDtype::F32,
        [1.0; 3],
    )
    .unwrap();
    let err = prepare(&ImageSource::Nifti(five_d), TARGET).unwrap_err();
    assert!(
        matches!(err, SingleError::Rank { .. }) && err.to_string().contains("five_d.nii"),
        "{err}"
    );

    let corrupt = dir.path().join("corrupt.nii.gz");
    std::fs::write(&corrupt, [0x1f, 0x8b, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
    let err = prepare(&ImageSource::Nifti(corrupt), TARGET).unwrap_err();
    assert!(
        matches!(err, SingleError::Format(_)) && err.to_string().contains("corrupt.nii.gz"),
        "{err}"
    );

    let missing = ImageSource::Nifti(dir.path().join("missing.nii.gz"));
    assert!(prepare(&missing, TARGET)
        .unwrap_err()
        .to_string()
        .contains("missing.nii.gz"));

    let mut values = vec![0.25f32; 4 * 5 * 6];
    values[17] = f32::NAN;
    values[40] = f32::INFINITY;
    let nan = npy(
        dir.path(),
        "nan.npy",
        vec![1, 4, 5, 6],
        NpyData::F32(values),
    );
    let err = prepare(&ImageSource::Npy(nan), TARGET).unwrap_err();
    assert!(
        matches!(
            err,
            SingleError::NonFinite {
                count: 2,
                first: 17,
                ..
            }
        ) && err.to_string().contains("nan.npy"),
        "{err}"
    );

    let constant = npy(
        dir.path(),
        "constant.npy",
        vec![1, 4, 5, 6],
        NpyData::F32(vec![3.0; 120]),
    );
    let err = prepare(&ImageSource::Npy(constant), TARGET).unwrap_err();
    assert!(
        matches!(err, SingleError::Prep(_)) && err.to_string().contains("constant.npy"),
        "{err}"
    );

    // The preprocessing makes TARGET only: a raw input for another model size is refused, not silently resized.
    let raw = npy(
        dir.path(),
        "raw.npy",
        vec![1, 4, 5, 6],
        NpyData::F32(noise(120, 9)),
    );
    let err = prepare(&ImageSource::Npy(raw), [16, 128, 128]).unwrap_err();
    assert!(
        matches!(err, SingleError::UnsupportedTarget { .. }) && err.to_string().contains("raw.npy"),
        "{err}"
    );
}

#[test]
fn the_overlay_png_has_one_tile_per_chosen_slice() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [1, 10, 16, 12];
    let image = Volume::new(shape, noise(10 * 16 * 12, 11)).unwrap();

    // Mask voxels on slices 2 and 5 only: two tiles side by side.
    let mask = Volume::from_fn(shape, |_, z, y, x| {
        u8::from((z == 2 || z == 5) && (4..8).contains(&y) && x < 6)
    });
    let path = dir.path().join("two.png");
    assert_eq!(write_overlay_png(&image, &mask, &path).unwrap(), vec![2, 5]);
    let png = image::open(&path).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (2 * 12, 16));
    let masked = png.get_pixel(12 + 1, 5); // slice 5, (y 5, x 1): in the mask
    let plain = png.get_pixel(12 + 9, 5); // slice 5, (y 5, x 9): not
    assert!(
        masked[0] > masked[1] && masked[1] == masked[2],
        "{masked:?}"
    );
    assert!(plain[0] == plain[1] && plain[1] == plain[2], "{plain:?}");

    // Empty mask: 8 evenly spaced slices, two rows of four.
    let path = dir.path().join("empty.png");
    let slices = write_overlay_png(&image, &Volume::filled(shape, 0), &path).unwrap();
    assert_eq!(slices, vec![0, 1, 3, 4, 5, 6, 8, 9]);
    assert_eq!(
        image::open(&path).unwrap().to_rgb8().dimensions(),
        (4 * 12, 2 * 16)
    );

    // Mask on every slice, most voxels on the last ones: the 8 fullest.
    let mask = Volume::from_fn(shape, |_, z, _, x| u8::from(x <= z));
    let path = dir.path().join("full.png");
    assert_eq!(
        write_overlay_png(&image, &mask, &path).unwrap(),
        (2..10).collect::<Vec<_>>()
    );
    assert_eq!(
        image::open(&path).unwrap().to_rgb8().dimensions(),
        (4 * 12, 2 * 16)
    );
}
