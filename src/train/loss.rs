//! Loss terms of sd-scripts' training step, in its order: element loss (l2 / huber / smooth_l1 with the Huber
//! schedules) → mean over C,H,W → prior weight → min-SNR → v-scaling → v-like → debiased → mean over the batch.

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

/// The element loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossType {
    L2,
    Huber,
    SmoothL1,
}

impl LossType {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "l2" => LossType::L2,
            "huber" => LossType::Huber,
            "smooth_l1" => LossType::SmoothL1,
            _ => bail!("unknown loss_type {s:?}; expected l2, huber or smooth_l1"),
        })
    }
}

/// How the Huber parameter c depends on the timestep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HuberSchedule {
    Constant,
    Exponential,
    Snr,
}

impl HuberSchedule {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "constant" => HuberSchedule::Constant,
            "exponential" => HuberSchedule::Exponential,
            "snr" => HuberSchedule::Snr,
            _ => bail!("unknown huber_schedule {s:?}; expected constant, exponential or snr"),
        })
    }
}

/// The Huber c at timestep `t` (c0 = `huber_c`; `alpha_cumprod` = ᾱ_t).
pub fn huber_c(schedule: HuberSchedule, c0: f64, t: usize, alpha_cumprod: f64, num_timesteps: usize) -> f64 {
    match schedule {
        HuberSchedule::Constant => c0,
        HuberSchedule::Exponential => {
            let alpha = -c0.ln() / num_timesteps as f64;
            (-alpha * t as f64).exp()
        }
        HuberSchedule::Snr => {
            let sigma = ((1.0 - alpha_cumprod) / alpha_cumprod).sqrt();
            (1.0 - c0) / (1.0 + sigma).powi(2) + c0
        }
    }
}

/// Element loss (no reduction); `c` per sample `[B]` for the Huber variants.
pub fn element_loss(kind: LossType, pred: &Tensor, target: &Tensor, c: Option<&Tensor>) -> Result<Tensor> {
    let d2 = (pred - target)?.sqr()?;
    Ok(match (kind, c) {
        (LossType::L2, _) => d2,
        (LossType::Huber, Some(c)) => {
            let c = c.reshape((c.dim(0)?, 1, 1, 1))?;
            (d2.broadcast_add(&c.sqr()?)?.sqrt()?.broadcast_sub(&c)?.broadcast_mul(&(c * 2.0)?))?
        }
        (LossType::SmoothL1, Some(c)) => {
            let c = c.reshape((c.dim(0)?, 1, 1, 1))?;
            (d2.broadcast_add(&c.sqr()?)?.sqrt()?.broadcast_sub(&c)? * 2.0)?
        }
        (_, None) => bail!("huber and smooth_l1 losses need the Huber c"),
    })
}

/// sd-scripts' `apply_masked_loss`: the element loss `[B, C, h, w]` times the mask `[B, 1, H, W]` brought to the
/// latents' size by area interpolation (the mean of each 8×8 block).
pub fn apply_mask(l: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = l.dims4()?;
    let (_, _, mh, mw) = mask.dims4()?;
    if mh % h != 0 || mw % w != 0 {
        anyhow::bail!("a {mw}×{mh} loss mask does not divide into the {w}×{h} latents");
    }
    let m = mask.to_dtype(l.dtype())?.to_device(l.device())?.avg_pool2d((mh / h, mw / w))?;
    Ok(l.broadcast_mul(&m)?)
}

/// Per-sample mean over C, H, W: `[B, C, H, W]` → `[B]`.
pub fn mean_per_sample(l: &Tensor) -> Result<Tensor> {
    Ok(l.flatten_from(1)?.mean(D::Minus1)?)
}

/// `min(SNR, γ)/SNR` (ε) or `min(SNR, γ)/(SNR+1)` (v).
pub fn min_snr_weight(snr: f64, gamma: f64, v_pred: bool) -> f64 {
    let m = snr.min(gamma);
    if v_pred {
        m / (snr + 1.0)
    } else {
        m / snr
    }
}

/// `S/(S+1)` with S = min(SNR, 1000): scales v-prediction loss like ε-prediction.
pub fn scale_v_pred_like_noise_pred(snr: f64) -> f64 {
    let s = snr.min(1000.0);
    s / (s + 1.0)
}

