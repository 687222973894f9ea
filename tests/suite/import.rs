//! Importing kohya_ss GUI configs and sd-scripts TOML: every fixture config imports; the SD1/SD2 LoRA ones give
//! recipes whose resolved options equal the direct `sdtune train --kohya` route and kohya_ss's meaning, and run on
//! tiny-sd15; the others report exactly what is not supported yet.

use crate::common::*;
use sdtune::import;
use sdtune::train::build;
use serde_json::{json, Value};

fn config(name: &str) -> std::path::PathBuf {
    fixture(&format!("kohya-configs/{name}"))
}

/// Paths of a fixture config replaced by test ones (they point into the kohya_ss tree).
fn local(flat: serde_json::Map<String, Value>, dir: &std::path::Path) -> serde_json::Map<String, Value> {
    local_with(flat, dir, "tiny-sd15/tiny-sd15.safetensors")
}

/// `local` with another model fixture.
fn local_with(
    mut flat: serde_json::Map<String, Value>,
    dir: &std::path::Path,
    model: &str,
) -> serde_json::Map<String, Value> {
    let data = sdtune::data::synthetic::write_shapes(&dir.join("data"), "toy", 1, 4, 64, 0).unwrap();
    flat.insert("pretrained_model_name_or_path".into(), json!(fixture(model)));
    flat.insert("train_data_dir".into(), json!(data));
    flat.insert("output_dir".into(), json!(dir.join("out")));
    flat.remove("logging_dir");
    flat
}

