"""Oracle for tests/segvol.rs: an independent torch.nn implementation of M3D-LaMed's SegVol mask decoder
(text-prompted path), with MONAI's ViT as image encoder.

Written from the published architecture description (SAM two-way transformer lifted to 3-D, SegVol's text
term, M3D's Dice + BCE loss) with plain torch modules; the module tree and parameter names are those of the
reference `seg_module` so a state dict maps one to one.

  seg_oracle.py <out>                  tiny model: weights.safetensors, config.json, io.safetensors
  (importable)  build(cfg), forward(model, image, text), dice_loss, bce_loss  -- used by lamed_oracle.py
"""
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import ViT
from safetensors.torch import save_file


class Attn(nn.Module):
    def __init__(self, dim, heads, down=1):
        super().__init__()
        inner = dim // down
        self.heads = heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q, k, v):
        def split(x):
            b, n, c = x.shape
            return x.view(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)
        q, k, v = split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v))
        w = torch.einsum("bhqc,bhkc->bhqk", q, k) / math.sqrt(q.shape[-1])
        o = torch.einsum("bhqk,bhkc->bhqc", w.softmax(-1), v)
        b, h, n, c = o.shape
        return self.out_proj(o.permute(0, 2, 1, 3).reshape(b, n, h * c))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.lin2(F.relu(self.lin1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp, down, first):
        super().__init__()
        self.first = first
        self.self_attn = Attn(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attn(dim, heads, down)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attn(dim, heads, down)

    def forward(self, tok, img, tok_pe, img_pe):
        if self.first:
            tok = self.norm1(self.self_attn(tok, tok, tok))
        else:
            t = tok + tok_pe
            tok = self.norm1(tok + self.self_attn(t, t, tok))
        tok = self.norm2(tok + self.cross_attn_token_to_image(tok + tok_pe, img + img_pe, img))
        tok = self.norm3(tok + self.mlp(tok))
        img = self.norm4(img + self.cross_attn_image_to_token(img + img_pe, tok + tok_pe, tok))
        return tok, img


class TwoWay(nn.Module):
    def __init__(self, depth, dim, heads, mlp, down):
        super().__init__()
        self.layers = nn.ModuleList([Block(dim, heads, mlp, down, i == 0) for i in range(depth)])
        self.final_attn_token_to_image = Attn(dim, heads, down)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, img, img_pe, tok_pe):
        img = img.flatten(2).transpose(1, 2)
        img_pe = img_pe.flatten(2).transpose(1, 2)
        tok = tok_pe
        for layer in self.layers:
            tok, img = layer(tok, img, tok_pe, img_pe)
        tok = self.norm_final_attn(tok + self.final_attn_token_to_image(tok + tok_pe, img + img_pe, img))
        return tok, img


class FourierPE(nn.Module):
    def __init__(self, feats):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, feats))

    def forward(self, grid):
        axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n for n in grid]
        a, b, c = torch.meshgrid(*axes, indexing="ij")
        xyz = torch.stack([b, a, c], dim=-1) * 2 - 1          # x runs along the 2nd axis, y along the 1st
        proj = 2 * math.pi * (xyz @ self.positional_encoding_gaussian_matrix)
        return torch.cat([proj.sin(), proj.cos()], dim=-1).permute(3, 0, 1, 2)


class LN2d(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))


class Prompt(nn.Module):
    def __init__(self, dim, grid, mask_chans):
        super().__init__()
        self.grid = grid
        self.pe_layer = FourierPE(dim // 2)
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, dim) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, dim)
        m = mask_chans
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, m // 4, 2, 2), LN2d(m // 4), nn.GELU(),
            nn.Conv2d(m // 4, m, 2, 2), LN2d(m), nn.GELU(),
            nn.Conv2d(m, dim, 1))
        self.no_mask_embed = nn.Embedding(1, dim)


