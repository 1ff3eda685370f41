"""Greedy generation on CPU: transformers' `generate` against m3d's (`models/examples/generate_bench.rs`) on the
same decoder weights, prompts and thread count, rounds alternating in one run. Prints a markdown table of tokens/s
per batch size (new tokens of all rows over the wall time, prefill included) and checks both make the same tokens.

Cases: `lamed-tiny` (the decoder of `m3d`'s tiny LaMed preset: hidden 64, 2 layers) and `small` (hidden 512,
8 layers, Llama-2's 32,004-token LaMed vocabulary: ~50 M parameters, where the matrix products start to count).
Prompts are 288 tokens (256 image tokens + a 32-token question, as M3D-LaMed's) unless --prompt-len says otherwise.

usage: bench/generate.sh [--cases lamed-tiny,small] [--batches 1,2,4,8] [--new 64] [--threads 2] [--rounds 3]"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models" / "tests" / "oracle"))
from llm_common import build, save  # noqa: E402

CASES = {
    "lamed-tiny": dict(vocab_size=260, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024),
    "small": dict(vocab_size=32004, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024),
}


def target_dir():
    return pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="lamed-tiny,small")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=288)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default=str(ROOT / "out" / "bench-generate"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    exe = target_dir() / "release" / "examples" / "generate_bench"
    rows = []
    for case in a.cases.split(","):
        kw = dict(CASES[case], rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = build("llama", 7, std=0.05, **kw)
        model.config._attn_implementation = "sdpa"
        out = pathlib.Path(a.work) / case
        save(model, out)
        torch.manual_seed(0)
        ids = torch.randint(3, kw["vocab_size"], (8, a.prompt_len))
        save_file({"ids": ids}, str(out / "prompts.safetensors"))
        gc = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=a.new, min_new_tokens=a.new,
                              eos_token_id=None, pad_token_id=0)
        for b in [int(x) for x in a.batches.split(",")]:
            inputs = ids[:b]
            hf_s, ours_s = [], []
            for _ in range(a.rounds):
                t = time.perf_counter()
                with torch.no_grad():
                    seq = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                         generation_config=gc)
                hf_s.append(time.perf_counter() - t)
                r = subprocess.run([str(exe), str(out), "--batch", str(b), "--prompt-len", str(a.prompt_len),
                                    "--new", str(a.new), "--threads", str(a.threads), "--rounds", "2"],
                                   check=True, capture_output=True, text=True)
                res = json.loads(r.stdout.strip().splitlines()[-1])
                # The process's first round warms its allocator, as the Python side's first round does.
                ours_s.append(min(res["seconds"]))
            hf_tokens = seq[0, a.prompt_len:].tolist()
            same = hf_tokens == res["tokens"]
            hf, ours = min(hf_s), min(ours_s)
            rows.append((case, b, b * a.new / hf, b * a.new / ours, hf / ours, same))
            print(f"{case} batch {b}: transformers {b * a.new / hf:.1f} tok/s, m3d {b * a.new / ours:.1f} tok/s, "
                  f"ratio {hf / ours:.2f}, same tokens {same}", flush=True)
    print(f"\n| case | batch | transformers tok/s | m3d tok/s | ratio | same tokens |\n|---|---:|---:|---:|---:|---|")
    for case, b, hf, ours, ratio, same in rows:
        print(f"| {case} | {b} | {hf:.1f} | {ours:.1f} | **{ratio:.2f}x** | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