#[test]
fn every_kohya_fixture_imports_or_says_what_is_unsupported() {
    let expect: &[(&str, &[&str])] = &[
        ("locon-AdamW.json", &[]),
        ("preset-sd15_-_EDG_LoraOptiSettings.json", &[]),
        ("Standard-AdamW.json", &[]),
        ("dreambooth-AdamW.json", &[]),
        ("SDXL-Standard-AdamW.json", &[]),
        ("TI-AdamW8bit.json", &[]),
        ("finetune-AdamW.json", &[]),
        ("loha-Prodigy.json", &[]),
        ("preset-lokr-sd15.json", &[]),
        ("preset-SDXL_-_LoRA_AI_Now_prodigy_v1.0.json", &[]),
    ];
    for (name, unsupported) in expect {
        let imp = import::kohya(&config(name)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let lines = imp.report.lines().join("\n");
        let bad: Vec<_> = lines.lines().filter(|l| l.starts_with("not supported")).collect();
        eprintln!("{name}: {} report lines, {} unsupported", imp.report.entries.len(), bad.len());
        if unsupported.is_empty() {
            assert!(bad.is_empty(), "{name} should import cleanly:\n{lines}");
            assert!(imp.report.check_runnable(&config(name)).is_ok());
        } else {
            for want in *unsupported {
                assert!(bad.iter().any(|l| l.contains(want)), "{name}: no `{want}` in\n{lines}");
            }
            let e = imp.report.check_runnable(&config(name)).unwrap_err().to_string();
            assert!(e.contains("cannot run as given"), "{e}");
        }
        // whatever is not taken over is listed: e.g. accelerate settings and other model families
        if imp.options.contains_key("train_data_dir") {
            assert!(
                lines.contains("num_processes")
                    || !std::fs::read_to_string(config(name)).unwrap().contains("num_processes")
            );
        }
    }
    // an unknown key is an error naming it
    let dir = scratch("import-unknown");
    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"{"LoRA_type": "Standard", "network_dimm": 8}"#).unwrap();
    let e = format!("{:#}", import::kohya(&bad).err().unwrap());
    assert!(e.contains("unknown kohya_ss key `network_dimm`"), "{e}");
}

#[test]
fn kohya_keys_mean_what_kohya_ss_passes_to_sd_scripts() {
    let imp = import::kohya(&config("locon-AdamW.json")).unwrap();
    let o = &imp.options;
    assert_eq!(o["network_module"], "networks.lora");
    assert_eq!(o["network_args"], json!(["conv_dim=16", "conv_alpha=8", "rank_dropout=0.1", "module_dropout=0.1"]));
    assert_eq!((o["network_dim"].clone(), o["network_alpha"].clone()), (json!(16), json!(8)));
    assert_eq!(o["network_dropout"], json!(0.1));
    assert_eq!(o["resolution"], "512,512");
    assert_eq!(o["optimizer_type"], "AdamW");
    assert_eq!(o["max_train_epochs"], json!(1));
    assert_eq!(o["seed"], json!(1234), "numbers given as strings are numbers");
    assert_eq!(o["noise_offset"], json!(0.05), "noise_offset_type Original");
    assert!(!o.contains_key("multires_noise_iterations"));
    assert!(!o.contains_key("xformers") && !o.contains_key("max_token_length"));
    assert_eq!(imp.prompts.as_deref(), Some("a painting of a gas mask , by darius kawasaki"));
    let lines = imp.report.lines().join("\n");
    for key in ["xformers", "num_processes", "LyCORIS_preset", "factor"] {
        assert!(lines.contains(&format!(": {key}: ")), "{key} not reported:\n{lines}");
    }
    // Standard LoRA: conv_dim is a GUI field Standard does not pass; string numbers; legacy keys
    let imp = import::kohya(&config("preset-sd15_-_EDG_LoraOptiSettings.json")).unwrap();
    let o = &imp.options;
    assert!(!o.contains_key("network_args"), "{:?}", o.get("network_args"));
    assert_eq!(o["optimizer_type"], "AdamW8bit");
    assert_eq!((o["learning_rate"].clone(), o["text_encoder_lr"].clone()), (json!(0.0001), json!(5e-05)));
    assert_eq!(o["resolution"], "512,650");
    assert_eq!(o["train_batch_size"], json!(3));
    assert!(imp.report.lines().join("\n").contains("conv_dim: used only by LoRA_type Kohya LoCon"));
    // the GUI's percentage warmup and zero learning rates
    let dir = scratch("import-semantics");
    let p = dir.join("c.json");
    std::fs::write(
        &p,
        r#"{"LoRA_type": "Standard", "network_dim": 8, "lr_warmup": "10", "lr_warmup_steps": 0, "text_encoder_lr": "0",
            "unet_lr": "1e-4", "use_8bit_adam": true, "noise_offset_type": "Multires", "noise_offset": 0.1,
            "multires_noise_iterations": 6, "multires_noise_discount": 0.3, "additional_parameters": "--min_snr_gamma 5"}"#,
    )
    .unwrap();
    let imp = import::kohya(&p).unwrap();
    let o = &imp.options;
    assert_eq!(o["lr_warmup_steps"], json!(0.1));
    assert_eq!(o["network_train_unet_only"], json!(true));
    assert_eq!(o["optimizer_type"], "AdamW8bit");
    assert_eq!((o["multires_noise_iterations"].clone(), o.get("noise_offset")), (json!(6), None));
    assert_eq!(o["min_snr_gamma"], json!(5));
}

/// The recipe script's `options`, resolved by `trainer(options).options` (the script is ours: it ends in
/// `let run = train(options);`).
fn script_options(script: &str, args: &[String]) -> Value {
    let head = script.split("let run = train(options);").next().unwrap();
    let probe = format!("{head}\ntrainer(options).options");
    let mut scope = rhai::Scope::new();
    scope.push("ARGS", args.iter().map(|a| rhai::Dynamic::from(a.clone())).collect::<rhai::Array>());
    let v: rhai::Dynamic =
        sdtune::script::engine().eval_with_scope(&mut scope, &probe).unwrap_or_else(|e| panic!("{e}\n{probe}"));
    sdtune::script::to_json(&v).unwrap()
}

/// A config's options cut to a short run: `max_train_steps` 2 at `resolution`, no samples.
fn quick(mut flat: serde_json::Map<String, Value>, resolution: &str) -> serde_json::Map<String, Value> {
    flat.insert("max_train_steps".into(), json!(2));
    flat.remove("max_train_epochs");
    flat.insert("resolution".into(), json!(resolution));
    flat.insert("min_bucket_reso".into(), json!(64));
    flat.remove("sample_every_n_steps");
    flat
}

