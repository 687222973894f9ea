//! Full fine-tuning (DreamBooth / fine-tune: the model itself trains, no network): steps equal to diffusers' and
//! transformers' under PyTorch, saves that load back, exact resume, and clear refusals.

use crate::common::*;
use candle_core::{DType, Tensor};
use sdtune::train::config::TrainConfig;
use sdtune::train::{build, Batch, Trainer};
use serde_json::json;
use std::collections::HashMap;

fn golden_batch(g: &HashMap<String, Tensor>, i: usize) -> Batch {
    let t = |k: &str| g[&format!("b{i}.{k}")].clone();
    let latents = t("latents");
    let n = latents.dim(0).unwrap();
    Batch {
        latents,
        input_ids: t("input_ids"),
        weights: Tensor::ones(n, DType::F32, &candle_core::Device::Cpu).unwrap(),
        noise: Some(t("noise")),
        timesteps: Some(t("timesteps")),
        time_ids: None,
        captions: None,
        masks: None,
    }
}

/// Copies of every trained tensor of `tr` by the golden file's names (`unet.…`, `text_encoder.…`).
fn trained(tr: &Trainer) -> HashMap<String, Tensor> {
    tr.target.state_tensors().unwrap().into_iter().map(|(k, t)| (k, t.copy().unwrap())).collect()
}

#[test]
fn fine_tuning_steps_match_diffusers_and_transformers() {
    fine_tuning_steps_match(false);
}

/// With gradient checkpointing (UNet blocks and text-encoder layers recomputed in the backward, their own
/// weights' gradients collected separately) the steps are PyTorch's too.
#[test]
fn checkpointed_fine_tuning_steps_match_diffusers_and_transformers() {
    fine_tuning_steps_match(true);
}

fn fine_tuning_steps_match(checkpointing: bool) {
    let g = goldens("finetune/sgd_steps.safetensors");
    let model = load(&fixture("tiny-sd15/tiny-sd15.safetensors"));
    let dir = scratch(&format!("finetune-parity-{checkpointing}"));
    let cfg = TrainConfig::from_json(json!({
        "optimizer_type": "SGDNesterov", "learning_rate": 0.05, "max_train_steps": 4,
        "output_dir": dir, "output_name": "ft", "log_every_n_steps": 0, "gradient_checkpointing": checkpointing,
    }))
    .unwrap();
    let mut tr = Trainer::fine_tune(&model, None, cfg, json!({})).unwrap();
    let before = trained(&tr);
    let losses: Vec<f64> = g["losses"].to_vec1().unwrap();
    for (step, want) in losses.iter().enumerate() {
        let loss = tr.train_batch(&golden_batch(&g, step % 2)).unwrap();
        eprintln!("step {}: loss {loss:.7} (PyTorch {want:.7})", step + 1);
        assert!((loss - want).abs() < 1e-5, "step {}: loss {loss} vs PyTorch {want}", step + 1);
    }
    let after = trained(&tr);
    // every trained tensor against PyTorch's, and how far the weights moved
    let (mut worst, mut worst_key, mut moved) = (0f64, String::new(), 0f64);
    let mut compared = 0;
    for (k, ours) in &after {
        let golden = if k == "text_encoder.text_model.embeddings.token_embedding.weight" {
            // only the rows of the ids used have gradients; the others must not have moved
            let ids = &g["text_encoder.token_ids"];
            let rows = ours.index_select(&ids.to_dtype(DType::U32).unwrap(), 0).unwrap();
            assert_eq!(
                max_abs_diff(ours, &before[k]),
                max_abs_diff(&rows, &before[k].index_select(&ids.to_dtype(DType::U32).unwrap(), 0).unwrap()),
                "unused token rows moved"
            );
            let d = max_abs_diff(&rows, &g["text_encoder.token_rows"]);
            if d > worst {
                (worst, worst_key) = (d, k.clone());
            }
            compared += 1;
            continue;
        } else {
            g.get(k).unwrap_or_else(|| panic!("{k}: not in PyTorch's state"))
        };
        let d = max_abs_diff(ours, golden);
        if d > worst {
            (worst, worst_key) = (d, k.clone());
        }
        moved = moved.max(max_abs_diff(golden, &before[k]));
        compared += 1;
    }
    let in_golden = g.keys().filter(|k| k.starts_with("unet.") || k.starts_with("text_encoder.text_model")).count();
    eprintln!(
        "checkpointing {checkpointing}: {compared} tensors: max |ours − PyTorch| = {worst:.2e} ({worst_key}); weights moved up to {moved:.3}"
    );
    assert_eq!(compared, in_golden + 1, "every tensor PyTorch trained is trained here (token rows counted once)");
    assert!(moved > 1e-2, "the steps moved the weights ({moved})");
    assert!(worst < 1e-5, "{worst_key}: max |ours − PyTorch| = {worst:e}");

    // the saved single file holds the trained weights and ModelSpec's whole-model keys
    let path = tr.save_output("ft").unwrap();
    assert_eq!(path, dir.join("ft.safetensors"));
    let meta = sdtune::io::tensors::read_safetensors(&path, None, &candle_core::Device::Cpu).unwrap().metadata;
    assert_eq!(meta.get("modelspec.architecture").map(String::as_str), Some("stable-diffusion-v1"));
    assert_eq!(meta.get("modelspec.title").map(String::as_str), Some("ft"));
    let reloaded = load(&path);
    for (k, ours) in &after {
        let (comp, name) = k.split_once('.').unwrap();
        let map = if comp == "unet" { &reloaded.components.unet } else { &reloaded.components.text_encoder };
        assert_eq!(max_abs_diff(&map[name], ours), 0.0, "{k} saved as trained");
    }
}

