//! DPM-Solver multistep (DPM-Solver / DPM-Solver++ 2M, midpoint) and singlestep (order 2), as diffusers.

use super::{
    alpha_sigma, interp, karras, np_linspace, np_round, sigma_to_t, train_sigmas, NoiseSource, Prediction, Scheduler,
    SchedulerConfig,
};
use anyhow::Result;
use candle_core::Tensor;

/// Timesteps (integers) and sigmas (with the final sigma appended) for DPM-Solver's "linspace" spacing.
fn dpm_schedule(cfg: &SchedulerConfig, steps: usize, final_zero: bool) -> (Vec<f64>, Vec<f32>) {
    let t = cfg.schedule.len();
    let full = train_sigmas(&cfg.schedule);
    let log_sigmas: Vec<f32> = full.iter().map(|s| s.ln()).collect();
    // linspace(0, T−1, N+1).round()[::-1][:-1]
    let grid = np_linspace(0.0, (t - 1) as f64, steps + 1);
    let mut timesteps: Vec<f64> = grid[1..].iter().rev().map(|&x| np_round(x)).collect();
    let sigmas: Vec<f64> = if cfg.karras {
        let s = karras(full[t - 1] as f64, full[0] as f64, steps);
        timesteps = s.iter().map(|&x| np_round(sigma_to_t(x, &log_sigmas))).collect();
        s
    } else {
        timesteps.iter().map(|&x| interp(x, &full)).collect()
    };
    let last = if final_zero { 0.0 } else { full[0] as f64 };
    let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
    sigmas.push(last as f32);
    (timesteps, sigmas)
}

/// `λ = log α − log σ` of a sigma.
fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

/// The model output in the solver's parameterisation: x0 (DPM-Solver++) or ε (DPM-Solver).
fn convert(prediction: Prediction, plus_plus: bool, sample: &Tensor, out: &Tensor, sigma: f64) -> Result<Tensor> {
    let (a, s) = alpha_sigma(sigma);
    Ok(match (plus_plus, prediction) {
        (true, Prediction::Epsilon) => ((sample - (out * s)?)? / a)?,
        (true, Prediction::VPrediction) => ((sample * a)? - (out * s)?)?,
        (false, Prediction::Epsilon) => out.clone(),
        (false, Prediction::VPrediction) => ((out * a)? + (sample * s)?)?,
    })
}

/// First-order update from sigma `s` to sigma `t` (DDIM in λ).
fn first_order(plus_plus: bool, sample: &Tensor, m: &Tensor, sigma_s: f64, sigma_t: f64) -> Result<Tensor> {
    let (a_t, s_t) = alpha_sigma(sigma_t);
    let (a_s, s_s) = alpha_sigma(sigma_s);
    let h = lambda(sigma_t) - lambda(sigma_s);
    Ok(if plus_plus {
        ((sample * (s_t / s_s))? - (m * (a_t * ((-h).exp() - 1.0)))?)?
    } else {
        ((sample * (a_t / a_s))? - (m * (s_t * (h.exp() - 1.0)))?)?
    })
}

/// Second-order midpoint update: from `sample` at sigma `s_from`, with D0/D1 built by the caller.
fn second_order(
    plus_plus: bool,
    sample: &Tensor,
    d0: &Tensor,
    d1: &Tensor,
    s_from: f64,
    sigma_t: f64,
    h: f64,
) -> Result<Tensor> {
    let (a_t, s_t) = alpha_sigma(sigma_t);
    let (a_f, s_f) = alpha_sigma(s_from);
    Ok(if plus_plus {
        let c = a_t * ((-h).exp() - 1.0);
        (((sample * (s_t / s_f))? - (d0 * c)?)? - (d1 * (0.5 * c))?)?
    } else {
        let c = s_t * (h.exp() - 1.0);
        (((sample * (a_t / a_f))? - (d0 * c)?)? - (d1 * (0.5 * c))?)?
    })
}