/// The recipe built directly and written as a script resolve the same options; the script runs. Returns the
/// resolved options and the script.
fn script_runs_as_the_direct_route(
    name: &str,
    recipe: &Value,
    report: &import::Report,
    dir: &std::path::Path,
) -> (Value, String) {
    let direct = build::build(recipe).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let want = direct.resolved_options().unwrap();
    drop(direct);
    let script = import::rhai::script(recipe, report, name, "test");
    let args: Vec<String> = [&recipe["model"], &recipe["dataset"], &recipe["train"]["output_dir"]]
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(script_options(&script, &args), want, "{name}: the script resolves other options\n{script}");
    let p = dir.join("recipe.rhai");
    std::fs::write(&p, &script).unwrap();
    sdtune::script::run_file(&p, &args).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    (want, script)
}

#[test]
fn imported_lora_recipes_resolve_like_the_direct_route_and_run_on_tiny_sd15() {
    for name in ["locon-AdamW.json", "preset-sd15_-_EDG_LoraOptiSettings.json"] {
        let dir = scratch(&format!("import-run-{}", &name[..8]));
        let imp = import::kohya(&config(name)).unwrap();
        // keep the test short and small: two optimizer steps at 64×80, no samples
        let (recipe, _) = build::recipe_from_flat(quick(local(imp.options.clone(), &dir), "64,80")).unwrap();
        let (want, _) = script_runs_as_the_direct_route(name, &recipe, &imp.report, &dir);
        // and kohya_ss's meaning holds in the resolved run
        let t = &want["train"];
        if name.starts_with("locon") {
            assert_eq!((t["learning_rate"].clone(), t["unet_lr"].clone()), (json!(0.0005), json!(0.0001)));
            assert_eq!(t["gradient_accumulation_steps"], json!(4));
            assert_eq!(t["scale_weight_norms"], json!(1.0));
            assert!(want["network"].as_str().unwrap().contains("conv_dim: Some(16)"), "{}", want["network"]);
            assert_eq!(want["model"]["clip_skip"], json!(2));
        } else {
            assert_eq!(t["optimizer_type"], "AdamW8bit");
            assert!(want["datasets"][0].as_str().unwrap().contains("resolution: (64, 80)"), "{}", want["datasets"]);
        }
        // the recipe ran as a script
        assert!(dir
            .join("out")
            .join(format!("{}.safetensors", recipe["train"]["output_name"].as_str().unwrap_or("last")))
            .is_file());
    }
}

#[test]
fn imported_dreambooth_configs_fine_tune_the_model_like_the_direct_route() {
    for (name, model) in [
        ("dreambooth-AdamW.json", "tiny-sd15/tiny-sd15.safetensors"),
        ("SDXL-Standard-AdamW.json", "tiny-sdxl/tiny-sdxl.safetensors"),
    ] {
        let dir = scratch(&format!("import-db-{}", &name[..4]));
        let imp = import::kohya(&config(name)).unwrap();
        let o = &imp.options;
        // kohya_ss's DreamBooth tab: train_db.py / sdxl_train.py with the text encoder at learning_rate_te(1)
        assert_eq!(o["fine_tune"], json!(true));
        assert!(!o.contains_key("network_module"));
        let gui: Value = serde_json::from_str(&std::fs::read_to_string(config(name)).unwrap()).unwrap();
        assert_eq!(o["learning_rate"], gui["learning_rate"]);
        // SDXL: sdxl_train.py's own LR per text encoder
        let te_keys: &[&str] =
            if name.starts_with("SDXL") { &["learning_rate_te1", "learning_rate_te2"] } else { &["learning_rate_te"] };
        for k in te_keys {
            assert_eq!(o[*k], json!(1e-05), "{name}: {k}");
        }
        assert_eq!(o["save_model_as"], "safetensors");
        let flat = quick(local_with(imp.options.clone(), &dir, model), "64,64");
        let (recipe, _) = build::recipe_from_flat(flat).unwrap();
        let (want, script) = script_runs_as_the_direct_route(name, &recipe, &imp.report, &dir);
        assert!(want["network"].as_str().unwrap().starts_with("full fine-tuning"), "{}", want["network"]);
        for k in te_keys {
            let resolved = if *k == "learning_rate_te" { "text_encoder_lr" } else { k };
            assert_eq!(want["train"][resolved], json!(1e-05), "{name}: {k}");
        }
        assert!(!script.contains("lora(") && !script.contains("network: network"), "{script}");
        // the fine-tuned model, in the config's save_precision (fp16), loads as a model of its family
        let out = dir.join("out").join(format!("{}.safetensors", recipe["train"]["output_name"].as_str().unwrap()));
        let m = load(&out);
        assert_eq!(m.family, load(&fixture(model)).family);
        let conv = sdtune::io::tensors::read_safetensors(&out, None, &candle_core::Device::Cpu).unwrap();
        assert!(conv.tensors.values().all(|t| t.dtype() == candle_core::DType::F16), "save_precision fp16");
    }
}

