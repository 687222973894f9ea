//! LoRA training: it learns, it resumes exactly, and bad runs stop with clear errors.

use crate::common::*;
use sdtune::networks::Component;
use sdtune::train::{build, Batch};
use serde_json::json;

fn recipe(dir: &std::path::Path, train: serde_json::Value) -> serde_json::Value {
    training_recipe(dir, "tiny-sd15/tiny-sd15.safetensors", json!({ "dim": 8, "alpha": 8.0 }), train)
}

/// `recipe` writing to `dir/out` as `out`, without progress logging.
fn recipe_to(dir: &std::path::Path, out: &str, mut train: serde_json::Value) -> serde_json::Value {
    let o = train.as_object_mut().unwrap();
    o.insert("output_dir".into(), json!(dir.join("out")));
    o.insert("output_name".into(), json!(out));
    o.insert("log_every_n_steps".into(), json!(0));
    recipe(dir, train)
}

fn weights(tr: &sdtune::train::Trainer) -> Vec<f32> {
    lora_pairs(tr.network().unwrap())
        .iter()
        .flat_map(|(_, d, u)| {
            let f32s = |t: &candle_core::Tensor| {
                t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap()
            };
            let mut v = f32s(d.as_tensor());
            v.extend(f32s(u.as_tensor()));
            v
        })
        .collect()
}

#[test]
fn a_trained_lora_lowers_the_loss_on_its_data() {
    let dir = scratch("train-learn");
    let mut tr = build::build(&recipe(
        &dir,
        json!({
            "learning_rate": 1e-3, "max_train_steps": 120, "seed": 3, "cache_latents": true,
            "output_dir": dir.join("out"), "output_name": "learn", "log_every_n_steps": 0,
        }),
    ))
    .unwrap();
    // fixed evaluation batches: every image, fixed noise and timesteps
    let eval = fixed_batches(&tr);
    let eval_loss = |tr: &sdtune::train::Trainer| mean_loss(tr, &eval);
    let before = eval_loss(&tr);
    tr.run(&mut |_, _| {}).unwrap();
    let after = eval_loss(&tr);
    eprintln!(
        "evaluation loss: untrained LoRA {before:.4}, after 120 steps {after:.4} ({:.1}% lower)",
        100.0 * (1.0 - after / before)
    );
    assert!(after < 0.85 * before, "loss {before} → {after}");
    let out = dir.join("out/learn.safetensors");
    assert!(out.is_file());
    let meta = sdtune::io::tensors::read_metadata(&out).unwrap();
    assert_eq!(meta["ss_steps"], "120");
    assert_eq!(meta["ss_network_dim"], "8");
    assert_eq!(meta["ss_optimizer"], "torch.optim.adamw.AdamW");
    let lines = std::fs::read_to_string(dir.join("out/learn-metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 120);
    assert!(lines.lines().last().unwrap().contains("\"lr/unet\""));
}

/// The largest difference between two runs' LoRA weights.
fn weight_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// Resumes the state in `state` (which must be at step `at`) to its end; the largest difference from the weights of
/// the uninterrupted run `full`.
fn resume_to_end(state: &std::path::Path, at: usize, full: &sdtune::train::Trainer) -> f32 {
    let mut resumed = build::resume(state, None).unwrap();
    assert_eq!(resumed.step, at);
    resumed.run(&mut |_, _| {}).unwrap();
    assert_eq!(resumed.step, full.step);
    weight_diff(&weights(full), &weights(&resumed))
}

/// Runs 12 steps uninterrupted, and 5 + resume + 7; returns max |Δw| and the saved optimizer state's dtypes.
fn stop_and_resume(name: &str, dim: usize, extra: serde_json::Value) -> (f32, Vec<candle_core::DType>) {
    let dir = scratch(&format!("train-resume-{name}"));
    let train = |out: &str| {
        let mut t = json!({
            "learning_rate": 5e-4, "max_train_steps": 12, "seed": 5, "lr_scheduler": "cosine", "lr_warmup_steps": 2,
            "output_dir": dir.join("out"), "output_name": out, "log_every_n_steps": 0, "noise_offset": 0.05,
        });
        t.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let mut r = recipe(&dir, t);
        r["network"] = json!({ "dim": dim, "alpha": dim as f64 });
        r
    };
    let mut full = build::build(&train("full")).unwrap();
    full.run(&mut |_, _| {}).unwrap();
    let mut first = build::build(&train("part")).unwrap();
    first
        .run(&mut |t, _| {
            if t.step == 5 {
                t.stop.store(true, std::sync::atomic::Ordering::SeqCst)
            }
        })
        .unwrap();
    assert!(first.stopped);
    assert_eq!(first.step, 5);
    let state = first.state_dir();
    assert!(state.join("state.json").is_file() && state.join("optimizer.safetensors").is_file());
    let saved =
        sdtune::io::tensors::read_safetensors(&state.join("optimizer.safetensors"), None, &candle_core::Device::Cpu)
            .unwrap();
    let mut dtypes: Vec<candle_core::DType> = saved.tensors.values().map(|t| t.dtype()).collect();
    dtypes.dedup();
    drop(first);
    let d = resume_to_end(&state, 5, &full);
    let moved = weights(&full).iter().map(|x| x.abs()).fold(0f32, f32::max);
    eprintln!("{name}: resumed vs uninterrupted: max |Δw| = {d:e} (max |w| {moved:.3})");
    (d, dtypes)
}

#[test]
fn resuming_a_stopped_run_gives_the_uninterrupted_weights() {
    let (d, _) = stop_and_resume("adamw", 8, json!({}));
    assert!(d <= 1e-6, "max |Δw| = {d}");
}

#[test]
fn every_optimizer_resumes_exactly() {
    // Prodigy's and D-Adaptation's d estimates and the 8-bit moments travel in the state too
    // (through sd-scripts' legacy flag use_8bit_adam)
    let (d, dtypes) = stop_and_resume("adamw8bit", 64, json!({ "use_8bit_adam": true }));
    assert!(d <= 1e-6, "AdamW8bit: max |Δw| = {d}");
    assert!(dtypes.contains(&candle_core::DType::U8), "no 8-bit state was saved: {dtypes:?}");
    for (name, opt) in [
        ("prodigy", json!({ "optimizer_type": "Prodigy", "learning_rate": 1.0 })),
        ("dadaptadam", json!({ "optimizer_type": "DAdaptAdam", "learning_rate": 1.0 })),
        ("adafactor", json!({ "optimizer_type": "AdaFactor", "lr_scheduler": "adafactor", "lr_warmup_steps": 0 })),
    ] {
        let (d, _) = stop_and_resume(name, 8, opt);
        assert!(d <= 1e-6, "{name}: max |Δw| = {d}");
    }
}

#[test]
fn gradient_accumulation_ends_its_window_with_the_epoch_and_resumes_exactly_from_inside_one() {
    // 4 batches per epoch, 3 per optimizer step: as accelerate, the epoch's 4th batch makes a step on its own, so
    // sd-scripts' ceil(4 / 3) = 2 steps per epoch and 4 steps take 2 epochs
    let dir = scratch("train-resume-accum");
    let train = |out: &str| {
        let options =
            json!({ "learning_rate": 5e-4, "max_train_steps": 4, "seed": 9, "gradient_accumulation_steps": 3 });
        recipe_to(&dir, out, options)
    };
    let mut full = build::build(&train("full")).unwrap();
    assert_eq!((full.total_steps, full.epochs), (4, 2));
    let mut steps_at = Vec::new();
    full.run(&mut |t, _| steps_at.push((t.epoch, t.batch_in_epoch))).unwrap();
    assert_eq!(full.step, 4);
    assert_eq!(steps_at, [(0, 3), (0, 4), (1, 3), (1, 4)], "(epoch, batches done) at each step");
    // a stop two batches into step 3's window: the state resumes at the window's start
    let mut first = build::build(&train("part")).unwrap();
    let stop = |t: &sdtune::train::Trainer, on: bool| t.stop.store(on, std::sync::atomic::Ordering::SeqCst);
    first.run(&mut |t, _| stop(t, t.step == 2)).unwrap();
    assert_eq!((first.step, first.epoch, first.batch_in_epoch), (2, 1, 0));
    stop(&first, false);
    first.train_next_batch().unwrap();
    first.train_next_batch().unwrap();
    assert_eq!((first.step, first.batch_in_epoch), (2, 2));
    stop(&first, true);
    first.run(&mut |_, _| {}).unwrap();
    assert!(first.stopped);
    let state = first.state_dir();
    drop(first);
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("state.json")).unwrap()).unwrap();
    let at = |k: &str| info[k].as_u64().unwrap();
    assert_eq!((at("step"), at("epoch"), at("batch_in_epoch")), (2, 1, 0));
    let d = resume_to_end(&state, 2, &full);
    eprintln!("stopped inside an accumulation window: resumed vs uninterrupted: max |Δw| = {d:e}");
    assert!(d <= 1e-6, "max |Δw| = {d}");
}

