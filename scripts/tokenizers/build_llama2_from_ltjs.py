"""Rebuild Llama-2's tokenizer.json from the data embedded in npm llama-tokenizer-js@1.2.2
(vocab = published tokenizer.json model.vocab in id order; merges = published model.merges, same order).
Usage: python build_llama2_from_ltjs.py path/to/llama-tokenizer.js out/tokenizer.json"""
import base64, json, re, struct, sys
src, dst = sys.argv[1], sys.argv[2]
js = open(src, encoding="utf-8").read()
vb = re.search(r'const llama_vocab_base64 = "([^"]+)"', js).group(1)
mb = re.search(r'const llama_merges_binary = "([^"]+)"', js).group(1)
vocab = base64.b64decode(vb).decode("utf-8").split("\n")
assert len(vocab) == 32000, len(vocab)
ids = struct.unpack(f"<{len(base64.b64decode(mb))//2}H", base64.b64decode(mb))
merges = [f"{vocab[ids[i]]} {vocab[ids[i+1]]}" for i in range(0, len(ids), 2)]
special = lambda i, c: {"id": i, "content": c, "single_word": False, "lstrip": False,
                        "rstrip": False, "normalized": False, "special": True}
tj = {
  "version": "1.0", "truncation": None, "padding": None,
  "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
  "normalizer": {"type": "Sequence", "normalizers": [
      {"type": "Prepend", "prepend": "\u2581"},
      {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
  "pre_tokenizer": None,
  "post_processor": {"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
      "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
               {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
      "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
  "decoder": {"type": "Sequence", "decoders": [
      {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
      {"type": "ByteFallback"}, {"type": "Fuse"},
      {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
  "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
            "vocab": {t: i for i, t in enumerate(vocab)}, "merges": merges},
}
json.dump(tj, open(dst, "w", encoding="utf-8"), ensure_ascii=False, indent=2)
print("wrote", dst, "vocab", len(vocab), "merges", len(merges))
