"""The PyTorch side of the GPU benchmark (scripts/gpu-check.sh), and the shared model.

1. Builds an SD 1.5-size model with random weights (UNet 320/640/1280/1280, 768-d CLIP text encoder, SD VAE) and
   saves it as a diffusers folder, so that sdtune loads exactly the same weights.
2. Times, on the same card: one LoRA training step (peft LoRA rank 16 on every attention/MLP projection of the UNet,
   UNet only; frozen weights bf16, LoRA parameters f32 under bf16 autocast; SDPA; AdamW; the frozen text encoder
   runs on the prompts' token ids as in training), the UNet forward alone, and 20 sampling steps with classifier-
   free guidance (UNet calls on a batch of 2, what a 20-step Euler sampler does besides its cheap arithmetic).
   FLOPs per step by torch's FlopCounterMode. JSON to stdout (and $OUT/torch.json).

usage: python3 benches/gpu/torch_bench.py MODEL_DIR [--size sd15|tiny] [--device cuda|cpu] [--steps N]
"""
import argparse, json, os, shutil, sys, time

sys.path.insert(0, "/tmp/site")  # the carried diffusers wheel, installed by gpu-check.sh
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from peft import LoraConfig
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def build(size):
    if size == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            sample_size=512)
    else:  # a small stand-in, to check this script on a CPU
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=16)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, projection_dim=32, hidden_act="quick_gelu"))
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                            sample_size=64)
    return unet, te, vae


def save(model_dir, unet, te, vae):
    tiny = os.path.join(ROOT, "tests", "fixtures", "tiny-sd15")
    os.makedirs(model_dir, exist_ok=True)
    unet.save_pretrained(os.path.join(model_dir, "unet"))
    te.save_pretrained(os.path.join(model_dir, "text_encoder"))
    vae.save_pretrained(os.path.join(model_dir, "vae"))
    for part in ("scheduler", "tokenizer"):
        shutil.copytree(os.path.join(tiny, part), os.path.join(model_dir, part), dirs_exist_ok=True)
    shutil.copy(os.path.join(tiny, "model_index.json"), model_dir)


def timed(fn, warm, iters, sync):
    for _ in range(warm):
        fn()
    sync()
    ts = []
    for _ in range(iters):
        a = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - a)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--size", default="sd15", choices=["sd15", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    dev, cuda = a.device, a.device == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    with torch.device(dev):
        unet, te, vae = build(a.size)
    save(a.model_dir, unet.to(dt), te.to(dt), vae.to(dt))
    del vae
    side = unet.config.sample_size
    ctx_dim = unet.config.cross_attention_dim
    b = 4
    unet.requires_grad_(False)
    te.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, 49407, (b, 77), generator=g).to(dev)
    lat = torch.randn(b, 4, side, side, generator=g).to(dev)
    noise = torch.randn(b, 4, side, side, generator=g).to(dev)
    t = torch.tensor([100, 300, 500, 700], device=dev)

    def step():
        with torch.no_grad():
            ctx = te(ids)[0]
        with torch.autocast(dev, dtype=dt, enabled=cuda):
            pred = unet(lat + noise, t, ctx).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_ms = timed(step, 3, a.steps, sync)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    fc = FlopCounterMode(display=False)
    with fc:
        step()
    flops = fc.get_total_flops()
    ctx2 = torch.randn(2, 77, ctx_dim, device=dev, dtype=dt)
    x2 = torch.randn(2, 4, side, side, device=dev, dtype=dt)

    @torch.no_grad()
    def forward():
        with torch.autocast(dev, dtype=dt, enabled=cuda):
            unet(lat.to(dt), t, te(ids)[0])

    @torch.no_grad()
    def sample():
        with torch.autocast(dev, dtype=dt, enabled=cuda):
            for i in range(20):
                unet(x2, torch.tensor([999 - 50 * i] * 2, device=dev), ctx2)

    fwd_ms = timed(forward, 2, a.steps, sync)
    sample_ms = timed(sample, 1, 3, sync)
    r = {"impl": "pytorch", "torch": torch.__version__,
         "device": torch.cuda.get_device_name(0) if cuda else "cpu", "size": a.size, "batch": b,
         "latent": [side, side], "lora_params": sum(p.numel() for p in params),
         "unet_params": sum(p.numel() for p in unet.parameters()), "step_ms": round(step_ms, 2),
         "forward_ms": round(fwd_ms, 2), "sample20_ms": round(sample_ms, 1), "step_tflop": flops / 1e12,
         "peak_allocated_gib": round(peak, 2)}
    print(json.dumps(r), flush=True)
    if os.environ.get("OUT"):
        json.dump(r, open(os.path.join(os.environ["OUT"], "torch.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
