#!/usr/bin/env bash
# SIGTERM -> exit with a committed checkpoint of full-size M3D-CLIP (2.4 GB) on the loopback S3 server, against
# the grace period `m3d k8s render` sets (bench/sigterm_checkpoint.py):
#   bash bench/sigterm_checkpoint.sh [--server s3s|moto] [--rounds 2]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
M3D_SKIP_BUILD=1 source scripts/setup.sh
source bench/s3s_fs.sh
m3d_s3s_fs "$@"
cargo build --release -p m3d --bin m3d
exec "$M3D_VENV/bin/python" bench/sigterm_checkpoint.py --m3d "$CARGO_TARGET_DIR/release/m3d" "$@"
