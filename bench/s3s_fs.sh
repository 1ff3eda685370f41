# Sourced by the benchmarks that serve object storage on loopback (bench/open_stream.sh, bench/stream_throughput.sh):
# installs the s3s-fs S3 server (the `s3s-fs` crate, pinned; a Rust/tokio server over a folder that
# answers a ranged GET by reading just the range) into the m3d cache, once, and exports its path:
#   source bench/s3s_fs.sh; m3d_s3s_fs "$@"   ->   M3D_S3S_FS=<cache>/tools/s3s-fs-<version>-m3d-patched/bin/s3s-fs
# Nothing is installed when the benchmark's arguments choose no s3s-fs (`--server moto`, `--store file`).
#
# Version: 0.14.1 is the newest release whose rust-version (1.92) this toolchain (rustc 1.95) meets; 0.15.0 onwards
# ask for 1.96.
# Two lines of the published crate are changed, as both made the server, not the readers, the thing measured:
# - src/main.rs: `set_nodelay(true)` on each accepted connection. Without it a GET answer leaves as two writes
#   (headers, then the body), and Nagle's algorithm holds the body back until the client's delayed ACK of the
#   headers, about 40 ms: small ranged GETs (m3d's reads) then run at ~25 per second per connection
#   (bench/stream_throughput.py, 600 x 4x32x32, m3d blocks shuffle: 1,177-1,354 samples/s as published, 4,581-4,732
#   with the line);
# - src/s3.rs, get_object: the file is read in pieces of up to 1 MiB (at most the answer's length) instead of 4 KiB,
#   which held a whole-object GET to 130-200 MB/s (a 64 MiB shard, Streaming's read: 336-478 ms against 29-34 ms;
#   1 MiB ranges 5-7 against 1.7-1.9 ms).
# The crate's source comes through `cargo fetch` (checked by cargo against the registry index's checksum) and is
# built with its published Cargo.lock (--locked) in its own target folder, never the workspace's
# $CARGO_TARGET_DIR, outside the clone (no cargo config of it): a few minutes on 2 cores, once per version.
M3D_S3S_FS_VERSION="0.14.1"

m3d_s3s_fs() {
  local prev="" a
  for a in "$@"; do
    case "$prev $a" in
      "--server moto" | "--store file" | *" --server=moto" | *" --store=file") return 0 ;;
    esac
    prev="$a"
  done
  local v="$M3D_S3S_FS_VERSION"
  local tools="${M3D_CACHE:-$HOME/.cache/m3d}/tools"
  local root="$tools/s3s-fs-$v-m3d-patched"
  export M3D_S3S_FS="$root/bin/s3s-fs"
  [ -x "$M3D_S3S_FS" ] && return 0
  echo "[bench] installing s3s-fs $v (patched, see bench/s3s_fs.sh) into $root (a few minutes, once)" >&2
  local src="$tools/src/s3s-fs-$v" fetch="$tools/fetch-s3s-fs-$v"
  # cargo fetches (and checks against the registry index's checksum) the published source through a throwaway
  # package that depends on exactly this version; the copy in cargo's registry cache is then patched.
  mkdir -p "$tools/src" "$fetch/src"
  rm -rf "$src"
  printf '[package]\nname = "m3d-fetch-s3s-fs"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\ns3s-fs = "=%s"\n' \
    "$v" > "$fetch/Cargo.toml"
  : > "$fetch/src/lib.rs"
  cargo fetch --manifest-path "$fetch/Cargo.toml" >&2 || return 1
  local cached
  cached="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"s3s-fs-$v" 2>/dev/null | head -n 1)"
  [ -n "$cached" ] || { echo "[bench] cargo fetched no s3s-fs $v source" >&2; return 1; }
  cp -r "$cached" "$src" || return 1
  local accept='let conn = http_server\.serve_connection(TokioIo::new(socket)'
  local nodelay='let _ = socket.set_nodelay(true);'
  sed -i "s/^\( *\)\($accept\)/\1$nodelay\n\1\2/" "$src/src/main.rs"
  local reader='ReaderStream::with_capacity(file, 4096), content_length_usize)'
  local pieces='ReaderStream::with_capacity(file, content_length_usize.clamp(4096, 1 << 20)), content_length_usize)'
  sed -i "s/bytes_stream($reader/bytes_stream($pieces/" "$src/src/s3.rs"
  if [ "$(grep -cF "$nodelay" "$src/src/main.rs")" != 1 ] || [ "$(grep -cF "$pieces" "$src/src/s3.rs")" != 1 ]; then
    echo "[bench] could not patch $src (see bench/s3s_fs.sh)" >&2
    return 1
  fi
  (cd "$tools" && CARGO_TARGET_DIR="$tools/build" cargo install --path "$src" --features binary --locked \
    --root "$root") >&2
}
