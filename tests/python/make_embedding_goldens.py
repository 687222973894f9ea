"""Reference text conditioning with textual-inversion embeddings loaded, as diffusers' `load_textual_inversion` loads
them, on the tiny SD 1.5 and SDXL fixtures.

Writes into tests/fixtures/embeddings/:
- `toy-sd15.safetensors`: an sd-scripts / A1111 embedding file (`emb_params`, 3 seeded random vectors of the tiny
  text encoder's width 32); `toy-sd15.pt`: the same vectors in A1111's pickle layout (`string_to_param: {'*': ...}`).
- `toy-sdxl.safetensors`: an SDXL embedding (`clip_l` [2, 16], `clip_g` [2, 24], as sd-scripts and diffusers write
  them for the tiny SDXL's two encoders).
- `golden.safetensors`: for each prompt `p{i}`, the ids diffusers tokenizes (`sd15.p{i}.ids`, `sdxl.p{i}.ids`) and
  the prompt embeddings it gives (`sd15.p{i}.context`: CLIPTextModel's last hidden state; `sdxl.p{i}.context`: both
  encoders' penultimate states side by side, as StableDiffusionXLPipeline.encode_prompt). The prompts are in the
  file's metadata.

Needs (not in CI): torch, diffusers, transformers, safetensors.
    /tmp/tv/bin/python tests/python/make_embedding_goldens.py
"""
import json
import os

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file
from transformers import CLIPTokenizer

FIX = "tests/fixtures"
OUT = os.path.join(FIX, "embeddings")
VOCAB = "assets/clip-tokenizer"
PROMPTS = ["a photo of toyemb on a table", "toyemb, toyemb", "toyemb in the snow, a red circle", "a plain photo"]


def tokenizer(pad):
    tok = CLIPTokenizer(os.path.join(VOCAB, "vocab.json"), os.path.join(VOCAB, "merges.txt"), pad_token=pad)
    tok.model_max_length = 77
    return tok


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(20261205)
    sd15 = torch.randn((3, 32), generator=g) * 0.02
    save_file({"emb_params": sd15}, os.path.join(OUT, "toy-sd15.safetensors"))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": sd15.clone()}, "name": "toyemb", "step": 100},
               os.path.join(OUT, "toy-sd15.pt"))
    xl_l, xl_g = torch.randn((2, 16), generator=g) * 0.02, torch.randn((2, 24), generator=g) * 0.02
    save_file({"clip_l": xl_l, "clip_g": xl_g}, os.path.join(OUT, "toy-sdxl.safetensors"))

    out = {}
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(FIX, "tiny-sd15"), tokenizer=tokenizer("<|endoftext|>"),
                                                   safety_checker=None, feature_extractor=None, torch_dtype=torch.float32,
                                                   requires_safety_checker=False)
    pipe.load_textual_inversion(os.path.join(OUT, "toy-sd15.safetensors"), token="toyemb")
    for i, p in enumerate(PROMPTS):
        text = pipe.maybe_convert_prompt(p, pipe.tokenizer)
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out[f"sd15.p{i}.ids"] = ids
        out[f"sd15.p{i}.context"] = pipe.encode_prompt(p, "cpu", 1, False)[0].detach().contiguous()

    xl = StableDiffusionXLPipeline.from_pretrained(os.path.join(FIX, "tiny-sdxl"), tokenizer=tokenizer("<|endoftext|>"),
                                                   tokenizer_2=tokenizer("!"), torch_dtype=torch.float32)
    state = {"clip_l": xl_l, "clip_g": xl_g}
    xl.load_textual_inversion(state["clip_l"], token="toyemb", text_encoder=xl.text_encoder, tokenizer=xl.tokenizer)
    xl.load_textual_inversion(state["clip_g"], token="toyemb", text_encoder=xl.text_encoder_2, tokenizer=xl.tokenizer_2)
    for i, p in enumerate(PROMPTS):
        text = xl.maybe_convert_prompt(p, xl.tokenizer)
        ids = xl.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out[f"sdxl.p{i}.ids"] = ids
        out[f"sdxl.p{i}.context"] = xl.encode_prompt(p, device="cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=False)[0].detach().contiguous()
    save_file(out, os.path.join(OUT, "golden.safetensors"), metadata={"prompts": json.dumps(PROMPTS),
                                                                        "torch": torch.__version__})


if __name__ == "__main__":
    main()
