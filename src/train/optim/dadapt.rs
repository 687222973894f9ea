//! Learning-rate-free Adam variants that estimate the step size d as they go: Prodigy (prodigyopt) and
//! DAdaptAdam (dadaptation). Both take one base LR (usually 1.0) for all groups, as their implementations do,
//! and keep d optimizer-wide.

use super::{scalar, Args, ParamGroup};
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

fn dot(a: &Tensor, b: &Tensor) -> Result<f64> {
    scalar(&a.flatten_all()?.mul(&b.flatten_all()?)?.sum_all()?)
}

fn abs_sum(a: &Tensor) -> Result<f64> {
    scalar(&a.abs()?.sum_all()?)
}

fn bias_correction(on: bool, (b1, b2): (f64, f64), k: f64) -> f64 {
    if on {
        (1.0 - b2.powf(k + 1.0)).sqrt() / (1.0 - b1.powf(k + 1.0))
    } else {
        1.0
    }
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
        let lr = one_lr(groups, multiplier)?;
        let dlr = d * lr * bias_correction(self.use_bias_correction, self.betas, k);
        let d_numerator = d_numerator * beta3;
        let (mut delta_numerator, mut d_denom) = (0.0, 0.0);
        let mut used = Vec::new();
        for (gi, group) in groups.iter().enumerate() {
            let mut gs = Vec::new();
            for (pi, p) in group.params.iter().enumerate() {
                let w = p.as_tensor();
                let Some(mut g) = grads[gi][pi].clone() else {
                    gs.push(None);
                    continue;
                };
                if self.weight_decay != 0.0 && !self.decouple {
                    g = (g + (w * self.weight_decay)?)?;
                }
                if group.lr * multiplier > 0.0 {
                    let st = &mut state[gi][pi];
                    delta_numerator += (d / self.d0) * dlr * dot(&g, &(&st[1] - w)?)?;
                    if b1 > 0.0 {
                        st[2] = ((&st[2] * b1)? + (&g * (d * (1.0 - b1)))?)?;
                    }
                    st[3] = ((&st[3] * b2)? + (g.sqr()? * (d * d * (1.0 - b2)))?)?;
                    let s_rate = if self.safeguard_warmup { (d / self.d0) * d } else { (d / self.d0) * dlr };
                    st[0] = ((&st[0] * beta3)? + (&g * s_rate)?)?;
                    d_denom += abs_sum(&st[0])?;
                }
                gs.push(Some(g));
            }
            used.push(gs);
        }
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
        for (gi, group) in groups.iter().enumerate() {
            for (pi, p) in group.params.iter().enumerate() {
                let Some(g) = &used[gi][pi] else { continue };
                let st = &state[gi][pi];
                let denom = (st[3].sqrt()? + d * self.eps)?;
                let mut w = p.as_tensor().clone();
                if self.weight_decay != 0.0 && self.decouple {
                    w = (&w + (&w * (-self.weight_decay * dlr))?)?;
                }
                let step = if b1 > 0.0 { (st[2].div(&denom)? * dlr)? } else { (g.div(&denom)? * (dlr * d))? };
                p.set(&(w - step)?)?;
            }
        }
        Ok(())
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
        let lr = one_lr(groups, multiplier)?;
        let dlr = d * lr * bias_correction(self.use_bias_correction, self.betas, k);
        let sqrt_beta2 = b2.sqrt();
        let (mut numerator_acum, mut sk_l1) = (0.0, 0.0);
        for (gi, group) in groups.iter().enumerate() {
            for (pi, p) in group.params.iter().enumerate() {
                let w = p.as_tensor();
                let Some(mut g) = grads[gi][pi].clone() else { continue };
                if self.weight_decay != 0.0 && !self.decouple {
                    g = (g + (w * self.weight_decay)?)?;
                }
                if group.lr * multiplier > 0.0 {
                    let st = &mut state[gi][pi];
                    let denom = (st[2].sqrt()? + self.eps)?;
                    numerator_acum += dlr * dot(&g, &st[0].div(&denom)?)?;
                    st[1] = ((&st[1] * b1)? + (&g * (dlr * (1.0 - b1)))?)?;
                    st[2] = ((&st[2] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    st[0] = ((&st[0] * sqrt_beta2)? + (&g * (dlr * (1.0 - sqrt_beta2)))?)?;
                    sk_l1 += abs_sum(&st[0])?;
                }
            }
        }
        let numerator_weighted = sqrt_beta2 * numerator_weighted + (1.0 - sqrt_beta2) * numerator_acum;
        if sk_l1 == 0.0 {
            return Ok(());
        }
        if lr > 0.0 {
            let d_hat = numerator_weighted / ((1.0 - sqrt_beta2) * sk_l1);
            d = d.max(d_hat.min(d * self.growth_rate));
        }
        scalars.copy_from_slice(&[d, numerator_weighted, k + 1.0]);
        for (gi, group) in groups.iter().enumerate() {
            for (pi, p) in group.params.iter().enumerate() {
                if grads[gi][pi].is_none() {
                    continue;
                }
                let st = &state[gi][pi];
                let denom = (st[2].sqrt()? + self.eps)?;
                let mut w = p.as_tensor().clone();
                if self.weight_decay != 0.0 && self.decouple {
                    w = (&w + (&w * (-self.weight_decay * dlr))?)?;
                }
                p.set(&(w - st[1].div(&denom)?)?)?;
            }
        }
        Ok(())
    }
}
