"""Data-parallel training of the tiny M3D-CLIP: `m3d train` against torchrun + PyTorch DDP, side by side.

The reference side trains the identical model on the identical data the way M3D does it in PyTorch:
  * data: M3D's preprocessing leaves one float32 `.npy` (1 x 32 x 256 x 256) per series next to its report;
    `export` writes exactly that layout from the train split of our cap shards (u8 storage decoded as q / 255),
    and the Dataset `np.load`s one file per sample, applies M3D's MONAI training transforms
    (RandRotate90 p 0.5 axes (1, 2), RandFlip p 0.1 on each spatial axis, RandScaleIntensity 0.1 p 0.5,
    RandShiftIntensity 0.1 p 0.5) and tokenises the report with the run's `tokenizer.json`
    (max_length 32, truncation, padding to max_length); a DataLoader with a DistributedSampler feeds each rank.
  * model: MONAI ViT blocks in M3D's ViT(classification=True) layout + a transformers `BertModel` of the sizes in the
    m3d run's `final/config.json`, `mm_*_proj` Linear(64, 64) on token 0, L2-normalised, `exp(logit_scale)` times
    the cosine, features all-gathered with `torch.distributed.nn.all_gather` (keeps the gradient), labels
    arange(B * W), mean of both cross-entropies (models/tests/oracle/clip_oracle.py's RefClip).
  * optimisation: AdamW (lr, betas, eps, weight decay of the recipe; no decay on the recipe's `no_decay` patterns),
    transformers' cosine schedule with warmup ceil(ratio * steps), clip_grad_norm_ 1.0, f32;
    DDP(find_unused_parameters=True), as the HF Trainer sets it for M3D's model (BERT's pooler is unused).

Timing, both sides: a step is the wall time between consecutive step ends (for the reference: from asking the
DataLoader for the batch to `optimizer.step()` + scheduler done, rank 0); data wait is the time spent in the
DataLoader's `next()` (m3d: its `data_wait_share` field, rank 0's share of the step window). The first `--skip`
steps of each run are left out.

usage:
  train_ddp.py export  --shards DIR --out NPYDIR             one .npy per train-split volume + index.json
  train_ddp.py train   --data NPYDIR --m3d-final RUN/final --steps N --out DIR [--device cpu|cuda]   (under torchrun)
                       [--save-every K] [--resume]   checkpoints as accelerate's save_state / load_state do them
  train_ddp.py compare --m3d BIN --shards DIR --work DIR [--rounds R] [--steps N] [--workers W] [--device D]
"""
import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- export


