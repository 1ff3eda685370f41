"""Oracle for m3d's trainer: the reference's own training loop (HF `transformers.Trainer`) on a dump of m3d's.

usage: trainer_trajectory.py DIR              train on DIR's dump, write DIR/oracle.json
       trainer_trajectory.py --selftest DIR   fabricate small dumps (tiny LaMed with SegVol, tiny CLIP) under
                                              DIR/lamed and DIR/clip, train on them, and check the Trainer run
                                              against a plain PyTorch loop on the same dump

The dump (written by m3d's Rust test):
  DIR/spec.json           {"model": "lamed" | "clip", "config": m3d's LamedConfig / M3dClipConfig JSON,
                           "trainable": [m3d names], "lora": m3d LoraConfig | null, "args": {...},
                           "steps": n, "batch": B}
  DIR/init.safetensors    m3d's state dict at step 0 (LoRA as `<module>.lora_A.weight` / `.lora_B.weight`)
  DIR/batches.safetensors `images` (N,1,D,H,W); per step s: `{s}.image_index` (B,), `{s}.input_ids`,
                          `{s}.attention_mask` (B,T); LaMed also `{s}.labels` and, with SegVol, `segs`
                          (M,1,D,H,W) and `{s}.seg_index` (B,), -1 for "no mask"
DIR/oracle.json gets the exact per-step loss (and LaMed's LM / Dice / BCE parts), the learning rate each
optimizer step used, the pre-clipping gradient norm, the trainable and no-weight-decay parameter names (torch
names, as the Trainer sees them) and the step count.

What follows the reference (BAAI-DCAI/M3D):
  LaMed/src/train/train.py
    - `find_all_linear_names`: LoRA targets = every nn.Linear whose name contains none of vision_tower,
      mm_projector, embed_tokens, lm_head, seg_projector, seg_module;
    - the `lora_enable` block: peft `LoraConfig(r, lora_alpha, target_modules, lora_dropout, bias="none",
      task_type="CAUSAL_LM")`, `get_peft_model`, then `requires_grad = True` on every parameter whose name
      contains one of those six words; without LoRA, `tune_mm_mlp_adapter` (stage 1: mm_projector and
      embed_tokens, lm_head frozen, as `initialize_vision_tokenizer` leaves it) or full fine-tuning;
    - `model.config.use_cache = False`;
    - `DataCollator`: stacks image / input_id / label / attention_mask, empty masks become zero masks;
    - the `TrainingArguments` defaults and the finetune / pretrain scripts (LaMed/script/*.sh): adamw_torch,
      cosine schedule with warmup ratio, remove_unused_columns=False, gradient accumulation 1.
  LaMed/src/train/lamed_trainer.py: `LaMedTrainer` only overrides `_save`, so the optimizer, its parameter
    groups, the schedule, clipping and the loss are the stock `Trainer`'s.
  LaMed/src/model/language_model/lamed_llama.py (`forward`): loss = LM loss + (Dice + BCE) over the samples
    whose mask is not empty; implemented by models/tests/oracle/lamed_oracle.py (`splice`, `lamed_forward`).
  LaMed/src/train/train_CLIP.py (`DataCollator`: labels = arange(B)) and LaMed/src/model/CLIP.py
    (`M3DCLIP.forward` with one process, where gathering is the identity), on clip_oracle.py's `RefClip`.

Differences from the reference's run, none of which changes the numbers: f32 on CPU (the scripts use bf16 on
GPUs); a SequentialSampler in the dumped order (the Trainer shuffles); no evaluation; transformers 5 instead of
4.39.1 — its `warmup_steps` takes the ratio (ceil(ratio * max_steps), as 4.39's `warmup_ratio`), the models set
`accepts_loss_kwargs = False` so the Trainer neither passes `num_items_in_batch` nor rescales the loss (4.39
had no such mechanism), and the weight-decay grouping is checked to be 4.39's (see `reference_no_decay`).
MONAI >= 1.4 adds an unused `norm_cross_attn` LayerNorm to every TransformerBlock that M3D's MONAI 1.3 does
not have; it is removed (replaced by an identity), so it is neither loaded nor trained.
"""
import argparse
import json
import math
import re
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from transformers import (BertConfig, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, Trainer,
                          TrainingArguments, get_cosine_schedule_with_warmup)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models/tests/oracle"))
