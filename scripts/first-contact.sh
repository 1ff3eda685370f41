#!/usr/bin/env bash
# First contact with a lent GPU machine, from the folder scripts/gpu-bundle.sh makes (this script is copied
# into it next to bin/ and recipes/). Nothing is built or downloaded there: the binaries were built here
# against torch 2.11.0 (tch 0.24) and use the device's own PyTorch wheel's libtorch and NCCL.
#
#   bash gpu-bundle/first-contact.sh               # on the device; results under $OUT
#   bash gpu-bundle/first-contact.sh --cpu-smoke   # without a GPU: the same binaries on a tiny CPU run
#
# Steps, each under its own `timeout` (a failure or a hang is recorded and the next step runs), all under one
# budget (M3D_FC_BUDGET_S, default 240 s on a GPU: a step that would overrun it is cut or skipped):
#   env        nvidia-smi -L, the device's torch (stops unless 2.11.x), its torch/lib on LD_LIBRARY_PATH (the
#              rpath baked in at build time points into the build machine's venv) and its NCCL (M3D_NCCL_LIB,
#              plus a libnccl.so link on LD_LIBRARY_PATH); every library the binaries need must resolve
#   nccl       collectives/examples/nccl_allreduce in bf16 (one GPU: NCCL's init and a local all-reduce)
#   data       m3d data-prep synth + cap + vqa (tiny M3D-Cap and M3D-VQA shards)
#   clip       recipes/clip-tiny.yaml on CUDA, 10 steps, a checkpoint every 5, killed once step 5's COMMIT exists
#   clip-resume  the same job with --resume, to step 10
#   lamed      recipes/lamed-stage1-tiny.yaml on CUDA, 10 steps
#   bench-vit, bench-phi3  models/examples/model_bench in bf16: the full-size ViT (batch 8) and LaMed with
#              Phi-3-mini + LoRA (batch 2), as bench/gpu/models.sh runs them
# $OUT gets summary.md (a table of the steps and the results) and results.tar.gz (every step's log, the runs'
# metrics.jsonl and logs/, the benchmarks' JSON). Environment: M3D_PYTHON (the Python holding torch; default
# python3), M3D_PEAK_TFLOPS (dense bf16 peak for MFU; default 989, H100/H200 SXM), M3D_FC_PRECISION (training
# precision on CUDA; default bf16), OUT (default: a new folder under /tmp), M3D_FC_KEEP=1 (keep the scratch folder).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
BIN="$HERE/bin"
RECIPES="$HERE/recipes"
M3D="$BIN/m3d"
PY="${M3D_PYTHON:-python3}"
PEAK="${M3D_PEAK_TFLOPS:-989}"
WANT_TORCH="$(sed -n 's/^torch=//p' "$HERE/BUILD-INFO" 2>/dev/null || true)"
WANT_TORCH="${WANT_TORCH:-2.11.0}"

