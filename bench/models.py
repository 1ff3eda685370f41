"""Forward + backward time of the M3D models on CPU: PyTorch eager against m3d, side by side.

For every case the PyTorch model is built from the same oracle modules the parity tests use
(models/tests/oracle/), its weights and inputs are written to a folder, and m3d's `model_bench` example loads
exactly those (strictly, by name) and runs the same loss. Rounds alternate between the two so that machine noise
hits both; each side reports per-iteration wall time of zero-grad + forward + loss + backward.

usage: bench/models.py [--threads T] [--rounds R] [--iters N] [--cases a,b,...] [--markdown]
cases: clip-tiny, vit-full (M3D-CLIP's ViT at batch 1; vit-full-sdpa: MONAI's fused-attention path),
       lamed-tiny-lora (M3D's LoRA rule)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models" / "tests" / "oracle"))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def bench_binary():
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    exe = Path(target) / "release" / "examples" / "model_bench"
    if not exe.exists():
        sys.exit(f"{exe} not found: run scripts/setup.sh (it builds all targets)")
    return exe


def case_vit_full(sdpa=False):
    """M3D-CLIP's ViT at batch 1. MONAI's default attention materialises the 2049 x 2049 scores (what the
    reference runs); with `sdpa` MONAI's `use_flash_attention` path calls torch's fused
    scaled_dot_product_attention, the kernel m3d uses: the same-kernels comparison."""
    from vit3d_oracle import M3dViT

    cfg = dict(in_channels=1, img_size=[32, 256, 256], patch_size=[4, 16, 16], hidden_size=768, mlp_dim=3072,
               num_layers=12, num_heads=12, dropout_rate=0.0, qkv_bias=False, cls_token=True)
    torch.manual_seed(0)
    model = M3dViT(cfg).train()
    for blk in model.blocks:
        blk.attn.use_flash_attention = sdpa
    x = torch.randn(1, 1, 32, 256, 256)
    w = torch.randn(1, 2049, 768)  # a fixed random read-out: the mean of a LayerNorm output is ~0
    return dict(model="vit", config=cfg, lora=None), model, {"x": x, "w": w}, lambda: (model(x)[0] * w).mean(), 2


def case_clip_tiny():
    import math
    import torch.nn.functional as F
    from clip_oracle import RefClip
    from transformers import BertConfig

    vcfg = dict(in_channels=1, img_size=[16, 64, 64], patch_size=[4, 16, 16], hidden_size=128, mlp_dim=512,
                num_layers=4, num_heads=4, dropout_rate=0.0, qkv_bias=False, cls_token=True)
    tcfg = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=512, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = RefClip(vcfg, tcfg).train()
    b, t = 8, 32
    images = torch.randn(b, 1, *vcfg["img_size"])
    ids = torch.randint(1, 1000, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[::2, t // 2:] = 0
    ids[mask == 0] = 0

    def step():
        img = model.encode_image(images)[:, 0]
        txt = model.encode_text(ids, mask)[:, 0]
        lpi = model.logit_scale * img @ txt.T
        labels = torch.arange(b)
        return (F.cross_entropy(lpi, labels) + F.cross_entropy(lpi.T, labels)) / 2

    spec = dict(model="clip", config={"vision": vcfg, "text": tcfg.to_dict(), "max_text_len": t}, lora=None)
    return spec, model, {"images": images, "input_ids": ids, "attention_mask": mask}, step, 10


def case_lamed_tiny_lora():
    """The LaMed of the parity test (Llama hidden 64 x 2 layers, ViT width 32, SegVol debug) with LoRA r 16 on
    every LLM Linear (M3D's rule), projector and segmentation parts trained in full; batch 4 x 64 tokens,
    every sample with a [SEG] answer and a mask (LM + Dice + BCE loss)."""
    import lamed_oracle as lo
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(lo.tiny_llm_config(lo.TOK_LEN + 4))
    lo.attach(lm, 64, dict(img=[8, 32, 32], patch=[4, 8, 8], hidden=32, mlp=64, layers=2, heads=4),
              lo.debug_config())
    state = {k: v.detach().contiguous() for k, v in lm.state_dict().items() if ".norm_cross_attn." not in k}
    excluded = ("vision_tower", "mm_projector", "embed_tokens", "lm_head", "seg_projector", "seg_module")
    targets = [n for n, m in lm.named_modules() if isinstance(m, nn.Linear) and not any(x in n for x in excluded)]
    peft_model = get_peft_model(lm, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets,
                                               init_lora_weights=False))
    for name in ("mm_projector", "seg_projector", "seg_module"):
        getattr(lm.model, name).requires_grad_(True)
    peft_model.train()
    for m in lm.modules():  # dropout off on both sides, so the losses can be compared
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    g = torch.Generator().manual_seed(1)
    b, t, n_img = 4, 64, 4
    ids = torch.randint(3, lo.TOK_LEN, (b, t), generator=g)
    ids[:, 0] = lo.BOS
    ids[:, 1:1 + n_img] = lo.IM_PATCH
    ids[:, 40] = lo.SEG
    labels = ids.clone()
    labels[:, :1 + n_img + 8] = -100
    mask = torch.ones(b, t, dtype=torch.long)
    images = torch.randn(b, 1, 8, 32, 32, generator=g)
    segs = (torch.rand(b, 1, 8, 32, 32, generator=g) > 0.6).float()

    def step():
        o, _, _, dice, bce, _ = lo.lamed_forward(lm, ids, mask, labels, images, segs)
        return o.loss + dice + bce

    lora = dict(r=16, alpha=32.0, dropout=0.0, target_modules=["all-linear"], exclude=list(excluded))
    spec = dict(model="lamed", config="debug", lora=lora)
    inputs = dict(images=images, input_ids=ids, attention_mask=mask, labels=labels, segs=segs)
    return spec, peft_model, inputs, step, 10, state


CASES = {"clip-tiny": case_clip_tiny, "vit-full": case_vit_full, "vit-full-sdpa": lambda: case_vit_full(True),
         "lamed-tiny-lora": case_lamed_tiny_lora}


def time_torch(step, model, iters, warmup):
    params = [p for p in model.parameters() if p.requires_grad]
    times, loss = [], float("nan")
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        for p in params:
            if p.grad is not None:
                p.grad.zero_()
        out = step()
        out.backward()
        loss = out.item()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return loss, times


def time_ours(exe, folder, iters, warmup, threads):
    out = subprocess.run([str(exe), str(folder), "--iters", str(iters), "--warmup", str(warmup),
                          "--threads", str(threads)], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["loss"], r["times"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=0, help="iterations per round (0: the case's default)")
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    exe = bench_binary()
    rows = []
    for name in args.cases.split(","):
        spec, model, inputs, step, default_iters, *state = CASES[name]()
        iters = args.iters or default_iters
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            if state:  # a PEFT-wrapped model: base weights as the plain model had them, adapter saved by peft
                save_file(state[0], str(d / "weights.safetensors"))
                model.save_pretrained(str(d / "adapter"))
            else:
                sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
                save_file(sd, str(d / "weights.safetensors"))
            save_file({k: v.contiguous() for k, v in inputs.items()}, str(d / "inputs.safetensors"))
            (d / "bench.json").write_text(json.dumps(spec))
            theirs, ours = [], []
            for _ in range(args.rounds):
                lt, tt = time_torch(step, model, iters, warmup=1)
                lo, to = time_ours(exe, d, iters, 1, args.threads)
                theirs += tt
                ours += to
            rel = abs(lo - lt) / max(abs(lt), 1e-12)
            if rel > 1e-3:
                print(f"warning: {name}: losses differ (torch {lt}, m3d {lo})", file=sys.stderr)
        mt, mo = statistics.median(theirs), statistics.median(ours)
        rows.append((name, args.threads, len(theirs), mt, mo, mo / mt, lt, lo))
        print(f"{name}: torch {mt:.4f} s, m3d {mo:.4f} s, ratio {mo / mt:.3f} (loss {lt:.6g} vs {lo:.6g})",
              flush=True)
    print()
    print("| case | threads | iterations | PyTorch eager (s, median) | m3d (s, median) | ratio m3d/PyTorch |")
    print("|---|---|---|---|---|---|")
    for name, th, n, mt, mo, r, _, _ in rows:
        print(f"| {name} | {th} | {n} | {mt:.4f} | {mo:.4f} | {r:.3f} |")


if __name__ == "__main__":
    main()
