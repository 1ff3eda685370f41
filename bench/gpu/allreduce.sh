#!/usr/bin/env bash
# NCCL all-reduce bus bandwidth through m3d's `Nccl` backend (cudarc, dynamic loading) on every GPU of this machine:
# one thread per GPU, the unique id created by rank 0 and passed as bytes (collectives/examples/nccl_allreduce).
#   bash bench/gpu/allreduce.sh                               # all GPUs, f32, 4 MiB .. 1 GiB
#   bash bench/gpu/allreduce.sh --gpus 4 --dtype bf16 --sizes-mib 64,256 --iters 50
# busbw = size * 2 (n - 1) / n / time, as nccl-tests report it; compare with nccl-tests' all_reduce_perf.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
M3D_SKIP_BUILD=1 source scripts/setup.sh
cargo build --release -p m3d-collectives --example nccl_allreduce
# cudarc opens `libnccl.so`, while the torch wheel ships only nvidia/nccl/lib/libnccl.so.2: give it the name.
NCCL_DIR="$("$M3D_VENV/bin/python" -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))')"
LINK_DIR="$(mktemp -d)"
trap 'rm -rf "$LINK_DIR"' EXIT
ln -s "$NCCL_DIR/libnccl.so.2" "$LINK_DIR/libnccl.so"
export LD_LIBRARY_PATH="$LINK_DIR:$NCCL_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$M3D_VENV/bin/python" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
n = torch.cuda.device_count()
print(f"# {n} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
PY
"$CARGO_TARGET_DIR/release/examples/nccl_allreduce" "$@"
