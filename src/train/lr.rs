//! LR schedulers as diffusers' `get_scheduler` (LambdaLR multipliers on the base LR; k = optimizer step from 0).

use anyhow::{bail, Result};

/// A learning-rate schedule.
#[derive(Clone, Debug, PartialEq)]
pub enum LrSchedule {
    Constant,
    ConstantWithWarmup {
        warmup: usize,
    },
    Linear {
        warmup: usize,
        total: usize,
    },
    Cosine {
        warmup: usize,
        total: usize,
    },
    CosineWithRestarts {
        warmup: usize,
        total: usize,
        cycles: usize,
    },
    Polynomial {
        warmup: usize,
        total: usize,
        power: f64,
        lr_init: f64,
        lr_end: f64,
    },
    /// `(multiplier, until step)` rules, then the final multiplier.
    PiecewiseConstant {
        rules: Vec<(f64, usize)>,
        last: f64,
    },
    /// transformers' `AdafactorSchedule`: Adafactor's relative step sets the rate; the multiplier stays 1.
    Adafactor,
}

/// sd-scripts' scheduler names.
pub const NAMES: &[&str] = &[
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "piecewise_constant",
    "adafactor",
];

impl LrSchedule {
    /// From `lr_scheduler` and its options (`lr_warmup_steps`, `max_train_steps`, `lr_scheduler_num_cycles`,
    /// `lr_scheduler_power`, the base LR for polynomial, `step_rules` for piecewise_constant).
    pub fn parse(
        name: &str,
        warmup: usize,
        total: usize,
        cycles: usize,
        power: f64,
        lr: f64,
        step_rules: Option<&str>,
    ) -> Result<Self> {
        Ok(match name {
            "constant" => {
                if warmup > 0 {
                    bail!(
                        "lr_scheduler constant takes no warmup (lr_warmup_steps = {warmup}); use constant_with_warmup"
                    );
                }
                LrSchedule::Constant
            }
            "constant_with_warmup" => LrSchedule::ConstantWithWarmup { warmup },
            "linear" => LrSchedule::Linear { warmup, total },
            "cosine" => LrSchedule::Cosine { warmup, total },
            "cosine_with_restarts" => LrSchedule::CosineWithRestarts { warmup, total, cycles: cycles.max(1) },
            "polynomial" => LrSchedule::Polynomial { warmup, total, power, lr_init: lr, lr_end: 1e-7 },
            "piecewise_constant" => {
                let rules = step_rules.unwrap_or("");
                let parts: Vec<&str> = rules.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
                let Some((last, body)) = parts.split_last() else {
                    bail!("piecewise_constant needs step_rules like \"1:10,0.1:20,0.01\"")
                };
                let rules = body
                    .iter()
                    .map(|r| {
                        let (m, s) = r
                            .split_once(':')
                            .ok_or_else(|| anyhow::anyhow!("step rule {r:?} must be multiplier:step"))?;
                        Ok((m.parse()?, s.parse()?))
                    })
                    .collect::<Result<Vec<(f64, usize)>>>()?;
                LrSchedule::PiecewiseConstant { rules, last: last.parse()? }
            }
            "adafactor" => {
                if warmup > 0 {
                    bail!("lr_scheduler adafactor takes no lr_warmup_steps (got {warmup})");
                }
                LrSchedule::Adafactor
            }
            other => bail!("unknown lr_scheduler {other:?}; available: {}", NAMES.join(", ")),
        })
    }

    /// The schedule that runs with `optimizer`: Adafactor's relative step (its default) replaces any other
    /// schedule, as sd-scripts does; the adafactor schedule needs that optimizer.
    pub fn for_optimizer(self, optimizer: &crate::train::optim::Kind, warmup: usize) -> Result<Self> {
        let relative = matches!(optimizer, crate::train::optim::Kind::Adafactor(a) if a.relative_step);
        match (relative, self == LrSchedule::Adafactor) {
            (false, false) | (true, true) => Ok(self),
            (false, true) => {
                bail!("lr_scheduler adafactor needs optimizer_type AdaFactor with relative_step=True (its default)")
            }
            (true, false) if warmup > 0 => bail!(
                "AdaFactor's relative step (its default) sets the learning rate itself and takes no \
                 lr_warmup_steps; pass optimizer_args relative_step=False to use lr_scheduler with warmup"
            ),
            (true, false) => {
                eprintln!("AdaFactor's relative step sets the learning rate: lr_scheduler adafactor is used");
                Ok(LrSchedule::Adafactor)
            }
        }
    }