#[test]
fn imported_lycoris_configs_train_and_save_lycoris_files() {
    // kohya_ss' LyCORIS/LoHa (an SDXL config) and LyCORIS/LoKr (an SD 1.5 preset): lycoris.kohya with the
    // network_args the GUI writes, every one of them
    for (name, model, algo, prefix) in [
        ("loha-Prodigy.json", "tiny-sdxl/tiny-sdxl.safetensors", "loha", ".hada_w"),
        ("preset-lokr-sd15.json", "tiny-sd15/tiny-sd15.safetensors", "lokr", ".lokr_w"),
    ] {
        let dir = scratch(&format!("import-lyco-{algo}"));
        let imp = import::kohya(&config(name)).unwrap();
        let o = &imp.options;
        assert_eq!(o["network_module"], "lycoris.kohya");
        let args: Vec<&str> = o["network_args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        let keys: Vec<&str> = args.iter().map(|a| a.split('=').next().unwrap()).collect();
        let mut want = vec![
            "preset",
            "conv_dim",
            "conv_alpha",
            "use_tucker",
            "rank_dropout",
            "bypass_mode",
            "dora_wd",
            "module_dropout",
        ];
        want.extend(if algo == "lokr" {
            &["factor", "use_cp", "use_scalar", "decompose_both"][..]
        } else {
            &["use_scalar"][..]
        });
        want.extend(["rank_dropout_scale", "algo", "train_norm"]);
        assert_eq!(keys, want, "{name}: the GUI's network_args, in its order");
        assert!(
            args.contains(&format!("algo={algo}").as_str())
                && args.contains(&"preset=full")
                && args.contains(&"use_tucker=False")
        );
        let lines = imp.report.lines().join("\n");
        assert!(!lines.contains(": use_tucker: ") && !lines.contains(": LyCORIS_preset: "), "{lines}");
        let flat = quick(local_with(imp.options.clone(), &dir, model), "64,64");
        let (recipe, _) = build::recipe_from_flat(flat).unwrap();
        let (want, _) = script_runs_as_the_direct_route(name, &recipe, &imp.report, &dir);
        let debug_name = if algo == "loha" { "algo: Loha" } else { "algo: Lokr" };
        assert!(want["network"].as_str().unwrap().contains(debug_name), "{}", want["network"]);
        let stem = recipe["train"]["output_name"].as_str().unwrap_or("last");
        let out = dir.join("out").join(format!("{stem}.safetensors"));
        let saved = sdtune::io::tensors::read_safetensors(&out, None, &candle_core::Device::Cpu).unwrap();
        assert!(saved.tensors.keys().any(|k| k.contains(prefix)), "{name}: {prefix}* keys");
        assert!(!saved.tensors.keys().any(|k| k.contains(".lora_down")));
        assert_eq!(saved.metadata["ss_network_module"], "lycoris.kohya");
        let margs: Value = serde_json::from_str(&saved.metadata["ss_network_args"]).unwrap();
        assert_eq!((margs["algo"].as_str(), margs["preset"].as_str()), (Some(algo), Some("full")));
        // and it loads back as the network it is
        let m = load(&fixture(model));
        let net = sdtune::networks::file::load(&out, &m).unwrap();
        assert_eq!(net.config.lycoris.as_ref().unwrap().algo.name(), algo);
    } // LyCORIS/LoCon (the GUI's legacy `LoCon` too), here with Tucker-decomposed 3×3 convs
    let dir = scratch("import-lyco-locon");
    let mut gui: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(config("locon-AdamW.json")).unwrap()).unwrap();
    gui.insert("LoRA_type".into(), json!("LyCORIS/LoCon"));
    gui.insert("use_tucker".into(), json!(true));
    let path = dir.join("locon.json");
    std::fs::write(&path, serde_json::to_string(&gui).unwrap()).unwrap();
    let imp = import::kohya(&path).unwrap();
    let args: Vec<&str> = imp.options["network_args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(
        args.contains(&"algo=locon") && args.contains(&"use_tucker=True") && args.contains(&"conv_dim=16"),
        "{args:?}"
    );
    let (recipe, _) = build::recipe_from_flat(quick(local(imp.options.clone(), &dir), "64,64")).unwrap();
    script_runs_as_the_direct_route("locon.json", &recipe, &imp.report, &dir);
    let stem = recipe["train"]["output_name"].as_str().unwrap_or("last");
    let saved = sdtune::io::tensors::read_safetensors(
        &dir.join("out").join(format!("{stem}.safetensors")),
        None,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(saved.tensors.keys().any(|k| k.ends_with(".lora_mid.weight")), "Tucker convs have a mid");
}

#[test]
fn an_imported_textual_inversion_config_trains_its_word() {
    let dir = scratch("import-ti");
    let imp = import::kohya(&config("TI-AdamW8bit.json")).unwrap();
    let o = &imp.options;
    assert_eq!((o["token_string"].clone(), o["init_word"].clone()), (json!("zxc"), json!("*")));
    assert_eq!((o["num_vectors_per_token"].clone(), o["use_style_template"].clone()), (json!(8), json!(true)));
    assert!(!o.contains_key("network_module") && !o.contains_key("fine_tune"));
    let (recipe, _) = build::recipe_from_flat(quick(local(imp.options.clone(), &dir), "64,64")).unwrap();
    let (want, script) = script_runs_as_the_direct_route("TI-AdamW8bit.json", &recipe, &imp.report, &dir);
    assert_eq!(want["network"], json!("textual inversion: \"zxc\", 8 vectors"));
    assert!(!script.contains("lora("), "{script}");
    let out = dir.join("out/TI-Adamw8bit.safetensors");
    let f = sdtune::io::tensors::read_safetensors(&out, None, &candle_core::Device::Cpu).unwrap();
    assert_eq!(f.tensors["emb_params"].dims(), &[8, 32]);
    assert_eq!(f.tensors["emb_params"].dtype(), candle_core::DType::F16, "save_precision fp16");
}

#[test]
fn an_imported_finetuning_config_trains_the_model_on_its_metadata() {
    let dir = scratch("import-ft");
    let imp = import::kohya(&config("finetune-AdamW.json")).unwrap();
    let o = &imp.options;
    // fine_tune.py on image_folder with train_dir's caption metadata (use_latent_files "No"), 50 repeats, the text
    // encoder trained at learning_rate_te
    assert_eq!((o["fine_tune"].clone(), o["in_json"].clone()), (json!(true), json!("./test/meta-1_cap5.json")));
    assert_eq!(o["train_data_dir"], json!("./test/img/10_darius kawasaki person"));
    assert_eq!((o["dataset_repeats"].clone(), o["train_text_encoder"].clone()), (json!(50), json!(true)));
    assert_eq!(o["learning_rate_te"], json!(5e-06));
    assert!(!o.contains_key("block_lr"), "the GUI's empty block_lr is not passed");
    // an SDXL Finetuning config's block_lr goes to sdxl_train.py as given
    let mut gui: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(config("finetune-AdamW.json")).unwrap()).unwrap();
    let lrs = vec!["1e-6"; 23].join(",");
    gui.insert("block_lr".into(), json!(lrs));
    gui.insert("sdxl_checkbox".into(), json!(true));
    let p = dir.join("ft-block-lr.json");
    std::fs::write(&p, serde_json::to_string(&gui).unwrap()).unwrap();
    let with = import::kohya(&p).unwrap();
    assert_eq!(with.options["block_lr"], json!(lrs));
    assert!(!with.report.lines().join("\n").contains("block_lr"), "{:?}", with.report.lines());
    // the images and a metadata file as merge_captions_to_metadata.py writes it
    let data = sdtune::data::synthetic::write_shapes(&dir.join("data"), "toy", 1, 4, 64, 0).unwrap();
    let images = data.join("1_toy");
    let mut meta = serde_json::Map::new();
    for e in std::fs::read_dir(&images).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "txt") {
            let caption = std::fs::read_to_string(&p).unwrap();
            meta.insert(p.file_stem().unwrap().to_string_lossy().into_owned(), json!({ "caption": caption }));
        }
    }
    std::fs::write(dir.join("meta.json"), Value::Object(meta).to_string()).unwrap();
    let mut flat = quick(local(imp.options.clone(), &dir), "64,64");
    flat.insert("train_data_dir".into(), json!(images));
    flat.insert("in_json".into(), json!(dir.join("meta.json")));
    let (recipe, _) = build::recipe_from_flat(flat).unwrap();
    let (want, _) = script_runs_as_the_direct_route("finetune-AdamW.json", &recipe, &imp.report, &dir);
    assert!(want["network"].as_str().unwrap().starts_with("full fine-tuning"), "{}", want["network"]);
    assert!(want["datasets"][0].as_str().unwrap().contains("metadata_file: Some("), "{}", want["datasets"]);
    assert!(dir.join("out/test_ft.safetensors").is_file());
}

