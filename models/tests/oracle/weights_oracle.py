"""Weight-file fixtures for tests/weights_io.rs, written by PyTorch, safetensors and transformers themselves.

make <out>:   a tiny LlamaForCausalLM saved with save_pretrained as one safetensors file, as shards with an
              index, and as pytorch_model.bin (torch.save); plus a plain torch.save of a small dict with mixed
              dtypes.
check <ours> <ref>: loads the HF model from a folder *we* wrote and from the reference folder; asserts every
              parameter is identical and that logits agree; prints "ok".
"""
import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny():
    return LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)


def make(out: Path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny()).eval()
    model.save_pretrained(out / "single", safe_serialization=True)
    model.save_pretrained(out / "sharded", safe_serialization=True, max_shard_size="8KB")
    (out / "bin").mkdir()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, out / "bin" / "pytorch_model.bin")
    mixed = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(2, 2).to(torch.float16),
        "i64": torch.arange(7),
        "nested.name.weight": torch.randn(2, 3, 4),
    }
    torch.save(mixed, out / "mixed.bin")
    from safetensors.torch import save_file
    save_file(mixed, str(out / "mixed.safetensors"))
    json.dump({"keys": sorted(sd.keys())}, open(out / "keys.json", "w"))


def check(ours: Path, ref: Path):
    a = LlamaForCausalLM.from_pretrained(ours).eval()
    b = LlamaForCausalLM.from_pretrained(ref).eval()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), (sorted(sa.keys() ^ sb.keys()))
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    print("ok")


if __name__ == "__main__":
    if sys.argv[2:3] == ["check"]:
        check(Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        make(Path(sys.argv[1]))
