"""PyTorch reference for `cargo bench --bench train_step`: the same tiny-sd15 LoRA training step with diffusers'
UNet2DConditionModel and transformers' CLIPTextModel (loaded from tests/fixtures/tiny-sd15), peft LoRA rank 8 /
alpha 8 on the layers sd-scripts' LoRA targets, batch 4 of 8×8 cached latents, f32, AdamW, max_grad_norm 1.
Prints a markdown row per configuration.

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch diffusers transformers peft
    /tmp/tv/bin/python benches/train_step_reference.py

`... train_step_reference.py RESOLUTION on|off` instead times UNet LoRA at RESOLUTION² with diffusers' gradient
checkpointing on or off (as `cargo bench --bench train_step -- RESOLUTION on|off`) and prints the process's peak
resident memory; run each setting in its own process.
"""
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tiny-sd15")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
torch.manual_seed(0)


def run(train_te, steps=20, warmup=4, res=64, checkpointing=None):
    unet = UNet2DConditionModel.from_pretrained(ROOT, subfolder="unet", torch_dtype=torch.float32)
    te = CLIPTextModel.from_pretrained(ROOT, subfolder="text_encoder", dtype=torch.float32)
    tok = CLIPTokenizer.from_pretrained(ROOT, subfolder="tokenizer")
    sched = DDPMScheduler.from_pretrained(ROOT, subfolder="scheduler")
    unet.requires_grad_(False)
    te.requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in training mode
    unet = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=UNET_TARGETS), unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    assert params and all(p.requires_grad for p in params)
    if train_te:
        te = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=TE_TARGETS), te)
        params += [p for n, p in te.named_parameters() if "lora_" in n]
    for p in list(unet.parameters()) + list(te.parameters()):
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = tok(["a red circle"] * 4, padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(4, 4, res // 8, res // 8)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.set_grad_enabled(train_te):
            ctx = te(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (4,))
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, ctx).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    if checkpointing is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"| {res}×{res} (PyTorch {torch.__version__}) | {'on' if checkpointing else 'off'} | "
              f"{statistics.median(times):.1f} | {peak} kB |")
        return
    name = "UNet + text-encoder LoRA" if train_te else "UNet LoRA only"
    n = sum(p.numel() for p in params)
    print(f"| {name} (PyTorch {torch.__version__}, {torch.get_num_threads()} threads, {n} LoRA weights) | {steps} | "
          f"{statistics.median(times):.1f} | {statistics.mean(times):.1f} |")


if len(sys.argv) == 3:
    print("| UNet LoRA, batch 4 | gradient checkpointing | ms / step (median of 8) | peak RSS |")
    print("|---|---|---|---|")
    run(False, steps=8, warmup=2, res=int(sys.argv[1]), checkpointing=sys.argv[2] == "on")
else:
    print("| configuration | steps | ms / step (median) | ms / step (mean) |")
    print("|---|---|---|---|")
    for train_te in (False, True):
        run(train_te)
