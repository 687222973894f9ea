"""LyCORIS LoHa / LoKr networks on the tiny SD 1.5 fixture, made and run by LyCORIS itself (`lycoris.kohya`, the
`network_module` kohya_ss writes for its LyCORIS/LoHa and LyCORIS/LoKr types), with diffusers' UNet and
transformers' CLIP.

For each configuration in CONFIGS, writes into tests/fixtures/lycoris/:
- `{tag}.safetensors`: the network as LyCORIS saves it (`save_weights`, f32), after its weights were set to seeded
  random values (a fresh network's ΔW is zero, which would test nothing);
and `golden.safetensors` with the shared inputs (`in.*`) and, per tag:
- in the metadata, `{tag}.shapes` (JSON: the shape of every tensor of the *fresh* network, what sdtune must create
  for the same options) and `{tag}.alphas` (JSON: each module's alpha); `{tag}.fresh`: DoRA's initial magnitudes,
  packed (below);
- `{tag}.unet.out` / `{tag}.te.out`: the UNet's noise prediction and CLIP's last hidden state with the network applied
  at multiplier 0.7 (LyCORIS' default rebuild-ΔW forward);
- `{tag}.loss`, `{tag}.grad`: loss = mean((unet(x, t, te(ids)) - target)²) with the network at multiplier 1,
  and every network parameter's gradient, packed (text encoder and UNet modules alike). For Tucker LoHa the gradients are
  torch autograd's through LyCORIS' forward: LyCORIS 3.2's hand-written backward for it is wrong (how far off is
  recorded in the metadata).
Packed tensors are one f32 vector, their keys and shapes in order in the metadata under the same name (JSON
`[[key, shape], ...]`). The options of each configuration are in the file's metadata (`{tag}.args`).

Needs (not in CI): torch, diffusers, transformers, safetensors, lycoris-lora 3.2.0.post2 (LyCORIS 4.x's `full`
preset fails on SD 1.x UNets: it targets the `TimestepEmbedding` class and the `time_embedding.linear_*` names,
and asserts on the duplicate module names).
    /tmp/tv/bin/python tests/python/make_lycoris_goldens.py
"""
import importlib.metadata
import json
import os

import lycoris.functional.loha as lf
import lycoris.kohya as lk
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel

FIX = "tests/fixtures"
OUT = os.path.join(FIX, "lycoris")
CONFIGS = [
    # (tag, network_dim, network_alpha, network_args)
    ("loha", 4, 2.0, {"algo": "loha", "conv_dim": "2", "conv_alpha": "1"}),
    ("lokr", 2, 1.0, {"algo": "lokr", "conv_dim": "2", "conv_alpha": "1"}),
    ("lokr_both", 1, 1.0, {"algo": "lokr", "decompose_both": "True", "factor": "4", "preset": "attn-mlp"}),
    ("loha_lin", 2, 0.0, {"algo": "loha", "preset": "full-lin"}),
    ("locon", 4, 2.0, {"algo": "locon", "conv_dim": "2", "conv_alpha": "1"}),
    ("locon_tucker", 2, 1.0, {"algo": "locon", "conv_dim": "2", "conv_alpha": "1", "use_tucker": "True",
                              "preset": "unet-convblock-only"}),
    ("loha_tucker", 2, 1.0, {"algo": "loha", "conv_dim": "2", "conv_alpha": "1", "use_tucker": "True",
                             "preset": "unet-convblock-only"}),
    ("locon_dora", 4, 2.0, {"algo": "locon", "conv_dim": "2", "conv_alpha": "1", "dora_wd": "True"}),
    ("loha_dora", 2, 1.0, {"algo": "loha", "dora_wd": "True", "preset": "attn-mlp"}),
    ("lokr_dora_in", 2, 1.0, {"algo": "lokr", "dora_wd": "True", "wd_on_output": "False", "preset": "attn-mlp"}),
]


def autograd_tucker(t1, w1d, w1u, t2, w2d, w2u, scale=torch.tensor(1)):
    """LyCORIS 3.2's Tucker LoHa forward (`HadaWeightTucker.forward`), differentiated by torch's autograd: 3.2's
    hand-written backward contracts hada_w1_a's gradient with the other side's chain (fixed in LyCORIS 4)."""
    rebuild1 = torch.einsum("i j ..., j r, i p -> p r ...", t1, w1d, w1u)
    rebuild2 = torch.einsum("i j ..., j r, i p -> p r ...", t2, w2d, w2u)
    return rebuild1 * rebuild2 * scale


def pack(out, meta, name, tensors):
    """`tensors` as one f32 vector `out[name]`, its keys and shapes in order in `meta[name]` (JSON)."""
    if not tensors:
        return
    out[name] = torch.cat([t.reshape(-1) for t in tensors.values()]).contiguous()
    meta[name] = json.dumps([[k, list(t.shape)] for k, t in tensors.items()])


