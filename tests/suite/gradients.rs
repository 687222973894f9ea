//! Gradient checks: every parameter of each model receives a gradient, and selected gradients equal central
//! finite differences (f64). This catches ops that silently cut the graph (fused no-backward kernels).

use crate::common::*;
use candle_core::{DType, Device, Tensor, Var};
use sdtune::models::clip::{Activation, ClipConfig, ClipTextModel};
use sdtune::models::unet::{HeadSpec, UNet, UNetConfig, UNetHyper};
use sdtune::models::vae::{Vae, VaeConfig};
use sdtune::nn::Weights;
use std::collections::HashMap;

type LossFn = dyn Fn(&Weights) -> Tensor;

fn as_vars(map: &HashMap<String, Tensor>) -> HashMap<String, Var> {
    map.iter().map(|(k, t)| (k.clone(), Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap())).collect()
}

fn weights_of(vars: &HashMap<String, Var>) -> Weights {
    Weights::new(vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect(), "gradcheck")
}

fn fixed(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(sdtune::script::randn_vec(n, seed), shape, &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap()
}

/// Asserts every var has a non-zero gradient, then checks `probe` parameters against finite differences.
fn check(name: &str, vars: &HashMap<String, Var>, loss: &LossFn, probes: &[&str]) {
    let l = loss(&weights_of(vars));
    let grads = l.backward().unwrap();
    let mut missing = Vec::new();
    for (k, v) in vars {
        match grads.get(v.as_tensor()) {
            Some(g) if g.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap() > 0.0 => {}
            _ => missing.push(k.clone()),
        }
    }
    missing.sort();
    assert!(
        missing.is_empty(),
        "{name}: {} parameters got no gradient, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    for probe in probes {
        let key = vars
            .keys()
            .find(|k| k.ends_with(probe))
            .unwrap_or_else(|| panic!("{name}: no parameter ending in {probe}"));
        let v = &vars[key];
        let g = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (idx, &analytic) = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap();
        let eps = 1e-5;
        let base = v.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eval = |delta: f64| -> f64 {
            let mut p = base.clone();
            p[idx] += delta;
            let mut m: HashMap<String, Tensor> =
                vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
            m.insert(key.clone(), Tensor::from_vec(p, v.as_tensor().dims(), &Device::Cpu).unwrap());
            loss(&Weights::new(m, "gradcheck")).to_scalar::<f64>().unwrap()
        };
        let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
        let rel = (fd - analytic).abs() / fd.abs().max(1e-12);
        assert!(rel < 1e-4, "{name} {key}[{idx}]: analytic {analytic:e} vs finite difference {fd:e} (rel {rel:e})");
        eprintln!("{name} {key}[{idx}]: analytic {analytic:.6e} finite-diff {fd:.6e} rel {rel:.1e}");
    }
}

#[test]
fn unet_gradients_are_complete_and_match_finite_differences() {
    let c = load(&fixture("tiny-sd15")).components;
    let vars = as_vars(&c.unet);
    // 16×16 so that the mid block attends over 4 tokens (over 1 token softmax is constant: no q/k gradient)
    let sample = fixed(&[1, 4, 16, 16], 1);
    let ctx = fixed(&[1, 5, 32], 2);
    let w_out = fixed(&[1, 4, 16, 16], 3);
    let t = Tensor::new(&[321i64], &Device::Cpu).unwrap();
    let loss = move |w: &Weights| -> Tensor {
        let hyper = UNetHyper {
            heads: HeadSpec::Heads(vec![8]),
            groups: 8,
            eps: 1e-5,
            upcast_attention: false,
            sample_size: 8,
            addition_time_embed_dim: None,
        };
        let unet = UNet::new(w, UNetConfig::infer(w, hyper).unwrap()).unwrap();
        (unet.forward(&sample, &t, &ctx, None).unwrap() * &w_out).unwrap().sum_all().unwrap()
    };
    check(
        "unet",
        &vars,
        &loss,
        &[
            "down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "mid_block.attentions.0.proj_in.weight",
            "up_blocks.1.resnets.0.conv1.weight",
            "time_embedding.linear_1.weight",
            "conv_in.weight",
        ],
    );
}

#[test]
fn clip_gradients_are_complete_and_match_finite_differences() {
    for (m, act) in [("tiny-sd15", Activation::QuickGelu), ("tiny-sd2", Activation::Gelu)] {
        let c = load(&fixture(m)).components;
        let vars = as_vars(&c.text_encoder);
        // (the token embedding gets gradients on the rows of the ids used, so its max |grad| is non-zero)
        let ids = Tensor::new(&[[49406i64, 320, 1125, 539, 320, 2368, 49407, 49407]], &Device::Cpu).unwrap();
        let loss = move |w: &Weights| -> Tensor {
            let cfg = ClipConfig::infer(w, None, act).unwrap();
            let te = ClipTextModel::new(w, cfg).unwrap();
            let out = te.encode(&ids, 1, true, true).unwrap();
            let wc = fixed(out.context.dims(), 4);
            let wp = fixed(out.pooled.as_ref().unwrap().dims(), 5);
            ((out.context * wc).unwrap().sum_all().unwrap() + (out.pooled.unwrap() * wp).unwrap().sum_all().unwrap())
                .unwrap()
        };
        check(
            m,
            &vars,
            &loss,
            &[
                "layers.0.layer_norm1.weight",
                "layers.0.self_attn.q_proj.weight",
                "layers.1.self_attn.k_proj.weight",
                "layers.2.mlp.fc1.weight",
                "final_layer_norm.bias",
            ],
        );
    }
}

#[test]
fn vae_gradients_are_complete_and_match_finite_differences() {
    let c = load(&fixture("tiny-sd15")).components;
    let vars = as_vars(&c.vae);
    let image = fixed(&[1, 3, 16, 16], 6);
    let loss = move |w: &Weights| -> Tensor {
        let vae = Vae::new(w, VaeConfig::infer(w, 4, 0.18215, 64).unwrap()).unwrap();
        let post = vae.encode(&image).unwrap();
        let dec = vae.decode(&post.mean).unwrap();
        let wd = fixed(dec.dims(), 7);
        let wl = fixed(post.logvar.dims(), 8);
        ((dec * wd).unwrap().sum_all().unwrap() + (post.logvar * wl).unwrap().sum_all().unwrap()).unwrap()
    };
    check(
        "vae",
        &vars,
        &loss,
        &[
            "encoder.mid_block.attentions.0.to_q.weight",
            "encoder.down_blocks.0.resnets.0.norm1.weight",
            "decoder.up_blocks.1.upsamplers.0.conv.weight",
        ],
    );
}
