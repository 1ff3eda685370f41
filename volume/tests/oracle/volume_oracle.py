"""Oracle for the m3d-volume transforms: applies the MONAI 1.6.1 / torch reference transforms.

Usage: volume_oracle.py JOBS_FILE

Each line of JOBS_FILE is `op arg...`; paths are .npy files. Every job writes its output .npy
(arrays are saved exactly as MONAI returns them, converted to numpy). Any failure raises, so the
calling Rust test sees a non-zero exit status.
"""

import sys

import numpy as np
import torch
import monai
import monai.transforms as mtf

assert monai.__version__.startswith("1.6"), f"expected MONAI 1.6.x, got {monai.__version__}"
torch.set_num_threads(1)


def as_np(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x)


def save(path, x):
    np.save(path, as_np(x))


def min_max(image):
    # The reference scripts' normalisation, in the array's dtype.
    image = image - image.min()
    return image / np.clip(image.max(), a_min=1e-8, a_max=None)


def run(op, args):
    if op == "resize":  # in out mode D H W
        src, out, mode, d, h, w = args
        x = np.load(src)
        y = mtf.Resize(spatial_size=(int(d), int(h), int(w)), mode=mode)(x)
        save(out, y)
    elif op == "crop_foreground":  # image out_image [mask out_mask]
        x = np.load(args[0])
        if len(args) == 2:
            save(args[1], mtf.CropForeground()(x))
        else:
            m = np.load(args[2])
            d = mtf.CropForegroundd(keys=["image", "seg"], source_key="image")({"image": x, "seg": m})
            save(args[1], d["image"])
            save(args[3], d["seg"])
    elif op == "min_max":  # in out
        save(args[1], min_max(np.load(args[0])))
    elif op == "percentiles":  # in out lower upper b_min b_max clip
        src, out, lo, hi, bmin, bmax, clip = args
        t = mtf.ScaleIntensityRangePercentiles(
            lower=float(lo), upper=float(hi), b_min=float(bmin), b_max=float(bmax), clip=clip == "1"
        )
        save(out, t(np.load(src)))
    elif op == "augment":  # in out k flipD flipH flipW scale|none shift|none
        src, out, k, fd, fh, fw, scale, shift = args
        x = np.load(src)
        # Integer arrays stand for masks: geometric transforms only, dtype kept.
        y = torch.as_tensor(x)
        if int(k) != 0:
            y = mtf.Rotate90(k=int(k), spatial_axes=(1, 2))(y)
        for axis, f in enumerate((fd, fh, fw)):
            if f == "1":
                y = mtf.Flip(spatial_axis=axis)(y)
        if scale != "none":
            y = mtf.ScaleIntensity(minv=None, maxv=None, factor=float(scale))(y)
        if shift != "none":
            y = mtf.ShiftIntensity(offset=float(shift))(y)
        save(out, y)
    elif op == "cap_chain":  # in out   (Data/process/m3d_cap_data_prepare.py)
        image = min_max(np.load(args[0]))
        t = mtf.Compose([mtf.CropForeground(), mtf.Resize(spatial_size=[32, 256, 256])])
        save(args[1], t(image))
    elif op == "seg_chain":  # image mask out_image out_mask D H W   (m3d_seg_data_prepare.py)
        img, msk, out_i, out_m, d, h, w = args
        t = mtf.Compose(
            [
                mtf.EnsureTyped(keys=["image", "label"], track_meta=False),
                mtf.CropForegroundd(keys=["image", "label"], source_key="image"),
                mtf.Resized(keys=["image", "label"], spatial_size=[int(d), int(h), int(w)], mode=["trilinear", "nearest"]),
            ]
        )
        image = np.swapaxes(np.load(img), -1, -3)
        mask = np.swapaxes(np.load(msk), -1, -3)
        image = min_max(image)
        items = t({"image": image, "label": mask})
        save(out_i, items["image"])
        save(out_m, items["label"])
    elif op == "refseg_chain":  # ct mask out_image out_mask D H W   (m3d_refseg_data_prepare.py)
        ct, msk, out_i, out_m, d, h, w = args
        t = mtf.Compose(
            [
                mtf.ScaleIntensityRangePercentilesd(keys=["image"], lower=0.5, upper=99.5, b_max=1.0, b_min=0.0, clip=True),
                mtf.CropForegroundd(keys=["image", "seg"], source_key="image"),
                mtf.Resized(keys=["image", "seg"], spatial_size=[int(d), int(h), int(w)], mode=["trilinear", "nearest"]),
            ]
        )
        image = np.load(ct).transpose(2, 0, 1)[np.newaxis, ...]
        mask = np.load(msk).transpose(2, 0, 1)[np.newaxis, ...]
        items = t({"image": image, "seg": mask})
        save(out_i, items["image"])
        save(out_m, items["seg"])
    else:
        raise ValueError(f"unknown op {op!r}")


def main():
    with open(sys.argv[1]) as f:
        for line in f:
            parts = line.split()
            if parts:
                run(parts[0], parts[1:])


if __name__ == "__main__":
    main()
