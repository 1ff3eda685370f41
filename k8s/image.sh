#!/usr/bin/env bash
# Builds a runnable container image from binaries on THIS machine, pulling nothing (no registry needed):
#   k8s/image.sh --tag m3d:dev [--add PATH]... [--env K=V]... [--force] [--list] BIN [BIN...]
#
# The image is `FROM scratch` with:
#   - each BIN at /usr/local/bin/<basename of BIN> (symlinks resolved; a `#!` script also gets its interpreter); a BIN
#     whose RPATH/RUNPATH uses $ORIGIN stays at its host path and /usr/local/bin/<name> is a symlink to it,
#   - the shared-library closure of every BIN and of every ELF file given with --add, as `ldd` resolves it
#     (RPATH/RUNPATH included, e.g. libtorch under a venv's site-packages/torch/lib and the nvidia/* CUDA libraries
#     its RPATH names): the dynamic loader at its absolute path, each library at its host path, and every symlink on
#     the way (/lib -> usr/lib, libfoo.so.1 -> libfoo.so.1.2, ...) recreated as a symlink,
#   - --add PATH: a file or a whole directory (recursively) at the same path, e.g. python's stdlib, or libraries the
#     program dlopen()s (ldd cannot see those: NCCL through cudarc's dynamic loading, for instance); the closure of
#     an added ELF file, and of every *.so / *.so.* file in an added directory, comes too (symlinks inside an added
#     directory are copied as symlinks, their targets are not followed),
#   - /etc/passwd, /etc/group with root, nobody and the non-root user m3d (uid/gid 65532, home /home/m3d),
#     /etc/nsswitch.conf ("hosts: files dns"), /tmp (1777), the host's CA bundle and /etc/ld.so.cache if present.
#   Image config: USER 65532:65532, WORKDIR /home/m3d, PATH=/usr/local/bin:/usr/bin:/bin, HOME=/home/m3d, plus --env.
#   No ENTRYPOINT/CMD: the pod spec (or `podman run IMAGE CMD...`) gives the command.
#
# Library paths are kept IDENTICAL to the host paths (no LD_LIBRARY_PATH): absolute RUNPATHs baked in by the build
# (m3d's rpath to the venv's torch/lib) and libtorch's own `$ORIGIN/../../nvidia/...` RPATH then resolve unchanged, and
# nothing in the image depends on an environment variable a pod spec could override. Every directory and file is made
# world-readable (tar --mode=go+rX), so a venv under /root (mode 0700 on the host) is usable by uid 65532.
#
# How: two layers. The base (loader, libraries, --add paths, generated /etc, /tmp, /home/m3d; tagged
# localhost/m3d-image-base:<fingerprint>) is one `tar` stream of the listed host paths plus a small generated tree,
# fed to `podman import` (no build-context copy: ~75 s for a 2.8 GB CUDA libtorch closure here). The binaries go on
# top with `podman build` (FROM the base, COPY bin/; seconds). Both carry fingerprints (paths, sizes, mtimes, modes of
# every file, the options, this script) as labels: a re-run with nothing changed does nothing (<1 s), a re-run after
# recompiling a binary only rebuilds the thin top layer, --force rebuilds both. Replaced images are removed.
# --list prints the image's files and exits. Runs hold a lock (one image.sh at a time on a machine) and remove the
# images earlier runs left unnamed (see gc), and a base import first checks there is room for it, naming the numbers.
# Needs root podman (see scripts/podman-setup.sh); CONTAINERS_CONF defaults to k8s/podman/containers.conf.
set -euo pipefail

