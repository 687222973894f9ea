//! Diffusion samplers matching diffusers' schedulers, under sd-scripts' sampler names.
//!
//! Each scheduler exposes diffusers' contract: a list of model timesteps (second-order methods repeat entries),
//! `scale_model_input` and `step`, with the same internal state. Scalars are computed from the f32 schedule tables
//! as diffusers keeps them.

mod ddim;
mod ddpm;
mod dpm_solver;
mod k_diffusion;
mod pndm;

use crate::schedule::NoiseSchedule;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

/// The scheduler families.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Ddim,
    Pndm,
    Lms,
    Euler,
    EulerAncestral,
    DpmMultistep { plus_plus: bool },
    DpmSinglestep,
    Heun,
    KDpm2,
    KDpm2Ancestral,
    Ddpm,
}

/// sd-scripts' sampler names (`--sample_sampler`, `--ss`) → scheduler, diffusers class, A1111 label.
pub const SAMPLERS: &[(&str, Kind, &str, &str)] = &[
    ("ddim", Kind::Ddim, "DDIMScheduler", "DDIM"),
    ("pndm", Kind::Pndm, "PNDMScheduler", "PLMS"),
    ("lms", Kind::Lms, "LMSDiscreteScheduler", "LMS"),
    ("k_lms", Kind::Lms, "LMSDiscreteScheduler", "LMS"),
    ("euler", Kind::Euler, "EulerDiscreteScheduler", "Euler"),
    ("k_euler", Kind::Euler, "EulerDiscreteScheduler", "Euler"),
    ("euler_a", Kind::EulerAncestral, "EulerAncestralDiscreteScheduler", "Euler a"),
    ("k_euler_a", Kind::EulerAncestral, "EulerAncestralDiscreteScheduler", "Euler a"),
    ("dpmsolver", Kind::DpmMultistep { plus_plus: false }, "DPMSolverMultistepScheduler", "DPM-Solver 2M"),
    ("dpmsolver++", Kind::DpmMultistep { plus_plus: true }, "DPMSolverMultistepScheduler", "DPM++ 2M"),
    ("dpmsingle", Kind::DpmSinglestep, "DPMSolverSinglestepScheduler", "DPM++ 2S"),
    ("heun", Kind::Heun, "HeunDiscreteScheduler", "Heun"),
    ("dpm_2", Kind::KDpm2, "KDPM2DiscreteScheduler", "DPM2"),
    ("k_dpm_2", Kind::KDpm2, "KDPM2DiscreteScheduler", "DPM2"),
    ("dpm_2_a", Kind::KDpm2Ancestral, "KDPM2AncestralDiscreteScheduler", "DPM2 a"),
    ("k_dpm_2_a", Kind::KDpm2Ancestral, "KDPM2AncestralDiscreteScheduler", "DPM2 a"),
    ("ddpm", Kind::Ddpm, "DDPMScheduler", "DDPM"),
];

/// The A1111 label of a sampler name (for PNG `parameters`).
pub fn a1111_label(name: &str, karras: bool) -> String {
    let lower = name.to_ascii_lowercase();
    let base = SAMPLERS.iter().find(|s| s.0 == lower).map(|s| s.3).unwrap_or(name);
    if karras {
        format!("{base} Karras")
    } else {
        base.to_string()
    }
}

/// Every accepted sampler name, for messages.
pub fn sampler_names() -> Vec<&'static str> {
    SAMPLERS.iter().map(|s| s.0).collect()
}

/// Looks a sampler name up (case-insensitive); the error lists the accepted names.
pub fn parse_sampler(name: &str) -> Result<Kind> {
    let lower = name.to_ascii_lowercase();
    match SAMPLERS.iter().find(|s| s.0 == lower) {
        Some(s) => Ok(s.1),
        None => bail!("unknown sampler {name:?}; accepted samplers: {}", sampler_names().join(", ")),
    }
}

/// Everything a scheduler needs besides the step count.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub schedule: NoiseSchedule,
    pub prediction: Prediction,
    /// Karras sigmas (sigma-based schedulers).
    pub karras: bool,
    /// `steps_offset` of "leading" spacing (1 for SD).
    pub steps_offset: usize,
    /// DDIM's eta (0 = deterministic).
    pub eta: f64,
    /// Clamp predicted x0 to [-1, 1] (DDIM, DDPM).
    pub clip_sample: bool,
    /// "leading" timestep spacing for the sigma schedulers (Euler, LMS, Heun, DPM2), as diffusers uses them with a
    /// model's scheduler config that says so (SDXL base); otherwise their default "linspace", as sd-scripts.
    pub leading: bool,
}

impl SchedulerConfig {
    /// SD's training schedule with the given prediction type.
    pub fn sd(prediction: Prediction) -> Self {
        Self {
            schedule: NoiseSchedule::sd(),
            prediction,
            karras: false,
            steps_offset: 1,
            eta: 0.0,
            clip_sample: false,
            leading: false,
        }
    }
}

/// Supplies Gaussian noise to stochastic schedulers.
pub trait NoiseSource {
    fn randn_like(&mut self, t: &Tensor) -> Result<Tensor>;
}

/// A configured scheduler with its state for one sampling run.
pub trait Scheduler: Send {
    /// The model timesteps, one per model evaluation, in order.
    fn timesteps(&self) -> &[f64];
    /// The factor applied to unit-variance initial noise.
    fn init_noise_sigma(&self) -> f64;
    /// The sigmas (k-diffusion schedulers), for inspection and tests.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
    /// Scales the latents fed to the model at evaluation `i`.
    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// Advances from evaluation `i`'s model output.
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, noise: &mut dyn NoiseSource)
        -> Result<Tensor>;
}

