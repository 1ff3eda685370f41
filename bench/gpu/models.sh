#!/usr/bin/env bash
# Full-size M3D models, forward + backward in bf16 on one CUDA GPU: step time, samples/s, tokens/s and model
# FLOPs utilisation (MFU). Random weights and inputs; nothing is downloaded.
#   bash bench/gpu/models.sh                 # all cases
#   M3D_PEAK_TFLOPS=989 bash bench/gpu/models.sh vit-m3d:8 lamed-llama2-7b:2
# M3D_PEAK_TFLOPS is the device's dense bf16 peak (989 for H100/H200 SXM, 312 for A100).
# LaMed cases train as the reference's stage 2 does: LoRA r 16 on every LLM Linear, projector and segmentation
# parts in full, 512-token sequences with 256 image tokens. MFU counts the FLOPs that run (a frozen LLM base
# computes no weight gradients, the frozen vision tower runs forward only): models/examples/model_bench.rs and
# docs/benchmarks.md. A case that fails (out of GPU memory, say) becomes a row saying so and the later cases
# still run; the exit status is 1 if any case failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# Only the example: setup.sh would build the whole workspace first.
M3D_SKIP_BUILD=1 source scripts/setup.sh
cargo build --release --locked -p m3d-models --example model_bench
PEAK="${M3D_PEAK_TFLOPS:-989}"
EXE="$CARGO_TARGET_DIR/release/examples/model_bench"
CASES=("$@")
if [ ${#CASES[@]} -eq 0 ]; then
  CASES=(vit-m3d:8 clip-m3d:8 lamed-phi3:2 lamed-llama2-7b:2 lamed-llama3-8b:2)
fi
"$M3D_VENV/bin/python" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
echo "| case | batch | step (s) | samples/s | tokens/s | model TFLOP/s | MFU |"
echo "|---|---|---|---|---|---|---|"
ERR="$(mktemp)"
trap 'rm -f "$ERR"' EXIT
failed=0
for c in "${CASES[@]}"; do
  name="${c%%:*}"; batch="${c##*:}"
  if out="$("$EXE" --synthetic "$name" --batch "$batch" --device cuda --precision bf16 --iters 10 --warmup 3 \
        --peak-tflops "$PEAK" 2>"$ERR")"; then
    # (A here-document: Python before 3.12 takes no backslash inside an f-string's braces.)
    "$M3D_VENV/bin/python" - "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(f"| {r['case']} | {r['batch']} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} "
      f"| {r['model_tflops']:.1f} | {100 * r['mfu']:.1f} % |")
PY
  else
    failed=1
    if grep -qi "out of memory" "$ERR"; then
      why="out of memory"
    else
      why="failed: $({ grep -m 1 -iE 'error|panic' "$ERR" || tail -n 1 "$ERR"; } | tr '|' '/' | cut -c1-120)"
    fi
    echo "| $name | $batch | $why | | | | |"
    head -n 5 "$ERR" | sed 's/^/#   /' >&2
  fi
done
exit "$failed"