# --- internal entry points (run under `timeout` by the steps below) ------------------------------------------
if [ "${1:-}" = "__train_and_kill" ]; then
  # $2: the COMMIT file to wait for; the rest: the m3d train command. Job control gives the job its own
  # process group, so the supervisor (with the coordinator in it) and its workers die together, as on a lost node.
  until_file="$2"; shift 2
  set -m
  "$@" &
  pid=$!
  trap 'kill -9 -- "-$pid" 2>/dev/null; exit 124' TERM INT
  while [ ! -f "$until_file" ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid"; rc=$?
      echo "[first-contact] the job ended (rc $rc) before $until_file appeared"
      exit 1
    fi
    sleep 0.05
  done
  kill -9 -- "-$pid"
  wait "$pid" 2>/dev/null
  echo "[first-contact] killed the job (process group $pid) once $until_file existed"
  exit 0
fi

if [ "${1:-}" = "__data" ]; then
  # Tiny M3D-Cap and M3D-VQA shards under $2 (M3D-Cap slices 64x64; the recipes resize to 32x256x256).
  set -e
  "$M3D" data-prep synth "$2/synth" --cap-cases 24 --seg-datasets 0 --refseg-cases 0 --slice-size 64x64
  "$M3D" data-prep cap --src "$2/synth/M3D_Cap" --out "$2/shards/cap"
  "$M3D" data-prep vqa --src "$2/synth/M3D_VQA" --out "$2/shards/vqa" --cap "$2/shards/cap"
  exit 0
fi

MODE=gpu
if [ "${1:-}" = "--cpu-smoke" ]; then MODE=cpu; shift; fi
if [ $# -gt 0 ]; then
  echo "usage: bash first-contact.sh [--cpu-smoke]" >&2
  exit 2
fi

if [ "$MODE" = gpu ]; then
  BUDGET="${M3D_FC_BUDGET_S:-240}"
  DEVICE=cuda; WORKERS=1; PREC="${M3D_FC_PRECISION:-bf16}"
  CLIP_STEPS=10; CLIP_EVERY=5; LAMED_STEPS=10
else
  BUDGET="${M3D_FC_BUDGET_S:-900}"
  DEVICE=cpu; WORKERS=2; PREC=f32
  CLIP_STEPS=4; CLIP_EVERY=2; LAMED_STEPS=3
fi

OUT="${OUT:-$(mktemp -d /tmp/m3d-first-contact.XXXXXX)}"
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/m3d-fc-work.XXXXXX)"
LOGS="$WORK/step-logs"
mkdir -p "$LOGS" "$WORK/tmp"
export TMPDIR="$WORK/tmp" # the workers' scratch files go where the end of this script removes them
SUMMARY="$WORK/summary.md"
RESULTS="$WORK/results.md"
: >"$RESULTS"
T0=$SECONDS
ROWS=()

why() { # log -> the line that says what went wrong (the first error line, else the last line)
  { grep -m 1 -iE 'error|panic|out of memory|not found' "$1" || grep -v '^[[:space:]]*$' "$1" | tail -n 1; } \
    | tr '|' '/' | cut -c1-160
}

record() { # name status seconds note
  ROWS+=("| $1 | $2 | $3 | ${4:-} |")
  echo "[first-contact] $1: $2 (${3}s) ${4:-}"
}

# step NAME LIMIT_S CMD...: runs CMD under `timeout`, cut to what is left of the budget; output to the
# terminal and $LOGS/NAME.log. Returns CMD's status (124 on a timeout, 125 when skipped).
step() {
  local name="$1" limit="$2" left t rc
  shift 2
  left=$((BUDGET - (SECONDS - T0)))
  if [ "$left" -lt 15 ]; then
    record "$name" "**skipped**" 0 "budget of ${BUDGET}s spent"
    return 125
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "=== $name (at most ${limit}s)"
  t=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0) record "$name" ok $((SECONDS - t)) ;;
    124 | 137) record "$name" "**timeout**" $((SECONDS - t)) "limit ${limit}s" ;;
    *) record "$name" "**failed (rc $rc)**" $((SECONDS - t)) "$(why "$LOGS/$name.log")" ;;
  esac
  return "$rc"
}

finish() {
  {
    echo "# m3d first contact ($MODE), $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - T0)) s"
    echo
    echo '```'
    cat "$WORK/env.txt" 2>/dev/null
    echo '```'
    echo
    echo "| step | status | s | note |"
    echo "|---|---|---:|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    cat "$RESULTS"
  } >"$SUMMARY"
  cp "$SUMMARY" "$OUT/summary.md"
  tar -C "$WORK" -czf "$OUT/results.tar.gz" --exclude='*.safetensors' --exclude='checkpoints' --exclude='final' \
    --exclude='shards' --exclude='synth' --exclude='tmp' --exclude='nccl-link' . 2>/dev/null
  echo
  cat "$SUMMARY"
  echo "[first-contact] results in $OUT (summary.md, results.tar.gz)"
  [ "${M3D_FC_KEEP:-0}" = 1 ] || rm -rf "$WORK"
}

# --- env: the device, its torch, the libraries ------------------------------------------------------------------
{
  echo "bundle: $(tr '\n' ' ' <"$HERE/BUILD-INFO" 2>/dev/null)"
  echo "host: $(uname -srm), $(ldd --version 2>/dev/null | head -n 1)"
  if [ "$MODE" = gpu ]; then nvidia-smi -L 2>&1; fi
} | tee "$WORK/env.txt"
# Answers on lines of their own ("m3d-<key>=<value>"), whatever else Python prints (warnings, errors).
info="$("$PY" -W ignore - <<'PY' 2>&1
import os
import torch
print(f"m3d-version={torch.__version__}")
print(f"m3d-lib={os.path.join(os.path.dirname(torch.__file__), 'lib')}")
print(f"m3d-cuda={torch.version.cuda}, available {torch.cuda.is_available()}, {torch.cuda.device_count()} device(s)")
try:
    import nvidia.nccl
    print(f"m3d-nccl={os.path.join(list(nvidia.nccl.__path__)[0], 'lib', 'libnccl.so.2')}")
