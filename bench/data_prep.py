"""Data-prep benchmarks, m3d against the reference way, side by side in one run (see docs/benchmarks.md).

1. Conversion throughput per core: `m3d-data-prep cap --threads 1` (the binary that runs `m3d data-prep`, without
   libtorch) against the reference pipeline in Python
   (PIL + numpy + MONAI, the steps of m3d_cap_data_prepare.py, one process) on the same raw series, including
   writing the outputs (shards vs .npy files); 1b. decoding alone over the same slices (Pillow vs ours), as a
   share of each side's conversion time.
2. Bytes per volume: shard bytes / volumes against the reference .npy (float32 1x32x256x256 + header).
3. Reader throughput per core: volumes/s decoded + augmented to f32 (`shards/examples/read_bench.rs`) against
   np.load of the reference .npy + the reference MONAI train transform, one thread each.
4. Peak RSS of `m3d-data-prep cap` converting N and 10 N volumes.

Usage: python bench/data_prep.py [--work DIR] [--cases N] [--slice-size 512x512]
Needs the m3d and m3d-data-prep binaries and the read_bench and decode_bench examples (scripts/setup.sh builds them) and the .venv.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "oracle"))


def reference_train_transform(seed):
    """The reference's MONAI training transform of an image (M3D-Cap's `train_transform`), seeded; also used by
    bench/stream_throughput.py's Streaming ranks."""
    import monai.transforms as mtf
    import torch
    from monai.data import set_track_meta

    set_track_meta(False)
    tf = mtf.Compose([
        mtf.RandRotate90(prob=0.5, spatial_axes=(1, 2)),
        mtf.RandFlip(prob=0.10, spatial_axis=0),
        mtf.RandFlip(prob=0.10, spatial_axis=1),
        mtf.RandFlip(prob=0.10, spatial_axis=2),
        mtf.RandScaleIntensity(factors=0.1, prob=0.5),
        mtf.RandShiftIntensity(offsets=0.1, prob=0.5),
        mtf.ToTensor(dtype=torch.float),
    ])
    tf.set_random_state(seed)
    return tf


def target_dir():
    return os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


def m3d_bin():
    return os.environ.get("M3D_BIN", os.path.join(target_dir(), "release", "m3d"))


def prep_bin():
    """`m3d-data-prep`, the binary a conversion runs as (beside `m3d`; no libtorch, so none of its start-up)."""
    return os.path.join(os.path.dirname(m3d_bin()), "m3d-data-prep")


def run(cmd, **kw):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t


