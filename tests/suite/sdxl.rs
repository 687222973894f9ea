//! SDXL: parity of both text encoders, the UNet with its added conditioning, the VAE and the Euler pipeline with
//! the goldens diffusers/transformers produced for `tiny-sdxl` (f32), from the diffusers folder and the single file;
//! single-file and diffusers round trips.

use crate::common::*;
use candle_core::Tensor;
use sdtune::models::{Family, SaveFormat, StableDiffusion};
use sdtune::networks::{Network, NetworkConfig};
use sdtune::sample::pipeline::scheduler_config;
use sdtune::sample::schedulers::{self, Kind};
use std::collections::HashMap;

const ATOL: f64 = 1e-4;

/// The UNet's output on tiny-sdxl's golden inputs, with the vector from their pooled embedding and size ids.
fn unet_on_golden_inputs(model: &StableDiffusion, g: &HashMap<String, Tensor>) -> Tensor {
    let y = model.sdxl_y(&g["unet.in.text_embeds"], &g["unet.in.time_ids"]).unwrap().expect("SDXL has a vector");
    model
        .unet_with(&g["unet.in.sample"], &g["unet.in.timesteps"], &g["unet.in.encoder_hidden_states"], Some(&y))
        .unwrap()
}

fn check_module_goldens(model: &StableDiffusion, tag: &str, g: &HashMap<String, Tensor>) {
    assert_eq!(model.family, Family::Sdxl, "{tag}");
    let (ids1, ids2) = (&g["te.in.input_ids_1"], &g["te.in.input_ids_2"]);
    let te1 = &model.text_encoder;
    let last = te1.encode(ids1, 1, true, true).unwrap();
    assert_close(&format!("{tag} te1.last_hidden_state"), &last.context, &g["te.out.te1.last_hidden_state"], ATOL);
    assert_close(&format!("{tag} te1.pooler_output"), &last.pooled.unwrap(), &g["te.out.te1.pooler_output"], ATOL);
    let pen = te1.encode(ids1, 2, false, false).unwrap().context;
    assert_close(&format!("{tag} te1.penultimate"), &pen, &g["te.out.te1.penultimate_hidden_state"], ATOL);
    let te2 = model.text_encoder_2.as_ref().expect("SDXL has a second text encoder");
    let last2 = te2.encode(ids2, 1, true, true).unwrap();
    assert_close(&format!("{tag} te2.last_hidden_state"), &last2.context, &g["te.out.te2.last_hidden_state"], ATOL);
    assert_close(&format!("{tag} te2.text_embeds"), &last2.pooled.unwrap(), &g["te.out.te2.text_embeds"], ATOL);
    let pen2 = te2.encode(ids2, 2, false, false).unwrap().context;
    assert_close(&format!("{tag} te2.penultimate"), &pen2, &g["te.out.te2.penultimate_hidden_state"], ATOL);

    // the model's own conditioning from the first tokenizer's ids alone (the second's are derived)
    let cond = model.encode_ids(ids1, None, true, false).unwrap();
    assert_close(&format!("{tag} prompt_embeds"), &cond.context, &g["te.out.prompt_embeds"], ATOL);
    assert_close(&format!("{tag} pooled"), &cond.pooled.unwrap(), &g["te.out.te2.text_embeds"], ATOL);

    let y = model.sdxl_y(&g["unet.in.text_embeds"], &g["unet.in.time_ids"]).unwrap().expect("SDXL has a vector");
    assert_close(&format!("{tag} add_embeds"), &y, &g["unet.debug.add_embeds"], ATOL);
    let noise = model
        .unet_with(&g["unet.in.sample"], &g["unet.in.timesteps"], &g["unet.in.encoder_hidden_states"], Some(&y))
        .unwrap();
    assert_close(&format!("{tag} unet.out.noise_pred"), &noise, &g["unet.out.noise_pred"], ATOL);
    let e = model.unet(&g["unet.in.sample"], &g["unet.in.timesteps"], &g["unet.in.encoder_hidden_states"]).unwrap_err();
    assert!(e.to_string().contains("conditioning vector"), "{e}");

    let post = model.vae_encode(&g["vae.encode.in.image"]).unwrap();
    assert_close(&format!("{tag} vae.encode.out.mean"), &post.mean, &g["vae.encode.out.mean"], ATOL);
    assert_close(&format!("{tag} vae.encode.out.logvar"), &post.logvar, &g["vae.encode.out.logvar"], ATOL);
    let image = model.vae_decode(&g["vae.decode.in.latents"]).unwrap();
    assert_close(&format!("{tag} vae.decode.out.image"), &image, &g["vae.decode.out.image"], ATOL);
    assert!((model.vae_scale - 0.13025).abs() < 1e-12, "{tag}: vae scale {}", model.vae_scale);
}

