//! The tiny-sd15 LoRA training step on the CPU: rank 8 on every attention/MLP/proj layer of the UNet and the text
//! encoder, batch 4 of 64×64 images (8×8 latents, cached), f32, AdamW. Prints a markdown row.
//!
//! `cargo bench --bench train_step`
//!
//! `cargo bench --bench train_step -- RESOLUTION on|off` instead times UNet LoRA at RESOLUTION² (uncached latents
//! are still encoded once, outside the timing) with gradient checkpointing on or off, and prints the process's
//! peak resident memory; run each setting in its own process to compare peaks.
//!
//! `cargo bench --bench train_step -- sdxl` times the same step on tiny-sdxl (both text encoders, the UNet's size
//! conditioning).
//!
//! `cargo bench --bench train_step -- ft` times full fine-tuning instead (no network: every UNet and text-encoder
//! weight trained, AdamW, the same batches).
//!
//! `cargo bench --bench train_step -- loha` (or `lokr`, `locon`) times a LyCORIS network of dim 8 / alpha 8 on the
//! same layers (preset `attn-mlp`: the UNet's transformers, the text encoder's attention and MLP).

use serde_json::json;
use std::time::Instant;

fn main() {
    sdtune::device::use_all_cores();
    sdtune::device::keep_freed_memory();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("target/bench-train");
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let (res, checkpointing) = match args.as_slice() {
        [r, c] => (r.parse::<usize>().expect("RESOLUTION: a number"), c == "on"),
        _ => (64, false),
    };
    let fixture = if args == ["sdxl"] { "tiny-sdxl" } else { "tiny-sd15" };
    let data =
        sdtune::data::synthetic::write_shapes(&dir.join(format!("data{res}")), "toy", 1, 16, res as u32, 0).unwrap();
    let recipe = |unet_only: bool| {
        json!({
            "model": root.join(format!("tests/fixtures/{fixture}/{fixture}.safetensors")),
            "dataset": data,
            "dataset_options": { "resolution": res, "caption_extension": ".txt", "batch_size": 4 },
            "network": { "dim": 8, "alpha": 8.0, "train_text_encoder": !unet_only },
            "train": { "learning_rate": 1e-4, "max_train_steps": 1000, "cache_latents": true, "output_dir": dir.join("out"), "overwrite": true, "log_every_n_steps": 0, "gradient_checkpointing": checkpointing },
        })
    };
    if let [algo] = args.as_slice() {
        if ["loha", "lokr", "locon"].contains(&algo.as_str()) {
            let mut r = recipe(false);
            r["network"] = json!({ "network_module": "lycoris.kohya", "algo": algo, "preset": "attn-mlp", "dim": 8, "alpha": 8.0 });
            let mut tr = sdtune::train::build::build(&r).unwrap();
            let (count, median, mean) = timed_epochs(&mut tr);
            let n: usize = tr.network().unwrap().vars().iter().map(|(_, v)| v.elem_count()).sum();
            println!("| configuration | steps | ms / step (median) | ms / step (mean) |");
            println!("|---|---|---|---|");
            println!("| LyCORIS {algo} ({fixture}, sdtune, {n} weights) | {count} | {median:.1} | {mean:.1} |");
            return;
        }
    }
    if args == ["ft"] {
        let mut r = recipe(false);
        r["network"] = serde_json::Value::Null;
        r["fine_tune"] = json!(true);
        r["train"]["learning_rate"] = json!(1e-5);
        let mut tr = sdtune::train::build::build(&r).unwrap();
        let (count, median, mean) = timed_epochs(&mut tr);
        let n: usize = tr.target.state_tensors().unwrap().values().map(|t| t.elem_count()).sum();
        println!("| configuration | steps | ms / step (median) | ms / step (mean) |");
        println!("|---|---|---|---|");
        println!("| full fine-tuning ({fixture}, sdtune, {n} weights) | {count} | {median:.1} | {mean:.1} |");
        return;
    }
    if args.len() == 2 {
        println!("| UNet LoRA, batch 4 | gradient checkpointing | ms / step (median of 8) | peak RSS |");
        println!("|---|---|---|---|");
        let mut tr = sdtune::train::build::build(&recipe(true)).unwrap();
        let plan = tr.epoch_plan(0);
        let batches: Vec<_> = plan.iter().map(|(di, idx)| tr.make_batch(*di, idx).unwrap()).collect();
        let mut times = Vec::new();
        for i in 0..10 {
            let t = Instant::now();
            tr.train_batch(&batches[i % batches.len()]).unwrap();
            if i >= 2 {
                times.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        times.sort_by(f64::total_cmp);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let peak = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap_or("VmHWM: ?").trim_start_matches("VmHWM:");
        let on = if checkpointing { "on" } else { "off" };
        println!("| {res}×{res} | {on} | {:.1} | {} |", times[times.len() / 2], peak.trim());
        return;
    }
    println!("| configuration | steps | ms / step (median) | ms / step (mean) |");
    println!("|---|---|---|---|");
    for unet_only in [true, false] {
        let mut tr = sdtune::train::build::build(&recipe(unet_only)).unwrap();
        let (count, median, mean) = timed_epochs(&mut tr);
        let name = if unet_only { "UNet LoRA only" } else { "UNet + text-encoder LoRA" };
        let n: usize = tr.network().unwrap().vars().iter().map(|(_, v)| v.elem_count()).sum();
        let trained = if unet_only { "UNet" } else { "all" };
        println!(
            "| {name} ({fixture}, sdtune, {n} LoRA weights, {trained} trained) | {count} | {median:.1} | {mean:.1} |"
        );
    }
}

/// Trains one warm-up epoch of the first epoch's batches, then times five more: (steps, median ms, mean ms).
fn timed_epochs(tr: &mut sdtune::train::Trainer) -> (usize, f64, f64) {
    let plan = tr.epoch_plan(0);
    let batches: Vec<_> = plan.iter().map(|(di, idx)| tr.make_batch(*di, idx).unwrap()).collect();
    for b in &batches {
        tr.train_batch(b).unwrap(); // warm-up
    }
    let mut times = Vec::new();
    for _ in 0..5 {
        for b in &batches {
            let t = Instant::now();
            tr.train_batch(b).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    times.sort_by(f64::total_cmp);
    (times.len(), times[times.len() / 2], mean)
}
