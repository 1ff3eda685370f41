#!/usr/bin/env bash
# Runs the data-prep benchmarks (bench/data_prep.py) with the project's build and Python environment.
# numpy runs without the OPENBLAS_* overrides some machines set (they slow current numpy; see the env notes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$M3D_VENV/bin/python" bench/data_prep.py "$@"