def peak_rss_of(cmd):
    """Runs cmd in a fresh child and returns its peak RSS in MiB (ru_maxrss of the waited child)."""
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.execv(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, cmd
    return usage.ru_maxrss / 1024.0


def series_dirs(cap_root):
    import reference_prep

    return [(e["image"], sdir) for e, sdir in reference_prep.cap_series_dirs(cap_root)[0]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=os.path.join(ROOT, "out", "bench"))
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--slice-size", default="512x512")
    ap.add_argument("--rss-cases", type=int, default=4)
    ap.add_argument("--read-passes", type=int, default=10,
                    help="passes over the volumes in the warm reader comparison (each side; ~20 volumes a pass)")
    ap.add_argument("--resize-mode", choices=["trilinear", "area"], default="trilinear",
                    help="Cap resize on both sides: the current reference script's (trilinear, MONAI mode "
                         "'bilinear') or its first release's (area)")
    args = ap.parse_args()
    ref_mode = {"trilinear": "bilinear", "area": "area"}[args.resize_mode]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import reference_prep

    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    raw = os.path.join(args.work, "raw")
    run([prep_bin(), "synth", raw, "--cap-cases", str(args.cases), "--slice-size", args.slice_size,
         "--seg-datasets", "1", "--seg-cases", "1", "--refseg-cases", "1"])
    cap_root = os.path.join(raw, "M3D_Cap")
    series = series_dirs(cap_root)
    n = len(series)
    results = {"volumes": n, "slice_size": args.slice_size, "resize_mode": args.resize_mode}

    # 1. conversion throughput, one core each.
    ref_out = os.path.join(args.work, "ref_npy")
    t = time.perf_counter()
    for image, sdir in series:
        dst = os.path.join(ref_out, image)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        np.save(dst, reference_prep.cap_series(sdir, ref_mode))
    ref_s = time.perf_counter() - t
    shards = os.path.join(args.work, "shards")
    ours_s = run([prep_bin(), "cap", "--src", cap_root, "--out", shards, "--threads", "1", "--force",
                "--resize-mode", args.resize_mode])
    results["convert"] = {"reference_s": ref_s, "m3d_s": ours_s, "reference_vol_per_s": n / ref_s,
                          "m3d_vol_per_s": n / ours_s, "ratio": ref_s / ours_s}

    # 1b. decoding alone over the same slices (files in the page cache, as in 1.), one core each: its share of
    # each side's conversion time. Reference: np.array(Image.open(p).convert("L")); m3d: the converter's decoder
    # (formats/examples/decode_bench.rs).
    from PIL import Image

    slice_files = [os.path.join(sdir, f) for _, sdir in series for f in os.listdir(sdir)
                   if f.endswith(".png") or f.endswith(".jpeg")]
    t = time.perf_counter()
    for f in slice_files:
        np.array(Image.open(f).convert("L"))
    ref_dec = time.perf_counter() - t
    dec = json.loads(subprocess.run([os.path.join(target_dir(), "release", "examples", "decode_bench")]
                                    + [sdir for _, sdir in series], check=True, capture_output=True,
                                    text=True).stdout.strip().splitlines()[-1])
    assert dec["slices"] == len(slice_files), (dec, len(slice_files))
    results["decode"] = {"slices": len(slice_files), "reference_s": ref_dec, "m3d_s": dec["seconds"],
                         "reference_share": ref_dec / ref_s, "m3d_share": dec["seconds"] / ours_s}

    # 2. bytes per volume.
    manifest = json.load(open(os.path.join(shards, "manifest.json")))
    if "shard_list" in manifest:  # the shard lists in their own object (manifest version 2)
        manifest.update(json.load(open(os.path.join(shards, manifest["shard_list"]["key"]))))
    shard_bytes = sum(e["bytes"] for e in manifest["volume_shards"])
    npy_bytes = [os.path.getsize(os.path.join(ref_out, image)) for image, _ in series]
    results["bytes"] = {"m3d_per_volume": shard_bytes / n, "reference_per_volume": sum(npy_bytes) / n,
                        "ratio": (shard_bytes / n) / (sum(npy_bytes) / n)}

    # 3. reader throughput, one core each: decode + augment to f32.
    train_tf = reference_train_transform(42)
    passes = args.read_passes
    t = time.perf_counter()
    for _ in range(passes):
        for image, _ in series:
            x = train_tf(np.load(os.path.join(ref_out, image)))
            assert x.shape == (1, 32, 256, 256)
    ref_read = passes * n / (time.perf_counter() - t)
    bench = os.path.join(target_dir(), "release", "examples", "read_bench")
    # read_bench runs with the `m3d` binary's allocator policy (m3d-allocator), as the workers' reads do.
    out = subprocess.run([bench, shards, "--passes", str(passes), "--threads", "1"], check=True,
                         capture_output=True, text=True).stdout
    ours_read = json.loads(out.strip().splitlines()[-1])["volumes_per_s"]
    rb = json.loads(out.strip().splitlines()[-1])
    results["read"] = {"reference_vol_per_s": ref_read, "m3d_vol_per_s": ours_read, "ratio": ours_read / ref_read,
                       "m3d_read_s": rb.get("read_s"), "m3d_augment_s": rb.get("augment_s")}

    # 3b. the same, one pass each from a cold page cache (as when a dataset is larger than memory): needs root.
    def drop_caches():
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return True
        except OSError:
            return False

    if drop_caches():
        t = time.perf_counter()
        for image, _ in series:
            train_tf(np.load(os.path.join(ref_out, image)))
        ref_cold = n / (time.perf_counter() - t)
        drop_caches()
        out = subprocess.run([bench, shards, "--passes", "1", "--threads", "1"], check=True,
                             capture_output=True, text=True).stdout
        ours_cold = json.loads(out.strip().splitlines()[-1])["volumes_per_s"]
        results["read_cold"] = {"reference_vol_per_s": ref_cold, "m3d_vol_per_s": ours_cold,
                                "ratio": ours_cold / ref_cold}

    # 4. peak RSS, N vs 10 N volumes (same slices, more cases).
    rss = {}
    for cases in (args.rss_cases, 10 * args.rss_cases):
        r = os.path.join(args.work, f"rss_raw_{cases}")
        run([prep_bin(), "synth", r, "--cap-cases", str(cases), "--slice-size", args.slice_size,
             "--seg-datasets", "1", "--seg-cases", "1", "--refseg-cases", "1"])
        vols = len(series_dirs(os.path.join(r, "M3D_Cap")))
        mib = peak_rss_of([prep_bin(), "cap", "--src", os.path.join(r, "M3D_Cap"),
                           "--out", os.path.join(args.work, f"rss_out_{cases}"), "--threads", "2"])
        rss[str(vols)] = mib
    results["peak_rss_mib"] = rss
    print(json.dumps(results, indent=2))
    c, b, r, d = results["convert"], results["bytes"], results["read"], results["decode"]
    (n_small, rss_small), (n_big, rss_big) = sorted(((int(k), v) for k, v in rss.items()))
    print(f"""
| benchmark | reference | m3d | ratio | target |
| --- | --- | --- | --- | --- |
| 1. conversion, volumes/s on one core ({n} series, {args.slice_size} slices) | {c['reference_vol_per_s']:.2f} | {c['m3d_vol_per_s']:.2f} | {c['ratio']:.2f}x | >= 1.8x |
| 1b. decoding the {d['slices']} slices alone, s (share of the side's conversion time) | {d['reference_s']:.2f} ({100 * d['reference_share']:.0f} %) | {d['m3d_s']:.2f} ({100 * d['m3d_share']:.0f} %) | {d['reference_s'] / d['m3d_s']:.2f}x | m3d share >= 70 % |
| 2. bytes per volume | {b['reference_per_volume'] / 2**20:.2f} MiB | {b['m3d_per_volume'] / 2**20:.2f} MiB | {b['ratio']:.3f} | <= 0.25 |
| 3. reader, volumes/s decoded + augmented on one core | {r['reference_vol_per_s']:.1f} | {r['m3d_vol_per_s']:.1f} | {r['ratio']:.2f}x | >= 2x |
| 4. peak RSS converting {n_small} vs {n_big} volumes | | {rss_small:.0f} MiB vs {rss_big:.0f} MiB | {rss_big / rss_small:.2f} | flat (~1.0) |
""")
    if "read_cold" in results:
        rc = results["read_cold"]
        print(f"| 3b. reader, cold page cache, one pass | {rc['reference_vol_per_s']:.1f} | {rc['m3d_vol_per_s']:.1f} | {rc['ratio']:.2f}x | |")


if __name__ == "__main__":
    main()
