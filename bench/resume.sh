#!/usr/bin/env bash
# Time from `m3d train recipes/clip-tiny.yaml --workers 2 --resume` to its first finished training step (process
# start, shard index, vocabulary, coordinator, rendezvous, checkpoint load, one step), side by side with the time
# from a fresh `m3d train --fresh` of the same job to its first step: the ratio is what resuming adds.
#   bash bench/resume.sh [--rounds 3]
# Uses the synthetic data of bench/train.sh (made under out/bench/train/ if missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
M3D_SKIP_BUILD=1 source scripts/setup.sh
ROUNDS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
cargo build --release -p m3d
source bench/train_data.sh
RUN=out/bench/resume/run
rm -rf "$RUN"
SETS=(--set "output.run=$RUN" --set "data.tasks.0.shards=[$DATA/shards]" --set train.max_steps=20
      --set train.log_every=1 --set checkpoint.every=5)
# A finished job with committed checkpoints at steps 5, 10 and 15 (--resume continues from 15).
"$M3D_BIN" train recipes/clip-tiny.yaml --workers 2 "${SETS[@]}" > /dev/null
"$M3D_VENV/bin/python" - "$M3D_BIN" "$RUN" "$ROUNDS" "${SETS[@]}" <<'PY'
import json, os, statistics, subprocess, sys, time
m3d, run, rounds, sets = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
metrics = os.path.join(run, "metrics.jsonl")

def steps():
    try:
        with open(metrics) as f:
            return [json.loads(l)["step"] for l in f if l.strip()]
    except FileNotFoundError:
        return []

def first_step(flag, want):
    """Seconds from launching `m3d train <flag>` until the metrics hold step `want`; the job then finishes."""
    # The previous job's lines from step `want` on would be taken for this job's.
    with open(metrics) as fh:
        keep = [l for l in fh if l.strip() and json.loads(l)["step"] < want]
    with open(metrics, "w") as fh:
        fh.writelines(keep)
    t = time.perf_counter()
    p = subprocess.Popen([m3d, "train", "recipes/clip-tiny.yaml", "--workers", "2", flag, *sets],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while want not in steps():
        if p.poll() is not None and want not in steps():
            raise SystemExit(f"m3d train {flag} ended ({p.returncode}) before step {want}")
        time.sleep(0.005)
    took = time.perf_counter() - t
    p.wait()
    return took

resume, fresh = [], []
for _ in range(rounds):
    resume.append(first_step("--resume", 16))
    fresh.append(first_step("--fresh", 1))
    # --fresh deleted the checkpoints and ran to the end again, leaving new ones at 5, 10, 15.
r, f = statistics.median(resume), statistics.median(fresh)
print("| tiny CLIP, 2 workers | median (s) | runs (s) |")
print("|---|---:|---|")
print(f"| `--resume` (from step 15) to its first step | {r:.2f} | {', '.join(f'{x:.2f}' for x in resume)} |")
print(f"| `--fresh` to its first step | {f:.2f} | {', '.join(f'{x:.2f}' for x in fresh)} |")
print(f"| ratio resume / fresh | {r / f:.2f} | |")
PY
