//! sdtune's CUDA kernels (`src/kernels/*.cu`) run on the CPU under `tests/kernels/emulation.h` (CUDA's threads,
//! barriers, warp shuffles and WMMA tiles emulated), each test program checking kernels against a reference
//! written for it (float64 maths, or the same f32 arithmetic where results must agree exactly). Needs a C++20
//! compiler (`$CXX`, else `c++`).

use std::path::Path;
use std::process::Command;

/// Compiles `tests/kernels/NAME.cpp` and runs it; its output is printed, its exit status must be 0.
fn run(name: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("tests/kernels").join(format!("{name}.cpp"));
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-I"])
        .arg(root.join("tests/kernels/include"))
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("{cxx}: cannot run the C++ compiler for {} ({e}); set CXX", src.display()));
    assert!(out.status.success(), "{cxx} failed on {}:\n{}", src.display(), String::from_utf8_lossy(&out.stderr));
    let out = Command::new(&exe).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(out.status.success(), "{name}: a kernel disagrees with its reference:\n{text}");
}

#[test]
fn flash_attention_kernels_match_float64_attention() {
    run("flash_test");
}

#[test]
fn norm_kernels_match_float64_norms() {
    run("norm_test");
}

#[test]
fn optimizer_kernels_match_their_arithmetic() {
    run("optim_test");
}

#[test]
fn im2col_kernel_matches_the_definition() {
    run("conv_test");
}

#[test]
fn dropout_mask_kernel_draws_the_cpu_stream() {
    run("rand_test");
}
