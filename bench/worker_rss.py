"""Worker memory after opening an M3D-scale training set (issue 13's "worker RSS" target: under 500 MiB).

Writes (once, reused when present) an M3D-Cap-like dataset of N volumes and N caption samples and an M3D-VQA-like
sample-only dataset of M samples naming the Cap volumes (`stream_bench write-cap` / `write-vqa`: ids shaped like
the published ones, 400-character reports, ~80-character questions with 4 choices of 20 for closed ones; volumes
of 1x1x2x2 u8, as a volume's size does not change what opening costs), then measures:

- `stream_bench rss <recipe>`: `TrainData::open` alone (what a worker does before step 0), VmRSS and VmHWM;
- `m3d worker --recipe <recipe> --coordinator http://127.0.0.1:9` (nothing listens there), the real worker
  (LaMed tiny with a tokenizer.json, so no vocabulary is built from the texts): its /proc/<pid>/status is read
  once it logs that the coordinator is unreachable, i.e. after it opened the training set and the tokenizer;
- the same worker on a 100-sample recipe: the baseline of libtorch, the runtime and the tokenizer.

    python bench/worker_rss.py --m3d <m3d> --stream-bench <stream_bench> [--work DIR] [--volumes 120000]
        [--vqa-samples 542000]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RECIPE = """model:
  kind: lamed
  preset: tiny
  tokenizer: {tokenizer}
data:
  tasks:
{tasks}
  max_text_len: 96
  augment: false
train:
  seed: 1
  max_steps: 10
  global_batch: 4
  micro_batch: 2
workers:
  min: 1
  max: 1
  device: cpu
output:
  run: {run}
"""


def recipe(work: Path, name: str, tasks: list[tuple[str, str, list[str]]], tokenizer: str) -> Path:
    lines = []
    for task, shards, volumes in tasks:
        lines.append(f"    - task: {task}\n      shards: [{shards}]\n      weight: 1.0")
        if volumes:
            lines[-1] += f"\n      volumes: [{', '.join(volumes)}]"
    path = work / f"{name}.yaml"
    path.write_text(RECIPE.format(tokenizer=tokenizer, tasks="\n".join(lines), run=work / f"run-{name}"))
    return path


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) // 1024  # kB -> MiB
    return out


def worker_rss(m3d: str, recipe_path: Path, env: dict, timeout: float = 600.0) -> dict[str, int]:
    """Starts `m3d worker` against a closed port and reads its memory once it retries connecting."""
    proc = subprocess.Popen(
        [m3d, "worker", "--recipe", str(recipe_path), "--coordinator", "http://127.0.0.1:9", "--worker-id", "rss"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + timeout
        assert proc.stderr is not None
        for line in proc.stderr:
            if "coordinator unreachable" in line:
                return status(proc.pid)
            if time.time() > deadline:
                break
        raise SystemExit(f"m3d worker never tried to connect (exit {proc.poll()}); recipe {recipe_path}")
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m3d", required=True)
    ap.add_argument("--stream-bench", required=True)
    ap.add_argument("--work", default="/tmp/m3d-worker-rss")
    ap.add_argument("--volumes", type=int, default=120_000)
    ap.add_argument("--vqa-samples", type=int, default=542_000)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sb = args.stream_bench
    # "lookup": written with sample lookups (VQA's locating Cap's volumes, as `m3d data-prep vqa --cap` writes it).
    tag = f"{args.volumes}-{args.vqa_samples}-lookup"
    cap, vqa, small = work / f"cap-{tag}", work / f"vqa-{tag}", work / "cap-100"
    for path, cmd in [
        (cap, [sb, "write-cap", str(cap), "--volumes", str(args.volumes)]),
        (vqa, [sb, "write-vqa", str(vqa), "--samples", str(args.vqa_samples), "--volumes", str(args.volumes),
               "--cap", str(cap)]),
        (small, [sb, "write-cap", str(small), "--volumes", "100"]),
    ]:
        if not (path / "manifest.json").exists():
            print(f"[worker_rss] writing {path}", file=sys.stderr)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    env = dict(os.environ, TMPDIR=str(work / "tmp"))
    (work / "tmp").mkdir(exist_ok=True)
    # The tokenizer: what a tiny worker writes from the small dataset's texts (its own word-level vocabulary).
    tokenizer = work / "tokenizer.json"
    if not tokenizer.exists():
        vocab_recipe = recipe(work, "vocab", [("cap", str(small), [])], "null")
        text = vocab_recipe.read_text().replace("  tokenizer: null\n", "")
        vocab_recipe.write_text(text)
        worker_rss(args.m3d, vocab_recipe, env)
        written = sorted((work / "tmp").glob("m3d-worker-*/tokenizer.json"), key=lambda p: p.stat().st_mtime)
        if not written:
            raise SystemExit("the vocabulary worker wrote no tokenizer.json")
        tokenizer.write_bytes(written[-1].read_bytes())

    big = recipe(work, "big", [("cap", str(cap), []), ("vqa", str(vqa), [str(cap)])], str(tokenizer))
    base = recipe(work, "base", [("cap", str(small), [])], str(tokenizer))

    opened = json.loads(subprocess.run([sb, "rss", str(big)], check=True, capture_output=True, text=True).stdout)
    big_w = worker_rss(args.m3d, big, env)
    base_w = worker_rss(args.m3d, base, env)
    print(f"training set: {opened['samples']} samples ({args.volumes} cap + {args.vqa_samples} vqa), "
          f"{args.volumes} volumes; compact sample tables {opened['sample_table_bytes'] / 2**20:.0f} MiB for "
          f"{opened['text_bytes_indexed'] / 2**20:.0f} MiB of text, "
          f"{opened['sample_table_memory_bytes'] / 2**20:.0f} MiB of them in memory; open {opened['open_s']:.2f} s")
    print("| process | VmHWM (MiB) | VmRSS (MiB) | RssAnon + RssFile (MiB) |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| `TrainData::open` alone (stream_bench rss) | {opened['peak_rss_mib']:.0f} | {opened['rss_mib']:.0f} | |")
    for name, s in [(f"`m3d worker`, {opened['samples']}-sample recipe", big_w),
                    ("`m3d worker`, 100-sample recipe (baseline)", base_w)]:
        print(f"| {name} | {s['VmHWM']} | {s['VmRSS']} | {s['RssAnon']} + {s['RssFile']} |")
    print(f"worker RSS over the baseline: {big_w['VmRSS'] - base_w['VmRSS']} MiB; target: worker under 500 MiB "
          f"({'met' if big_w['VmRSS'] < 500 else 'missed'})")


if __name__ == "__main__":
    main()
