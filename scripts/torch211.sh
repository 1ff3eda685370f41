#!/usr/bin/env bash
# The workspace against torch 2.11.0 / tch 0.24.0 — the PyTorch of the lent GPU machines — next to the default
# torch 2.13.0 / tch 0.26 build of setup.sh. The sources are the same; only the tch pin differs.
#
#   bash scripts/torch211.sh                  # = check: type-check every target of the workspace against 2.11 (CI)
#   bash scripts/torch211.sh cargo ARGS...    # any cargo command against 2.11, e.g. cargo build --profile gpu -p m3d
#   source scripts/torch211.sh                # only the environment and the synced tree (for other scripts)
#
# Cargo cannot hold two `tch`/`torch-sys` versions in one lock (both are `links = "tch"`), so the 2.11 build
# runs in a generated copy of the working tree, $M3D_CACHE/src-torch2.11.0-<hash of this checkout's path>:
# every tracked and untracked-not-ignored file (`git ls-files -co --exclude-standard`, mtimes kept, so cargo
# rebuilds only what changed) and the root Cargo.toml with `tch`/`torch-sys` pinned to =0.24.0. Its Cargo.lock is
# derived from the committed Cargo.lock whenever that (or Cargo.toml) changes: cargo re-resolves only the pinned
# crates, and the script checks that tch and torch-sys are the only packages whose versions differ, so every
# other dependency is exactly the main lock's and the build then runs `--locked`. (No second committed lock:
# it would go stale with every dependency change in the workspace.) It has its own Python environment
# ($M3D_CACHE/venv-py<ver>-torch2.11.0: torch==2.11.0 only, created when missing) and its own target folder
# ($M3D_CACHE/target-torch2.11.0-rustc<ver>), so neither build invalidates the other.
# Binaries built here get an rpath into that environment's torch/lib (build/libtorch_rpath.rs); elsewhere,
# point LD_LIBRARY_PATH at that machine's torch/lib (scripts/first-contact.sh does).
set -euo pipefail

M3D_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
M3D_CACHE="${M3D_CACHE:-$HOME/.cache/m3d}"
M3D_TORCH_VERSION="2.11.0"
M3D_TCH_VERSION="0.24.0"
PYVER="$(python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
RUSTC_VER="$(rustc --version | awk '{print $2}')"
# Not inherited: a caller that sourced setup.sh has the 2.13 environment and target folder in these.
export M3D_VENV="$M3D_CACHE/venv-py$PYVER-torch$M3D_TORCH_VERSION"
export CARGO_TARGET_DIR="${M3D_TORCH211_TARGET:-$M3D_CACHE/target-torch$M3D_TORCH_VERSION-rustc$RUSTC_VER}"
M3D_TORCH211_SRC="$M3D_CACHE/src-torch$M3D_TORCH_VERSION-$(printf '%s' "$M3D_ROOT" | sha256sum | cut -c1-8)"
export M3D_TORCH211_SRC
export LIBTORCH_USE_PYTORCH=1
export CARGO_TERM_PROGRESS_WHEN=never
unset LIBTORCH LIBTORCH_LIB LIBTORCH_INCLUDE

torch211_venv() {
  if [ ! -f "$M3D_VENV/.complete" ]; then
    # Adopt an environment that already holds exactly this torch (made by hand or by an interrupted run).
    if "$M3D_VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$M3D_TORCH_VERSION')" \
      >/dev/null 2>&1; then
      touch "$M3D_VENV/.complete"
    else
      echo "[torch211] creating Python environment $M3D_VENV (torch==$M3D_TORCH_VERSION; a few minutes the first time)"
      rm -rf "$M3D_VENV"
      python3 -m venv "$M3D_VENV"
      "$M3D_VENV/bin/pip" install --quiet --upgrade pip
      "$M3D_VENV/bin/pip" install --quiet "torch==$M3D_TORCH_VERSION"
      touch "$M3D_VENV/.complete"
    fi
  fi
  export PATH="$M3D_VENV/bin:$PATH"
  export PYTHON_SYS_EXECUTABLE="$M3D_VENV/bin/python"
}

# Writes $2 from stdin only when the content differs, so an unchanged file keeps its mtime.
torch211_write_if_changed() {
  local tmp
  tmp="$(mktemp)"
  cat >"$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else chmod 644 "$tmp" && mv "$tmp" "$1"; fi
}

# The working tree's files, NUL-separated: what git tracks or would track; outside a git checkout, everything
# but the usual build and output folders.
torch211_files() {
  if git -C "$M3D_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$M3D_ROOT" && git ls-files -co --exclude-standard -z)
  else
    (cd "$M3D_ROOT" && find . \( -name .git -o -path ./target -o -path ./out -o -path ./runs -o -path ./gpu-bundle \
      -o -path ./.venv -o -name __pycache__ \) -prune -o \( -type f -o -type l \) -print0 | sed -z 's|^\./||')
  fi
}

