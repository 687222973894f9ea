//! Dynamic loss scaling for fp16 mixed precision, as torch's `GradScaler` with accelerate's defaults: the loss
//! is multiplied by the scale before backward, gradients are divided by it before clipping; a step whose
//! gradients overflow (inf or NaN) is skipped and halves the scale; 2000 good steps in a row double it.

use super::optim::DeviceSum;
use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::Var;

const INIT_SCALE: f64 = 65536.0;
const GROWTH_FACTOR: f64 = 2.0;
const BACKOFF_FACTOR: f64 = 0.5;
const GROWTH_INTERVAL: usize = 2000;

/// The scale and its counters (saved with the training state).
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good_steps: usize,
    /// Optimizer steps skipped for overflow (the LR schedule does not advance on them, as in accelerate).
    pub skipped: usize,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self { scale: INIT_SCALE, good_steps: 0, skipped: 0 }
    }
}

impl LossScaler {
    /// Divides the gradients of `params` by the scale; false when any of them is not finite. The check stays on
    /// the device until one read at the end: `0·g` is 0 for a finite value and NaN for inf or NaN, so the sum of
    /// all of them is 0 exactly when every gradient is finite (summing the values themselves could overflow).
    pub fn unscale<'a>(&self, grads: &mut GradStore, params: impl Iterator<Item = &'a Var>) -> Result<bool> {
        let mut poisoned = DeviceSum::default();
        for p in params {
            if let Some(g) = grads.get(p.as_tensor()) {
                let g = (g / self.scale)?;
                poisoned.add(g.affine(0.0, 0.0)?.sum_all()?, 1.0)?;
                grads.insert(p.as_tensor(), g);
            }
        }
        Ok(poisoned.value()? == 0.0)
    }

    /// After a step: back off on overflow (the step was skipped), else count towards growth.
    pub fn update(&mut self, overflow: bool) {
        if overflow {
            self.scale *= BACKOFF_FACTOR;
            self.good_steps = 0;
            self.skipped += 1;
        } else {
            self.good_steps += 1;
            if self.good_steps == GROWTH_INTERVAL {
                self.scale *= GROWTH_FACTOR;
                self.good_steps = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn overflow_skips_and_backs_off_good_steps_grow() {
        let w = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let s = LossScaler::default();
        let loss = (w.as_tensor().sum_all().unwrap() * s.scale).unwrap();
        let mut grads = loss.backward().unwrap();
        assert!(s.unscale(&mut grads, [&w].into_iter()).unwrap());
        assert_eq!(grads.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 1.0]);
        // an overflowing gradient
        let loss = w.as_tensor().mul(&Tensor::new(&[f32::MAX, f32::MAX], &Device::Cpu).unwrap()).unwrap();
        let mut grads = (loss.sum_all().unwrap() * 4.0).unwrap().backward().unwrap();
        assert!(!s.unscale(&mut grads, [&w].into_iter()).unwrap());
        let mut s = LossScaler::default();
        s.update(true);
        assert_eq!((s.scale, s.skipped), (32768.0, 1));
        for _ in 0..GROWTH_INTERVAL {
            s.update(false);
        }
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
    }

    #[test]
    fn only_non_finite_values_count_as_overflow() {
        let s = LossScaler { scale: 1.0, ..LossScaler::default() };
        let finite = |dtype: DType, c: &[f32]| {
            let w = Var::from_tensor(&Tensor::ones(c.len(), dtype, &Device::Cpu).unwrap()).unwrap();
            let c = Tensor::new(c, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let mut grads = w.as_tensor().mul(&c).unwrap().sum_all().unwrap().backward().unwrap();
            s.unscale(&mut grads, [&w].into_iter()).unwrap()
        };
        // values whose sum overflows are still finite
        assert!(finite(DType::F32, &[3e38, 3e38, -0.0]));
        assert!(finite(DType::F16, &[65000.0, 65000.0]));
        assert!(!finite(DType::F32, &[1.0, f32::NAN]));
        assert!(!finite(DType::F32, &[f32::NEG_INFINITY, 1.0]));
        assert!(!finite(DType::F16, &[1.0, 1e6]));
    }
}
