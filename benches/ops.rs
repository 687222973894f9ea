//! Convolution and attention alone: candle's convolution (`SDTUNE_CONV=candle`) against sdtune's im2col/GEMM
//! convolution, and the attention as composed candle ops against sdtune's chunked attention; forward, and forward +
//! backward as in LoRA training (frozen kernel, gradient of the input only). Prints a markdown table;
//! `python benches/ops_reference.py` prints PyTorch's on the same shapes.
//!
//! `cargo bench --bench ops [-- DEVICE DTYPE SIZE]`: DEVICE cpu (default) or cuda, DTYPE f32 (default) or bf16,
//! SIZE small (default, CPU-sized) or sd15 (SD 1.5's shapes at 512², batch 4; the GPU check runs this one).
//!
//! SIZE `check` instead compares sdtune's own kernels (`nn::fused`, every float dtype; the convolution and the
//! attention through their layers) on DEVICE with their CPU reference on random inputs of awkward sizes, prints a
//! table and exits with 1 on any mismatch (the GPU check's first stage).

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

    /// A LoRA dropout mask: the stream drawn one after another on the host and uploaded (how sdtune made it
    /// before `nn::fused::keep_mask`) against `keep_mask` (on CUDA one kernel, on the CPU parallel draws).
    fn dropout_mask(&self, shape: &[usize]) {
        let n: usize = shape.iter().product();
        let mut rng = sdtune::rng::Rng::new(1);
        let host = self.time(9, || {
            let keep: Vec<f32> = (0..n).map(|_| if rng.uniform() >= 0.1 { 1.0 / 0.9 } else { 0.0 }).collect();
            Tensor::from_vec(keep, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(self.dtype)
                .unwrap()
                .to_device(&self.dev)
                .unwrap();
        });
        let ours = self.time(9, || {
            let state = rng.reserve(n);
            sdtune::nn::fused::keep_mask(state, shape, 0.1, 1.0 / 0.9, self.dtype, &self.dev).unwrap();
        });
        println!("| dropout mask {shape:?} | {host:.3} | {ours:.3} |");
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

/// Each fused kernel on `dev` against the CPU code on the same inputs; false on a mismatch.
fn check_kernels(dev: &Device) -> bool {
    use sdtune::nn::fused;
    println!("| kernel | dtype | elements | max |device − cpu| / scale | tolerance |");
    println!("|---|---|---|---|---|");
    let mut ok = true;
    let rel = |a: &Tensor, b: &Tensor| -> f64 {
        let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-30);
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() / scale
    };
    for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 8e-3), (DType::F16, 1e-3)] {
        for n in [1usize, 1000, (1 << 20) + 3] {
            let rnd = |std: f32| Tensor::randn(0f32, std, n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let (w, m, g) = (rnd(0.1), rnd(0.01), rnd(0.05));
            // second moments kept off zero, where f16 steps overflow on either device
            let v = (rnd(0.01).sqr().unwrap() + 1e-4).unwrap();
            let on = |t: &Tensor| t.to_device(dev).unwrap().copy().unwrap();
            let (wd, md, vd, gd) = (on(&w), on(&m), on(&v), on(&g));
            let mut report = |name: &str, ours: &Tensor, cpu: &Tensor, tol: f64| {
                let r = rel(&ours.to_device(&Device::Cpu).unwrap(), cpu);
                let pass = r <= tol;
                ok &= pass;
                println!("| {name} | {dtype:?} | {n} | {r:.2e}{} | {tol:.0e} |", if pass { "" } else { " FAIL" });
            };
            fused::ema_(&m, &g, 0.9, 0.7, false).unwrap();
            fused::ema_(&md, &gd, 0.9, 0.7, false).unwrap();
            report("ema (Adam's m)", &md, &m, tol);
            fused::ema_(&v, &g, 0.999, 0.7, true).unwrap();
            fused::ema_(&vd, &gd, 0.999, 0.7, true).unwrap();
            report("ema squared (Adam's v)", &vd, &v, tol);
            let p = fused::AdamW { decay: 0.999, step: 0.05, sqrt_bc2: 0.0447, eps: 1e-8 };
            p.apply_(&w, &m, &v).unwrap();
            p.apply_(&wd, &md, &vd).unwrap();
            report("adamw", &wd, &w, tol);
            let acc = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
            let accd = Tensor::zeros(1, DType::F32, dev).unwrap();
            fused::add_sum_squares(&acc, &g).unwrap();
            fused::add_sum_squares(&accd, &gd).unwrap();
            fused::add_sum_squares(&acc, &w).unwrap();
            fused::add_sum_squares(&accd, &wd).unwrap();
            report("sum of squares", &accd, &acc, 1e-5);
        }
        // AdamW8bit: weights, then the packed state (codes must agree exactly but for rare ties: ≤ 1e-4 of bytes)
        for n in [4096usize, 70_000] {
            let rnd = |std: f32| Tensor::randn(0f32, std, n, &Device::Cpu).unwrap();
            let (m, v) = (rnd(0.01).to_vec1::<f32>().unwrap(), rnd(0.01).sqr().unwrap().to_vec1::<f32>().unwrap());
            let (smap, umap) = (sdtune::train::optim::dynamic_map(true), sdtune::train::optim::dynamic_map(false));
            let (mc, mmax) = fused::adam8bit::encode(&m, &smap);
            let (vc, vmax) = fused::adam8bit::encode(&v, &umap);
            let bytes = fused::adam8bit::pack((&smap, &umap), &mmax, &vmax, &mc, &vc);
            let len = bytes.len();
            let st = Tensor::from_vec(bytes, len, &Device::Cpu).unwrap();
            let (w, g) = (rnd(0.1).to_dtype(dtype).unwrap(), rnd(0.05).to_dtype(dtype).unwrap());
            let on = |t: &Tensor| t.to_device(dev).unwrap().copy().unwrap();
            let (std, wd, gd) = (on(&st), on(&w), on(&g));
            let a = fused::adam8bit::Adam8bit {
                betas: (0.9, 0.999),
                one_minus: (0.1, 0.001),
                sqrt_bc2: 0.0447,
                eps: 1e-8,
                decay: Some(0.999),
                step_size: -0.05,
            };
            for (w, g, st) in [(&w, &g, &st), (&wd, &gd, &std)] {
                a.weights_(w, g, st).unwrap();
                a.state_(st, g).unwrap();
            }
            let r = rel(&wd.to_device(&Device::Cpu).unwrap(), &w);
            let pass = r <= tol;
            ok &= pass;
            println!("| adam8bit weights | {dtype:?} | {n} | {r:.2e}{} | {tol:.0e} |", if pass { "" } else { " FAIL" });
            let (x, y) = (std.to_device(&Device::Cpu).unwrap().to_vec1::<u8>().unwrap(), st.to_vec1::<u8>().unwrap());
            let differ = x.iter().zip(&y).filter(|(a, b)| a != b).count() as f64 / x.len() as f64;
            let pass = differ <= 1e-4;
            ok &= pass;
            println!(
                "| adam8bit state (bytes differing) | {dtype:?} | {n} | {differ:.2e}{} | 1e-4 |",
                if pass { "" } else { " FAIL" }
            );
        }
        // convolution (on CUDA: one-launch im2col + GEMM) against the CPU in f32: output, input and kernel gradients
        for (name, x_dims, w_dims, pad, stride) in [
            ("conv 3×3", [2usize, 16, 17, 19], [8usize, 16, 3, 3], 1usize, 1usize),
            ("conv 3×3 stride 2", [2, 16, 17, 19], [8, 16, 3, 3], 1, 2),
            ("conv 1×1", [2, 16, 9, 9], [8, 16, 1, 1], 0, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, &x_dims, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let w = Tensor::randn(0f32, 0.2, &w_dims, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let run = |dev: &Device, dt: DType| {
                let var = |t: &Tensor| Var::from_tensor(&t.to_dtype(dt).unwrap().to_device(dev).unwrap()).unwrap();
                let (xv, wv) = (var(&x), var(&w));
                let y = sdtune::nn::conv2d(xv.as_tensor(), wv.as_tensor(), pad, stride).unwrap();
                let r = Tensor::ones(y.dims(), DType::F32, dev).unwrap();
                let grads = (y.to_dtype(DType::F32).unwrap() * r).unwrap().sum_all().unwrap().backward().unwrap();
                let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
                [cpu(&y), cpu(grads.get(xv.as_tensor()).unwrap()), cpu(grads.get(wv.as_tensor()).unwrap())]
            };
            let (ours, reference) = (run(dev, dtype), run(&Device::Cpu, DType::F32));
            let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
            for (part, (o, r)) in ["", " dx", " dw"].iter().zip(ours.iter().zip(&reference)) {
                let e = rel(o, r);
                let pass = e <= tol;
                ok &= pass;
                println!(
                    "| {name}{part} | {dtype:?} | {} | {e:.2e}{} | {tol:.0e} |",
                    o.elem_count(),
                    if pass { "" } else { " FAIL" }
                );
            }
        }
        // attention (on CUDA in bf16/f16: the fused kernel) against the chunked path in f32 on the CPU, output and
        // the three gradients
        if dtype != DType::F32 {
            for (name, b, sq, sk, c, heads, causal) in [
                ("attention, 40-wide heads", 2usize, 300usize, 300usize, 320usize, 8usize, false),
                ("cross-attention, 80-wide heads", 2, 300, 77, 640, 8, false),
                ("causal attention, 64-wide heads", 1, 77, 77, 768, 12, true),
                ("attention, 160-wide heads", 1, 256, 256, 1280, 8, false),
            ] {
                let rnd =
                    |s: usize| Tensor::randn(0f32, 1.0, (b, s, c), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let (q, k, v, r) = (rnd(sq), rnd(sk), rnd(sk), rnd(sq));
                let run = |dev: &Device, dt: DType| {
                    let var = |t: &Tensor| Var::from_tensor(&t.to_dtype(dt).unwrap().to_device(dev).unwrap()).unwrap();
                    let (q, k, v) = (var(&q), var(&k), var(&v));
                    let y = sdtune::nn::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, causal).unwrap();
                    let r = r.to_dtype(dt).unwrap().to_device(dev).unwrap();
                    let grads = (y.to_dtype(DType::F32).unwrap() * r.to_dtype(DType::F32).unwrap())
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
                    let g = |x: &Var| cpu(grads.get(x.as_tensor()).unwrap());
                    [cpu(&y), g(&q), g(&k), g(&v)]
                };
                let (ours, reference) = (run(dev, dtype), run(&Device::Cpu, DType::F32));
                for (part, (o, r)) in ["", " dq", " dk", " dv"].iter().zip(ours.iter().zip(&reference)) {
                    let e = rel(o, r);
                    let pass = e <= 2e-2;
                    ok &= pass;
                    println!(
                        "| {name}{part} | {dtype:?} | {} | {e:.2e}{} | 2e-2 |",
                        o.elem_count(),
                        if pass { "" } else { " FAIL" }
                    );
                }
            }
        }
        // GroupNorm + SiLU (32 groups, rows spanning channels) and LayerNorm, forward and backward
        for (name, dims, groups, hw, silu) in [
            ("group_norm + silu", vec![2usize, 64, 33, 17], 32usize, 33 * 17, true),
            ("group_norm", vec![3, 320, 8, 8], 32, 64, false),
            ("layer_norm", vec![3, 77, 320], 1, 1, false),
        ] {
            let n: usize = dims.iter().product();
            let rows = if hw == 1 { n / dims[dims.len() - 1] } else { dims[0] * groups };
            let channels = if hw == 1 { dims[dims.len() - 1] } else { dims[1] };
            let x = (Tensor::randn(0f32, 1.0, dims.as_slice(), &Device::Cpu).unwrap() + 0.5)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let gy = Tensor::randn(0f32, 1.0, dims.as_slice(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let wb = Tensor::randn(0f32, 1.0, (2, channels), &Device::Cpu).unwrap();
            let p = fused::NormRows { rows, hw, groups, eps: 1e-5, silu };
            let on = |t: &Tensor| t.to_device(dev).unwrap();
            let y = fused::norm_forward(&x, &wb, p).unwrap();
            let yd = fused::norm_forward(&on(&x), &on(&wb), p).unwrap();
            let g = fused::norm_backward(&x, &wb, &gy, p).unwrap();
            let gd = fused::norm_backward(&on(&x), &on(&wb), &on(&gy), p).unwrap();
            for (part, ours, cpu) in [("", &yd, &y), (" backward", &gd, &g)] {
                let r = rel(&ours.to_device(&Device::Cpu).unwrap(), cpu);
                let tol = if dtype == DType::F32 { 1e-4 } else { tol };
                let pass = r <= tol;
                ok &= pass;
                println!("| {name}{part} | {dtype:?} | {n} | {r:.2e}{} | {tol:.0e} |", if pass { "" } else { " FAIL" });
            }
        }
        // LoRA dropout masks from the random stream: the same bits on every device
        for (n, state) in [(1000usize, 7u64), ((1 << 20) + 3, u64::MAX - 5)] {
            let mask = |d: &Device| fused::keep_mask(state, &[n], 0.1, 1.0 / 0.9, dtype, d).unwrap();
            let (ours, cpu) = (mask(dev).to_device(&Device::Cpu).unwrap(), mask(&Device::Cpu));
            let differ = ours.ne(&cpu).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap();
            let differ = differ.to_scalar::<f32>().unwrap();
            ok &= differ == 0.0;
            println!(
                "| dropout mask (elements differing) | {dtype:?} | {n} | {differ}{} | 0 |",
                if differ == 0.0 { "" } else { " FAIL" }
            );
        }
    }
    ok
}

fn main() {
    sdtune::device::use_all_cores();
    sdtune::device::keep_freed_memory();
    // cargo bench passes `--bench`; the rest are ours
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let dev = match arg(0, "cpu").as_str() {
        "cpu" => Device::Cpu,
        "cuda" => sdtune::device::parse_device("cuda").expect("a CUDA device (build with --features cuda)"),
        d => panic!("device {d:?}: expected cpu or cuda"),
    };
    let dtype = match arg(1, "f32").as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        d => panic!("dtype {d:?}: expected f32 or bf16"),
    };
    let size = arg(2, "small");
    if size == "check" {
        let ok = check_kernels(&dev);
        println!("kernels on {}: {}", arg(0, "cpu"), if ok { "all match the CPU" } else { "MISMATCH" });
        std::process::exit(if ok { 0 } else { 1 });
    }
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
    println!("\n| op ({}, {}) | host draws + upload ms | sdtune ms |\n|---|---|---|", arg(1, "f32"), arg(0, "cpu"));
    for shape in [[4usize, 1024, 16], [4, 4096, 16]] {
        bench.dropout_mask(&shape);
    }
}