#[test]
fn sdxl_module_goldens_match_from_folder_and_single_file() {
    let g = goldens("tiny-sdxl/golden.safetensors");
    check_module_goldens(&load(&fixture("tiny-sdxl")), "tiny-sdxl (diffusers folder)", &g);
    check_module_goldens(&load(&fixture("tiny-sdxl/tiny-sdxl.safetensors")), "tiny-sdxl (single file)", &g);
}

/// diffusers' `StableDiffusionXLPipeline` with the Euler scheduler, 10 steps, CFG 5, 64×64, no crop.
#[test]
fn sdxl_euler_pipeline_matches_diffusers() {
    let (mut opts, g) = pipeline_options("tiny-sdxl", "euler", 5.0);
    opts.leading = true;
    for path in [fixture("tiny-sdxl"), fixture("tiny-sdxl/tiny-sdxl.safetensors")] {
        let model = load(&path);
        let mut seen = Vec::new();
        let latents = sdtune::sample::sample_latents(&model, &opts, &mut |i, _, l| seen.push((i, l.clone()))).unwrap();
        let steps = &g["pipe.euler.steps.latents"];
        let want_ts: Vec<f32> = g["pipe.euler.steps.timesteps"].to_vec1::<f32>().unwrap();
        for (i, l) in &seen {
            let d = max_abs_diff(l, &steps.get(*i).unwrap());
            assert!(d <= 1e-3, "{}: step {i}: latents max abs diff {d:e}", path.display());
        }
        assert_eq!(seen.len(), 10);
        // "leading" spacing from SDXL base's scheduler config, and diffusers' init_noise_sigma for it (8.4500665)
        let sched = schedulers::build(Kind::Euler, &scheduler_config(&model, &opts), 10).unwrap();
        let ts: Vec<f32> = sched.timesteps().iter().map(|&t| t as f32).collect();
        assert_eq!(ts, want_ts, "timesteps");
        assert!((sched.init_noise_sigma() - 8.450066566467285).abs() < 1e-5, "{}", sched.init_noise_sigma());
        let want = &g["pipe.euler.out.latents"];
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
        let (d, tol) = (max_abs_diff(&latents, want), 1e-3 + 1e-4 * scale);
        assert!(d <= tol, "{}: final latents max abs diff {d:e} > {tol:e}", path.display());
        eprintln!("{}: sdxl euler final latents max abs diff {d:.2e} (|x| up to {scale:.1})", path.display());
        let decoded = model.vae_decode(&(latents / model.vae_scale).unwrap()).unwrap();
        assert_close("sdxl euler decoded", &decoded, &g["pipe.euler.out.decoded"], 1e-3);
    }
}

#[test]
fn sdxl_saves_as_single_file_and_diffusers_and_reloads_the_same() {
    let g = goldens("tiny-sdxl/golden.safetensors");
    let src = load(&fixture("tiny-sdxl/tiny-sdxl.safetensors"));
    let dir = scratch("sdxl-roundtrip");
    let single = dir.join("xl.safetensors");
    src.save(&single, SaveFormat::SingleFile, candle_core::DType::F16, false).unwrap();
    // the same keys, shapes and values as the single file diffusers' conversion script wrote
    assert_same_tensors(&tensors_at(&single), &goldens("tiny-sdxl/tiny-sdxl.safetensors"), true);
    let folder = dir.join("xl-diffusers");
    src.save(&folder, SaveFormat::Diffusers, candle_core::DType::F32, false).unwrap();
    for f in ["model_index.json", "text_encoder_2/config.json", "tokenizer_2/special_tokens_map.json"] {
        assert!(folder.join(f).is_file(), "{f}");
    }
    check_module_goldens(&load(&folder), "tiny-sdxl (saved as diffusers)", &g);
}

