//! PNDMScheduler with `skip_prk_steps` (PLMS): N+1 model evaluations, linear multistep in ε.

use super::{leading_timesteps, NoiseSource, Prediction, Scheduler, SchedulerConfig};
use anyhow::Result;
use candle_core::Tensor;

pub struct Pndm {
    cfg: SchedulerConfig,
    timesteps: Vec<f64>,
    ratio: i64,
    ets: Vec<Tensor>,
    counter: usize,
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        let t = cfg.schedule.len();
        // ascending t: [t0 .. t_{N-1}] → [t0..t_{N-2}, t_{N-2}, t_{N-1}] reversed
        let mut asc: Vec<f64> = leading_timesteps(t, steps, cfg.steps_offset).into_iter().rev().collect();
        if asc.len() >= 2 {
            let dup = asc[asc.len() - 2];
            asc.insert(asc.len() - 1, dup);
        } else {
            asc.insert(0, asc[0]);
        }
        asc.reverse();
        Self {
            cfg: cfg.clone(),
            timesteps: asc,
            ratio: (t / steps) as i64,
            ets: Vec::new(),
            counter: 0,
            cur_sample: None,
        }
    }

    fn prev_sample(&self, sample: &Tensor, t: i64, prev: i64, out: &Tensor) -> Result<Tensor> {
        let ac = &self.cfg.schedule.alphas_cumprod;
        let a_t = ac[t as usize] as f64;
        let a_prev = if prev >= 0 { ac[prev as usize] as f64 } else { ac[0] as f64 };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.cfg.prediction {
            Prediction::Epsilon => out.clone(),
            Prediction::VPrediction => ((out * a_t.sqrt())? + (sample * b_t.sqrt())?)?,
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        Ok(((sample * sample_coeff)? - (eps * ((a_prev - a_t) / denom))?)?)
    }
}

impl Scheduler for Pndm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn step(&mut self, out: &Tensor, i: usize, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let mut t = self.timesteps[i] as i64;
        let mut prev = t - self.ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(out.clone());
        } else {
            prev = t;
            t += self.ratio;
        }
        let e = &self.ets;
        let n = e.len();
        let mut sample = sample.clone();
        let model_output = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            out.clone()
        } else if n == 1 && self.counter == 1 {
            sample = self.cur_sample.take().expect("set at the first step");
            ((out + &e[0])? / 2.0)?
        } else if n == 2 {
            (((&e[1] * 3.0)? - &e[0])? / 2.0)?
        } else if n == 3 {
            ((((&e[2] * 23.0)? - (&e[1] * 16.0)?)? + (&e[0] * 5.0)?)? / 12.0)?
        } else {
            let k = n - 4;
            ((((((&e[k + 3] * 55.0)? - (&e[k + 2] * 59.0)?)? + (&e[k + 1] * 37.0)?)? - (&e[k] * 9.0)?)?) / 24.0)?
        };
        let prev_sample = self.prev_sample(&sample, t, prev, &model_output)?;
        self.counter += 1;
        Ok(prev_sample)
    }
}
