"""BERTScore oracle: bert_score 0.3.13 (what evaluate's `bertscore` runs) on a tiny RoBERTa saved locally.

  make DIR CORPUS       a tiny RobertaForMaskedLM (3 layers, seeded) and a byte-level BPE tokenizer trained on the
                        corpus's texts, saved as an HF folder the way the Hub keeps roberta-large (encoder under
                        `roberta.`, the MLM head beside it; model_max_length 24 so long texts are truncated)
  score DIR LAYERS PAIRS  PAIRS is a JSON list of [candidate, reference]; prints {"tokens": {sentence: ids},
                        "scores": [[P, R, F], ...]} from bert_score.score(cands, refs, model_type=DIR,
                        num_layers=LAYERS, idf=False, batch_size=1): one pair per greedy-matching batch, as
                        M3D-Bench scores one sample per call.
"""

import json
import sys

import torch


def make(out, corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    texts = []
    with open(corpus) as f:
        for line in f:
            row = json.loads(line)
            texts.append(row["prediction"])
            texts.extend(row["references"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = RobertaTokenizerFast(tokenizer_object=tok, model_max_length=24)
    fast.save_pretrained(out)

    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=26,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    model = RobertaForMaskedLM(cfg)
    # Attention and MLP weights larger than the 0.02 initialisation, so the layers mix tokens visibly; the
    # LayerNorms stay at 1 and 0, which keeps different tokens' embeddings apart.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "encoder.layer" in name and name.endswith("weight") and "LayerNorm" not in name:
                p.normal_(0.0, 0.15)
    model.save_pretrained(out)


def reference_sent_encode(tokenizer, sent):
    """bert_score's `sent_encode` as it ran under transformers 4 (M3D-Bench's environment). Under transformers 5
    it breaks twice: `build_inputs_with_special_tokens` is gone (an empty sentence raises), and the tokenizers
    backend ignores `encode(..., add_prefix_space=True)`. Transformers 4's RobertaTokenizer put a space before
    a text that does not start with one (`prepare_for_tokenization`), and returned [CLS] [SEP] for none."""
    sent = sent.strip()
    if sent == "":
        return [tokenizer.cls_token_id, tokenizer.sep_token_id]
    return tokenizer.encode(
        " " + sent, add_special_tokens=True, max_length=tokenizer.model_max_length, truncation=True
    )


def score(model_dir, layers, pairs_path):
    import bert_score
    import bert_score.utils
    from bert_score.utils import get_tokenizer

    bert_score.utils.sent_encode = reference_sent_encode
    sent_encode = reference_sent_encode

    with open(pairs_path) as f:
        pairs = json.load(f)
    cands = [c for c, _ in pairs]
    refs = [r for _, r in pairs]
    tokenizer = get_tokenizer(model_dir, False)
    tokens = {s: sent_encode(tokenizer, s) for s in cands + refs}
    P, R, F = bert_score.score(
        cands, refs, model_type=model_dir, num_layers=layers, idf=False, batch_size=1, device="cpu"
    )
    scores = [[float(p), float(r), float(x)] for p, r, x in zip(P, R, F)]
    print(json.dumps({"tokens": tokens, "scores": scores}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "score":
        score(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
