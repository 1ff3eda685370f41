#!/usr/bin/env bash
# Control-plane scale: WORKERS simulated workers (tonic clients multiplexed over CHANNELS HTTP/2 connections, one
# process) against one `m3d coordinator` (another process) on this machine, doing what real workers do: register
# (the answer carries the ring neighbours and rank 0's NCCL id: no member list, no data-plan requests), heartbeat
# at the coordinator's interval, rank 0 alone reports progress once a second, every rank reports the last step
# at the end. Prints the rendezvous time, latency percentiles and the bytes on the wire per worker as JSON
# (targets: rendezvous < 10 s at 16,384 workers, p99 < 20 ms, bytes per worker independent of the world size).
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
"$TARGET/release/m3d" status --coordinator "http://$ADDR" | sed -n 1,3p >&2
