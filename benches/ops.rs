//! Convolution and attention alone: candle's convolution (`SDTUNE_CONV=candle`) against sdtune's im2col/GEMM
//! convolution, and the attention as composed candle ops against sdtune's chunked attention; forward, and forward +
//! backward as in LoRA training (frozen kernel, gradient of the input only). Prints a markdown table;
//! `python benches/ops_reference.py` prints PyTorch's on the same shapes.
//!
//! `cargo bench --bench ops [-- DEVICE DTYPE SIZE]`: DEVICE cpu (default) or cuda, DTYPE f32 (default) or bf16,
//! SIZE small (default, CPU-sized) or sd15 (SD 1.5's shapes at 512², batch 4; the GPU check runs this one).

use candle_core::{DType, Device, Tensor, Var, D};
use std::time::Instant;

struct Bench {
    dev: Device,
    dtype: DType,
}

impl Bench {
    /// Median milliseconds of `f` over `n` runs after 2 warm-ups, the device synchronised around each.
    fn time(&self, n: usize, mut f: impl FnMut()) -> f64 {
        f();
        f();
        let mut t: Vec<f64> = (0..n)
            .map(|_| {
                self.dev.synchronize().unwrap();
                let s = Instant::now();
                f();
                self.dev.synchronize().unwrap();
                s.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[n / 2]
    }

    fn randn(&self, shape: &[usize], std: f64) -> Tensor {
        Tensor::randn(0f32, std as f32, shape, &self.dev).unwrap().to_dtype(self.dtype).unwrap()
    }

    fn conv(&self, name: &str, x: &[usize], w: &[usize], p: usize, s: usize) {
        let xv = Var::from_tensor(&self.randn(x, 1.0)).unwrap();
        let w = self.randn(w, 0.1);
        let mut cells = Vec::new();
        for imp in ["candle", "sdtune"] {
            std::env::set_var("SDTUNE_CONV", imp);
            let fwd = self.time(9, || {
                sdtune::nn::conv2d(&xv.as_tensor().detach(), &w, p, s).unwrap();
            });
            let both = self.time(9, || {
                let y = sdtune::nn::conv2d(xv.as_tensor(), &w, p, s).unwrap();
                y.sum_all().unwrap().backward().unwrap();
            });
            cells.push((fwd, both));
        }
        std::env::remove_var("SDTUNE_CONV");
        println!("| {name} | {:.3} | {:.3} | {:.3} | {:.3} |", cells[0].0, cells[1].0, cells[0].1, cells[1].1);
    }

    fn attention(&self, name: &str, b: usize, sq: usize, sk: usize, c: usize, heads: usize) {
        let var = |s: usize| Var::from_tensor(&self.randn(&[b, s, c], 1.0)).unwrap();
        let (q, k, v) = (var(sq), var(sk), var(sk));
        let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let fwd_c = self.time(5, || {
            composed_attention(&q.detach(), &k.detach(), &v.detach(), heads);
        });
        let fwd_s = self.time(5, || {
            sdtune::nn::attention(&q.detach(), &k.detach(), &v.detach(), heads, false).unwrap();
        });
        let both_c = self.time(5, || {
            composed_attention(q, k, v, heads).sum_all().unwrap().backward().unwrap();
        });
        let both_s = self.time(5, || {
            sdtune::nn::attention(q, k, v, heads, false).unwrap().sum_all().unwrap().backward().unwrap();
        });
        println!("| {name} | {fwd_c:.3} | {fwd_s:.3} | {both_c:.3} | {both_s:.3} |");
    }
}

/// The attention as sdtune computed it before the chunked op: composed, differentiable candle ops, softmax in f32.
fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Tensor {
    let (b, sq, c) = q.dims3().unwrap();
    let sk = k.dim(1).unwrap();
    let d = c / heads;
    let split = |t: &Tensor, s| t.reshape((b, s, heads, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
    let s = (f32(split(q, sq)).matmul(&f32(split(k, sk)).t().unwrap()).unwrap() * (1.0 / (d as f64).sqrt())).unwrap();
    let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap().to_dtype(q.dtype()).unwrap();
    p.matmul(&split(v, sk)).unwrap().transpose(1, 2).unwrap().reshape((b, sq, c)).unwrap()
}

fn main() {
    sdtune::device::use_all_cores();
    sdtune::device::keep_freed_memory();
    // cargo bench passes `--bench`; the rest are ours
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let dev = match arg(0, "cpu").as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).expect("a CUDA device (build with --features cuda)"),
        d => panic!("device {d:?}: expected cpu or cuda"),
    };
    let dtype = match arg(1, "f32").as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        d => panic!("dtype {d:?}: expected f32 or bf16"),
    };
    let size = arg(2, "small");
    let bench = Bench { dev, dtype };
    println!(
        "| op ({}, {}) | candle fwd ms | sdtune fwd ms | candle fwd+bwd ms | sdtune fwd+bwd ms |",
        arg(1, "f32"),
        arg(0, "cpu")
    );
    println!("|---|---|---|---|---|");
    if size == "sd15" {
        bench.conv("conv 3×3, 320→320 ch, [4,320,64,64]", &[4, 320, 64, 64], &[320, 320, 3, 3], 1, 1);
        bench.conv("conv 3×3 stride 2, 320→320 ch, [4,320,64,64]", &[4, 320, 64, 64], &[320, 320, 3, 3], 1, 2);
        bench.conv("conv 3×3, 1280→1280 ch, [4,1280,8,8]", &[4, 1280, 8, 8], &[1280, 1280, 3, 3], 1, 1);
        bench.conv("conv 1×1, 640→320 ch, [4,640,64,64]", &[4, 640, 64, 64], &[320, 640, 1, 1], 0, 1);
        bench.attention("self-attention, 8 heads, [4,4096,320]", 4, 4096, 4096, 320, 8);
        bench.attention("cross-attention, 8 heads, 4096→77, width 320", 4, 4096, 77, 320, 8);
    } else {
        bench.conv("conv 3×3, 64→64 ch, [2,64,32,32]", &[2, 64, 32, 32], &[64, 64, 3, 3], 1, 1);
        bench.conv("conv 3×3 stride 2, 64→64 ch, [2,64,32,32]", &[2, 64, 32, 32], &[64, 64, 3, 3], 1, 2);
        bench.conv("conv 1×1, 128→64 ch, [2,128,32,32]", &[2, 128, 32, 32], &[64, 128, 1, 1], 0, 1);
        bench.attention("self-attention, 8 heads, [2,512,64]", 2, 512, 512, 64, 8);
        bench.attention("self-attention, 8 heads, [2,256,64]", 2, 256, 256, 64, 8);
        bench.attention("cross-attention, 8 heads, 512→77, width 64", 2, 512, 77, 64, 8);
    }
}
