"""Writes tiny models in the published layouts M3D-LaMed starts from, for tests/init_layouts_cli.rs:

- OUT/<family>/: a base LLM saved by transformers' `save_pretrained` exactly as the Hub folders are laid out
  (config.json, sharded model-0000k-of-0000n.safetensors + model.safetensors.index.json), with the family's
  published tokenizer.json (built by scripts/tokenizers.sh; M3D_TOKENIZERS) and a tokenizer_config.json naming
  its special tokens as the published one does: llama2 (LlamaForCausalLM, vocabulary 32000), llama3
  (LlamaForCausalLM, 128256, grouped-query attention), phi3 (Phi3ForCausalLM, config vocabulary 32064 for a
  32011-entry tokenizer, as Phi-3-mini-4k-instruct).
- OUT/SegVol/pytorch_model.bin: the SegVol module of M3D-LaMed's `tiny` preset (models/tests/oracle/seg_oracle.py)
  under BAAI/SegVol's keys (`model.image_encoder.*`, `model.prompt_encoder.*`, `model.mask_decoder.*`), plus a
  `model.text_encoder.*` tensor as the published file has (the reference skips those keys).

usage: published_layouts.py OUT
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models" / "tests" / "oracle"))
from seg_oracle import Seg, debug_config  # noqa: E402

out = Path(sys.argv[1])
tokenizers = Path(os.environ["M3D_TOKENIZERS"])
torch.manual_seed(0)
families = {
    "llama2": (LlamaForCausalLM, LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                             max_position_embeddings=256, tie_word_embeddings=False,
                                             bos_token_id=1, eos_token_id=2),
               {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}),
    "llama3": (LlamaForCausalLM, LlamaConfig(vocab_size=128256, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, rope_theta=500000.0,
                                             tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009),
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "phi3": (Phi3ForCausalLM, Phi3Config(vocab_size=32064, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                         original_max_position_embeddings=256, sliding_window=None,
                                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000,
                                         pad_token_id=32000),
             {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>"}),
}
for name, (cls, cfg, special) in families.items():
    folder = out / name
    model = cls(cfg)
    model.save_pretrained(folder, max_shard_size="300KB", safe_serialization=True)
    shutil.copy(tokenizers / name / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **special}))
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists(), (name, shards)

# The tiny preset's SegVol: image encoder of the tiny vision tower's shape (no CLS), the debug decoder.
cfg = debug_config()
cfg["image_encoder"] = dict(in_channels=1, img_size=[32, 256, 256], patch_size=[8, 32, 32], hidden_size=64,
                            mlp_dim=128, num_layers=2, num_heads=4, dropout_rate=0.0, qkv_bias=False, cls_token=False)
seg = Seg(cfg)
state = {f"model.{k}": v for k, v in seg.state_dict().items() if ".norm_cross_attn." not in k}
state["model.text_encoder.embeddings.weight"] = torch.zeros(3, 4)
(out / "SegVol").mkdir(parents=True, exist_ok=True)
torch.save(state, out / "SegVol" / "pytorch_model.bin")
print("wrote", sorted(p.name for p in out.iterdir()))
