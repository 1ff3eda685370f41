"""Samples/s decoded + augmented by 2 reader processes from object storage: m3d (global and block shuffle)
against Mosaic Streaming's default, both served by the same local S3 server on loopback (`--store s3`, the
default), chosen with `--server` as in bench/open_stream.py: s3s-fs (the default, bench/s3s_fs.sh; a Rust server
that answers a ranged GET by reading just the range, as real object stores do) or moto (the earlier numbers; one
Python process that answers a ranged GET by reading the whole object, which makes m3d's one-range-per-volume reads
cost a whole shard each there).

With `--store file` both datasets lie in a local folder instead (m3d reads byte ranges of its shards, Streaming
copies whole shards into its cache) and no server is started.

Per shape (DxHxW u8 volumes, random so that compression cannot shrink them, one caption sample each) it writes the
same N volumes once as m3d shards (shards/examples/open_bench write) and once as MDS (streaming.MDSWriter, zstd,
64 MB shards), then alternates, per round:

- m3d, for each shuffle: 2 processes of data/examples/stream_bench `read`, rank 0 and 1 of world 2, each loading
  its slice of every global batch (`PlanSpec::rank_slice`) decoded and augmented (`ShardLoader::load_augmented`
  with the worker's augmentation draw), the recipe defaults' cache (1 GiB) and read-ahead (4 steps);
- Streaming: 2 processes as ranks 0 and 1 (`WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 RANK=r LOCAL_RANK=r`, a fresh local
  cache), each `StreamingDataset(remote, local, shuffle=True, batch_size=per rank)` iterated, every sample's image
  turned into float32 / 255 and put through MONAI's RandRotate90 / RandFlip x3 / RandScaleIntensity /
  RandShiftIntensity / ToTensor (bench/data_prep.py's chain, M3D's settings), torch on 1 thread per process.

Both sides read the same number of samples per rank; the first `--warmup` batches of each rank (opening, first
reads) are left out, the rest is the steady state: samples/s = samples of both ranks / the longer rank's time.

    python bench/stream_throughput.py --open-bench <path> --stream-bench <path> [--store s3|file]
        [--server s3s|moto] [--s3s-fs <path>] [--shapes 4x32x32:12000] [--rounds 2] [--global-batch 32] [--steps 150]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from open_stream import add_server_args, start_server, stop_server, write_mds  # noqa: E402

STREAMING_RANK = r"""
import json, os, resource, sys, time
t0 = time.time()
import numpy as np
import torch
from streaming import StreamingDataset
torch.set_num_threads(1)
remote, local, per_rank, steps, warmup, seed, bench_dir = (sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7]),
                                                           sys.argv[7])
