#!/usr/bin/env bash
# Sets up everything m3d needs on a fresh machine, from the package registries only:
#   - a Python virtual environment with torch==2.13.0 (libtorch for `tch` 0.26) and the test oracles,
#   - the cargo build of the workspace.
# Both live in a cache outside the clone (~/.cache/m3d by default, keyed by versions), so a fresh clone
# reuses them; a fresh machine builds them from nothing. Source this file to get the environment:
#   source scripts/setup.sh            (sets M3D_VENV, CARGO_TARGET_DIR, LIBTORCH_USE_PYTORCH, PATH)
# or run it to just set up.
set -euo pipefail

M3D_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
M3D_CACHE="${M3D_CACHE:-$HOME/.cache/m3d}"
PY_REQS_KEY="v1-torch2.13.0"
PYVER="$(python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
export M3D_VENV="$M3D_CACHE/venv-py$PYVER-$PY_REQS_KEY"
RUSTC_VER="$(rustc --version | awk '{print $2}')"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$M3D_CACHE/target-rustc$RUSTC_VER}"
export LIBTORCH_USE_PYTORCH=1
export CARGO_TERM_PROGRESS_WHEN=never

mkdir -p "$M3D_CACHE"
REQ_HASH="$(sha256sum "$M3D_ROOT/scripts/requirements.txt" | cut -c1-16)"
if [ ! -f "$M3D_VENV/.complete" ]; then
  echo "[setup] creating Python environment $M3D_VENV (torch 2.13.0 + oracles; a few minutes the first time)"
  rm -rf "$M3D_VENV"
  python3 -m venv "$M3D_VENV"
  "$M3D_VENV/bin/pip" install --quiet --upgrade pip
  touch "$M3D_VENV/.complete"
fi
if [ "$(cat "$M3D_VENV/.requirements" 2>/dev/null)" != "$REQ_HASH" ]; then
  echo "[setup] installing Python requirements into $M3D_VENV"
  "$M3D_VENV/bin/pip" install --quiet -r "$M3D_ROOT/scripts/requirements.txt"
  echo "$REQ_HASH" > "$M3D_VENV/.requirements"
fi
ln -sfn "$M3D_VENV" "$M3D_ROOT/.venv"
export PATH="$M3D_VENV/bin:$PATH"

# buf (protobuf linter, pinned) from npm into the cache: tests/tests/proto_python_client.rs runs `buf lint` on proto/.
M3D_BUF_VERSION="1.75.0"
export M3D_BUF="$M3D_CACHE/npm/node_modules/.bin/buf"
if [ "$("$M3D_BUF" --version 2>/dev/null || true)" != "$M3D_BUF_VERSION" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "[setup] ERROR: npm not found; it is needed to install buf $M3D_BUF_VERSION (install Node.js and npm)" >&2
    return 1 2>/dev/null || exit 1
  fi
  echo "[setup] installing buf $M3D_BUF_VERSION into $M3D_CACHE/npm"
  npm install --prefix "$M3D_CACHE/npm" --no-audit --no-fund --loglevel=error "@bufbuild/buf@$M3D_BUF_VERSION"
  [ "$("$M3D_BUF" --version)" = "$M3D_BUF_VERSION" ] || { echo "[setup] ERROR: $M3D_BUF is not buf $M3D_BUF_VERSION" >&2; return 1 2>/dev/null || exit 1; }
fi


# nasm assembles libjpeg-turbo's SIMD decoder in m3d-formats (M3D-Cap slices; the same bits as the C code, about
# twice as fast). Without it the build falls back to C: slower conversion, same results. Installed where apt can.
if ! command -v nasm >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing nasm (libjpeg-turbo's SIMD JPEG decoder)"
    timeout 300 apt-get install -y -qq nasm >/dev/null 2>&1 \
      || { timeout 300 apt-get update -qq >/dev/null 2>&1 && timeout 300 apt-get install -y -qq nasm >/dev/null 2>&1; } \
      || echo "[setup] warning: could not install nasm; JPEG decoding is built without SIMD" >&2
  else
    echo "[setup] warning: nasm not found (and no root apt-get); JPEG decoding is built without SIMD" >&2
  fi
fi

# WordNet 3.0 (Debian's wordnet-base, plus wordnet-sense-index for the index.sense NLTK's reader insists on) in
# /usr/share/wordnet: m3d-scoring's METEOR reads it, and its oracle test fails without it. Installed where apt can.
if [ ! -f /usr/share/wordnet/data.noun ] || [ ! -f /usr/share/wordnet/index.sense ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing WordNet 3.0 (wordnet-base, wordnet-sense-index) for METEOR"
    timeout 300 apt-get install -y -qq --no-install-recommends wordnet-base wordnet-sense-index >/dev/null 2>&1 \
      || { timeout 300 apt-get update -qq >/dev/null 2>&1 \
        && timeout 300 apt-get install -y -qq --no-install-recommends wordnet-base wordnet-sense-index >/dev/null 2>&1; } \
      || echo "[setup] warning: could not install WordNet; m3d-scoring's METEOR tests will fail" >&2
  else
    echo "[setup] warning: WordNet not in /usr/share/wordnet (and no root apt-get); m3d-scoring's METEOR tests will fail" >&2
  fi
fi

# The target folder outlives clones; each clone adds its own test binaries. Drop superseded ones.
python3 "$M3D_ROOT/scripts/prune-target.py" "$CARGO_TARGET_DIR" || echo "[setup] warning: pruning $CARGO_TARGET_DIR failed" >&2

if [ "${M3D_SKIP_BUILD:-0}" != "1" ]; then
  echo "[setup] building the workspace (target dir $CARGO_TARGET_DIR)"
  (cd "$M3D_ROOT" && cargo build --release --workspace --all-targets --locked)
fi
export M3D_BIN="$CARGO_TARGET_DIR/release/m3d"
