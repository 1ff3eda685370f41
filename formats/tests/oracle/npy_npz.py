"""Oracle for .npy/.npz/scipy CSR: `gen DIR` writes numpy/scipy files plus raw expected bytes;
`check DIR` verifies the files our Rust code wrote into DIR (reads the manifest the Rust side wrote).

Manifest lines (tab separated): name, kind, dtype descr, comma-separated shape.
Expected values are written as raw little-endian C-order bytes (`<name>.bin`), produced with
ndarray.tobytes(), so the Rust side can compare without going through our .npy parser."""
import os
import sys

import numpy as np
import scipy.sparse as sp


def put(d, lines, name, kind, arr):
    arr = np.asarray(arr)
    le = arr.astype(arr.dtype.newbyteorder("<")) if arr.dtype.byteorder == ">" else arr
    with open(os.path.join(d, name + ".bin"), "wb") as f:
        f.write(np.ascontiguousarray(le).tobytes(order="C"))
    descr = le.dtype.str
    lines.append("\t".join([name, kind, descr, ",".join(str(s) for s in arr.shape)]))


def gen(d):
    rng = np.random.default_rng(1234)
    lines = []
    arrays = {
        "f32_c": rng.standard_normal((3, 4, 5)).astype(np.float32),
        "f32_fortran": np.asfortranarray(rng.standard_normal((3, 4, 5)).astype(np.float32)),
        "f64_be": rng.standard_normal((2, 7)).astype(">f8"),
        "i16_be_fortran": np.asfortranarray(rng.integers(-30000, 30000, (4, 3, 2)).astype(">i2")),
        "u8": rng.integers(0, 256, (5, 6)).astype(np.uint8),
        "i8": rng.integers(-128, 128, (9,)).astype(np.int8),
        "u16": rng.integers(0, 65536, (3, 3)).astype(np.uint16),
        "i32_be": rng.integers(-(2**31), 2**31 - 1, (4,)).astype(">i4"),
        "u32": rng.integers(0, 2**32 - 1, (2, 2), dtype=np.uint64).astype(np.uint32),
        "i64": rng.integers(-(2**62), 2**62, (3,)).astype(np.int64),
        "u64_be": rng.integers(0, 2**63, (3,), dtype=np.uint64).astype(">u8"),
        "f16": rng.standard_normal((2, 3)).astype(np.float16),
        "bool_fortran": np.asfortranarray(rng.integers(0, 2, (3, 5)).astype(bool)),
        "zero_d": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    for name, a in arrays.items():
        np.save(os.path.join(d, name + ".npy"), a)
        put(d, lines, name, "npy", a)
    # Versions 2.0 and 3.0 (3.0 has a UTF-8 header) written explicitly.
    from numpy.lib import format as fmt

    a = rng.standard_normal((2, 3)).astype(np.float32)
    for ver in [(2, 0), (3, 0)]:
        name = f"v{ver[0]}"
        with open(os.path.join(d, name + ".npy"), "wb") as f:
            fmt.write_array(f, a, version=ver)
        put(d, lines, name, "npy", a)
    # String arrays: numpy unicode and bytes (older scipy stored the sparse format as |S3).
    for name, a in {"str_u": np.array(["csr", "ab", ""]), "str_s": np.array([b"csr", b"x"])}.items():
        np.save(os.path.join(d, name + ".npy"), a)
        with open(os.path.join(d, name + ".txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(x.decode() if isinstance(x, bytes) else str(x) for x in a.tolist()))
        lines.append("\t".join([name, "str", a.dtype.str, ",".join(str(s) for s in a.shape)]))

    # npz (plain and compressed)
    x = rng.standard_normal((4, 4)).astype(np.float32)
    y = rng.integers(0, 9, (7,)).astype(np.int64)
    np.savez(os.path.join(d, "plain.npz"), x=x, y=y)
    np.savez_compressed(os.path.join(d, "comp.npz"), x=x, y=y)
    put(d, lines, "npz_x", "npzmember", x)
    put(d, lines, "npz_y", "npzmember", y)

    # scipy CSR masks, named like M3D-Seg, with several data dtypes, compressed and not.
    shapes = [(2, 5, 6, 7), (3, 4, 4, 3)]
    for k, (shape, dt, comp) in enumerate(
        [(shapes[0], bool, True), (shapes[1], np.uint8, False), (shapes[0], np.float64, True)]
    ):
        dense = (rng.random(shape) < 0.2).astype(dt)
        m = sp.csr_matrix(dense.reshape(shape[0], -1))
        sub = os.path.join(d, f"mask{k}")
        os.makedirs(sub, exist_ok=True)
        fname = f"mask_({', '.join(str(s) for s in shape)}).npz"
        sp.save_npz(os.path.join(sub, fname), m, compressed=comp)
        put(sub, [], "dense", "mask", (dense != 0).astype(np.uint8))
        lines.append("\t".join([f"mask{k}/{fname}", "mask", "|u1", ",".join(map(str, shape))]))
    # A mask whose name disagrees with its matrix shape.
    dense = (rng.random((2, 60)) < 0.3).astype(np.uint8)
    sp.save_npz(os.path.join(d, "mask_(2, 3, 4, 6).npz"), sp.csr_matrix(dense))
    # A sparse file that is not CSR.
    sp.save_npz(os.path.join(d, "csc.npz"), sp.csc_matrix(dense))
    with open(os.path.join(d, "manifest.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def check(d):
    """Checks what Rust wrote: `<name>.npy` (+ `.bin` raw LE values), `<name>.npz`, CSR masks."""
    n = 0
    with open(os.path.join(d, "manifest.txt")) as f:
        for line in f:
            name, kind, descr, shape = line.rstrip("\n").split("\t")
            shape = tuple(int(s) for s in shape.split(",") if s)
            raw = open(os.path.join(d, name + ".bin"), "rb").read()
            if kind == "str":
                expected = np.array(raw.decode("utf-8").split("\n")).reshape(shape)
            else:
                expected = np.frombuffer(raw, dtype=np.dtype(descr)).reshape(shape)
            if kind == "npy":
                got = np.load(os.path.join(d, name + ".npy"))
            elif kind == "str":
                got = np.load(os.path.join(d, name + ".npy"))
            elif kind.startswith("npz:"):
                archive, key = kind[4:], name.split("__")[1]
                with np.load(os.path.join(d, archive)) as z:
                    got = z[key]
            elif kind == "csr":
                got = sp.load_npz(os.path.join(d, name + ".npz"))
                assert got.format == "csr", got.format
                got = got.toarray()
            else:
                raise SystemExit(f"unknown kind {kind}")
            assert got.dtype.str == descr or kind == "csr", (name, got.dtype.str, descr)
            assert got.shape == shape, (name, got.shape, shape)
            if not np.array_equal(got, expected.astype(got.dtype)):
                raise SystemExit(f"{name}: values differ\n{got}\n{expected}")
            n += 1
    print(f"checked {n} arrays")


if __name__ == "__main__":
    {"gen": gen, "check": check}[sys.argv[1]](sys.argv[2])
