"""Prints the GPU check's table from the files scripts/gpu-check.sh wrote to a folder: torch.jsonl, sdtune.jsonl,
mem-*.txt (nvidia-smi samples, MiB), mem-idle.txt and parity.rc.   usage: python3 benches/gpu/table.py FOLDER"""
import json, os, sys

d = sys.argv[1]


def last_json(name):
    try:
        lines = [l for l in open(os.path.join(d, name)) if l.strip().startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None


def peak_gib(name):
    try:
        idle = min(int(x) for x in open(os.path.join(d, "mem-idle.txt")) if x.strip())
        used = [int(x) for x in open(os.path.join(d, name)) if x.strip().isdigit()]
        return (max(used) - idle) / 1024 if used else None
    except (OSError, ValueError):
        return None


def text(name, default="?"):
    p = os.path.join(d, name)
    return open(p).read().strip() if os.path.exists(p) else default


t, s, c = last_json("torch.jsonl"), last_json("sdtune.jsonl"), last_json("sdtune-candle-conv.jsonl")
u = last_json("sdtune-unfused.jsonl")
parity, kernels = text("parity.rc"), text("kernels.rc")
verdict = lambda rc: "passed" if rc == "0" else f"FAILED (rc {rc})"
print()
print(f"GPU: {(t or {}).get('device', '?')}; torch {(t or {}).get('torch', '?')}; sdtune {(s or {}).get('dtype', '?')}")
print(f"parity on the GPU (benches/gpu/parity.rhai): {verdict(parity)}; sdtune's kernels vs their CPU code "
      f"(ops bench `check`): {verdict(kernels)}")
if text("sdtune-fallback.txt", ""):
    print(f"the sdtune column ran with {text('sdtune-fallback.txt')}")
print("| SD 1.5-size UNet, batch 4, 64x64 latents, bf16 | sdtune ms | PyTorch ms | sdtune / PyTorch | sdtune TFLOP/s | PyTorch TFLOP/s | sdtune with candle's conv ms | sdtune, SDTUNE_FUSED=off ms |")
print("|---|---|---|---|---|---|---|---|")
flop = (t or {}).get("step_tflop")
for key, label in [("step_ms", "LoRA training step (rank 16, UNet only, AdamW)"),
                   ("forward_ms", "UNet forward (with the text encoder)"),
                   ("sample20_ms", "20-step Euler sampling with CFG (UNet calls)")]:
    a, b = (s or {}).get(key), (t or {}).get(key)
    ratio = f"{a / b:.2f}" if a and b else "-"
    tf = lambda ms: f"{flop / (ms / 1e3):.1f}" if (flop and ms and key == "step_ms") else "-"
    ms = lambda x: f"{x:.1f}" if x is not None else "failed"
    print(f"| {label} | {ms(a)} | {ms(b)} | {ratio} | {tf(a)} | {tf(b)} | {ms((c or {}).get(key))} | "
          f"{ms((u or {}).get(key))} |")
ps, pt = peak_gib("mem-sdtune.txt"), peak_gib("mem-torch.txt")
fmt = lambda x: f"{x:.2f}" if x is not None else "-"
print(f"| peak GPU memory, GiB (nvidia-smi, above idle) | {fmt(ps)} | {fmt(pt)} | "
      f"{(f'{ps / pt:.2f}' if ps and pt else '-')} | | | | |")
g = last_json("sdtune-checkpointing.jsonl")
gms = (g or {}).get("step_ms")
print(f"| sdtune LoRA step with gradient_checkpointing: ms / peak GiB | "
      f"{f'{gms:.1f}' if gms else 'not run'} / {fmt(peak_gib('mem-sdtune-checkpointing.txt'))} | | | | | | |")
prof = None
try:
    prof = next((json.loads(l) for l in open(os.path.join(d, "sdtune.jsonl")) if '"sdtune-profile"' in l), None)
except OSError:
    pass
if prof:
    for part in ("step", "forward"):
        p = prof[part]
        total = p["total"]["ms"]
        print(f"\nsdtune {part}, by layer kind (forwards and sdtune's own backward passes, the device synchronised around each; {total:.1f} ms in all):")
        print("| kind | calls | ms | share |")
        print("|---|---|---|---|")
        rows = sorted(((k, v) for k, v in p.items() if k != "total"), key=lambda kv: -kv[1]["ms"])
        for k, v in rows:
            print(f"| {k} | {v['calls']} | {v['ms']:.1f} | {100 * v['ms'] / total:.0f}% |")
        rest = total - sum(v["ms"] for _, v in rows)
        print(f"| everything else ({'candle backward ops, ' if part == 'step' else ''}elementwise glue) | | {rest:.1f} | {100 * rest / total:.0f}% |")
if t:
    print(f"PyTorch: {t['step_tflop']:.2f} TFLOP per step (FlopCounterMode), max_memory_allocated {t['peak_allocated_gib']} GiB, "
          f"{t['lora_params']} LoRA parameters")
