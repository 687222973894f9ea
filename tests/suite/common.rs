//! Shared helpers: fixture paths, golden loading, comparisons.

use candle_core::{DType, Device, Tensor};
use sdtune::models::{LoadOptions, StableDiffusion};
use std::collections::HashMap;
use std::path::PathBuf;

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join(rel)
}

/// The two SD1/SD2 fixtures.
pub const MODELS: &[&str] = &["tiny-sd15", "tiny-sd2"];

/// Golden tensors of a fixture file, on the CPU.
pub fn goldens(rel: &str) -> HashMap<String, Tensor> {
    tensors_at(&fixture(rel))
}

/// The tensors of a safetensors file, on the CPU.
pub fn tensors_at(path: &std::path::Path) -> HashMap<String, Tensor> {
    sdtune::io::tensors::read_safetensors(path, None, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
        .tensors
}

/// Asserts that two tensor maps have the same keys and shapes, and with `values` the same values.
pub fn assert_same_tensors(ours: &HashMap<String, Tensor>, theirs: &HashMap<String, Tensor>, values: bool) {
    let mut a: Vec<_> = ours.keys().collect();
    let mut b: Vec<_> = theirs.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "key sets differ");
    for (k, t) in theirs {
        assert_eq!(ours[k].dims(), t.dims(), "{k}");
        if values {
            assert_eq!(max_abs_diff(&ours[k], t), 0.0, "{k}");
        }
    }
}

/// The options of a fixture's `pipe.*` goldens (its prompt and negative prompt, 64×64, 10 steps, its initial
/// latents) with `sampler` and CFG `cfg`, and the goldens.
pub fn pipeline_options(m: &str, sampler: &str, cfg: f64) -> (sdtune::sample::SampleOptions, HashMap<String, Tensor>) {
    let g = goldens(&format!("{m}/golden.safetensors"));
    let meta = sdtune::io::tensors::read_metadata(&fixture(&format!("{m}/golden.safetensors"))).unwrap();
    let opts = sdtune::sample::SampleOptions {
        prompt: meta["pipe_prompt"].clone(),
        negative: meta["pipe_negative_prompt"].clone(),
        width: 64,
        height: 64,
        steps: 10,
        cfg,
        seed: 0,
        sampler: sampler.into(),
        latents: Some(g["pipe.in.latents"].clone()),
        ..Default::default()
    };
    (opts, g)
}

/// A training recipe on `model` (a fixture) with a generated 64×64 dataset of 8 images in batches of 4.
pub fn training_recipe(
    dir: &std::path::Path,
    model: &str,
    network: serde_json::Value,
    train: serde_json::Value,
) -> serde_json::Value {
    let data = sdtune::data::synthetic::write_shapes(&dir.join("data"), "toy", 2, 8, 64, 0).unwrap();
    serde_json::json!({
        "model": fixture(model),
        "dataset": data,
        "dataset_options": { "resolution": 64, "caption_extension": ".txt", "batch_size": 4 },
        "network": network,
        "train": train,
    })
}

/// Loads a model in f32 on the CPU.
pub fn load(path: &std::path::Path) -> StableDiffusion {
    StableDiffusion::load(path, &LoadOptions::default()).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

/// max |a − b| (shapes must agree).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// Asserts max |a − b| ≤ atol, naming the tensor.
pub fn assert_close(name: &str, ours: &Tensor, golden: &Tensor, atol: f64) {
    let d = max_abs_diff(ours, golden);
    assert!(d <= atol, "{name}: max |ours - golden| = {d:e} > {atol:e}");
    eprintln!("{name}: max abs diff {d:.2e} (tolerance {atol:e})");
}

/// A unique scratch folder under the target dir.
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The first epoch's batches with fixed noise (seed 99) and timesteps (100, 300, 500, 700, …), to compare losses
/// before and after training.
pub fn fixed_batches(tr: &sdtune::train::Trainer) -> Vec<sdtune::train::Batch> {
    let mut rng = sdtune::rng::Rng::new(99);
    tr.epoch_plan(0)
        .iter()
        .map(|(di, idx)| {
            let mut b = tr.make_batch(*di, idx).unwrap();
            b.noise = Some(rng.randn(b.latents.dims(), &Device::Cpu).unwrap());
            let ts: Vec<i64> = (0..idx.len()).map(|k| [100i64, 300, 500, 700][k % 4]).collect();
            b.timesteps = Some(Tensor::new(ts.as_slice(), &Device::Cpu).unwrap());
            b
        })
        .collect()
}

/// The mean loss of `batches` (dropout and other draws from a fixed seed).
pub fn mean_loss(tr: &sdtune::train::Trainer, batches: &[sdtune::train::Batch]) -> f64 {
    batches
        .iter()
        .map(|b| tr.compute_loss(b, &mut sdtune::rng::Rng::new(0)).unwrap().to_scalar::<f32>().unwrap() as f64)
        .sum::<f64>()
        / batches.len() as f64
}

/// A LoRA network's (component, down, up) per module.
pub fn lora_pairs(
    net: &sdtune::networks::Network,
) -> Vec<(sdtune::networks::Component, candle_core::Var, candle_core::Var)> {
    net.modules
        .iter()
        .map(|(c, m)| match &m.factors {
            sdtune::networks::module::Factors::Lora { down, up, .. } => (*c, down.clone(), up.clone()),
            f => panic!("{}: a {} module, not LoRA", m.name, f.kind()),
        })
        .collect()
}
