"""Opening a dataset in object storage at scale: m3d's shards (volume index, ranged reads) against Mosaic
Streaming (MDS, zstd), both served by the same local S3 server (moto, the tests' server) on loopback.

Per size N (volumes of DxHxW u8, random so that compression cannot shrink them; one caption sample each) it writes
the same volumes once as m3d shards (shards/examples/open_bench write) and once as MDS (streaming.MDSWriter), then
alternates, per round: (a) m3d: open the dataset (manifest, sample table, volume index) and read the volumes of one
batch of random samples, as a worker's first step does; (b) Streaming: StreamingDataset(remote=..., local=fresh
cache, shuffle=True) and the first batch of samples from it (timed after `import streaming`, whose cost, mostly
torch's, is reported apart). Reported: seconds from open to the first batch,
bytes read before it (m3d: the store's I/O log; Streaming: what it downloaded into its cache), peak RSS.

    python bench/open_stream.py --open-bench <path to open_bench> [--sizes 12000,120000] [--rounds 3]
"""
import argparse
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


def start_moto(log):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("moto did not start")


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
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="m3d-open-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = [int(x) for x in args.shape.split("x")]
    log = open(work / "moto.log", "w")
    moto, endpoint = start_moto(log)
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
               AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint, S3_ENDPOINT_URL=endpoint)
    os.environ.update(env)
    import boto3
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
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
                cache = work / f"cache-{n}-{r}"
                shutil.rmtree(cache, ignore_errors=True)
                out = subprocess.run([sys.executable, "-c", STREAMING_FIRST_BATCH, f"s3://bench/mds-{n}",
                                      str(cache), str(args.batch), str(r)], env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"streaming failed:\n{out.stderr[-3000:]}")
                ref = json.loads(out.stdout.strip().splitlines()[-1])
                shutil.rmtree(cache, ignore_errors=True)
                rows.append((n, r, ours, ref))
                print(f"N={n} round {r}: m3d {ours['first_batch_s']:.3f} s {ours['bytes']} B; "
                      f"streaming {ref['first_batch_s']:.3f} s {ref['bytes']} B", file=sys.stderr)
    finally:
        moto.kill()
    print(f"\nvolumes {args.shape} u8 (random), one sample each, batch {args.batch}, moto S3 on loopback, "
          f"{args.rounds} alternating rounds per size\n")
    print("| volumes | side | open (s) | to first batch (s) | bytes before first batch | requests | peak RSS (MiB) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == n]
        med = lambda side, k: statistics.median(r[2 if side == "m3d" else 3][k] for r in mine)
        for side in ("m3d", "streaming"):
            req = med("m3d", "requests") if side == "m3d" else float("nan")
            print(f"| {n} | {side} | {med(side, 'open_s'):.3f} | {med(side, 'first_batch_s'):.3f} | "
                  f"{med(side, 'bytes'):.0f} | {req:.0f} | {med(side, 'peak_rss_mib'):.0f} |")
        print(f"| {n} | **ratio m3d / streaming** | | **{med('m3d', 'first_batch_s') / med('streaming', 'first_batch_s'):.2f}** "
              f"| {med('m3d', 'bytes') / med('streaming', 'bytes'):.3f} | | |")


if __name__ == "__main__":
    main()
