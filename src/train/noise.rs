//! Noise tricks of sd-scripts' training step, one function each: noise offset (adaptive, random strength),
//! multi-resolution (pyramid) noise, input perturbation and zero-terminal-SNR betas.

use crate::rng::Rng;
use crate::schedule::NoiseSchedule;
use anyhow::Result;
use candle_core::{DType, Tensor, D};

/// `ε += o·N(0,1)[B,C,1,1]` with `o = offset` (or `U(0,1)·offset` with `random_strength`); adaptive:
/// `o_bc = max(0, o + adaptive_scale·|mean_hw(z_bc)|)`.
pub fn apply_noise_offset(
    noise: &Tensor,
    latents: &Tensor,
    offset: f64,
    adaptive_scale: Option<f64>,
    random_strength: bool,
    rng: &mut Rng,
) -> Result<Tensor> {
    let (b, c, _, _) = latents.dims4()?;
    let o = if random_strength { rng.uniform() * offset } else { offset };
    let strength = match adaptive_scale {
        Some(a) => {
            let m = latents.to_dtype(DType::F32)?.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?.abs()?;
            ((m * a)? + o)?.relu()?
        }
        None => Tensor::full(o as f32, (b, c, 1, 1), latents.device())?,
    };
    let extra = rng.randn(&[b, c, 1, 1], latents.device())?;
    Ok(noise.broadcast_add(&extra.mul(&strength)?.to_dtype(noise.dtype())?)?)
}

