"""Oracle for tests/llama.rs and tests/phi3.rs: transformers 5 LlamaForCausalLM / Phi3ForCausalLM (fp32, eager
attention), tiny random configs. Usage: llm_parity.py OUT CASE... ; each case goes to OUT/CASE/ with
weights.safetensors, config.json and io.safetensors: input_ids, attention_mask (batch 2, row 1 right-padded),
logits, loss_weight and grad.<param> of loss = sum(logits * loss_weight)."""
import sys
import pathlib

import torch
from safetensors.torch import save_file

from llm_common import build, save, generate_position_ids, grads

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

CASES = {
    # no GQA, explicit head_dim != hidden / heads, biases on
    "llama_mha": ("llama", dict(TINY, num_key_value_heads=4, head_dim=24, attention_bias=True,
                                mlp_bias=True)),
    "llama_gqa": ("llama", dict(TINY, num_key_value_heads=2)),
    "llama_linear": ("llama", dict(TINY, num_key_value_heads=2,
                                   rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                    "rope_theta": 10000.0})),
    # original context 32: the 16-dim heads' wavelengths fall in all three llama3 bands
    "llama_llama3": ("llama", dict(TINY, num_key_value_heads=2,
                                   rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 32,
                                                    "rope_theta": 10000.0})),
    # sequences longer than max_position_embeddings, so the NTK base grows
    "llama_dynamic": ("llama", dict(TINY, num_key_value_heads=2, max_position_embeddings=6,
                                    rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                     "rope_theta": 10000.0})),
    "llama_tied": ("llama", dict(TINY, num_key_value_heads=2, tie_word_embeddings=True)),
    # window 4 < sequence length 10, so the sliding window matters
    "phi3": ("phi3", dict(TINY, num_key_value_heads=2, sliding_window=4,
                          original_max_position_embeddings=64)),
    "phi3_mha": ("phi3", dict(TINY, num_key_value_heads=4)),
}

# transformers 4.x-style config.json (rope_scaling + top-level rope_theta), to check we read both forms
LEGACY = {
    "llama_llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                     "rope_theta": 10000.0},
}


def legacy_config(family, kwargs, rope):
    d = {k: v for k, v in kwargs.items() if k != "rope_parameters"}
    d.update(rope)
    d["model_type"] = family
    d["architectures"] = ["LlamaForCausalLM"]
    d["torch_dtype"] = "float32"
    d["transformers_version"] = "4.44.0"
    return d


def run(out, case, seed):
    family, kwargs = CASES[case]
    model = build(family, seed, **kwargs)
    legacy = legacy_config(family, kwargs, LEGACY[case]) if LEGACY.get(case) else None
    save(model, out, legacy)

    torch.manual_seed(seed + 1)
    b, t = 2, 10
    ids = torch.randint(3, kwargs["vocab_size"], (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 7:] = 0
    ids[1, 7:] = kwargs["pad_token_id"]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=generate_position_ids(mask),
                   use_cache=False).logits
    weight = torch.randn_like(logits)
    (logits * weight).sum().backward()
    io = {"input_ids": ids, "attention_mask": mask, "logits": logits.detach().contiguous(),
          "loss_weight": weight}
    io.update(grads(model))
    save_file(io, str(pathlib.Path(out) / "io.safetensors"))


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1])
    cases = sys.argv[2:] or list(CASES)
    for case in cases:
        run(out / case, case, 1000 + sum(case.encode()))
