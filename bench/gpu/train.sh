#!/usr/bin/env bash
# Data-parallel training of the tiny M3D-CLIP on the GPUs of one machine: `m3d train --workers N
# --set workers.device=cuda` (one GPU per worker) against torchrun + PyTorch DDP with the nccl backend, the
# identical model and data (M3D's one-.npy-per-image layout read by a DataLoader), alternating in one run
# (bench/train_ddp.py compare --device cuda).
#   bash bench/gpu/train.sh                                  # every GPU, 2 rounds of 40 steps, 6 samples per GPU
#   M3D_GPUS=2 bash bench/gpu/train.sh --rounds 3 --steps 60 --num-workers 4
# Both sides run f32 (train.precision=f32: the reference loop has no autocast), global batch 6 x N.
# Prints, per round and side, the median and mean step time (s), samples/s, data-wait share and final loss
# (first 3 steps left out), pooled rows over all rounds, and the step-time ratio ours / reference.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
M3D_SKIP_BUILD=1 source scripts/setup.sh
cargo build --release -p m3d
N="${M3D_GPUS:-$("$M3D_VENV/bin/python" -c 'import torch; print(torch.cuda.device_count())')}"
if [ "$N" -lt 1 ]; then
  echo "no CUDA device visible" >&2
  exit 1
fi
"$M3D_VENV/bin/python" - <<'PY'
import torch
print(f"# {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
PY
DATA=out/bench/train
if [ ! -f "$DATA/shards/manifest.json" ]; then
  rm -rf "$DATA/raw" "$DATA/shards"
  "$M3D_BIN" data-prep synth "$DATA/raw" --cap-cases 200 --slice-size 64x64 --seg-datasets 0 --refseg-cases 0
  "$M3D_BIN" data-prep cap --src "$DATA/raw/M3D_Cap" --out "$DATA/shards"
fi
exec env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$M3D_VENV/bin/python" bench/train_ddp.py compare \
  --m3d "$M3D_BIN" --shards "$DATA/shards" --work "$DATA/runs-gpu" --workers "$N" --device cuda --backend nccl \
  --set "train.global_batch=$((6 * N))" --set train.precision=f32 "$@"
