"""Checks that an .npz latent cache written by sdtune loads with numpy the way sd-scripts reads it
(`load_latents_from_disk`: npz["latents"], npz["original_size"].tolist(), npz["crop_ltrb"].tolist(),
npz["latents_flipped"], npz["alpha_mask"]). Run by .ci/run after the test suite wrote the file.

usage: python check_npz.py FILE.npz
"""
import sys

import numpy as np

npz = np.load(sys.argv[1])
latents = npz["latents"]
assert latents.dtype == np.float32 and latents.shape == (4, 8, 12), (latents.dtype, latents.shape)
assert npz["original_size"].tolist() == [100, 64], npz["original_size"]
assert npz["crop_ltrb"].tolist() == [0.0, 1.0, 96.0, 62.0], npz["crop_ltrb"]
flipped = npz["latents_flipped"]
assert flipped.shape == latents.shape
assert np.allclose(latents[0, 0, :3], [0.5, 1.5, 2.5]), latents[0, 0, :3]
mask = npz["alpha_mask"]  # sd-scripts' alpha_mask: [H, W] float32 in [0, 1] at pixel resolution
assert mask.dtype == np.float32 and mask.shape == (64, 96) and np.allclose(mask, 0.25), (mask.dtype, mask.shape)
print(f"{sys.argv[1]}: numpy reads the sdtune latent cache as sd-scripts expects")
