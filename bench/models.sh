#!/usr/bin/env bash
# Forward + backward of the models on CPU: PyTorch eager (Python) against m3d (libtorch through tch), the same
# weights, inputs and thread count, alternating in one run (bench/models.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$M3D_VENV/bin/python" bench/models.py "$@"