sys.path.insert(0, bench_dir)
from data_prep import reference_train_transform
tf = reference_train_transform(seed + int(os.environ["RANK"]))
t_open = time.time()
ds = StreamingDataset(remote=remote, local=local, shuffle=True, shuffle_seed=seed, batch_size=per_rank)
opened = time.time() - t_open
n, checksum, epoch = 0, 0.0, 0
steady_start, first = None, None
while n < steps * per_rank:
    ds.set_epoch(epoch) if hasattr(ds, "set_epoch") else None
    for s in ds:
        x = tf(s["image"][None].astype(np.float32) / 255.0)
        checksum += float(x.reshape(-1)[x.numel() // 2])
        n += 1
        if n == warmup * per_rank:
            first = time.time() - t_open
            steady_start = time.time()
        if n >= steps * per_rank:
            break
    epoch += 1
steady = time.time() - steady_start
print(json.dumps({"open_s": opened, "first_batch_s": first, "steady_samples": n - warmup * per_rank,
                  "steady_s": steady, "samples_per_s": (n - warmup * per_rank) / steady, "checksum": checksum,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_ranks(cmds, envs):
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c, e in zip(cmds, envs)]
    outs = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"{' '.join(map(str, p.args))[:200]} failed:\n{err[-3000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return {"samples_per_s": sum(o["steady_samples"] for o in outs) / max(o["steady_s"] for o in outs),
            "first_batch_s": max(o["first_batch_s"] for o in outs),
            "peak_rss_mib": max(o["peak_rss_mib"] for o in outs), "ranks": outs}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--open-bench", required=True)
    ap.add_argument("--stream-bench", required=True)
    ap.add_argument("--shapes", default="4x32x32:12000",
                    help="comma-separated DxHxW:volumes[:global_batch:steps] (volumes are 1xDxHxW)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=150, help="global steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--shuffles", default="global,blocks:32x8")
    ap.add_argument("--store", choices=["s3", "file"], default="s3",
                    help="s3: the --server on loopback; file: both datasets in a local folder (m3d reads byte "
                         "ranges, Streaming copies shards into its cache)")
    add_server_args(ap)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="m3d-stream-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.store == "s3":
        server, env, where = start_server(args.server, work, args.s3s_fs)
    else:
        server, env, where = None, dict(os.environ), "a local folder"
    root = "s3://bench" if args.store == "s3" else str(work / "store")
    rows = []
    try:
        for spec in args.shapes.split(","):
            parts = spec.split(":")
            shape_s, n = parts[0], int(parts[1])
            gb = int(parts[2]) if len(parts) > 2 else args.global_batch
            steps = int(parts[3]) if len(parts) > 3 else args.steps
            per_rank = gb // 2
            shape = [int(x) for x in shape_s.split("x")]
            t = time.time()
            subprocess.run([args.open_bench, "write", f"{root}/ours-{shape_s}", "--volumes", str(n),
                            "--shape", shape_s], env=env, capture_output=True, text=True, check=True)
            print(f"{shape_s} x {n}: m3d shards written in {time.time() - t:.1f} s", file=sys.stderr)
            t = time.time()
            if args.store == "s3":
                write_mds(f"{root}/mds-{shape_s}", work / "mds-out", n, shape, 0)
            else:
                write_mds(None, Path(root) / f"mds-{shape_s}", n, shape, 0)
            shutil.rmtree(work / "mds-out", ignore_errors=True)
            print(f"{shape_s} x {n}: MDS written in {time.time() - t:.1f} s", file=sys.stderr)
            for r in range(args.rounds):
                result = {}
                for sh in args.shuffles.split(","):
                    cmd = lambda rank: [args.stream_bench, "read", f"{root}/ours-{shape_s}", "--rank", str(rank),
                                        "--world", "2", "--global-batch", str(gb), "--steps", str(steps),
                                        "--warmup", str(args.warmup), "--shuffle", sh, "--seed", str(r)]
                    result[sh] = run_ranks([cmd(0), cmd(1)], [env, env])
                cache = work / f"cache-{r}"
                shutil.rmtree(cache, ignore_errors=True)
                envs = [dict(env, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", RANK=str(k), LOCAL_RANK=str(k),
                             MASTER_ADDR="127.0.0.1", MASTER_PORT="29517") for k in range(2)]
                cmd = [sys.executable, "-c", STREAMING_RANK, f"{root}/mds-{shape_s}", str(cache),
                       str(per_rank), str(steps), str(args.warmup), str(r), str(Path(__file__).resolve().parent)]
                result["streaming"] = run_ranks([cmd, cmd], envs)
                shutil.rmtree(cache, ignore_errors=True)
                rows.append((shape_s, n, gb, steps, r, result))
                print(f"{shape_s} round {r}: " + ", ".join(f"{k} {v['samples_per_s']:.0f}/s" for k, v in
                                                            result.items()), file=sys.stderr)
                print(json.dumps({"shape": shape_s, "volumes": n, "round": r, "result": result}), file=sys.stderr)
    finally:
        if server:
            stop_server(server, work)
    print(f"\n2 ranks per side, {where}, {args.rounds} alternating rounds, "
          f"steady state after {args.warmup} batches per rank\n")
    print("| volumes (u8) | global batch | samples timed | side | samples/s (per round) | first batch (s) | "
          "peak RSS per rank (MiB) | ratio m3d / Streaming |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for key in dict.fromkeys((r[0], r[1], r[2], r[3]) for r in rows):
        mine = [r[5] for r in rows if (r[0], r[1], r[2], r[3]) == key]
        ref = statistics.median(m["streaming"]["samples_per_s"] for m in mine)
        timed = (key[3] - args.warmup) * key[2]
        for side in list(mine[0].keys()):
            rates = [m[side]["samples_per_s"] for m in mine]
            med = statistics.median(rates)
            ratio = "" if side == "streaming" else f"**{med / ref:.2f}**"
            name = "Streaming (shuffle=True)" if side == "streaming" else f"m3d {side}"
            print(f"| {key[1]} x {key[0]} | {key[2]} | {timed} | {name} | {med:.0f} "
                  f"({' / '.join(f'{x:.0f}' for x in rates)}) | "
                  f"{statistics.median(m[side]['first_batch_s'] for m in mine):.2f} | "
                  f"{max(m[side]['peak_rss_mib'] for m in mine):.0f} | {ratio} |")


if __name__ == "__main__":
    main()