/// With mixed_precision fp16 the weights stay f32 and the UNet computes in f16 (under dynamic loss scaling), as
/// autocast does: the same steps as PyTorch's f32 ones within f16's rounding.
#[test]
fn half_precision_fine_tuning_follows_the_f32_steps() {
    let g = goldens("finetune/sgd_steps.safetensors");
    let model = load(&fixture("tiny-sd15/tiny-sd15.safetensors"));
    let dir = scratch("finetune-f16");
    let cfg = TrainConfig::from_json(json!({
        "optimizer_type": "SGDNesterov", "learning_rate": 0.05, "max_train_steps": 4, "mixed_precision": "fp16",
        "output_dir": dir, "output_name": "ft", "log_every_n_steps": 0,
    }))
    .unwrap();
    let mut tr = Trainer::fine_tune(&model, None, cfg, json!({})).unwrap();
    assert_eq!(tr.model.dtype, DType::F16, "the UNet computes in f16");
    let before = trained(&tr);
    assert!(before.values().all(|t| t.dtype() == DType::F32), "f32 master weights");
    let losses: Vec<f64> = g["losses"].to_vec1().unwrap();
    for (step, want) in losses.iter().enumerate() {
        let loss = tr.train_batch(&golden_batch(&g, step % 2)).unwrap();
        eprintln!("f16 step {}: loss {loss:.7} (PyTorch f32 {want:.7})", step + 1);
        // f16's unit roundoff is 4.9e-4: the loss within twice that, relative
        assert!((loss - want).abs() < 1e-3 * want, "step {}: loss {loss} vs {want}", step + 1);
    }
    let skipped = tr.scaler.as_ref().unwrap().skipped;
    let after = trained(&tr);
    let (mut worst, mut moved) = (0f64, 0f64);
    for (k, golden) in g.iter().filter(|(k, _)| k.starts_with("unet.") || k.starts_with("text_encoder.text_model")) {
        worst = worst.max(max_abs_diff(&after[k], golden));
        moved = moved.max(max_abs_diff(golden, &before[k]));
    }
    eprintln!(
        "f16: {skipped} steps skipped for overflow; max |ours − PyTorch f32| = {worst:.2e}, moved up to {moved:.3}"
    );
    assert_eq!(skipped, 0, "no step skipped: the trajectories are comparable");
    assert!(moved > 1e-2);
    // each step's update carries f16-rounded gradients (≈ 4 roundoffs over 4 steps): within 0.2 % of the movement
    assert!(worst < 2e-3 * moved, "max |ours − PyTorch f32| = {worst:e} against a movement of {moved}");
}

