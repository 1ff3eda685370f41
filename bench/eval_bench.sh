#!/usr/bin/env bash
# `m3d eval bench` on 2 workers against 1, on the tiny LaMed the demo recipe trains (bench/eval_bench.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
cargo build --release --locked --bin m3d
exec "$M3D_VENV/bin/python" bench/eval_bench.py --m3d "$CARGO_TARGET_DIR/release/m3d" "$@"