/// DPMSolverMultistepScheduler, order 2, `lower_order_final`.
pub struct DpmMultistep {
    prediction: Prediction,
    plus_plus: bool,
    final_zero: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    outputs: Vec<Tensor>,
}

impl DpmMultistep {
    pub fn new(cfg: &SchedulerConfig, steps: usize, plus_plus: bool) -> Self {
        // diffusers only allows a final sigma of 0 for DPM-Solver++; DPM-Solver ends at sigma_min.
        let final_zero = plus_plus;
        let (timesteps, sigmas) = dpm_schedule(cfg, steps, final_zero);
        Self { prediction: cfg.prediction, plus_plus, final_zero, timesteps, sigmas, outputs: Vec::new() }
    }
}

impl Scheduler for DpmMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn step(&mut self, out: &Tensor, i: usize, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let n = self.timesteps.len();
        let lower_final = i == n - 1 && (n < 15 || self.final_zero);
        let m0 = convert(self.prediction, self.plus_plus, sample, out, self.sigmas[i] as f64)?;
        self.outputs.push(m0.clone());
        if self.outputs.len() > 2 {
            self.outputs.remove(0);
        }
        let (sigma_s0, sigma_t) = (self.sigmas[i] as f64, self.sigmas[i + 1] as f64);
        if i == 0 || lower_final {
            return first_order(self.plus_plus, sample, &m0, sigma_s0, sigma_t);
        }
        let sigma_s1 = self.sigmas[i - 1] as f64;
        let (l_t, l_s0, l_s1) = (lambda(sigma_t), lambda(sigma_s0), lambda(sigma_s1));
        let (h, h0) = (l_t - l_s0, l_s0 - l_s1);
        let d1 = ((&m0 - &self.outputs[0])? * (h / h0))?;
        second_order(self.plus_plus, sample, &m0, &d1, sigma_s0, sigma_t, h)
    }
}

/// DPMSolverSinglestepScheduler (DPM-Solver++, order 2): alternating first- and second-order steps.
pub struct DpmSinglestep {
    prediction: Prediction,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    orders: Vec<usize>,
    outputs: Vec<Tensor>,
    start: Option<Tensor>,
}

impl DpmSinglestep {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        let (timesteps, sigmas) = dpm_schedule(cfg, steps, true);
        let mut orders: Vec<usize> = (0..steps).map(|i| if i % 2 == 0 { 1 } else { 2 }).collect();
        if let Some(last) = orders.last_mut() {
            *last = 1; // final sigma 0: the last step is first order
        }
        Self { prediction: cfg.prediction, timesteps, sigmas, orders, outputs: Vec::new(), start: None }
    }
}

impl Scheduler for DpmSinglestep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn step(&mut self, out: &Tensor, i: usize, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let m0 = convert(self.prediction, true, sample, out, self.sigmas[i] as f64)?;
        self.outputs.push(m0.clone());
        if self.outputs.len() > 2 {
            self.outputs.remove(0);
        }
        let mut order = self.orders[i];
        if order == 2 && (self.outputs.len() < 2 || self.start.is_none()) {
            order = 1;
        }
        let sigma_t = self.sigmas[i + 1] as f64;
        if order == 1 {
            self.start = Some(sample.clone());
            return first_order(true, sample, &m0, self.sigmas[i] as f64, sigma_t);
        }
        let x = self.start.as_ref().expect("order-2 steps follow an order-1 step");
        let (sigma_s0, sigma_s1) = (self.sigmas[i] as f64, self.sigmas[i - 1] as f64);
        let (l_t, l_s0, l_s1) = (lambda(sigma_t), lambda(sigma_s0), lambda(sigma_s1));
        let (h, h0) = (l_t - l_s1, l_s0 - l_s1);
        let m1 = &self.outputs[0];
        let d1 = ((&m0 - m1)? * (h / h0))?;
        second_order(true, x, m1, &d1, sigma_s1, sigma_t, h)
    }
}
