#!/usr/bin/env bash
# Open-to-first-batch in object storage, m3d shards against Mosaic Streaming (bench/open_stream.py), both served by
# one S3 server on loopback: s3s-fs (--server s3s, the default; installed once by bench/s3s_fs.sh, pinned) or moto
# (--server moto, the earlier numbers; it reads a whole object to answer a ranged GET).
#   bash bench/open_stream.sh [--server s3s|moto] [--sizes 12000,120000] [--rounds 3] [--shape 4x32x32]
# Mosaic Streaming 0.13 is installed into the venv on first use WITHOUT its dependencies: its metadata asks for
# torch 2.14 (through torchvision), numpy < 2.2 and transformers < 5, which would replace the pinned test oracles
# (torch 2.13.0 is what tch links against). It runs with the venv's versions plus torchvision 0.28 (torch 2.13's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
M3D_SKIP_BUILD=1 source scripts/setup.sh
if ! "$M3D_VENV/bin/python" -c "import streaming, torchvision" 2>/dev/null; then
  "$M3D_VENV/bin/pip" install --quiet --no-deps "mosaicml-streaming==0.13.0" "torchvision==0.28.*"
fi
source bench/s3s_fs.sh
m3d_s3s_fs "$@"
cargo build --release -p m3d-shards --example open_bench
exec "$M3D_VENV/bin/python" bench/open_stream.py --open-bench "$CARGO_TARGET_DIR/release/examples/open_bench" "$@"
