"""Reference optimizer steps from the real implementations sd-scripts uses, for sdtune's optimizer tests.

Writes tests/fixtures/optim/goldens.safetensors: for each case the initial parameters, the gradient fed at each step,
and the parameters after each step; the cases (optimizer_type, optimizer_args as sd-scripts passes them, groups, LRs,
LR multipliers) are JSON in the file's metadata.

Needs (not in CI): torch, transformers (Adafactor), prodigyopt (Prodigy), dadaptation (DAdaptAdam), bitsandbytes
(AdamW8bit; on CPU its 8-bit blockwise update runs bitsandbytes' own pure-PyTorch reference kernel).
    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch transformers prodigyopt dadaptation bitsandbytes safetensors
    TORCHDYNAMO_DISABLE=1 /tmp/tv/bin/python tests/python/make_optimizer_goldens.py
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

import bitsandbytes as bnb
from bitsandbytes.backends.triton import kernels_optim
import dadaptation
import prodigyopt
import transformers


def _bnb_cpu_8bit(optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2,
                  absmax1, absmax2, weight_decay=0.0, gnorm_scale=1.0, skip_zeros=False):
    kernels_optim.optimizer_update_8bit_blockwise_pytorch(
        p, g, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1, absmax2,
        weight_decay, gnorm_scale, skip_zeros, optimizer_name=optimizer_name)


torch.library.register_kernel("bitsandbytes::optimizer_update_8bit_blockwise", "cpu", _bnb_cpu_8bit)

STEPS = 6
MULTIPLIERS = [1.0, 0.5, 1.0, 0.8, 0.25, 1.0]


def literal(v):
    """sd-scripts reads optimizer_args with ast.literal_eval."""
    import ast
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


# (name, optimizer_type, optimizer_args, groups: [(group name, lr, [param shapes], zero-initialised?)])
CASES = [
    ("adamw8bit", "AdamW8bit", [], [("textencoder", 5e-3, [(4, 64)], [False]),
                                    ("unet", 1e-2, [(70, 90), (64, 80), (8, 4)], [False, True, False])]),
    ("adamw8bit_args", "AdamW8bit", ["weight_decay=0.1", "betas=0.8,0.99", "eps=1e-6"],
     [("unet", 2e-2, [(4096,), (33, 200)], [False, False])]),
    ("adafactor_relative", "AdaFactor", [], [("textencoder", 0.0, [(16, 24)], [False]),
                                             ("unet", 0.0, [(8, 4, 3, 3), (32,), (4, 16)], [False, False, True])]),
    ("adafactor_manual", "AdaFactor",
     ["relative_step=False", "scale_parameter=False", "warmup_init=False", "beta1=0.9", "weight_decay=0.01"],
     [("textencoder", 1e-3, [(16, 24)], [False]), ("unet", 2e-3, [(8, 4, 3, 3), (32,), (4, 16)], [False, False, True])]),
    ("adafactor_warmup_init", "AdaFactor", ["warmup_init=True", "scale_parameter=True"],
     [("unet", 0.0, [(12, 10), (10,)], [False, False])]),
    ("prodigy", "Prodigy", [], [("textencoder", 1.0, [(4, 32)], [False]),
                                ("unet", 1.0, [(32, 4), (4, 48), (48, 4)], [True, False, True])]),
    ("prodigy_args", "Prodigy",
     ["weight_decay=0.01", "use_bias_correction=True", "safeguard_warmup=True", "d_coef=2", "betas=0.9,0.99",
      "decouple=False"],
     [("unet", 1.0, [(32, 4), (4, 48)], [True, False])]),
    ("dadaptadam", "DAdaptAdam", [], [("textencoder", 1.0, [(4, 32)], [False]),
                                      ("unet", 1.0, [(32, 4), (4, 48), (48, 4)], [True, False, True])]),
    ("dadaptadam_args", "DAdaptAdam", ["decouple=True", "weight_decay=0.01", "use_bias_correction=True"],
     [("unet", 1.0, [(32, 4), (4, 48)], [True, False])]),
]


def build(opt_type, args, groups):
    kw = {k: literal(v) for k, v in (a.split("=", 1) for a in args)}
    t = opt_type.lower()
    if t == "adamw8bit":
        return bnb.optim.AdamW8bit(groups, **kw)
    if t == "adafactor":
        # sd-scripts: relative_step defaults to True (forced by warmup_init); then lr=None and group LRs dropped
        kw.setdefault("relative_step", True)
        if kw.get("warmup_init", False):
            kw["relative_step"] = True
        if kw["relative_step"]:
            for g in groups:
                g.pop("lr", None)
            return transformers.optimization.Adafactor(groups, lr=None, **kw)
        return transformers.optimization.Adafactor(groups, **kw)
    if t == "prodigy":
        return prodigyopt.Prodigy(groups, **kw)
    if t == "dadaptadam":
        return dadaptation.DAdaptAdam(groups, **kw)
    raise ValueError(opt_type)


def main(out):
    gen = torch.Generator().manual_seed(1234)
    tensors, meta = {}, []
    for name, opt_type, args, spec in CASES:
        params, groups = [], []
        for gname, lr, shapes, zero in spec:
            ps = []
            for shape, z in zip(shapes, zero):
                init = torch.zeros(shape) if z else torch.randn(shape, generator=gen) * 0.1
                p = torch.nn.Parameter(init.clone())
                tensors[f"{name}.init.{len(params)}"] = init.clone()
                params.append(p)
                ps.append(p)
            groups.append({"params": ps, "lr": lr})
        base_lrs = [g["lr"] for g in groups]
        opt = build(opt_type, args, groups)
        for step in range(STEPS):
            for g, lr in zip(opt.param_groups, base_lrs):
                if g.get("lr") is not None:
                    g["lr"] = lr * MULTIPLIERS[step]
            for i, p in enumerate(params):
                grad = torch.randn(p.shape, generator=gen) * 0.05
                tensors[f"{name}.grad.{step}.{i}"] = grad.clone()
                p.grad = grad
            opt.step()
            for i, p in enumerate(params):
                tensors[f"{name}.after.{step}.{i}"] = p.detach().clone()
        meta.append({"name": name, "optimizer_type": opt_type, "optimizer_args": args,
                     "groups": [{"name": g, "lr": lr, "params": len(shapes)} for g, lr, shapes, _ in spec],
                     "lr_multipliers": MULTIPLIERS, "steps": STEPS})
    tensors["bnb.qmap.signed"] = bnb.functional.create_dynamic_map(signed=True)
    tensors["bnb.qmap.unsigned"] = bnb.functional.create_dynamic_map(signed=False)
    from importlib.metadata import version
    versions = {m: version(m) for m in ("torch", "transformers", "prodigyopt", "dadaptation", "bitsandbytes")}
    save_file({k: v.contiguous() for k, v in tensors.items()}, out,
              metadata={"cases": json.dumps(meta), "versions": json.dumps(versions)})
    print(f"wrote {out}: {len(tensors)} tensors; {versions}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/optim/goldens.safetensors")
