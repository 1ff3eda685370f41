#!/usr/bin/env bash
# Sets up (see setup.sh) and runs the main job on the embedded defaults: synthesise M3D-Data in the published
# layouts, convert it into shards in a local object store (./out/shards), then train on this machine's CPUs
# with a coordinator and two worker processes: tiny M3D-CLIP pretraining, then LaMed stage 1 (projector) and
# stage 2 (LoRA) — on captions and VQA, then on all four M3D tasks with the segmentation module — each writing
# metrics, a loss plot and its final weights under ./runs; then M3D-Bench on the last LaMed (a few samples of
# each task) and one generated answer with its mask.
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
"$M3D_BIN" data-prep inspect "$OUT/shards/cap" --verify --png "$OUT/cap.png"
sets=(--set "data.tasks.0.shards=[$OUT/shards/cap]")
lamed_sets=("${sets[@]}" --set "data.tasks.1.shards=[$OUT/shards/vqa]" --set "data.tasks.1.volumes=[$OUT/shards/cap]")
"$M3D_BIN" train recipes/clip-tiny.yaml --workers 2 --fresh "${sets[@]}"
"$M3D_BIN" eval retrieval --model runs/clip-tiny/final --shards "$OUT/shards/cap" --split train
"$M3D_BIN" train recipes/lamed-stage1-tiny.yaml --workers 2 --fresh "${lamed_sets[@]}"
"$M3D_BIN" train recipes/lamed-stage2-tiny.yaml --workers 2 --fresh "${lamed_sets[@]}"
"$M3D_BIN" train recipes/lamed-stage2-seg-tiny.yaml --workers 2 --fresh "${lamed_sets[@]}" \
  --set "data.tasks.2.shards=[$OUT/shards/seg]" --set "data.tasks.3.shards=[$OUT/shards/refseg]"
# M3D-Bench on the test splits (a few samples of each task, on 2 ranks), and one answer with its mask.
LAMED=runs/lamed-stage2-seg-tiny
"$M3D_BIN" eval bench --model "$LAMED/final" --clip runs/clip-tiny/final --volumes "$OUT/shards/cap" \
  --data "$OUT/shards/cap" --data "$OUT/shards/vqa" --data "$OUT/shards/seg" --data "$OUT/shards/refseg" \
  --tasks cap,vqa-closed,vqa-open,rec,reg,seg,refseg,retrieval --limit 4 --max-new-tokens 16 --workers 2 \
  -o "$LAMED/bench"
case_dir=$(find "$OUT/synth/M3D_Seg" -name image.npy -print -quit)
"$M3D_BIN" generate --model "$LAMED/final" --image "$case_dir" --task seg --target liver --max-new-tokens 16 \
  --out "$LAMED/answers"
echo "demo done: shards in $OUT/shards; runs (metrics.jsonl, loss.png, final/) in runs/{clip-tiny,lamed-stage1-tiny,lamed-stage2-tiny,lamed-stage2-seg-tiny}; M3D-Bench report in $LAMED/bench/bench.md"
