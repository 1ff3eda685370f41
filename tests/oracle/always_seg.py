"""Rewrites a LaMed folder's weights so that the model answers `[SEG]` to anything (for tests/generate_cli.rs,
which needs an answer with a mask from a model too small to learn one): the decoder blocks add nothing to the
residual stream (attention and MLP output projections zeroed, LoRA B zeroed), every token embeds to the same
vector, and the LM head scores only `[SEG]`. Usage: always_seg.py MODEL_DIR SEG_ID"""
import sys

from safetensors.torch import load_file, save_file

path = f"{sys.argv[1]}/model.safetensors"
seg = int(sys.argv[2])
w = load_file(path)
for name, t in w.items():
    if name.endswith(("o_proj.weight", "down_proj.weight")) or ".lora_B." in name:
        t.zero_()
    elif name == "model.embed_tokens.weight":
        t.fill_(0.5)
    elif name == "lm_head.weight":
        t.zero_()
        t[seg].fill_(1.0)
save_file(w, path, metadata={"format": "pt"})
