"""Oracle for tests/tokenizers_llm.rs: a published-layout tokenizer.json through transformers' fast tokenizer
(`PreTrainedTokenizerFast(tokenizer_file=...)`, the class `AutoTokenizer` builds from a tokenizer.json), with
the four tokens M3D-LaMed adds in the reference's order (LaMed/src/train/train.py: `<im_patch>`, `<bx_start>`,
`<bx_end>` as additional special tokens, then `[SEG]` with `add_tokens`).

usage: tokenizer_oracle.py OUT TOKENIZER_JSON TEXTS_JSON ; writes OUT/tokens.json:
[{"ids": [...], "ids_plain": [...], "decoded": str, "decoded_skip": str}] per text, where `ids` are with
special tokens (the BOS the template adds) and `ids_plain` without.
"""
import json
import sys
from pathlib import Path

from transformers import PreTrainedTokenizerFast

out, tokenizer_json, texts_json = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json)
tok.add_special_tokens({"additional_special_tokens": ["<im_patch>", "<bx_start>", "<bx_end>"]})
tok.add_tokens("[SEG]")
rows = []
for text in json.load(open(texts_json, encoding="utf-8")):
    ids = tok(text)["input_ids"]
    rows.append({
        "ids": ids,
        "ids_plain": tok(text, add_special_tokens=False)["input_ids"],
        "decoded": tok.decode(ids, skip_special_tokens=False),
        "decoded_skip": tok.decode(ids, skip_special_tokens=True),
    })
(out / "tokens.json").write_text(json.dumps({"len": len(tok), "rows": rows}, ensure_ascii=False))