/// SDXL's VAE overflows in f16, so an f16 model keeps it in f32 (diffusers' `force_upcast`): its decode then
/// matches the f32 golden exactly as the f32 model does (the fixture's weights are f16-exact).
#[test]
fn sdxl_in_f16_keeps_the_vae_in_f32() {
    let g = goldens("tiny-sdxl/golden.safetensors");
    let opts = sdtune::models::LoadOptions { dtype: candle_core::DType::F16, ..Default::default() };
    let m = StableDiffusion::load(&fixture("tiny-sdxl/tiny-sdxl.safetensors"), &opts).unwrap();
    assert_eq!((m.dtype, m.vae_dtype), (candle_core::DType::F16, candle_core::DType::F32));
    let image = m.vae_decode(&g["vae.decode.in.latents"]).unwrap();
    assert_eq!(image.dtype(), candle_core::DType::F32);
    assert_close("f16 model: vae.decode.out.image", &image, &g["vae.decode.out.image"], ATOL);
}

fn lora_outputs_match(model: &StableDiffusion, g: &HashMap<String, Tensor>, prefix: &str) {
    let noise = model
        .unet_with(
            &g["in.unet.sample"],
            &g["in.unet.timesteps"],
            &g["in.unet.encoder_hidden_states"],
            Some(&g["in.unet.add_embeds"]),
        )
        .unwrap();
    assert_close(&format!("{prefix}.unet.out.noise_pred"), &noise, &g[&format!("{prefix}.unet.out.noise_pred")], ATOL);
    let (ids1, ids2) = (&g["in.te.input_ids_1"], &g["in.te.input_ids_2"]);
    let last = model.text_encoder.encode(ids1, 1, true, true).unwrap();
    let want = |k: &str| &g[&format!("{prefix}.te.out.{k}")];
    assert_close(&format!("{prefix} te1.last_hidden_state"), &last.context, want("te1.last_hidden_state"), ATOL);
    assert_close(&format!("{prefix} te1.pooler_output"), &last.pooled.unwrap(), want("te1.pooler_output"), ATOL);
    let te2 = model.text_encoder_2.as_ref().unwrap().encode(ids2, 1, true, true).unwrap();
    assert_close(&format!("{prefix} te2.last_hidden_state"), &te2.context, want("te2.last_hidden_state"), ATOL);
    assert_close(&format!("{prefix} te2.text_embeds"), &te2.pooled.unwrap(), want("te2.text_embeds"), ATOL);
    let cond = model.encode_ids(ids1, None, true, false).unwrap();
    assert_close(&format!("{prefix} prompt_embeds"), &cond.context, want("prompt_embeds"), ATOL);
}

/// sd-scripts' SDXL LoRA (module names of its own SGM-layout UNet, `lora_te1_`/`lora_te2_`) applied at 1.0 and 0.5,
/// removed, and merged, against sd-scripts' outputs and `sdxl_merge_lora` weights.
#[test]
fn sdxl_lora_files_apply_and_merge_like_sd_scripts() {
    let g = goldens("lora-sdxl/golden_lora.safetensors");
    let lora = fixture("lora-sdxl/lora_sdxl_dim4_alpha1.safetensors");
    let model = load(&fixture("tiny-sdxl/tiny-sdxl.safetensors"));
    let net = sdtune::networks::file::load(&lora, &model).unwrap();
    let count = |p: &str| net.modules.iter().filter(|(_, m)| m.name.starts_with(p)).count();
    assert_eq!((count("lora_te1_"), count("lora_te2_"), count("lora_unet_")), (18, 18, 192));
    for m in [1.0, 0.5] {
        net.apply(m);
        lora_outputs_match(&model, &g, &format!("m{m:.1}"));
    }
    net.remove();
    // saved again: sd-scripts' key names, shapes and values
    let out = scratch("sdxl-lora").join("again.safetensors");
    sdtune::networks::file::save(&net, &out, &Default::default(), candle_core::DType::F32, false).unwrap();
    assert_same_tensors(&tensors_at(&out), &tensors_at(&lora), true);
    let base = goldens("tiny-sdxl/golden.safetensors");
    let noise = unet_on_golden_inputs(&model, &base);
    assert_close("removed", &noise, &base["unet.out.noise_pred"], ATOL);

    // merging: the weights sdxl_merge_lora.py wrote (SGM paths), then the same outputs as applied at 1.0
    let cfg = &model.unet.cfg;
    let table = sdtune::io::keymap::unet_table(cfg.block_out_channels.len(), cfg.layers_per_block, &cfg.up_attn);
    let layer = |sgm: &str| {
        let path = table.rename(sgm, sdtune::io::keymap::Side::Ldm).unwrap();
        model.unet_layers.layers().into_iter().find(|l| l.name == path).unwrap()
    };
    let stems: Vec<String> = g
        .keys()
        .filter_map(|k| k.strip_prefix("merge.").and_then(|k| k.strip_suffix(".weight.orig")).map(String::from))
        .collect();
    assert_eq!(stems.len(), 3);
    for s in &stems {
        assert_close(&format!("{s} orig"), &layer(s).slot.weight(), &g[&format!("merge.{s}.weight.orig")], 0.0);
    }
    net.merge(1.0).unwrap();
    lora_outputs_match(&model, &g, "m1.0");
    for s in &stems {
        let merged = layer(s).slot.weight();
        assert_close(&format!("{s} merged"), &merged, &g[&format!("merge.{s}.weight.merged")], ATOL);
    }
}

