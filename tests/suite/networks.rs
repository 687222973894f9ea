//! LoRA networks against sd-scripts' files and goldens (`tests/fixtures/lora-sd15`).

use crate::common::*;
use sdtune::networks::{file, Network, NetworkConfig};
use std::collections::BTreeMap;

const FILES: &[(&str, &str)] = &[
    ("lora", "lora-sd15/lora_sd15_dim4_alpha2.safetensors"),
    ("c3lier", "lora-sd15/lora_sd15_c3lier_dim4_alpha2_conv2_alpha1.safetensors"),
];

fn outputs_match(
    model: &sdtune::models::StableDiffusion,
    g: &std::collections::HashMap<String, candle_core::Tensor>,
    prefix: &str,
) {
    let noise = model.unet(&g["in.unet.sample"], &g["in.unet.timesteps"], &g["in.unet.encoder_hidden_states"]).unwrap();
    assert_close(&format!("{prefix}.unet.out.noise_pred"), &noise, &g[&format!("{prefix}.unet.out.noise_pred")], 1e-4);
    let last = model.encode_ids(&g["in.te.input_ids"], Some(1), true, true).unwrap();
    assert_close(
        &format!("{prefix}.te.out.last_hidden_state"),
        &last.context,
        &g[&format!("{prefix}.te.out.last_hidden_state")],
        1e-4,
    );
    assert_close(
        &format!("{prefix}.te.out.pooler_output"),
        last.pooled.as_ref().unwrap(),
        &g[&format!("{prefix}.te.out.pooler_output")],
        1e-4,
    );
    let pen = model.encode_ids(&g["in.te.input_ids"], Some(2), true, false).unwrap();
    assert_close(
        &format!("{prefix}.te.out.penultimate_final_ln"),
        &pen.context,
        &g[&format!("{prefix}.te.out.penultimate_final_ln")],
        1e-4,
    );
}

#[test]
fn applied_lora_files_reproduce_sd_scripts_goldens() {
    let g = goldens("lora-sd15/golden_lora.safetensors");
    let model = load(&fixture("tiny-sd15"));
    for (tag, path) in FILES {
        let net = file::load(&fixture(path), &model).unwrap();
        for m in [1.0, 0.5] {
            net.apply(m);
            outputs_match(&model, &g, &format!("{tag}.m{m:.1}"));
        }
        net.remove();
        // removed: back to the base model's goldens
        let base = goldens("tiny-sd15/golden.safetensors");
        let noise =
            model.unet(&g["in.unet.sample"], &g["in.unet.timesteps"], &g["in.unet.encoder_hidden_states"]).unwrap();
        assert_close("removed", &noise, &base["unet.out.noise_pred"], 1e-4);
    }
}

#[test]
fn merged_lora_files_reproduce_goldens_and_merge_diffs() {
    let g = goldens("lora-sd15/golden_lora.safetensors");
    for (tag, path) in FILES {
        let model = load(&fixture("tiny-sd15"));
        let net = file::load(&fixture(path), &model).unwrap();
        let layer = |name: &str| model.unet_layers.layers().into_iter().find(|l| l.name == name).unwrap();
        let merge_keys: Vec<String> =
            g.keys().filter(|k| k.starts_with(&format!("{tag}.merge.")) && k.ends_with(".orig")).cloned().collect();
        assert!(merge_keys.len() >= 3);
        let before: BTreeMap<String, candle_core::Tensor> = merge_keys
            .iter()
            .map(|k| {
                let path = k.trim_start_matches(&format!("{tag}.merge.")).trim_end_matches(".weight.orig").to_string();
                (k.clone(), layer(&path).slot.weight())
            })
            .collect();
        net.merge(1.0).unwrap();
        outputs_match(&model, &g, &format!("{tag}.m1.0"));
        for (k, orig) in before {
            let path = k.trim_start_matches(&format!("{tag}.merge.")).trim_end_matches(".weight.orig").to_string();
            let merged = layer(&path).slot.weight();
            let stem = k.trim_end_matches(".orig");
            assert_close(&k, &orig, &g[&k], 0.0);
            assert_close(&format!("{stem}.merged"), &merged, &g[&format!("{stem}.merged")], 1e-4);
            assert_close(&format!("{stem}.diff"), &(merged - orig).unwrap(), &g[&format!("{stem}.diff")], 1e-4);
        }
    }
}

