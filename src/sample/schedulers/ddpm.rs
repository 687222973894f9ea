//! DDPMScheduler ("leading" spacing, `fixed_small` variance).

use super::{ddpm_pred, leading_timesteps, NoiseSource, Scheduler, SchedulerConfig};
use anyhow::Result;
use candle_core::Tensor;

pub struct Ddpm {
    cfg: SchedulerConfig,
    timesteps: Vec<f64>,
    ratio: usize,
}

impl Ddpm {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        let t = cfg.schedule.len();
        Self { cfg: cfg.clone(), timesteps: leading_timesteps(t, steps, cfg.steps_offset), ratio: t / steps }
    }
}

impl Scheduler for Ddpm {
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
        let a_prev = if prev >= 0 { ac[prev as usize] as f64 } else { 1.0 };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let (mut x0, _) = ddpm_pred(self.cfg.prediction, sample, out, a_t)?;
        if self.cfg.clip_sample {
            x0 = x0.clamp(-1f32, 1f32)?;
        }
        let c0 = a_prev.sqrt() * cur_beta / b_t;
        let cs = cur_alpha.sqrt() * b_prev / b_t;
        let mut prev_sample = ((x0 * c0)? + (sample * cs)?)?;
        if t > 0 {
            let variance = (b_prev / b_t * cur_beta).max(1e-20);
            prev_sample = (prev_sample + (noise.randn_like(sample)? * variance.sqrt())?)?;
        }
        Ok(prev_sample)
    }
}
