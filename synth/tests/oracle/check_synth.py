"""Independent check of a dataset written by m3d-synth, reading every file the way the reference
M3D scripts do (PIL .convert("L"), numeric slice order, most-common-shape filter, scipy.sparse.load_npz
with the shape taken from the file name, nibabel for NIfTI) and comparing with synth_truth.json.

Usage: check_synth.py <root>. Prints one line per failure and exits 1 if there is any.
"""

import ast
import collections
import csv
import json
import os
import sys
import unicodedata

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import sparse

ROOT = sys.argv[1]
ERRORS = []
STATS = collections.Counter()


def check(cond, msg):
    if not cond:
        ERRORS.append(msg)
    return cond


def fold(name):
    return "".join(c for c in unicodedata.normalize("NFD", name) if unicodedata.category(c) != "Mn")


def caption(raw):
    """The published caption rule: findings, else discussion, else everything (>= 5 non-space chars)."""

    def after(marker):
        i = raw.find(marker)
        return (raw[i + len(marker):] if i != -1 else raw).replace("\n", " ").strip()

    def ok(t):
        return len(t.replace("\n", "").replace(" ", "")) >= 5

    if "study_findings:" not in raw and "discussion:" not in raw:
        STATS["text_branch_plain"] += 1
    t = after("study_findings:")
    if ok(t):
        if "study_findings:" in raw:
            STATS["text_branch_findings"] += 1
        return t
    t = after("discussion:")
    if ok(t):
        STATS["text_branch_discussion"] += 1
        return t
    return raw.replace("\n", " ").strip()


def ellipsoid_mask(shape, centre, radii):
    idx = np.indices(shape, dtype=np.float64)
    d = sum(((idx[a] - centre[a]) / radii[a]) ** 2 for a in range(3))
    return d


# ---------------------------------------------------------------- Cap
truth = json.load(open(os.path.join(ROOT, "synth_truth.json")))
cap_root = os.path.join(ROOT, "M3D_Cap")
splits = json.load(open(os.path.join(cap_root, "M3D_Cap.json")))
check(list(splits) == ["train", "validation", "test", "hard_test"], f"Cap JSON keys {list(splits)}")
cap_truth = {c["image"]: c for c in truth["cap"]}
split_of = {}
captions = {}
for split in ["train", "validation", "test"]:
    for e in splits[split]:
        check(set(e) == {"image", "text"}, f"Cap entry keys {sorted(e)}")
        check(e["image"] not in split_of, f"{e['image']} in two splits")
        split_of[e["image"]] = split
check(set(split_of) == set(cap_truth), "Cap JSON and truth list different series")
check(all(split_of.get(e["image"]) == "test" for e in splits["hard_test"]), "hard_test not a subset of test")
check(len(splits["hard_test"]) > 0, "hard_test empty")

# every series folder on disk appears once
on_disk = set()
for coll in ["ct_case", "ct_quizze"]:
    for cid in os.listdir(os.path.join(cap_root, coll)):
        cdir = os.path.join(cap_root, coll, cid)
        check(len(cid) == 6 and cid.isdigit(), f"case id {cid}")
        for s in os.listdir(cdir):
            if os.path.isdir(os.path.join(cdir, s)):
                on_disk.add(f"{coll}/{cid}/{fold(s)}.npy")
                if fold(s) != s:
                    STATS["diacritic_series"] += 1
check(on_disk == set(split_of), "series folders on disk differ from the JSON")