/// A new SDXL network has exactly the modules, names and shapes of sd-scripts' `create_network(1.0, 4, 1.0, ...)`
/// on the same model (its saved file is the reference).
#[test]
fn a_new_sdxl_network_has_sd_scripts_modules_and_names() {
    let model = load(&fixture("tiny-sdxl/tiny-sdxl.safetensors"));
    let cfg = NetworkConfig { dim: 4, alpha: 1.0, ..Default::default() };
    let net = Network::create(&model, &cfg, 1).unwrap();
    let ours = net.state_dict(candle_core::DType::F32).unwrap();
    assert_same_tensors(&ours, &goldens("lora-sdxl/lora_sdxl_dim4_alpha1.safetensors"), false);
    // an SD 1.x network does not fit an SDXL model
    let e = sdtune::networks::file::load(&fixture("lora-sd15/lora_sd15_dim4_alpha2.safetensors"), &model)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("SD 1.x/2.x network") && e.contains("Stable Diffusion XL"), "{e}");
    let blocks = NetworkConfig {
        blocks: sdtune::networks::blocks::BlockConfig { dims: Some(vec![4; 25]), ..Default::default() },
        ..cfg
    };
    let e = Network::create(&model, &blocks, 1).err().unwrap().to_string();
    assert!(e.contains("SDXL"), "{e}");
}