fn ft_recipe(dir: &std::path::Path, out: &str, train: serde_json::Value) -> serde_json::Value {
    let mut train = train;
    let o = train.as_object_mut().unwrap();
    o.insert("output_dir".into(), json!(dir.join("out")));
    o.insert("output_name".into(), json!(out));
    o.insert("log_every_n_steps".into(), json!(0));
    let mut r = training_recipe(dir, "tiny-sd15/tiny-sd15.safetensors", serde_json::Value::Null, train);
    r["fine_tune"] = json!(true);
    r
}

#[test]
fn fine_tuning_learns_saves_a_diffusers_folder_and_resumes_exactly() {
    let dir = scratch("finetune-resume");
    let train = json!({ "learning_rate": 2e-4, "max_train_steps": 6, "seed": 5, "save_model_as": "diffusers",
                        "save_state": true, "cache_latents": true });
    // uninterrupted
    let mut full = build::build(&ft_recipe(&dir, "full", train.clone())).unwrap();
    let eval = fixed_batches(&full);
    let before = mean_loss(&full, &eval);
    full.run(&mut |_, _| {}).unwrap();
    let after = mean_loss(&full, &eval);
    eprintln!("fixed-batch loss: {before:.4} → {after:.4} after 6 AdamW steps");
    assert!(after < before, "loss {before} → {after}");
    // a diffusers folder that loads, with the trained weights
    let folder = dir.join("out/full");
    assert!(folder.join("unet/diffusion_pytorch_model.safetensors").is_file());
    let reloaded = load(&folder);
    let want = trained(&full);
    let key = "unet.conv_in.weight";
    assert_eq!(max_abs_diff(&reloaded.components.unet["conv_in.weight"], &want[key]), 0.0);

    // stopped after 3 steps (the state is saved), resumed to the end
    let mut part = build::build(&ft_recipe(&dir, "part", train)).unwrap();
    while part.step < 3 {
        part.train_next_batch().unwrap();
    }
    let state = part.save_state_now().unwrap();
    drop(part);
    let mut resumed = build::resume(&state, None).unwrap();
    assert_eq!(resumed.step, 3);
    resumed.run(&mut |_, _| {}).unwrap();
    let got = trained(&resumed);
    let worst = want.iter().map(|(k, w)| max_abs_diff(w, &got[k])).fold(0.0, f64::max);
    eprintln!("resumed after 3 of 6 steps: max |Δw| = {worst:e} against the uninterrupted run");
    assert_eq!(worst, 0.0);
}

#[test]
fn fine_tuning_refuses_what_it_cannot_do() {
    let dir = scratch("finetune-refuse");
    let err = |train: serde_json::Value| format!("{:#}", build::build(&ft_recipe(&dir, "x", train)).err().unwrap());
    let e = err(json!({ "network_train_unet_only": true }));
    assert!(e.contains("network_train_unet_only is a LoRA option"), "{e}");
    let e = err(json!({ "save_model_as": "ckpt" }));
    assert!(e.contains("save_model_as ckpt"), "{e}");
    let mut r = ft_recipe(&dir, "x", json!({}));
    r["network"] = json!({ "dim": 4 });
    let e = format!("{:#}", build::build(&r).err().unwrap());
    assert!(e.contains("fine_tune trains the model itself"), "{e}");
    // the text encoder stays as loaded with train_text_encoder false
    let tr = build::build(&ft_recipe(&dir, "x", json!({ "train_text_encoder": false }))).unwrap();
    assert!(trained(&tr).keys().all(|k| k.starts_with("unet.")));
    let e = err(json!({ "learning_rate_te1": 1e-5 }));
    assert!(e.contains("SDXL's"), "{e}");
    // SDXL (sdxl_train.py): an LR per text encoder, 0 leaving one untrained
    let mut r = training_recipe(
        &dir,
        "tiny-sdxl/tiny-sdxl.safetensors",
        serde_json::Value::Null,
        json!({ "learning_rate": 1e-4, "learning_rate_te1": 0.0, "learning_rate_te2": 2e-5, "max_train_steps": 1,
                "output_dir": dir.join("xl"), "log_every_n_steps": 0 }),
    );
    r["fine_tune"] = json!(true);
    r["dataset_options"]["resolution"] = json!(64);
    let tr = build::build(&r).unwrap();
    let t = trained(&tr);
    assert!(t.keys().any(|k| k.starts_with("text_encoder_2.")) && !t.keys().any(|k| k.starts_with("text_encoder.")));
    assert_eq!(tr.current_lrs().unwrap(), [("textencoder2".to_string(), 2e-5), ("unet".to_string(), 1e-4)]);
}

