#!/usr/bin/env bash
# Checkpoint save/load against torch.save/torch.load of the same state (parameters + AdamW moments), both to a
# local folder, alternating in one run:
#   bash bench/checkpoint.sh [--preset m3d|tiny] [--rounds 3]
# m3d: stage to host memory + write the files (fsync'd) and the commit record (save), read back with every file
# checked against its CRC-32 (load). The staging time is what the training loop waits for per checkpoint; from
# the second round on it copies into the previous round's memory, as training does. torch: torch.save + fsync.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
M3D_SKIP_BUILD=1 source scripts/setup.sh
PRESET=m3d
ROUNDS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
cargo build --release -p m3d-worker --example checkpoint_bench
DIR="${TMPDIR:-/tmp}/m3d-ckpt-bench-$$"
trap 'rm -rf "$DIR" "$DIR-torch"' EXIT
OURS=$("$CARGO_TARGET_DIR/release/examples/checkpoint_bench" --preset "$PRESET" --dir "$DIR" --rounds "$ROUNDS" --keep)
REF=$("$M3D_VENV/bin/python" bench/checkpoint.py --checkpoint "$DIR/step-000000001" --out "$DIR-torch" --rounds "$ROUNDS")
"$M3D_VENV/bin/python" - "$OURS" "$REF" <<'PY'
import json, sys
o, r = json.loads(sys.argv[1]), json.loads(sys.argv[2])
gb = o["bytes"] / 1e9
print(f"| preset {o['preset']} ({gb:.2f} GB) | m3d (s) | torch (s) | m3d GB/s | torch GB/s | ratio (throughput m3d/torch) |")
print("|---|---:|---:|---:|---:|---:|")
for k, name in (("save_s", "save"), ("load_s", "load")):
    print(f"| {name} | {o[k]:.3f} | {r[k]:.3f} | {gb / o[k]:.2f} | {gb / r[k]:.2f} | {r[k] / o[k]:.2f} |")
print(f"| stall (stage to host memory), median | {o['stage_s']:.3f} | | | | |")
print(f"| stall of the first checkpoint (into memory prepared in the background) | {o['first_stage_s']:.3f} | | | | |")
print(f"| preparing that memory (background thread, once per run) | {o['prepare_s']:.3f} | | | | |")
PY
