#!/usr/bin/env bash
# Sets up (see setup.sh) and runs the main job on the embedded defaults: synthesise M3D-Data in the published
# layouts, convert all four datasets into shards in a local object store (./out/shards), verify every checksum
# and render a volume of each to PNG. Training replaces this job in a later milestone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
OUT="${M3D_DEMO_OUT:-$PWD/out}"
rm -rf "$OUT/synth"
"$M3D_BIN" data-prep synth "$OUT/synth"
"$M3D_BIN" data-prep cap    --src "$OUT/synth/M3D_Cap"    --out "$OUT/shards/cap"
"$M3D_BIN" data-prep vqa    --src "$OUT/synth/M3D_VQA"    --out "$OUT/shards/vqa" --cap "$OUT/shards/cap"
"$M3D_BIN" data-prep seg    --src "$OUT/synth/M3D_Seg"    --out "$OUT/shards/seg"
"$M3D_BIN" data-prep refseg --src "$OUT/synth/M3D_RefSeg" --out "$OUT/shards/refseg"
for ds in cap seg refseg; do
  "$M3D_BIN" data-prep inspect "$OUT/shards/$ds" --verify --png "$OUT/$ds.png"
done
"$M3D_BIN" data-prep inspect "$OUT/shards/vqa" --show-samples 2
"$M3D_BIN" data-prep inspect "$OUT/shards/seg" --show-samples 3 --describe | tail -n 12
echo "demo done: shards in $OUT/shards, renders in $OUT/*.png"
