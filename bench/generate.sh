#!/usr/bin/env bash
# Greedy generation on CPU: transformers' generate against m3d's on the same decoder, prompts and threads
# (bench/generate.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
cargo build --release --locked -p m3d-models --example generate_bench
exec env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$M3D_VENV/bin/python" bench/generate.py "$@"
