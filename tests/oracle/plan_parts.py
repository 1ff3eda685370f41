"""Oracle for tests/plan_cli.rs: the parameters of the shipped full-size recipes, total and trainable, per
part, as the reference builds and freezes them, on PyTorch's meta device (nothing allocated).

- Models: M3D-CLIP (MONAI ViT + transformers' BertModel, models/tests/oracle/clip_oracle.py) and M3D-LaMed
  (transformers' LlamaForCausalLM / Phi3ForCausalLM with the vision tower, spp projector, seg_projector and
  SegVol of models/tests/oracle/lamed_oracle.py, vocabulary = tokenizer + 4 as `resize_token_embeddings`).
- Trainable sets, as BAAI-DCAI/M3D LaMed/src/train/train.py sets them:
  stage 1 (`tune_mm_mlp_adapter`, no segmentation module): `model.requires_grad_(False)`, the mm_projector
  and the input embeddings trainable (lamed_arch.py `initialize_vision_tokenizer`), lm_head frozen;
  stage 2 (`lora_enable`): peft `get_peft_model` with LoraConfig(r=16, alpha=32, dropout=0.05) on every
  nn.Linear whose name has none of the ignore keywords (`find_all_linear_names`), then every parameter whose
  name has one of them trainable.
- Parts by name: `lora` (adapters), `vision_tower`, `mm_projector`, `seg_projector`, `seg_module`,
  `embed_tokens`, `lm_head`, `llm` (the rest); CLIP: `vision_encoder`, `language_encoder`, `projections`.

usage: plan_parts.py OUT ; writes OUT/parts.json {recipe stem: {part: [params, trainable]}}.
"""
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig

ORACLES = Path(__file__).resolve().parents[2] / "models" / "tests" / "oracle"
sys.path.insert(0, str(ORACLES))
from clip_oracle import RefClip  # noqa: E402
from lamed_oracle import M3D_VIT, PUBLISHED_LLMS, attach  # noqa: E402
from seg_oracle import m3d_config  # noqa: E402

IGNORE = ["vision_tower", "mm_projector", "embed_tokens", "lm_head", "seg_projector", "seg_module"]

# Our preset names for the oracle's published LLMs.
LLMS = {"llama2-7b": PUBLISHED_LLMS["llama2_7b"], "llama3-8b": PUBLISHED_LLMS["llama3_8b"],
        "phi3-mini": PUBLISHED_LLMS["phi3_mini"]}


def lamed_part(name):
    name = name.removeprefix("base_model.model.")
    if "lora_" in name:
        return "lora"
    for key in ["vision_tower", "mm_projector", "seg_projector", "seg_module", "embed_tokens"]:
        if key in name:
            return key
    return "lm_head" if name.startswith("lm_head") else "llm"


def clip_part(name):
    for key in ["vision_encoder", "language_encoder"]:
        if name.startswith(key + "."):
            return key
    return "projections"


def parts(model, part_of):
    out = {}
    for name, p in model.named_parameters():
        # MONAI 1.6's unused cross-attention norms, absent from the published weights and from ours.
        if ".norm_cross_attn." in name:
            continue
        entry = out.setdefault(part_of(name), [0, 0])
        entry[0] += p.numel()
        entry[1] += p.numel() if p.requires_grad else 0
    return out


def find_all_linear_names(model):
    names = set()
    for name, module in model.named_modules():
        if any(k in name for k in IGNORE):
            continue
        if isinstance(module, torch.nn.Linear):
            names.add(name)
    return list(names)


def main(out: Path):
    result = {}
    vcfg = dict(in_channels=1, img_size=[32, 256, 256], patch_size=[4, 16, 16], hidden_size=768, mlp_dim=3072,
                num_layers=12, num_heads=12, dropout_rate=0.0, qkv_bias=False, cls_token=True)
    tcfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
    with torch.device("meta"):
        result["clip"] = parts(RefClip(vcfg, tcfg), clip_part)
    for preset, (cls, cfg) in LLMS.items():
        with torch.device("meta"):
            # Stage 1: no segmentation module.
            lm = attach(cls(cfg), cfg.hidden_size, M3D_VIT, m3d_config())
            del lm.model.seg_projector, lm.model.seg_module
            lm.requires_grad_(False)
            for p in lm.model.mm_projector.parameters():
                p.requires_grad = True
            for p in lm.get_input_embeddings().parameters():
                p.requires_grad = True
            result[f"lamed-{preset}-stage1"] = parts(lm, lamed_part)
            # Stage 2.
            lm = attach(cls(cfg), cfg.hidden_size, M3D_VIT, m3d_config())
            lora = LoraConfig(r=16, lora_alpha=32, target_modules=find_all_linear_names(lm), lora_dropout=0.05,
                              bias="none", task_type="CAUSAL_LM")
            lm = get_peft_model(lm, lora)
            for n, p in lm.named_parameters():
                if any(k in n for k in IGNORE):
                    p.requires_grad = True
            result[f"lamed-{preset}-stage2"] = parts(lm, lamed_part)
    (out / "parts.json").write_text(json.dumps(result, indent=1))
    print({k: sum(v[1] for v in parts_.values()) for k, parts_ in result.items()})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
