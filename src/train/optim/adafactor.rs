//! Adafactor as transformers implements it: factored second moments for tensors of rank ≥ 2 (row and column
//! means over the last two dimensions), update clipping, optional first moment, and the relative step size
//! (`min(1e-2, 1/√t)`, scaled by the parameter's RMS) that sd-scripts uses by default.

use super::Args;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// Adafactor's settings (transformers' names and defaults, with sd-scripts' `relative_step=True`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adafactor {
    pub eps: (f64, f64),
    pub clip_threshold: f64,
    pub decay_rate: f64,
    pub beta1: Option<f64>,
    pub weight_decay: f64,
    pub scale_parameter: bool,
    pub relative_step: bool,
    pub warmup_init: bool,
}

/// Root mean square of a tensor, as a 0-d f64 tensor on its device.
fn rms_on_device(t: &Tensor) -> Result<Tensor> {
    Ok((t.sqr()?.sum_all()?.to_dtype(DType::F64)?.sqrt()? / (t.elem_count() as f64).sqrt())?)
}

/// Root mean square of a tensor.
pub fn rms(t: &Tensor) -> Result<f64> {
    super::scalar(&rms_on_device(t)?)
}

impl Adafactor {
    pub fn from_args(a: &Args) -> Result<Self> {
        let warmup_init = a.bool("warmup_init", false)?;
        // sd-scripts: relative_step defaults to True, and warmup_init turns it on
        let relative_step = a.bool("relative_step", true)? || warmup_init;
        if warmup_init && !relative_step {
            bail!("warmup_init needs relative_step");
        }
        Ok(Self {
            eps: a.pair("eps", (1e-30, 1e-3))?,
            clip_threshold: a.f64("clip_threshold", 1.0)?,
            decay_rate: a.f64("decay_rate", -0.8)?,
            beta1: a.opt_f64("beta1", None)?,
            weight_decay: a.f64("weight_decay", 0.0)?,
            scale_parameter: a.bool("scale_parameter", true)?,
            relative_step,
            warmup_init,
        })
    }

    /// Zeroed state: [row, column] second moments (rank ≥ 2) or [full second moment], then the first moment
    /// when `beta1` is set; in f32 whatever the parameter's dtype, as transformers keeps them.
    pub fn init_state(&self, p: &Tensor) -> Result<Vec<Tensor>> {
        let p = &p.to_dtype(DType::F32)?;
        let dims = p.dims();
        let mut st = if dims.len() >= 2 {
            let n = dims.len();
            let col: Vec<usize> = dims[..n - 2].iter().chain(&dims[n - 1..]).copied().collect();
            vec![Tensor::zeros(&dims[..n - 1], p.dtype(), p.device())?, Tensor::zeros(col, p.dtype(), p.device())?]
        } else {
            vec![p.zeros_like()?]
        };
        if self.beta1.is_some() {
            st.push(p.zeros_like()?);
        }
        Ok(st)
    }

    /// The step size at step `t` for a parameter of RMS `param_rms` (`lr` is the group's, used without
    /// relative steps).
    pub fn lr(&self, lr: f64, t: usize, param_rms: f64) -> f64 {
        let scale = if self.scale_parameter { self.eps.1.max(param_rms) } else { 1.0 };
        scale * self.unscaled_lr(lr, t)
    }

    /// `lr` for the parameter `w`, as a 0-d f64 tensor on its device (no read back: one per tensor would stall
    /// a GPU's queue every time).
    fn lr_on_device(&self, lr: f64, t: usize, w: &Tensor) -> Result<Tensor> {
        let rel = self.unscaled_lr(lr, t);
        Ok(if self.scale_parameter {
            (rms_on_device(w)?.maximum(self.eps.1)? * rel)?
        } else {
            Tensor::new(rel, w.device())?
        })
    }

    /// The relative step `min(min_step, 1/√t)`, or the group's `lr` without relative steps.
    fn unscaled_lr(&self, lr: f64, t: usize) -> f64 {
        if self.relative_step {
            let min_step = if self.warmup_init { 1e-6 * t as f64 } else { 1e-2 };
            min_step.min(1.0 / (t as f64).sqrt())
        } else {
            lr
        }
    }

    pub fn step(&self, w: &Tensor, g: &Tensor, st: &mut [Tensor], group_lr: f64, t: usize) -> Result<Tensor> {
        let dtype = w.dtype();
        let (w, g) = (&w.to_dtype(DType::F32)?, &g.to_dtype(DType::F32)?);
        let lr = self.lr_on_device(group_lr, t, w)?;
        let beta2t = 1.0 - (t as f64).powf(self.decay_rate);
        let sq = (g.sqr()? + self.eps.0)?;
        let update = if w.rank() >= 2 {
            let row = ((&st[0] * beta2t)? + (sq.mean(D::Minus1)? * (1.0 - beta2t))?)?;
            let col = ((&st[1] * beta2t)? + (sq.mean(D::Minus2)? * (1.0 - beta2t))?)?;
            let r = row.broadcast_div(&row.mean_keepdim(D::Minus1)?)?.sqrt()?.recip()?.unsqueeze(D::Minus1)?;
            let c = col.unsqueeze(col.rank() - 1)?.sqrt()?.recip()?;
            st[0] = row;
            st[1] = col;
            r.broadcast_mul(&c)?.mul(g)?
        } else {
            let v = ((&st[0] * beta2t)? + (sq * (1.0 - beta2t))?)?;
            let u = v.sqrt()?.recip()?.mul(g)?;
            st[0] = v;
            u
        };
        // clipped to RMS `clip_threshold`, times the step size
        let factor = lr.div(&(rms_on_device(&update)? / self.clip_threshold)?.maximum(1.0)?)?;
        let update = update.broadcast_mul(&factor.to_dtype(DType::F32)?)?;
        let update = match self.beta1 {
            Some(b1) => {
                let i = st.len() - 1;
                st[i] = ((&st[i] * b1)? + (update * (1.0 - b1))?)?;
                st[i].clone()
            }
            None => update,
        };
        let w = if self.weight_decay != 0.0 {
            (w + w.broadcast_mul(&(lr * -self.weight_decay)?.to_dtype(DType::F32)?)?)?
        } else {
            w.clone()
        };
        Ok((w - update)?.to_dtype(dtype)?)
    }
}
