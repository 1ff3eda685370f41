#!/usr/bin/env bash
# Time from `m3d train recipes/clip-tiny.yaml --workers 2 --resume` to its first finished training step (process
# start, shard index, vocabulary, coordinator, rendezvous, checkpoint load, one step), side by side with
#  * the reference way: `torchrun --nproc_per_node 2 bench/train_ddp.py train --resume`, PyTorch DDP training the
#    identical model on the identical data (one float32 .npy per image), resuming as accelerate's load_state does
#    (torch.load of model, optimizer, scheduler and RNG states, then skipping the consumed batches at the sampler);
#  * each side's fresh start of the same job to its first step, so the ratios show what resuming itself adds.
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
REF=out/bench/resume/ref
rm -rf "$RUN" "$REF"
SETS=(--set "output.run=$RUN" --set "data.tasks.0.shards=[$DATA/shards]" --set train.max_steps=20
      --set train.log_every=1 --set checkpoint.every=5)
PY="env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $M3D_VENV/bin/python"
# Finished jobs with committed checkpoints at steps 5, 10 and 15 (--resume continues from 15), on both sides; m3d
# also checkpoints the last step (20), which is removed before each --resume so that it continues from 15.
"$M3D_BIN" train recipes/clip-tiny.yaml --workers 2 "${SETS[@]}" > /dev/null
$PY bench/train_ddp.py export --shards "$DATA/shards" --out out/bench/resume/ref_npy
REF_CMD=($PY -m torch.distributed.run --standalone --nproc_per_node=2 bench/train_ddp.py train
         --data out/bench/resume/ref_npy --m3d-final "$RUN/final" --steps 20 --out "$REF" --save-every 5)
"${REF_CMD[@]}" > /dev/null 2>&1
$PY - "$ROUNDS" "$RUN" "$REF" "${#REF_CMD[@]}" "${REF_CMD[@]}" "$M3D_BIN" "${SETS[@]}" <<'PY'
import json, os, shutil, statistics, subprocess, sys, time
rounds, run, ref = int(sys.argv[1]), sys.argv[2], sys.argv[3]
n = int(sys.argv[4])
ref_cmd, rest = sys.argv[5:5 + n], sys.argv[5 + n:]
m3d, sets = rest[0], rest[1:]

def steps(metrics):
    try:
        with open(metrics) as f:
            return [json.loads(l)["step"] for l in f if l.strip()]
    except FileNotFoundError:
        return []

def first_step(cmd, metrics, want):
    """Seconds from launching `cmd` until `metrics` holds step `want`; the job then runs to its end."""
    # The previous job's lines from step `want` on would be taken for this job's.
    with open(metrics) as fh:
        keep = [l for l in fh if l.strip() and json.loads(l)["step"] < want]
    with open(metrics, "w") as fh:
        fh.writelines(keep)
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while want not in steps(metrics):
        if p.poll() is not None and want not in steps(metrics):
            raise SystemExit(f"{' '.join(cmd)} ended ({p.returncode}) before step {want}")
        time.sleep(0.005)
    took = time.perf_counter() - t
    if p.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode})")
    return took

ours = [m3d, "train", "recipes/clip-tiny.yaml", "--workers", "2", *sets]
sides = {
    "m3d": (lambda flag: ours + [flag], os.path.join(run, "metrics.jsonl"), "--resume", "--fresh"),
    "torchrun + DDP, accelerate-style": (lambda flag: ref_cmd + ([flag] if flag else []),
                                         os.path.join(ref, "metrics.jsonl"), "--resume", None),
}
times = {name: ([], []) for name in sides}
load = os.getloadavg()[0]
for _ in range(rounds):
    for name, (cmd, metrics, resume, fresh) in sides.items():
        if name == "m3d":
            shutil.rmtree(os.path.join(run, "checkpoints", "step-000000020"), ignore_errors=True)
        times[name][0].append(first_step(cmd(resume), metrics, 16))
        # A fresh start runs the whole job again, leaving new checkpoints at 5, 10, 15 for the next round.
        times[name][1].append(first_step(cmd(fresh), metrics, 1))
med = {name: (statistics.median(r), statistics.median(f)) for name, (r, f) in times.items()}
print(f"tiny CLIP, 2 workers on CPU, {rounds} rounds alternating; 1-min load average {load:.1f} before, "
      f"{os.getloadavg()[0]:.1f} after\n")
print("| side | `--resume` (from step 15) to its first step, median (s) | runs (s) "
      "| fresh start to its first step, median (s) | runs (s) | resume / fresh |")
print("|---|---:|---|---:|---|---:|")
for name, (r, f) in times.items():
    mr, mf = med[name]
    print(f"| {name} | {mr:.2f} | {', '.join(f'{x:.2f}' for x in r)} | {mf:.2f} | "
          f"{', '.join(f'{x:.2f}' for x in f)} | {mr / mf:.2f} |")
names = list(times)
print(f"\nresume-to-first-step ratio m3d / reference: **{med[names[0]][0] / med[names[1]][0]:.2f}** (target <= 1)")
PY