class MLP(nn.Module):
    def __init__(self, i, h, o, n):
        super().__init__()
        dims = [i] + [h] * (n - 1) + [o]
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])

    def forward(self, x):
        for j, l in enumerate(self.layers):
            x = l(x)
            if j + 1 < len(self.layers):
                x = F.relu(x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg, grid):
        super().__init__()
        d = cfg["image_encoder"]["hidden_size"]
        nm = cfg["num_multimask_outputs"] + 1
        self.transformer = TwoWay(cfg["transformer_depth"], d, cfg["transformer_num_heads"],
                                  cfg["transformer_mlp_dim"], cfg["attention_downsample_rate"])
        self.iou_token = nn.Embedding(1, d)
        self.mask_tokens = nn.Embedding(nm, d)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(d, d // 4, kernel_size=2, stride=2),
            nn.LayerNorm([d // 4] + [2 * g for g in grid]),
            nn.GELU(),
            nn.ConvTranspose3d(d // 4, d // 8, kernel_size=2, stride=2),
            nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList([MLP(d, d, d // 8, 3) for _ in range(nm)])
        self.iou_prediction_head = MLP(d, cfg["iou_head_hidden_dim"], nm, cfg["iou_head_depth"])
        self.txt_align_upscaled_embedding = nn.Linear(d, d // 8)


class Seg(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        e = cfg["image_encoder"]
        self.grid = [i // p for i, p in zip(e["img_size"], e["patch_size"])]
        self.image_encoder = ViT(in_channels=e["in_channels"], img_size=e["img_size"],
                                 patch_size=e["patch_size"], hidden_size=e["hidden_size"],
                                 mlp_dim=e["mlp_dim"], num_layers=e["num_layers"], num_heads=e["num_heads"],
                                 proj_type="perceptron", classification=False,
                                 dropout_rate=e["dropout_rate"], qkv_bias=e["qkv_bias"])
        self.prompt_encoder = Prompt(e["hidden_size"], self.grid, cfg["mask_in_chans"])
        self.mask_decoder = Decoder(cfg, self.grid)

    def forward(self, image, text):
        b = image.shape[0]
        feats, _ = self.image_encoder(image)
        c = feats.shape[-1]
        img = feats.transpose(1, 2).reshape(b, c, *self.grid)
        pe = self.prompt_encoder.pe_layer(self.grid)[None].expand(b, -1, -1, -1, -1)
        img = img + self.prompt_encoder.no_mask_embed.weight.view(1, c, 1, 1, 1)
        dec = self.mask_decoder
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], 0)[None].expand(b, -1, -1)
        tokens = torch.cat([tokens, text[:, None]], 1)
        hs, src = dec.transformer(img, pe, tokens)
        up = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, *self.grid))
        flat = up.flatten(2)                                              # (B, C/8, voxels)
        nm = dec.mask_tokens.weight.shape[0]
        hyper = torch.stack([dec.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in range(nm)], 1)
        masks = torch.einsum("bmc,bcv->bmv", hyper, flat)
        masks = masks + torch.einsum("bc,bcv->bv", dec.txt_align_upscaled_embedding(text), flat)[:, None]
        masks = masks.view(b, nm, *up.shape[2:])
        iou = dec.iou_prediction_head(hs[:, 0])
        low = masks[:, :1]
        return F.interpolate(low, size=tuple(image.shape[2:]), mode="trilinear", align_corners=False), low, iou


def dice_loss(logits, target):
    t = torch.where(target == -1, torch.zeros_like(target), target).float().flatten(1)
    p = torch.sigmoid(logits).flatten(1)
    return (1 - 2 * (p * t).sum(1) / (p.sum(1) + t.sum(1) + 1)).mean()


def bce_loss(logits, target):
    t = torch.where(target == -1, torch.zeros_like(target), target).float()
    return F.binary_cross_entropy_with_logits(logits, t)


def debug_config():
    return dict(
        image_encoder=dict(in_channels=1, img_size=[8, 32, 32], patch_size=[4, 8, 8], hidden_size=32, mlp_dim=64,
                           num_layers=2, num_heads=4, dropout_rate=0.0, qkv_bias=False, cls_token=False),
        mask_in_chans=16, num_multimask_outputs=3, transformer_depth=2, transformer_mlp_dim=48,
        transformer_num_heads=4, attention_downsample_rate=2, iou_head_depth=3, iou_head_hidden_dim=16)


def m3d_config(image_size=(32, 256, 256), patch_size=(4, 16, 16)):
    return dict(
        image_encoder=dict(in_channels=1, img_size=list(image_size), patch_size=list(patch_size), hidden_size=768,
                           mlp_dim=3072, num_layers=12, num_heads=12, dropout_rate=0.0, qkv_bias=False,
                           cls_token=False),
        mask_in_chans=16, num_multimask_outputs=3, transformer_depth=2, transformer_mlp_dim=2048,
        transformer_num_heads=8, attention_downsample_rate=2, iou_head_depth=3, iou_head_hidden_dim=256)


def perturb(model, scale=0.1):
    """Moves every norm weight off 1 and every zero-initialised tensor off 0, so a swapped or transposed
    parameter cannot hide behind a symmetric initial value."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def state_dict(model, prefix=""):
    """The checkpoint as M3D's MONAI version would save it: without MONAI >= 1.4's unused `norm_cross_attn`."""
    return {prefix + k: v.contiguous() for k, v in model.state_dict().items() if ".norm_cross_attn." not in k}


def grads(model, prefix=""):
    return {f"grad.{prefix}{k}": p.grad.contiguous() for k, p in model.named_parameters()
            if p.grad is not None}


def main(out: Path):
    torch.manual_seed(0)
    cfg = debug_config()
    model = Seg(cfg)
    perturb(model)
    image = torch.randn(2, 1, 8, 32, 32)
    text = torch.randn(2, 32, requires_grad=True)
    target = (torch.rand(2, 1, 8, 32, 32) > 0.7).float()
    target[0, 0, 0, :4, :4] = -1  # the reference's "ignore" value, counted as background
    logits, low, iou = model(image, text)
    dice, bce = dice_loss(logits, target), bce_loss(logits, target)
    (dice + bce).backward()
    io = dict(image=image, text=text.detach(), target=target, logits=logits.detach(), low=low.detach(),
              iou=iou.detach(), dice=dice.detach(), bce=bce.detach(), pe=model.prompt_encoder.pe_layer(model.grid))
    io["grad.text"] = text.grad
    io.update(grads(model))
    save_file(state_dict(model), str(out / "weights.safetensors"))
    save_file({k: v.contiguous() for k, v in io.items()}, str(out / "io.safetensors"))
    json.dump(cfg, open(out / "config.json", "w"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
