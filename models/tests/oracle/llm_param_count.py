"""Oracle for the shape-only parameter counts: the published LaMed LLM configs built by transformers 5 on the
meta device (nothing allocated). Usage: llm_param_count.py OUT ; writes OUT/counts.json:
{preset: {"count": sum(p.numel()), "shapes": {name: shape}}} over named_parameters (tied weights once)."""
import json
import pathlib
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

# The config.json files as published on the Hub (fields that change the parameter set).
PRESETS = {
    # meta-llama/Llama-2-7b-chat-hf
    "llama2_7b": (LlamaForCausalLM, LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3_8b": (LlamaForCausalLM, LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128009)),
    # microsoft/Phi-3-mini-4k-instruct
    "phi3_mini_4k": (Phi3ForCausalLM, Phi3Config(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        sliding_window=2047, tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000,
        pad_token_id=32000)),
}

if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    for name, (cls, cfg) in PRESETS.items():
        with torch.device("meta"):
            model = cls(cfg)
        params = dict(model.named_parameters())
        result[name] = {"count": sum(p.numel() for p in params.values()),
                        "shapes": {k: list(p.shape) for k, p in params.items()}}
    (out / "counts.json").write_text(json.dumps(result))
    print({k: v["count"] for k, v in result.items()})
