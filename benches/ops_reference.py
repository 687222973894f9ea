"""PyTorch reference for `cargo bench --bench ops`: the same convolutions and attentions, f32 on the CPU, forward
and forward + backward with a frozen kernel (gradient of the input only), median of 9 (conv) / 5 (attention) runs
after 2 warm-ups, torch's default thread count. Prints a markdown table.

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch
    /tmp/tv/bin/python benches/ops_reference.py
"""
import statistics
import time

import torch
import torch.nn.functional as F

torch.manual_seed(0)


def median_ms(n, f):
    f()
    f()
    t = []
    for _ in range(n):
        s = time.perf_counter()
        f()
        t.append((time.perf_counter() - s) * 1000)
    return statistics.median(t)


def conv(name, x, w, p, s):
    x = torch.randn(*x, requires_grad=True)
    w = torch.randn(*w) * 0.1

    def fwd():
        with torch.no_grad():
            F.conv2d(x, w, padding=p, stride=s)

    def both():
        F.conv2d(x, w, padding=p, stride=s).sum().backward()

    print(f"| {name} | {median_ms(9, fwd):.2f} | {median_ms(9, both):.2f} |")


def attention(name, b, sq, sk, c, heads):
    q, k, v = (torch.randn(b, s, c, requires_grad=True) for s in (sq, sk, sk))

    def run():
        split = lambda t: t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return o.transpose(1, 2).reshape(b, sq, c)

    def fwd():
        with torch.no_grad():
            run()

    def both():
        run().sum().backward()

    print(f"| {name} | {median_ms(5, fwd):.2f} | {median_ms(5, both):.2f} |")


print(f"| op (f32, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads) | PyTorch fwd ms | PyTorch fwd+bwd ms |")
print("|---|---|---|")
conv("conv 3×3, 64→64 ch, [2,64,32,32]", (2, 64, 32, 32), (64, 64, 3, 3), 1, 1)
conv("conv 3×3 stride 2, 64→64 ch, [2,64,32,32]", (2, 64, 32, 32), (64, 64, 3, 3), 1, 2)
conv("conv 1×1, 128→64 ch, [2,128,32,32]", (2, 128, 32, 32), (64, 128, 1, 1), 0, 1)
attention("self-attention, 8 heads, [2,512,64]", 2, 512, 512, 64, 8)
attention("self-attention, 8 heads, [2,256,64]", 2, 256, 256, 64, 8)
attention("cross-attention, 8 heads, 512→77, width 64", 2, 512, 77, 64, 8)