#[test]
fn sdxl_block_lr_trains_each_block_at_its_lr_and_leaves_zero_blocks_frozen() {
    // sdxl_train.py's block_lr: 23 LRs by SGM block (0 embeddings, 1–9 input_blocks, 10–12 middle_block, 13–21
    // output_blocks, 22 out); a block at 0 is not optimized
    let dir = scratch("finetune-block-lr");
    let mut lrs = vec!["0"; 23];
    lrs[1] = "1e-3"; // input_blocks.0: conv_in
    lrs[22] = "5e-4"; // out: the final norm and conv_out
    let mut r = training_recipe(
        &dir,
        "tiny-sdxl/tiny-sdxl.safetensors",
        serde_json::Value::Null,
        json!({ "learning_rate": 1e-4, "train_text_encoder": false, "max_train_steps": 2, "block_lr": lrs.join(","),
                "optimizer_type": "AdamW", "output_dir": dir.join("out"), "log_every_n_steps": 0 }),
    );
    r["fine_tune"] = json!(true);
    r["dataset_options"]["resolution"] = json!(64);
    let mut tr = build::build(&r).unwrap();
    assert_eq!(tr.current_lrs().unwrap(), [("block1".to_string(), 1e-3), ("block22".to_string(), 5e-4)]);
    let before = trained(&tr);
    tr.run(&mut |_, _| {}).unwrap();
    let after = trained(&tr);
    let moved: std::collections::BTreeSet<&str> =
        before.keys().filter(|k| max_abs_diff(&before[*k], &after[*k]) > 0.0).map(|k| k.as_str()).collect();
    let want: std::collections::BTreeSet<&str> = [
        "unet.conv_in.weight",
        "unet.conv_in.bias",
        "unet.conv_norm_out.weight",
        "unet.conv_norm_out.bias",
        "unet.conv_out.weight",
        "unet.conv_out.bias",
    ]
    .into_iter()
    .collect();
    assert_eq!(moved, want, "only the blocks with an LR train");
    // the frozen blocks' gradients still count in clipping, as sdxl_train.py clips every UNet parameter
    assert!(tr.target.clip_only().len() > 100);
    let e = format!("{:#}", build::build(&ft_recipe(&dir, "x", json!({ "block_lr": lrs.join(",") }))).err().unwrap());
    assert!(e.contains("not SDXL"), "{e}");
    r["train"]["block_lr"] = json!("1e-4,0");
    let e = format!("{:#}", build::build(&r).err().unwrap());
    assert!(e.contains("23 values"), "{e}");
}