    /// The multiplier at optimizer step `k`.
    pub fn factor(&self, k: usize) -> f64 {
        let warm = |w: usize| -> Option<f64> { (k < w).then(|| k as f64 / w.max(1) as f64) };
        match *self {
            LrSchedule::Constant | LrSchedule::Adafactor => 1.0,
            LrSchedule::ConstantWithWarmup { warmup } => warm(warmup).unwrap_or(1.0),
            LrSchedule::Linear { warmup, total } => warm(warmup).unwrap_or_else(|| {
                (total.saturating_sub(k) as f64 / total.saturating_sub(warmup).max(1) as f64).max(0.0)
            }),
            LrSchedule::Cosine { warmup, total } => warm(warmup).unwrap_or_else(|| {
                let p = (k - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * 2.0 * 0.5 * p).cos())).max(0.0)
            }),
            LrSchedule::CosineWithRestarts { warmup, total, cycles } => warm(warmup).unwrap_or_else(|| {
                let p = (k - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
                if p >= 1.0 {
                    0.0
                } else {
                    (0.5 * (1.0 + (std::f64::consts::PI * ((cycles as f64 * p) % 1.0)).cos())).max(0.0)
                }
            }),
            LrSchedule::Polynomial { warmup, total, power, lr_init, lr_end } => warm(warmup).unwrap_or_else(|| {
                if k > total {
                    lr_end / lr_init
                } else {
                    let remaining = 1.0 - (k - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
                    ((lr_init - lr_end) * remaining.powf(power) + lr_end) / lr_init
                }
            }),
            LrSchedule::PiecewiseConstant { ref rules, last } => {
                rules.iter().find(|(_, until)| k < *until).map(|(m, _)| *m).unwrap_or(last)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of diffusers' `get_scheduler` (LambdaLR) for warmup 2, 10 training steps, by its formulas.
    #[test]
    fn schedules_match_diffusers_formulas() {
        let f = |s: &LrSchedule| (0..12).map(|k| s.factor(k)).collect::<Vec<f64>>();
        let close = |a: Vec<f64>, b: Vec<f64>| {
            for (k, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!((x - y).abs() < 1e-12, "step {k}: {x} vs {y}");
            }
        };
        close(
            f(&LrSchedule::ConstantWithWarmup { warmup: 2 }),
            vec![0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        );
        close(
            f(&LrSchedule::Linear { warmup: 2, total: 10 }),
            vec![0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0],
        );
        let cos: Vec<f64> = (0..12)
            .map(|k: usize| {
                if k < 2 {
                    k as f64 / 2.0
                } else {
                    (0.5 * (1.0 + (std::f64::consts::PI * (k - 2) as f64 / 8.0).cos())).max(0.0)
                }
            })
            .collect();
        close(f(&LrSchedule::Cosine { warmup: 2, total: 10 }), cos);
        let r = LrSchedule::CosineWithRestarts { warmup: 0, total: 10, cycles: 2 };
        assert!((r.factor(0) - 1.0).abs() < 1e-12 && (r.factor(5) - 1.0).abs() < 1e-12, "restarts at half way");
        assert!((r.factor(2) - 0.5 * (1.0 + (std::f64::consts::PI * 0.4).cos())).abs() < 1e-12);
        assert_eq!(r.factor(10), 0.0);
        let p = LrSchedule::Polynomial { warmup: 0, total: 10, power: 2.0, lr_init: 1e-3, lr_end: 1e-7 };
        assert!((p.factor(5) - ((1e-3 - 1e-7) * 0.25 + 1e-7) / 1e-3).abs() < 1e-12);
        assert!((p.factor(11) - 1e-4).abs() < 1e-12);
        let pc = LrSchedule::parse("piecewise_constant", 0, 10, 1, 1.0, 1e-3, Some("1:3,0.1:6,0.01")).unwrap();
        assert_eq!((pc.factor(0), pc.factor(3), pc.factor(5), pc.factor(6)), (1.0, 0.1, 0.1, 0.01));
        assert!(LrSchedule::parse("constant", 5, 10, 1, 1.0, 1e-3, None)
            .unwrap_err()
            .to_string()
            .contains("constant_with_warmup"));
        assert!(LrSchedule::parse("cosine_annealing", 0, 10, 1, 1.0, 1e-3, None)
            .unwrap_err()
            .to_string()
            .contains("cosine_with_restarts"));
    }
}
