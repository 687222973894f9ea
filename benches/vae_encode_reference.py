"""PyTorch reference for benches/vae_encode.rhai: diffusers' AutoencoderKL from tests/fixtures/tiny-sd15, one
448×576 image, f32, median of 7 after a warm-up, on the CPU.
    /tmp/tv/bin/python benches/vae_encode_reference.py"""
import os, statistics, time
import torch
from diffusers import AutoencoderKL

root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tiny-sd15")
vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32).eval()
x = torch.randn(1, 3, 448, 576, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    vae.encode(x)
    ts = []
    for _ in range(7):
        t = time.perf_counter(); vae.encode(x); ts.append((time.perf_counter() - t) * 1000)
print(f"| PyTorch {torch.__version__} ({torch.get_num_threads()} threads) | {statistics.median(ts):.1f} ms |")
