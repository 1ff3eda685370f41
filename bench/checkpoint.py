"""torch.save / torch.load of the same state m3d checkpoints (bench/checkpoint.sh).

Reads the parameters and AdamW state m3d wrote (model.safetensors, optimizer.safetensors of a checkpoint
folder), then times saving them as one `{"model": ..., "optimizer": ...}` dict with torch.save (+ fsync) to a
local file, and restoring it as a resume does: torch.load, then the parameters copied into the model's
(existing) tensors as `load_state_dict` does, the optimizer state adopted as `Optimizer.load_state_dict` does
(what accelerate/DeepSpeed-free reference training does), median of --rounds. Prints one JSON line.
"""
import argparse
import json
import os
import statistics
import time

import torch
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True, help="an m3d checkpoint step folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    model = load_file(os.path.join(a.checkpoint, "model.safetensors"))
    optim = load_file(os.path.join(a.checkpoint, "optimizer.safetensors"))
    state = {"model": model, "optimizer": optim}
    # The model being resumed: its parameters exist (and were touched) before the checkpoint is read.
    params = {k: v.clone() for k, v in model.items()}
    nbytes = sum(t.numel() * t.element_size() for d in state.values() for t in d.values())
    save, load = [], []
    path = os.path.join(a.out, "state.pt")
    os.makedirs(a.out, exist_ok=True)
    for _ in range(a.rounds):
        t = time.perf_counter()
        torch.save(state, path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        save.append(time.perf_counter() - t)
        t = time.perf_counter()
        back = torch.load(path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for k, v in back["model"].items():
                params[k].copy_(v)
        adopted = dict(back["optimizer"])
        load.append(time.perf_counter() - t)
        assert len(adopted) == len(optim)
    os.remove(path)
    print(json.dumps({"bytes": nbytes, "save_s": statistics.median(save), "load_s": statistics.median(load)}))


if __name__ == "__main__":
    main()
