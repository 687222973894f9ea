"""PyTorch reference for `cargo bench --bench ops`: the same convolutions and attentions, forward and forward +
backward with a frozen kernel (gradient of the input only), median of 9 (conv) / 5 (attention) runs after 2
warm-ups (synchronised on CUDA), torch's default thread count; cuDNN autotuning (`cudnn.benchmark`) and SDPA on
CUDA. Prints a markdown table.

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch
    /tmp/tv/bin/python benches/ops_reference.py [DEVICE cpu|cuda] [DTYPE f32|bf16] [SIZE small|sd15]
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

torch.manual_seed(0)
args = sys.argv[1:]
DEV = args[0] if len(args) > 0 else "cpu"
DTYPE = {"f32": torch.float32, "bf16": torch.bfloat16}[args[1] if len(args) > 1 else "f32"]
SIZE = args[2] if len(args) > 2 else "small"
torch.backends.cudnn.benchmark = True


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def median_ms(n, f):
    f()
    f()
    t = []
    for _ in range(n):
        sync()
        s = time.perf_counter()
        f()
        sync()
        t.append((time.perf_counter() - s) * 1000)
    return statistics.median(t)


def randn(*shape, std=1.0, grad=False):
    return (torch.randn(*shape, device=DEV) * std).to(DTYPE).requires_grad_(grad)


def conv(name, x, w, p, s):
    x, w = randn(*x, grad=True), randn(*w, std=0.1)

    def fwd():
        with torch.no_grad():
            F.conv2d(x, w, padding=p, stride=s)

    def both():
        F.conv2d(x, w, padding=p, stride=s).float().sum().backward()

    print(f"| {name} | {median_ms(9, fwd):.3f} | {median_ms(9, both):.3f} |")


def attention(name, b, sq, sk, c, heads):
    q, k, v = (randn(b, s, c, grad=True) for s in (sq, sk, sk))

    def run():
        split = lambda t: t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return o.transpose(1, 2).reshape(b, sq, c)

    def fwd():
        with torch.no_grad():
            run()

    def both():
        run().float().sum().backward()

    print(f"| {name} | {median_ms(5, fwd):.3f} | {median_ms(5, both):.3f} |")


print(f"| op ({DTYPE}, {DEV}, torch {torch.__version__}, {torch.get_num_threads()} threads) | PyTorch fwd ms | PyTorch fwd+bwd ms |")
print("|---|---|---|")
if SIZE == "sd15":
    conv("conv 3×3, 320→320 ch, [4,320,64,64]", (4, 320, 64, 64), (320, 320, 3, 3), 1, 1)
    conv("conv 3×3 stride 2, 320→320 ch, [4,320,64,64]", (4, 320, 64, 64), (320, 320, 3, 3), 1, 2)
    conv("conv 3×3, 1280→1280 ch, [4,1280,8,8]", (4, 1280, 8, 8), (1280, 1280, 3, 3), 1, 1)
    conv("conv 1×1, 640→320 ch, [4,640,64,64]", (4, 640, 64, 64), (320, 640, 1, 1), 0, 1)
    attention("self-attention, 8 heads, [4,4096,320]", 4, 4096, 4096, 320, 8)
    attention("cross-attention, 8 heads, 4096→77, width 320", 4, 4096, 77, 320, 8)
else:
    conv("conv 3×3, 64→64 ch, [2,64,32,32]", (2, 64, 32, 32), (64, 64, 3, 3), 1, 1)
    conv("conv 3×3 stride 2, 64→64 ch, [2,64,32,32]", (2, 64, 32, 32), (64, 64, 3, 3), 1, 2)
    conv("conv 1×1, 128→64 ch, [2,128,32,32]", (2, 128, 32, 32), (64, 128, 1, 1), 0, 1)
    attention("self-attention, 8 heads, [2,512,64]", 2, 512, 512, 64, 8)
    attention("self-attention, 8 heads, [2,256,64]", 2, 256, 256, 64, 8)
    attention("cross-attention, 8 heads, 512→77, width 64", 2, 512, 77, 64, 8)
