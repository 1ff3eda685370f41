#!/usr/bin/env bash
# Makes root podman usable for m3d's Kubernetes tests on a machine without a Kubernetes API server (the pods of a
# rendered JobSet run with `podman run`): installs Debian's podman + runc if missing and points CONTAINERS_CONF at
# k8s/podman/containers.conf (runc runtime, ulimits within the machine's hard limits; see that file).
#   source scripts/podman-setup.sh     exports CONTAINERS_CONF in the calling shell (its shell options are untouched)
#   scripts/podman-setup.sh            sets up and checks, then prints the `export CONTAINERS_CONF=...` line
# Quiet when everything is already there. The first time (or after podman or the conf changes) it also runs a smoke
# test: a tiny FROM-scratch image (k8s/image.sh, /usr/bin/true) started with `podman run --user 65532`. Exits (or
# returns) non-zero with a message if podman cannot work here, e.g. not root, or the container does not start.
# Installing takes about 20 s (33.8 MB of .debs: podman 4.3.1, runc 1.1.5, conmon, netavark, aardvark-dns, buildah,
# containernetworking-plugins, iptables/nftables, fuse-overlayfs, slirp4netns, uidmap, criu, catatonit, ...).

_m3d_podman_setup() (
  set -euo pipefail
  root="$1" conf="$2"
  say() { echo "[podman-setup] $*" >&2; }
  fail() { echo "[podman-setup] ERROR: $*" >&2; exit 1; }

  [ -f "$conf" ] || fail "$conf is missing"
  if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || fail "podman/runc are not installed and there is no apt-get; install podman (4.x) and runc"
    [ "$(id -u)" = 0 ] || fail "podman/runc are not installed and installing them needs root (apt-get install podman runc)"
    say "installing podman and runc with apt-get (about 20 s)"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 600 apt-get install -y -qq podman runc >/tmp/m3d-podman-apt.log 2>&1; then
      say "apt-get install failed; running apt-get update and retrying"
      timeout 600 apt-get update -qq >>/tmp/m3d-podman-apt.log 2>&1 \
        && timeout 600 apt-get install -y -qq podman runc >>/tmp/m3d-podman-apt.log 2>&1 \
        || fail "could not install podman and runc (log: /tmp/m3d-podman-apt.log)"
    fi
    command -v podman >/dev/null 2>&1 && command -v runc >/dev/null 2>&1 || fail "podman/runc still missing after apt-get"
  fi

  # The tests run rootful podman; rootless podman (subuid/subgid ranges, user namespaces) is not set up or checked here.
  [ "$(id -u)" = 0 ] || fail "podman must run as root here (uid $(id -u)); run the tests as root"

  export CONTAINERS_CONF="$conf"
  info="$(podman info --format '{{.Host.OCIRuntime.Name}}' 2>&1)" || fail "podman info failed: $info"
  [ "$info" = runc ] || fail "podman uses the OCI runtime '$info', expected runc (CONTAINERS_CONF=$conf)"

  # Smoke test once per (podman version, conf, image.sh) on this machine.
  key="$( { podman --version; runc --version | head -n1; cat "$conf" "$root/k8s/image.sh"; } | sha256sum | cut -c1-16)"
  marker="/var/lib/containers/.m3d-podman-ok-$key"
  if [ ! -f "$marker" ]; then
    tag="localhost/m3d-podman-smoke:$key"
    out="$("$root/k8s/image.sh" --tag "$tag" /usr/bin/true 2>&1)" || fail "building a test image failed: $out"
    base="localhost/m3d-image-base:$(podman image inspect --format '{{index .Labels "m3d.image.base"}}' "$tag")"
    cleanup() { podman rmi -f "$tag" >/dev/null 2>&1 || true; podman rmi "$base" >/dev/null 2>&1 || true; }
    out="$(timeout 120 podman run --rm --user 65532 --network none "$tag" /usr/local/bin/true 2>&1)" \
      || { cleanup; fail "podman cannot run a container here: $out"; }
    cleanup
    mkdir -p "$(dirname "$marker")" && touch "$marker"
  fi
)

_m3d_podman_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  # Sourced: set up in a subshell (set -euo pipefail stays there), then export into the caller.
  if _m3d_podman_setup "$_m3d_podman_root" "$_m3d_podman_root/k8s/podman/containers.conf"; then
    export CONTAINERS_CONF="$_m3d_podman_root/k8s/podman/containers.conf"
    unset _m3d_podman_root
  else
    unset _m3d_podman_root
    return 1
  fi
else
  set -euo pipefail
  _m3d_podman_setup "$_m3d_podman_root" "$_m3d_podman_root/k8s/podman/containers.conf"
  echo "export CONTAINERS_CONF=$_m3d_podman_root/k8s/podman/containers.conf"
fi
