//! The first-order rules: AdamW (torch.optim.AdamW), Lion (lion_pytorch) and SGD with Nesterov momentum
//! (torch.optim.SGD(nesterov=True)).

use super::Args;
use anyhow::Result;
use candle_core::Tensor;

/// AdamW's settings (also AdamW8bit's).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

/// Lion's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lion {
    pub betas: (f64, f64),
    pub weight_decay: f64,
}

/// SGD with Nesterov momentum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdNesterov {
    pub momentum: f64,
    pub weight_decay: f64,
}

/// Zeroed first and second moments.
pub fn adam_state(p: &Tensor) -> Result<Vec<Tensor>> {
    Ok(vec![p.zeros_like()?, p.zeros_like()?])
}

/// A zeroed momentum buffer.
pub fn momentum_state(p: &Tensor) -> Result<Vec<Tensor>> {
    Ok(vec![p.zeros_like()?])
}

impl Adam {
    pub fn from_args(a: &Args) -> Result<Self> {
        Ok(Self {
            betas: a.pair("betas", (0.9, 0.999))?,
            eps: a.f64("eps", 1e-8)?,
            weight_decay: a.f64("weight_decay", 0.01)?,
        })
    }

    /// The moments updated by `g`: (m, v).
    pub fn moments(&self, g: &Tensor, m: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b1, b2) = self.betas;
        Ok((((m * b1)? + (g * (1.0 - b1))?)?, ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?))
    }

    /// The decoupled-decay Adam update of `w` (step `t` from 1), from the new moments.
    pub fn apply(&self, w: &Tensor, m: &Tensor, v: &Tensor, lr: f64, t: usize) -> Result<Tensor> {
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(t as i32);
        let bc2 = 1.0 - b2.powi(t as i32);
        let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
        let decayed = (w * (1.0 - lr * self.weight_decay))?;
        Ok((decayed - (m.div(&denom)? * (lr / bc1))?)?)
    }

    pub fn step(&self, w: &Tensor, g: &Tensor, st: &mut Vec<Tensor>, lr: f64, t: usize) -> Result<Tensor> {
        let (m, v) = self.moments(g, &st[0], &st[1])?;
        let out = self.apply(w, &m, &v, lr, t)?;
        *st = vec![m, v];
        Ok(out)
    }

    /// `step` as three fused in-place updates (moments, then weights; see `nn::fused`) with the gradient
    /// multiplied by `grad_scale`: the same arithmetic, three kernel launches instead of fifteen.
    pub fn step_in_place(
        &self,
        w: &Tensor,
        g: &Tensor,
        st: &[Tensor],
        lr: f64,
        t: usize,
        grad_scale: f64,
    ) -> Result<()> {
        use crate::nn::fused;
        let (b1, b2) = self.betas;
        fused::ema_(&st[0], g, b1, grad_scale, false)?;
        fused::ema_(&st[1], g, b2, grad_scale, true)?;
        let (bc1, bc2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
        let p =
            fused::AdamW { decay: 1.0 - lr * self.weight_decay, step: lr / bc1, sqrt_bc2: bc2.sqrt(), eps: self.eps };
        p.apply_(w, &st[0], &st[1])
    }
}

impl Lion {
    pub fn from_args(a: &Args) -> Result<Self> {
        Ok(Self { betas: a.pair("betas", (0.9, 0.99))?, weight_decay: a.f64("weight_decay", 0.0)? })
    }

    pub fn step(&self, w: &Tensor, g: &Tensor, st: &mut [Tensor], lr: f64) -> Result<Tensor> {
        let (b1, b2) = self.betas;
        let update = ((&st[0] * b1)? + (g * (1.0 - b1))?)?.sign()?;
        let out = ((w * (1.0 - lr * self.weight_decay))? - (update * lr)?)?;
        st[0] = ((&st[0] * b2)? + (g * (1.0 - b2))?)?;
        Ok(out)
    }
}

impl SgdNesterov {
    pub fn from_args(a: &Args) -> Result<Self> {
        Ok(Self { momentum: a.f64("momentum", 0.9)?, weight_decay: a.f64("weight_decay", 0.0)? })
    }