/// The `[n_out, n_in]` weights of a bilinear resize along one side (align_corners=False), with torch's source
/// coordinates: `max(0, (o + ½)·n_in/n_out − ½)`, its floor and the next pixel (the last pixel twice at the edge).
fn bilinear_weights(n_in: usize, n_out: usize) -> Vec<f32> {
    let scale = n_in as f32 / n_out as f32;
    let mut m = vec![0f32; n_out * n_in];
    for o in 0..n_out {
        let s = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (s as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let f = (s - i0 as f32).clamp(0.0, 1.0);
        m[o * n_in + i0] += 1.0 - f;
        m[o * n_in + i1] += f;
    }
    m
}

/// Bilinear resize (align_corners=False) of `[B,C,h,w]` to `(H, W)`, as `F.interpolate(mode="bilinear")`: two
/// GEMMs with the sides' weight matrices, along the width first as torch, on `x`'s device.
fn bilinear(x: &Tensor, h_out: usize, w_out: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let dev = x.device();
    let along_w = Tensor::from_vec(bilinear_weights(w, w_out), (w_out, w), dev)?;
    let along_h = Tensor::from_vec(bilinear_weights(h, h_out), (h_out, h), dev)?;
    let rows = x.to_dtype(DType::F32)?.reshape((b * c * h, w))?.matmul(&along_w.t()?)?;
    let y = along_h.broadcast_left(b * c)?.matmul(&rows.reshape((b * c, h, w_out))?)?;
    Ok(y.reshape((b, c, h_out, w_out))?)
}

/// Pyramid noise: `ε += Σ_i bilinear(N(0,1)[B,C,H/r^i,W/r^i])·discount^i` (r ~ U(2,4) per level, i from 0: the
/// first level is a full-size draw; stopping after a 1-pixel side), then `ε /= std(ε)`; all on `noise`'s device.
pub fn apply_multires_noise(noise: &Tensor, iterations: usize, discount: f64, rng: &mut Rng) -> Result<Tensor> {
    let (b, c, h, w) = noise.dims4()?;
    let mut n = noise.to_dtype(DType::F32)?;
    for i in 0..iterations {
        let r = 2.0 + 2.0 * rng.uniform();
        let (wi, hi) =
            (((w as f64 / r.powi(i as i32)) as usize).max(1), ((h as f64 / r.powi(i as i32)) as usize).max(1));
        let level = rng.randn(&[b, c, hi, wi], noise.device())?;
        n = (n + (bilinear(&level, h, w)? * discount.powi(i as i32))?)?;
        if wi == 1 || hi == 1 {
            break;
        }
    }
    // the sample standard deviation, in f64 on the device
    let n64 = n.to_dtype(DType::F64)?;
    let centred = n64.broadcast_sub(&n64.mean_all()?)?;
    let std = (centred.sqr()?.sum_all()? / (n.elem_count() - 1).max(1) as f64)?.sqrt()?;
    Ok(n.broadcast_div(&std.to_dtype(DType::F32)?)?.to_dtype(noise.dtype())?)
}

/// The noisy latents: `√ᾱ·z + √(1−ᾱ)·(ε + γ·ε')` with input perturbation γ (`ip_noise_gamma`), else plain.
pub fn noisy_latents(
    schedule: &NoiseSchedule,
    latents: &Tensor,
    noise: &Tensor,
    timesteps: &Tensor,
    ip_gamma: Option<f64>,
    rng: &mut Rng,
) -> Result<Tensor> {
    match ip_gamma {
        Some(g) if g > 0.0 => {
            let extra = rng.randn(noise.dims(), noise.device())?.to_dtype(noise.dtype())?;
            schedule.add_noise(latents, &(noise + (extra * g)?)?, timesteps)
        }
        _ => schedule.add_noise(latents, noise, timesteps),
    }
}

/// Rescales the schedule to zero terminal SNR (arXiv 2305.08891), as sd-scripts' `--zero_terminal_snr`.
pub fn zero_terminal_snr(s: &NoiseSchedule) -> NoiseSchedule {
    let a: Vec<f64> = s.alphas_cumprod.iter().map(|&x| (x as f64).sqrt()).collect();
    let (a0, at) = (a[0], a[a.len() - 1]);
    let ac: Vec<f64> = a.iter().map(|&x| ((x - at) * a0 / (a0 - at)).powi(2)).collect();
    let betas: Vec<f32> =
        (0..ac.len()).map(|i| (1.0 - if i == 0 { ac[0] } else { ac[i] / ac[i - 1] }) as f32).collect();
    NoiseSchedule { betas, alphas_cumprod: ac.into_iter().map(|x| x as f32).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn noise_offset_adds_a_per_channel_constant() {
        let z = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let eps = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let out = apply_noise_offset(&eps, &z, 0.1, None, false, &mut Rng::new(1)).unwrap();
        let mut r = Rng::new(1);
        let draws = r.normal_vec(8);
        let flat = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for bc in 0..8 {
            for k in 0..9 {
                assert!((flat[bc * 9 + k] - 0.1 * draws[bc]).abs() < 1e-6);
            }
        }
        // adaptive: o + scale·|mean| per channel, clamped at 0
        let z = (Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap() * -2.0).unwrap();
        let eps = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let out = apply_noise_offset(&eps, &z, 0.1, Some(0.5), false, &mut Rng::new(2)).unwrap();
        let d = Rng::new(2).normal_vec(1)[0];
        let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((got - (0.1 + 0.5 * 2.0) * d).abs() < 1e-6, "{got}");
    }

    #[test]
    fn multires_noise_is_unit_std_and_input_perturbation_follows_the_formula() {
        let eps = Rng::new(3).randn(&[2, 4, 16, 16], &Device::Cpu).unwrap();
        let n = apply_multires_noise(&eps, 6, 0.3, &mut Rng::new(4)).unwrap();
        let v = n.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let sd = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt();
        assert!((sd - 1.0).abs() < 1e-5, "{sd}");
        let s = NoiseSchedule::sd();
        let z = Rng::new(5).randn(&[1, 4, 2, 2], &Device::Cpu).unwrap();
        let e = Rng::new(6).randn(&[1, 4, 2, 2], &Device::Cpu).unwrap();
        let t = Tensor::new(&[500i64], &Device::Cpu).unwrap();
        let got = noisy_latents(&s, &z, &e, &t, Some(0.1), &mut Rng::new(7)).unwrap();
        let e2 = Rng::new(7).randn(&[1, 4, 2, 2], &Device::Cpu).unwrap();
        let ac = s.alphas_cumprod[500] as f64;
        let want =
            ((&z * ac.sqrt()).unwrap() + ((&e + (e2 * 0.1).unwrap()).unwrap() * (1.0 - ac).sqrt()).unwrap()).unwrap();
        let d = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6);
    }

    #[test]
    fn bilinear_matches_torch_upsample() {
        // goldens from torch.nn.Upsample(mode="bilinear"), made by tests/python/make_noise_goldens.py
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/noise/bilinear.safetensors");
        let meta = crate::io::tensors::read_metadata(&path).unwrap();
        let cases: std::collections::BTreeMap<String, (usize, usize)> = serde_json::from_str(&meta["cases"]).unwrap();
        let g = crate::io::tensors::read_safetensors(&path, None, &Device::Cpu).unwrap().tensors;
        assert_eq!(cases.len(), 6);
        for (name, (h, w)) in cases {
            let got = bilinear(&g[&format!("{name}.x")], h, w).unwrap();
            let want = &g[&format!("{name}.y")];
            assert_eq!(got.dims(), want.dims(), "case {name}");
            let d = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let d = d.to_scalar::<f32>().unwrap();
            assert!(d < 1e-6, "case {name}: differs from torch by {d}");
        }
    }

    #[test]
    fn zero_terminal_snr_ends_at_zero_and_keeps_the_start() {
        let s = zero_terminal_snr(&NoiseSchedule::sd());
        assert_eq!(s.alphas_cumprod[999], 0.0);
        assert!((s.alphas_cumprod[0] - NoiseSchedule::sd().alphas_cumprod[0]).abs() < 1e-7);
        assert!((s.betas[999] - 1.0).abs() < 1e-7);
    }
}
