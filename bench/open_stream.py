"""Opening a dataset in object storage at scale: m3d's shards (volume index, ranged reads) against Mosaic
Streaming (MDS, zstd), both served by the same local S3 server on loopback, bucket `bench`:

- `--server s3s` (the default): s3s-fs (crates.io, version pinned, two lines patched by bench/s3s_fs.sh, which
  says why), a Rust server over a fresh folder that answers a ranged GET by reading just the range, as real object
  stores do, and checks SigV4 signatures against the access key / secret given to both sides;
- `--server moto`: moto (the tests' server, in the venv), kept to reproduce earlier numbers: one Python process
  (~400 GETs/s on 2 cores) that answers a ranged GET by reading the whole object and slicing it, so that there a
  range costs what its object does.

Per size N (volumes of DxHxW u8, random so that compression cannot shrink them; one caption sample each) it writes
the same volumes once as m3d shards (shards/examples/open_bench write) and once as MDS (streaming.MDSWriter), then
alternates, per round: (a) m3d: open the dataset (manifest, sample table, volume index) and read the volumes of one
batch of random samples, as a worker's first step does; (b) Streaming: StreamingDataset(remote=..., local=fresh
cache, shuffle=True) and the first batch of samples from it (timed after `import streaming`, whose cost, mostly
torch's, is reported apart). Reported: seconds from open to the first batch,
bytes read before it (m3d: the store's I/O log; Streaming: what it downloaded into its cache), peak RSS.

    python bench/open_stream.py --open-bench <path to open_bench> [--server s3s|moto] [--s3s-fs <path>]
        [--sizes 12000,120000] [--rounds 3]
"""
import argparse
import importlib.metadata
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# Credentials of the loopback server, given to both sides (m3d's Store and boto3 read the AWS_* variables).
ACCESS_KEY, SECRET_KEY = "bench", "bench-secret"


def wait_listening(proc, port, name):
    for _ in range(300):
        if proc.poll() is not None:
            sys.exit(f"{name} exited with status {proc.returncode} before listening (see its log)")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"{name} did not start")


def start_moto(log):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, wait_listening(proc, port, "moto")


def start_s3s(log, binary, root):
    """s3s-fs on a free loopback port over `root` (made fresh; a bucket is a sub-folder of it), checking
    signatures against ACCESS_KEY / SECRET_KEY. Returns (process, endpoint)."""
    shutil.rmtree(root, ignore_errors=True)
    Path(root).mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", str(port), "--access-key", ACCESS_KEY,
                             "--secret-key", SECRET_KEY, str(root)], stdout=log, stderr=subprocess.STDOUT)
    return proc, wait_listening(proc, port, "s3s-fs")


def start_server(server, work, s3s_fs):
    """Starts `server` (moto or s3s) on loopback with an empty bucket `bench`, logging to <work>/<server>.log, and
    points this process at it. Returns (process, environment for the subprocesses of both sides, description)."""
    log = open(Path(work) / f"{server}.log", "w")
    if server == "s3s":
        if not s3s_fs or not os.access(s3s_fs, os.X_OK):
            sys.exit(f"--server s3s needs the s3s-fs binary (--s3s-fs or M3D_S3S_FS; bench/s3s_fs.sh installs it), "
                     f"got {s3s_fs!r}")
        proc, endpoint = start_s3s(log, s3s_fs, Path(work) / "s3s-root")
        version = subprocess.run([s3s_fs, "--version"], capture_output=True, text=True).stdout.split()
        patched = " (bench/s3s_fs.sh's patch)" if "m3d-patched" in str(s3s_fs) else ""
        what = f"{' '.join(version) or 's3s-fs'}{patched} S3 on loopback"
    else:
        proc, endpoint = start_moto(log)
        what = f"moto {importlib.metadata.version('moto')} S3 on loopback"
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION="us-east-1",
               AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint, S3_ENDPOINT_URL=endpoint)
    os.environ.update(env)
    import boto3
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    except Exception:
        proc.kill()
        raise
    return proc, env, what


def stop_server(proc, work):
    """Stops a server from start_server and removes what s3s-fs stored (both datasets)."""
    proc.kill()
    proc.wait()
    shutil.rmtree(Path(work) / "s3s-root", ignore_errors=True)


def add_server_args(ap):
    ap.add_argument("--server", choices=["s3s", "moto"], default="s3s",
                    help="the loopback S3 server: s3s-fs (ranged GETs read the range) or moto (ranged GETs read "
                         "the whole object; the earlier numbers)")
    ap.add_argument("--s3s-fs", default=os.environ.get("M3D_S3S_FS"),
                    help="path to the s3s-fs binary (default $M3D_S3S_FS, set by bench/s3s_fs.sh)")


