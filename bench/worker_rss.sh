#!/usr/bin/env bash
# Worker memory after opening an M3D-scale training set (120K volumes / 662K samples by default; see
# bench/worker_rss.py for what is written and measured).
#   bash bench/worker_rss.sh [--work DIR] [--volumes 120000] [--vqa-samples 542000]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
M3D_SKIP_BUILD=1 source scripts/setup.sh
cargo build --release -p m3d --bin m3d
cargo build --release -p m3d-data --example stream_bench
exec "$M3D_VENV/bin/python" bench/worker_rss.py --m3d "$CARGO_TARGET_DIR/release/m3d" \
  --stream-bench "$CARGO_TARGET_DIR/release/examples/stream_bench" "$@"
