//! Convolution and attention alone on the CPU, f32: candle's convolution (`SDTUNE_CONV=candle`) against sdtune's
//! im2col/GEMM convolution, and the attention as composed candle ops against sdtune's chunked attention; forward,
//! and forward + backward as in LoRA training (frozen kernel, gradient of the input only). Prints a markdown table;
//! `python benches/ops_reference.py` prints PyTorch's on the same shapes.
//!
//! `cargo bench --bench ops`

use candle_core::{Device, Tensor, Var, D};
use std::time::Instant;

/// Median milliseconds of `f` over `n` runs after 2 warm-ups.
fn time(n: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
    let mut t: Vec<f64> = (0..n)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[n / 2]
}

/// The attention as sdtune computed it before the chunked op: composed, differentiable candle ops.
fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Tensor {
    let (b, sq, c) = q.dims3().unwrap();
    let sk = k.dim(1).unwrap();
    let d = c / heads;
    let split = |t: &Tensor, s| t.reshape((b, s, heads, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let s = (split(q, sq).matmul(&split(k, sk).t().unwrap()).unwrap() * (1.0 / (d as f64).sqrt())).unwrap();
    let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
    p.matmul(&split(v, sk)).unwrap().transpose(1, 2).unwrap().reshape((b, sq, c)).unwrap()
}

fn conv_rows(name: &str, x: (usize, usize, usize, usize), w: (usize, usize, usize, usize), p: usize, s: usize) {
    let dev = Device::Cpu;
    let xv = Var::from_tensor(&Tensor::randn(0f32, 1., x, &dev).unwrap()).unwrap();
    let w = Tensor::randn(0f32, 0.1, w, &dev).unwrap();
    let mut cells = Vec::new();
    for imp in ["candle", "sdtune"] {
        std::env::set_var("SDTUNE_CONV", imp);
        let fwd = time(9, || {
            sdtune::nn::conv2d(&xv.as_tensor().detach(), &w, p, s).unwrap();
        });
        let both = time(9, || {
            sdtune::nn::conv2d(xv.as_tensor(), &w, p, s).unwrap().sum_all().unwrap().backward().unwrap();
        });
        cells.push((fwd, both));
    }
    std::env::remove_var("SDTUNE_CONV");
    println!("| {name} | {:.2} | {:.2} | {:.2} | {:.2} |", cells[0].0, cells[1].0, cells[0].1, cells[1].1);
}

fn attention_rows(name: &str, b: usize, sq: usize, sk: usize, c: usize, heads: usize) {
    let dev = Device::Cpu;
    let var = |s: usize| Var::from_tensor(&Tensor::randn(0f32, 1., (b, s, c), &dev).unwrap()).unwrap();
    let (q, k, v) = (var(sq), var(sk), var(sk));
    let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
    let fwd_c = time(5, || {
        composed_attention(&q.detach(), &k.detach(), &v.detach(), heads);
    });
    let fwd_s = time(5, || {
        sdtune::nn::attention(&q.detach(), &k.detach(), &v.detach(), heads, false).unwrap();
    });
    let both_c = time(5, || {
        composed_attention(q, k, v, heads).sum_all().unwrap().backward().unwrap();
    });
    let both_s = time(5, || {
        sdtune::nn::attention(q, k, v, heads, false).unwrap().sum_all().unwrap().backward().unwrap();
    });
    println!("| {name} | {fwd_c:.2} | {fwd_s:.2} | {both_c:.2} | {both_s:.2} |");
}

fn main() {
    sdtune::device::use_all_cores();
    sdtune::device::keep_freed_memory();
    println!("| op (f32, CPU) | candle fwd ms | sdtune fwd ms | candle fwd+bwd ms | sdtune fwd+bwd ms |");
    println!("|---|---|---|---|---|");
    conv_rows("conv 3×3, 64→64 ch, [2,64,32,32]", (2, 64, 32, 32), (64, 64, 3, 3), 1, 1);
    conv_rows("conv 3×3 stride 2, 64→64 ch, [2,64,32,32]", (2, 64, 32, 32), (64, 64, 3, 3), 1, 2);
    conv_rows("conv 1×1, 128→64 ch, [2,128,32,32]", (2, 128, 32, 32), (64, 128, 1, 1), 0, 1);
    attention_rows("self-attention, 8 heads, [2,512,64]", 2, 512, 512, 64, 8);
    attention_rows("self-attention, 8 heads, [2,256,64]", 2, 256, 256, 64, 8);
    attention_rows("cross-attention, 8 heads, 512→77, width 64", 2, 512, 77, 64, 8);
}