def export(shards: Path, out: Path, split: str = "train"):
    """Writes M3D's prepared layout: one float32 (1, 32, 256, 256) .npy per volume of `split`, and
    index.json = [{"image": "<file>.npy", "text": "<file>.txt"}, ...], one entry per sample."""
    import numpy as np
    import pyarrow.parquet as pq

    manifest = json.loads((shards / "manifest.json").read_text())
    if "shard_list" in manifest:  # the shard lists in their own object (manifest version 2)
        manifest.update(json.loads((shards / manifest["shard_list"]["key"]).read_text()))
    stamp = out / "source.json"
    key = {"shards": str(shards.resolve()), "manifest_sha": [s.get("sha256") for s in manifest["sample_shards"]]
           + [s.get("sha256") for s in manifest["volume_shards"]], "split": split}
    if stamp.exists() and json.loads(stamp.read_text()) == key:
        return
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    samples = []
    for s in manifest["sample_shards"]:
        t = pq.read_table(shards / s["key"], columns=["split", "volume_id", "report"])
        samples += [r for r in t.to_pylist() if r["split"] == split]
    wanted = {r["volume_id"] for r in samples}
    names = {}
    for s in manifest["volume_shards"]:
        pf = pq.ParquetFile(shards / s["key"])
        for g in range(pf.num_row_groups):
            for r in pf.read_row_group(g, columns=["volume_id", "shape", "dtype", "image"]).to_pylist():
                if r["volume_id"] not in wanted:
                    continue
                raw = r["image"]
                if r["dtype"] == "u8":
                    img = np.frombuffer(raw, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
                elif r["dtype"] == "f16":
                    img = np.frombuffer(raw, dtype="<f2").astype(np.float32)
                else:
                    img = np.frombuffer(raw, dtype="<f4").copy()
                name = re.sub(r"[^A-Za-z0-9_.-]", "_", r["volume_id"])
                np.save(out / f"{name}.npy", img.reshape(r["shape"]))
                names[r["volume_id"]] = name
    index = []
    for i, r in enumerate(samples):
        (out / f"{i:06d}.txt").write_text(r["report"])
        index.append({"image": f"{names[r['volume_id']]}.npy", "text": f"{i:06d}.txt"})
    (out / "index.json").write_text(json.dumps(index))
    stamp.write_text(json.dumps(key))
    print(f"exported {len(index)} {split} samples ({len(names)} volumes) to {out}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------- train


class CapDataset:
    """M3D's ITRDataset (LaMed/src/dataset/multi_dataset.py): np.load + MONAI transforms + tokenizer, per sample."""

    def __init__(self, root: Path, tokenizer, max_len: int, augment: bool):
        import monai.transforms as mtf
        import torch

        self.root = root
        self.items = json.loads((root / "index.json").read_text())
        self.tok = tokenizer
        self.max_len = max_len
        steps = [mtf.RandRotate90(prob=0.5, spatial_axes=(1, 2)),
                 mtf.RandFlip(prob=0.10, spatial_axis=0),
                 mtf.RandFlip(prob=0.10, spatial_axis=1),
                 mtf.RandFlip(prob=0.10, spatial_axis=2),
                 mtf.RandScaleIntensity(factors=0.1, prob=0.5),
                 mtf.RandShiftIntensity(offsets=0.1, prob=0.5)] if augment else []
        self.transform = mtf.Compose(steps + [mtf.ToTensor(dtype=torch.float)])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import numpy as np

        it = self.items[i]
        image = self.transform(np.load(self.root / it["image"]))
        text = (self.root / it["text"]).read_text()
        t = self.tok(text, max_length=self.max_len, truncation=True, padding="max_length", return_tensors="pt")
        return {"image": image, "input_ids": t["input_ids"][0], "attention_mask": t["attention_mask"][0]}


def train(args):
    import numpy as np
    import torch
    import torch.distributed as dist
    from monai.data import set_track_meta
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import BertConfig, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup

    sys.path.insert(0, str(ROOT / "models" / "tests" / "oracle"))
    from clip_oracle import RefClip

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    dist.init_process_group(args.backend or ("nccl" if cuda else "gloo"))
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // int(os.environ["LOCAL_WORLD_SIZE"]))
    torch.set_num_threads(threads)
    # Plain tensors out of the MONAI transforms: MetaTensor bookkeeping through the model would only slow the
    # reference down (M3D's collator keeps MetaTensors; we give the reference the faster path).
    set_track_meta(False)
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")

    run = Path(args.m3d_final)
    cfg = json.loads((run / "config.json").read_text())
    recipe = _yaml(run.parent / "recipe.yaml")
    tr, data = recipe["train"], recipe["data"]
    v, t = cfg["vision"], cfg["text"]
    assert cfg["logit_scale"] == "exp" and not cfg["local_loss"], cfg
    vcfg = {k: v[k] for k in ("in_channels", "img_size", "patch_size", "hidden_size", "mlp_dim", "num_layers",
                              "num_heads", "dropout_rate", "qkv_bias", "cls_token")}
    tcfg = BertConfig(**{k: t[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "intermediate_size", "max_position_embeddings", "hidden_dropout_prob",
                                           "attention_probs_dropout_prob", "layer_norm_eps", "type_vocab_size",
                                           "hidden_act", "pad_token_id")})
    seed = int(tr["seed"])
    torch.manual_seed(seed)
    np.random.seed(seed + rank)
    RefClip.forward = _clip_forward
    model = RefClip(vcfg, tcfg).to(dev).train()
    ddp = DDP(model, device_ids=[local] if cuda else None, find_unused_parameters=True)

    no_decay = [re.compile(p) for p in tr["no_decay"]]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not any(r.search(n.lower()) for r in no_decay)]
    plain = [p for n, p in named if any(r.search(n.lower()) for r in no_decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(tr["weight_decay"])},
                             {"params": plain, "weight_decay": 0.0}],
                            lr=float(tr["lr"]), betas=tuple(float(b) for b in tr["betas"]), eps=float(tr["eps"]))
    steps = args.steps
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(float(tr["warmup_ratio"]) * steps), steps)
    max_norm = tr.get("max_grad_norm")

    tok = PreTrainedTokenizerFast(tokenizer_file=str(run / "tokenizer.json"), pad_token="[PAD]", unk_token="[UNK]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    ds = CapDataset(Path(args.data), tok, int(data["max_text_len"]), bool(data["augment"]))
    per_rank = int(tr["global_batch"]) // world
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    nw = args.num_workers
    loader = DataLoader(ds, batch_size=per_rank, sampler=sampler, num_workers=nw, drop_last=True, pin_memory=cuda,
                        persistent_workers=nw > 0, prefetch_factor=args.prefetch if nw > 0 else None)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    if args.resume:
        start = _load_state(out, model, opt, sched, rank, dev)
    log = open(out / "metrics.jsonl", "a" if args.resume else "w") if rank == 0 else None
    # Where `start` left the data: its epoch, and the batches of that epoch to skip without loading them
    # (accelerate's skip_first_batches skips at the sampler, as here).
    per_epoch = len(loader)
    epoch, done = divmod(start, per_epoch)
    sampler.set_epoch(epoch)
    it = iter(loader) if done == 0 else iter(DataLoader(
        ds, batch_size=per_rank, sampler=list(sampler)[done * per_rank:], num_workers=nw, drop_last=True,
        pin_memory=cuda, prefetch_factor=args.prefetch if nw > 0 else None))
    prev = time.time()
    for step in range(start + 1, steps + 1):
        t0 = time.time()
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            sampler.set_epoch(epoch)
            it = iter(loader)
            batch = next(it)
        t1 = time.time()
        images = batch["image"].to(dev, non_blocking=True)
        ids = batch["input_ids"].to(dev, non_blocking=True)
        mask = batch["attention_mask"].to(dev, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = ddp(images, ids, mask)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(max_norm)) if max_norm else None
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        loss_v = loss.item()  # also waits for the device
        if cuda:
            torch.cuda.synchronize()
        t2 = time.time()
        if log:
            log.write(json.dumps({"step": step, "loss": loss_v, "lr": lr,
                                  "grad_norm": None if gnorm is None else float(gnorm), "time": t2,
                                  "step_s": t2 - t0, "since_prev_s": t2 - prev, "data_wait_s": t1 - t0}) + "\n")
            log.flush()
        prev = t2
        # As m3d: the last step's state is the final weights, not a checkpoint to resume from.
        if args.save_every and step % args.save_every == 0 and step < steps:
            _save_state(out, step, model, opt, sched, rank)
    if log:
        log.close()
    dist.barrier()
    dist.destroy_process_group()


def _save_state(out: Path, step: int, model, opt, sched, rank: int):
    """accelerate's Accelerator.save_state: rank 0 torch.saves model, optimizer and scheduler state, every rank its
    RNG states; written to a temporary folder and renamed once complete (accelerate itself has no such guard)."""
    import torch
    import torch.distributed as dist

    final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(model.state_dict(), tmp / "pytorch_model.bin")
        torch.save(opt.state_dict(), tmp / "optimizer.bin")
        torch.save(sched.state_dict(), tmp / "scheduler.bin")
    dist.barrier()
    torch.save({"torch": torch.get_rng_state(), "python": __import__("random").getstate(),
                "numpy": __import__("numpy").random.get_state()}, tmp / f"random_states_{rank}.pkl")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    dist.barrier()


def _load_state(out: Path, model, opt, sched, rank: int, dev) -> int:
    """accelerate's Accelerator.load_state of the newest checkpoint under `out`; returns its step."""
    import random

    import numpy as np
    import torch

    steps = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    if not steps:
        sys.exit(f"no checkpoint under {out}")
    ck = out / f"checkpoint-{max(steps)}"
    model.load_state_dict(torch.load(ck / "pytorch_model.bin", map_location=dev))
    opt.load_state_dict(torch.load(ck / "optimizer.bin", map_location=dev))
    sched.load_state_dict(torch.load(ck / "scheduler.bin"))
    rng = torch.load(ck / f"random_states_{rank}.pkl", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    return max(steps)


def _clip_forward(self, images, ids, mask):
    """The loss inside forward(), as M3D's M3DCLIP.forward has it (DDP must see every parameter used there):
    token 0 of both encoders, projected and L2-normalised (the reference's encode_*(..)[:, 0]; projection and
    normalisation act per token, so projecting token 0 only is the same), gathered from all ranks with gradient,
    exp(logit_scale) * cosine, labels arange(B * W), mean of both cross-entropies."""
    import torch
    import torch.distributed.nn as dnn
    import torch.nn.functional as F

    feats, _ = self.vision_encoder(images)
    img = F.normalize(self.mm_vision_proj(feats[:, 0]), dim=-1)
    last = self.language_encoder(ids, attention_mask=mask)["last_hidden_state"]
    txt = F.normalize(self.mm_language_proj(last[:, 0]), dim=-1)
    all_img = torch.cat(dnn.all_gather(img), 0)
    all_txt = torch.cat(dnn.all_gather(txt), 0)
    lpi = self.logit_scale.exp() * all_img @ all_txt.T
    labels = torch.arange(all_img.shape[0], device=all_img.device)
    return (F.cross_entropy(lpi, labels) + F.cross_entropy(lpi.T, labels)) / 2


def _yaml(path: Path):
    import yaml

    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------------------------------- compare


def _stats(times, waits, global_batch, skip):
    """times: per-step durations, waits: per-step data-wait seconds, both after the warmup steps."""
    times, waits = times[skip:], waits[skip:]
    med = statistics.median(times)
    return {"steps": len(times), "median_s": med, "mean_s": statistics.fmean(times),
            "samples_per_s": global_batch / med, "wait_share": sum(waits) / sum(times), "times": times}


def ours_stats(run: Path, global_batch: int, skip: int):
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    lines = sorted({l["step"]: l for l in lines}.values(), key=lambda l: l["step"])
    # step k's time is the window since step k-1's line (log_every 1); step 1 has no predecessor.
    dts = [b["time"] - a["time"] for a, b in zip(lines, lines[1:])]
    waits = [b["data_wait_share"] * dt for b, dt in zip(lines[1:], dts)]
    s = _stats(dts, waits, global_batch, max(0, skip - 1))
    s["final_loss"] = lines[-1]["loss"]
    return s


def ref_stats(out: Path, global_batch: int, skip: int):
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    s = _stats([l["since_prev_s"] for l in lines], [l["data_wait_s"] for l in lines], global_batch, skip)
    s["final_loss"] = lines[-1]["loss"]
    return s


def compare(args):
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    npy = work / "ref_npy"
    export(Path(args.shards), npy)
    env = dict(os.environ)
    env.setdefault("M3D_LOG_FORMAT", "human")
    w = args.workers
    sets = [f"output.run=RUN", f"data.tasks.0.shards=[{Path(args.shards).resolve()}]",
            f"train.max_steps={args.steps}", "train.log_every=1", "checkpoint.every=0",
            f"workers.min={w}", f"workers.max={w}", f"workers.device={args.device}"] + list(args.set or [])
    # A hard link keeps this binary even if the workspace is rebuilt while the benchmark runs.
    exe = work / "m3d"
    exe.unlink(missing_ok=True)
    try:
        os.link(args.m3d, exe)
    except OSError:
        shutil.copy2(args.m3d, exe)
    # Extra m3d sides, run in each round beside the default one: NAME:key=value[;key=value...].
    variants = [("ours", [])]
    for v in args.variant or []:
        name, _, rest = v.partition(":")
        if not name or not rest:
            sys.exit(f"--variant {v!r}: expected NAME:key=value[;key=value...]")
        variants.append((f"ours {name}", rest.split(";")))
    results = {name: [] for name, _ in variants}
    results["reference"] = []
    gb = None
    load_before = os.getloadavg()[0]
    for r in range(1, args.rounds + 1):
        for name, extra in variants:
            run = work / f"{name.replace(' ', '-')}-{r}"
            shutil.rmtree(run, ignore_errors=True)
            cmd = [str(exe), "train", args.recipe, "--workers", str(w)]
            for s in sets + extra:
                cmd += ["--set", s.replace("output.run=RUN", f"output.run={run}")]
            t = time.time()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"m3d train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            wall_ours = time.time() - t
            gb = int(_yaml(run / "recipe.yaml")["train"]["global_batch"])
            so = ours_stats(run, gb, args.skip)
            so["wall_s"] = wall_ours
            results[name].append(so)
            print(f"round {r} {name}: median {so['median_s']:.3f} s, wait {100 * so['wait_share']:.1f} %, "
                  f"wall {wall_ours:.1f} s", file=sys.stderr)
        run = work / f"ours-{r}"

        ref = work / f"ref-{r}"
        shutil.rmtree(ref, ignore_errors=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={w}",
               str(Path(__file__).resolve()), "train", "--data", str(npy), "--m3d-final", str(run / "final"),
               "--steps", str(args.steps), "--out", str(ref), "--device", args.device,
               "--num-workers", str(args.num_workers)]
        if args.backend:
            cmd += ["--backend", args.backend]
        t = time.time()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
        wall_ref = time.time() - t
        sr = ref_stats(ref, gb, args.skip)
        sr["wall_s"] = wall_ref
        results["reference"].append(sr)
        print(f"round {r} reference: median {sr['median_s']:.3f} s, wait {100 * sr['wait_share']:.1f} %, "
              f"wall {wall_ref:.1f} s", file=sys.stderr)

    exe.unlink(missing_ok=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    dev = args.device if args.device == "cpu" else f"{args.device} x {w}"
    print(f"\n{w} workers, {args.steps} steps of {gb} samples, {dev}, first {args.skip} steps skipped, "
          f"{args.rounds} round(s) alternating; threads per rank = {max(1, len(os.sched_getaffinity(0)) // w)}"
          f" of {len(os.sched_getaffinity(0))} cores; reference DataLoader: {args.num_workers} worker(s) per rank, "
          f"persistent; 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print("| side | round | median step (s) | mean step (s) | samples/s | data wait | final loss | run wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    pooled = {}
    for side in results:
        for r, s in enumerate(results[side], 1):
            print(f"| {side} | {r} | {s['median_s']:.3f} | {s['mean_s']:.3f} | {s['samples_per_s']:.1f} | "
                  f"{100 * s['wait_share']:.1f} % | {s['final_loss']:.4f} | {s['wall_s']:.1f} |")
        times = [x for s in results[side] for x in s["times"]]
        waits = sum(s["wait_share"] * sum(s["times"]) for s in results[side])
        pooled[side] = (statistics.median(times), statistics.fmean(times), waits / sum(times))
        m, mean, ws = pooled[side]
        print(f"| **{side}, all rounds** | | **{m:.3f}** | {mean:.3f} | **{gb / m:.1f}** | **{100 * ws:.1f} %** | | |")
    ratio = pooled["ours"][0] / pooled["reference"][0]
    print(f"\nstep-time ratio ours / reference (median, all rounds): **{ratio:.2f}** (target <= 1); "
          f"ours' data-wait share {100 * pooled['ours'][2]:.1f} % (target < 5 %)")
    for name, _ in variants[1:]:
        print(f"step-time ratio {name} / reference: **{pooled[name][0] / pooled['reference'][0]:.2f}**; "
              f"{name} / ours: **{pooled[name][0] / pooled['ours'][0]:.2f}**")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--shards", required=True)
    e.add_argument("--out", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--m3d-final", required=True, help="an m3d run's final/ folder (config.json, tokenizer.json)")
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    t.add_argument("--backend", default=None, help="gloo (cpu default) or nccl (cuda default)")
    t.add_argument("--threads", type=int, default=0, help="torch threads per rank (default cores / ranks)")
    t.add_argument("--num-workers", type=int, default=1, help="DataLoader worker processes per rank")
    t.add_argument("--prefetch", type=int, default=2, help="DataLoader prefetch_factor")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps under --out (0: never)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint under --out")
    c = sub.add_parser("compare")
    c.add_argument("--m3d", required=True)
    c.add_argument("--shards", required=True)
    c.add_argument("--work", required=True)
    c.add_argument("--recipe", default=str(ROOT / "recipes" / "clip-tiny.yaml"))
    c.add_argument("--rounds", type=int, default=2)
    c.add_argument("--steps", type=int, default=40)
    c.add_argument("--skip", type=int, default=3)
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    c.add_argument("--backend", default=None)
    c.add_argument("--num-workers", type=int, default=1)
    c.add_argument("--set", action="append", help="extra --set for m3d (e.g. train.precision=f32)")
    c.add_argument("--variant", action="append",
                   help="an extra m3d side per round, NAME:key=value[;key=value] (e.g. "
                        "'no-overlap:train.overlap_grad_reduce=false')")
    a = ap.parse_args()
    if a.cmd == "export":
        export(Path(a.shards), Path(a.out))
    elif a.cmd == "train":
        train(a)
    else:
        compare(a)


if __name__ == "__main__":
    main()
