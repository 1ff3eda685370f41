"""Oracle: the reference M3D preprocessing (PIL + numpy + scipy + nibabel + MONAI), step by step as in
BAAI-DCAI/M3D Data/process/m3d_{cap,seg,refseg}_data_prepare.py, applied to a raw synthetic dataset.

Usage: reference_prep.py <synth root> <out dir> [--cap-resize bilinear|area]
--cap-resize: the Cap script's Resize mode. Default "bilinear", the current script's (2024-06-12 to HEAD;
MONAI applies it as trilinear in 3-D); "area" is MONAI's default, which the first release (2024-04-28) used.
Writes, per volume, <out>/<dataset>/<volume id with / -> __>.image.npy (float32, 1x32x256x256) and, where the
dataset has masks, .mask.npy; <out>/expected.json with caption texts and Seg boxes; and <out>/M3D_Cap_npy, the
prepared tree the reference Cap script leaves behind. bench/data_prep.py imports cap_series/cap_series_dirs.
"""
import ast
import json
import os
import sys
from collections import Counter

import monai.transforms as mtf
import nibabel as nib
import numpy as np
from monai.data import set_track_meta
from PIL import Image
from scipy import sparse
from unidecode import unidecode

set_track_meta(False)

# The reference Cap script's transform. Current version: `mtf.Resize(spatial_size=[32, 256, 256], mode="bilinear")`;
# the first release gave no mode (MONAI's default, "area").
CAP_TF = {
    "bilinear": mtf.Compose([mtf.CropForeground(), mtf.Resize(spatial_size=[32, 256, 256], mode="bilinear")]),
    "area": mtf.Compose([mtf.CropForeground(), mtf.Resize(spatial_size=[32, 256, 256])]),
}
SEG_TF = mtf.Compose([
    mtf.EnsureTyped(keys=["image", "label"], track_meta=False),
    mtf.CropForegroundd(keys=["image", "label"], source_key="image"),
    mtf.Resized(keys=["image", "label"], spatial_size=[32, 256, 256], mode=["trilinear", "nearest"]),
])
REFSEG_TF = mtf.Compose([
    mtf.ScaleIntensityRangePercentilesd(keys=["image"], lower=0.5, upper=99.5, b_max=1.0, b_min=0.0, clip=True),
    mtf.CropForegroundd(keys=["image", "seg"], source_key="image"),
    mtf.Resized(keys=["image", "seg"], spatial_size=[32, 256, 256], mode=["trilinear", "nearest"]),
])


def extract(text_content):
    def after(marker):
        i = text_content.find(marker)
        if i != -1:
            return text_content[i + len(marker):].replace("\n", " ").strip()
        return text_content.replace("\n", " ").strip()

    t = after("study_findings:")
    if len(t.replace("\n", "").replace(" ", "")) < 5:
        t = after("discussion:")
    if len(t.replace("\n", "").replace(" ", "")) < 5:
        t = text_content.replace("\n", " ").strip()
    return t


def cap_series(sdir, mode="bilinear"):
    """One raw series folder -> the float32 1x32x256x256 volume the reference script saves (`mode`: its Resize)."""
    files = [f for f in os.listdir(sdir) if f.endswith(".jpeg") or f.endswith(".png")]
    files.sort(key=lambda x: int(os.path.splitext(x)[0]))
    imgs = [np.array(Image.open(os.path.join(sdir, f)).convert("L")).astype(np.float32)[None] / 255.0 for f in files]
    common = Counter([i.shape for i in imgs]).most_common(1)[0][0]
    image = np.vstack([i for i in imgs if i.shape == common])[np.newaxis, ...]
    image = image - image.min()
    image = image / np.clip(image.max(), a_min=1e-8, a_max=None)
    return np.asarray(CAP_TF[mode](image)).astype(np.float32)


def cap_series_dirs(cap_root):
    """([(split entry, raw series folder)] for every distinct series in file order, the split dict)."""
    splits = json.load(open(os.path.join(cap_root, "M3D_Cap.json")))
    out, seen = [], set()
    for entries in splits.values():
        for e in entries:
            if e["image"] in seen:
                continue
            seen.add(e["image"])
            case_dir = os.path.join(cap_root, os.path.dirname(e["image"]))
            stem = os.path.splitext(os.path.basename(e["image"]))[0]
            series = [d for d in os.listdir(case_dir)
                      if os.path.isdir(os.path.join(case_dir, d)) and unidecode(d) == stem]
            assert len(series) == 1, (case_dir, stem, series)
            out.append((e, os.path.join(case_dir, series[0])))
    return out, splits


