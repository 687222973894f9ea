"""Reference bilinear resizes from PyTorch for sdtune's multi-resolution (pyramid) noise, which upsamples each
noise level as sd-scripts does with `torch.nn.Upsample(size=..., mode="bilinear")` (align_corners=False).

Writes tests/fixtures/noise/bilinear.safetensors: for each case `N`, the input `N.x` ([B, C, h, w], seeded normal
draws) and `N.y`, the resize to the case's size; the sizes are in the file's metadata as JSON.

Needs (not in CI): torch, safetensors.
    /tmp/tv/bin/python tests/python/make_noise_goldens.py [OUT_DIR]
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

# (input shape, output size): pyramid levels of a 64×64 latent (r ≈ 2.7), odd and uneven sides, a 1-pixel level
# and a downscale.
CASES = [
    ((1, 2, 23, 23), (64, 64)),
    ((1, 1, 8, 8), (64, 64)),
    ((1, 3, 5, 7), (16, 13)),
    ((2, 2, 1, 1), (9, 6)),
    ((1, 2, 3, 1), (10, 4)),
    ((1, 2, 12, 10), (5, 7)),
]


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/noise"
    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(20261205)
    tensors, meta = {}, {}
    for i, (shape, size) in enumerate(CASES):
        x = torch.randn(shape, generator=g)
        y = torch.nn.Upsample(size=size, mode="bilinear")(x)
        tensors[f"{i}.x"], tensors[f"{i}.y"] = x.contiguous(), y.contiguous()
        meta[str(i)] = list(size)
    save_file(tensors, os.path.join(out_dir, "bilinear.safetensors"),
              metadata={"cases": json.dumps(meta), "torch": torch.__version__})


if __name__ == "__main__":
    main()