import lamed_oracle  # noqa: E402
from clip_oracle import RefClip  # noqa: E402
from lamed_oracle import attach, build_example, lamed_forward, splice  # noqa: E402
from lamed_projector_oracle import build as build_projector  # noqa: E402
from seg_oracle import debug_config  # noqa: E402

# train.py: the modules LoRA skips (find_all_linear_names) and that are trained in full next to the adapters.
REFERENCE_FULL_MODULES = ["vision_tower", "mm_projector", "embed_tokens", "lm_head", "seg_projector", "seg_module"]
PEFT_PREFIX = "base_model.model."
LLMS = {"llama": (LlamaConfig, LlamaForCausalLM), "phi3": (Phi3Config, Phi3ForCausalLM)}


def fail(msg):
    raise SystemExit(f"trainer_trajectory: {msg}")


def fail_on_diff(what, ours, reference):
    ours, reference = set(ours), set(reference)
    if ours != reference:
        fail(f"{what} differ\n  only in the dump: {sorted(ours - reference)}\n"
             f"  only in the reference: {sorted(reference - ours)}")


# ---- models --------------------------------------------------------------------------------------------

def drop_norm_cross_attn(model):
    """MONAI >= 1.4's TransformerBlock has an unused `norm_cross_attn`; M3D's MONAI 1.3 has none."""
    for module in model.modules():
        if hasattr(module, "norm_cross_attn"):
            module.norm_cross_attn = nn.Identity()


def hf_llm_config(llm):
    """transformers' config from m3d's LlmConfig JSON (HF field names, tagged by `model_type`)."""
    fields = dict(llm)
    config_cls, lm_cls = LLMS[fields.pop("model_type")]
    if fields.get("hidden_act") == "gelu_tanh":          # m3d's name for HF's tanh-approximated GELU
        fields["hidden_act"] = "gelu_pytorch_tanh"
    if fields.get("head_dim", 0) is None:                 # m3d: hidden / heads, HF's value when absent
        del fields["head_dim"]
    return config_cls(**fields), lm_cls


class CausalLmCall:
    """What `lamed_forward` / `splice` need of the LM: `.model` and a call of the plain causal-LM forward
    (the LaMed class's own `forward` is the multimodal one, as in the reference)."""

    def __init__(self, lm, base_forward):
        self.model, self._lm, self._forward = lm.model, lm, base_forward

    def __call__(self, **kwargs):
        return self._forward(self._lm, **kwargs)


def lamed_class(lm_cls):
    """LamedLlamaForCausalLM / LamedPhi3ForCausalLM: the HF causal LM whose forward takes images and masks."""

    class Lamed(lm_cls):
        # transformers 4.39 (the reference's) never passes `num_items_in_batch`; keep the loss as returned.
        accepts_loss_kwargs = False

        def forward(self, images=None, input_ids=None, labels=None, attention_mask=None, segs=None,
                    **passed_by_peft):
            unexpected = {k: v for k, v in passed_by_peft.items() if v is not None}
            if unexpected:
                fail(f"unexpected forward arguments {sorted(unexpected)}")
            lm = CausalLmCall(self, lm_cls.forward)
            seg_ids = [] if segs is None else torch.nonzero(segs.sum(dim=(1, 2, 3, 4))).flatten().tolist()
            if hasattr(self.model, "seg_module") and seg_ids:
                out, _, _, dice, bce, _ = lamed_forward(lm, input_ids, attention_mask, labels, images, segs)
                return {"loss": out.loss + (dice + bce), "lm": out.loss, "dice": dice, "bce": bce}
            out = lm(inputs_embeds=splice(lm, input_ids, images), attention_mask=attention_mask, labels=labels)
            zero = torch.zeros(())
            return {"loss": out.loss, "lm": out.loss, "dice": zero, "bce": zero}

    return Lamed


