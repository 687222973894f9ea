//! Sigma-parameterised schedulers (k-diffusion family): Euler, Euler ancestral, LMS, Heun, DPM2, DPM2 ancestral.
//! They use "linspace" spacing (or "leading" when configured) and sigmas interpolated from the training schedule
//! (or Karras sigmas).

use super::{
    interp, k_pred_x0, k_scale, karras, leading_timesteps, linspace_timesteps, sigma_to_t, train_sigmas, NoiseSource,
    Prediction, Scheduler, SchedulerConfig,
};
use anyhow::Result;
use candle_core::Tensor;

/// Inference timesteps and sigmas (without the final 0), plus the f32 log-sigma table.
struct Base {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    log_sigmas: Vec<f32>,
}

fn base(cfg: &SchedulerConfig, steps: usize) -> Base {
    let full = train_sigmas(&cfg.schedule);
    let log_sigmas: Vec<f32> = full.iter().map(|s| s.ln()).collect();
    let mut timesteps = if cfg.leading {
        leading_timesteps(cfg.schedule.len(), steps, cfg.steps_offset)
    } else {
        linspace_timesteps(cfg.schedule.len(), steps)
    };
    let mut sig: Vec<f64> = timesteps.iter().map(|&t| interp(t, &full)).collect();
    if cfg.karras {
        sig = karras(sig[0], sig[sig.len() - 1], steps);
        timesteps = sig.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64).collect();
    }
    Base { timesteps, sigmas: sig.into_iter().map(|s| s as f32).collect(), log_sigmas }
}

/// diffusers' `init_noise_sigma`: the largest sigma, or `√(σ_max² + 1)` with "leading" spacing.
fn init_sigma(s: &[f32], leading: bool) -> f64 {
    let max = s.iter().copied().fold(0f32, f32::max) as f64;
    if leading {
        (max * max + 1.0).sqrt()
    } else {
        max
    }
}

/// `repeat_interleave(2)` of `v[from..to]`.
fn doubled(v: &[f32]) -> Vec<f32> {
    v.iter().flat_map(|&x| [x, x]).collect()
}

/// torch's `a.lerp(b, 0.5)` (it computes `b − (b − a)·0.5` at weight 0.5, so −∞ ends give NaN or −∞ as torch does).
fn lerp_half(a: f32, b: f32) -> f32 {
    b - (b - a) * 0.5
}

/// EulerDiscreteScheduler, or EulerAncestralDiscreteScheduler when `ancestral`.
pub struct Euler {
    prediction: Prediction,
    /// \"leading\" spacing (its `init_noise_sigma` differs).
    leading: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    ancestral: bool,
}

impl Euler {
    pub fn new(cfg: &SchedulerConfig, steps: usize, ancestral: bool) -> Self {
        let b = base(cfg, steps);
        let mut sigmas = b.sigmas;
        sigmas.push(0.0);
        Self { prediction: cfg.prediction, leading: cfg.leading, timesteps: b.timesteps, sigmas, ancestral }
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        init_sigma(&self.sigmas, self.leading)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        k_scale(sample, self.sigmas[i] as f64)
    }

    fn step(&mut self, out: &Tensor, i: usize, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let (sigma, next) = (self.sigmas[i] as f64, self.sigmas[i + 1] as f64);
        let x0 = k_pred_x0(self.prediction, sample, out, sigma)?;
        let derivative = ((sample - x0)? / sigma)?;
        if !self.ancestral {
            return Ok((sample + (derivative * (next - sigma))?)?);
        }
        let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
        let down = (next * next - up * up).sqrt();
        let prev = (sample + (derivative * (down - sigma))?)?;
        Ok((prev + (noise.randn_like(sample)? * up)?)?)
    }
}

/// LMSDiscreteScheduler (order 4): linear multistep with coefficients integrated over the sigma intervals.
pub struct Lms {
    prediction: Prediction,
    /// \"leading\" spacing (its `init_noise_sigma` differs).
    leading: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    derivatives: Vec<Tensor>,
}

