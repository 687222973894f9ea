//! Optimizers (sd-scripts' `optimizer_type` names) over parameter groups, with f32 state: AdamW, Lion,
//! SGDNesterov. `optimizer_args` are `k=v` strings as in sd-scripts.

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::collections::BTreeMap;

/// Parameters that share a learning rate.
pub struct ParamGroup {
    pub name: String,
    pub params: Vec<Var>,
    pub lr: f64,
}

/// Parsed `optimizer_args`.
pub type OptimizerArgs = BTreeMap<String, String>;

/// Parses `["weight_decay=0.1", "betas=0.9,0.99"]`.
pub fn parse_args(args: &[String]) -> Result<OptimizerArgs> {
    args.iter()
        .map(|a| {
            let (k, v) = a.split_once('=').with_context(|| format!("optimizer_args: {a:?} is not `key=value`"))?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

fn float(args: &OptimizerArgs, key: &str, default: f64) -> Result<f64> {
    match args.get(key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| anyhow::anyhow!("optimizer_args: {key}={v} is not a number")),
    }
}

fn pair(args: &OptimizerArgs, key: &str, default: (f64, f64)) -> Result<(f64, f64)> {
    match args.get(key) {
        None => Ok(default),
        Some(v) => {
            let parts: Vec<f64> = v
                .trim_matches(|c| c == '(' || c == ')')
                .split(',')
                .map(|x| x.trim().parse())
                .collect::<Result<_, _>>()
                .map_err(|_| anyhow::anyhow!("optimizer_args: {key}={v} must be two numbers like 0.9,0.999"))?;
            if parts.len() != 2 {
                bail!("optimizer_args: {key}={v} must be two numbers");
            }
            Ok((parts[0], parts[1]))
        }
    }
}

/// Which update rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    AdamW { betas: (f64, f64), eps: f64, weight_decay: f64 },
    Lion { betas: (f64, f64), weight_decay: f64 },
    SgdNesterov { momentum: f64, weight_decay: f64 },
}

/// The optimizer names sd-scripts accepts that sdtune implements, and the ones it does not yet.
pub const IMPLEMENTED: &[&str] = &["AdamW", "Lion", "SGDNesterov"];
const NOT_YET: &[&str] = &[
    "AdamW8bit",
    "PagedAdamW8bit",
    "Lion8bit",
    "Prodigy",
    "DAdaptAdam",
    "DAdaptation",
    "AdaFactor",
    "SGDNesterov8bit",
];

impl Kind {
    /// From sd-scripts' `optimizer_type` (case-insensitive) and `optimizer_args`.
    pub fn parse(name: &str, args: &OptimizerArgs) -> Result<Self> {
        let allowed: &[&str] = match name.to_ascii_lowercase().as_str() {
            "adamw" => &["weight_decay", "betas", "eps"],
            "lion" => &["weight_decay", "betas"],
            "sgdnesterov" => &["weight_decay", "momentum"],
            other => {
                if NOT_YET.iter().any(|n| n.eq_ignore_ascii_case(other)) {
                    bail!("optimizer {name} is not supported yet; available: {}", IMPLEMENTED.join(", "));
                }
                bail!("unknown optimizer {name:?}; available: {}", IMPLEMENTED.join(", "));
            }
        };
        if let Some(k) = args.keys().find(|k| !allowed.contains(&k.as_str())) {
            bail!("optimizer {name}: unknown optimizer_args key `{k}`; accepted: {}", allowed.join(", "));
        }
        Ok(match name.to_ascii_lowercase().as_str() {
            "adamw" => Kind::AdamW {
                betas: pair(args, "betas", (0.9, 0.999))?,
                eps: float(args, "eps", 1e-8)?,
                weight_decay: float(args, "weight_decay", 0.01)?,
            },
            "lion" => {
                Kind::Lion { betas: pair(args, "betas", (0.9, 0.99))?, weight_decay: float(args, "weight_decay", 0.0)? }
            }
            _ => Kind::SgdNesterov {
                momentum: float(args, "momentum", 0.9)?,
                weight_decay: float(args, "weight_decay", 0.0)?,
            },
        })
    }

    /// sd-scripts' `ss_optimizer` string.
    pub fn describe(&self) -> String {
        match self {
            Kind::AdamW { betas, eps, weight_decay } => format!(
                "torch.optim.adamw.AdamW(weight_decay={weight_decay},betas=({}, {}),eps={eps})",
                betas.0, betas.1
            ),
            Kind::Lion { betas, weight_decay } => {
                format!("lion_pytorch.lion_pytorch.Lion(weight_decay={weight_decay},betas=({}, {}))", betas.0, betas.1)
            }
            Kind::SgdNesterov { momentum, weight_decay } => {
                format!("torch.optim.sgd.SGD(nesterov=True,momentum={momentum},weight_decay={weight_decay})")
            }
        }
    }
}

/// An optimizer with its per-parameter state (first/second moments or momentum), in f32.
pub struct Optimizer {
    pub kind: Kind,
    pub groups: Vec<ParamGroup>,
    pub step_count: usize,
    /// Per group, per parameter: state tensors (m, v) / (m) / (buf).
    pub state: Vec<Vec<Vec<Tensor>>>,
}

impl Optimizer {
    pub fn new(kind: Kind, groups: Vec<ParamGroup>) -> Result<Self> {
        let state = groups
            .iter()
            .map(|g| {
                g.params
                    .iter()
                    .map(|p| {
                        let z = p.as_tensor().zeros_like()?;
                        Ok(match kind {
                            Kind::AdamW { .. } => vec![z.clone(), z],
                            _ => vec![z],
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { kind, groups, step_count: 0, state })
    }

    /// One update with each group's lr × `lr_multiplier` (from the LR scheduler). Parameters without a gradient
    /// are an error: a silently frozen parameter is a bug.
    pub fn step(&mut self, grads: &GradStore, lr_multiplier: f64) -> Result<()> {
        self.step_count += 1;
        let t = self.step_count as i32;
        for (gi, group) in self.groups.iter().enumerate() {
            let lr = group.lr * lr_multiplier;
            for (pi, p) in group.params.iter().enumerate() {
                let g = grads
                    .get(p.as_tensor())
                    .with_context(|| format!("parameter {pi} of group {} received no gradient", group.name))?;
                let w = p.as_tensor();
                let st = &mut self.state[gi][pi];
                let new = match self.kind {
                    Kind::AdamW { betas: (b1, b2), eps, weight_decay } => {
                        let m = ((&st[0] * b1)? + (g * (1.0 - b1))?)?;
                        let v = ((&st[1] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                        let bc1 = 1.0 - b1.powi(t);
                        let bc2 = 1.0 - b2.powi(t);
                        let denom = ((v.sqrt()? / bc2.sqrt())? + eps)?;
                        let decayed = (w * (1.0 - lr * weight_decay))?;
                        let out = (decayed - (m.div(&denom)? * (lr / bc1))?)?;
                        *st = vec![m, v];
                        out
                    }
                    Kind::Lion { betas: (b1, b2), weight_decay } => {
                        let update = ((&st[0] * b1)? + (g * (1.0 - b1))?)?.sign()?;
                        let out = ((w * (1.0 - lr * weight_decay))? - (update * lr)?)?;
                        st[0] = ((&st[0] * b2)? + (g * (1.0 - b2))?)?;
                        out
                    }
                    Kind::SgdNesterov { momentum, weight_decay } => {
                        let g = if weight_decay != 0.0 { (g + (w * weight_decay)?)? } else { g.clone() };
                        let buf = if t == 1 { g.clone() } else { ((&st[0] * momentum)? + &g)? };
                        let d = (&g + (&buf * momentum)?)?;
                        st[0] = buf;
                        (w - (d * lr)?)?
                    }
                };
                p.set(&new)?;
            }
        }
        Ok(())
    }

    /// Clips the global gradient norm to `max_norm` (returns the norm before clipping), as `clip_grad_norm_`.
    pub fn clip_grad_norm(&self, grads: &mut GradStore, max_norm: f64) -> Result<f64> {
        let mut total = 0f64;
        for g in self.groups.iter().flat_map(|g| &g.params).filter_map(|p| grads.get(p.as_tensor())) {
            total += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        }
        let norm = total.sqrt();
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for p in self.groups.iter().flat_map(|g| &g.params) {
                if let Some(g) = grads.get(p.as_tensor()) {
                    let scaled = (g * coef)?;
                    grads.insert(p.as_tensor(), scaled);
                }
            }
        }
        Ok(norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
        let k = Kind::AdamW { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01 };
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
    fn lion_and_sgd_nesterov_by_hand() {
        let w = run(Kind::Lion { betas: (0.9, 0.99), weight_decay: 0.0 }, 0.1, 2);
        // sign updates of size lr: 1 → 0.9 → 0.8; −2 → −1.9 → −1.8
        assert!((w[0] - 0.8).abs() < 1e-6 && (w[1] + 1.8).abs() < 1e-6, "{w:?}");
        // SGD nesterov, μ = 0.9: step 1: buf = g = 2, d = g + μ·buf = 3.8, w = 1 − 0.1·3.8 = 0.62
        let w = run(Kind::SgdNesterov { momentum: 0.9, weight_decay: 0.0 }, 0.1, 1);
        assert!((w[0] - 0.62).abs() < 1e-6, "{w:?}");
        // step 2: g = 1.24, buf = 0.9·2 + 1.24 = 3.04, d = 1.24 + 0.9·3.04 = 3.976, w = 0.62 − 0.3976 = 0.2224
        let w = run(Kind::SgdNesterov { momentum: 0.9, weight_decay: 0.0 }, 0.1, 2);
        assert!((w[0] - 0.2224).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn args_and_names() {
        let a = parse_args(&["weight_decay=0.1".into(), "betas=0.9,0.99".into()]).unwrap();
        assert_eq!(Kind::parse("adamw", &a).unwrap(), Kind::AdamW { betas: (0.9, 0.99), eps: 1e-8, weight_decay: 0.1 });
        assert!(Kind::parse("Prodigy", &a).unwrap_err().to_string().contains("not supported yet"));
        assert!(Kind::parse("AdamW", &parse_args(&["decay=1".into()]).unwrap())
            .unwrap_err()
            .to_string()
            .contains("`decay`"));
    }
}
