"""Full-size M3D-CLIP (M3D's ViT-B/3-D + bert-base-uncased + projections + logit scale) built on PyTorch's meta
device, so nothing is allocated: writes OUT/shapes.json {parameter name: shape} for tests/param_counts.rs.
MONAI 1.6's unused `norm_cross_attn` LayerNorms are left out (the released weights, from older MONAI, lack them).
"""
import json
import sys
from pathlib import Path

import torch
from transformers import BertConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clip_oracle import RefClip  # noqa: E402

vcfg = dict(in_channels=1, img_size=[32, 256, 256], patch_size=[4, 16, 16], hidden_size=768, mlp_dim=3072,
            num_layers=12, num_heads=12, dropout_rate=0.0, qkv_bias=False, cls_token=True)
tcfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
with torch.device("meta"):
    model = RefClip(vcfg, tcfg)
shapes = {k: list(p.shape) for k, p in model.named_parameters() if ".norm_cross_attn." not in k}
json.dump(shapes, open(Path(sys.argv[1]) / "shapes.json", "w"))