M3D_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$M3D_ROOT/k8s/image.sh"
die() { echo "image.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,3p' "$SELF" | sed 's/^# *//' >&2; exit 2; }

TAG="" FORCE=0 LIST=0
BINS=() ADDS=() ENVS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) [ $# -ge 2 ] || usage; TAG="$2"; shift 2 ;;
    --tag=*) TAG="${1#--tag=}"; shift ;;
    --add) [ $# -ge 2 ] || usage; ADDS+=("$2"); shift 2 ;;
    --env) [ $# -ge 2 ] || usage; [[ "$2" == *=* ]] || die "--env wants K=V, got '$2'"; ENVS+=("$2"); shift 2 ;;
    --force) FORCE=1; shift ;;
    --list) LIST=1; shift ;;
    -h|--help) usage ;;
    --) shift; BINS+=("$@"); break ;;
    -*) die "unknown option $1" ;;
    *) BINS+=("$1"); shift ;;
  esac
done
[ -n "$TAG" ] || die "--tag is required"
[ ${#BINS[@]} -gt 0 ] || die "give at least one binary"

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
declare -A SEEN=()       # host path -> 1, for the rootfs list
declare -A CLOSED=()     # file -> 1, ldd already run
HOST_LIST=()             # paths relative to /, in tar order (parents before children)

emit() {
  [ -n "${SEEN[$1]:-}" ] && return 0
  SEEN[$1]=1
  HOST_LIST+=("${1#/}")
}

# add_host_path PATH: put PATH (absolute; may contain '..' and symlinks) into the image at the same place: every
# directory on the way as a directory entry, every symlink on the way as a symlink plus (recursively) its target.
add_host_path() {
  local path="$1" depth="${2:-0}" cur="" comp target rest i n
  [ "$depth" -lt 40 ] || die "too many levels of symbolic links at $path"
  [[ "$path" == /* ]] || die "not an absolute path: $path"
  local -a parts
  IFS=/ read -r -a parts <<< "$path"
  n=${#parts[@]}
  for ((i = 0; i < n; i++)); do
    comp="${parts[i]}"
    [ -z "$comp" ] || [ "$comp" = . ] && continue
    if [ "$comp" = .. ]; then cur="${cur%/*}"; continue; fi   # cur never holds a symlink, so this is physical
    cur="$cur/$comp"
    if [ -L "$cur" ]; then
      emit "$cur"
      target="$(readlink "$cur")"
      [[ "$target" == /* ]] || target="${cur%/*}/$target"
      rest="$(IFS=/; echo "${parts[*]:i+1}")"
      add_host_path "$target${rest:+/$rest}" $((depth + 1))
      return 0
    fi
    [ -e "$cur" ] || die "$path: $cur does not exist"
    emit "$cur"
  done
}

is_elf() { [ -f "$1" ] && [ "$(head -c 4 "$1" | od -An -c | tr -d ' ')" = '177ELF' ]; }

# add_closure FILE: the libraries ldd resolves for FILE (a fresh environment: a host LD_LIBRARY_PATH/LD_PRELOAD would
# resolve libraries that the container, without them, would not find).
add_closure() {
  local f="$1" out line lib
  [ -n "${CLOSED[$f]:-}" ] && return 0
  CLOSED[$f]=1
  is_elf "$f" || return 0
  out="$(env -u LD_LIBRARY_PATH -u LD_PRELOAD ldd "$f" 2>&1)" || {
    case "$out" in *"not a dynamic executable"*|*"statically linked"*) return 0 ;; esac
    die "ldd $f failed: $out"
  }
  while IFS= read -r line; do
    case "$line" in
      *"=> not found"*) lib="${line%% =>*}"; die "$f: library not found: ${lib//[[:space:]]/} (ldd $f)" ;;
      *"=> /"*) lib="${line#*=> }"; lib="${lib% (0x*}" ;;
      *"=> "*) continue ;;                                   # e.g. linux-vdso.so.1 => (0x...)
      [[:space:]]/*) lib="${line#"${line%%[![:space:]]*}"}"; lib="${lib% (0x*}" ;;   # the loader, by absolute path
      *) continue ;;
    esac
    add_host_path "$lib"
  done <<< "$out"
}

uses_origin() {
  if command -v readelf >/dev/null; then readelf -d "$1" 2>/dev/null | grep -E '\((RPATH|RUNPATH)\)' | grep -q ORIGIN
  else grep -aq '$ORIGIN' "$1"; fi
}

# add_interpreter SCRIPT: a `#!/path/to/interp` script needs its interpreter (and that one's closure).
add_interpreter() {
  local first interp
  is_elf "$1" && return 0
  first="$(head -c 256 "$1" | head -n 1)"
  [[ "$first" == '#!'* ]] || return 0
  read -r interp _ <<< "${first#\#!}"
  [ -n "$interp" ] && [ -e "$interp" ] || die "$1: interpreter '$interp' not found"
  add_host_path "$interp"
  add_closure "$(readlink -f "$interp")"
}

STAGE="$(mktemp -d /tmp/m3d-image.XXXXXX)"
trap 'rm -rf "$STAGE"' EXIT
ROOTFS="$STAGE/rootfs"     # generated files of the base layer
CTX="$STAGE/ctx"           # build context of the binaries layer
mkdir -p "$ROOTFS"/{etc,tmp,home/m3d,usr/local/bin} "$CTX/bin"
chmod 1777 "$ROOTFS/tmp"
chmod 0755 "$ROOTFS"/{etc,home,home/m3d,usr,usr/local,usr/local/bin}

declare -A BIN_NAMES=()
for b in "${BINS[@]}"; do
  if [[ "$b" != */* ]]; then b="$(command -v "$b")" || die "binary not found in PATH: $b"; fi
  [ -e "$b" ] || die "no such file: $b"
  real="$(readlink -f "$b")"
  [ -f "$real" ] && [ -x "$real" ] || die "not an executable file: $b"
  name="$(basename "$b")"
  [ -z "${BIN_NAMES[$name]:-}" ] || die "two binaries named $name"
  BIN_NAMES[$name]=1
  if uses_origin "$real"; then
    # An $ORIGIN-relative RPATH/RUNPATH resolves from the executable's real path: keep the binary at its host path
    # and make /usr/local/bin/<name> a symlink to it (ld.so resolves $ORIGIN through the symlink).
    add_host_path "$real"
    ln -s "$real" "$ROOTFS/usr/local/bin/$name"
  else
    cp --reflink=auto --preserve=mode,timestamps "$real" "$CTX/bin/$name"
    chmod 0755 "$CTX/bin/$name"
  fi
  add_closure "$real"
  add_interpreter "$real"
done

for a in "${ADDS[@]}"; do
  [[ "$a" == /* ]] || a="$(pwd)/$a"
  [ -e "$a" ] || die "--add: no such path: $a"
  add_host_path "$a"
  real="$(readlink -f "$a")"
  if [ -d "$real" ]; then
    while IFS= read -r -d '' p; do
      emit "$p"
      case "$p" in *.so|*.so.*) [ -L "$p" ] || add_closure "$p" ;; esac   # e.g. python's lib-dynload/*.so
    done < <(find "$real" -mindepth 1 -print0 | sort -z)
  else
    add_closure "$real"
  fi
done

[ -e /etc/ld.so.cache ] && add_host_path /etc/ld.so.cache

cat > "$ROOTFS/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/usr/sbin/nologin
m3d:x:65532:65532:m3d:/home/m3d:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
cat > "$ROOTFS/etc/group" <<'EOF'
root:x:0:
m3d:x:65532:
nogroup:x:65534:
EOF
cat > "$ROOTFS/etc/nsswitch.conf" <<'EOF'
passwd: files
group: files
shadow: files
hosts: files dns
networks: files
protocols: files
services: files
EOF
chmod 0644 "$ROOTFS"/etc/{passwd,group,nsswitch.conf}
chown 65532:65532 "$ROOTFS/home/m3d"
if [ -e /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$ROOTFS/etc/ssl/certs" && chmod 0755 "$ROOTFS/etc/ssl" "$ROOTFS/etc/ssl/certs"
  cp -L /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
  chmod 0644 "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
fi

# Host entries first, the staging tree last.
# A layer tar must not name a path twice (podman import refuses "duplicates of file paths"): drop the host entries
# the staging tree also has (directories such as /etc and /usr, or a file given with --add that it generates).
(cd "$ROOTFS" && find . -mindepth 1 | sort) > "$STAGE/stage.list"
printf '%s\n' "${HOST_LIST[@]}" | grep -vxF -f <(sed 's|^\./||' "$STAGE/stage.list") > "$STAGE/host.list" || true

if [ "$LIST" = 1 ]; then
  sed 's|^|/|' "$STAGE/host.list"; sed 's|^\.||' "$STAGE/stage.list"
  (cd "$CTX/bin" && find . -mindepth 1 | sort | sed 's|^\.|/usr/local/bin|')
  exit 0
fi

export CONTAINERS_CONF="${CONTAINERS_CONF:-$M3D_ROOT/k8s/podman/containers.conf}"
command -v podman >/dev/null || die "podman not found (run scripts/podman-setup.sh)"

CHANGES=(--change "USER 65532:65532" --change "WORKDIR /home/m3d"
         --change "ENV PATH=/usr/local/bin:/usr/bin:/bin" --change "ENV HOME=/home/m3d")
for e in "${ENVS[@]}"; do CHANGES+=(--change "ENV $e"); done

(cd / && tr '\n' '\0' < "$STAGE/host.list" | xargs -0 -r stat -c '%s %Y %f %u %g %F|%n') > "$STAGE/host.stat"
FP_BASE="$( {
  sha256sum "$SELF"
  printf '%s\n' "${CHANGES[@]}"
  cat "$STAGE/host.stat"
  (cd "$ROOTFS" && tr '\n' '\0' < "$STAGE/stage.list" | xargs -0 -r stat -c '%n %s %f %u %g')
  (cd "$ROOTFS" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum)
} | sha256sum | cut -c1-32)"
BASE_TAG="localhost/m3d-image-base:$FP_BASE"
FP="$( { echo "$FP_BASE"; (cd "$CTX" && find bin -mindepth 1 -print0 | sort -z | xargs -0 -r stat -c '%n %s %Y %f'); } \
       | sha256sum | cut -c1-32)"

label() { podman image inspect --format "{{index .Labels \"$2\"}}" "$1" 2>/dev/null || true; }
image_id() { podman image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }

# One image.sh at a time on this machine: two concurrent builds of the same tag (two tests starting together) would
# each import a multi-GB base, and the loser's image would be left untagged, holding its disk until removed by hand.
# With the lock the second caller waits and then finds the image up to date.
LOCK="${TMPDIR:-/tmp}/m3d-image.sh.lock"
exec 9>>"$LOCK"
if command -v flock >/dev/null; then flock 9; fi

# gc KEEP_BASE_FP: remove what earlier runs of this script left behind and nothing can name any more: untagged images
# carrying our labels (a binaries layer replaced by a rebuild, a base whose tag went to a newer import), then bases no
# tagged image is built on (KEEP_BASE_FP excepted). An image a container still uses stays (podman refuses; ignored).
gc() {
  local id fp used=" $1 "
  for id in $(podman images --noheading --filter dangling=true --filter label=m3d.image.fingerprint --format '{{.ID}}') \
            $(podman images --noheading --filter dangling=true --filter label=m3d.image.base --format '{{.ID}}'); do
    podman rmi "$id" >/dev/null 2>&1 || true
  done
  for id in $(podman images --noheading --filter dangling=false --filter label=m3d.image.fingerprint --format '{{.ID}}'); do
    used+="$(label "$id" m3d.image.base) "
  done
  for fp in $(podman images --noheading --format '{{.Tag}}' localhost/m3d-image-base); do
    [[ "$used" == *" $fp "* ]] || podman rmi "localhost/m3d-image-base:$fp" >/dev/null 2>&1 || true
  done
}

# free_mib DIR: MiB available on DIR's filesystem.
free_mib() { df -Pm "$1" | awk 'NR == 2 { print $4 }'; }

if [ "$FORCE" = 0 ] && [ "$(label "$TAG" m3d.image.fingerprint)" = "$FP" ]; then
  echo "image.sh: $TAG is up to date (fingerprint $FP; $(elapsed) s)"
  exit 0
fi
OLD_ID="$(image_id "$TAG")"
OLD_BASE_FP="$(label "$TAG" m3d.image.base)"
OLD_BASE_ID="$(image_id "$BASE_TAG")"

# Layer 1, the base: libraries, loader, generated /etc, /tmp, /home/m3d. Rebuilt only when one of its files changes
# (a new torch, a new --add), so the usual re-run after recompiling m3d skips this import.
if [ "$FORCE" = 1 ] || [ -z "$OLD_BASE_ID" ]; then
  gc "$OLD_BASE_FP"
  SIZE="$(awk '/ regular( empty)? file\|/ { s += $1 } END { printf "%.0f", s }' "$STAGE/host.stat")"
  # podman import spools the stream to a temporary file, then unpacks it into its storage: twice the size, at peak.
  GRAPH="$(podman info --format '{{.Store.GraphRoot}}')"
  SPOOL="${TMPDIR:-/var/tmp}"
  NEED=$((2 * SIZE / 1048576 + 256))
  HAVE="$(free_mib "$GRAPH")"
  if [ "$(df -P "$GRAPH" | awk 'NR == 2 { print $1 }')" != "$(df -P "$SPOOL" | awk 'NR == 2 { print $1 }')" ]; then
    NEED=$((SIZE / 1048576 + 256))
    [ "$(free_mib "$SPOOL")" -ge "$NEED" ] \
      || die "importing the base needs ${NEED} MiB free in $SPOOL (podman's spool), has $(free_mib "$SPOOL") MiB"
  fi
  [ "$HAVE" -ge "$NEED" ] || die "importing the base ($((SIZE / 1048576)) MiB of host files) needs ${NEED} MiB free" \
    "under $GRAPH, has ${HAVE} MiB; images there: $(podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | tr '\n' ';')"
  echo "image.sh: importing base $BASE_TAG: $(wc -l < "$STAGE/host.list") host paths ($((SIZE / 1048576)) MiB)" \
       "+ $(wc -l < "$STAGE/stage.list") generated entries"
  # --no-recursion: only the listed entries (directories listed one by one); --mode=go+rX: readable by uid 65532.
  tar --create --file=- --no-recursion --numeric-owner --mode=go+rX \
      -C / --files-from="$STAGE/host.list" -C "$ROOTFS" --files-from="$STAGE/stage.list" \
    | podman import --quiet "${CHANGES[@]}" --change "LABEL m3d.image.base=$FP_BASE" \
        --message "k8s/image.sh base for ${BINS[*]}" - "$BASE_TAG" >/dev/null
  echo "image.sh: base imported at $(elapsed) s"
fi

# Layer 2: the binaries (regular copies; those kept at their host path for $ORIGIN are in the base).
{
  echo "FROM $BASE_TAG"
  if [ -n "$(ls -A "$CTX/bin")" ]; then echo "COPY bin/ /usr/local/bin/"; fi
} > "$CTX/Containerfile"
podman build --quiet --pull=never --layers=false --file "$CTX/Containerfile" \
  --label "m3d.image.fingerprint=$FP" --label "m3d.image.base=$FP_BASE" --tag "$TAG" "$CTX" >/dev/null

# Drop what this build replaced (the previous image of TAG, now untagged; a base replaced by --force; the previous
# base when no other image is built on it). Bases are found by their label, not by podman's parent tracking, which a
# `podman rmi` of a base does not respect for images built with --layers=false.
gc "$FP_BASE"
echo "image.sh: built $TAG in $(elapsed) s"