#[test]
fn sshs_hashes_equal_sd_scripts() {
    for (_, path) in FILES {
        let f = sdtune::io::tensors::read_safetensors(&fixture(path), None, &candle_core::Device::Cpu).unwrap();
        let meta: BTreeMap<String, String> = f.metadata.clone().into_iter().collect();
        let (h, l) = file::sshs_hashes(&f.tensors, &meta).unwrap();
        assert_eq!(h, meta["sshs_model_hash"], "{path}");
        assert_eq!(l, meta["sshs_legacy_hash"], "{path}");
    }
}

#[test]
fn created_networks_have_sd_scripts_keys_shapes_and_metadata() {
    let model = load(&fixture("tiny-sd15"));
    for ((_, path), cfg) in FILES.iter().zip([
        NetworkConfig { dim: 4, alpha: 2.0, ..Default::default() },
        NetworkConfig { dim: 4, alpha: 2.0, conv_dim: Some(2), conv_alpha: Some(1.0), ..Default::default() },
    ]) {
        let reference = sdtune::io::tensors::read_safetensors(&fixture(path), None, &candle_core::Device::Cpu).unwrap();
        let net = Network::create(&model, &cfg, 1).unwrap();
        let ours = net.state_dict(candle_core::DType::F32).unwrap();
        let mut a: Vec<&String> = ours.keys().collect();
        let mut b: Vec<&String> = reference.tensors.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{path}: key names");
        for k in a {
            assert_eq!(ours[k].dims(), reference.tensors[k].dims(), "{k}: shape");
            assert_eq!(ours[k].dtype(), reference.tensors[k].dtype(), "{k}: dtype");
        }
        // up is zero at init: the network changes nothing until trained — exactly
        let g = goldens("tiny-sd15/golden.safetensors");
        let run =
            || model.unet(&g["unet.in.sample"], &g["unet.in.timesteps"], &g["unet.in.encoder_hidden_states"]).unwrap();
        let without = run();
        net.apply(1.0);
        let noise = run();
        assert_eq!(max_abs_diff(&noise, &without), 0.0, "a fresh network changed the UNet's output");
        assert_close("fresh network", &noise, &g["unet.out.noise_pred"], 1e-4);
        net.remove();
        // saved file: the reference's metadata spellings, and it loads back equal
        let dir = scratch("net-save");
        let out = dir.join("mine.safetensors");
        let meta = file::base_metadata(&net, "mine", (64, 64), &BTreeMap::new());
        file::save(&net, &out, &meta, candle_core::DType::F32, false).unwrap();
        let written = sdtune::io::tensors::read_metadata(&out).unwrap();
        for k in [
            "ss_network_module",
            "ss_network_dim",
            "ss_network_alpha",
            "ss_network_dropout",
            "ss_v2",
            "ss_base_model_version",
            "sshs_model_hash",
            "sshs_legacy_hash",
            "modelspec.architecture",
            "modelspec.implementation",
            "modelspec.prediction_type",
            "modelspec.resolution",
            "modelspec.title",
        ] {
            assert!(written.contains_key(k), "{k} missing");
            if k != "modelspec.title" && k != "sshs_model_hash" && !k.contains("date") {
                if let Some(v) = reference.metadata.get(k) {
                    assert_eq!(&written[k], v, "{k}: value spelling");
                }
            }
        }
        if cfg.conv_dim.is_some() {
            assert_eq!(written["ss_network_args"], reference.metadata["ss_network_args"]);
        }
        let back = file::load(&out, &model).unwrap();
        assert_eq!(back.modules.len(), net.modules.len());
        assert!(file::save(&net, &out, &meta, candle_core::DType::F32, false)
            .unwrap_err()
            .to_string()
            .contains("already exists"));
    }
}

#[test]
fn foreign_networks_are_refused_with_reasons() {
    let sd2 = load(&fixture("tiny-sd2"));
    let e = file::load(&fixture(FILES[0].1), &sd2).err().unwrap().to_string();
    assert!(e.contains("do not") && e.contains("another model family"), "{e}");
    let sd15 = load(&fixture("tiny-sd15"));
    let e = file::load(&fixture("lora-sdxl/lora_sdxl_dim4_alpha1.safetensors"), &sd15).err().unwrap().to_string();
    assert!(e.contains("SDXL network") && e.contains("Stable Diffusion 1.x"), "{e}");
    let e = file::load(&fixture("tiny-sd15/golden.safetensors"), &sd15).err().unwrap().to_string();
    assert!(e.contains("not a network file"), "{e}");
}

