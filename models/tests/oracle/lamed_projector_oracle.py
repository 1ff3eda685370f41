"""Oracle for tests/projector.rs: the LaMed multimodal projectors, written independently with torch.nn.

Every case writes <case>.json (the config, in the LaMed config.json field names), <case>.weights.safetensors
(the module's state dict, keys as in `model.mm_projector.*` without the prefix) and <case>.io.safetensors
(input tokens, output, grad of sum(out * r) w.r.t. the input and every parameter as grad.<name>).

The spatial layout is built with view/permute instead of the reference's einops rearrange: token k of a
(d, h, w) grid is cell (k // (h*w), k // w % h, k % w).
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file


class Spp(nn.Module):
    def __init__(self, grid, c, hidden, layer_type, depth, pooling, pool):
        super().__init__()
        self.grid, self.c, self.pooling, self.pool = grid, c, pooling, pool
        mods = [nn.Linear(c, hidden)]
        for _ in range(depth - 1):
            if layer_type == "mlp":
                mods.append(nn.GELU())
            mods.append(nn.Linear(hidden, hidden))
        self.projector = nn.Sequential(*mods)

    def forward(self, x):
        b = x.shape[0]
        d, h, w = self.grid
        if self.pooling == "spatial":
            x = x.view(b, d, h, w, self.c).permute(0, 4, 1, 2, 3)
            x = F.avg_pool3d(x, kernel_size=self.pool, stride=self.pool)
            x = x.permute(0, 2, 3, 4, 1).reshape(b, -1, self.c)
        else:
            k = self.pool ** 3
            n = x.shape[1] // k
            x = x[:, : n * k].reshape(b, n, k, self.c).mean(dim=2)
        return self.projector(x)


CASES = {
    # name: (projector type, layer type, depth, pooling, pool size, image size, patch size, c, hidden)
    "spp_mlp": ("spp", "mlp", 2, "spatial", 2, [8, 32, 48], [4, 8, 8], 24, 40),
    "spp_linear3": ("spp", "linear", 3, "spatial", 2, [16, 32, 32], [4, 8, 8], 16, 24),
    "spp_mlp_pool3": ("spp", "mlp", 3, "spatial", 3, [12, 24, 36], [4, 8, 4], 8, 16),
    "spp_seq": ("spp", "mlp", 2, "sequence", 2, [8, 32, 32], [4, 8, 8], 16, 24),
    "linear": ("linear", "mlp", 2, "spatial", 2, [8, 16, 16], [4, 8, 8], 16, 24),
    "mlp2x_gelu": ("mlp2x_gelu", "mlp", 2, "spatial", 2, [8, 16, 16], [4, 8, 8], 16, 24),
}


def build(kind, layer_type, depth, pooling, pool, image, patch, c, hidden):
    grid = [i // p for i, p in zip(image, patch)]
    if kind == "spp":
        return Spp(grid, c, hidden, layer_type, depth, pooling, pool)
    if kind == "linear":
        return nn.Linear(c, hidden)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    raise ValueError(kind)


def main(out: Path):
    torch.manual_seed(0)
    for name, (kind, layer_type, depth, pooling, pool, image, patch, c, hidden) in CASES.items():
        model = build(kind, layer_type, depth, pooling, pool, image, patch, c, hidden)
        n = 1
        for i, p in zip(image, patch):
            n *= i // p
        x = torch.randn(2, n, c, requires_grad=True)
        y = model(x)
        r = torch.randn_like(y)
        (y * r).sum().backward()
        io = {"x": x.detach(), "y": y.detach(), "r": r, "grad.x": x.grad}
        for k, p in model.named_parameters():
            io[f"grad.{k}"] = p.grad
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(out / f"{name}.weights.safetensors"))
        save_file({k: v.contiguous() for k, v in io.items()}, str(out / f"{name}.io.safetensors"))
        cfg = dict(mm_projector_type=kind, image_size=image, patch_size=patch, mm_hidden_size=c,
                   hidden_size=hidden, proj_layer_type=layer_type, proj_layer_num=depth,
                   proj_pooling_type=pooling, proj_pooling_size=pool)
        json.dump(cfg, open(out / f"{name}.json", "w"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