PIXEL = {}
for image, t in sorted(cap_truth.items()):
    case_dir = os.path.join(cap_root, os.path.dirname(image))
    stem = os.path.basename(image)[: -len(".npy")]
    matches = [d for d in os.listdir(case_dir) if os.path.isdir(os.path.join(case_dir, d)) and fold(d) == stem]
    if not check(len(matches) == 1, f"{image}: {len(matches)} folders fold to it"):
        continue
    sdir = os.path.join(case_dir, matches[0])
    with open(os.path.join(cap_root, t["text"]), encoding="utf-8") as f:
        raw = f.read()
    cap = caption(raw)
    captions[image] = cap
    check(cap == t["caption"], f"{image}: caption differs from truth")
    files = [f for f in os.listdir(sdir) if f.endswith(".png") or f.endswith(".jpeg")]
    check(len(files) == len(os.listdir(sdir)), f"{sdir}: non-slice files")
    files.sort(key=lambda x: int(os.path.splitext(x)[0]))
    if sorted(files) != files:
        STATS["lexical_differs"] += 1
    opened = [Image.open(os.path.join(sdir, f)) for f in files]
    if any(im.mode == "RGB" for im in opened):
        STATS["rgb_series"] += 1
    if files[0].endswith(".jpeg"):
        STATS["jpeg_series"] += 1
    imgs = [np.array(im.convert("L")) for im in opened]
    common = collections.Counter(i.shape for i in imgs).most_common(1)[0][0]
    kept = [f for f, i in zip(files, imgs) if i.shape == common]
    if len(kept) < len(files):
        STATS["stray_slices"] += len(files) - len(kept)
    check(kept == t["slice_files"], f"{image}: kept slices differ from truth")
    vol = np.stack([i for i in imgs if i.shape == common]).astype(np.float64)
    if not check(list(vol.shape) == t["shape"], f"{image}: shape {vol.shape} vs {t['shape']}"):
        continue
    # plane: only axial slices leave air above and below the body in every slice
    mid = vol[vol.shape[0] // 2]
    axial_like = mid[0].max() == 0 and mid[-1].max() == 0
    check(axial_like == (t["plane"] == "axial"), f"{image}: plane {t['plane']} but axial_like={axial_like}")
    organs = {o["name"]: o for o in t["organs"]}
    dist = {n: ellipsoid_mask(vol.shape, o["centre_vox"], o["radii_vox"]) for n, o in organs.items()}
    order = [o["name"] for o in t["organs"]]  # painting order

    def own(name, scale=1.0):
        m = dist[name] <= scale**2
        for later in order[order.index(name) + 1:]:
            m &= dist[later] > 1.0
        return m

    def mean_in(mask):
        return vol[mask].mean() if mask.any() else None

    aorta = mean_in(own("aorta", 0.7))
    bladder = mean_in(own("bladder", 0.7))
    ph = t["phase"]
    if aorta is not None:
        if ph == "non_contrast":
            check(aorta < 150, f"{image}: aorta {aorta:.0f} too bright for non-contrast")
        if ph == "arterial":
            check(aorta > 235, f"{image}: aorta {aorta:.0f} too dark for arterial")
    if bladder is not None:
        check((bladder > 200) == (ph == "delayed"), f"{image}: bladder {bladder:.0f} in phase {ph}")
    check(vol[0, 0, 0] == 0 or t["plane"] != "axial", f"{image}: air corner not 0")
    les = t["lesion"]
    if les is not None and check(les["voxels"] > 0, f"{image}: lesion has no voxels"):
        host = les["organ"]
        lmask = (ellipsoid_mask(vol.shape, les["centre_vox"], les["radius_vox"]) <= 1.0) & own(host)
        ring = own(host, 0.9) & (ellipsoid_mask(vol.shape, les["centre_vox"], [r * 1.8 for r in les["radius_vox"]]) > 1.0)
        lm, om = mean_in(lmask), mean_in(ring)
        if check(lm is not None and om is not None, f"{image}: lesion or organ not sampled"):
            if les["kind"] == "cyst":
                check(lm < om - 8, f"{image}: cyst {lm:.0f} not darker than {host} {om:.0f}")
            else:
                check(lm > om + 8, f"{image}: {les['kind']} {lm:.0f} not brighter than {host} {om:.0f}")
        # location answer derived from voxel geometry; axes per plane (slice, row, column)
        oc, lc = organs[host]["centre_vox"], les["centre_vox"]
        x_axis, z_axis = {"axial": (2, 0), "coronal": (2, 1), "sagittal": (0, 1)}[t["plane"]]
        sup = lc[z_axis] < oc[z_axis]
        left = lc[x_axis] > oc[x_axis]
        PIXEL[image] = ("Superior" if sup else "Inferior") + " part, " + ("left" if left else "right") + " side"
    STATS["cap_volumes"] += 1

for k in ["text_branch_findings", "text_branch_discussion", "text_branch_plain", "diacritic_series",
          "rgb_series", "jpeg_series", "stray_slices", "lexical_differs"]:
    check(STATS[k] > 0, f"Cap never exercises {k}")

# ---------------------------------------------------------------- VQA
COLS = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
        "Answer", "Answer Choice"]
