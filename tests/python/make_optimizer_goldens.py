"""Reference optimizer steps from the real implementations sd-scripts uses, for sdtune's optimizer tests.

Writes tests/fixtures/optim/goldens.safetensors (AdamW8bit, AdaFactor, Prodigy, DAdaptAdam) and adamw.safetensors
(torch.optim.AdamW, also after torch.nn.utils.clip_grad_norm_ where a case gives max_grad_norm, as sd-scripts
clips): for each case the initial parameters, the gradient fed at each step, and the parameters after each step;
the cases (optimizer_type, optimizer_args as sd-scripts passes them, groups, LRs, LR multipliers, max_grad_norm)
are JSON in each file's metadata.

Needs (not in CI): torch, transformers (Adafactor), prodigyopt (Prodigy), dadaptation (DAdaptAdam), bitsandbytes
(AdamW8bit; on CPU its 8-bit blockwise update runs bitsandbytes' own pure-PyTorch reference kernel).
    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch transformers prodigyopt dadaptation bitsandbytes safetensors
    TORCHDYNAMO_DISABLE=1 /tmp/tv/bin/python tests/python/make_optimizer_goldens.py [OUT_DIR]
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

# torch.optim.AdamW: (name, optimizer_args, max_grad_norm or None, groups)
ADAMW_CASES = [
    ("adamw_default", [], None, [("textencoder", 5e-3, [(4, 8)], [False]),
                                 ("unet", 1e-2, [(8, 12), (16, 4), (4, 4)], [False, True, False])]),
    ("adamw_args", ["weight_decay=0.1", "betas=0.8,0.99", "eps=1e-6"], None,
     [("unet", 2e-2, [(100,), (8, 12)], [False, False])]),
    # the gradients' global norm is ≈ 0.05·√208 ≈ 0.7: clipped to 0.3 at every step
    ("adamw_clip", [], 0.3, [("textencoder", 5e-3, [(4, 8)], [False]),
                             ("unet", 1e-2, [(8, 12), (16, 4), (4, 4)], [False, True, False])]),
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
    if t == "adamw":
        return torch.optim.AdamW(groups, **kw)
    raise ValueError(opt_type)


def run_case(gen, tensors, name, opt_type, args, spec, max_norm=None):
    """Records one case's initial parameters, gradients and parameters after each step; returns its metadata."""
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
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        for i, p in enumerate(params):
            tensors[f"{name}.after.{step}.{i}"] = p.detach().clone()
    return {"name": name, "optimizer_type": opt_type, "optimizer_args": args, "max_grad_norm": max_norm,
            "groups": [{"name": g, "lr": lr, "params": len(shapes)} for g, lr, shapes, _ in spec],
            "lr_multipliers": MULTIPLIERS, "steps": STEPS}


def main(out_dir):
    from importlib.metadata import version
    gen = torch.Generator().manual_seed(1234)
    tensors = {}
    meta = [run_case(gen, tensors, name, opt_type, args, spec) for name, opt_type, args, spec in CASES]
    tensors["bnb.qmap.signed"] = bnb.functional.create_dynamic_map(signed=True)
    tensors["bnb.qmap.unsigned"] = bnb.functional.create_dynamic_map(signed=False)
    versions = {m: version(m) for m in ("torch", "transformers", "prodigyopt", "dadaptation", "bitsandbytes")}
    save(os.path.join(out_dir, "goldens.safetensors"), tensors, meta, versions)
    gen = torch.Generator().manual_seed(4321)
    tensors = {}
    meta = [run_case(gen, tensors, name, "AdamW", args, spec, max_norm) for name, args, max_norm, spec in ADAMW_CASES]
    save(os.path.join(out_dir, "adamw.safetensors"), tensors, meta, {"torch": version("torch")})


def save(out, tensors, meta, versions):
    save_file({k: v.contiguous() for k, v in tensors.items()}, out,
              metadata={"cases": json.dumps(meta), "versions": json.dumps(versions)})
    print(f"wrote {out}: {len(tensors)} tensors; {versions}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/optim")
