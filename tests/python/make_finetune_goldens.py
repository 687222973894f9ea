"""Reference full fine-tuning steps (sd-scripts' train_db.py step) on the tiny SD 1.5 fixture, with diffusers'
UNet2DConditionModel and transformers' CLIPTextModel in f32: the UNet and the text encoder train together.

Per step, as train_db.py: noisy = DDPMScheduler(0.00085, 0.012, scaled_linear).add_noise(latents, noise, t);
context = text_encoder(input_ids)[0]; loss = mse(unet(noisy, t, context), noise) (per-sample mean, then batch mean);
backward; clip_grad_norm_(unet + text encoder parameters, 1.0); torch.optim.SGD(lr, momentum=0.9, nesterov=True)
(sd-scripts' SGDNesterov). SGD rather than Adam so that the weights move linearly in the gradients (Adam's
normalised update turns float noise in near-zero gradients into full-size steps).

Writes tests/fixtures/finetune/sgd_steps.safetensors: the batches (`b{i}.latents`, `.noise`, `.input_ids`,
`.timesteps`), the per-step losses (`losses`), and the weights after the last step under `unet.<name>` and
`text_encoder.<name>` (diffusers/transformers names), except the token embedding, of which only the rows of the
ids used are kept (`text_encoder.token_rows`, rows `text_encoder.token_ids`): the other rows get no gradient.

Needs (not in CI): torch, diffusers, transformers, safetensors.
    /tmp/tv/bin/python tests/python/make_finetune_goldens.py [FIXTURE_DIR] [OUT_DIR]
"""
import json
import os
import sys

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel

LR = 0.05
STEPS = 4
# "a photo of a cat" and "a red circle" (CLIP BPE ids), padded with <|endoftext|> as SD 1.x pads
PROMPTS = [[320, 1125, 539, 320, 2368], [320, 736, 7117]]


def ids(tokens):
    row = [49406] + tokens + [49407]
    return row + [49407] * (77 - len(row))


def main():
    fixture = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/tiny-sd15"
    out_dir = sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/finetune"
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(fixture, "unet"), torch_dtype=torch.float32)
    te = CLIPTextModel.from_pretrained(os.path.join(fixture, "text_encoder"), torch_dtype=torch.float32)
    unet.train()
    te.train()
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, clip_sample=False)
    g = torch.Generator().manual_seed(20261205)
    batches = []
    for i, ts in enumerate([[10, 900], [500, 250]]):
        batches.append({
            "latents": torch.randn((2, 4, 8, 8), generator=g),
            "noise": torch.randn((2, 4, 8, 8), generator=g),
            "input_ids": torch.tensor([ids(PROMPTS[i % 2]), ids(PROMPTS[(i + 1) % 2])], dtype=torch.int64),
            "timesteps": torch.tensor(ts, dtype=torch.int64),
        })
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9, nesterov=True)
    losses = []
    for step in range(STEPS):
        b = batches[step % len(batches)]
        noisy = sched.add_noise(b["latents"], b["noise"], b["timesteps"])
        context = te(b["input_ids"])[0]
        pred = unet(noisy, b["timesteps"], context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), b["noise"].float(), reduction="none")
        loss = loss.mean([1, 2, 3]).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {step + 1}: loss {loss.item():.6f}, gradient norm {norm.item():.4f}")
    out = {}
    for i, b in enumerate(batches):
        for k, v in b.items():
            out[f"b{i}.{k}"] = v.contiguous()
    out["losses"] = torch.tensor(losses, dtype=torch.float64)
    for k, v in unet.state_dict().items():
        out[f"unet.{k}"] = v.detach().contiguous()
    used = sorted({t for b in batches for t in b["input_ids"].flatten().tolist()})
    for k, v in te.state_dict().items():
        # transformers 5 names the state without the `text_model.` prefix its files (and sdtune) use
        k = k if k.startswith("text_model.") else f"text_model.{k}"
        if k == "text_model.embeddings.token_embedding.weight":
            out["text_encoder.token_ids"] = torch.tensor(used, dtype=torch.int64)
            out["text_encoder.token_rows"] = v.detach()[used].contiguous()
        elif k != "text_model.embeddings.position_ids":
            out[f"text_encoder.{k}"] = v.detach().contiguous()
    meta = {"lr": json.dumps(LR), "steps": json.dumps(STEPS), "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__, "transformers": __import__("transformers").__version__}
    save_file(out, os.path.join(out_dir, "sgd_steps.safetensors"), metadata=meta)


if __name__ == "__main__":
    main()
