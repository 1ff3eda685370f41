"""Oracle for tests/lamed.rs: M3D-LaMed composed from transformers' LlamaForCausalLM, MONAI's ViT (with a CLS
token, as M3D's vision tower), the torch projector of lamed_projector_oracle.py and the SegVol oracle of
seg_oracle.py, all attached under the reference's module names (`model.vision_tower.vision_tower`,
`model.mm_projector`, `model.seg_projector`, `model.seg_module`).

  lamed_oracle.py <out>          tiny model. Writes base.safetensors (the LLM before the 4 added tokens),
                                 weights.safetensors (the LaMed checkpoint), examples.json (token lists and
                                 the reference data pipeline's input_ids / attention_mask / labels) and
                                 io.safetensors (inputs, logits, losses, seg logits and prompts, gradients of
                                 the total loss, a greedy generation with image, and a generation through the
                                 reference's `generate(seg_enable=True)` with its mask logits).
  lamed_oracle.py <out> count    parameter counts of the published configurations, built on the meta device:
                                 counts.json {preset: {"state": n, "params": n}}.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
from monai.networks.nets import ViT
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from lamed_projector_oracle import Spp  # noqa: E402
from seg_oracle import Seg, bce_loss, debug_config, dice_loss, m3d_config, perturb  # noqa: E402

IGNORE = -100
TOK_LEN = 128                      # base tokenizer size of the tiny model
IM_PATCH, BX_START, BX_END, SEG = TOK_LEN, TOK_LEN + 1, TOK_LEN + 2, TOK_LEN + 3
BOS, EOS, PAD = 1, 2, 0


def vision_tower(img, patch, hidden, mlp, layers, heads):
    """M3D's ViT3DTower.vision_tower: MONAI ViT without classification head, plus a zero CLS token (MONAI's
    forward prepends any `cls_token` attribute after the position embedding)."""
    vit = ViT(in_channels=1, img_size=img, patch_size=patch, hidden_size=hidden, mlp_dim=mlp, num_layers=layers,
              num_heads=heads, proj_type="perceptron", classification=False, dropout_rate=0.0, qkv_bias=False)
    vit.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
    tower = nn.Module()
    tower.vision_tower = vit
    return tower


def attach(lm, hidden, vit_cfg, seg_cfg):
    """Adds LaMed's modules to an HF causal LM, under the reference names."""
    img, patch, vh = vit_cfg["img"], vit_cfg["patch"], vit_cfg["hidden"]
    m = lm.model
    m.vision_tower = vision_tower(img, patch, vh, vit_cfg["mlp"], vit_cfg["layers"], vit_cfg["heads"])
    grid = [i // p for i, p in zip(img, patch)]
    m.mm_projector = Spp(grid, vh, hidden, "mlp", 2, "spatial", 2)
    m.seg_projector = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, vh),
                                    nn.Dropout(0.1))
    m.seg_module = Seg(seg_cfg)
    return lm


def splice(lm, ids, images):
    m = lm.model
    emb = m.embed_tokens(ids)
    feats, _ = m.vision_tower.vision_tower(images)
    img = m.mm_projector(feats[:, 1:])
    n = img.shape[1]
    return torch.cat([emb[:, :1], img, emb[:, n + 1:]], dim=1)


def lamed_forward(lm, ids, mask, labels, images, segs):
    m = lm.model
    emb = splice(lm, ids, images)
    out = lm(inputs_embeds=emb, attention_mask=mask, labels=labels, output_hidden_states=True)
    h = out.hidden_states[-1]
    seg_ids = [i for i in range(ids.shape[0]) if segs[i].sum() != 0]
    prompts = []
    for i in seg_ids:
        pos = (ids[i, 1:] == SEG).nonzero()[:, 0]       # states that are followed by [SEG]
        if len(pos) == 0:
            prompts.append(torch.zeros(1, m.seg_projector[2].out_features))
        else:
            prompts.append(m.seg_projector(h[i, pos].mean(0, keepdim=True)))
    prompts = torch.cat(prompts)
    seg_logits, _, _ = m.seg_module(images[seg_ids], prompts)
    dice, bce = dice_loss(seg_logits, segs[seg_ids]), bce_loss(seg_logits, segs[seg_ids])
    return out, prompts, seg_logits, dice, bce, seg_ids


def build_example(q, full, max_len, pad, eos):
    """The reference datasets' input/label construction (CapDataset / VQADataset)."""
    full = full[:max_len]
    valid = len(full)
    ids = torch.tensor(full + [pad] * (max_len - valid))
    mask = torch.tensor([1] * valid + [0] * (max_len - valid))
    if valid < max_len:
        ids[valid] = eos
    qlen = min(len(q), max_len)
    label = ids.clone()
    label[:qlen] = IGNORE
    if pad == eos:
        label[label == pad] = IGNORE
        if valid < max_len:
            label[valid] = eos
    else:
        label[label == pad] = IGNORE
    return ids, mask, label