def build_lamed(cfg):
    """LaMed under the reference's module names, from m3d's LamedConfig JSON. `attach` hard-codes the
    projector (spp / mlp / 2 / spatial / 2), `seg_projector`'s Dropout(0.1) and always adds SegVol: those parts
    are rebuilt or removed here from the config."""
    vision, proj = cfg["vision"], cfg["projector"]
    if cfg["vision_select_layer"] != -1 or cfg["vision_select_feature"] != "patch":
        fail("only vision_select_layer -1 with vision_select_feature `patch` (the published setting) is mirrored")
    if vision["in_channels"] != 1 or vision["qkv_bias"] or not vision["cls_token"]:
        fail("the reference's LaMed vision tower has 1 channel, no qkv bias and a CLS token")
    llm_config, lm_cls = hf_llm_config(cfg["llm"])
    hidden = llm_config.hidden_size
    if proj["hidden_size"] != hidden or proj["mm_hidden_size"] != vision["hidden_size"]:
        fail("projector widths do not match the LLM / vision tower")
    lm = lamed_class(lm_cls)(llm_config)
    lm.config.use_cache = False
    tower = dict(img=vision["img_size"], patch=vision["patch_size"], hidden=vision["hidden_size"],
                 mlp=vision["mlp_dim"], layers=vision["num_layers"], heads=vision["num_heads"])
    attach(lm, hidden, tower, cfg["seg"] or debug_config())
    m = lm.model
    m.mm_projector = build_projector(proj["mm_projector_type"], proj["proj_layer_type"], proj["proj_layer_num"],
                                     proj["proj_pooling_type"], proj["proj_pooling_size"], proj["image_size"],
                                     proj["patch_size"], proj["mm_hidden_size"], hidden)
    if cfg["seg"] is None:
        del m.seg_projector, m.seg_module
    else:
        m.seg_projector[3] = nn.Dropout(cfg["seg_projector_dropout"])
    # lamed_forward finds the prompts' positions through this module constant.
    lamed_oracle.SEG = cfg["tokens"]["seg"]
    drop_norm_cross_attn(lm)
    return lm


class TrainClip(RefClip):
    """M3DCLIP (LaMed/src/model/CLIP.py) with its forward and loss, for one process."""

    # transformers 4.39 (the reference's) never passes `num_items_in_batch`; keep the loss as returned.
    accepts_loss_kwargs = False

    def __init__(self, cfg):
        vision, text = cfg["vision"], dict(cfg["text"])
        if not vision["cls_token"] or not text.pop("add_pooling_layer"):
            fail("M3D-CLIP has a CLS token (classification=True) and BERT's pooler")
        if text.get("hidden_act") == "gelu_tanh":
            text["hidden_act"] = "gelu_pytorch_tanh"
        super().__init__(vision, BertConfig(**text))
        self.exp_scale = cfg["logit_scale"] == "exp"    # m3d's opt-in; the reference uses the raw parameter
        drop_norm_cross_attn(self)

    def forward(self, images, input_ids, attention_mask, labels):
        image_features = self.encode_image(images)[:, 0]
        text_features = self.encode_text(input_ids, attention_mask)[:, 0]
        scale = self.logit_scale.exp() if self.exp_scale else self.logit_scale
        # gather_features over one process returns the local features: global and local loss coincide.
        logits_per_image = scale * image_features @ text_features.T
        logits_per_text = logits_per_image.T
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"loss": loss, "logits": (logits_per_image + logits_per_text) / 2.0}


def check_no_dropout(model, spec):
    """Dropout draws differ between libraries: every rate must be 0."""
    rates = {f"module {n}": m.p for n, m in model.named_modules() if isinstance(m, nn.Dropout)}
    cfg = spec["config"]
    for part, fields in [("llm", cfg.get("llm")), ("vision", cfg["vision"]), ("text", cfg.get("text"))]:
        for k, v in (fields or {}).items():
            if "dropout" in k or "pdrop" in k:
                rates[f"config {part}.{k}"] = v
    if spec["lora"] is not None:
        rates["lora.dropout"] = spec["lora"]["dropout"]
    nonzero = {k: v for k, v in rates.items() if v != 0}
    if nonzero:
        fail(f"dropout must be 0 for a deterministic comparison: {nonzero}")


