"""Shared by the llm_* oracles: tiny HF decoders with weights randomised at a scale that makes every
parameter matter (norm weights and biases included), saved in the HF checkpoint layout."""
import json
import pathlib

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM


def build(family, seed, std=0.2, **kwargs):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(attn_implementation="eager", **kwargs)
        model = LlamaForCausalLM(cfg)
    elif family == "phi3":
        cfg = Phi3Config(attn_implementation="eager", **kwargs)
        model = Phi3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model.eval()


def save(model, out, legacy_config=None):
    """Weights as HF saves them (a tied lm_head is not stored) and config.json (the transformers 5
    `to_json_file` form, or a hand-written transformers 4.x style dict)."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(out / "weights.safetensors"))
    if legacy_config is None:
        model.config.to_json_file(str(out / "config.json"))
    else:
        (out / "config.json").write_text(json.dumps(legacy_config, indent=2))


def generate_position_ids(mask):
    """What `generate` passes: positions count real tokens only (left padding starts at 0)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def grads(model):
    return {f"grad.{n}": p.grad.detach().contiguous().clone() for n, p in model.named_parameters()
            if p.grad is not None}
