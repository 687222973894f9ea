//! LyCORIS LoCon, LoHa and LoKr networks (with and without Tucker decomposition and DoRA) against LyCORIS itself (`tests/fixtures/lycoris`, made by
//! `tests/python/make_lycoris_goldens.py` with lycoris-lora 3.2.0.post2, diffusers and transformers).

use crate::common::*;
use candle_core::{DType, Tensor};
use sdtune::networks::{file, module::Factors, Network};
use std::collections::{BTreeMap, HashMap};

const TAGS: &[&str] = &[
    "loha",
    "lokr",
    "lokr_both",
    "loha_lin",
    "locon",
    "locon_tucker",
    "loha_tucker",
    "locon_dora",
    "loha_dora",
    "lokr_dora_in",
];

/// The options a configuration was made with (the golden file's metadata), as a network config.
fn config(tag: &str) -> sdtune::networks::NetworkConfig {
    let meta = golden_meta();
    let mut args: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&meta[&format!("{tag}.args")]).unwrap();
    args.insert("network_module".into(), "lycoris.kohya".into());
    // network_args arrive as key=value text, as sd-scripts' command line gives them
    let args = args
        .into_iter()
        .map(|(k, v)| match v.as_str() {
            Some(s) if s.parse::<u64>().is_ok() => (k, serde_json::json!(s.parse::<u64>().unwrap())),
            Some(s) if s.parse::<f64>().is_ok() => (k, serde_json::json!(s.parse::<f64>().unwrap())),
            _ => (k, v),
        })
        .collect();
    serde_json::from_value::<sdtune::train::build::NetworkOptions>(serde_json::Value::Object(args))
        .unwrap()
        .config()
        .unwrap()
}

/// The golden file's metadata.
fn golden_meta() -> HashMap<String, String> {
    sdtune::io::tensors::read_metadata(&fixture("lycoris/golden.safetensors")).unwrap().into_iter().collect()
}