# ---- LoRA and trainable parameters ---------------------------------------------------------------------

def find_all_linear_names(model):
    """train.py `find_all_linear_names`."""
    return sorted(name for name, module in model.named_modules()
                  if not any(k in name for k in REFERENCE_FULL_MODULES) and isinstance(module, nn.Linear))


def m3d_lora_targets(model, lora):
    """The Linear modules m3d's LoraConfig::targets selects (models/src/lora.rs)."""
    def targets(name):
        if any(e in name for e in lora["exclude"]):
            return False
        if lora["target_regex"] is not None:
            return re.fullmatch(lora["target_regex"], name) is not None
        return any(t == "all-linear" or name == t or name.endswith("." + t) for t in lora["target_modules"])
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and targets(n))


def apply_reference_lora(lm, lora):
    """train.py's `lora_enable` block; returns the peft model with the reference's requires_grad."""
    targets = find_all_linear_names(lm)
    fail_on_diff("LoRA target modules", m3d_lora_targets(lm, lora), targets)
    config = PeftLoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=targets,
                            lora_dropout=lora["dropout"], bias="none", task_type="CAUSAL_LM",
                            use_rslora=lora["use_rslora"])
    model = get_peft_model(lm, config)
    for n, p in model.named_parameters():
        if any(x in n for x in REFERENCE_FULL_MODULES):
            p.requires_grad = True
    return model


def m3d_name(torch_name):
    """m3d's name of a torch parameter: peft's wrapping removed (models/src/lora.rs naming)."""
    name = torch_name.removeprefix(PEFT_PREFIX)
    return name.replace(".base_layer.", ".").replace(".lora_A.default.", ".lora_A.").replace(
        ".lora_B.default.", ".lora_B.")


def reference_trainable(model, spec):
    """The parameters the reference trains in this setting (m3d names)."""
    if spec["model"] == "clip" or spec["lora"] is not None:
        # CLIP trains everything; with LoRA the requires_grad flags are apply_reference_lora's.
        return {m3d_name(n) for n, p in model.named_parameters() if p.requires_grad}
    # LaMed without LoRA: full fine-tuning (every parameter) when the dump trains everything, else stage 1
    # (`tune_mm_mlp_adapter`: mm_projector and the input embeddings).
    everything = {m3d_name(n) for n, _ in model.named_parameters()}
    if set(spec["trainable"]) == everything:
        return everything
    return {n for n in everything if n.startswith("model.mm_projector.") or n == "model.embed_tokens.weight"}


def build(spec):
    """The torch model of the dump, with the reference's LoRA and requires_grad, m3d's initial weights loaded,
    and requires_grad set from the dump (checked against the reference's rules)."""
    if spec["model"] == "lamed":
        model = build_lamed(spec["config"])
        if spec["lora"] is not None:
            model = apply_reference_lora(model, spec["lora"])
    elif spec["model"] == "clip":
        if spec["lora"] is not None:
            fail("the reference trains M3D-CLIP without LoRA")
        model = TrainClip(spec["config"])
    else:
        fail(f"unknown model {spec['model']}")
    check_no_dropout(model, spec)
    fail_on_diff("trainable parameters (m3d names)", spec["trainable"], reference_trainable(model, spec))
    for n, p in model.named_parameters():
        p.requires_grad = m3d_name(n) in spec["trainable"]
    return model


def load_init(model, path):
    """Strict load by name: every tensor of the dump used, every entry of the model's state dict covered."""
    init = load_file(str(path))
    state = model.state_dict()
    by_m3d = {m3d_name(k): k for k in state}
    fail_on_diff("state dict keys (m3d names)", init, by_m3d)
    with torch.no_grad():
        for k, v in init.items():
            target = state[by_m3d[k]]
            if target.shape != v.shape:
                fail(f"{k}: shape {tuple(v.shape)} in the dump, {tuple(target.shape)} in the model")
            target.copy_(v)