def tiny_llm_config(vocab):
    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=BOS, eos_token_id=EOS,
                       pad_token_id=PAD, tie_word_embeddings=False)


def main(out: Path):
    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_llm_config(TOK_LEN))
    perturb(lm, 0.02)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(out / "base.safetensors"))

    # initialize_vision_tokenizer: resize to len(tokenizer), new rows = mean of the old ones.
    lm.resize_token_embeddings(TOK_LEN + 4)
    with torch.no_grad():
        for w in (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight):
            w[-4:] = w[:-4].mean(dim=0, keepdim=True)
    lm.config.vocab_size = TOK_LEN + 4
    seg_cfg = debug_config()
    attach(lm, 64, dict(img=[8, 32, 32], patch=[4, 8, 8], hidden=32, mlp=64, layers=2, heads=4), seg_cfg)
    for name in ("vision_tower", "mm_projector", "seg_projector", "seg_module"):
        perturb(getattr(lm.model, name))
    lm.eval()

    g = torch.Generator().manual_seed(1)

    def words(n):
        return torch.randint(3, TOK_LEN, (n,), generator=g).tolist()

    img_tokens = [IM_PATCH] * 4
    max_len = 20
    examples = []
    specs = [  # (prompt words, answer) -- answers with one, two, no and one [SEG]
        (4, words(3) + [SEG] + words(2)),
        (5, words(1) + [SEG] + words(2) + [SEG] + words(6)),   # longer than max_len: truncated, no EOS
        (3, words(4)),
        (3, words(2) + [SEG] + words(1)),
    ]
    for n_prompt, answer in specs:
        q = [BOS] + img_tokens + words(n_prompt)
        full = q + answer
        ids, mask, label = build_example(q, full, max_len, PAD, EOS)
        examples.append(dict(question_ids=q, full_ids=full, input_ids=ids.tolist(),
                             attention_mask=mask.tolist(), labels=label.tolist()))
    ids = torch.tensor([e["input_ids"] for e in examples])
    mask = torch.tensor([e["attention_mask"] for e in examples])
    labels = torch.tensor([e["labels"] for e in examples])
    images = torch.randn(4, 1, 8, 32, 32)
    segs = (torch.rand(4, 1, 8, 32, 32) > 0.6).float()
    segs[3] = 0  # no mask: no segmentation loss for this sample, although it has a [SEG] token

    o, prompts, seg_logits, dice, bce, seg_ids = lamed_forward(lm, ids, mask, labels, images, segs)
    loss = o.loss + dice + bce
    loss.backward()

    io = dict(input_ids=ids, attention_mask=mask, labels=labels, images=images, segs=segs,
              logits=o.logits.detach(), hidden=o.hidden_states[-1].detach(), lm_loss=o.loss.detach(),
              dice=dice.detach(), bce=bce.detach(), loss=loss.detach(), prompts=prompts.detach(),
              seg_logits=seg_logits.detach(), seg_ids=torch.tensor(seg_ids))
    for k, p in lm.named_parameters():
        if p.grad is not None and ".norm_cross_attn." not in k:
            io[f"grad.{k}"] = p.grad

    # Greedy generation with an image (HF generate on inputs_embeds returns the new tokens only).
    prompt = torch.tensor([examples[0]["question_ids"]])
    with torch.no_grad():
        emb = splice(lm, prompt, images[:1])
        gen = lm.generate(inputs_embeds=emb, attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                          max_new_tokens=8, do_sample=False, num_beams=1, eos_token_id=EOS, pad_token_id=PAD)
    io["gen_prompt"] = prompt
    io["gen_output"] = gen

    sd = {k: v.contiguous() for k, v in lm.state_dict().items() if ".norm_cross_attn." not in k}
    save_file(sd, str(out / "weights.safetensors"))

    seg_generate(lm, prompt, images[:1], io)
    save_file({k: v.contiguous() for k, v in io.items()}, str(out / "io.safetensors"))
    json.dump(examples, open(out / "examples.json", "w"))