except Exception:
    pass
PY
)"
answer() { sed -n "s/^m3d-$1=//p" <<<"$info" | head -n 1; }
TORCH_VERSION="$(answer version)"
TORCH_LIB="$(answer lib)"
NCCL_LIB="$(answer nccl)"
echo "python: $PY; torch ${TORCH_VERSION:-none}; CUDA $(answer cuda); NCCL: ${NCCL_LIB:-none}" | tee -a "$WORK/env.txt"
if [ "${TORCH_VERSION%%+*}" != "$WANT_TORCH" ] || [ ! -d "$TORCH_LIB" ]; then
  record env "**stopped**" $((SECONDS - T0)) \
    "the bundle needs torch $WANT_TORCH, found ${TORCH_VERSION:-none}: $(grep -v '^m3d-' <<<"$info" | tail -n 1 | tr '|' '/' | cut -c1-150)"
  finish
  exit 3
fi
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -n "$NCCL_LIB" ] && [ -f "$NCCL_LIB" ]; then
  export M3D_NCCL_LIB="$NCCL_LIB"
  # M3D_NCCL_LIB is what the collectives crate uses; the `libnccl.so` link on LD_LIBRARY_PATH also serves builds
  # from before it, which looked NCCL up by that name only (the wheel ships only libnccl.so.2).
  mkdir -p "$WORK/nccl-link"
  ln -sf "$NCCL_LIB" "$WORK/nccl-link/libnccl.so"
  LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$WORK/nccl-link:${NCCL_LIB%/*}"
fi
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee -a "$WORK/env.txt"
missing=""
for b in m3d model_bench nccl_allreduce; do
  if [ ! -x "$BIN/$b" ]; then missing+=" $b(absent)"; continue; fi
  nf="$(ldd "$BIN/$b" 2>&1 | grep 'not found' | awk '{print $1}' | paste -sd, -)"
  [ -n "$nf" ] && missing+=" $b($nf)"
done
ldd "$M3D" 2>&1 | grep -E 'torch|c10|cuda|nccl|stdc' | sed 's/^[[:space:]]*/ldd m3d: /' | tee -a "$WORK/env.txt"
if [ -n "$missing" ]; then
  record env "**stopped**" $((SECONDS - T0)) "unresolved libraries:$missing"
  finish
  exit 4
fi
record env ok $((SECONDS - T0)) "torch $TORCH_VERSION"

# --- NCCL ---------------------------------------------------------------------------------------------------------
if [ "$MODE" = gpu ]; then
  if step nccl 45 "$BIN/nccl_allreduce" --dtype bf16 --sizes-mib 16,256 --iters 20; then
    { echo "## NCCL all-reduce (bf16)"; echo; grep '^|' "$LOGS/nccl.log"; echo; } >>"$RESULTS"
  fi
else
  # No GPU: the example must refuse cleanly (an error, status 1), not panic (101) or crash.
  timeout 30 "$BIN/nccl_allreduce" --dtype bf16 --sizes-mib 1 --iters 1 >"$LOGS/nccl.log" 2>&1
  rc=$?
  if [ "$rc" = 1 ]; then
    record nccl "ok (refused: no GPU)" 0 "$(why "$LOGS/nccl.log")"
  else
    record nccl "**failed (rc $rc)**" 0 "$(why "$LOGS/nccl.log")"
  fi
fi

# --- data -------------------------------------------------------------------------------------------------------
step data 90 bash "$SELF" __data "$WORK"

# --- training: CLIP with a kill and a resume, LaMed stage 1 ---------------------------------------------------------
last_metrics() { # run folder -> "step N, loss L" of the last metrics line
  # (Here-documents: Python before 3.12 takes no backslash inside an f-string's braces.)
  "$PY" - "$1/metrics.jsonl" <<'PY'
import json, sys
try:
    r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
    extra = ", ".join(f"{k} {r[k]:.3g}" for k in ("samples_per_s", "tokens_per_s", "data_wait_share") if k in r)
    print(f"step {r['step']}, loss {r['loss']:.4f}, {extra}")
except Exception as e:
    print(f"no metrics ({e})")
PY
}
resume_diff() { # the killed run's and the resumed run's logs -> how the losses of steps both printed compare
  "$PY" - "$1" "$2" <<'PY'
import re, sys
def losses(path):
    return {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+)/\d+\s+loss ([-0-9.eE+naif]+)", open(path).read())}
before, after = losses(sys.argv[1]), losses(sys.argv[2])
both = sorted(set(before) & set(after))
if both:
    print("loss of steps printed before the kill and after the resume: "
          + ", ".join(f"{s}: {before[s]} / {after[s]}" for s in both))
else:
    print("no step printed both before the kill and after the resume")
PY
}
CLIP_RUN="$WORK/runs/clip-tiny"
clip_sets=(--workers "$WORKERS" --set "data.tasks.0.shards=[$WORK/shards/cap]" --set "workers.device=$DEVICE"
  --set "train.max_steps=$CLIP_STEPS" --set "checkpoint.every=$CLIP_EVERY" --set "train.log_every=1"
  --set "train.precision=$PREC" --set "output.run=$CLIP_RUN")
first_ckpt="$CLIP_RUN/checkpoints/$(printf 'step-%09d' "$CLIP_EVERY")/COMMIT"
# The pause before each commit record keeps the job alive for a moment after step 5's COMMIT appears, so the
# kill lands between the two checkpoints however fast the steps are.
if M3D_FAILPOINTS="checkpoint-before-commit=1500" \
  step clip 90 bash "$SELF" __train_and_kill "$first_ckpt" "$M3D" train "$RECIPES/clip-tiny.yaml" --fresh "${clip_sets[@]}"; then
  step clip-resume 90 "$M3D" train "$RECIPES/clip-tiny.yaml" --resume "${clip_sets[@]}"
  from="$(grep -o 'resuming from step [0-9]*' "$LOGS/clip-resume.log" | head -n 1)"
  echo "- CLIP tiny ($DEVICE, $PREC): killed after step $CLIP_EVERY's commit; ${from:-no resume line}; last:" \
    "$(last_metrics "$CLIP_RUN"); $(resume_diff "$LOGS/clip.log" "$LOGS/clip-resume.log")" >>"$RESULTS"
fi

LAMED_RUN="$WORK/runs/lamed-stage1-tiny"
step lamed 90 "$M3D" train "$RECIPES/lamed-stage1-tiny.yaml" --fresh --workers "$WORKERS" \
  --set "data.tasks.0.shards=[$WORK/shards/cap]" --set "data.tasks.1.shards=[$WORK/shards/vqa]" \
  --set "data.tasks.1.volumes=[$WORK/shards/cap]" --set "workers.device=$DEVICE" \
  --set "train.max_steps=$LAMED_STEPS" --set "train.log_every=1" --set "train.precision=$PREC" \
  --set "output.run=$LAMED_RUN"
echo "- LaMed stage 1 tiny ($DEVICE, $PREC): last: $(last_metrics "$LAMED_RUN")" >>"$RESULTS"

# --- model benchmarks ---------------------------------------------------------------------------------------------
bench() { # name case batch device precision
  local name="$1" case="$2" batch="$3" dev="$4" prec="$5"
  if step "$name" 120 "$BIN/model_bench" --synthetic "$case" --batch "$batch" --device "$dev" --precision "$prec" \
    --iters 10 --warmup 3 --peak-tflops "$PEAK"; then
    grep '^{' "$LOGS/$name.log" | tail -n 1 >"$WORK/$name.json"
    "$PY" - "$WORK/$name.json" >>"$WORK/bench-rows.md" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
print(f"| {r['case']} | {r['batch']} | {r['precision']} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} "
      f"| {r['tokens_per_s']:.0f} | {r['model_tflops']:.1f} | {mfu} |")
PY
  fi
}
if [ "$MODE" = gpu ]; then
  bench bench-vit vit-m3d 8 cuda bf16
  bench bench-phi3 lamed-phi3 2 cuda bf16
else
  bench bench-lamed-tiny lamed-tiny 2 cpu f32
fi
if [ -s "$WORK/bench-rows.md" ]; then
  {
    echo
    echo "## model_bench (MFU over $PEAK TFLOP/s)"
    echo
    echo "| case | batch | precision | step (s) | samples/s | tokens/s | model TFLOP/s | MFU |"
    echo "|---|---|---|---|---|---|---|---|"
    cat "$WORK/bench-rows.md"
  } >>"$RESULTS"
fi

finish
failed=0
for r in "${ROWS[@]}"; do
  case "$r" in *"**"*) failed=1 ;; esac
done
exit "$failed"