#[test]
fn a_batch_that_fails_saves_the_state_and_the_run_resumes_exactly() {
    // the images become unreadable after step 2 (as a GPU running out of memory would fail the step): the error
    // names the file and the saved state; with the images back, the resumed run ends where an uninterrupted one does
    let dir = scratch("train-fail-resume");
    let train = |out: &str| {
        let options = json!({
            "learning_rate": 5e-4, "max_train_steps": 5, "seed": 4, "save_every_n_steps": 1, "save_state": true,
        });
        recipe_to(&dir, out, options)
    };
    let mut full = build::build(&train("full")).unwrap();
    full.run(&mut |_, _| {}).unwrap();
    let images: Vec<_> = walk(&dir.join("data")).into_iter().filter(|p| p.extension().unwrap() == "png").collect();
    let originals: Vec<Vec<u8>> = images.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let mut part = build::build(&train("part")).unwrap();
    let e = part
        .run(&mut |t, _| {
            if t.step == 2 {
                // the state saved with step 1's network is there before the failure
                let info = std::fs::read_to_string(t.state_dir().join("state.json")).unwrap();
                assert!(info.contains("\"step\": 1"), "{info}");
                for p in &images {
                    std::fs::write(p, b"not a png").unwrap();
                }
            }
        })
        .unwrap_err();
    let msg = format!("{e:#}");
    eprintln!("{msg}");
    let state = dir.join("out/part-state");
    assert!(msg.contains("training stopped at step 2 of 5"), "{msg}");
    assert!(msg.contains(&format!("--resume {}`", state.display())), "{msg}");
    assert!(msg.contains(".png"), "the error names the unreadable image: {msg}");
    assert_eq!(part.state_dir(), state);
    drop(part);
    for (p, bytes) in images.iter().zip(&originals) {
        std::fs::write(p, bytes).unwrap();
    }
    let d = resume_to_end(&state, 2, &full);
    assert!(d <= 1e-6, "max |Δw| = {d}");
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn gradient_checkpointing_trains_the_same_weights() {
    // UNet and text-encoder LoRA with conv layers (resnet blocks), network and rank dropout (the recomputation must
    // draw the same masks) and module dropout; then text-encoder LoRA alone (the UNet's blocks have no adapters, and
    // only their context input needs a gradient): 3 steps each with and without checkpointing
    let dir = scratch("train-checkpointing");
    let run = |on: bool, network: &serde_json::Value, tag: &str| {
        let options = json!({
            "learning_rate": 0.5, "max_train_steps": 3, "seed": 11, "gradient_checkpointing": on,
            "optimizer_type": "SGDNesterov",
        });
        let mut r = recipe_to(&dir, &format!("ckpt-{tag}-{on}"), options);
        r["network"] = network.clone();
        let mut tr = build::build(&r).unwrap();
        let start = weights(&tr);
        sdtune::nn::profile::start();
        tr.run(&mut |_, _| {}).unwrap();
        let kinds: Vec<_> = sdtune::nn::profile::stop().into_iter().map(|(k, n, _)| (k, n)).collect();
        (start, weights(&tr), tr.losses.clone(), kinds)
    };
    let full = json!({
        "dim": 4, "alpha": 4.0, "conv_dim": 2, "conv_alpha": 1.0,
        "dropout": 0.1, "rank_dropout": 0.1, "module_dropout": 0.1,
    });
    let te_only = json!({ "dim": 4, "alpha": 4.0, "train_unet": false });
    for (name, tag, network) in [("UNet + text encoder", "all", full), ("text encoder only", "te", te_only)] {
        let (start, plain, plain_losses, plain_kinds) = run(false, &network, tag);
        let (_, ckpt, ckpt_losses, ckpt_kinds) = run(true, &network, tag);
        let recomputed = |k: &[(&str, usize)]| k.iter().filter(|(n, _)| n.ends_with("(recomputed)")).count();
        assert_eq!(recomputed(&plain_kinds), 0);
        assert_eq!(recomputed(&ckpt_kinds), 3, "{name}: resnet, transformer and text-encoder blocks: {ckpt_kinds:?}");
        for (a, b) in plain_losses.iter().zip(&ckpt_losses) {
            assert!((a - b).abs() <= 1e-6 * a.abs(), "{name}: losses {plain_losses:?} and {ckpt_losses:?}");
        }
        // SGD: the weights move linearly in the gradients, which differ only in summation order
        let (d, moved) = (weight_diff(&plain, &ckpt), weight_diff(&plain, &start));
        eprintln!(
            "gradient checkpointing, {name}: max |Δw| = {d:e} over {} weights, which moved up to {moved:.3}",
            plain.len()
        );
        assert!(moved > 1e-2, "{name}: the steps barely moved the weights ({moved}): the comparison would be empty");
        assert!(d <= 1e-6, "{name}: max |Δw| = {d}");
    }
}

#[test]
fn fp16_runs_resume_exactly() {
    // fp16: the dynamic loss scale travels in the state
    let (d, _) = stop_and_resume("fp16", 8, json!({ "mixed_precision": "fp16" }));
    assert!(d <= 1e-6, "fp16: max |Δw| = {d}");
}

#[test]
fn prodigy_refuses_two_learning_rates() {
    let dir = scratch("train-prodigy-lrs");
    let e = build::build(&recipe(
        &dir,
        json!({ "optimizer_type": "Prodigy", "unet_lr": 1.0, "text_encoder_lr": 0.5, "max_train_steps": 1 }),
    ))
    .err()
    .unwrap();
    let e = format!("{e:#}");
    assert!(e.contains("one learning rate") && e.contains("textencoder"), "{e}");
    let e =
        build::build(&recipe(&dir, json!({ "optimizer_type": "AdamW", "lr_scheduler": "adafactor" }))).err().unwrap();
    assert!(format!("{e:#}").contains("needs optimizer_type AdaFactor"), "{e:#}");
}

#[test]
fn saves_every_n_steps_keep_the_last_n() {
    let dir = scratch("train-saves");
    let mut tr = build::build(&recipe(
        &dir,
        json!({
            "learning_rate": 1e-4, "max_train_steps": 6, "save_every_n_steps": 2, "save_last_n_steps": 2,
            "output_dir": dir.join("out"), "output_name": "s", "log_every_n_steps": 0, "save_precision": "fp16",
        }),
    ))
    .unwrap();
    tr.run(&mut |_, _| {}).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    assert_eq!(names, vec!["s-step00000004.safetensors", "s-step00000006.safetensors", "s.safetensors"]);
    let f =
        sdtune::io::tensors::read_safetensors(&dir.join("out/s.safetensors"), None, &candle_core::Device::Cpu).unwrap();
    assert!(f.tensors.values().all(|t| t.dtype() == candle_core::DType::F16), "save_precision fp16, alpha included");
}

#[test]
fn a_nan_loss_stops_the_run_naming_the_step_and_writes_nothing() {
    let dir = scratch("train-nan");
    let mut tr = build::build(&recipe(&dir, json!({
        "learning_rate": 1e30, "max_grad_norm": 0.0, "max_train_steps": 10, "output_dir": dir.join("out"), "output_name": "nan", "log_every_n_steps": 0,
    }))).unwrap();
    let e = tr.run(&mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("at step") && e.contains("training stopped"), "{e}");
    assert!(!dir.join("out/nan.safetensors").exists());
}

#[test]
fn an_unwritable_output_folder_fails_before_training() {
    let dir = scratch("train-ro");
    std::fs::write(dir.join("a-file"), b"x").unwrap();
    let mut tr = build::build(&recipe(
        &dir,
        json!({ "max_train_steps": 3, "output_dir": dir.join("a-file/out"), "log_every_n_steps": 0 }),
    ))
    .unwrap();
    let e = tr.run(&mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("a-file/out") && e.contains("output folder"), "{e}");
    assert_eq!(tr.step, 0);
}

#[test]
fn unknown_and_unsupported_options_are_named() {
    let dir = scratch("train-opts");
    let e = build::build(&recipe(&dir, json!({ "learning_rat": 1e-4 }))).err().unwrap().to_string();
    assert!(e.contains("learning_rat") && e.contains("learning_rate"), "{e}");
    let e = build::build(&recipe(&dir, json!({ "masked_loss": true }))).err().unwrap().to_string();
    assert!(e.contains("masked_loss") && e.contains("not supported yet"), "{e}");
    // cached text-encoder outputs: the same result computed each step, but sd-scripts' rule holds
    let e = build::build(&recipe(&dir, json!({ "cache_text_encoder_outputs": true }))).err().unwrap().to_string();
    assert!(e.contains("cannot be trained with cached text-encoder outputs"), "{e}");
    build::build(&recipe(&dir, json!({ "cache_text_encoder_outputs": true, "network_train_unet_only": true })))
        .unwrap();
    // given but off, as configs written in full have them: accepted
    let off = json!({ "max_token_length": 75, "full_fp16": false, "fp8_base": null, "network_weights": "" });
    build::build(&recipe(&dir, off)).unwrap();
    let e = build::build(&recipe(&dir, json!({ "full_fp16": true }))).err().unwrap().to_string();
    assert!(e.contains("full_fp16") && e.contains("not supported yet"), "{e}");
    let e = build::build(&recipe(&dir, json!({ "use_8bit_adam": true, "optimizer_type": "Lion" }))).err().unwrap();
    assert!(e.to_string().contains("use_8bit_adam and optimizer_type Lion"), "{e}");
    let e = build::build(&recipe(&dir, json!({ "optimizer_type": "Lion8bit" }))).err().unwrap().to_string();
    assert!(e.contains("Lion8bit") && e.contains("not supported yet"), "{e}");
}

#[test]
fn sdtune_train_takes_sd_scripts_flags_and_config_files() {
    let dir = scratch("train-cli");
    let data = sdtune::data::synthetic::write_shapes(&dir.join("data"), "toy", 1, 4, 64, 0).unwrap();
    std::fs::write(
        dir.join("cfg.toml"),
        format!(
            "[model]\npretrained_model_name_or_path = {:?}\n[dataset]\ntrain_data_dir = {:?}\nresolution = 64\ncaption_extension = \".txt\"\ntrain_batch_size = 2\n[training]\nlearning_rate = 1e-4\nmax_train_steps = 100\nnetwork_dim = 4\n",
            fixture("tiny-sd15").to_string_lossy(),
            data.to_string_lossy()
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let run = |extra: &[&str]| {
        let mut a = vec!["train", "--config_file", dir.join("cfg.toml").to_str().unwrap().to_string().leak() as &str];
        a.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_sdtune")).args(&a).output().unwrap()
    };
    // flags beat the file: 3 steps, not 100
    let o = run(&[
        "--max_train_steps",
        "3",
        "--output_dir",
        out.to_str().unwrap(),
        "--output_name",
        "cli",
        "--optimizer_args",
        "weight_decay=0.1",
        "betas=0.9,0.99",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta = sdtune::io::tensors::read_metadata(&out.join("cli.safetensors")).unwrap();
    assert_eq!(meta["ss_steps"], "3");
    assert!(meta["ss_optimizer"].contains("weight_decay=0.1"), "{}", meta["ss_optimizer"]);
    // the final file is never overwritten unasked
    let o = run(&["--max_train_steps", "3", "--output_dir", out.to_str().unwrap(), "--output_name", "cli"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    let o = run(&["--max_train_steps", "3", "--output_dir", out.to_str().unwrap(), "--device", "gpu0"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("unknown device \"gpu0\"") && e.lines().count() == 1, "{e}");
    let o = run(&["--max_train_steps", "3", "--output_dir", out.to_str().unwrap(), "--lr_schedulr", "cosine"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("lr_schedulr") && e.lines().count() == 1, "{e}");
}

#[test]
fn tensorboard_events_and_metrics_are_written() {
    let dir = scratch("train-tb");
    let logs = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tb-cross");
    let _ = std::fs::remove_dir_all(&logs);
    let mut tr = build::build(&recipe(&dir, json!({
        "learning_rate": 1e-4, "max_train_steps": 4, "output_dir": dir.join("out"), "output_name": "tb", "logging_dir": logs, "log_every_n_steps": 0,
        "log_prefix": "run1-",
    }))).unwrap();
    tr.run(&mut |_, _| {}).unwrap();
    // the run's folder: logging_dir/{log_prefix}{output_name}
    let events: Vec<_> = std::fs::read_dir(logs.join("run1-tb")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(events.len(), 1);
    let bytes = std::fs::read(&events[0]).unwrap();
    // TFRecord framing: walk the records (length, crc, data, crc)
    let (mut at, mut records) = (0, 0);
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        at += 12 + len + 4;
        records += 1;
    }
    assert_eq!(at, bytes.len());
    assert_eq!(records, 1 + 4 + 1, "file version, 4 steps, 1 epoch mean (4 batches per epoch)");
    assert!(
        bytes.windows(12).any(|w| w == b"loss/current")
            && bytes.windows(7).any(|w| w == b"lr/unet")
            && bytes.windows(10).any(|w| w == b"loss/epoch")
    );
    assert!(logs.join("tb-metrics.jsonl").is_file());
}

#[test]
fn samples_are_rendered_during_training() {
    let dir = scratch("train-samples");
    std::fs::write(dir.join("prompts.txt"), "toy, a red circle --w 64 --h 64 --s 3 --d 1\n").unwrap();
    let mut tr = build::build(&recipe(&dir, json!({
        "learning_rate": 1e-4, "max_train_steps": 4, "output_dir": dir.join("out"), "output_name": "smp", "log_every_n_steps": 0,
        "sample_prompts": dir.join("prompts.txt"), "sample_every_n_steps": 2, "sample_at_first": true, "sample_sampler": "euler_a",
    }))).unwrap();
    tr.run(&mut |_, _| {}).unwrap();
    let pngs: Vec<_> = std::fs::read_dir(dir.join("out/sample")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(pngs.len(), 3, "at first, after step 2 and step 4: {pngs:?}");
    let img = sdtune::io::png::Image::load(&pngs[0]).unwrap();
    assert!(img.text_value("parameters").unwrap().contains("Sampler: Euler a"));
}

#[test]
fn ctrl_c_saves_a_state_that_resumes() {
    let dir = scratch("train-sigint");
    let data = sdtune::data::synthetic::write_shapes(&dir.join("data"), "toy", 4, 8, 64, 0).unwrap();
    let out = dir.join("out");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_sdtune"))
        .args([
            "train",
            "--pretrained_model_name_or_path",
            fixture("tiny-sd15").to_str().unwrap(),
            "--train_data_dir",
            data.to_str().unwrap(),
            "--resolution",
            "64",
            "--caption_extension",
            ".txt",
            "--train_batch_size",
            "2",
            "--max_train_steps",
            "400",
            "--output_dir",
            out.to_str().unwrap(),
            "--output_name",
            "int",
            "--learning_rate",
            "1e-4",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("int-metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map(|s| s.lines().count()).unwrap_or(0) < 3 {
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let ok = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    let o = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("stopped at step") && stdout.contains("--resume"), "{stdout}");
    let state = out.join("int-state");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("state.json")).unwrap()).unwrap();
    let stopped_at = info["step"].as_u64().unwrap();
    assert!((3..400).contains(&stopped_at));
    assert!(!out.join("int.safetensors").exists(), "no final file for a stopped run");
    // resume for a few steps only would need a different max; here just check the state rebuilds
    let tr = build::resume(&state, None).unwrap();
    assert_eq!(tr.step as u64, stopped_at);
    // another device on resume: named, and checked
    let tr = build::resume(&state, Some("cpu")).unwrap();
    assert!(tr.model.device.is_cpu());
    let e = format!("{:#}", build::resume(&state, Some("tpu")).err().unwrap());
    assert!(e.contains("unknown device \"tpu\""), "{e}");
    if !cfg!(feature = "cuda") {
        let e = format!("{:#}", build::resume(&state, Some("cuda")).err().unwrap());
        assert!(e.contains("built without CUDA"), "{e}");
    }
}

#[test]
fn mixed_precision_trains_a_half_precision_base_with_f32_lora_weights() {
    let dir = scratch("train-mp");
    let mut tr = build::build(&recipe(&dir, json!({
        "mixed_precision": "fp16", "learning_rate": 1e-3, "max_train_steps": 3, "output_dir": dir.join("out"), "log_every_n_steps": 0,
    }))).unwrap();
    assert_eq!(tr.model.dtype, candle_core::DType::F16);
    tr.run(&mut |_, _| {}).unwrap();
    assert!(tr.losses.iter().all(|l| l.is_finite()));
    assert!(lora_pairs(tr.network().unwrap()).iter().all(|(_, d, u)| d.as_tensor().dtype() == candle_core::DType::F32
        && u.as_tensor().dtype() == candle_core::DType::F32));
    // the fp16 loss scale: 2¹⁶ unless a step overflowed (then halved per skipped step)
    let s = tr.scaler.clone().expect("fp16 has a loss scaler");
    assert_eq!(s.scale * 2f64.powi(s.skipped as i32), 65536.0, "{s:?}");
    assert!(
        lora_pairs(tr.network().unwrap()).iter().any(|(_, _, u)| u
            .as_tensor()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0),
        "the LoRA learned something"
    );
    // full_bf16 needs bf16 mixed precision, whose bf16 base runs on CUDA only (candle has no CPU bf16 conv)
    let e = build::build(&recipe(&dir, json!({ "full_bf16": true }))).err().unwrap();
    assert!(format!("{e:#}").contains("full_bf16 needs mixed_precision bf16"), "{e:#}");
    // full_bf16's bf16 LoRA weights need a GPU (candle's CPU matmul has no bf16): a clear error here
    let e = build::build(&recipe(&dir, json!({ "mixed_precision": "bf16", "full_bf16": true }))).err().unwrap();
    assert!(format!("{e:#}").contains("full_bf16") && format!("{e:#}").contains("needs a GPU"), "{e:#}");
    // a bf16 network (what full_bf16 trains) with an f32 run is refused by name
    let model = std::sync::Arc::new(load(&fixture("tiny-sd15")));
    let cfg = sdtune::networks::NetworkConfig { dtype: candle_core::DType::BF16, ..Default::default() };
    let net = std::sync::Arc::new(sdtune::networks::Network::create(&model, &cfg, 0).unwrap());
    assert!(lora_pairs(&net)
        .iter()
        .all(|(_, d, u)| d.dtype() == candle_core::DType::BF16 && u.dtype() == candle_core::DType::BF16));
    let tcfg = sdtune::train::config::TrainConfig::from_json(json!({})).unwrap();
    let e = sdtune::train::Trainer::new(model, net.into(), None, tcfg, json!({})).err().unwrap().to_string();
    assert!(e.contains("set full_bf16"), "{e}");
    // a model loaded in f32 with mixed_precision fp16 is a clear error
    let model = std::sync::Arc::new(load(&fixture("tiny-sd15")));
    let net = std::sync::Arc::new(sdtune::networks::Network::create(&model, &Default::default(), 0).unwrap());
    let cfg = sdtune::train::config::TrainConfig::from_json(json!({ "mixed_precision": "fp16" })).unwrap();
    let e = sdtune::train::Trainer::new(model, net.into(), None, cfg, json!({})).err().unwrap().to_string();
    assert!(e.contains("mixed_precision fp16 needs the model loaded in f16"), "{e}");
}

#[test]
fn lora_fa_trains_up_only() {
    let dir = scratch("train-lora-fa");
    let mut r = recipe(
        &dir,
        json!({ "learning_rate": 1e-3, "max_train_steps": 3, "seed": 1, "output_dir": dir.join("out"),
                "output_name": "fa", "log_every_n_steps": 0 }),
    );
    r["network"] = json!({ "network_module": "networks.lora_fa", "dim": 8, "alpha": 8.0 });
    let mut tr = build::build(&r).unwrap();
    let downs = |tr: &sdtune::train::Trainer| -> Vec<Vec<f32>> {
        lora_pairs(tr.network().unwrap())
            .iter()
            .map(|(_, d, _)| d.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    let before = downs(&tr);
    // N(0, 2/(in + r)): the first module's sample std is near its target
    let (_, d0, _) = &lora_pairs(tr.network().unwrap())[0];
    let d0 = d0.as_tensor();
    let want = (2.0 / (d0.dims()[1] + 8) as f64).sqrt();
    let n = before[0].len() as f64;
    let got = (before[0].iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / n).sqrt();
    assert!((got / want - 1.0).abs() < 0.15, "down std {got} vs {want}");
    tr.run(&mut |_, _| {}).unwrap();
    assert_eq!(downs(&tr), before, "LoRA-FA keeps down frozen");
    let up_moved = lora_pairs(tr.network().unwrap())
        .iter()
        .any(|(_, _, u)| u.as_tensor().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    assert!(up_moved, "up trains");
    let meta = sdtune::io::tensors::read_metadata(&dir.join("out/fa.safetensors")).unwrap();
    assert_eq!(meta["ss_network_module"], "networks.lora_fa");
    let e = build::build(&{
        let mut r = r.clone();
        r["network"] = json!({ "network_module": "networks.dylora" });
        r
    })
    .err()
    .unwrap();
    assert!(format!("{e:#}").contains("networks.dylora is not supported yet"), "{e:#}");
}

#[test]
fn a_script_run_resumes_with_its_dataset_and_network_options() {
    let dir = scratch("train-script-resume");
    let data = sdtune::data::synthetic::write_shapes(&dir.join("data"), "toy", 1, 4, 64, 0).unwrap();
    let script = format!(
        r#"
        let m = load_model("{model}");
        let d = dataset("{data}", #{{ resolution: 64, caption_extension: ".txt", batch_size: 2 }});
        let t = trainer(#{{ model: m, dataset: d, network: lora(m, #{{ dim: 4, network_module: "networks.lora_fa" }}),
                           max_train_steps: 2, save_state: true, output_dir: "{out}", output_name: "s", log_every_n_steps: 0 }});
        t.run();
        "#,
        model = fixture("tiny-sd15/tiny-sd15.safetensors").display(),
        data = data.display(),
        out = dir.join("out").display()
    );
    sdtune::script::engine().run(&script).unwrap();
    let tr = build::resume(&dir.join("out/s-state"), None).unwrap();
    assert_eq!(tr.data.as_ref().unwrap().datasets[0].cfg.buckets.resolution, (64, 64), "dataset options kept");
    assert!(tr.network().unwrap().config.lora_fa, "network module kept");
}

/// LoRA+ (sd-scripts' `loraplus_lr_ratio`, `loraplus_unet_lr_ratio`, `loraplus_text_encoder_lr_ratio` network
/// args): each component's up weights get their own "<name> plus" group at LR × ratio, the component's ratio before
/// the common one. AdamW's first step moves every weight with a gradient by its LR (|m̂ / √v̂| = 1), so the largest
/// change of each kind of weight is its group's LR.
#[test]
fn loraplus_trains_up_weights_at_the_ratio() {
    let dir = scratch("train-loraplus");
    let mut r = recipe_to(
        &dir,
        "plus",
        json!({ "learning_rate": 1e-4, "text_encoder_lr": 5e-5, "max_train_steps": 1, "optimizer_args": ["weight_decay=0"] }),
    );
    r["network"] = json!({ "loraplus_lr_ratio": 16, "loraplus_text_encoder_lr_ratio": 4 });
    // an sd-scripts file with non-zero ups, so that the downs have gradients too
    r["network_weights"] = json!(fixture("lora-sd15/lora_sd15_dim4_alpha2.safetensors"));
    let mut tr = build::build(&r).unwrap();
    let lrs = tr.current_lrs().unwrap();
    let want = [("textencoder", 5e-5), ("textencoder plus", 2e-4), ("unet", 1e-4), ("unet plus", 1.6e-3)];
    assert_eq!(lrs.len(), want.len(), "{lrs:?}");
    for ((name, lr), (wn, wl)) in lrs.iter().zip(want) {
        assert_eq!(name, wn);
        assert!((lr - wl).abs() < 1e-12 * wl.max(1.0), "{name}: {lr} (want {wl})");
    }
    let copy = |v: &candle_core::Var| v.as_tensor().copy().unwrap();
    let before: Vec<_> = lora_pairs(tr.network().unwrap()).iter().map(|(c, d, u)| (*c, copy(d), copy(u))).collect();
    tr.run(&mut |_, _| {}).unwrap();
    let mut largest = std::collections::BTreeMap::new();
    for ((c, d0, u0), (_, d, u)) in before.iter().zip(lora_pairs(tr.network().unwrap())) {
        for (kind, a, b) in [("down", d0, d.as_tensor()), ("up", u0, u.as_tensor())] {
            let e = largest.entry((format!("{c:?}"), kind)).or_insert(0.0f64);
            *e = e.max(max_abs_diff(a, b));
        }
    }
    eprintln!("largest change per kind of weight: {largest:?}");
    for ((c, kind), lr) in [
        (("TextEncoder", "down"), 5e-5),
        (("TextEncoder", "up"), 2e-4),
        (("Unet", "down"), 1e-4),
        (("Unet", "up"), 1.6e-3),
    ] {
        let got = largest[&(c.to_string(), kind)];
        assert!((got - lr).abs() < 0.01 * lr, "{c} {kind}: largest change {got:e}, its LR {lr:e}");
    }
    let meta = sdtune::io::tensors::read_metadata(&dir.join("out/plus.safetensors")).unwrap();
    assert_eq!(meta["ss_network_args"], r#"{"loraplus_lr_ratio": "16.0", "loraplus_text_encoder_lr_ratio": "4.0"}"#);
    // stop_text_encoder_training stops both text-encoder groups (the plus one too)
    r["train"]["stop_text_encoder_training"] = json!(0);
    r["train"]["overwrite"] = json!(true);
    let mut tr = build::build(&r).unwrap();
    tr.run(&mut |_, _| {}).unwrap();
    let names: Vec<String> = tr.current_lrs().unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["unet", "unet plus"]);
}

/// `max_token_length` 150 / 225 (sd-scripts' long captions): captions go into 77-token windows as sd-scripts'
/// `get_input_ids` makes them, and the windows' encodings are joined as its `get_hidden_states` joins them: the first
/// window's BOS, the 75 middle positions of each window, the last window's final position.
#[test]
fn long_captions_train_in_sd_scripts_windows() {
    use sdtune::models::tokenizer::{BOS, EOS};
    let cpu = candle_core::Device::Cpu;
    let model = load(&fixture("tiny-sd15/tiny-sd15.safetensors"));
    let caption = "a watercolor painting of a red fox in the snow, ".repeat(9);
    let full = model.tokenizer.encode_full(&caption).unwrap();
    let n = full.len() - 2;
    assert!(n > 75 && n <= 150, "{n} tokens");
    let ids: Vec<u32> = model
        .tokenizer
        .tokenize_chunks(&caption, 2, &cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    assert_eq!(ids.len(), 154);
    let mut w0 = vec![BOS];
    w0.extend_from_slice(&full[1..76]);
    w0.push(EOS); // the last id of the padded 152 (SD1 pads with EOS)
    let mut w1 = vec![BOS];
    w1.extend_from_slice(&full[76..]); // the remaining tokens and EOS
    w1.resize(77, EOS);
    assert_eq!(&ids[..77], &w0[..]);
    assert_eq!(&ids[77..], &w1[..]);
    // SD2 pads with `!` (0): a window whose 76th id is a token ends with EOS; the other keeps its padding
    let sd2 = sdtune::models::tokenizer::ClipTokenizer::new(0);
    let ids2 = sd2.tokenize_chunks(&caption, 2, &cpu).unwrap().flatten_all().unwrap().to_vec1::<i64>().unwrap();
    assert_eq!((ids2[76], ids2[153]), (EOS as i64, 0));

    let ids_t =
        candle_core::Tensor::from_vec(ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), (1, 154), &cpu).unwrap();
    let joined = model.encode_windows(&ids_t).unwrap().context;
    assert_eq!(joined.dims()[1], 152);
    let window = |w: &[u32]| {
        let t = candle_core::Tensor::from_vec(w.iter().map(|&x| x as i64).collect::<Vec<_>>(), (1, 77), &cpu).unwrap();
        model.encode_ids(&t, None, true, false).unwrap().context
    };
    let (e0, e1) = (window(&w0), window(&w1));
    let at = |t: &candle_core::Tensor, a: usize, len: usize| t.narrow(1, a, len).unwrap();
    assert_eq!(max_abs_diff(&at(&joined, 0, 76), &at(&e0, 0, 76)), 0.0, "BOS and window 0's tokens");
    assert_eq!(max_abs_diff(&at(&joined, 76, 75), &at(&e1, 1, 75)), 0.0, "window 1's tokens");
    assert_eq!(max_abs_diff(&at(&joined, 151, 1), &at(&e1, 76, 1)), 0.0, "the last window's final position");

    // a run with 225: [B, 231] ids, a [B, 227, D] context, and the metadata sd-scripts writes
    let dir = scratch("train-long-captions");
    let mut tr =
        build::build(&recipe_to(&dir, "long", json!({ "max_token_length": 225, "max_train_steps": 2 }))).unwrap();
    let plan = tr.epoch_plan(0);
    let b = tr.make_batch(plan[0].0, &plan[0].1).unwrap();
    assert_eq!(b.input_ids.dims(), &[4, 231]);
    assert_eq!(tr.model.encode_windows(&b.input_ids).unwrap().context.dims(), &[4, 227, 32]);
    tr.run(&mut |_, _| {}).unwrap();
    let meta = sdtune::io::tensors::read_metadata(&dir.join("out/long.safetensors")).unwrap();
    assert_eq!(meta["ss_max_token_length"], "225");
    let e = build::build(&recipe_to(&dir, "bad", json!({ "max_token_length": 100 }))).err().unwrap().to_string();
    assert!(e.contains("max_token_length must be 75, 150 or 225"), "{e}");
}

/// `weighted_captions`: captions in A1111 syntax encoded as sd-scripts' `get_weighted_text_embeddings` (the lpw
/// weighting sampling uses): unweighted captions give exactly the plain encoding's loss, weights change it, and the
/// text encoder's LoRA learns through the weighting. SDXL is refused, as in sd-scripts.
#[test]
fn weighted_captions_weight_tokens_and_train_the_text_encoder() {
    let dir = scratch("train-weighted");
    let plain = build::build(&recipe_to(&dir, "plain", json!({ "max_train_steps": 2 }))).unwrap();
    let mut weighted =
        build::build(&recipe_to(&dir, "weighted", json!({ "max_train_steps": 2, "weighted_captions": true }))).unwrap();
    let mut b = fixed_batches(&plain).remove(0);
    let n = b.captions.as_ref().unwrap().len();
    let loss = |tr: &sdtune::train::Trainer, b: &Batch| {
        tr.compute_loss(b, &mut sdtune::rng::Rng::new(0)).unwrap().to_scalar::<f32>().unwrap()
    };
    assert_eq!(loss(&weighted, &b), loss(&plain, &b), "no weights: the plain encoding");
    let caption = b.captions.as_ref().unwrap()[0].clone();
    let first = caption.split_whitespace().next().unwrap().to_string();
    b.captions = Some(vec![caption.replacen(&first, &format!("({first}:1.5)"), 1); n]);
    assert_ne!(loss(&weighted, &b), loss(&plain, &b), "a weighted word changes the conditioning");
    let te_ups = |tr: &sdtune::train::Trainer| -> Vec<f32> {
        let vars = lora_pairs(tr.network().unwrap());
        let te = vars.iter().filter(|(c, _, _)| *c == Component::TextEncoder);
        te.flat_map(|(_, _, u)| u.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    };
    let before = te_ups(&weighted);
    weighted.run(&mut |_, _| {}).unwrap();
    let after = te_ups(&weighted);
    assert!(before.iter().zip(&after).any(|(a, b)| a != b), "the text encoder's LoRA learned");
    let mut xl = recipe_to(&dir, "xl", json!({ "weighted_captions": true }));
    xl["model"] = json!(fixture("tiny-sdxl/tiny-sdxl.safetensors"));
    let e = build::build(&xl).err().unwrap().to_string();
    assert!(e.contains("weighted_captions") && e.contains("SDXL"), "{e}");
}

/// A `10_toy` folder of four 64×64 RGBA images (a gradient) whose alpha is `alpha(x, y)`, with captions.
fn rgba_folder(root: &std::path::Path, alpha: impl Fn(u32, u32) -> u8) -> std::path::PathBuf {
    let dir = root.join("data/10_toy");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..4u32 {
        let img = image::RgbaImage::from_fn(64, 64, |x, y| {
            image::Rgba([(x * 4) as u8, (y * 4) as u8, (i * 60) as u8, alpha(x, y)])
        });
        img.save(dir.join(format!("{i}.png"))).unwrap();
        std::fs::write(dir.join(format!("{i}.txt")), "toy, a picture").unwrap();
    }
    root.join("data")
}

#[test]
fn alpha_masks_weight_the_loss_as_sd_scripts_masked_loss() {
    let dir = scratch("train-alpha-mask");
    let recipe = |data: &std::path::Path, extra: serde_json::Value, out: &str| {
        let mut r = json!({
            "model": fixture("tiny-sd15/tiny-sd15.safetensors"),
            "dataset": data,
            "dataset_options": { "resolution": 64, "caption_extension": ".txt", "batch_size": 2, "alpha_mask": true, "flip_aug": true },
            "network": { "dim": 4, "alpha": 4.0 },
            "train": { "learning_rate": 1e-3, "max_train_steps": 2, "seed": 2, "output_dir": dir.join("out"), "output_name": out, "log_every_n_steps": 0 },
        });
        for (k, v) in extra.as_object().unwrap() {
            r["train"][k] = v.clone();
        }
        r
    };
    // the sample: the alpha channel in [0, 1], trimmed and flipped with the picture (left half opaque)
    let half = rgba_folder(&dir.join("half"), |x, _| if x < 32 { 255 } else { 0 });
    let tr = build::build(&recipe(&half, json!({}), "half")).unwrap();
    let ds = &tr.data.as_ref().unwrap().datasets[0];
    let mut rng = sdtune::rng::Rng::new(1);
    let mut seen = [false; 2];
    for _ in 0..16 {
        let s = ds.sample(0, sdtune::data::captions::Progress::default(), &mut rng).unwrap();
        let m = s.alpha_mask.unwrap();
        assert_eq!(m.len(), 64 * 64);
        let (left, right) = (m[10 * 64 + 5], m[10 * 64 + 60]);
        assert_eq!((left, right), if s.flipped { (0.0, 1.0) } else { (1.0, 0.0) });
        seen[s.flipped as usize] = true;
    }
    assert!(seen[0] && seen[1], "flip_aug flips the mask too");
    // a fully transparent dataset: every loss is exactly 0 and no gradient reaches the network (the up weights,
    // zero at the start, stay zero; AdamW's weight decay alone moves the downs), cached or not
    let clear = rgba_folder(&dir.join("clear"), |_, _| 0);
    for cache in [json!({}), json!({ "cache_latents": true, "cache_latents_to_disk": true })] {
        let name = if cache.as_object().unwrap().is_empty() { "clear" } else { "clear-cached" };
        let mut tr = build::build(&recipe(&clear, cache.clone(), name)).unwrap();
        tr.run(&mut |_, _| {}).unwrap();
        assert!(tr.losses.iter().all(|l| *l == 0.0), "{cache}: {:?}", tr.losses);
        let ups_zero = lora_pairs(tr.network().unwrap())
            .iter()
            .all(|(_, _, u)| u.as_tensor().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() == 0.0);
        assert!(ups_zero, "{cache}: a masked-out loss trained the network");
    }
    let npz = sdtune::data::npz::read_npz(&clear.join("10_toy/0.npz")).unwrap();
    assert_eq!(npz["alpha_mask"].shape, vec![64, 64], "sd-scripts' cache key");
    // fully opaque: the same run as without alpha_mask; masked_loss without alpha masks is refused
    let opaque = rgba_folder(&dir.join("opaque"), |_, _| 255);
    let mut with = build::build(&recipe(&opaque, json!({ "masked_loss": true }), "with")).unwrap();
    with.run(&mut |_, _| {}).unwrap();
    let mut r = recipe(&opaque, json!({}), "without");
    r["dataset_options"]["alpha_mask"] = json!(false);
    let mut without = build::build(&r).unwrap();
    without.run(&mut |_, _| {}).unwrap();
    assert_eq!(with.losses, without.losses);
    let e = format!(
        "{:#}",
        build::build(&{
            let mut r = r.clone();
            r["train"]["masked_loss"] = json!(true);
            r
        })
        .err()
        .unwrap()
    );
    assert!(e.contains("masked_loss") && e.contains("alpha_mask"), "{e}");
    let meta = sdtune::io::tensors::read_metadata(&dir.join("out/with.safetensors")).unwrap();
    assert_eq!(meta["ss_masked_loss"], "True");
}