# ---- data ----------------------------------------------------------------------------------------------

class DumpDataset(Dataset):
    """The dumped samples in order: step 0's B samples, then step 1's, ... as the reference datasets give
    them (a non-segmentation sample's `seg` is `zeros_like(image)`)."""

    def __init__(self, path, spec):
        self.t = load_file(str(path))
        self.kind, self.batch, self.steps = spec["model"], spec["batch"], spec["steps"]
        self.seg = self.kind == "lamed" and spec["config"]["seg"] is not None

    def __len__(self):
        return self.steps * self.batch

    def __getitem__(self, i):
        s, j = divmod(i, self.batch)
        image = self.t["images"][self.t[f"{s}.image_index"][j]]
        item = {"image": image, "input_id": self.t[f"{s}.input_ids"][j],
                "attention_mask": self.t[f"{s}.attention_mask"][j]}
        if self.kind == "clip":
            item["text"] = ""
            return item
        item["label"] = self.t[f"{s}.labels"][j]
        if self.seg:
            k = int(self.t[f"{s}.seg_index"][j])
            item["seg"] = torch.zeros_like(image) if k < 0 else self.t["segs"][k]
        return item


class LamedCollator:
    """train.py `DataCollator`. The reference's zero mask for an empty one is (1, 1, 32, 256, 256), M3D's
    volume size; here it has the sample's own shape, the same for M3D-sized volumes."""

    def __init__(self, seg_enable):
        self.seg_enable = seg_enable

    def __call__(self, batch):
        out = {key: torch.cat([b[field].unsqueeze(0) for b in batch], dim=0) for key, field in
               [("images", "image"), ("input_ids", "input_id"), ("labels", "label"),
                ("attention_mask", "attention_mask")]}
        if self.seg_enable:
            segs = [torch.zeros((1, *b["seg"].shape)) if b["seg"].sum() == 0 else b["seg"].unsqueeze(0)
                    for b in batch]
            out["segs"] = torch.cat(segs, dim=0)
        return out


class ClipCollator:
    """train_CLIP.py `DataCollator`, one process (labels = arange(B * world size))."""

    def __call__(self, batch):
        images = torch.cat([b["image"].unsqueeze(0) for b in batch], dim=0)
        input_ids = torch.cat([b["input_id"].unsqueeze(0) for b in batch], dim=0)
        attention_mask = torch.cat([b["attention_mask"].unsqueeze(0) for b in batch], dim=0)
        labels = torch.arange(images.shape[0], device=images.device, dtype=torch.long)
        return dict(images=images, input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def collator(spec):
    if spec["model"] == "clip":
        return ClipCollator()
    return LamedCollator(spec["config"]["seg"] is not None)


# ---- training ------------------------------------------------------------------------------------------

def reference_no_decay(model):
    """transformers 4.39.1's grouping (`get_decay_parameter_names`): no decay for parameters inside a
    LayerNorm layer (`ALL_LAYERNORM_LAYERS`: nn.LayerNorm, and LlamaRMSNorm / Phi3RMSNorm, which their
    modeling files append) or whose name contains "bias"."""
    def is_norm(module):
        return isinstance(module, nn.LayerNorm) or type(module).__name__ in ("LlamaRMSNorm", "Phi3RMSNorm")
    in_norm = {f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules() if is_norm(m)
               for pn, _ in m.named_parameters(recurse=False)}
    return {n for n, _ in model.named_parameters() if n in in_norm or "bias" in n}


def training_arguments(spec, output_dir):
    a = spec["args"]
    if a["gradient_accumulation_steps"] != 1 or a["per_device_train_batch_size"] != spec["batch"]:
        fail("the dump must hold whole optimizer steps of one micro-batch each")
    if not 0 <= a["warmup_ratio"] < 1:
        fail("warmup_ratio must be in [0, 1)")
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=a["max_steps"],
        per_device_train_batch_size=a["per_device_train_batch_size"],
        gradient_accumulation_steps=a["gradient_accumulation_steps"], learning_rate=a["learning_rate"],
        weight_decay=a["weight_decay"], adam_beta1=a["adam_beta1"], adam_beta2=a["adam_beta2"],
        adam_epsilon=a["adam_epsilon"], max_grad_norm=a["max_grad_norm"], lr_scheduler_type=a["lr_scheduler_type"],
        warmup_steps=a["warmup_ratio"],   # transformers 5: a value < 1 is 4.39's warmup_ratio
        seed=a["seed"], optim="adamw_torch", bf16=False, dataloader_num_workers=0, report_to=[],
        logging_steps=1, save_strategy="no", remove_unused_columns=False, use_cpu=True, disable_tqdm=True)


