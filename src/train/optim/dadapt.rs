//! Learning-rate-free Adam variants that estimate the step size d as they go: Prodigy (prodigyopt) and
//! DAdaptAdam (dadaptation). Both take one base LR (usually 1.0) for all groups, as their implementations do,
//! and keep d optimizer-wide.

use super::{read_both, Args, DeviceSum, ParamGroup};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Prodigy's settings (prodigyopt's names and defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prodigy {
    pub betas: (f64, f64),
    pub beta3: Option<f64>,
    pub eps: f64,
    pub weight_decay: f64,
    pub decouple: bool,
    pub use_bias_correction: bool,
    pub safeguard_warmup: bool,
    pub d0: f64,
    pub d_coef: f64,
    pub growth_rate: f64,
}

/// DAdaptAdam's settings (dadaptation's names and defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DAdaptAdam {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub decouple: bool,
    pub use_bias_correction: bool,
    pub d0: f64,
    pub growth_rate: f64,
}

/// The common LR of the groups at `multiplier`: groups must share one LR or have 0, as both implementations
/// require.
pub fn one_lr(groups: &[ParamGroup], multiplier: f64) -> Result<f64> {
    let lr = groups.iter().map(|g| g.lr * multiplier).fold(0f64, f64::max);
    if let Some(g) = groups.iter().find(|g| g.lr * multiplier != lr && g.lr != 0.0) {
        bail!(
            "Prodigy and D-Adaptation take one learning rate for every group (or 0 to freeze one); group {} has {} \
             while another has {lr}: set unet_lr and text_encoder_lr equal (usually 1.0) and leave out block LR weights",
            g.name,
            g.lr * multiplier
        );
    }
    Ok(lr)
}

/// Prodigy's state: [s, p0 (the starting weights), m, v].
pub fn prodigy_state(p: &Tensor) -> Result<Vec<Tensor>> {
    Ok(vec![p.zeros_like()?, p.copy()?, p.zeros_like()?, p.zeros_like()?])
}

/// DAdaptAdam's state: [s, m, v].
pub fn dadapt_state(p: &Tensor) -> Result<Vec<Tensor>> {
    Ok(vec![p.zeros_like()?, p.zeros_like()?, p.zeros_like()?])
}

/// `Σ a·b`, a 0-d tensor on their device.
fn dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.flatten_all()?.mul(&b.flatten_all()?)?.sum_all()?)
}

/// `Σ |a|`, a 0-d tensor on its device.
fn abs_sum(a: &Tensor) -> Result<Tensor> {
    Ok(a.abs()?.sum_all()?)
}

fn bias_correction(on: bool, (b1, b2): (f64, f64), k: f64) -> f64 {
    if on {
        (1.0 - b2.powf(k + 1.0)).sqrt() / (1.0 - b1.powf(k + 1.0))
    } else {
        1.0
    }
}

/// The base LR and the step size d·lr (bias-corrected at step `k` when asked).
fn step_size(groups: &[ParamGroup], multiplier: f64, d: f64, bias: (bool, (f64, f64)), k: f64) -> Result<(f64, f64)> {
    let lr = one_lr(groups, multiplier)?;
    Ok((lr, d * lr * bias_correction(bias.0, bias.1, k)))
}

/// Each parameter's gradient with coupled (L2) weight decay added; `None` where it got no gradient.
fn effective_grads(groups: &[ParamGroup], grads: &[Vec<Option<Tensor>>], l2: f64) -> Result<Vec<Vec<Option<Tensor>>>> {
    let mut out = Vec::with_capacity(groups.len());
    for (group, gs) in groups.iter().zip(grads) {
        let mut row = Vec::with_capacity(gs.len());
        for (p, g) in group.params.iter().zip(gs) {
            row.push(match g {
                Some(g) if l2 != 0.0 => Some((g + (p.as_tensor() * l2)?)?),
                g => g.clone(),
            });
        }
        out.push(row);
    }
    Ok(out)
}

/// Sets every parameter that has a gradient to `w − decoupled·w − step(gi, pi, g)`.
fn apply(
    groups: &[ParamGroup],
    grads: &[Vec<Option<Tensor>>],
    decoupled: f64,
    step: impl Fn(usize, usize, &Tensor) -> Result<Tensor>,
) -> Result<()> {
    for (gi, group) in groups.iter().enumerate() {
        for (pi, p) in group.params.iter().enumerate() {
            let Some(g) = &grads[gi][pi] else { continue };
            let mut w = p.as_tensor().clone();
            if decoupled != 0.0 {
                w = (&w + (&w * (-decoupled))?)?;
            }
            p.set(&(w - step(gi, pi, g)?)?)?;
        }
    }
    Ok(())
}

impl Prodigy {
    pub fn from_args(a: &Args) -> Result<Self> {
        Ok(Self {
            betas: a.pair("betas", (0.9, 0.999))?,
            beta3: a.opt_f64("beta3", None)?,
            eps: a.f64("eps", 1e-8)?,
            weight_decay: a.f64("weight_decay", 0.0)?,
            decouple: a.bool("decouple", true)?,
            use_bias_correction: a.bool("use_bias_correction", false)?,
            safeguard_warmup: a.bool("safeguard_warmup", false)?,
            d0: a.f64("d0", 1e-6)?,
            d_coef: a.f64("d_coef", 1.0)?,
            growth_rate: a.f64("growth_rate", f64::INFINITY)?,
        })
    }

    /// [d, d_max, d_numerator, k].
    pub fn init_scalars(&self) -> Vec<f64> {
        vec![self.d0, self.d0, 0.0, 0.0]
    }