#[test]
fn max_norm_regularization_follows_sd_scripts() {
    // the fixture LoRA has non-zero ΔW; with max_norm below every module's norm, all are scaled to exactly max_norm
    let model = load(&fixture("tiny-sd15"));
    let net = file::load(&fixture(FILES[0].1), &model).unwrap();
    let norm = |m: &sdtune::networks::module::Module| {
        m.delta_weight().unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64
    };
    let smallest = net.modules.iter().map(|(_, m)| norm(m)).fold(f64::MAX, f64::min);
    let target = smallest * 0.5;
    let (scaled, _, max) = net.apply_max_norm(target).unwrap();
    assert_eq!(scaled, net.modules.len());
    assert!((max - target).abs() < 1e-6 * target.max(1.0));
    for (_, m) in &net.modules {
        assert!((norm(m) - target).abs() < 1e-4 * target.max(1.0), "{}: {} vs {target}", m.name, norm(m));
    }
    // a large max_norm leaves modules alone (n = max(‖ΔW‖, N/2) ≤ N)
    let before = norm(&net.modules[0].1);
    let (scaled, _, _) = net.apply_max_norm(before * 100.0).unwrap();
    assert_eq!(scaled, 0);
}

#[test]
fn block_wise_dims_and_lr_weights_follow_sd_scripts() {
    use sdtune::train::build::NetworkOptions;
    let model = load(&fixture("tiny-sd15"));
    // block 1 (down_blocks.0.*.0) rank 2, mid block (12) rank 0 (no modules), others rank 4
    let mut dims = vec!["4"; 25];
    dims[1] = "2";
    dims[12] = "0";
    let o: NetworkOptions = serde_json::from_value(serde_json::json!({
        "dim": 4, "alpha": 4.0, "block_dims": dims.join(","), "down_lr_weight": "zeros+1", "up_lr_weight": "1,1,1,0,0,0", "mid_lr_weight": 2.0,
    }))
    .unwrap();
    let cfg = o.config().unwrap();
    let net = Network::create(&model, &cfg, 0).unwrap();
    // ss_network_args carries the block options as given, as sd-scripts' json.dumps of network_args
    let meta = file::base_metadata(&net, "blocks", (64, 64), &BTreeMap::new());
    let want = format!(
        r#"{{"block_dims": "{}", "down_lr_weight": "zeros+1", "mid_lr_weight": "2.0", "up_lr_weight": "1,1,1,0,0,0"}}"#,
        dims.join(",")
    );
    assert_eq!(meta["ss_network_args"], want);
    let rank = |name: &str| net.modules.iter().find(|(_, m)| m.name == name).map(|(_, m)| m.rank());
    assert_eq!(rank("lora_unet_down_blocks_0_attentions_0_proj_in"), Some(2));
    assert_eq!(rank("lora_unet_down_blocks_0_attentions_1_proj_in"), Some(4));
    assert_eq!(rank("lora_unet_mid_block_attentions_0_proj_in"), None, "block dim 0 skips the module");
    // up_lr_weight 1,1,1,0,0,0 (+ padding with 1): up slots 13..15 keep, 16..18 (up_blocks_1 j=0..2) are removed
    assert!(rank("lora_unet_up_blocks_1_attentions_0_proj_in").is_none());
    assert_eq!(rank("lora_unet_up_blocks_2_attentions_0_proj_in"), Some(4));
    assert_eq!(rank("lora_te_text_model_encoder_layers_0_mlp_fc1"), Some(4), "text encoder unaffected");
    // the trainer makes one UNet group per LR weight: mid ×2, the rest ×1
    let o: NetworkOptions = serde_json::from_value(serde_json::json!({ "dim": 4, "mid_lr_weight": 2.0 })).unwrap();
    let net = std::sync::Arc::new(Network::create(&model, &o.config().unwrap(), 0).unwrap());
    let tcfg = sdtune::train::config::TrainConfig::from_json(
        serde_json::json!({ "learning_rate": 1e-4, "max_train_steps": 1 }),
    )
    .unwrap();
    let tr =
        sdtune::train::Trainer::new(std::sync::Arc::new(model), net.into(), None, tcfg, serde_json::json!({})).unwrap();
    let mut lrs = tr.current_lrs().unwrap();
    lrs.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(lrs.len(), 3, "{lrs:?}");
    assert_eq!(lrs[0].0, "textencoder");
    assert!((lrs[1].1 - 1e-4).abs() < 1e-12 && (lrs[2].1 - 2e-4).abs() < 1e-12, "{lrs:?}");
}
