#!/usr/bin/env bash
# Time from starting the job's containers (podman, the rendered JobSet's pods: coordinator, then 2 workers once it
# answers) to the first finished step, against the same job (same recipe, same S3 server) started as local
# processes: the cost of containers and their DNS. Runs tests/tests/k8s_podman_cli.rs with M3D_K8S_BENCH=1, which
# adds the local run after the container phases and prints both times (one of each per run: repeat it).
#   bash bench/k8s_start.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
M3D_SKIP_BUILD=1 source scripts/setup.sh
source scripts/podman-setup.sh
export M3D_PYTHON="$M3D_VENV/bin/python"
cargo build --release -p m3d -p m3d-coordinator
M3D_K8S_BENCH=1 cargo nextest run --release -p m3d-tests -E 'binary(k8s_podman_cli)' --no-capture 2>&1 \
  | grep -E "first step after|SIGTERM to exit|PASS|FAIL"
