"""PyTorch reference for `cargo bench --bench train_step`: the same tiny-sd15 LoRA training step with diffusers'
UNet2DConditionModel and transformers' CLIPTextModel (loaded from tests/fixtures/tiny-sd15), peft LoRA rank 8 /
alpha 8 on the layers sd-scripts' LoRA targets, batch 4 of 8×8 cached latents, f32, AdamW, max_grad_norm 1.
Prints a markdown row per configuration.

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch diffusers transformers peft
    /tmp/tv/bin/python benches/train_step_reference.py

`... train_step_reference.py sdxl` times the same step on tiny-sdxl (diffusers' SDXL UNet with its added
conditioning, transformers' CLIPTextModel and CLIPTextModelWithProjection, LoRA on both text encoders).

`... train_step_reference.py ft` times full fine-tuning instead (train_db.py's step: every UNet and text-encoder
weight trained, AdamW, same batch), as `cargo bench --bench train_step -- ft`.

`... train_step_reference.py loha` (or `lokr`, `locon`) times a LyCORIS network (lycoris-lora's `lycoris.kohya`, dim 8
/ alpha 8, preset `attn-mlp`) on the UNet and the text encoder, as `cargo bench --bench train_step -- loha`.

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
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
ROOT = os.path.join(FIXTURES, "tiny-sd15")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
torch.manual_seed(0)


def load_sd15():
    """tiny-sd15's UNet, text encoder, tokenizer and noise schedule, in f32."""
    unet = UNet2DConditionModel.from_pretrained(ROOT, subfolder="unet", torch_dtype=torch.float32)
    te = CLIPTextModel.from_pretrained(ROOT, subfolder="text_encoder", dtype=torch.float32)
    tok = CLIPTokenizer.from_pretrained(ROOT, subfolder="tokenizer")
    sched = DDPMScheduler.from_pretrained(ROOT, subfolder="scheduler")
    return unet, te, tok, sched


def timed_steps(forward, params, latents, sched, opt, steps, warmup):
    """Times `warmup + steps` LoRA steps; `forward(noisy, t)` returns the prediction. Returns the last `steps` in ms."""
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],))
        noisy = sched.add_noise(latents, noise, t)
        loss = F.mse_loss(forward(noisy, t), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    return times


def run(train_te, steps=20, warmup=4, res=64, checkpointing=None):
    unet, te, tok, sched = load_sd15()
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

    def forward(noisy, t):
        with torch.set_grad_enabled(train_te):
            ctx = te(ids)[0]
        return unet(noisy, t, ctx).sample

    times = timed_steps(forward, params, latents, sched, opt, steps, warmup)
    if checkpointing is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"| {res}×{res} (PyTorch {torch.__version__}) | {'on' if checkpointing else 'off'} | "
              f"{statistics.median(times):.1f} | {peak} kB |")
        return
    name = "UNet + text-encoder LoRA" if train_te else "UNet LoRA only"
    n = sum(p.numel() for p in params)
    print(f"| {name} (PyTorch {torch.__version__}, {torch.get_num_threads()} threads, {n} LoRA weights) | {steps} | "
          f"{statistics.median(times):.1f} | {statistics.mean(times):.1f} |")


def run_sdxl(train_te, steps=20, warmup=4):
    root = os.path.join(FIXTURES, "tiny-sdxl")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch.float32)
    te1 = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=torch.float32)
    te2 = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", dtype=torch.float32)
    sched = DDPMScheduler.from_pretrained(ROOT, subfolder="scheduler")
    for m in (unet, te1, te2):
        m.requires_grad_(False)
    unet = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=UNET_TARGETS), unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if train_te:
        te1 = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=TE_TARGETS), te1)
        te2 = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=TE_TARGETS), te2)
        params += [p for m in (te1, te2) for n, p in m.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    golden = load_file(os.path.join(root, "golden.safetensors"))
    ids1 = golden["te.in.input_ids_1"].repeat(2, 1)
    ids2 = golden["te.in.input_ids_2"].repeat(2, 1)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 4)
    latents = torch.randn(4, 4, 8, 8)

    def forward(noisy, t):
        with torch.set_grad_enabled(train_te):
            o1 = te1(ids1, output_hidden_states=True)
            o2 = te2(ids2, output_hidden_states=True)
            ctx = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
            pooled = o2.text_embeds
        return unet(noisy, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    times = timed_steps(forward, params, latents, sched, opt, steps, warmup)
    name = "UNet + text-encoder LoRA" if train_te else "UNet LoRA only"
    n = sum(p.numel() for p in params)
    print(f"| {name} (tiny-sdxl, PyTorch {torch.__version__}, {torch.get_num_threads()} threads, {n} LoRA weights) | "
          f"{steps} | {statistics.median(times):.1f} | {statistics.mean(times):.1f} |")


def run_ft(steps=20, warmup=4):
    unet, te, tok, sched = load_sd15()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = tok(["a red circle"] * 4, padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(4, 4, 8, 8)
    times = timed_steps(lambda noisy, t: unet(noisy, t, te(ids)[0]).sample, params, latents, sched, opt, steps,
                        warmup)
    n = sum(p.numel() for p in params)
    print(f"| full fine-tuning (PyTorch {torch.__version__}, {torch.get_num_threads()} threads, {n} weights) | "
          f"{steps} | {statistics.median(times):.1f} | {statistics.mean(times):.1f} |")


def run_lycoris(algo, steps=20, warmup=4):
    import lycoris.kohya as lk

    unet, te, tok, sched = load_sd15()
    unet.requires_grad_(False)
    te.requires_grad_(False)
    holder = torch.nn.Module()  # sd-scripts' (transformers 4) module names: text_model.encoder...
    holder.text_model = te
    net = lk.create_network(1.0, 8, 8.0, None, holder, unet, algo=algo, preset="attn-mlp")
    net.apply_to(holder, unet, apply_text_encoder=True, apply_unet=True)
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = tok(["a red circle"] * 4, padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(4, 4, 8, 8)
    times = timed_steps(lambda noisy, t: unet(noisy, t, te(ids)[0]).sample, params, latents, sched, opt, steps,
                        warmup)
    n = sum(p.numel() for p in params)
    import importlib.metadata
    version = importlib.metadata.version("lycoris-lora")
    print(f"| LyCORIS {algo} (PyTorch {torch.__version__}, lycoris-lora {version}, {torch.get_num_threads()} threads, "
          f"{n} weights) | {steps} | {statistics.median(times):.1f} | {statistics.mean(times):.1f} |")


if sys.argv[1:2] and sys.argv[1] in ("loha", "lokr", "locon"):
    print("| configuration | steps | ms / step (median) | ms / step (mean) |")
    print("|---|---|---|---|")
    run_lycoris(sys.argv[1])
elif sys.argv[1:] == ["ft"]:
    print("| configuration | steps | ms / step (median) | ms / step (mean) |")
    print("|---|---|---|---|")
    run_ft()
elif sys.argv[1:] == ["sdxl"]:
    print("| configuration | steps | ms / step (median) | ms / step (mean) |")
    print("|---|---|---|---|")
    for train_te in (False, True):
        run_sdxl(train_te)
elif len(sys.argv) == 3:
    print("| UNet LoRA, batch 4 | gradient checkpointing | ms / step (median of 8) | peak RSS |")
    print("|---|---|---|---|")
    run(False, steps=8, warmup=2, res=int(sys.argv[1]), checkpointing=sys.argv[2] == "on")
else:
    print("| configuration | steps | ms / step (median) | ms / step (mean) |")
    print("|---|---|---|---|")
    for train_te in (False, True):
        run(train_te)
