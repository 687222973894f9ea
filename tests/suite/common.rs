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
    sdtune::io::tensors::read_safetensors(&fixture(rel), None, &Device::Cpu).expect("golden file reads").tensors
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
