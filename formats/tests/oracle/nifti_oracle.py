"""Oracle for NIfTI: `gen DIR` writes volumes with nibabel and their `get_fdata()` as raw float64
(C order) in `<name>.bin`; `check DIR` loads the volumes Rust wrote and compares get_fdata() with the
raw float32 values Rust wrote next to them (`<name>.bin`), exactly.
Manifest lines (tab separated): file name, comma-separated shape, comma-separated pixdim[1..3]
(check also: on-disk dtype)."""
import os
import sys

import nibabel as nib
import numpy as np


def gen(d):
    rng = np.random.default_rng(7)
    lines = []

    def save(name, arr, dtype, zooms, slope_inter=None, big_endian=False, affine=None, qform_only=False,
             nifti2=False):
        header, image = (nib.Nifti2Header, nib.Nifti2Image) if nifti2 else (nib.Nifti1Header, nib.Nifti1Image)
        hdr = header()
        if big_endian:
            hdr = hdr.as_byteswapped(">")
        if affine is None:
            img = image(arr.astype(dtype), np.diag(list(zooms) + [1.0]), header=hdr)
            img.header.set_zooms(tuple(zooms) + (1.0,) * (arr.ndim - len(zooms)))
        else:
            img = image(arr.astype(dtype), affine, header=hdr)
            if qform_only:
                # The world space from the quaternion alone (sform_code 0).
                img.set_qform(affine, code=1)
                img.set_sform(None, code=0)
        img.set_data_dtype(dtype)
        if slope_inter is not None:
            img.header.set_slope_inter(*slope_inter)
        p = os.path.join(d, name)
        nib.save(img, p)
        # Reload: what get_fdata gives for the file on disk is the reference, whatever nibabel did on save.
        back = nib.load(p)
        data = back.get_fdata()
        np.ascontiguousarray(data, dtype="<f8").tofile(os.path.join(d, name + ".bin"))
        z = back.header.get_zooms()[:3]
        # nibabel's affine for the file: the sform when its code is set, else the qform (get_best_affine).
        a = back.affine
        lines.append("\t".join([name, ",".join(map(str, data.shape)), ",".join(repr(float(v)) for v in z),
                                 ",".join(repr(float(v)) for v in a.ravel())]))

    i16 = rng.integers(-1024, 3000, (7, 6, 5))
    save("ct_i16_scaled.nii.gz", i16, np.int16, (0.7, 0.8, 2.5), slope_inter=(0.5, -1024.0))
    save("ct_i16_plain.nii", i16, np.int16, (1.0, 1.0, 1.0))
    save("f32.nii.gz", rng.standard_normal((4, 5, 6)) * 100, np.float32, (1.5, 1.5, 3.0))
    save("u8.nii.gz", rng.integers(0, 256, (6, 4, 3)), np.uint8, (1.0, 2.0, 3.0))
    save("f32_4d.nii.gz", rng.standard_normal((3, 4, 5, 2)), np.float32, (1.0, 1.0, 1.0))
    save("i16_be.nii", i16, np.int16, (1.0, 1.0, 1.0), slope_inter=(2.0, 3.0), big_endian=True)
    save("f64_scaled.nii", rng.standard_normal((3, 3, 3)), np.float64, (1.0, 1.0, 1.0), slope_inter=(1.5, 0.25))
    # Oblique world spaces: a rotation, anisotropic voxels and an offset; one mirrored (qfac -1) and read from
    # its qform alone, one as NIfTI-2.
    t = np.deg2rad(30.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    oblique = np.eye(4)
    oblique[:3, :3] = rot @ np.diag([0.7, 0.8, 2.5])
    oblique[:3, 3] = [-100.5, 20.25, 7.0]
    mirrored = oblique @ np.diag([1.0, 1.0, -1.0, 1.0])
    small = rng.standard_normal((4, 3, 2))
    save("oblique_sform.nii.gz", small, np.float32, None, affine=oblique)
    save("mirrored_qform.nii", small, np.float32, None, affine=mirrored, qform_only=True)
    save("oblique_n2.nii.gz", small, np.float32, None, affine=oblique, nifti2=True)
    with open(os.path.join(d, "manifest.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def check(d):
    n = 0
    with open(os.path.join(d, "manifest.txt")) as f:
        for line in f:
            name, shape, zooms, dtype = line.rstrip("\n").split("\t")
            shape = tuple(int(s) for s in shape.split(","))
            img = nib.load(os.path.join(d, name))
            got = img.get_fdata()
            expected = np.fromfile(os.path.join(d, name + ".bin"), dtype="<f4").reshape(shape)
            assert got.shape == shape, (name, got.shape, shape)
            assert img.get_data_dtype() == np.dtype(dtype), (name, img.get_data_dtype(), dtype)
            if not np.array_equal(got, expected.astype(np.float64)):
                raise SystemExit(f"{name}: values differ, max abs {np.abs(got - expected).max()}")
            z = [float(v) for v in zooms.split(",")]
            assert np.allclose(img.header.get_zooms()[:3], z, rtol=0, atol=0), (name, img.header.get_zooms(), z)
            assert np.allclose(img.affine[:3, :3], np.diag(z)), (name, img.affine)
            n += 1
    print(f"checked {n} volumes")


if __name__ == "__main__":
    {"gen": gen, "check": check}[sys.argv[1]](sys.argv[2])