def gradients(net, te, unet, inputs):
    net.zero_grad()
    ctx = te(inputs["in.ids"])[0]
    pred = unet(inputs["in.sample"], inputs["in.timesteps"], ctx).sample
    loss = torch.nn.functional.mse_loss(pred, inputs["in.target"])
    loss.backward()
    return loss, {name: p.grad.detach().clone().contiguous() for name, p in net.named_parameters()}


def models():
    unet = UNet2DConditionModel.from_pretrained(os.path.join(FIX, "tiny-sd15", "unet"), torch_dtype=torch.float32)
    te = CLIPTextModel.from_pretrained(os.path.join(FIX, "tiny-sd15", "text_encoder"), torch_dtype=torch.float32)
    return unet.eval(), te.eval()


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(20261205)
    inputs = {
        "in.sample": torch.randn((2, 4, 16, 16), generator=g),
        "in.timesteps": torch.tensor([999.0, 250.0]),
        "in.ids": torch.randint(1, 1000, (2, 77), generator=g),
        "in.target": torch.randn((2, 4, 16, 16), generator=g),
    }
    out = dict(inputs)
    meta = {"lycoris": importlib.metadata.version("lycoris-lora"), "torch": torch.__version__}
    for tag, dim, alpha, args in CONFIGS:
        unet, te = models()
        for p in list(unet.parameters()) + list(te.parameters()):
            p.requires_grad_(False)
        # transformers 5's CLIPTextModel has no `text_model` level; sd-scripts (transformers 4) names the text
        # encoder's modules under it (`lora_te_text_model_encoder_...`), so LyCORIS walks a holder that has one
        holder = torch.nn.Module()
        holder.text_model = te
        net = lk.create_network(1.0, dim, alpha, None, holder, unet, **dict(args))
        net.apply_to(holder, unet, apply_text_encoder=True, apply_unet=True)
        fresh = net.state_dict()
        shapes, alphas, dora = {}, {}, {}
        for k, v in fresh.items():
            if k.endswith(".alpha"):
                alphas[k[:-len(".alpha")]] = v.detach().float().item()
                continue
            shapes[k] = list(v.shape)
            if k.endswith(".dora_scale"):
                dora[k] = v.detach().float().clone()  # (state_dict shares storage)
        # thousands of tensors, each a header entry, would make the header larger than the data: the shapes and
        # alphas go in the metadata, tensors of one kind into one vector with its keys in the metadata
        meta[f"{tag}.shapes"] = json.dumps(shapes)
        meta[f"{tag}.alphas"] = json.dumps(alphas)
        pack(out, meta, f"{tag}.fresh", dora)
        # seeded random weights (std 0.3; DoRA magnitudes within ±30 % of their start), so that every factor matters
        with torch.no_grad():
            for name, p in net.named_parameters():
                noise = torch.randn(p.shape, generator=g) * 0.3
                p.copy_(p * (1 + noise) if name.endswith("dora_scale") else noise)
        net.save_weights(os.path.join(OUT, f"{tag}.safetensors"), torch.float32,
                         {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(dim),
                          "ss_network_alpha": str(alpha), "ss_network_args": json.dumps(args)})
        meta[f"{tag}.args"] = json.dumps({"network_dim": dim, "network_alpha": alpha, **args})
        # applied at 0.7, no gradients
        net.set_multiplier(0.7)
        with torch.no_grad():
            ctx = te(inputs["in.ids"])[0]
            out[f"{tag}.te.out"] = ctx.contiguous()
            out[f"{tag}.unet.out"] = unet(inputs["in.sample"], inputs["in.timesteps"], ctx).sample.contiguous()
        # a training step's gradients at multiplier 1
        net.set_multiplier(1.0)
        net.train()
        loss, grads = gradients(net, te, unet, inputs)
        if "tucker" in tag and args["algo"] == "loha":
            custom = lf.make_weight_tucker
            lf.make_weight_tucker = autograd_tucker
            loss, reference = gradients(net, te, unet, inputs)
            lf.make_weight_tucker = custom
            off = max(((grads[k] - reference[k]).abs().max() / reference[k].abs().max()).item() for k in grads)
            meta[f"{tag}.lycoris_3.2_backward_off_by"] = f"{off:.3e}"
            print(f"{tag}: LyCORIS 3.2's Tucker backward is off by up to {off:.3e} (relative to the largest gradient)")
            grads = reference
        out[f"{tag}.loss"] = loss.detach().reshape(1)
        pack(out, meta, f"{tag}.grad", grads)
        n = len(grads)
        print(f"{tag}: {len(fresh)} tensors, {n} parameters, loss {loss.item():.6f}")
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "golden.safetensors"), meta)


if __name__ == "__main__":
    main()