def reference_seg_generate(lm, images, inputs_embeds, max_new_tokens):
    """LamedPhi3ForCausalLM / LamedLlamaForCausalLM.generate(..., seg_enable=True) of BAAI-DCAI/M3D@63e72005
    (LaMed/src/model/language_model/lamed_*.py), with the model's modules under their reference names."""
    outputs = lm.generate(inputs_embeds=inputs_embeds, output_hidden_states=True, return_dict_in_generate=True,
                          max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=EOS,
                          pad_token_id=PAD)
    output_hidden_states = outputs.hidden_states
    output_ids = outputs.sequences
    seg_token_mask = output_ids[:, 1:] == SEG
    last_tensors = [tuple[-1] for tuple in output_hidden_states]
    last_hidden_state = torch.cat(last_tensors[1:], dim=1)
    seg_prompts = []
    noseg_ids = []
    m = lm.model
    for i in range(len(seg_token_mask)):
        if torch.sum(seg_token_mask[i]) == 1:
            seg_token = last_hidden_state[i][seg_token_mask[i]]
            seg_prompt = m.seg_projector(seg_token)
        elif torch.sum(seg_token_mask[i]) > 1:
            seg_tokens = last_hidden_state[i][seg_token_mask[i]]
            seg_token = torch.mean(seg_tokens, dim=0, keepdim=True)
            seg_prompt = m.seg_projector(seg_token)
        else:
            noseg_ids.append(i)
            seg_prompt = torch.zeros([1, m.seg_projector[2].out_features], dtype=last_hidden_state.dtype)
        seg_prompts.append(seg_prompt)
    seg_prompts = torch.cat(seg_prompts, dim=0)
    logits, _, _ = m.seg_module(images, seg_prompts)
    logits[noseg_ids] = -torch.inf
    return output_ids, logits, last_tensors


def seg_generate(lm, prompt, image, io):
    """A generation that says [SEG] at some steps and not at others, through the reference's seg_enable path.
    The LM head scores only [SEG] (row r) and token 5 (row -r), so each step picks by the sign of r . h, with r
    chosen so that the answer mixes both, and the mask depends on which hidden states preceded a [SEG]. Saves the head, the tokens
    and the mask logits."""
    with torch.no_grad():
        # The residual stream is mostly the fed token's embedding: r points from [SEG]'s normalised embedding to
        # token 5's, so feeding 5 tends to give [SEG] and feeding [SEG] to give 5.
        emb_w = lm.model.embed_tokens.weight
        unit = lambda x: x / x.pow(2).mean().sqrt()  # noqa: E731
        r = lm.model.norm.weight * (unit(emb_w[5]) - unit(emb_w[SEG]))
        lm.lm_head.weight.zero_()
        lm.lm_head.weight[SEG] = r
        lm.lm_head.weight[5] = -r
        emb = splice(lm, prompt, image)
        ids, logits, states = reference_seg_generate(lm, image, emb, 10)
    said = ids[0, 1:].tolist()
    assert said.count(SEG) >= 2 and any(t != SEG for t in said), ids
    # Every choice wins by a clear margin, so float differences cannot flip a token.
    margins = [abs(float(h[0, -1] @ r)) for h in states]
    assert min(margins) > 1e-3, margins
    io["seg_gen_lm_head"] = lm.lm_head.weight.detach().clone()
    io["seg_gen_output"] = ids
    io["seg_gen_logits"] = logits


M3D_VIT = dict(img=[32, 256, 256], patch=[4, 16, 16], hidden=768, mlp=3072, layers=12, heads=12)


# The published LaMed LLMs (tokenizer + the 4 LaMed tokens), as their config.json files shape them.
PUBLISHED_LLMS = {
    "llama2_7b": (LlamaForCausalLM, LlamaConfig(vocab_size=32000 + 4, hidden_size=4096, intermediate_size=11008,
                                                num_hidden_layers=32, num_attention_heads=32,
                                                tie_word_embeddings=False)),
    "llama3_8b": (LlamaForCausalLM, LlamaConfig(vocab_size=128256 + 4, hidden_size=4096, intermediate_size=14336,
                                                num_hidden_layers=32, num_attention_heads=32,
                                                num_key_value_heads=8, tie_word_embeddings=False)),
    "phi3_mini": (Phi3ForCausalLM, Phi3Config(vocab_size=32011 + 4, hidden_size=3072, intermediate_size=8192,
                                              num_hidden_layers=32, num_attention_heads=32,
                                              num_key_value_heads=32, tie_word_embeddings=False)),
}


def count(out: Path):
    presets = PUBLISHED_LLMS
    counts = {}
    for name, (cls, cfg) in presets.items():
        with torch.device("meta"):
            lm = attach(cls(cfg), cfg.hidden_size, M3D_VIT, m3d_config())
        sd = {k: v for k, v in lm.state_dict().items() if ".norm_cross_attn." not in k}
        params = sum(p.numel() for k, p in lm.named_parameters() if ".norm_cross_attn." not in k)
        counts[name] = dict(state=sum(v.numel() for v in sd.values()), params=params, keys=len(sd))
    json.dump(counts, open(out / "counts.json", "w"))


if __name__ == "__main__":
    if sys.argv[2:3] == ["count"]:
        count(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