#[test]
fn sdtune_import_writes_a_recipe_and_refuses_to_overwrite() {
    let dir = scratch("import-cli");
    let out = dir.join("locon.rhai");
    // in the scratch folder: the config's relative paths (logging_dir = ./test/logs) land there, not in the source tree
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sdtune")).args(args).current_dir(&dir).output().unwrap()
    };
    let cfg = config("locon-AdamW.json");
    let o = run(&["import", "kohya", cfg.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("let network = lora(model, #{") && text.contains("conv_dim: 16"), "{text}");
    assert!(dir.join("locon.prompts.txt").is_file());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not carried over: xformers"));
    let again = run(&["import", "kohya", cfg.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already exists"));
    // an unsupported config: the report, no recipe
    let mut ia3: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(config("loha-Prodigy.json")).unwrap()).unwrap();
    ia3.insert("LoRA_type".into(), json!("LyCORIS/iA3"));
    let ia3_path = dir.join("ia3.json");
    std::fs::write(&ia3_path, serde_json::to_string(&ia3).unwrap()).unwrap();
    let o = run(&["import", "kohya", ia3_path.to_str().unwrap(), "-o", dir.join("ia3.rhai").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("LyCORIS/iA3 is not supported yet"));
    assert!(!dir.join("ia3.rhai").exists());
    // `sdtune train --kohya`: the config runs directly, flags win
    let data = sdtune::data::synthetic::write_shapes(&dir.join("data"), "toy", 1, 2, 64, 0).unwrap();
    let model = fixture("tiny-sd15/tiny-sd15.safetensors");
    let o = run(&[
        "train",
        "--kohya",
        cfg.to_str().unwrap(),
        "--pretrained_model_name_or_path",
        model.to_str().unwrap(),
        "--train_data_dir",
        data.to_str().unwrap(),
        "--output_dir",
        dir.join("trained").to_str().unwrap(),
        "--resolution",
        "64",
        "--min_bucket_reso",
        "64",
        "--max_train_steps",
        "1",
        "--gradient_accumulation_steps",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dir.join("trained/locon-AdamW.safetensors").is_file());
    let meta = sdtune::io::tensors::read_metadata(&dir.join("trained/locon-AdamW.safetensors")).unwrap();
    assert_eq!(
        meta["ss_network_args"],
        r#"{"conv_dim": "16", "conv_alpha": "8.0", "rank_dropout": "0.1", "module_dropout": "0.1"}"#
    );
    // sd-scripts TOML
    let toml = dir.join("cfg.toml");
    std::fs::write(
        &toml,
        "[model]\npretrained_model_name_or_path = \"m.safetensors\"\n[train]\nlearning_rate = 1e-4\nnetwork_dim = 8\n",
    )
    .unwrap();
    let o = run(&["import", "sd-scripts", toml.to_str().unwrap(), "-o", dir.join("cfg.rhai").to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(dir.join("cfg.rhai")).unwrap();
    assert!(text.contains("\"m.safetensors\"") && text.contains("learning_rate: 0.0001"), "{text}");
}

#[test]
fn the_stdlib_edg_preset_is_what_importing_kohya_ss_preset_gives() {
    let v: rhai::Dynamic =
        sdtune::script::engine().eval("import \"lora\" as lora; lora::sd15_edg_lora_opti()").unwrap();
    let preset = sdtune::script::to_json(&v).unwrap();
    let imp = import::kohya(&config("preset-sd15_-_EDG_LoraOptiSettings.json")).unwrap();
    let o = &imp.options;
    let same = |section: &str, key: &str, flat_key: &str| {
        let a = &preset[section][key];
        let b = &o[flat_key];
        let num = |v: &Value| v.as_f64();
        assert!(
            a == b || (num(a).is_some() && num(a) == num(b)),
            "{section}.{key} = {a} but the import gives {flat_key} = {b}"
        );
    };
    same("model", "clip_skip", "clip_skip");
    same("dataset", "resolution", "resolution");
    same("dataset", "batch_size", "train_batch_size");
    same("dataset", "caption_extension", "caption_extension");
    same("network", "network_dim", "network_dim");
    same("network", "network_alpha", "network_alpha");
    for k in [
        "optimizer_type",
        "learning_rate",
        "unet_lr",
        "text_encoder_lr",
        "lr_scheduler",
        "noise_offset",
        "max_train_epochs",
        "seed",
        "mixed_precision",
        "save_precision",
        "cache_latents",
    ] {
        same("train", k, k);
    }
    // and it runs through lora::train_with (a 64-pixel, 2-step version on tiny-sd15)
    let dir = scratch("stdlib-run");
    let data = sdtune::data::synthetic::write_shapes(&dir.join("data"), "toy", 1, 3, 64, 0).unwrap();
    let script = format!(
        "import \"lora\" as lora;\n\
         let p = lora::adjust(lora::sd15_edg_lora_opti(), #{{ dataset: #{{ resolution: 64 }}, train: #{{ max_train_steps: 2, max_train_epochs: (), optimizer_type: \"AdamW\" }} }});\n\
         let run = lora::train_with(p, \"{}\", \"{}\", \"{}\");\n\
         if run.step != 2 {{ throw \"expected 2 steps\"; }}",
        fixture("tiny-sd15/tiny-sd15.safetensors").display(),
        data.display(),
        dir.join("out").display()
    );
    sdtune::script::engine().run(&script).unwrap();
    assert!(dir.join("out/last.safetensors").is_file());
}

#[test]
fn sd_scripts_dataset_tomls_import_as_recipes_on_them() {
    let dir = scratch("import-datasets");
    for name in ["dataset.toml", "dataset-multires.toml", "dataset-finetune.toml"] {
        let imp = import::sd_scripts(&config(name)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(imp.report.check_runnable(&config(name)).is_ok(), "{name}: {:?}", imp.report.lines());
        assert_eq!(imp.options["dataset_config"], json!(config(name).display().to_string()));
        let lines = imp.report.lines().join("\n");
        assert!(lines.contains("a dataset config"), "{lines}");
        // their image folders point into the kohya_ss tree: reported, kept as given
        assert!(lines.contains("does not exist here"), "{name}: {lines}");
        let (recipe, _) = build::recipe_from_flat(imp.options).unwrap();
        let script = import::rhai::script(&recipe, &imp.report, name, "test");
        assert!(script.contains("throw \"pass the model to train"), "{script}");
        let out = dir.join(format!("{name}.rhai"));
        std::fs::write(&out, &script).unwrap();
        // it parses; run without arguments it asks for the model
        let e = sdtune::script::run_file(&out, &[]).unwrap_err();
        assert!(e.contains("pass the model to train"), "{e}");
    }
    // a GUI config's kohya_ss-tree paths and Hugging Face ids are reported
    let imp = import::kohya(&config("locon-AdamW.json")).unwrap();
    let lines = imp.report.lines().join("\n");
    assert!(lines.contains("runwayml/stable-diffusion-v1-5 is a Hugging Face model id"), "{lines}");
    assert!(lines.contains("./test/img does not exist here"), "{lines}");
}

/// kohya_ss's SDXL LoRA preset imports cleanly and its recipe trains a LoRA on the tiny SDXL model with sd-scripts'
/// SDXL module names.
#[test]
fn the_kohya_sdxl_preset_runs_on_tiny_sdxl() {
    let name = "preset-SDXL_-_LoRA_AI_Now_prodigy_v1.0.json";
    let dir = scratch("import-run-sdxl");
    let imp = import::kohya(&config(name)).unwrap();
    let mut flat = local(imp.options.clone(), &dir);
    flat.insert("pretrained_model_name_or_path".into(), json!(fixture("tiny-sdxl/tiny-sdxl.safetensors")));
    flat.insert("max_train_epochs".into(), json!(2)); // the preset's 160 epochs of one step each, cut short
    flat.insert("resolution".into(), json!("64,64"));
    flat.insert("min_bucket_reso".into(), json!(64));
    flat.remove("sample_every_n_steps");
    let (recipe, _) = build::recipe_from_flat(flat).unwrap();
    let script = import::rhai::script(&recipe, &imp.report, name, "test");
    let args: Vec<String> = [&recipe["model"], &recipe["dataset"], &recipe["train"]["output_dir"]]
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let p = dir.join("recipe.rhai");
    std::fs::write(&p, &script).unwrap();
    if let Err(e) = sdtune::script::run_file(&p, &args) {
        panic!("{name}: {e}");
    }
    let out =
        dir.join("out").join(format!("{}.safetensors", recipe["train"]["output_name"].as_str().unwrap_or("last")));
    let t = sdtune::io::tensors::read_safetensors(&out, None, &candle_core::Device::Cpu).unwrap().tensors;
    assert!(t.keys().any(|k| k.starts_with("lora_unet_input_blocks_")), "SGM UNet names");
    let meta = sdtune::io::tensors::read_metadata(&out).unwrap();
    assert_eq!(meta["ss_base_model_version"], "sdxl_base_v1-0");
}

/// The GUI's LoRA+ fields go to `network_args` as kohya_ss passes them (0 means off); a long `max_token_length` is
/// taken over.
#[test]
fn kohya_loraplus_ratios_become_network_args() {
    let dir = scratch("import-loraplus");
    let mut gui: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(config("locon-AdamW.json")).unwrap()).unwrap();
    gui.insert("loraplus_lr_ratio".into(), json!(16));
    gui.insert("loraplus_unet_lr_ratio".into(), json!(0));
    gui.insert("loraplus_text_encoder_lr_ratio".into(), json!("4"));
    gui.insert("max_token_length".into(), json!("225"));
    let path = dir.join("plus.json");
    std::fs::write(&path, serde_json::to_string(&gui).unwrap()).unwrap();
    let imp = import::kohya(&path).unwrap();
    let args: Vec<&str> = imp.options["network_args"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert!(args.contains(&"loraplus_lr_ratio=16") && args.contains(&"loraplus_text_encoder_lr_ratio=4"), "{args:?}");
    assert!(!args.iter().any(|a| a.starts_with("loraplus_unet_lr_ratio")), "{args:?}");
    let (recipe, _) = build::recipe_from_flat(imp.options.clone()).unwrap();
    assert_eq!(recipe["network"]["loraplus_lr_ratio"], json!(16));
    assert_eq!(recipe["train"]["max_token_length"], json!(225));
}