impl Lms {
    const ORDER: usize = 4;

    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        let b = base(cfg, steps);
        let mut sigmas = b.sigmas;
        sigmas.push(0.0);
        Self {
            prediction: cfg.prediction,
            leading: cfg.leading,
            timesteps: b.timesteps,
            sigmas,
            derivatives: Vec::new(),
        }
    }

    /// ∫ over [σ_t, σ_{t+1}] of the Lagrange basis polynomial `current` on σ_t, σ_{t−1}, … (exact Gauss–Legendre).
    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = |k: usize| self.sigmas[t - k] as f64;
        let basis = |tau: f64| -> f64 {
            (0..order).filter(|&k| k != current).map(|k| (tau - s(k)) / (s(current) - s(k))).product()
        };
        let (a, b) = (self.sigmas[t] as f64, self.sigmas[t + 1] as f64);
        const X: [f64; 4] =
            [-0.861_136_311_594_052_6, -0.339_981_043_584_856_3, 0.339_981_043_584_856_3, 0.861_136_311_594_052_6];
        const W: [f64; 4] =
            [0.347_854_845_137_453_9, 0.652_145_154_862_546_1, 0.652_145_154_862_546_1, 0.347_854_845_137_453_9];
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        X.iter().zip(W).map(|(x, w)| w * basis(mid + half * x)).sum::<f64>() * half
    }
}

impl Scheduler for Lms {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        init_sigma(&self.sigmas, self.leading)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        k_scale(sample, self.sigmas[i] as f64)
    }

    fn step(&mut self, out: &Tensor, i: usize, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let sigma = self.sigmas[i] as f64;
        let x0 = k_pred_x0(self.prediction, sample, out, sigma)?;
        self.derivatives.push(((sample - x0)? / sigma)?);
        if self.derivatives.len() > Self::ORDER {
            self.derivatives.remove(0);
        }
        let order = (i + 1).min(Self::ORDER);
        let mut prev = sample.clone();
        for (k, d) in self.derivatives.iter().rev().take(order).enumerate() {
            prev = (prev + (d * self.coefficient(order, i, k))?)?;
        }
        Ok(prev)
    }
}

/// HeunDiscreteScheduler: an Euler step then a trapezoidal correction (two model evaluations per step).
pub struct Heun {
    prediction: Prediction,
    /// \"leading\" spacing (its `init_noise_sigma` differs).
    leading: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    /// (derivative, dt, sample) saved by the first-order half.
    first: Option<(Tensor, f64, Tensor)>,
}

impl Heun {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        let b = base(cfg, steps);
        let mut sigmas = vec![b.sigmas[0]];
        sigmas.extend(doubled(&b.sigmas[1..]));
        sigmas.push(0.0);
        let mut timesteps = vec![b.timesteps[0]];
        timesteps.extend(b.timesteps[1..].iter().flat_map(|&t| [t, t]));
        Self { prediction: cfg.prediction, leading: cfg.leading, timesteps, sigmas, first: None }
    }
}

impl Scheduler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        init_sigma(&self.sigmas, self.leading)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        k_scale(sample, self.sigmas[i] as f64)
    }

    fn step(&mut self, out: &Tensor, i: usize, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        match self.first.take() {
            None => {
                let (sigma, next) = (self.sigmas[i] as f64, self.sigmas[i + 1] as f64);
                let x0 = k_pred_x0(self.prediction, sample, out, sigma)?;
                let derivative = ((sample - x0)? / sigma)?;
                let dt = next - sigma;
                let prev = (sample + (&derivative * dt)?)?;
                self.first = Some((derivative, dt, sample.clone()));
                Ok(prev)
            }
            Some((d1, dt, x)) => {
                let next = self.sigmas[i] as f64;
                let x0 = k_pred_x0(self.prediction, sample, out, next)?;
                let d2 = ((sample - x0)? / next)?;
                let derivative = ((d1 + d2)? / 2.0)?;
                Ok((x + (derivative * dt)?)?)
            }
        }
    }
}

/// KDPM2DiscreteScheduler (DPM-Solver-2): a half step to the log-midpoint sigma, then the full step.
pub struct KDpm2 {
    prediction: Prediction,
    /// \"leading\" spacing (its `init_noise_sigma` differs).
    leading: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_interpol: Vec<f32>,
    saved: Option<Tensor>,
}

impl KDpm2 {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        let b = base(cfg, steps);
        let mut s = b.sigmas.clone();
        s.push(0.0);
        let n = s.len();
        let interpol: Vec<f32> = (0..n).map(|i| lerp_half(s[i].ln(), s[(i + n - 1) % n].ln()).exp()).collect();
        let t_interpol: Vec<f64> =
            interpol.iter().map(|&x| sigma_to_t(x as f64, &b.log_sigmas) as f32 as f64).collect();
        let mut timesteps = vec![b.timesteps[0]];
        for (ti, t) in t_interpol[1..].iter().zip(&b.timesteps[1..]) {
            timesteps.extend([*ti, *t]);
        }
        let expand = |v: &[f32]| -> Vec<f32> {
            let mut out = vec![v[0]];
            out.extend(doubled(&v[1..]));
            out.push(v[v.len() - 1]);
            out
        };
        Self {
            prediction: cfg.prediction,
            leading: cfg.leading,
            timesteps,
            sigmas: expand(&s),
            sigmas_interpol: expand(&interpol),
            saved: None,
        }
    }
}

