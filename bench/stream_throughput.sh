#!/usr/bin/env bash
# Samples/s decoded + augmented by 2 reader processes from object storage: m3d (global and block shuffle) against
# Mosaic Streaming's default (bench/stream_throughput.py), both served by one S3 server on loopback (--store s3, the
# default) or both from a local folder (--store file). The server: s3s-fs (--server s3s, the default; installed once
# by bench/s3s_fs.sh, pinned) or moto (--server moto, the earlier numbers; it reads a whole object to answer a ranged
# GET, see docs/benchmarks.md).
#   bash bench/stream_throughput.sh [--store s3|file] [--server s3s|moto] [--shapes 4x32x32:12000,32x256x256:600:8:60]
#     [--rounds 2]
# Mosaic Streaming is installed into the venv on first use without its dependencies (bench/mosaic_streaming.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
M3D_SKIP_BUILD=1 source scripts/setup.sh
source bench/mosaic_streaming.sh
m3d_mosaic_streaming
source bench/s3s_fs.sh
m3d_s3s_fs "$@"
cargo build --release -p m3d-shards --example open_bench
cargo build --release -p m3d-data --example stream_bench
exec "$M3D_VENV/bin/python" bench/stream_throughput.py --open-bench "$CARGO_TARGET_DIR/release/examples/open_bench" \
  --stream-bench "$CARGO_TARGET_DIR/release/examples/stream_bench" "$@"
