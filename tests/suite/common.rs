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