def deepspeed_zero_fill(model):
    """DeepSpeed's `buffered_allreduce_fallback` (the reference launches through accelerate + DeepSpeed ZeRO
    stage 0, shared/M3D-REFERENCE.md section 3): before reducing, every trainable parameter whose gradient is None
    gets a zero one, so AdamW updates it too (its moments decay, its step count grows). Without it, torch's AdamW
    would skip a parameter the step did not reach (SegVol in a batch without masks)."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


class TrajectoryTrainer(Trainer):
    """The stock Trainer, reading the dump in order and recording each step's exact loss and learning rate;
    gradients as DeepSpeed leaves them (`deepspeed_zero_fill`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record = {k: [] for k in ("loss", "lm", "dice", "bce", "lr")}

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        deepspeed_zero_fill(model)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        self.record["loss"].append(loss.item())
        for part in ("lm", "dice", "bce"):
            if part in outputs:
                self.record[part].append(outputs[part].item())
        lrs = set(self.lr_scheduler.get_last_lr())     # the rate this step's optimizer.step() uses
        if len(lrs) != 1:
            fail(f"parameter groups with different learning rates: {lrs}")
        self.record["lr"].append(lrs.pop())
        return (loss, outputs) if return_outputs else loss


def run(directory):
    directory = Path(directory)
    spec = json.loads((directory / "spec.json").read_text())
    torch.manual_seed(spec["args"]["seed"])
    model = build(spec)
    load_init(model, directory / "init.safetensors")
    dataset = DumpDataset(directory / "batches.safetensors", spec)
    if spec["args"]["max_steps"] != spec["steps"]:
        fail("max_steps must equal the dumped steps")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = TrajectoryTrainer(model=model, args=training_arguments(spec, tmp),
                                    data_collator=collator(spec), train_dataset=dataset)
        if trainer.model_accepts_loss_kwargs:
            fail("the Trainer would pass num_items_in_batch to the model")
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        no_decay = sorted(set(trainable) - set(trainer.get_decay_parameter_names(model)))
        fail_on_diff("no-weight-decay parameters (transformers 5 vs 4.39 rule)", no_decay,
                     reference_no_decay(model) & set(trainable))
        trainer.train()
    grad_norm = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    rec = trainer.record
    if trainer.state.global_step != spec["steps"] or len(rec["loss"]) != spec["steps"] or \
            len(grad_norm) != spec["steps"]:
        fail(f"ran {trainer.state.global_step} steps, {len(rec['loss'])} losses, {len(grad_norm)} norms")
    result = {**{k: v for k, v in rec.items() if v}, "grad_norm": grad_norm, "trainable": trainable,
              "no_decay": no_decay, "steps": spec["steps"]}
    (directory / "oracle.json").write_text(json.dumps(result))
    return result


# ---- selftest ------------------------------------------------------------------------------------------

SELFTEST_ARGS = dict(learning_rate=2e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                     warmup_ratio=0.03, lr_scheduler_type="cosine", max_grad_norm=1.0, max_steps=5,
                     per_device_train_batch_size=2, gradient_accumulation_steps=1, seed=42)

# m3d's JSON of the debug configurations (LamedConfig::debug with seg_projector_dropout 0, M3dClipConfig::debug).
DEBUG_VIT = dict(in_channels=1, img_size=[8, 32, 32], patch_size=[4, 8, 8], hidden_size=32, mlp_dim=64,
                 num_layers=2, num_heads=4, dropout_rate=0.0, qkv_bias=False, cls_token=True)
LAMED_DEBUG = dict(
    llm=dict(model_type="llama", vocab_size=132, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=None, hidden_act="silu",
             max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False,
             attention_dropout=0.0, mlp_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
             pad_token_id=0, attn_implementation="sdpa"),
    vision=DEBUG_VIT, vision_select_layer=-1, vision_select_feature="patch",
    projector=dict(mm_projector_type="spp", image_size=[8, 32, 32], patch_size=[4, 8, 8], mm_hidden_size=32,
                   hidden_size=64, proj_layer_type="mlp", proj_layer_num=2, proj_pooling_type="spatial",
                   proj_pooling_size=2),
    seg=debug_config(), seg_projector_dropout=0.0, tokens=dict(im_patch=128, bx_start=129, bx_end=130, seg=131))
CLIP_DEBUG = dict(
    vision={**DEBUG_VIT, "img_size": [8, 16, 16]},
    text=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              hidden_act="gelu", max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
              position_embedding_type="absolute", add_pooling_layer=True),
    logit_scale="raw", local_loss=False, max_text_len=16)