/// Builds a scheduler for `steps` inference steps.
pub fn build(kind: Kind, cfg: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
    let n = cfg.schedule.len();
    if steps == 0 || steps > n {
        bail!("steps must be between 1 and {n}, got {steps}");
    }
    Ok(match kind {
        Kind::Ddim => Box::new(ddim::Ddim::new(cfg, steps)),
        Kind::Ddpm => Box::new(ddpm::Ddpm::new(cfg, steps)),
        Kind::Pndm => Box::new(pndm::Pndm::new(cfg, steps)),
        Kind::Euler => Box::new(k_diffusion::Euler::new(cfg, steps, false)),
        Kind::EulerAncestral => Box::new(k_diffusion::Euler::new(cfg, steps, true)),
        Kind::Lms => Box::new(k_diffusion::Lms::new(cfg, steps)),
        Kind::Heun => Box::new(k_diffusion::Heun::new(cfg, steps)),
        Kind::KDpm2 => Box::new(k_diffusion::KDpm2::new(cfg, steps)),
        Kind::KDpm2Ancestral => Box::new(k_diffusion::KDpm2Ancestral::new(cfg, steps)),
        Kind::DpmMultistep { plus_plus } => Box::new(dpm_solver::DpmMultistep::new(cfg, steps, plus_plus)),
        Kind::DpmSinglestep => Box::new(dpm_solver::DpmSinglestep::new(cfg, steps)),
    })
}

// ---- shared schedule arithmetic (as diffusers computes it) ----

/// numpy's `round` (half to even).
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// "leading" spacing: `(arange(N) · (T // N)).round()[::-1] + offset`.
pub(crate) fn leading_timesteps(train: usize, steps: usize, offset: usize) -> Vec<f64> {
    let ratio = train / steps;
    (0..steps).rev().map(|i| (i * ratio + offset) as f64).collect()
}

/// `np.linspace(start, stop, num)`: `i·step + start`, the last element exactly `stop`.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// "linspace" spacing: `linspace(0, T−1, N, dtype=float32)[::-1]`.
pub(crate) fn linspace_timesteps(train: usize, steps: usize) -> Vec<f64> {
    np_linspace(0.0, (train - 1) as f64, steps).into_iter().rev().map(|t| t as f32 as f64).collect()
}

/// The full sigma table `√((1−ᾱ)/ᾱ)` in f32, as diffusers' k-diffusion schedulers build it.
pub(crate) fn train_sigmas(s: &NoiseSchedule) -> Vec<f32> {
    s.alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub(crate) fn interp(x: f64, fp: &[f32]) -> f64 {
    if x <= 0.0 {
        return fp[0] as f64;
    }
    let last = fp.len() - 1;
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    let (a, b) = (fp[i] as f64, fp[i + 1] as f64);
    // numpy: slope * (x - xp[j]) + fp[j]
    (b - a) * w + a
}

/// Karras et al. (2022) sigmas between the ends of `sigmas` (ρ = 7), as diffusers' `_convert_to_karras`.
pub(crate) fn karras(sigma_max: f64, sigma_min: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    (0..steps)
        .map(|i| {
            let ramp = if steps == 1 { 0.0 } else { i as f64 / (steps - 1) as f64 };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional timestep of `sigma` by interpolating `log_sigmas` (f32 table).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // low_idx = last index with log_sigma >= log_sigmas[idx], clipped to n-2
    let count = log_sigmas.iter().filter(|&&l| log_sigma - l as f64 >= 0.0).count();
    let low = count.saturating_sub(1).min(n - 2);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// `(α_t, σ_t)` of a k-diffusion sigma: `α = 1/√(σ²+1)`, `σ_t = σ·α`.
pub(crate) fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
    (a, sigma * a)
}

/// The denoised estimate from a k-diffusion-parameterised model output at `sigma`.
pub(crate) fn k_pred_x0(prediction: Prediction, sample: &Tensor, out: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok(match prediction {
        Prediction::Epsilon => (sample - (out * sigma)?)?,
        Prediction::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            ((out * (-sigma / s2.sqrt()))? + (sample / s2)?)?
        }
    })
}

/// The k-diffusion input scaling `x / √(σ²+1)`.
pub(crate) fn k_scale(sample: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok((sample / (sigma * sigma + 1.0).sqrt())?)
}

/// `(x0, eps)` from a DDPM-parameterised model output at `ᾱ_t` (DDIM, DDPM, PNDM).
pub(crate) fn ddpm_pred(
    prediction: Prediction,
    sample: &Tensor,
    out: &Tensor,
    alpha_prod: f64,
) -> Result<(Tensor, Tensor)> {
    let (a, b) = (alpha_prod.sqrt(), (1.0 - alpha_prod).sqrt());
    Ok(match prediction {
        Prediction::Epsilon => (((sample - (out * b)?)? / a)?, out.clone()),
        Prediction::VPrediction => (((sample * a)? - (out * b)?)?, ((out * a)? + (sample * b)?)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_rounding_and_spacings() {
        assert_eq!(np_round(499.5), 500.0);
        assert_eq!(np_round(500.5), 500.0);
        assert_eq!(leading_timesteps(1000, 10, 1), vec![901., 801., 701., 601., 501., 401., 301., 201., 101., 1.]);
        assert_eq!(linspace_timesteps(1000, 2), vec![999.0, 0.0]);
    }

    #[test]
    fn every_sd_scripts_name_parses_and_unknown_lists_them() {
        for n in sampler_names() {
            parse_sampler(n).unwrap();
        }
        let e = parse_sampler("dpm++_2m_karras").unwrap_err().to_string();
        assert!(e.contains("euler_a") && e.contains("k_dpm_2_a") && e.contains("ddim"), "{e}");
    }
}