    pub fn step(
        &self,
        groups: &[ParamGroup],
        state: &mut [Vec<Vec<Tensor>>],
        scalars: &mut [f64],
        grads: &[Vec<Option<Tensor>>],
        multiplier: f64,
    ) -> Result<()> {
        let (mut d, mut d_max, d_numerator, k) = (scalars[0], scalars[1], scalars[2], scalars[3]);
        let (b1, b2) = self.betas;
        let beta3 = self.beta3.unwrap_or(b2.sqrt());
        let (lr, dlr) = step_size(groups, multiplier, d, (self.use_bias_correction, self.betas), k)?;
        let d_numerator = d_numerator * beta3;
        let grads = effective_grads(groups, grads, if self.decouple { 0.0 } else { self.weight_decay })?;
        let (mut delta_numerator, mut d_denom) = (DeviceSum::default(), DeviceSum::default());
        for (gi, group) in groups.iter().enumerate().filter(|(_, g)| g.lr * multiplier > 0.0) {
            for (pi, p) in group.params.iter().enumerate() {
                let Some(g) = &grads[gi][pi] else { continue };
                let st = &mut state[gi][pi];
                delta_numerator.add(dot(g, &(&st[1] - p.as_tensor())?)?, (d / self.d0) * dlr)?;
                if b1 > 0.0 {
                    st[2] = ((&st[2] * b1)? + (g * (d * (1.0 - b1)))?)?;
                }
                st[3] = ((&st[3] * b2)? + (g.sqr()? * (d * d * (1.0 - b2)))?)?;
                let s_rate = if self.safeguard_warmup { (d / self.d0) * d } else { (d / self.d0) * dlr };
                st[0] = ((&st[0] * beta3)? + (g * s_rate)?)?;
                d_denom.add(abs_sum(&st[0])?, 1.0)?;
            }
        }
        let (delta_numerator, d_denom) = read_both(delta_numerator, d_denom)?;
        if d_denom == 0.0 {
            return Ok(());
        }
        let numerator = d_numerator + delta_numerator;
        if lr > 0.0 {
            let d_hat = self.d_coef * numerator / d_denom;
            if d == self.d0 {
                d = d.max(d_hat);
            }
            d_max = d_max.max(d_hat);
            d = d_max.min(d * self.growth_rate);
        }
        scalars.copy_from_slice(&[d, d_max, numerator, k + 1.0]);
        let decoupled = if self.decouple { self.weight_decay * dlr } else { 0.0 };
        apply(groups, &grads, decoupled, |gi, pi, g| {
            let st = &state[gi][pi];
            let denom = (st[3].sqrt()? + d * self.eps)?;
            Ok(if b1 > 0.0 { (st[2].div(&denom)? * dlr)? } else { (g.div(&denom)? * (dlr * d))? })
        })
    }
}

impl DAdaptAdam {
    pub fn from_args(a: &Args) -> Result<Self> {
        Ok(Self {
            betas: a.pair("betas", (0.9, 0.999))?,
            eps: a.f64("eps", 1e-8)?,
            weight_decay: a.f64("weight_decay", 0.0)?,
            decouple: a.bool("decouple", false)?,
            use_bias_correction: a.bool("use_bias_correction", false)?,
            d0: a.f64("d0", 1e-6)?,
            growth_rate: a.f64("growth_rate", f64::INFINITY)?,
        })
    }

    /// [d, numerator_weighted, k].
    pub fn init_scalars(&self) -> Vec<f64> {
        vec![self.d0, 0.0, 0.0]
    }

    pub fn step(
        &self,
        groups: &[ParamGroup],
        state: &mut [Vec<Vec<Tensor>>],
        scalars: &mut [f64],
        grads: &[Vec<Option<Tensor>>],
        multiplier: f64,
    ) -> Result<()> {
        let (mut d, numerator_weighted, k) = (scalars[0], scalars[1], scalars[2]);
        let (b1, b2) = self.betas;
        let (lr, dlr) = step_size(groups, multiplier, d, (self.use_bias_correction, self.betas), k)?;
        let sqrt_beta2 = b2.sqrt();
        let grads = effective_grads(groups, grads, if self.decouple { 0.0 } else { self.weight_decay })?;
        let (mut numerator_acum, mut sk_l1) = (DeviceSum::default(), DeviceSum::default());
        for (gi, group) in groups.iter().enumerate().filter(|(_, g)| g.lr * multiplier > 0.0) {
            for pi in 0..group.params.len() {
                let Some(g) = &grads[gi][pi] else { continue };
                let st = &mut state[gi][pi];
                let denom = (st[2].sqrt()? + self.eps)?;
                numerator_acum.add(dot(g, &st[0].div(&denom)?)?, dlr)?;
                st[1] = ((&st[1] * b1)? + (g * (dlr * (1.0 - b1)))?)?;
                st[2] = ((&st[2] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                st[0] = ((&st[0] * sqrt_beta2)? + (g * (dlr * (1.0 - sqrt_beta2)))?)?;
                sk_l1.add(abs_sum(&st[0])?, 1.0)?;
            }
        }
        let (numerator_acum, sk_l1) = read_both(numerator_acum, sk_l1)?;
        let numerator_weighted = sqrt_beta2 * numerator_weighted + (1.0 - sqrt_beta2) * numerator_acum;
        if sk_l1 == 0.0 {
            return Ok(());
        }
        if lr > 0.0 {
            let d_hat = numerator_weighted / ((1.0 - sqrt_beta2) * sk_l1);
            d = d.max(d_hat.min(d * self.growth_rate));
        }
        scalars.copy_from_slice(&[d, numerator_weighted, k + 1.0]);
        let decoupled = if self.decouple { self.weight_decay * dlr } else { 0.0 };
        apply(groups, &grads, decoupled, |gi, pi, _| {
            let st = &state[gi][pi];
            Ok(st[1].div(&(st[2].sqrt()? + self.eps)?)?)
        })
    }
}
