"""All-reduce bus bandwidth on loopback: m3d's RingTcp against torch.distributed (gloo), side by side in one run.

For each world size the two implementations alternate (ours, gloo, ours, gloo, ...) over the same sizes, so both see
the same machine state; each cell is the median over the repeats. Both use float32 tensors, the same iteration
counts, warm-up and timing (mean seconds per all-reduce after a barrier, on rank 0), and bus bandwidth as nccl-tests
define it: size * 2 (n - 1) / n / time.

    python bench/allreduce.py [--worlds 2,4] [--sizes-mib 4,16,64,256] [--repeats 3] [--exe PATH]
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def iters_for(mib, budget_mib=1024):
    return max(3, min(20, budget_mib // mib))


def run_ours(exe, world, sizes):
    addrs = ",".join(f"127.0.0.1:{p}" for p in free_ports(world))
    procs = [
        subprocess.Popen(
            [exe, "--rank", str(r), "--world", str(world), "--addrs", addrs, "--sizes-mib", ",".join(map(str, sizes))],
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for r, p in enumerate(procs):
        if p.returncode != 0:
            raise SystemExit(f"m3d rank {r} failed with {p.returncode}")
    return {j["size_bytes"]: j["time_s"] for j in map(json.loads, outs[0].split("\n")[:-1] if outs[0] else [])}


def gloo_worker(rank, world, port, sizes, queue):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    out = {}
    for mib in sizes:
        n = (mib << 20) // 4
        t = torch.full((n,), float(rank + 1))
        dist.all_reduce(t)
        want = world * (world + 1) / 2
        assert float(t.double().mean()) == want, (float(t.double().mean()), want)
        iters = iters_for(mib)
        for _ in range(1 if mib >= 64 else 2):
            dist.all_reduce(t)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        out[n * 4] = (time.perf_counter() - start) / iters
    dist.barrier()
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def run_gloo(world, sizes):
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_ports(1)[0]
    procs = [ctx.Process(target=gloo_worker, args=(r, world, port, sizes, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=900)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"gloo rank failed with {p.exitcode}")
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--sizes-mib", default="4,16,64,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--exe",
        default=os.path.join(
            os.environ.get("CARGO_TARGET_DIR", "target"), "release", "examples", "allreduce_bench"
        ),
    )
    args = ap.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    import torch

    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__}, float32, loopback, {args.repeats} repeats (median)")
    print()
    print("| ranks | size (MiB) | m3d ring (ms) | gloo (ms) | m3d busbw (GB/s) | gloo busbw (GB/s) | ratio m3d/gloo |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for world in worlds:
        ours, gloo = {}, {}
        for _ in range(args.repeats):
            for k, v in run_ours(args.exe, world, sizes).items():
                ours.setdefault(k, []).append(v)
            for k, v in run_gloo(world, sizes).items():
                gloo.setdefault(k, []).append(v)
        for mib in sizes:
            b = mib << 20
            to, tg = statistics.median(ours[b]), statistics.median(gloo[b])
            factor = 2 * (world - 1) / world
            bo, bg = b * factor / to / 1e9, b * factor / tg / 1e9
            print(f"| {world} | {mib} | {to * 1e3:.1f} | {tg * 1e3:.1f} | {bo:.2f} | {bg:.2f} | {bo / bg:.2f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
