"""Per-core timings of the Python reference for the hot transforms (compare with
`cargo run --release -p m3d-volume --example transforms_bench` under RAYON_NUM_THREADS=1)."""

import time

import numpy as np
import torch
import monai.transforms as mtf

torch.set_num_threads(1)


def bench(label, reps, f):
    # Best of `reps` runs, as the Rust example reports.
    f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    print(f"{label:<52} {best * 1e3:8.2f} ms")


rng = np.random.default_rng(1)
vol = np.zeros((1, 100, 512, 512), np.float32)
vol[:, :, 40:480, 30:490] = rng.integers(0, 256, (1, 100, 440, 460)).astype(np.float32) / 255.0
cap = mtf.Compose([mtf.CropForeground(), mtf.Resize(spatial_size=[32, 256, 256])])


def cap_chain():
    image = vol - vol.min()
    image = image / np.clip(image.max(), a_min=1e-8, a_max=None)
    return cap(image)


bench("cap chain 1x100x512x512 -> 32x256x256 (area)", 3, cap_chain)
bench("  resize area only", 3, lambda: mtf.Resize(spatial_size=[32, 256, 256])(vol))
bench("resize trilinear", 3, lambda: mtf.Resize(spatial_size=[32, 256, 256], mode="trilinear")(vol))
img = np.asarray(mtf.Resize(spatial_size=[32, 256, 256])(vol))


def aug(k, flips):
    y = torch.as_tensor(img)
    if k:
        y = mtf.Rotate90(k=k, spatial_axes=(1, 2))(y)
    for a in flips:
        y = mtf.Flip(spatial_axis=a)(y)
    y = mtf.ScaleIntensity(minv=None, maxv=None, factor=0.05)(y)
    return mtf.ShiftIntensity(offset=0.01)(y)


bench("augment k=0 no flip", 20, lambda: aug(0, []))
bench("augment k=1 flips", 20, lambda: aug(1, [0, 1]))
bench("augment k=3 flip W", 20, lambda: aug(3, [2]))
