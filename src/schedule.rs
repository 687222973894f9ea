//! The DDPM training noise schedule (SD's scaled-linear betas), forward noising and v-targets.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// `alphas_cumprod` of a discrete noise schedule, in f32 as diffusers keeps it.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    pub betas: Vec<f32>,
    pub alphas_cumprod: Vec<f32>,
}

/// `torch.linspace(start, end, n)` in f32: steps from both ends meet in the middle.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { start + step * i as f32 } else { end - step * (n - 1 - i) as f32 }).collect()
}

impl NoiseSchedule {
    /// SD's schedule: betas = linspace(√start, √end, n)², computed in f32 like diffusers.
    pub fn scaled_linear(beta_start: f64, beta_end: f64, n: usize) -> Self {
        let betas: Vec<f32> =
            linspace_f32(beta_start.sqrt() as f32, beta_end.sqrt() as f32, n).into_iter().map(|b| b * b).collect();
        Self::from_betas(betas)
    }

    /// The default SD 1.x/2.x training schedule (0.00085 → 0.012, 1000 steps).
    pub fn sd() -> Self {
        Self::scaled_linear(0.00085, 0.012, 1000)
    }

    fn from_betas(betas: Vec<f32>) -> Self {
        // torch's CPU cumprod accumulates f32 inputs in f64 and rounds each output.
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect();
        Self { betas, alphas_cumprod }
    }

    /// Number of training timesteps.
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// Per-sample `(√ᾱ_t, √(1−ᾱ_t))` as `[B, 1, 1, 1]` tensors for integer timesteps `[B]`.
    fn coefficients(&self, timesteps: &Tensor, like: &Tensor) -> Result<(Tensor, Tensor)> {
        let ts = timesteps.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        let mut a = Vec::with_capacity(ts.len());
        let mut s = Vec::with_capacity(ts.len());
        for &t in &ts {
            if t < 0 || t as usize >= self.len() {
                bail!("timestep {t} is outside the schedule's 0..{}", self.len());
            }
            let ac = self.alphas_cumprod[t as usize];
            a.push(ac.sqrt());
            s.push((1.0 - ac).sqrt());
        }
        let mut shape = vec![ts.len()];
        shape.extend(std::iter::repeat_n(1, like.rank() - 1));
        let mk = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, shape.as_slice(), like.device())?.to_dtype(like.dtype())?)
        };
        Ok((mk(a)?, mk(s)?))
    }

    /// `√ᾱ_t·x0 + √(1−ᾱ_t)·noise`.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (a, s) = self.coefficients(timesteps, x0)?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
    }

    /// The v-prediction target `√ᾱ_t·noise − √(1−ᾱ_t)·x0`.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (a, s) = self.coefficients(timesteps, x0)?;
        Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?)
    }
}