impl Scheduler for KDpm2 {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        init_sigma(&self.sigmas, self.leading)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let sigma = if self.saved.is_none() { self.sigmas[i] } else { self.sigmas_interpol[i] };
        k_scale(sample, sigma as f64)
    }

    fn step(&mut self, out: &Tensor, i: usize, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        match self.saved.take() {
            None => {
                let (sigma, interpol) = (self.sigmas[i] as f64, self.sigmas_interpol[i + 1] as f64);
                let x0 = k_pred_x0(self.prediction, sample, out, sigma)?;
                let derivative = ((sample - x0)? / sigma)?;
                self.saved = Some(sample.clone());
                Ok((sample + (derivative * (interpol - sigma))?)?)
            }
            Some(x) => {
                let (sigma, interpol, next) =
                    (self.sigmas[i - 1] as f64, self.sigmas_interpol[i] as f64, self.sigmas[i] as f64);
                let x0 = k_pred_x0(self.prediction, sample, out, interpol)?;
                let derivative = ((sample - x0)? / interpol)?;
                Ok((x + (derivative * (next - sigma))?)?)
            }
        }
    }
}

/// KDPM2AncestralDiscreteScheduler: DPM-Solver-2 towards the ancestral "down" sigma, plus fresh noise.
pub struct KDpm2Ancestral {
    prediction: Prediction,
    /// \"leading\" spacing (its `init_noise_sigma` differs).
    leading: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_interpol: Vec<f32>,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    saved: Option<Tensor>,
}

impl KDpm2Ancestral {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        let b = base(cfg, steps);
        let mut s = b.sigmas.clone();
        s.push(0.0);
        let n = s.len();
        let next: Vec<f32> = (0..n).map(|i| if i + 1 < n { s[i + 1] } else { 0.0 }).collect();
        let up: Vec<f32> =
            (0..n).map(|i| (next[i] * next[i] * (s[i] * s[i] - next[i] * next[i]) / (s[i] * s[i])).sqrt()).collect();
        let mut down: Vec<f32> = (0..n).map(|i| (next[i] * next[i] - up[i] * up[i]).sqrt()).collect();
        down[n - 1] = 0.0;
        let mut interpol: Vec<f32> = (0..n).map(|i| lerp_half(s[i].ln(), down[i].ln()).exp()).collect();
        interpol[n - 2] = 0.0;
        interpol[n - 1] = 0.0;
        let t_interpol: Vec<f64> =
            interpol.iter().map(|&x| sigma_to_t(x as f64, &b.log_sigmas) as f32 as f64).collect();
        let mut timesteps = vec![b.timesteps[0]];
        for (ti, t) in t_interpol.iter().zip(&b.timesteps[1..]) {
            timesteps.extend([*ti, *t]);
        }
        let expand = |v: &[f32]| -> Vec<f32> {
            let mut out = vec![v[0]];
            out.extend(doubled(&v[1..]));
            out.push(v[v.len() - 1]);
            out
        };
        Self {
            prediction: cfg.prediction,
            leading: cfg.leading,
            timesteps,
            sigmas: expand(&s),
            sigmas_interpol: expand(&interpol),
            sigmas_up: expand(&up),
            sigmas_down: expand(&down),
            saved: None,
        }
    }
}

impl Scheduler for KDpm2Ancestral {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        init_sigma(&self.sigmas, self.leading)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let sigma = if self.saved.is_none() { self.sigmas[i] } else { self.sigmas_interpol[i - 1] };
        k_scale(sample, sigma as f64)
    }

    fn step(&mut self, out: &Tensor, i: usize, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        match self.saved.take() {
            None => {
                let (sigma, interpol) = (self.sigmas[i] as f64, self.sigmas_interpol[i] as f64);
                let x0 = k_pred_x0(self.prediction, sample, out, sigma)?;
                let derivative = ((sample - x0)? / sigma)?;
                self.saved = Some(sample.clone());
                Ok((sample + (derivative * (interpol - sigma))?)?)
            }
            Some(x) => {
                let sigma = self.sigmas[i - 1] as f64;
                let interpol = self.sigmas_interpol[i - 1] as f64;
                let up = self.sigmas_up[i - 1] as f64;
                let down = self.sigmas_down[i - 1] as f64;
                let x0 = k_pred_x0(self.prediction, sample, out, interpol)?;
                let derivative = ((sample - x0)? / interpol)?;
                let prev = (x + (derivative * (down - sigma))?)?;
                Ok((prev + (noise.randn_like(sample)? * up)?)?)
            }
        }
    }
}
