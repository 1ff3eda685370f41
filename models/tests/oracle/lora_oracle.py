"""LoRA fixtures from peft itself, for tests/lora.rs.

make <out>: a small torch model with Linear layers at nested names; peft get_peft_model with random (non-zero)
            adapters; writes base weights, the PEFT adapter folder (save_pretrained), inputs, outputs,
            gradients of a scalar loss w.r.t. the adapters, the merge_and_unload() state dict, and which modules
            peft targets for a list and for a regex target_modules.
check <out> <adapter_dir>: loads an adapter folder *we* wrote with PeftModel.from_pretrained onto the same base
            and prints the max |difference| of its output from the fixture's.
"""
import json
import sys
from pathlib import Path

import torch
from torch import nn
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

R, ALPHA = 4, 8.0
TARGETS = ["q_proj", "v_proj", "fc"]
REGEX = r".*\.(q_proj|fc)"


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16, bias=False)
        self.v_proj = nn.Linear(16, 16)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()
        self.mlp = nn.ModuleDict({"fc": nn.Linear(16, 24), "proj": nn.Linear(24, 16)})


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer(), Layer()])
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        for layer in self.layers:
            h = layer.attn.q_proj(x) + layer.attn.v_proj(x)
            x = x + layer.mlp["proj"](torch.nn.functional.gelu(layer.mlp["fc"](h)))
        return self.head(x)


def base_model():
    torch.manual_seed(0)
    return Tiny()


def wrapped(model, target_modules):
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=target_modules,
                     init_lora_weights=False)
    return get_peft_model(model, cfg)


def make(out: Path):
    base = base_model()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(out / "base.safetensors"))
    model = wrapped(base, TARGETS)
    model.save_pretrained(out / "adapter")
    torch.manual_seed(1)
    x = torch.randn(3, 7, 16)
    w = torch.randn(3, 7, 5)
    y = model(x)
    (y * w).sum().backward()
    io = {"x": x, "w": w, "y": y.detach()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            ours = name.removeprefix("base_model.model.").replace(".default.", ".")
            io["grad." + ours] = p.grad
        else:
            assert p.grad is None
    save_file(io, str(out / "io.safetensors"))
    merged = model.merge_and_unload()
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(out / "merged.safetensors"))
    names = [n for n, m in base_model().named_modules() if isinstance(m, nn.Linear)]
    targeted = {}
    for label, tm in [("list", TARGETS), ("regex", REGEX)]:
        m = wrapped(base_model(), tm)
        targeted[label] = sorted(n.removeprefix("base_model.model.") for n, mod in m.named_modules()
                                 if hasattr(mod, "lora_A") and isinstance(mod.lora_A, nn.ModuleDict))
    json.dump({"linear_names": names, "targeted": targeted}, open(out / "targets.json", "w"))


def check(out: Path, adapter: Path):
    model = PeftModel.from_pretrained(base_model(), adapter).eval()
    # The base must be the fixture's base (same seed); peft's own load is what is being checked.
    base = load_file(str(out / "base.safetensors"))
    for k, v in model.base_model.model.state_dict().items():
        plain = k.replace(".base_layer.", ".")
        if plain in base:
            assert torch.equal(v, base[plain]), k
    io = load_file(str(out / "io.safetensors"))
    with torch.no_grad():
        y = model(io["x"])
    print(float((y - io["y"]).abs().max()))


if __name__ == "__main__":
    if sys.argv[2:3] == ["check"]:
        check(Path(sys.argv[1]), Path(sys.argv[3]))
    else:
        make(Path(sys.argv[1]))