def main(root, out, cap_resize="bilinear"):
    expected = {"cap_text": {}, "seg_boxes": {}}

    def save(dataset, vid, name, arr):
        d = os.path.join(out, dataset)
        os.makedirs(d, exist_ok=True)
        np.save(os.path.join(d, vid.replace("/", "__") + "." + name + ".npy"), np.asarray(arr))

    # M3D-Cap
    cap_root = os.path.join(root, "M3D_Cap")
    prepared = os.path.join(out, "M3D_Cap_npy")
    series, splits = cap_series_dirs(cap_root)
    for e, sdir in series:
        image = cap_series(sdir, cap_resize)
        vid = e["image"][: -len(".npy")]
        save("cap", vid, "image", image)
        expected["cap_text"][vid] = extract(open(os.path.join(cap_root, e["text"])).read())
        os.makedirs(os.path.join(prepared, os.path.dirname(e["image"])), exist_ok=True)
        np.save(os.path.join(prepared, e["image"]), image)
        with open(os.path.join(prepared, e["text"]), "w") as f:
            f.write(expected["cap_text"][vid])
    with open(os.path.join(prepared, "M3D_Cap.json"), "w") as f:
        json.dump(splits, f)

    # M3D-Seg
    seg_root = os.path.join(root, "M3D_Seg")
    for code in sorted(os.listdir(seg_root)):
        jpath = os.path.join(seg_root, code, code + ".json")
        if not os.path.isfile(jpath):
            continue
        data = json.load(open(jpath))
        for pair in data["train"] + data["test"]:
            mask_path = os.path.join(seg_root, pair["label"])
            mask_shape = ast.literal_eval(mask_path.split(".")[-2].split("_")[-1])
            image = np.load(os.path.join(seg_root, pair["image"]))
            mask = sparse.load_npz(mask_path).toarray().reshape(mask_shape)
            image = np.swapaxes(image, -1, -3)
            mask = np.swapaxes(mask, -1, -3)
            image = image - image.min()
            image = image / np.clip(image.max(), a_min=1e-8, a_max=None)
            items = SEG_TF({"image": image, "label": mask})
            m = items["label"].numpy().astype(bool)
            vid = os.path.dirname(pair["image"])
            save("seg", vid, "image", items["image"].numpy().astype(np.float32))
            save("seg", vid, "mask", m.astype(np.uint8))
            boxes = {}
            for c in range(m.shape[0]):
                if m[c].sum() == 0:
                    continue
                nz = np.nonzero(m[c])
                sizes = m[c].shape
                boxes[str(c)] = ([round(int(a.min()) / n, 3) for a, n in zip(nz, sizes)]
                                 + [round(int(a.max()) / n, 3) for a, n in zip(nz, sizes)])
            expected["seg_boxes"][vid] = boxes

    # M3D-RefSeg
    ref_root = os.path.join(root, "M3D_RefSeg")
    for case in sorted(os.listdir(ref_root)):
        cdir = os.path.join(ref_root, case)
        if not os.path.isdir(cdir):
            continue
        ct = nib.load(os.path.join(cdir, "ct.nii.gz")).get_fdata().transpose(2, 0, 1)[np.newaxis, ...]
        seg = nib.load(os.path.join(cdir, "mask.nii.gz")).get_fdata().transpose(2, 0, 1)[np.newaxis, ...]
        items = REFSEG_TF({"image": ct, "seg": seg})
        save("refseg", case, "image", np.asarray(items["image"]).astype(np.float32))
        save("refseg", case, "mask", np.asarray(items["seg"]).astype(np.float32))

    json.dump(expected, open(os.path.join(out, "expected.json"), "w"))
    print(json.dumps({"cap": len(expected["cap_text"]), "seg": len(expected["seg_boxes"])}))


if __name__ == "__main__":
    args = sys.argv[1:]
    cap_resize = "bilinear"
    if "--cap-resize" in args:
        i = args.index("--cap-resize")
        cap_resize = args[i + 1]
        del args[i:i + 2]
    assert cap_resize in CAP_TF, f"--cap-resize {cap_resize}: expected one of {sorted(CAP_TF)}"
    main(args[0], args[1], cap_resize)
