"""Phi-3-mini tokenizer.json = Llama-2 tokenizer.json (same sentencepiece vocab/merges, legacy normalizer)
+ Phi-3's added tokens 32000..32010 and Phi-3's flags on </s>. (Model config vocab_size is 32064: ids
32011..32063 are unused embedding rows, NOT in the tokenizer; llama.cpp's GGUF pads them as [PAD{id}].)
Usage: python build_phi3_from_llama2.py llama2.tokenizer.json out/phi3.tokenizer.json"""
import json, sys
src, dst = sys.argv[1], sys.argv[2]
tj = json.load(open(src, encoding="utf-8"))
def at(i, c, rstrip, special):
    return {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": rstrip,
            "normalized": False, "special": special}
added = [at(0, "<unk>", False, True), at(1, "<s>", False, True), at(2, "</s>", True, False),
         at(32000, "<|endoftext|>", False, True)]
for i, c in [(32001, "<|assistant|>"), (32002, "<|placeholder1|>"), (32003, "<|placeholder2|>"),
             (32004, "<|placeholder3|>"), (32005, "<|placeholder4|>"), (32006, "<|system|>"),
             (32007, "<|end|>"), (32008, "<|placeholder5|>"), (32009, "<|placeholder6|>"), (32010, "<|user|>")]:
    added.append(at(i, c, True, True))
tj["added_tokens"] = added
json.dump(tj, open(dst, "w", encoding="utf-8"), ensure_ascii=False, indent=2)
print("wrote", dst)