SELFTEST_LORA = dict(r=8, alpha=16.0, dropout=0.0, target_modules=["all-linear"], target_regex=None,
                     exclude=REFERENCE_FULL_MODULES, use_rslora=False)


def perturbed_state(model):
    """The model's state dict moved off its structured init (unit norms, zero biases, zero CLS token)."""
    return {k: (v + 0.05 * torch.randn_like(v)).contiguous() for k, v in model.state_dict().items()}


def fabricate_lamed(steps, b):
    g = torch.Generator().manual_seed(1)
    lm = build_lamed(LAMED_DEBUG)
    init = perturbed_state(lm)
    for name in find_all_linear_names(lm):     # LoRA factors in m3d's naming, B non-zero
        w = init[f"{name}.weight"]
        init[f"{name}.lora_A.weight"] = 0.1 * torch.randn(8, w.shape[1], generator=g)
        init[f"{name}.lora_B.weight"] = 0.1 * torch.randn(w.shape[0], 8, generator=g)
    trainable = sorted([k for k in init if ".lora_" in k] +
                       [n for n, _ in lm.named_parameters() if any(x in n for x in REFERENCE_FULL_MODULES)])

    def words(n):
        return torch.randint(3, 128, (n,), generator=g).tolist()
    seg, im_patch = LAMED_DEBUG["tokens"]["seg"], LAMED_DEBUG["tokens"]["im_patch"]
    answers = [lambda: words(3) + [seg] + words(2), lambda: words(1) + [seg] + words(2) + [seg] + words(9),
               lambda: words(4), lambda: words(2) + [seg]]
    batches = {"images": torch.randn(3, 1, 8, 32, 32, generator=g),
               "segs": (torch.rand(2, 1, 8, 32, 32, generator=g) > 0.6).float()}
    seg_index = [[0, -1], [-1, 1], [1, 0], [-1, -1], [0, 1]]   # masks on both, one or no sample of a step
    for s in range(steps):
        rows = []
        for j in range(b):
            q = [1] + [im_patch] * 4 + words(3 + j)
            rows.append(build_example(q, q + answers[(s + j) % 4](), 20, 0, 2))
        for key, col in (("input_ids", 0), ("attention_mask", 1), ("labels", 2)):
            batches[f"{s}.{key}"] = torch.stack([r[col] for r in rows]).long()
        batches[f"{s}.image_index"] = torch.randint(0, 3, (b,), generator=g)
        batches[f"{s}.seg_index"] = torch.tensor(seg_index[s % len(seg_index)])
    return dict(model="lamed", config=LAMED_DEBUG, trainable=trainable, lora=SELFTEST_LORA), init, batches


