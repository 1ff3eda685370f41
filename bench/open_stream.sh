#!/usr/bin/env bash
# Open-to-first-batch in object storage, m3d shards against Mosaic Streaming (bench/open_stream.py), both served by
# one S3 server on loopback: s3s-fs (--server s3s, the default; installed once by bench/s3s_fs.sh, pinned) or moto
# (--server moto, the earlier numbers; it reads a whole object to answer a ranged GET).
#   bash bench/open_stream.sh [--server s3s|moto] [--sizes 12000,120000] [--rounds 3] [--shape 4x32x32]
# Mosaic Streaming 0.13 is installed into the venv on first use without its dependencies (bench/mosaic_streaming.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
M3D_SKIP_BUILD=1 source scripts/setup.sh
source bench/mosaic_streaming.sh
m3d_mosaic_streaming
source bench/s3s_fs.sh
m3d_s3s_fs "$@"
cargo build --release -p m3d-shards --example open_bench
exec "$M3D_VENV/bin/python" bench/open_stream.py --open-bench "$CARGO_TARGET_DIR/release/examples/open_bench" "$@"
