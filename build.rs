//! With `--features cuda`, compiles sdtune's own CUDA kernels (src/kernels/*.cu) to PTX in OUT_DIR with nvcc
//! (`$CUDA_ROOT/bin/nvcc`, else `nvcc` on PATH) for `CUDA_COMPUTE_CAP` (default 90: H100/H200). The default build
//! needs no CUDA toolchain and does nothing here.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel sources, each compiled to `OUT_DIR/<name>.ptx`.
const KERNELS: &[&str] = &["optim", "norm", "adam8bit", "flash", "conv", "rand"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let nvcc = ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| Path::new(&root).join("bin/nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap: String = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into()).replace('.', "");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=src/kernels/common.cuh");
    for name in KERNELS {
        let src = format!("src/kernels/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            // no FMA contraction: the same roundings as the CPU reference code
            .args(["--ptx", "-O3", "-std=c++17", "--fmad=false", &format!("-arch=sm_{cap}"), "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!("{}: cannot run nvcc for {src} ({e}); see scripts/build-cuda.sh", nvcc.display())
            });
        assert!(status.success(), "nvcc failed on {src}");
    }
}