/// `v_pred_like_loss` λ: `L + λ·L·(S+1)/S` → the factor `1 + λ·(S+1)/S`.
pub fn v_pred_like_factor(snr: f64, lambda: f64) -> f64 {
    let s = snr.min(1000.0);
    1.0 + lambda * (s + 1.0) / s
}

/// Debiased estimation: `1/√S` (S = min(SNR, 1000)).
pub fn debiased_weight(snr: f64) -> f64 {
    1.0 / snr.min(1000.0).sqrt()
}

#[cfg(test)]
mod tests {

    #[test]
    fn masks_weight_the_loss_by_their_8x8_block_means() {
        let dev = candle_core::Device::Cpu;
        let l = Tensor::ones((1, 2, 2, 1), candle_core::DType::F32, &dev).unwrap();
        // a 16×8 mask: the top 8×8 block half covered, the bottom one fully
        let mut m = vec![0f32; 16 * 8];
        for (k, v) in m.iter_mut().enumerate() {
            let (y, x) = (k / 8, k % 8);
            *v = if y >= 8 || x < 4 { 1.0 } else { 0.0 };
        }
        let m = Tensor::from_vec(m, (1, 1, 16, 8), &dev).unwrap();
        let got = apply_mask(&l, &m).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, vec![0.5, 1.0, 0.5, 1.0]);
        assert!(apply_mask(&l, &Tensor::ones((1, 1, 15, 8), candle_core::DType::F32, &dev).unwrap()).is_err());
    }
    use super::*;
    use candle_core::Device;

    #[test]
    fn element_losses_match_their_formulas() {
        let p = Tensor::new(&[[[[1.0f32, 3.0]]]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[[[[0.0f32, 0.0]]]], &Device::Cpu).unwrap();
        let c = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
        let v = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(element_loss(LossType::L2, &p, &y, None).unwrap()), vec![1.0, 9.0]);
        let h = v(element_loss(LossType::Huber, &p, &y, Some(&c)).unwrap());
        for (got, d) in h.iter().zip([1.0f64, 3.0]) {
            let want = 2.0 * 0.5 * ((d * d + 0.25).sqrt() - 0.5);
            assert!((*got as f64 - want).abs() < 1e-6);
        }
        let s = v(element_loss(LossType::SmoothL1, &p, &y, Some(&c)).unwrap());
        assert!((s[1] as f64 - 2.0 * ((9.0f64 + 0.25).sqrt() - 0.5)).abs() < 1e-6);
        assert_eq!(v(mean_per_sample(&element_loss(LossType::L2, &p, &y, None).unwrap()).unwrap()), vec![5.0]);
    }

    #[test]
    fn huber_schedules() {
        assert_eq!(huber_c(HuberSchedule::Constant, 0.1, 500, 0.5, 1000), 0.1);
        let e = huber_c(HuberSchedule::Exponential, 0.1, 500, 0.5, 1000);
        assert!((e - (0.1f64.ln() * 0.5).exp()).abs() < 1e-12, "exp(−α t), α = −ln c0 / T");
        assert!((huber_c(HuberSchedule::Exponential, 0.1, 1000, 0.5, 1000) - 0.1).abs() < 1e-12);
        let s = huber_c(HuberSchedule::Snr, 0.1, 0, 0.8, 1000);
        let sigma = (0.2f64 / 0.8).sqrt();
        assert!((s - (0.9 / (1.0 + sigma).powi(2) + 0.1)).abs() < 1e-12);
    }

    #[test]
    fn snr_weights() {
        assert_eq!(min_snr_weight(10.0, 5.0, false), 0.5);
        assert_eq!(min_snr_weight(2.0, 5.0, false), 1.0);
        assert!((min_snr_weight(10.0, 5.0, true) - 5.0 / 11.0).abs() < 1e-12);
        assert!((scale_v_pred_like_noise_pred(3.0) - 0.75).abs() < 1e-12);
        assert!((scale_v_pred_like_noise_pred(1e6) - 1000.0 / 1001.0).abs() < 1e-12);
        assert!((v_pred_like_factor(3.0, 0.5) - (1.0 + 0.5 * 4.0 / 3.0)).abs() < 1e-12);
        assert!((debiased_weight(4.0) - 0.5).abs() < 1e-12);
    }
}