PHASE = {"non_contrast": "Non-contrast", "arterial": "Arterial phase", "portal_venous": "Portal venous phase",
         "delayed": "Delayed phase"}
KIND = {"cyst": "Cyst", "hyperdense_mass": "Hyperdense mass", "calcification": "Calcification"}
vqa_root = os.path.join(ROOT, "M3D_VQA")
for name, split, extra, yn in [("M3D_VQA_train.csv", "train", [], False), ("M3D_VQA_val.csv", "validation", [], False),
                               ("M3D_VQA_test.csv", "test", ["Note"], False), ("M3D_VQA_test5k.csv", "test", [], False),
                               ("M3D_VQA_yn_train.csv", "train", [], True)]:
    with open(os.path.join(vqa_root, name), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    check(rows[0] == COLS + extra, f"{name}: header {rows[0]}")
    types = set()
    answers = collections.Counter()
    for r in rows[1:]:
        row = dict(zip(rows[0], r))
        check(len(r) == len(rows[0]), f"{name}: row width {len(r)}")
        img = row["Image Path"]
        if not check(split_of.get(img) == split, f"{name}: {img} not in split {split}"):
            continue
        t = cap_truth[img]
        check(row["Text"] == captions[img], f"{name}: Text of {img} is not its caption")
        qt = int(row["Question Type"])
        types.add(qt)
        if yn:
            check(row["Answer"] in ("Yes", "No"), f"{name}: answer {row['Answer']}")
            check(all(row[c] == "" for c in ["Choice A", "Choice B", "Choice C", "Choice D", "Answer Choice"]),
                  f"{name}: yes/no row with choices")
            answers[row["Answer"]] += 1
            q = row["Question"]
            if qt == 1:
                check((t["plane"] in q) == (row["Answer"] == "Yes"), f"{name}: {q} -> {row['Answer']} ({t['plane']})")
            if qt == 3:
                check((f"the {t['lesion']['organ']}?" in q) == (row["Answer"] == "Yes"), f"{name}: {q}")
            continue
        chosen = row["Choice " + row["Answer Choice"]]
        check(chosen == row["Answer"], f"{name}: Answer {row['Answer']!r} is not choice {row['Answer Choice']}")
        check(len({row[c] for c in ["Choice A", "Choice B", "Choice C", "Choice D"]}) == 4, f"{name}: repeated choices")
        answers[row["Answer Choice"]] += 1
        expect = {1: t["plane"].capitalize(), 2: PHASE[t["phase"]],
                  3: t["lesion"]["organ"].capitalize(), 4: KIND[t["lesion"]["kind"]], 5: PIXEL.get(img)}[qt]
        check(row["Answer"] == expect, f"{name}: type {qt} of {img}: {row['Answer']!r} vs {expect!r}")
    if name == "M3D_VQA_train.csv":
        check(types == {1, 2, 3, 4, 5}, f"{name}: question types {types}")
        check(len(answers) >= 3, f"{name}: answer letters not spread {answers}")
    if yn:
        check(answers["Yes"] > 0 and answers["No"] > 0, f"{name}: {answers}")
    STATS[name] = len(rows) - 1
raw = open(os.path.join(vqa_root, "M3D_VQA_train.csv"), encoding="utf-8").read()
check('""' in raw, "VQA train CSV has no quoted quote")

# ---------------------------------------------------------------- Seg
def normalize(ct):
    v = ct.flatten()
    fg = v[v > np.mean(v)]
    lo, hi = np.percentile(fg, 0.05), np.percentile(fg, 99.95)
    return (np.clip(ct, lo, hi) - np.mean(fg)) / max(np.std(fg), 1e-8)


seg_root = os.path.join(ROOT, "M3D_Seg")
seg_truth = {s["label"]: s for s in truth["seg"]}
KEYS = ["name", "description", "tensorImageSize", "modality", "labels", "numTrain", "numTest", "train", "test"]
empty_channels = 0
seen = set()
for code in sorted(os.listdir(seg_root)):
    d = json.load(open(os.path.join(seg_root, code, code + ".json")))
    check(list(d) == KEYS, f"Seg {code}: keys {list(d)}")
    check(d["tensorImageSize"] == "4D" and d["modality"] == {"0": "CT"}, f"Seg {code}: header")
    labels = d["labels"]
    check(list(labels) == [str(i) for i in range(len(labels))] and labels["0"] == "background", f"Seg {code}: labels")
    check(d["numTrain"] == len(d["train"]) and d["numTest"] == len(d["test"]), f"Seg {code}: counts")
    n = d["numTrain"] + d["numTest"]
    check(d["numTest"] == max(1, round(n * 0.2)), f"Seg {code}: split {d['numTrain']}:{d['numTest']}")
    for pair in d["train"] + d["test"]:
        ipath = os.path.join(seg_root, pair["image"])
        mpath = os.path.join(seg_root, pair["label"])
        seen.add(pair["label"])
        t = seg_truth[pair["label"]]
        check(t["test"] == (pair in d["test"]), f"{mpath}: split differs from truth")
        img = np.load(ipath)
        check(img.dtype == np.float32 and img.ndim == 4 and img.shape[0] == 1, f"{ipath}: {img.dtype} {img.shape}")
        mask_shape = ast.literal_eval(mpath.split(".")[-2].split("_")[-1])
        check(os.path.basename(mpath) == "mask_" + str(mask_shape) + ".npz", f"{mpath}: name not Python's tuple str")
        sp = sparse.load_npz(mpath)
        check(sp.format == "csr", f"{mpath}: format {sp.format}")
        C = len(labels) - 1
        check(mask_shape == (C,) + img.shape[1:], f"{mpath}: shape {mask_shape} vs image {img.shape}")
        check(sp.shape == (C, int(np.prod(img.shape[1:]))), f"{mpath}: sparse shape {sp.shape}")
        mask = sp.toarray().reshape(mask_shape)
        check(mask.sum(axis=0).max() <= 1, f"{mpath}: overlapping channels")
        organs = {o["name"]: o for o in t["organs"]}
        for i in range(C):
            name = labels[str(i + 1)]
            n_vox = int(mask[i].sum())
            if n_vox == 0:
                empty_channels += 1
                check(name not in organs or organs[name]["voxels"] == 0, f"{mpath}: channel {i} ({name}) empty")
                continue
            if not check(name in organs, f"{mpath}: channel {i} ({name}) not in body"):
                continue
            o = organs[name]
            inside = ellipsoid_mask(mask_shape[1:], o["centre_vox"], o["radii_vox"]) <= 1.0 + 1e-2
            check(not (mask[i].astype(bool) & ~inside).any(), f"{mpath}: channel {i} voxels outside the {name}")
            check(n_vox == o["voxels"], f"{mpath}: channel {i} has {n_vox} voxels, truth {o['voxels']}")
        src_img = nib.load(os.path.join(os.path.dirname(ipath), "source", "image.nii.gz"))
        src_lab = nib.load(os.path.join(os.path.dirname(ipath), "source", "label.nii.gz"))
        check(src_img.get_data_dtype() == np.int16, f"{ipath}: source dtype {src_img.get_data_dtype()}")
        check(src_lab.get_data_dtype() == np.uint8, f"{ipath}: label dtype {src_lab.get_data_dtype()}")
        ct = src_img.get_fdata()
        lab = src_lab.get_fdata()
        check(ct.shape == img.shape[1:] and lab.shape == img.shape[1:], f"{ipath}: source shapes {ct.shape} {lab.shape}")
        check(ct.min() == -1000, f"{ipath}: no air background ({ct.min()})")
        onehot = np.stack([(lab == i + 1) for i in range(C)]).astype(mask.dtype)
        check(np.array_equal(onehot, mask), f"{mpath}: differs from one-hot of source/label.nii.gz")
        ref = normalize(ct)
        err = np.abs(ref - img[0]).max()
        check(err < 1e-4 * max(1.0, np.abs(ref).max()), f"{ipath}: normalisation differs by {err}")
        STATS["seg_cases"] += 1
check(seen == set(seg_truth), "Seg JSON and truth list different cases")
check(empty_channels > 0, "no Seg case has an empty channel")

# ---------------------------------------------------------------- RefSeg
rs_root = os.path.join(ROOT, "M3D_RefSeg")
rs_truth = {c["case"]: c for c in truth["refseg"]}
texts = {}
for case, t in rs_truth.items():
    cdir = os.path.join(rs_root, case)
    ct = nib.load(os.path.join(cdir, "ct.nii.gz"))
    mk = nib.load(os.path.join(cdir, "mask.nii.gz"))
    check(ct.get_data_dtype() == np.int16, f"{case}: ct dtype {ct.get_data_dtype()}")
    check(list(ct.shape) == t["shape"] and mk.shape == ct.shape, f"{case}: shapes {ct.shape} {mk.shape}")
    ctv = ct.get_fdata()
    check(np.percentile(ctv, 0.5) == -1000, f"{case}: percentile crop would not find air")
    m = mk.get_fdata()
    text = json.load(open(os.path.join(cdir, "text.json")))
    texts[case] = text
    ids = sorted(int(k) for k in text)
    check(ids == list(range(1, len(ids) + 1)) and len(ids) >= 1, f"{case}: text.json ids {ids}")
    check(sorted(np.unique(m).astype(int).tolist()) == [0] + ids, f"{case}: mask ids {np.unique(m)}")
    for r in t["regions"]:
        l = r["lesion"]
        region = m == r["id"]
        check(text[str(r["id"])] == r["description"], f"{case}: text of region {r['id']}")
        check(l["organ"] in text[str(r["id"])], f"{case}: region {r['id']} text does not name its organ")
        sphere = ellipsoid_mask(m.shape, l["centre_vox"], l["radius_vox"]) <= 1.0 + 1e-2
        check(not (region & ~sphere).any(), f"{case}: region {r['id']} outside its lesion sphere")
        check(int(region.sum()) == l["voxels"], f"{case}: region {r['id']} voxel count")
        inside = ctv[region].mean()
        check((inside < 60) == (l["kind"] == "cyst"), f"{case}: region {r['id']} HU {inside:.0f} for {l['kind']}")
RS_COLS = ["Image", "Mask", "Mask_ID", "Question_Type", "Question", "Answer"]
cases_by_split = {}
for name in ["M3D_RefSeg_train.csv", "M3D_RefSeg_test.csv"]:
    with open(os.path.join(rs_root, name), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    check(rows[0] == RS_COLS, f"{name}: header {rows[0]}")
    qts = set()
    cs = set()
    for r in rows[1:]:
        row = dict(zip(RS_COLS, r))
        case = row["Image"].split("/")[0]
        cs.add(case)
        check(row["Image"] == f"{case}/ct.nii.gz" and row["Mask"] == f"{case}/mask.nii.gz", f"{name}: paths {r[:2]}")
        check(row["Mask_ID"] in texts.get(case, {}), f"{name}: Mask_ID {row['Mask_ID']} of {case}")
        check(rs_truth[case]["test"] == (name == "M3D_RefSeg_test.csv"), f"{name}: {case} in the wrong split")
        check("[SEG]" in row["Answer"], f"{name}: answer without [SEG]")
        qts.add(row["Question_Type"])
    check(qts == {"0", "1"}, f"{name}: question types {qts}")
    cases_by_split[name] = cs
    STATS[name] = len(rows) - 1
check(not (cases_by_split["M3D_RefSeg_train.csv"] & cases_by_split["M3D_RefSeg_test.csv"]), "RefSeg case in both splits")

print(json.dumps(dict(STATS), sort_keys=True))
for e in ERRORS:
    print("FAIL:", e)
sys.exit(1 if ERRORS else 0)
