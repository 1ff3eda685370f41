#!/usr/bin/env bash
# Builds gpu-bundle/ (ignored by git): what a lent GPU machine needs to run m3d, which has torch 2.11.0+cu130 in
# its Python but no Rust and no package registries, and takes at most 64 MiB per call (working tree included).
#   bin/m3d, bin/model_bench, bin/nccl_allreduce   built against torch 2.11 (scripts/torch211.sh), cargo profile
#                                                  `gpu` (release code, no debug info, symbols stripped)
#   recipes/*.yaml                                 the tiny recipes
#   first-contact.sh                               the device run (see that script)
#   BUILD-INFO                                     torch/tch versions, commit, sizes
#
#   bash scripts/gpu-bundle.sh               # build the bundle
#   bash scripts/gpu-bundle.sh --cpu-smoke   # and run `first-contact.sh --cpu-smoke` here, with this machine's
#                                            # torch 2.11 reachable only through LD_LIBRARY_PATH, as on the device
# On the device (the device tool copies the working tree and carries an ignored folder only when named):
#   run  command: bash gpu-bundle/first-contact.sh   carry: ["gpu-bundle"]   timeout_s: 300
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then SMOKE=1; shift; fi
[ $# -eq 0 ] || { echo "usage: bash scripts/gpu-bundle.sh [--cpu-smoke]" >&2; exit 2; }

source scripts/torch211.sh
echo "[gpu-bundle] building m3d, model_bench, nccl_allreduce against torch $M3D_TORCH_VERSION (profile gpu)"
torch211_cargo build --profile gpu -p m3d -p m3d-models -p m3d-collectives \
  --bin m3d --example model_bench --example nccl_allreduce

B="$ROOT/gpu-bundle"
rm -rf "$B"
mkdir -p "$B/bin" "$B/recipes"
cp "$CARGO_TARGET_DIR/gpu/m3d" "$CARGO_TARGET_DIR/gpu/examples/model_bench" \
  "$CARGO_TARGET_DIR/gpu/examples/nccl_allreduce" "$B/bin/"
# The profile strips symbols already; `strip` again in case a profile override left them in.
strip --strip-unneeded "$B"/bin/*
cp recipes/*.yaml "$B/recipes/"
cp scripts/first-contact.sh "$B/"

tree_bytes="$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)"
{
  echo "torch=$M3D_TORCH_VERSION"
  echo "tch=$M3D_TCH_VERSION"
  echo "commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- 2>/dev/null || echo '+dirty')"
  echo "built=$(date -u '+%Y-%m-%dT%H:%M:%SZ') on $(ldd --version | head -n 1 | awk '{print $NF}' | sed 's/^/glibc /'), $(rustc --version | awk '{print $1, $2}')"
} >"$B/BUILD-INFO"

echo "[gpu-bundle] $B:"
(cd "$B" && du -b bin/* recipes first-contact.sh BUILD-INFO | awk '{printf "  %6.1f MiB  %s\n", $1 / 1048576, $2}')
bundle_bytes="$(du -sb "$B" | cut -f1)"
total=$((bundle_bytes + tree_bytes))
awk -v b="$bundle_bytes" -v t="$tree_bytes" 'BEGIN { m = 1048576
  printf "[gpu-bundle] bundle %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 MiB a device call carries\n", b / m, t / m, (b + t) / m }'
if [ "$total" -gt $((60 * 1048576)) ]; then
  echo "[gpu-bundle] over 60 MiB: too close to the device's 64 MiB limit" >&2
  exit 1
fi

echo "[gpu-bundle] what the binaries load (readelf -d): "
for f in "$B"/bin/*; do
  echo "  $(basename "$f"): NEEDED $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | paste -sd' ' -);" \
    "RUNPATH $(readelf -d "$f" | sed -n 's/.*(R\(UN\)\{0,1\}PATH).*\[\(.*\)\]/\2/p')"
done
echo "  (the RUNPATH is this machine's venv, absent on the device; first-contact.sh sets LD_LIBRARY_PATH, which a" \
  "RUNPATH yields to. Newest symbol versions: $(objdump -T "$B/bin/m3d" | grep -o 'GLIBC_[0-9.]*\|GLIBCXX_[0-9.]*' \
  | sort -uV | awk -F_ '{v[$1] = $0} END {print v["GLIBC"], v["GLIBCXX"]}'))"

if [ "$SMOKE" = 1 ]; then
  export OUT="${OUT:-/tmp/m3d-gpu-bundle-smoke}"
  rm -rf "$OUT"
  if unshare -m true 2>/dev/null; then
    # A private mount namespace: the venv is bound under another path and its own path hidden by an empty tmpfs,
    # so the baked RUNPATH leads nowhere and the binaries find libtorch only through LD_LIBRARY_PATH.
    moved="$(mktemp -d /tmp/m3d-device-venv.XXXXXX)"
    echo "[gpu-bundle] CPU smoke with $M3D_VENV hidden and bound at $moved"
    status=0
    # shellcheck disable=SC2016 # expanded by the inner shell
    unshare -m bash -c 'set -e; mount --bind "$1" "$2"; mount -t tmpfs none "$1"
      test ! -e "$1/bin/python"
      M3D_PYTHON="$2/bin/python" bash "$3/first-contact.sh" --cpu-smoke' _ "$M3D_VENV" "$moved" "$B" || status=$?
    rmdir "$moved"
    exit "$status"
  else
    echo "[gpu-bundle] CPU smoke (no mount namespace here: the RUNPATH still finds this machine's torch)"
    M3D_PYTHON="$M3D_VENV/bin/python" bash "$B/first-contact.sh" --cpu-smoke
  fi
fi
