#!/usr/bin/env bash
# All-reduce bus bandwidth on loopback: m3d's TCP ring (collectives/examples/allreduce_bench) against
# torch.distributed with gloo, 2 and 4 ranks, 4 to 256 MiB, side by side in one run (bench/allreduce.py).
#   bash bench/allreduce.sh [--worlds 2,4] [--sizes-mib 4,16,64,256] [--repeats 3]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Only this benchmark's example is built, not the whole workspace.
M3D_SKIP_BUILD=1 source scripts/setup.sh
cargo build --release -p m3d-collectives --example allreduce_bench
exec "$M3D_VENV/bin/python" bench/allreduce.py --exe "$CARGO_TARGET_DIR/release/examples/allreduce_bench" "$@"
