"""Oracle for models/src/vit3d.rs: MONAI's own ViT pieces on a tiny random configuration.

usage: vit3d_oracle.py OUT VARIANT
  VARIANT "cls":   M3D's ViT (multimodal_encoder/vit.py) rebuilt from MONAI PatchEmbeddingBlock("perceptron") +
                   TransformerBlock + LayerNorm + a CLS token prepended after the position embedding.
  VARIANT "nocls": MONAI's stock `ViT(classification=False, proj_type="perceptron")`, with qkv bias.
writes OUT/config.json (ViT3dConfig field names), OUT/weights.safetensors, OUT/weights.bin (torch.save of the
same state dict) and OUT/io.safetensors: x, last, hidden.<i>, seed.last, seed.hidden.<i>, loss and
grad.<param> of loss = sum(last * seed.last) + sum_i sum(hidden_i * seed.hidden.i).
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
from monai.networks.blocks.patchembedding import PatchEmbeddingBlock
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.nets import ViT
from safetensors.torch import save_file


class M3dViT(nn.Module):
    """The module structure (and so the state-dict keys) of M3D's ViT with classification=True."""

    def __init__(self, c):
        super().__init__()
        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=c["in_channels"],
            img_size=c["img_size"],
            patch_size=c["patch_size"],
            hidden_size=c["hidden_size"],
            num_heads=c["num_heads"],
            proj_type="perceptron",
            dropout_rate=c["dropout_rate"],
            spatial_dims=3,
        )
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(c["hidden_size"], c["mlp_dim"], c["num_heads"], c["dropout_rate"], c["qkv_bias"])
                for _ in range(c["num_layers"])
            ]
        )
        self.norm = nn.LayerNorm(c["hidden_size"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c["hidden_size"]))

    def forward(self, x):
        x = self.patch_embedding(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        hidden = []
        for blk in self.blocks:
            x = blk(x)
            hidden.append(x)
        return self.norm(x), hidden


def main():
    out = Path(sys.argv[1])
    variant = sys.argv[2]
    torch.manual_seed(0)
    if variant == "cls":
        cfg = dict(in_channels=2, img_size=[8, 16, 24], patch_size=[4, 8, 8], hidden_size=32, mlp_dim=64,
                   num_layers=2, num_heads=4, dropout_rate=0.0, qkv_bias=False, cls_token=True)
        model = M3dViT(cfg)
    elif variant == "nocls":
        cfg = dict(in_channels=1, img_size=[8, 16, 16], patch_size=[4, 8, 8], hidden_size=32, mlp_dim=48,
                   num_layers=3, num_heads=2, dropout_rate=0.0, qkv_bias=True, cls_token=False)
        model = ViT(in_channels=cfg["in_channels"], img_size=cfg["img_size"], patch_size=cfg["patch_size"],
                    hidden_size=cfg["hidden_size"], mlp_dim=cfg["mlp_dim"], num_layers=cfg["num_layers"],
                    num_heads=cfg["num_heads"], proj_type="perceptron", classification=False,
                    dropout_rate=0.0, qkv_bias=True)
    else:
        raise SystemExit(f"unknown variant {variant}")
    # Move every parameter off its structured init (zero CLS token, unit LayerNorms, zero biases) so that a
    # wrong mapping cannot hide behind a symmetric value.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()

    b = 2
    x = torch.randn(b, cfg["in_channels"], *cfg["img_size"])
    last, hidden = model(x)
    seeds = {"seed.last": torch.randn_like(last)}
    loss = (last * seeds["seed.last"]).sum()
    for i, h in enumerate(hidden):
        seeds[f"seed.hidden.{i}"] = torch.randn_like(h)
        loss = loss + (h * seeds[f"seed.hidden.{i}"]).sum()
    loss.backward()

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, out / "weights.safetensors")
    torch.save(sd, out / "weights.bin")
    io = {"x": x, "last": last.detach(), "loss": loss.detach().reshape(1), **seeds}
    for i, h in enumerate(hidden):
        io[f"hidden.{i}"] = h.detach()
    for name, p in model.named_parameters():
        if p.grad is not None:
            io[f"grad.{name}"] = p.grad
    save_file({k: v.contiguous() for k, v in io.items()}, out / "io.safetensors")
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "keys.json").write_text(json.dumps(sorted(sd.keys())))


if __name__ == "__main__":
    main()