def fabricate_clip(steps, b):
    g = torch.Generator().manual_seed(2)
    model = TrainClip(CLIP_DEBUG)
    init = perturbed_state(model)
    batches = {"images": torch.randn(5, 1, 8, 16, 16, generator=g)}
    for s in range(steps):
        ids = torch.randint(3, 99, (b, 12), generator=g)
        ids[:, 0] = 2
        mask = torch.ones(b, 12, dtype=torch.long)
        mask[0, 7 + s % 4:] = 0
        batches[f"{s}.input_ids"] = ids * mask
        batches[f"{s}.attention_mask"] = mask
        batches[f"{s}.image_index"] = torch.randperm(5, generator=g)[:b]
    return dict(model="clip", config=CLIP_DEBUG, trainable=sorted(n for n, _ in model.named_parameters()),
                lora=None), init, batches


def plain_loop(directory):
    """The same training written out: AdamW on the 4.39 decay groups, the cosine schedule with warmup,
    clip_grad_norm_, in the dumped order."""
    directory = Path(directory)
    spec = json.loads((directory / "spec.json").read_text())
    a = spec["args"]
    torch.manual_seed(a["seed"])
    model = build(spec)
    load_init(model, directory / "init.safetensors")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = reference_no_decay(model)
    opt = torch.optim.AdamW([{"params": [p for n, p in trainable if n not in no_decay],
                              "weight_decay": a["weight_decay"]},
                             {"params": [p for n, p in trainable if n in no_decay], "weight_decay": 0.0}],
                            lr=a["learning_rate"], betas=(a["adam_beta1"], a["adam_beta2"]), eps=a["adam_epsilon"])
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(a["warmup_ratio"] * a["max_steps"]), a["max_steps"])
    loader = DataLoader(DumpDataset(directory / "batches.safetensors", spec), batch_size=spec["batch"],
                        sampler=SequentialSampler(range(spec["steps"] * spec["batch"])), collate_fn=collator(spec))
    rec = {"loss": [], "lr": [], "grad_norm": []}
    model.train()
    for batch in loader:
        loss = model(**batch)["loss"]
        loss.backward()
        deepspeed_zero_fill(model)
        rec["grad_norm"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), a["max_grad_norm"]).item())
        rec["loss"].append(loss.item())
        rec["lr"].append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        model.zero_grad(set_to_none=True)
    return rec


def max_rel_diff(a, b):
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def selftest(root, steps=5, b=2):
    root = Path(root)
    for kind, fabricate in (("lamed", fabricate_lamed), ("clip", fabricate_clip)):
        out = root / kind
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        spec, init, batches = fabricate(steps, b)
        spec.update(args={**SELFTEST_ARGS, "max_steps": steps, "per_device_train_batch_size": b}, steps=steps,
                    batch=b)
        (out / "spec.json").write_text(json.dumps(spec))
        save_file(init, str(out / "init.safetensors"))
        save_file({k: v.contiguous() for k, v in batches.items()}, str(out / "batches.safetensors"))
        result = run(out)
        plain = plain_loop(out)
        print(f"[{kind}] trainable {len(result['trainable'])}, no decay {len(result['no_decay'])}: "
              f"{result['no_decay']}")
        for k in ("loss", "lm", "dice", "bce", "lr", "grad_norm"):
            if k in result:
                print(f"[{kind}] {k:9s} " + " ".join(f"{v:.8g}" for v in result[k]))
        diffs = {k: max_rel_diff(result[k], plain[k]) for k in plain}
        print(f"[{kind}] max relative difference Trainer vs plain loop: "
              + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
        if max(diffs.values()) > 1e-6:
            fail(f"[{kind}] the Trainer run and the plain loop differ")
        if len(set(result["loss"])) != steps:
            fail(f"[{kind}] the loss does not change between steps")
    print("selftest ok")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--selftest", action="store_true", help="fabricate dumps under DIR and check them")
    args = parser.parse_args()
    if args.selftest:
        selftest(args.dir)
    else:
        run(args.dir)


if __name__ == "__main__":
    main()
