"""Reference textual-inversion steps (sd-scripts' train_textual_inversion.py step) on the tiny SD 1.5 fixture, with
diffusers' UNet2DConditionModel and transformers' CLIPTextModel in f32.

Two tokens are added after the vocabulary (ids 49408, 49409, the word `toyword` with num_vectors_per_token 2),
their rows initialised from `init_word` "red circle"'s token embeddings (as sd-scripts: row i from init token
i mod len); only those rows train (sd-scripts restores the others after each step): noisy =
DDPMScheduler(0.00085, 0.012, scaled_linear).add_noise(latents, noise, t); loss = mse(unet(noisy, t,
text_encoder(ids)[0]), noise); backward; clip_grad_norm_ over the whole token-embedding table (every row's
gradient, as sd-scripts clips `get_input_embeddings().parameters()`) to MAX_NORM, chosen so that clipping acts at
every step; torch.optim.SGD(lr, momentum=0.9, nesterov=True) on the table, the other rows restored after each step.

Writes tests/fixtures/finetune/ti_steps.safetensors: the batches (`b{i}.latents`, `.noise`, `.input_ids` with the
new ids, `.timesteps`), the per-step losses, and the two rows before (`rows.start`) and after (`rows.end`).

Needs (not in CI): torch, diffusers, transformers, safetensors.
    /tmp/tv/bin/python tests/python/make_ti_goldens.py
"""
import json
import os

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel

FIX = "tests/fixtures/tiny-sd15"
LR = 30.0
STEPS = 4
MAX_NORM = 0.01
WORD = [49408, 49409]
INIT = [736, 7117]  # "red circle"
# "a photo of toyword" and "toyword on a table"
PROMPTS = [[320, 1125, 539] + WORD, WORD + [525, 320, 2175]]


def ids(tokens):
    row = [49406] + tokens + [49407]
    return row + [49407] * (77 - len(row))


def main():
    unet = UNet2DConditionModel.from_pretrained(os.path.join(FIX, "unet"), torch_dtype=torch.float32)
    te = CLIPTextModel.from_pretrained(os.path.join(FIX, "text_encoder"), torch_dtype=torch.float32)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    te.resize_token_embeddings(49410)
    table = te.get_input_embeddings().weight
    with torch.no_grad():
        for i, t in enumerate(WORD):
            table[t] = table[INIT[i % len(INIT)]]
    start = table[WORD].detach().clone()
    table.requires_grad_(True)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, clip_sample=False)
    g = torch.Generator().manual_seed(20261206)
    batches = []
    for i, ts in enumerate([[100, 700], [400, 250]]):
        batches.append({
            "latents": torch.randn((2, 4, 8, 8), generator=g),
            "noise": torch.randn((2, 4, 8, 8), generator=g),
            "input_ids": torch.tensor([ids(PROMPTS[i % 2]), ids(PROMPTS[(i + 1) % 2])], dtype=torch.int64),
            "timesteps": torch.tensor(ts, dtype=torch.int64),
        })
    opt = torch.optim.SGD([table], lr=LR, momentum=0.9, nesterov=True)
    keep = torch.ones(table.shape[0], dtype=torch.bool)
    keep[WORD] = False
    frozen = table[keep].detach().clone()
    losses = []
    for step in range(STEPS):
        b = batches[step % 2]
        noisy = sched.add_noise(b["latents"], b["noise"], b["timesteps"])
        pred = unet(noisy, b["timesteps"], te(b["input_ids"])[0]).sample
        loss = torch.nn.functional.mse_loss(pred.float(), b["noise"].float(), reduction="none").mean([1, 2, 3]).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([table], MAX_NORM)
        new_norm = table.grad[WORD].norm().item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            table[keep] = frozen  # sd-scripts' index_no_updates
        losses.append(loss.item())
        print(f"step {step + 1}: loss {loss.item():.7f}, table gradient norm {norm.item():.4f} (new rows' {new_norm:.4f})")
    end = table[WORD].detach().clone()
    print("rows moved up to", (end - start).abs().max().item())
    out = {f"b{i}.{k}": v.contiguous() for i, b in enumerate(batches) for k, v in b.items()}
    out.update({"losses": torch.tensor(losses, dtype=torch.float64), "rows.start": start, "rows.end": end})
    save_file(out, "tests/fixtures/finetune/ti_steps.safetensors",
              metadata={"lr": json.dumps(LR), "steps": json.dumps(STEPS), "max_grad_norm": json.dumps(MAX_NORM),
                        "torch": torch.__version__})


if __name__ == "__main__":
    main()
