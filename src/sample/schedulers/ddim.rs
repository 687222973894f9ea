//! DDIMScheduler ("leading" spacing, `set_alpha_to_one = false`).

use super::{ddpm_pred, leading_timesteps, NoiseSource, Scheduler, SchedulerConfig};
use anyhow::Result;
use candle_core::Tensor;

pub struct Ddim {
    cfg: SchedulerConfig,
    timesteps: Vec<f64>,
    ratio: usize,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        let t = cfg.schedule.len();
        Self { cfg: cfg.clone(), timesteps: leading_timesteps(t, steps, cfg.steps_offset), ratio: t / steps }
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn step(&mut self, out: &Tensor, i: usize, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let ac = &self.cfg.schedule.alphas_cumprod;
        let t = self.timesteps[i] as usize;
        let prev = t as i64 - self.ratio as i64;
        let a_t = ac[t] as f64;
        let a_prev = if prev >= 0 { ac[prev as usize] as f64 } else { ac[0] as f64 };
        let (mut x0, eps) = ddpm_pred(self.cfg.prediction, sample, out, a_t)?;
        if self.cfg.clip_sample {
            x0 = x0.clamp(-1f32, 1f32)?;
        }
        let variance = ((1.0 - a_prev) / (1.0 - a_t)) * (1.0 - a_t / a_prev);
        let std = self.cfg.eta * variance.sqrt();
        let direction = (eps * (1.0 - a_prev - std * std).sqrt())?;
        let mut prev_sample = ((x0 * a_prev.sqrt())? + direction)?;
        if self.cfg.eta > 0.0 {
            prev_sample = (prev_sample + (noise.randn_like(sample)? * std)?)?;
        }
        Ok(prev_sample)
    }
}
