#!/usr/bin/env bash
# Data-parallel training of the tiny M3D-CLIP (recipes/clip-tiny.yaml) on CPU: `m3d train --workers 2` against
# torchrun + PyTorch DDP (gloo) training the identical model on the identical data the way M3D reads it (one
# float32 .npy per image, np.load + MONAI transforms in a DataLoader), alternating in one run (bench/train_ddp.py).
#   bash bench/train.sh [--rounds 2] [--steps 40] [--workers 2] [--skip 3] [--num-workers 1]
# Prints per round and side: median and mean step time, samples/s, data-wait share (first --skip steps left out),
# then the step-time ratio ours / reference. Synthetic data (200 M3D-Cap cases, 64x64 slices) is made under
# out/bench/train/ on the first run; M3D_BENCH_NO_BUILD=1 uses the m3d binary as built.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
M3D_SKIP_BUILD=1 source scripts/setup.sh
if [ "${M3D_BENCH_NO_BUILD:-0}" != "1" ] || [ ! -x "$M3D_BIN" ]; then
  cargo build --release -p m3d
fi
source bench/train_data.sh
exec env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$M3D_VENV/bin/python" bench/train_ddp.py compare \
  --m3d "$M3D_BIN" --shards "$DATA/shards" --work "$DATA/runs" "$@"