/// LoRA training on SDXL (both text encoders and the UNet): the loss on fixed batches falls, every component's
/// modules learn, the batches carry sd-scripts' size ids, and the saved file applies like the trained network.
#[test]
fn sdxl_lora_training_learns_and_saves_sd_scripts_files() {
    use sdtune::train::{build, Batch};
    let dir = scratch("sdxl-train");
    let recipe = training_recipe(
        &dir,
        "tiny-sdxl/tiny-sdxl.safetensors",
        serde_json::json!({ "dim": 8, "alpha": 8.0, "conv_dim": 8, "conv_alpha": 8.0 }),
        serde_json::json!({
            "learning_rate": 1e-3, "max_train_steps": 100, "seed": 3, "cache_latents": true,
            "output_dir": dir.join("out"), "output_name": "xl", "log_every_n_steps": 0,
        }),
    );
    let mut tr = build::build(&recipe).unwrap();
    // copies: the optimizer updates the weights in place
    let before_w: HashMap<String, Tensor> = tr
        .network()
        .unwrap()
        .state_dict(candle_core::DType::F32)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.copy().unwrap()))
        .collect();
    let eval = fixed_batches(&tr);
    let ids = eval[0].time_ids.as_ref().unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(ids[0], vec![64.0, 64.0, 0.0, 0.0, 64.0, 64.0], "64×64 images in the 64×64 bucket");
    let eval_loss = |tr: &sdtune::train::Trainer| mean_loss(tr, &eval);
    let before = eval_loss(&tr);
    // the size ids reach the UNet: other sizes give another loss
    let mut other = Batch { time_ids: None, ..eval[0].clone() };
    other.time_ids = Some(Tensor::new(&[[128f32, 96., 8., 4., 64., 64.]; 4], &candle_core::Device::Cpu).unwrap());
    let l0 = tr.compute_loss(&eval[0], &mut sdtune::rng::Rng::new(0)).unwrap().to_scalar::<f32>().unwrap();
    let l1 = tr.compute_loss(&other, &mut sdtune::rng::Rng::new(0)).unwrap().to_scalar::<f32>().unwrap();
    assert_ne!(l0, l1, "the size conditioning changes the prediction");
    tr.run(&mut |_, _| {}).unwrap();
    let after = eval_loss(&tr);
    eprintln!(
        "SDXL evaluation loss: untrained LoRA {before:.4}, after 100 steps {after:.4} ({:.1}% lower)",
        100.0 * (1.0 - after / before)
    );
    assert!(after < 0.85 * before, "loss {before} → {after}");
    // every component learned: some up weight of each moved off zero
    let after_w = tr.network().unwrap().state_dict(candle_core::DType::F32).unwrap();
    for prefix in ["lora_unet_", "lora_te2_", "lora_te1_"] {
        let moved = after_w
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && k.ends_with(".lora_up.weight"))
            .map(|(k, t)| max_abs_diff(t, &before_w[k]))
            .fold(0.0, f64::max);
        eprintln!("{prefix}: largest up-weight change {moved:e}");
        assert!(moved > 0.0, "{prefix} modules did not learn");
    }
    // the saved file: SDXL metadata, and applied to a fresh model it gives the trained network's prediction
    let out = dir.join("out/xl.safetensors");
    let meta = sdtune::io::tensors::read_metadata(&out).unwrap();
    let theirs = sdtune::io::tensors::read_metadata(&fixture("lora-sdxl/lora_sdxl_dim4_alpha1.safetensors")).unwrap();
    for k in [
        "ss_base_model_version",
        "ss_v2",
        "ss_network_module",
        "modelspec.architecture",
        "modelspec.implementation",
        "modelspec.sai_model_spec",
    ] {
        assert_eq!(meta[k], theirs[k], "{k} as sd-scripts writes it");
    }
    let fresh = load(&fixture("tiny-sdxl/tiny-sdxl.safetensors"));
    let net = sdtune::networks::file::load(&out, &fresh).unwrap();
    net.apply(1.0);
    let b = &eval[0];
    let cond = |m: &StableDiffusion| {
        let c = m.encode_ids(&b.input_ids, None, true, false).unwrap();
        let y = m.sdxl_y(c.pooled.as_ref().unwrap(), b.time_ids.as_ref().unwrap()).unwrap();
        m.unet_with(&b.latents, b.timesteps.as_ref().unwrap(), &c.context, y.as_ref()).unwrap()
    };
    tr.network().unwrap().apply(1.0);
    assert!(max_abs_diff(&cond(&fresh), &cond(&tr.model)) < 1e-5);
}