    pub fn step(&self, w: &Tensor, g: &Tensor, st: &mut [Tensor], lr: f64, t: usize) -> Result<Tensor> {
        let g = if self.weight_decay != 0.0 { (g + (w * self.weight_decay)?)? } else { g.clone() };
        let buf = if t == 1 { g.clone() } else { ((&st[0] * self.momentum)? + &g)? };
        let d = (&g + (&buf * self.momentum)?)?;
        st[0] = buf;
        Ok((w - (d * lr)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Kind, Optimizer, ParamGroup};
    use super::*;
    use candle_core::{Device, Var};

    /// One parameter w = [1, -2], loss = Σ w² (gradient 2w), worked by hand.
    fn run(kind: Kind, lr: f64, steps: usize) -> Vec<f32> {
        let w = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(kind, vec![ParamGroup { name: "g".into(), params: vec![w.clone()], lr }]).unwrap();
        for _ in 0..steps {
            let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 1.0).unwrap();
        }
        w.as_tensor().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn adamw_first_steps_by_hand() {
        // step 1: m̂ = g, v̂ = g² → update = lr·g/(|g|+eps) ≈ lr·sign(g); decay first: w(1 − lr·wd)
        let k = Kind::AdamW(Adam { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01 });
        let w = run(k, 0.1, 1);
        assert!((w[0] as f64 - (1.0 * (1.0 - 0.001) - 0.1)).abs() < 1e-6, "{w:?}");
        assert!((w[1] as f64 - (-2.0 * (1.0 - 0.001) + 0.1)).abs() < 1e-6, "{w:?}");
        // step 2 by hand for w0: g1 = 2, w1 = 0.899; g2 = 1.798
        let (b1, b2, lr, wd) = (0.9f64, 0.999f64, 0.1, 0.01);
        let (g1, w1) = (2.0, 0.899);
        let g2 = 2.0 * w1;
        let m = b1 * (1.0 - b1) * g1 + (1.0 - b1) * g2;
        let v = b2 * (1.0 - b2) * g1 * g1 + (1.0 - b2) * g2 * g2;
        let want = w1 * (1.0 - lr * wd) - lr * (m / (1.0 - b1 * b1)) / ((v / (1.0 - b2 * b2)).sqrt() + 1e-8);
        let w = run(k, 0.1, 2);
        assert!((w[0] as f64 - want).abs() < 1e-6, "{} vs {want}", w[0]);
    }

    #[test]
    fn a_parameter_without_gradient_is_skipped_and_counts_its_own_steps() {
        // as torch: w2 gets no gradient in step 1; its first update in step 2 is a first Adam step (≈ lr·sign g)
        let k = Kind::AdamW(Adam { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.0 });
        let w1 = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let w2 = Var::new(&[3.0f32], &Device::Cpu).unwrap();
        let group = ParamGroup { name: "g".into(), params: vec![w1.clone(), w2.clone()], lr: 0.1 };
        let mut opt = Optimizer::new(k, vec![group]).unwrap();
        opt.step(&w1.as_tensor().sqr().unwrap().sum_all().unwrap().backward().unwrap(), 1.0).unwrap();
        assert_eq!(w2.as_tensor().to_vec1::<f32>().unwrap(), vec![3.0]);
        assert_eq!(opt.param_steps, vec![vec![1, 0]]);
        let loss = (w1.as_tensor().sqr().unwrap() + w2.as_tensor().sqr().unwrap()).unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap(), 1.0).unwrap();
        assert!((w2.as_tensor().to_vec1::<f32>().unwrap()[0] - 2.9).abs() < 1e-6);
        assert_eq!(opt.param_steps, vec![vec![2, 1]]);
    }

    #[test]
    fn bf16_weights_step_in_bf16() {
        // full_bf16: the weights and moments stay bf16 and follow the f32 result to bf16 precision
        for kind in [
            Kind::AdamW(Adam { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01 }),
            Kind::Adafactor(super::super::Adafactor::from_args(&super::super::Args(&vec![])).unwrap()),
        ] {
            let w32 = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
            let w16 = Var::from_tensor(&w32.as_tensor().to_dtype(candle_core::DType::BF16).unwrap()).unwrap();
            let mut o32 =
                Optimizer::new(kind, vec![ParamGroup { name: "g".into(), params: vec![w32.clone()], lr: 0.1 }])
                    .unwrap();
            let mut o16 =
                Optimizer::new(kind, vec![ParamGroup { name: "g".into(), params: vec![w16.clone()], lr: 0.1 }])
                    .unwrap();
            for _ in 0..3 {
                o32.step(&w32.as_tensor().sqr().unwrap().sum_all().unwrap().backward().unwrap(), 1.0).unwrap();
                o16.step(&w16.as_tensor().sqr().unwrap().sum_all().unwrap().backward().unwrap(), 1.0).unwrap();
            }
            assert_eq!(w16.as_tensor().dtype(), candle_core::DType::BF16);
            let a = w32.as_tensor().to_vec1::<f32>().unwrap();
            let b = w16.as_tensor().to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap();
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 0.02 * x.abs().max(0.1), "{kind:?}: f32 {x} vs bf16 {y}");
            }
        }
    }

    #[test]
    fn lion_and_sgd_nesterov_by_hand() {
        let w = run(Kind::Lion(Lion { betas: (0.9, 0.99), weight_decay: 0.0 }), 0.1, 2);
        // sign updates of size lr: 1 → 0.9 → 0.8; −2 → −1.9 → −1.8
        assert!((w[0] - 0.8).abs() < 1e-6 && (w[1] + 1.8).abs() < 1e-6, "{w:?}");
        // SGD nesterov, μ = 0.9: step 1: buf = g = 2, d = g + μ·buf = 3.8, w = 1 − 0.1·3.8 = 0.62
        let sgd = Kind::SgdNesterov(SgdNesterov { momentum: 0.9, weight_decay: 0.0 });
        let w = run(sgd, 0.1, 1);
        assert!((w[0] - 0.62).abs() < 1e-6, "{w:?}");
        // step 2: g = 1.24, buf = 0.9·2 + 1.24 = 3.04, d = 1.24 + 0.9·3.04 = 3.976, w = 0.62 − 0.3976 = 0.2224
        let w = run(sgd, 0.1, 2);
        assert!((w[0] - 0.2224).abs() < 1e-6, "{w:?}");
    }
}