# Brings the generated tree up to date with the working tree.
torch211_sync() {
  mkdir -p "$M3D_TORCH211_SRC"
  local want have
  want="$(mktemp)"; have="$(mktemp)"
  torch211_files \
    | while IFS= read -r -d '' f; do
        # Skip what the tree generates itself, and tracked files deleted in the working tree.
        case "$f" in Cargo.toml | Cargo.lock) continue ;; esac
        if [ -f "$M3D_ROOT/$f" ] || [ -L "$M3D_ROOT/$f" ]; then printf '%s\0' "$f"; fi
      done >"$want"
  # Copy (tar restores the mtimes; an unchanged file stays unchanged for cargo) ...
  tar -C "$M3D_ROOT" --null -T "$want" -cf - | tar -C "$M3D_TORCH211_SRC" -xpf -
  # ... and drop what the working tree no longer has (cargo finds tests and examples by listing folders).
  (cd "$M3D_TORCH211_SRC" && find . \( -path ./Cargo.toml -o -path ./Cargo.lock -o -path ./.lock-key \) -prune \
    -o \( -type f -o -type l \) -print0 | sed -z 's|^\./||') >"$have"
  comm -z -13 <(sort -z "$want") <(sort -z "$have") | (cd "$M3D_TORCH211_SRC" && xargs -0 -r rm -f --)
  rm -f "$want" "$have"

  local manifest
  manifest="$(sed -E \
    -e "s/^tch = \"[^\"]*\"/tch = \"=$M3D_TCH_VERSION\"  # pinned by scripts\/torch211.sh/" \
    -e "s/^torch-sys = \"[^\"]*\"/torch-sys = \"=$M3D_TCH_VERSION\"  # pinned by scripts\/torch211.sh/" \
    "$M3D_ROOT/Cargo.toml")"
  if [ "$(grep -c "pinned by scripts/torch211.sh" <<<"$manifest")" != 2 ]; then
    echo "[torch211] Cargo.toml no longer has the lines \`tch = \"...\"\` and \`torch-sys = \"...\"\` this script pins" >&2
    return 1
  fi
  torch211_write_if_changed "$M3D_TORCH211_SRC/Cargo.toml" <<<"$manifest"
  torch211_lock
}

# (name version source) of every package of a Cargo.lock, one a line, sorted.
torch211_packages() {
  awk '/^\[\[package\]\]/ { if (n) print n, v, s; n = v = s = "" }
       /^name = / { n = $3 } /^version = / { v = $3 } /^source = / { s = $3 }
       END { if (n) print n, v, s }' "$1" | tr -d '"' | sort
}

# Derives the tree's Cargo.lock from the main one, when the main lock or the manifest changed.
torch211_lock() {
  local key
  key="$(cat "$M3D_ROOT/Cargo.lock" "$M3D_TORCH211_SRC/Cargo.toml" | sha256sum | cut -c1-16)"
  if [ "$(cat "$M3D_TORCH211_SRC/.lock-key" 2>/dev/null)" = "$key" ] && [ -f "$M3D_TORCH211_SRC/Cargo.lock" ]; then
    return 0
  fi
  echo "[torch211] deriving Cargo.lock from the workspace's (tch/torch-sys =$M3D_TCH_VERSION)"
  cp "$M3D_ROOT/Cargo.lock" "$M3D_TORCH211_SRC/Cargo.lock"
  (cd "$M3D_TORCH211_SRC" && cargo update --quiet -p tch -p torch-sys)
  local changed
  changed="$(comm -3 <(torch211_packages "$M3D_ROOT/Cargo.lock") <(torch211_packages "$M3D_TORCH211_SRC/Cargo.lock") \
    | awk '{print $1}' | sort -u | paste -sd' ')"
  if [ "$changed" != "tch torch-sys" ]; then
    echo "[torch211] pinning tch $M3D_TCH_VERSION changed more packages than tch and torch-sys: $changed." >&2
    echo "[torch211] Either Cargo.lock is behind the manifests (update it in the checkout), or tch $M3D_TCH_VERSION" \
      "needs crates the workspace does not lock: then review them and relax this check." >&2
    return 1
  fi
  echo "$key" >"$M3D_TORCH211_SRC/.lock-key"
}

# `cargo ARGS --locked` in the generated tree, with a hint when the committed lock is behind the manifests.
torch211_cargo() {
  local log status=0
  log="$(mktemp)"
  (cd "$M3D_TORCH211_SRC" && cargo "$1" --locked "${@:2}") 2> >(tee "$log" >&2) || status=$?
  wait
  if [ "$status" != 0 ] && grep -q -- "--locked was passed" "$log"; then
    echo "[torch211] the workspace's Cargo.lock is behind its manifests: update it (cargo build in the checkout)" >&2
  fi
  rm -f "$log"
  return "$status"
}

torch211_venv
torch211_sync

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  cmd="${1:-check}"
  [ $# -gt 0 ] && shift
  case "$cmd" in
    check)
      echo "[torch211] type-checking the workspace against torch $M3D_TORCH_VERSION / tch $M3D_TCH_VERSION (target dir $CARGO_TARGET_DIR)"
      torch211_cargo check --profile gpu --workspace --all-targets "$@"
      ;;
    cargo) torch211_cargo "$@" ;;
    *)
      echo "usage: bash scripts/torch211.sh [check [CARGO ARGS] | cargo ARGS...]" >&2
      exit 2
      ;;
  esac
fi