def dir_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_mds(remote, local, n, shape, seed):
    import numpy as np
    from streaming import MDSWriter
    rng = np.random.default_rng(seed)
    columns = {"volume_id": "str", "image": f"ndarray:uint8:{','.join(map(str, shape))}", "report": "str"}
    out = (str(local), remote) if remote else str(local)
    with MDSWriter(out=out, columns=columns, compression="zstd", size_limit="64mb",
                   progress_bar=False, exist_ok=True) as w:
        for i in range(n):
            w.write({"volume_id": f"v{i:07d}", "image": rng.integers(0, 256, size=shape, dtype=np.uint8),
                     "report": f"report of case {i}"})


STREAMING_FIRST_BATCH = r"""
import json, os, resource, sys, time
t_import = time.time()
from streaming import StreamingDataset
t0 = time.time()
imported = t0 - t_import
remote, local, batch, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ds = StreamingDataset(remote=remote, local=local, shuffle=True, shuffle_seed=seed, batch_size=batch)
opened = time.time() - t0
it = iter(ds)
for _ in range(batch):
    s = next(it)
    assert s["image"].size > 0
first = time.time() - t0
size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(local) for f in fs)
print(json.dumps({"open_s": opened, "first_batch_s": first, "bytes": size, "samples": len(ds), "import_s": imported,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--open-bench", required=True)
    ap.add_argument("--sizes", default="12000,120000")
    ap.add_argument("--shape", default="4x32x32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--work", default=None)
    add_server_args(ap)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="m3d-open-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = [int(x) for x in args.shape.split("x")]
    server, env, where = start_server(args.server, work, args.s3s_fs)
    rows = []
    try:
        for n in [int(x) for x in args.sizes.split(",")]:
            t = time.time()
            out = subprocess.run([args.open_bench, "write", f"s3://bench/ours-{n}", "--volumes", str(n),
                                  "--shape", args.shape], env=env, capture_output=True, text=True, check=True)
            ours_written = json.loads(out.stdout)
            print(f"N={n}: m3d shards written in {time.time() - t:.1f} s: {ours_written}", file=sys.stderr)
            t = time.time()
            write_mds(f"s3://bench/mds-{n}", work / f"mds-out-{n}", n, shape, 0)
            shutil.rmtree(work / f"mds-out-{n}", ignore_errors=True)
            print(f"N={n}: MDS written in {time.time() - t:.1f} s", file=sys.stderr)
            for r in range(args.rounds):
                out = subprocess.run([args.open_bench, "open", f"s3://bench/ours-{n}", "--batch", str(args.batch),
                                      "--seed", str(r)], env=env, capture_output=True, text=True, check=True)
                ours = json.loads(out.stdout)
                # The same dataset opened the whole-table way (manifest with shard lists, sample table, index),
                # as before the sample lookup existed.
                out = subprocess.run([args.open_bench, "open", f"s3://bench/ours-{n}", "--batch", str(args.batch),
                                      "--seed", str(r), "--no-lookup"], env=env, capture_output=True, text=True,
                                     check=True)
                tables = json.loads(out.stdout)
                cache = work / f"cache-{n}-{r}"
                shutil.rmtree(cache, ignore_errors=True)
                out = subprocess.run([sys.executable, "-c", STREAMING_FIRST_BATCH, f"s3://bench/mds-{n}",
                                      str(cache), str(args.batch), str(r)], env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"streaming failed:\n{out.stderr[-3000:]}")
                ref = json.loads(out.stdout.strip().splitlines()[-1])
                shutil.rmtree(cache, ignore_errors=True)
                rows.append((n, r, ours, ref, tables))
                print(f"N={n} round {r}: m3d {ours['first_batch_s']:.3f} s {ours['bytes']} B; "
                      f"streaming {ref['first_batch_s']:.3f} s {ref['bytes']} B", file=sys.stderr)
    finally:
        stop_server(server, work)
    print(f"\nvolumes {args.shape} u8 (random), one sample each, batch {args.batch}, {where}, "
          f"{args.rounds} alternating rounds per size\n")
    print("| volumes | side | open (s) | to first batch (s) | bytes before first batch | requests | peak RSS (MiB) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == n]
        col = {"m3d": 2, "streaming": 3, "m3d (whole tables)": 4}
        med = lambda side, k: statistics.median(r[col[side]][k] for r in mine)
        for side in ("m3d", "m3d (whole tables)", "streaming"):
            req = med(side, "requests") if side != "streaming" else float("nan")
            print(f"| {n} | {side} | {med(side, 'open_s'):.3f} | {med(side, 'first_batch_s'):.3f} | "
                  f"{med(side, 'bytes'):.0f} | {req:.0f} | {med(side, 'peak_rss_mib'):.0f} |")
        print(f"| {n} | **ratio m3d / streaming** | | **{med('m3d', 'first_batch_s') / med('streaming', 'first_batch_s'):.2f}** "
              f"| {med('m3d', 'bytes') / med('streaming', 'bytes'):.3f} | | |")


if __name__ == "__main__":
    main()
