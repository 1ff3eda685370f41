"""Oracle for models/src/clip.rs: the reference M3D-CLIP forward and loss (LaMed/src/model/CLIP.py), rebuilt from
MONAI's ViT pieces (vit3d_oracle.M3dViT) and a transformers `BertModel`, tiny and random.

usage: clip_oracle.py OUT
writes OUT/config.json ({"vision": ViT3dConfig, "text": HF BERT config}), OUT/weights.safetensors (the model's state
dict, reference key names), OUT/vision.bin (torch.save of the `vision_encoder.` part with the prefix removed,
as M3D extracts pretrained_ViT.bin), OUT/io.safetensors with images, input_ids, attention_mask and, per case
  single: world 1, raw logit scale          global: rank 1 of 3, raw scale, full B*W x B*W logits
  local:  rank 1 of 3, raw scale, local loss  exp:    world 1, exp(logit_scale)
<case>.{image_features,text_features,logits_per_image,logits_per_text,logits,loss} and <case>.grad.<param> of the
loss. Other ranks' features are fixed tensors `other.image` / `other.text` ((W-1)*B x D, for ranks 0 and 2),
gathered as `cat([other[:B], local, other[B:]])`, which is what this rank's autograd sees of
`torch.distributed.nn.all_gather`.
"""

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vit3d_oracle import M3dViT  # noqa: E402


class RefClip(nn.Module):
    def __init__(self, vcfg, tcfg):
        super().__init__()
        self.vision_encoder = M3dViT(vcfg)
        self.language_encoder = BertModel(tcfg)
        h = vcfg["hidden_size"]
        self.mm_vision_proj = nn.Linear(h, h)
        self.mm_language_proj = nn.Linear(h, h)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def encode_image(self, image):
        feats, _ = self.vision_encoder(image)
        return F.normalize(self.mm_vision_proj(feats), dim=-1)

    def encode_text(self, ids, mask):
        feats = self.language_encoder(ids, attention_mask=mask)["last_hidden_state"]
        return F.normalize(self.mm_language_proj(feats), dim=-1)


def run_case(model, images, ids, mask, others, rank, world, local_loss, exp_scale):
    model.zero_grad()
    img = model.encode_image(images)[:, 0]
    txt = model.encode_text(ids, mask)[:, 0]
    b = img.shape[0]
    if world > 1:
        oi, ot = others
        all_img = torch.cat([oi[: rank * b], img, oi[rank * b:]], 0)
        all_txt = torch.cat([ot[: rank * b], txt, ot[rank * b:]], 0)
    else:
        all_img, all_txt = img, txt
    scale = model.logit_scale.exp() if exp_scale else model.logit_scale
    if local_loss:
        lpi = scale * img @ all_txt.T
        lpt = scale * txt @ all_img.T
        labels = torch.arange(b) + rank * b
    else:
        lpi = scale * all_img @ all_txt.T
        lpt = lpi.T
        labels = torch.arange(b * world)
    loss = (F.cross_entropy(lpi, labels) + F.cross_entropy(lpt, labels)) / 2
    loss.backward()
    out = {"image_features": img, "text_features": txt, "logits_per_image": lpi, "logits_per_text": lpt,
           "logits": (lpi + lpt) / 2.0, "loss": loss.reshape(1)}
    out = {k: v.detach().clone() for k, v in out.items()}
    for name, p in model.named_parameters():
        if p.grad is not None:
            out[f"grad.{name}"] = p.grad.clone()
    return out


def main():
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    vcfg = dict(in_channels=1, img_size=[8, 16, 16], patch_size=[4, 8, 8], hidden_size=32, mlp_dim=64,
                num_layers=2, num_heads=4, dropout_rate=0.0, qkv_bias=False, cls_token=True)
    tcfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    model = RefClip(vcfg, tcfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.05 * torch.randn_like(p))
    model.eval()

    b, t, world, rank = 3, 10, 3, 1
    images = torch.randn(b, 1, *vcfg["img_size"])
    ids = torch.randint(1, 99, (b, t))
    ids[:, 0] = 2  # a fixed "[CLS]"
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    others = (F.normalize(torch.randn((world - 1) * b, 32), dim=-1),
              F.normalize(torch.randn((world - 1) * b, 32), dim=-1))

    io = {"images": images, "input_ids": ids, "attention_mask": mask,
          "other.image": others[0], "other.text": others[1]}
    cases = {"single": (0, 1, False, False), "global": (rank, world, False, False),
             "local": (rank, world, True, False), "exp": (0, 1, False, True)}
    for case, (r, w, local, exp) in cases.items():
        for k, v in run_case(model, images, ids, mask, others, r, w, local, exp).items():
            io[f"{case}.{k}"] = v
    save_file({k: v.contiguous() for k, v in io.items()}, out / "io.safetensors")

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, out / "weights.safetensors")
    vision = {k[len("vision_encoder."):]: v for k, v in sd.items() if k.startswith("vision_encoder.")}
    torch.save(vision, out / "vision.bin")
    (out / "config.json").write_text(json.dumps({"vision": vcfg, "text": tcfg.to_dict(), "max_text_len": t}))
    (out / "keys.json").write_text(json.dumps(sorted(sd.keys())))


if __name__ == "__main__":
    main()
