"""Oracle for tests/generate.rs: transformers 5 greedy `generate` and cached decoding on tiny random Llama and
Phi-3 models (fp32, eager). Usage: llm_generate.py OUT FAMILY... ; per family OUT/FAMILY/ holds
weights.safetensors, config.json and io.safetensors with
- prompt_ids (1, 7); greedy (12 new tokens, no eos); greedy_eos (eos = greedy[5], so it stops there);
- prompt_embeds (1, 7, H) (embeddings plus noise) and greedy_embeds (12 new tokens from inputs_embeds);
- batch_ids / batch_mask (2, 12, row 1 left-padded by 3) and batch_logits: one full forward with the
  position ids `generate` uses, which cached decoding must reproduce;
- gen_batch_ids / gen_batch_mask (2, 7, row 1 left-padded by 3), gen_batch_eos (an id row 0 produces early)
  and gen_batch (2, 12): `generate` on that left-padded batch stopping at the eos, pad (0) after a row's end.
The seed is chosen so the greedy continuation has >= 4 distinct tokens and every greedy step wins by a margin
(no near-ties that rounding could flip)."""
import pathlib
import sys

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig

from llm_common import build, save, generate_position_ids

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {"llama": dict(TINY), "phi3": dict(TINY, sliding_window=8, original_max_position_embeddings=64)}
NEW = 12


def greedy(model, **inputs):
    gc = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=NEW, min_new_tokens=0,
                          eos_token_id=inputs.pop("eos", None), pad_token_id=0, bos_token_id=1,
                          output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=gc)
    seq = out.sequences
    if "input_ids" in inputs:
        seq = seq[:, inputs["input_ids"].shape[1]:]
    margins = [s.topk(2, dim=-1).values for s in out.scores]
    margin = min(float((v[:, 0] - v[:, 1]).min()) for v in margins)
    return seq, margin


def run(out, family):
    kwargs = FAMILIES[family]
    for seed in range(100, 200):
        model = build(family, seed, std=0.3, **kwargs)
        torch.manual_seed(seed + 1)
        prompt = torch.randint(3, kwargs["vocab_size"], (1, 7))
        mask = torch.ones_like(prompt)
        ids, m1 = greedy(model, input_ids=prompt, attention_mask=mask)
        embeds = model.get_input_embeddings()(prompt).detach() + 0.5 * torch.randn(1, 7, kwargs["hidden_size"])
        ids_e, m2 = greedy(model, inputs_embeds=embeds, attention_mask=mask)
        if (len(set(ids[0].tolist())) >= 4 and len(set(ids_e[0].tolist())) >= 4 and min(m1, m2) > 1e-3
                and ids[0, 5] not in ids[0, :5]):
            break
    else:
        raise RuntimeError("no seed gives a varied greedy continuation")
    eos = int(ids[0, 5])
    ids_eos, _ = greedy(model, input_ids=prompt, attention_mask=mask, eos=eos)
    assert ids_eos.shape[1] == 6 and int(ids_eos[0, -1]) == eos, ids_eos

    batch = torch.randint(3, kwargs["vocab_size"], (2, 12))
    bmask = torch.ones_like(batch)
    bmask[1, :3] = 0
    batch[1, :3] = kwargs["pad_token_id"]
    with torch.no_grad():
        blogits = model(input_ids=batch, attention_mask=bmask, position_ids=generate_position_ids(bmask),
                        use_cache=False).logits
    gen_batch = torch.randint(3, kwargs["vocab_size"], (2, 7))
    gen_mask = torch.ones_like(gen_batch)
    gen_mask[1, :3] = 0
    gen_batch[1, :3] = kwargs["pad_token_id"]
    free, _ = greedy(model, input_ids=gen_batch, attention_mask=gen_mask)
    gen_eos = int(free[0, 3])
    gen_out, margin = greedy(model, input_ids=gen_batch, attention_mask=gen_mask, eos=gen_eos)
    assert margin > 1e-4, margin
    save(model, out)
    save_file({"gen_batch_ids": gen_batch, "gen_batch_mask": gen_mask, "gen_batch": gen_out.contiguous(),
               "gen_batch_eos": torch.tensor([gen_eos]), "prompt_ids": prompt, "greedy": ids, "greedy_eos": ids_eos, "prompt_embeds": embeds,
               "greedy_embeds": ids_e, "batch_ids": batch, "batch_mask": bmask, "batch_logits": blogits},
              str(pathlib.Path(out) / "io.safetensors"))
    print(family, "seed", seed, "greedy", ids.tolist(), "embeds", ids_e.tolist(), "margins", m1, m2)


if __name__ == "__main__":
    root = pathlib.Path(sys.argv[1])
    for family in sys.argv[2:] or list(FAMILIES):
        run(root / family, family)
