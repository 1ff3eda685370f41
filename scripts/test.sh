#!/usr/bin/env bash
# Sets up (see setup.sh) and runs every test: Rust unit and integration tests, including the ones that check
# our outputs against the Python oracles (numpy, scipy, nibabel, Pillow, MONAI) and the S3 tests (moto server on
# loopback, started by the tests themselves).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
export M3D_PYTHON="$M3D_VENV/bin/python"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --release --workspace --locked --no-fail-fast
else
  cargo test --release --workspace --locked --no-fail-fast
fi
