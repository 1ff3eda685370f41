#!/usr/bin/env bash
# Control-plane scale: WORKERS simulated workers (tonic clients multiplexed over CHANNELS HTTP/2 connections, one
# process) against one `m3d coordinator` (another process) on this machine: rendezvous time, then 1 Hz heartbeats
# and data-plan requests per worker for SECONDS; prints latency percentiles as JSON (targets: rendezvous < 5 s,
# p99 < 20 ms).
#   bench/control_plane.sh [WORKERS=4096] [SECONDS=30] [CHANNELS=16]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The environment every build here needs (libtorch from the venv, the cached target dir), also on a fresh clone.
M3D_SKIP_BUILD=1 source scripts/setup.sh
set -euo pipefail
WORKERS=${1:-4096}
SECONDS_RUN=${2:-30}
CHANNELS=${3:-16}
TARGET=$CARGO_TARGET_DIR
cargo build --release -q -p m3d
cargo build --release -q -p m3d-coordinator --example control_plane_bench
STATE=$(mktemp -d)
LOG=$(mktemp)
trap 'kill "$COORD_PID" 2>/dev/null || true; rm -rf "$STATE" "$LOG"' EXIT
# 8 samples per rank per step, enough samples for SECONDS steps; heartbeats time out after 10 s.
"$TARGET/release/m3d" coordinator --listen 127.0.0.1:0 --state "$STATE" \
  --min-workers "$WORKERS" --max-workers "$WORKERS" --rendezvous-timeout 60s --heartbeat-timeout 10s \
  --samples $((WORKERS * 8 * 1000)) --global-batch $((WORKERS * 8)) > "$LOG" 2>/dev/null &
COORD_PID=$!
for _ in $(seq 100); do grep -q "listening on" "$LOG" && break; sleep 0.1; done
ADDR=$(sed -n 's/^m3d coordinator listening on //p' "$LOG")
[ -n "$ADDR" ] || { echo "coordinator did not start" >&2; exit 1; }
"$TARGET/release/examples/control_plane_bench" --coordinator "http://$ADDR" --workers "$WORKERS" \
  --channels "$CHANNELS" --seconds "$SECONDS_RUN"
echo "coordinator RSS after the run: $(awk '/VmRSS/ {print $2, $3}' /proc/$COORD_PID/status)" >&2
"$TARGET/release/m3d" status --coordinator "http://$ADDR" | head -3 >&2