/// The SDXL parts of the script API: conditioning maps, `sdxl_vector`, the four-argument `unet`, and sampling with
/// `timestep_spacing`.
#[test]
fn sdxl_works_from_a_script() {
    let dir = scratch("sdxl-script");
    let script = dir.join("xl.rhai");
    std::fs::write(
        &script,
        r#"
let m = load_model(ARGS[0]);
let g = load_tensors(ARGS[1]);
fn check(name, a, b) { let d = (a - b).abs_max(); if d > 1e-4 { throw `${name}: ${d}`; } }
let c = m.encode_ids(g["te.in.input_ids_1"]);
check("context", c.context, g["te.out.prompt_embeds"]);
check("pooled", c.pooled, g["te.out.te2.text_embeds"]);
let y = m.sdxl_vector(g["unet.in.text_embeds"], g["unet.in.time_ids"]);
check("y", y, g["unet.debug.add_embeds"]);
check("unet", m.unet(g["unet.in.sample"], g["unet.in.timesteps"], g["unet.in.encoder_hidden_states"], y), g["unet.out.noise_pred"]);
let t = m.encode_text("a red fox");
let y1 = m.sdxl_vector(t.pooled, [64, 64, 0, 0, 64, 64]);
if y1.shape != [1, 68] { throw `y1 ${y1.shape}`; }
let l = m.sample_latents(#{ prompt: "a red fox", width: 64, height: 64, steps: 2, seed: 1, sampler: "euler", timestep_spacing: "leading" });
if l.shape != [1, 4, 8, 8] { throw `latents ${l.shape}`; }
"#,
    )
    .unwrap();
    let args = [
        fixture("tiny-sdxl/tiny-sdxl.safetensors").display().to_string(),
        fixture("tiny-sdxl/golden.safetensors").display().to_string(),
    ];
    if let Err(e) = sdtune::script::run_file(&script, &args) {
        panic!("{e}");
    }
}

/// An SDXL LoRA-C3Lier that sdtune trained (`tests/python/make_sdxl_lora.rhai`) means the same in diffusers:
/// `StableDiffusionXLPipeline.load_lora_weights` gave these outputs (`tests/python/check_sdxl_lora_in_diffusers.py`).
#[test]
fn sdtune_sdxl_loras_load_in_diffusers_with_the_same_outputs() {
    let g = goldens("lora-sdxl/sdtune_c3lier_in_diffusers.safetensors");
    let base = goldens("tiny-sdxl/golden.safetensors");
    let model = load(&fixture("tiny-sdxl/tiny-sdxl.safetensors"));
    let net = sdtune::networks::file::load(&fixture("lora-sdxl/sdtune_c3lier.safetensors"), &model).unwrap();
    assert!(net.modules.iter().any(|(_, m)| m.name.contains("_in_layers_2")), "has 3×3 conv (C3Lier) modules");
    for m in [1.0, 0.5] {
        net.apply(m);
        let tag = format!("m{m:.1}");
        let c = model.encode_ids(&base["te.in.input_ids_1"], None, true, false).unwrap();
        assert_close(&format!("{tag} prompt_embeds"), &c.context, &g[&format!("{tag}.te.out.prompt_embeds")], ATOL);
        let pooled = c.pooled.unwrap();
        assert_close(&format!("{tag} text_embeds"), &pooled, &g[&format!("{tag}.te.out.te2.text_embeds")], ATOL);
        let noise = unet_on_golden_inputs(&model, &base);
        assert_close(&format!("{tag} noise_pred"), &noise, &g[&format!("{tag}.unet.out.noise_pred")], ATOL);
    }
}

/// SDXL long captions (`max_token_length` 150): both encoders' windows joined as sd-scripts'
/// `get_hidden_states_sdxl` joins them, the pooled embedding from the first window.
#[test]
fn sdxl_long_captions_pool_the_first_window() {
    let cpu = candle_core::Device::Cpu;
    let model = load(&fixture("tiny-sdxl/tiny-sdxl.safetensors"));
    let caption = "a watercolor painting of a red fox in the snow, ".repeat(9);
    let ids = model.tokenizer.tokenize_chunks(&caption, 2, &cpu).unwrap();
    let out = model.encode_windows(&ids).unwrap();
    assert_eq!(out.context.dims(), &[1, 152, 40]);
    let first = model.encode_ids(&ids.narrow(1, 0, 77).unwrap(), None, true, false).unwrap();
    assert_eq!(max_abs_diff(&out.pooled.unwrap(), &first.pooled.unwrap()), 0.0);
    assert_eq!(max_abs_diff(&out.context.narrow(1, 0, 76).unwrap(), &first.context.narrow(1, 0, 76).unwrap()), 0.0);
}

/// An SDXL refiner (OpenCLIP-bigG only) is named as such, as a single file and as a diffusers folder.
#[test]
fn an_sdxl_refiner_is_reported_as_not_supported() {
    let dir = scratch("sdxl-refiner");
    let all = goldens("tiny-sdxl/tiny-sdxl.safetensors");
    let refiner: HashMap<String, Tensor> = all
        .into_iter()
        .filter(|(k, _)| !k.starts_with("conditioner.embedders.0."))
        .map(|(k, t)| (k.replace("conditioner.embedders.1.", "conditioner.embedders.0."), t))
        .collect();
    let file = dir.join("refiner.safetensors");
    sdtune::io::tensors::write_safetensors(&file, &refiner, &Default::default()).unwrap();
    let e = format!("{:#}", StableDiffusion::load(&file, &Default::default()).err().unwrap());
    assert!(e.contains("SDXL refiner") && e.contains("not supported"), "{e}");
    let folder = dir.join("refiner-diffusers");
    for sub in ["text_encoder_2", "unet", "vae"] {
        std::fs::create_dir_all(folder.join(sub)).unwrap();
    }
    std::fs::copy(fixture("tiny-sdxl/model_index.json"), folder.join("model_index.json")).unwrap();
    let e = format!("{:#}", StableDiffusion::load(&folder, &Default::default()).err().unwrap());
    assert!(e.contains("SDXL refiner") && e.contains("not supported"), "{e}");
}
