"""Oracle for worker/src/{optim,schedule,grad}.rs: torch.optim.AdamW (decoupled weight decay, two parameter
groups), torch.nn.utils.clip_grad_norm_, and transformers' cosine schedule with the Trainer's warmup steps.

usage: optim_oracle.py OUT
writes OUT/io.safetensors:
  sched.<i>.total, sched.<i>.warmup (int64), sched.<i>.ratio (f64), sched.<i>.lrs (f64, lr before each of
    total + 3 optimizer steps from LambdaLR(get_cosine_schedule_with_warmup), base lr 3e-4)
  <case>.init.<p>, <case>.grad.<t>.<p> (gradient of step t before clipping), <case>.norm (f32, norm per
    step), <case>.clipped.<t>.<p>, <case>.lr (f64, lr per step), <case>.final.<p>, <case>.exp_avg.<p>,
    <case>.exp_avg_sq.<p>, and for case bf16 also <case>.master.<p>
  case f32: f32 parameters; case bf16: bf16 parameters with f32 master weights (DeepSpeed's bf16 mode):
    the optimizer steps the masters with the bf16 gradients cast to f32, the parameters get the rounded
    masters.
Parameter groups: `decay` = [w, emb] with weight_decay 0.1, `no_decay` = [b, ln.weight] with 0.
AdamW betas (0.9, 0.95), eps 1e-8; 6 steps with lr from the cosine schedule (base 1e-2, warmup ratio 0.2),
gradients clipped to norm 1.0 (steps alternate between norms below and above it).
"""

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainingArguments, get_cosine_schedule_with_warmup

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
io = {}

# --- schedule -------------------------------------------------------------------------------------------
CASES = [(100, 0.03), (100, 0.07), (10, 0.1), (1000, 0.03), (7, 0.5), (50, 0.0), (3, 0.9), (29, 0.13)]
with tempfile.TemporaryDirectory() as tmp:
    for i, (total, ratio) in enumerate(CASES):
        args = TrainingArguments(output_dir=tmp, warmup_steps=ratio, report_to=[])
        warmup = args.get_warmup_steps(total)
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=3e-4)
        sched = get_cosine_schedule_with_warmup(opt, warmup, total)
        lrs = []
        for _ in range(total + 3):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        io[f"sched.{i}.total"] = torch.tensor(total, dtype=torch.int64)
        io[f"sched.{i}.warmup"] = torch.tensor(warmup, dtype=torch.int64)
        io[f"sched.{i}.ratio"] = torch.tensor(ratio, dtype=torch.float64)
        io[f"sched.{i}.lrs"] = torch.tensor(lrs, dtype=torch.float64)

# --- AdamW + clipping -----------------------------------------------------------------------------------
SHAPES = {"w": (4, 3), "emb": (6, 2), "b": (3,), "ln.weight": (5,)}
DECAY, NO_DECAY = ["w", "emb"], ["b", "ln.weight"]
STEPS = 6
g = torch.Generator().manual_seed(0)
init = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
grads = [
    {k: torch.randn(s, generator=g) * (0.05 if t % 2 == 0 else 3.0) for k, s in SHAPES.items()}
    for t in range(STEPS)
]

for case in ["f32", "bf16"]:
    if case == "f32":
        params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
        masters = params
    else:
        params = {k: v.to(torch.bfloat16) for k, v in init.items()}
        masters = {k: torch.nn.Parameter(v.float()) for k, v in params.items()}
    for k, v in params.items():
        io[f"{case}.init.{k}"] = v.detach().clone().contiguous()
    opt = torch.optim.AdamW(
        [
            {"params": [masters[k] for k in DECAY], "weight_decay": 0.1},
            {"params": [masters[k] for k in NO_DECAY], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    sched = get_cosine_schedule_with_warmup(opt, 2, STEPS)  # ceil(0.2 * 6) = 2
    order = DECAY + NO_DECAY
    norms, lrs = [], []
    for t in range(STEPS):
        for k in order:
            gt = grads[t][k] if case == "f32" else grads[t][k].to(torch.bfloat16)
            io[f"{case}.grad.{t}.{k}"] = gt.clone().contiguous()
            masters[k].grad = gt.float().clone()
        norms.append(torch.nn.utils.clip_grad_norm_([masters[k] for k in order], 1.0))
        for k in order:
            io[f"{case}.clipped.{t}.{k}"] = masters[k].grad.clone()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if case == "bf16":
            for k in order:
                params[k].copy_(masters[k].detach().to(torch.bfloat16))
    io[f"{case}.norm"] = torch.stack(norms)
    io[f"{case}.lr"] = torch.tensor(lrs, dtype=torch.float64)
    for k in order:
        st = opt.state[masters[k]]
        io[f"{case}.final.{k}"] = params[k].detach().clone().contiguous()
        io[f"{case}.exp_avg.{k}"] = st["exp_avg"].clone()
        io[f"{case}.exp_avg_sq.{k}"] = st["exp_avg_sq"].clone()
        if case == "bf16":
            io[f"{case}.master.{k}"] = masters[k].detach().clone()

save_file(io, str(out / "io.safetensors"))
print("ok")
