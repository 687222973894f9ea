"""Loads an SDXL LoRA that sdtune trained (tests/python/make_sdxl_lora.rhai) into diffusers' StableDiffusionXLPipeline
with `load_lora_weights` and records diffusers' outputs on the tiny-sdxl golden inputs, so that a test can check that
sdtune's files mean the same thing in diffusers as in sdtune.

usage: python tests/python/check_sdxl_lora_in_diffusers.py TINY_SDXL_DIFFUSERS_FOLDER LORA.safetensors OUT.safetensors
(the folder with tokenizers: the project's shared fixtures/tiny-sdxl; needs torch, diffusers, peft; not run in CI)
"""

import json
import sys

import diffusers
import peft
import torch
import transformers
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

folder, lora, out = sys.argv[1:4]
torch.set_grad_enabled(False)
pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
golden = load_file(f"{folder}/golden.safetensors")
pipe.load_lora_weights(lora, adapter_name="sdtune")

results = {}
for scale in (1.0, 0.5):
    pipe.set_adapters(["sdtune"], adapter_weights=[scale])
    tag = f"m{scale:.1f}"
    ids1, ids2 = golden["te.in.input_ids_1"], golden["te.in.input_ids_2"]
    te1 = pipe.text_encoder(ids1, output_hidden_states=True)
    te2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
    results[f"{tag}.te.out.prompt_embeds"] = torch.cat([te1.hidden_states[-2], te2.hidden_states[-2]], dim=-1)
    results[f"{tag}.te.out.te2.text_embeds"] = te2.text_embeds
    results[f"{tag}.unet.out.noise_pred"] = pipe.unet(
        golden["unet.in.sample"],
        golden["unet.in.timesteps"],
        encoder_hidden_states=golden["unet.in.encoder_hidden_states"],
        added_cond_kwargs={"text_embeds": golden["unet.in.text_embeds"], "time_ids": golden["unet.in.time_ids"]},
    ).sample
pipe.set_adapters(["sdtune"], adapter_weights=[0.0])
base = pipe.unet(
    golden["unet.in.sample"],
    golden["unet.in.timesteps"],
    encoder_hidden_states=golden["unet.in.encoder_hidden_states"],
    added_cond_kwargs={"text_embeds": golden["unet.in.text_embeds"], "time_ids": golden["unet.in.time_ids"]},
).sample
effect = (results["m1.0.unet.out.noise_pred"] - base).abs().max().item()
meta = {
    "made_by": "tests/python/check_sdxl_lora_in_diffusers.py",
    "versions": json.dumps(
        {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
         "peft": peft.__version__}
    ),
    "lora_effect_unet_maxabs_m1": str(effect),
}
save_file({k: v.contiguous() for k, v in results.items()}, out, metadata=meta)
print(f"wrote {out}: {len(results)} tensors; the LoRA moves the UNet output by up to {effect:.4g}")