/// A packed golden (`{tag}.grad`, `{tag}.fresh`: one vector, its keys and shapes in the metadata) by key.
fn unpack(g: &HashMap<String, Tensor>, meta: &HashMap<String, String>, name: &str) -> HashMap<String, Tensor> {
    let (Some(flat), Some(index)) = (g.get(name), meta.get(name)) else { return HashMap::new() };
    let index: Vec<(String, Vec<usize>)> = serde_json::from_str(index).unwrap();
    let mut at = 0;
    index
        .into_iter()
        .map(|(k, shape)| {
            let n: usize = shape.iter().product();
            let t = flat.narrow(0, at, n).unwrap().reshape(shape).unwrap();
            at += n;
            (k, t)
        })
        .collect()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn created_lycoris_networks_have_lycoris_keys_shapes_and_alphas() {
    let g = goldens("lycoris/golden.safetensors");
    let meta = golden_meta();
    let model = load(&fixture("tiny-sd15"));
    for tag in TAGS {
        let net = Network::create(&model, &config(tag), 1).unwrap();
        let ours = net.state_dict(DType::F32).unwrap();
        let shapes: HashMap<String, Vec<usize>> = serde_json::from_str(&meta[&format!("{tag}.shapes")]).unwrap();
        let alphas: HashMap<String, f64> = serde_json::from_str(&meta[&format!("{tag}.alphas")]).unwrap();
        let fresh = unpack(&g, &meta, &format!("{tag}.fresh"));
        let mut want: Vec<String> = shapes.keys().cloned().chain(alphas.keys().map(|m| format!("{m}.alpha"))).collect();
        let mut have: Vec<String> = ours.keys().cloned().collect();
        want.sort();
        have.sort();
        assert_eq!(have, want, "{tag}: the modules and their tensors");
        for (k, t) in &ours {
            if let Some(m) = k.strip_suffix(".alpha") {
                assert_eq!(t.to_scalar::<f32>().unwrap(), alphas[m] as f32, "{tag} {k}");
            } else {
                assert_eq!(t.dims(), shapes[k].as_slice(), "{tag} {k}: shape");
            }
            // DoRA starts at the layer's own norms
            if let Some(fresh) = fresh.get(k) {
                let d = max_abs(&(t - fresh).unwrap()) / max_abs(fresh);
                assert!(d <= 1e-6, "{tag} {k}: initial magnitude off by {d:e}");
            }
        }
        // ΔW starts at zero: applied, the fresh network changes nothing — exactly
        let base = model.unet(&g["in.sample"], &g["in.timesteps"], &g["loha_lin.te.out"]).unwrap();
        net.apply(1.0);
        let with = model.unet(&g["in.sample"], &g["in.timesteps"], &g["loha_lin.te.out"]).unwrap();
        net.remove();
        // (DoRA rescales W by its norm over norm + ε, as LyCORIS does: a change at f32 rounding, no more)
        let changed = max_abs(&(with - base).unwrap());
        let allowed = if tag.contains("dora") { 1e-5 } else { 0.0 };
        assert!(changed <= allowed, "{tag}: a fresh network changed the UNet's output by {changed:e}");
        eprintln!("{tag}: {} modules, {} tensors as LyCORIS makes them", net.modules.len(), ours.len());
    }
}

#[test]
fn lycoris_files_applied_and_merged_reproduce_lycoris() {
    let g = goldens("lycoris/golden.safetensors");
    for tag in TAGS {
        let model = load(&fixture("tiny-sd15"));
        let net = file::load(&fixture(&format!("lycoris/{tag}.safetensors")), &model).unwrap();
        assert!(net.config.lycoris.is_some(), "{tag}: read as a LyCORIS network");
        let run = |m: &sdtune::models::StableDiffusion| {
            let ctx = m.encode_ids(&g["in.ids"], Some(1), true, false).unwrap().context;
            let noise = m.unet(&g["in.sample"], &g["in.timesteps"], &ctx).unwrap();
            (ctx, noise)
        };
        net.apply(0.7);
        let (ctx, noise) = run(&model);
        assert_close(&format!("{tag} applied: text encoder"), &ctx, &g[&format!("{tag}.te.out")], 1e-4);
        assert_close(&format!("{tag} applied: UNet"), &noise, &g[&format!("{tag}.unet.out")], 1e-4);
        net.remove();
        net.merge(0.7).unwrap();
        let (ctx, noise) = run(&model);
        assert_close(&format!("{tag} merged: text encoder"), &ctx, &g[&format!("{tag}.te.out")], 1e-4);
        assert_close(&format!("{tag} merged: UNet"), &noise, &g[&format!("{tag}.unet.out")], 1e-4);
    }
}

#[test]
fn lycoris_gradients_equal_lycoris_autograd() {
    let g = goldens("lycoris/golden.safetensors");
    let meta = golden_meta();
    let model = load(&fixture("tiny-sd15"));
    for tag in TAGS {
        let net = file::load(&fixture(&format!("lycoris/{tag}.safetensors")), &model).unwrap();
        net.apply(1.0);
        net.set_training(true);
        let ctx = model.encode_ids(&g["in.ids"], Some(1), true, false).unwrap().context;
        let pred = model.unet(&g["in.sample"], &g["in.timesteps"], &ctx).unwrap();
        let loss = (pred - &g["in.target"]).unwrap().sqr().unwrap().mean_all().unwrap();
        let l = loss.to_scalar::<f32>().unwrap();
        let want = g[&format!("{tag}.loss")].to_vec1::<f32>().unwrap()[0];
        assert!((l - want).abs() <= 1e-5 * want.abs(), "{tag}: loss {l} vs LyCORIS {want}");
        let grads = loss.backward().unwrap();
        net.set_training(false);
        net.remove();
        let golden_grads = unpack(&g, &meta, &format!("{tag}.grad"));
        let (mut n, mut worst) = (0, 0.0f64);
        for (_, m) in &net.modules {
            for (suffix, v) in m.named() {
                let key = format!("{}.{suffix}", m.name);
                let reference = &golden_grads[&key];
                let ours = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{key}: no gradient"));
                let ours = ours.reshape(reference.dims()).unwrap();
                // relative to the tensor's largest gradient: f32 sums over a UNet and a text encoder
                let d = max_abs(&(ours - reference).unwrap()) / max_abs(reference).max(1e-12);
                assert!(d <= 1e-4, "{key}: max |ours - LyCORIS| is {d:e} of its largest gradient");
                worst = worst.max(d);
                n += 1;
            }
        }
        assert_eq!(n, golden_grads.len(), "{tag}: every parameter");
        eprintln!("{tag}: loss {l} (LyCORIS {want}); {n} gradients, worst relative difference {worst:.2e}");
    }
}

#[test]
fn lycoris_files_save_back_unchanged_with_their_metadata() {
    let model = load(&fixture("tiny-sd15"));
    let dir = scratch("lycoris-save");
    for tag in TAGS {
        let path = fixture(&format!("lycoris/{tag}.safetensors"));
        let original = sdtune::io::tensors::read_safetensors(&path, None, &candle_core::Device::Cpu).unwrap();
        let net = file::load(&path, &model).unwrap();
        let out = dir.join(format!("{tag}.safetensors"));
        let meta = file::base_metadata(&net, tag, (64, 64), &BTreeMap::new());
        file::save(&net, &out, &meta, DType::F32, false).unwrap();
        let back = sdtune::io::tensors::read_safetensors(&out, None, &candle_core::Device::Cpu).unwrap();
        let mut a: Vec<&String> = back.tensors.keys().collect();
        let mut b: Vec<&String> = original.tensors.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{tag}: keys");
        for k in a {
            assert_eq!(back.tensors[k].dims(), original.tensors[k].dims(), "{k}");
            assert_eq!(max_abs(&(&back.tensors[k] - &original.tensors[k]).unwrap()), 0.0, "{k}");
        }
        assert_eq!(back.metadata["ss_network_module"], "lycoris.kohya");
        let args: serde_json::Value = serde_json::from_str(&back.metadata["ss_network_args"]).unwrap();
        assert_eq!(args["algo"], tag.split('_').next().unwrap(), "{tag}: ss_network_args {args}");
    }
}

#[test]
fn lycoris_max_norm_scales_as_lycoris() {
    // LoHa and LoCon scale their scalar (saved folded into hada_w1_a / lora_up), LoKr every factor by
    // ratio^(1/factors): either way ‖ΔW‖ ends at max_norm
    let model = load(&fixture("tiny-sd15"));
    for tag in ["loha", "lokr", "lokr_both", "locon", "loha_tucker"] {
        let net = file::load(&fixture(&format!("lycoris/{tag}.safetensors")), &model).unwrap();
        let norm = |m: &sdtune::networks::module::Module| {
            max_abs(&m.delta_weight().unwrap().sqr().unwrap().sum_all().unwrap()).sqrt()
        };
        let target = net.modules.iter().map(|(_, m)| norm(m)).fold(f64::MAX, f64::min) * 0.5;
        let before = net.state_dict(DType::F32).unwrap();
        let (scaled, _, max) = net.apply_max_norm(target).unwrap();
        assert_eq!(scaled, net.modules.len(), "{tag}");
        assert!((max - target).abs() < 1e-6 * target.max(1.0));
        for (_, m) in &net.modules {
            assert!((norm(m) - target).abs() < 1e-4 * target.max(1.0), "{tag} {}: {} vs {target}", m.name, norm(m));
        }
        // LoHa / LoCon: only hada_w1_a / lora_up changes in the saved tensors; the factors themselves stay
        let folded = match tag {
            "loha" | "loha_tucker" => Some(".hada_w1_a"),
            "locon" => Some(".lora_up.weight"),
            _ => None,
        };
        if let Some(folded) = folded {
            let after = net.state_dict(DType::F32).unwrap();
            let changed: Vec<&String> =
                after.keys().filter(|k| max_abs(&(&after[*k] - &before[*k]).unwrap()) > 0.0).collect();
            assert!(!changed.is_empty() && changed.iter().all(|k| k.ends_with(folded)), "{tag}: {changed:?}");
            let (_, m) = &net.modules[0];
            assert!(matches!(m.factors, Factors::Loha { .. } | Factors::Lora { .. }));
        }
    }
}

#[test]
fn sdxl_lycoris_networks_take_sd_scripts_names() {
    // sd-scripts' SDXL UNet names its input/output convolutions and time embedding differently (input_blocks.0.0,
    // out.2, time_embed.*): LyCORIS' name targets do not reach them, and the module classes keep SGM names
    let model = load(&fixture("tiny-sdxl"));
    let mut cfg = config("loha");
    cfg.lycoris.as_mut().unwrap().preset = sdtune::networks::lycoris::LycorisConfig::preset("full").unwrap();
    let net = Network::create(&model, &cfg, 3).unwrap();
    let names: Vec<&str> = net.modules.iter().map(|(_, m)| m.name.as_str()).collect();
    assert!(names
        .iter()
        .all(|n| n.starts_with("lora_te1_") || n.starts_with("lora_te2_") || n.starts_with("lora_unet_")));
    assert!(
        names.iter().any(|n| n.starts_with("lora_unet_input_blocks_"))
            && names.iter().any(|n| n.starts_with("lora_te2_"))
    );
    assert!(
        !names.iter().any(|n| n.contains("time_embed") || n.contains("conv_in") || n.ends_with("_out_2")),
        "{names:?}"
    );
    // resnets' 3×3 convs are in (conv_dim 2), and the file loads back into the same modules
    assert!(net.modules.iter().any(|(_, m)| m.name.ends_with("_in_layers_2")));
    let out = scratch("lycoris-sdxl").join("xl.safetensors");
    file::save(&net, &out, &file::base_metadata(&net, "xl", (64, 64), &BTreeMap::new()), DType::F32, false).unwrap();
    let back = file::load(&out, &model).unwrap();
    assert_eq!(back.modules.len(), net.modules.len());
    let sd: HashMap<String, Tensor> = back.state_dict(DType::F32).unwrap();
    assert!(sd.keys().any(|k| k.ends_with(".hada_w2_b")));
}

#[test]
fn unsupported_lycoris_files_are_refused_by_name() {
    let model = load(&fixture("tiny-sd15"));
    let dir = scratch("lycoris-refuse");
    let src =
        sdtune::io::tensors::read_safetensors(&fixture("lycoris/loha.safetensors"), None, &candle_core::Device::Cpu)
            .unwrap();
    let name =
        src.tensors.keys().find(|k| k.ends_with(".hada_w1_a")).unwrap().trim_end_matches(".hada_w1_a").to_string();
    for (key, want) in
        [("lokr_t2", &["Tucker", "lokr_t2", "not supported"][..]), ("dora_scale", &["dora_scale", "does not fit"])]
    {
        let mut t = src.tensors.clone();
        t.insert(format!("{name}.{key}"), Tensor::zeros((2, 2), DType::F32, &candle_core::Device::Cpu).unwrap());
        let p = dir.join(format!("{key}.safetensors"));
        sdtune::io::tensors::write_safetensors(&p, &t, &HashMap::new()).unwrap();
        let e = file::load(&p, &model).err().unwrap().to_string();
        assert!(want.iter().all(|w| e.contains(w)), "{e}");
    }
    // a LoHa factor of the wrong size names the module and the layer
    let mut t = src.tensors.clone();
    t.insert(format!("{name}.hada_w1_b"), Tensor::zeros((4, 3), DType::F32, &candle_core::Device::Cpu).unwrap());
    let p = dir.join("bad.safetensors");
    sdtune::io::tensors::write_safetensors(&p, &t, &HashMap::new()).unwrap();
    let e = file::load(&p, &model).err().unwrap().to_string();
    assert!(e.contains(&name) && e.contains("do not fit"), "{e}");
}

/// Every trained value of a run's network, in order.
fn trained(tr: &sdtune::train::Trainer) -> Vec<f32> {
    tr.network()
        .unwrap()
        .vars()
        .iter()
        .flat_map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn lycoris_networks_train_with_dropouts_and_resume_exactly() {
    use serde_json::json;
    for (i, (algo, extra)) in [
        ("loha", json!({ "rank_dropout": 0.25, "rank_dropout_scale": "True", "module_dropout": 0.1 })),
        ("lokr", json!({ "factor": 4, "decompose_both": "True", "preset": "attn-mlp" })),
        ("locon", json!({ "use_tucker": "True", "rank_dropout": 0.25, "preset": "unet-convblock-only" })),
        ("loha", json!({ "use_cp": "True", "preset": "unet-convblock-only" })),
        ("locon", json!({ "dora_wd": "True", "preset": "attn-mlp" })),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = scratch(&format!("lycoris-train-{i}-{algo}"));
        let mut network =
            json!({ "network_module": "lycoris.kohya", "algo": algo, "dim": 2, "alpha": 1.0, "conv_dim": 2 });
        network.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let recipe = |out: &str| {
            training_recipe(
                &dir,
                "tiny-sd15/tiny-sd15.safetensors",
                network.clone(),
                // scale_weight_norms small enough to act (LoHa: its scalar; LoKr: the factors), so resuming carries it
                json!({ "learning_rate": 1e-3, "max_train_steps": 6, "seed": 3, "scale_weight_norms": 2e-3,
                        "output_dir": dir.join("out"), "output_name": out, "log_every_n_steps": 0 }),
            )
        };
        let mut full = sdtune::train::build::build(&recipe("full")).unwrap();
        let fresh = trained(&full);
        full.run(&mut |_, _| {}).unwrap();
        assert!(full.losses.iter().all(|l| l.is_finite()), "{algo}: {:?}", full.losses);
        let moved = trained(&full).iter().zip(&fresh).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(moved > 1e-4, "{algo}: the factors did not move ({moved})");
        // the saved file is a LyCORIS file of this algorithm that reproduces the trained network
        let saved = dir.join("out/full.safetensors");
        let meta = sdtune::io::tensors::read_metadata(&saved).unwrap();
        assert_eq!(meta["ss_network_module"], "lycoris.kohya");
        let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
        assert_eq!(args["algo"], algo);
        // stopped at step 2 and resumed: the uninterrupted run's factors (dropout masks included)
        let mut first = sdtune::train::build::build(&recipe("part")).unwrap();
        first
            .run(&mut |t, _| {
                if t.step == 2 {
                    t.stop.store(true, std::sync::atomic::Ordering::SeqCst)
                }
            })
            .unwrap();
        let state = first.state_dir();
        drop(first);
        let mut resumed = sdtune::train::build::resume(&state, None).unwrap();
        resumed.run(&mut |_, _| {}).unwrap();
        let d = trained(&resumed).iter().zip(trained(&full)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("{algo}: losses {:?}; factors moved up to {moved:.2e}; resumed vs uninterrupted {d:e}", full.losses);
        assert!(d <= 1e-6, "{algo}: resumed run differs by {d}");
    }
}

#[test]
fn dora_lora_files_without_lycoris_metadata_apply_as_dora() {
    // other trainers write DoRA LoRAs as lora_down / lora_up / dora_scale without `ss_network_module`
    let g = goldens("lycoris/golden.safetensors");
    let model = load(&fixture("tiny-sd15"));
    let src = sdtune::io::tensors::read_safetensors(
        &fixture("lycoris/locon_dora.safetensors"),
        None,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let p = scratch("lycoris-dora-plain").join("dora.safetensors");
    sdtune::io::tensors::write_safetensors(&p, &src.tensors, &HashMap::new()).unwrap();
    let net = file::load(&p, &model).unwrap();
    assert!(net.modules.iter().all(|(_, m)| m.dora.is_some()));
    net.apply(0.7);
    let ctx = model.encode_ids(&g["in.ids"], Some(1), true, false).unwrap().context;
    let noise = model.unet(&g["in.sample"], &g["in.timesteps"], &ctx).unwrap();
    assert_close("DoRA LoRA without metadata: UNet", &noise, &g["locon_dora.unet.out"], 1e-4);
}