/// Textual inversion: the word's two vectors (from init_word "red circle") train as in sd-scripts'
/// train_textual_inversion.py under PyTorch (goldens: tests/python/make_ti_goldens.py), clipped by the whole
/// embedding table's gradient norm as sd-scripts clips (acting at every step there); the file saved loads back as an
/// embedding that encodes the same.
#[test]
fn textual_inversion_steps_match_pytorch_and_the_file_loads_back() {
    let g = goldens("finetune/ti_steps.safetensors");
    let model = std::sync::Arc::new(load(&fixture("tiny-sd15/tiny-sd15.safetensors")));
    let dir = scratch("ti-parity");
    let cfg = TrainConfig::from_json(json!({
        "token_string": "toyword", "init_word": "red circle", "num_vectors_per_token": 2,
        "optimizer_type": "SGDNesterov", "learning_rate": 30.0, "max_grad_norm": 0.01, "max_train_steps": 4,
        "output_dir": dir, "output_name": "toyword", "log_every_n_steps": 0,
    }))
    .unwrap();
    let mut tr = Trainer::textual_inversion(model.clone(), None, cfg, json!({})).unwrap();
    // the word is tokens 49408, 49409 in the model, starting from "red circle"'s vectors
    let ids: Vec<i64> = model.tokenize("a photo of toyword").unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(&ids[..6], &[49406, 320, 1125, 539, 49408, 49409]);
    let start = &trained(&tr)["embedding.0"];
    assert_eq!(max_abs_diff(start, &g["rows.start"]), 0.0, "init_word's vectors");
    let losses: Vec<f64> = g["losses"].to_vec1().unwrap();
    for (step, want) in losses.iter().enumerate() {
        let loss = tr.train_batch(&golden_batch(&g, step % 2)).unwrap();
        eprintln!("TI step {}: loss {loss:.7} (PyTorch {want:.7})", step + 1);
        assert!((loss - want).abs() < 1e-5, "step {}: loss {loss} vs PyTorch {want}", step + 1);
    }
    let end = &trained(&tr)["embedding.0"];
    let moved = max_abs_diff(&g["rows.end"], &g["rows.start"]);
    let d = max_abs_diff(end, &g["rows.end"]);
    eprintln!("TI vectors: max |ours − PyTorch| = {d:.2e}; moved up to {moved:.3}");
    assert!(moved > 0.05 && d < 1e-5, "vectors {d} off PyTorch's (moved {moved})");
    // the saved embedding: sd-scripts' layout, loads into a fresh model and encodes as the trained one
    let path = tr.save_output("toyword").unwrap();
    let file = sdtune::io::tensors::read_safetensors(&path, None, &candle_core::Device::Cpu).unwrap();
    assert_eq!(file.tensors.keys().collect::<Vec<_>>(), vec!["emb_params"]);
    assert_eq!(file.metadata["modelspec.architecture"], "stable-diffusion-v1/textual-inversion");
    let fresh = load(&fixture("tiny-sd15/tiny-sd15.safetensors"));
    fresh.load_embedding(&path, None).unwrap();
    let enc = |m: &sdtune::models::StableDiffusion| {
        m.encode_ids(&m.tokenize("a photo of toyword").unwrap(), None, true, false).unwrap().context
    };
    assert!(max_abs_diff(&enc(&fresh), &enc(&model)) < 1e-6);
}

#[test]
fn textual_inversion_trains_with_templates_on_sdxl_and_resumes_exactly() {
    let dir = scratch("ti-sdxl");
    let recipe = |out: &str| {
        let mut r = training_recipe(
            &dir,
            "tiny-sdxl/tiny-sdxl.safetensors",
            serde_json::Value::Null,
            json!({ "token_string": "toyword", "init_word": "shape", "num_vectors_per_token": 3,
                    "use_object_template": true, "learning_rate": 5e-3, "max_train_steps": 4, "seed": 3,
                    "save_state": true, "output_dir": dir.join("out"), "output_name": out, "log_every_n_steps": 0 }),
        );
        r["dataset_options"]["resolution"] = json!(64);
        r
    };
    let mut full = build::build(&recipe("full")).unwrap();
    // templates replace the captions: every caption is an object template with the word
    let b = full.make_batch(0, &[0, 1]).unwrap();
    for c in b.captions.as_ref().unwrap() {
        let templates = sdtune::train::textual_inversion::OBJECT_TEMPLATES;
        assert!(templates.iter().any(|t| t.replace("{}", "toyword") == *c), "{c}");
    }
    let before = trained(&full);
    full.run(&mut |_, _| {}).unwrap();
    let after = trained(&full);
    assert_eq!(after.len(), 2, "both SDXL text encoders' vectors");
    for (k, v) in &after {
        assert_eq!(v.dims()[0], 3);
        assert!(max_abs_diff(v, &before[k]) > 0.0, "{k} trained");
    }
    let file =
        sdtune::io::tensors::read_safetensors(&dir.join("out/full.safetensors"), None, &candle_core::Device::Cpu)
            .unwrap();
    let mut keys: Vec<_> = file.tensors.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["clip_g", "clip_l"]);
    // stopped after 2 steps, resumed: the same vectors
    let mut part = build::build(&recipe("part")).unwrap();
    while part.step < 2 {
        part.train_next_batch().unwrap();
    }
    let state = part.save_state_now().unwrap();
    drop(part);
    let mut resumed = build::resume(&state, None).unwrap();
    resumed.run(&mut |_, _| {}).unwrap();
    let got = trained(&resumed);
    let worst = after.iter().map(|(k, w)| max_abs_diff(w, &got[k])).fold(0.0, f64::max);
    assert_eq!(worst, 0.0);
}
