//! Optimizers under sd-scripts' `optimizer_type` names, over parameter groups: AdamW, AdamW8bit, Lion,
//! SGDNesterov, AdaFactor, Prodigy, DAdaptAdam. `optimizer_args` are sd-scripts' `k=v` strings.

mod adafactor;
mod adam8bit;
mod basic;
mod dadapt;

pub use adafactor::Adafactor;
pub use adam8bit::dynamic_map;
pub use basic::{Adam, Lion, SgdNesterov};
pub use dadapt::{DAdaptAdam, Prodigy};

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// Parameters that share a learning rate.
pub struct ParamGroup {
    pub name: String,
    pub params: Vec<Var>,
    pub lr: f64,
}

/// Parsed `optimizer_args`, in the order given.
pub type OptimizerArgs = Vec<(String, String)>;

/// Parses `["weight_decay=0.1", "betas=0.9,0.99"]`.
pub fn parse_args(args: &[String]) -> Result<OptimizerArgs> {
    args.iter()
        .map(|a| {
            let (k, v) = a.split_once('=').with_context(|| format!("optimizer_args: {a:?} is not `key=value`"))?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// Typed reads of `optimizer_args` values (Python literals as sd-scripts' `ast.literal_eval` reads them).
pub struct Args<'a>(pub(crate) &'a OptimizerArgs);

impl Args<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn number(key: &str, v: &str) -> Result<f64> {
        v.trim().parse().map_err(|_| anyhow::anyhow!("optimizer_args: {key}={v} is not a number"))
    }

    pub fn f64(&self, key: &str, default: f64) -> Result<f64> {
        self.get(key).map_or(Ok(default), |v| Self::number(key, v))
    }

    /// A number or `None`.
    pub fn opt_f64(&self, key: &str, default: Option<f64>) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(default),
            Some("None") => Ok(None),
            Some(v) => Self::number(key, v).map(Some),
        }
    }

    pub fn pair(&self, key: &str, default: (f64, f64)) -> Result<(f64, f64)> {
        let Some(v) = self.get(key) else { return Ok(default) };
        let parts: Vec<f64> = v
            .trim_matches(|c| c == '(' || c == ')' || c == '[' || c == ']')
            .split(',')
            .map(|x| Self::number(key, x))
            .collect::<Result<_>>()?;
        match parts[..] {
            [a, b] => Ok((a, b)),
            _ => bail!("optimizer_args: {key}={v} must be two numbers like 0.9,0.999"),
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some("True" | "true") => Ok(true),
            Some("False" | "false") => Ok(false),
            Some(v) => bail!("optimizer_args: {key}={v} must be True or False"),
        }
    }

    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

/// Which update rule, with its settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    AdamW(Adam),
    /// AdamW with bitsandbytes' block-wise 8-bit moments.
    AdamW8bit(Adam),
    Lion(Lion),
    SgdNesterov(SgdNesterov),
    Adafactor(Adafactor),
    Prodigy(Prodigy),
    DAdaptAdam(DAdaptAdam),
}

/// One `optimizer_type`: its name, the class sd-scripts instantiates (for `ss_optimizer`), the `optimizer_args`
/// keys it takes, the defaults sd-scripts adds to them, and how to build it.
struct Spec {
    name: &'static str,
    class: &'static str,
    args: &'static [&'static str],
    added: &'static [(&'static str, &'static str)],
    build: fn(&Args) -> Result<Kind>,
}

const ADAM_ARGS: &[&str] = &["weight_decay", "betas", "eps"];

const OPTIMIZERS: &[Spec] = &[
    Spec {
        name: "AdamW",
        class: "torch.optim.adamw.AdamW",
        args: ADAM_ARGS,
        added: &[],
        build: |a| Ok(Kind::AdamW(Adam::from_args(a)?)),
    },
    Spec {
        name: "AdamW8bit",
        class: "bitsandbytes.optim.adamw.AdamW8bit",
        args: ADAM_ARGS,
        added: &[],
        build: |a| Ok(Kind::AdamW8bit(Adam::from_args(a)?)),
    },
    // bitsandbytes' paged variant has the same update; paging only concerns CUDA memory
    Spec {
        name: "PagedAdamW8bit",
        class: "bitsandbytes.optim.adamw.PagedAdamW8bit",
        args: ADAM_ARGS,
        added: &[],
        build: |a| Ok(Kind::AdamW8bit(Adam::from_args(a)?)),
    },
    Spec {
        name: "Lion",
        class: "lion_pytorch.lion_pytorch.Lion",
        args: &["weight_decay", "betas"],
        added: &[],
        build: |a| Ok(Kind::Lion(Lion::from_args(a)?)),
    },
    Spec {
        name: "SGDNesterov",
        class: "torch.optim.sgd.SGD",
        args: &["weight_decay", "momentum"],
        added: &[("momentum", "0.9")],
        build: |a| Ok(Kind::SgdNesterov(SgdNesterov::from_args(a)?)),
    },
    Spec {
        name: "AdaFactor",
        class: "transformers.optimization.Adafactor",
        args: &[
            "relative_step",
            "scale_parameter",
            "warmup_init",
            "beta1",
            "weight_decay",
            "eps",
            "clip_threshold",
            "decay_rate",
        ],
        added: &[("relative_step", "True")],
        build: |a| Ok(Kind::Adafactor(Adafactor::from_args(a)?)),
    },
    Spec {
        name: "Prodigy",
        class: "prodigyopt.prodigy.Prodigy",
        args: &[
            "betas",
            "beta3",
            "eps",
            "weight_decay",
            "decouple",
            "use_bias_correction",
            "safeguard_warmup",
            "d0",
            "d_coef",
            "growth_rate",
        ],
        added: &[],
        build: |a| Ok(Kind::Prodigy(Prodigy::from_args(a)?)),
    },
    Spec {
        name: "DAdaptAdam",
        class: "dadaptation.dadapt_adam.DAdaptAdam",
        args: &["betas", "eps", "weight_decay", "decouple", "use_bias_correction", "d0", "growth_rate"],
        added: &[],
        build: |a| Ok(Kind::DAdaptAdam(DAdaptAdam::from_args(a)?)),
    },
];

/// sd-scripts optimizer names that sdtune does not implement yet.
const NOT_YET: &[&str] = &[
    "PagedAdamW",
    "PagedAdamW32bit",
    "Lion8bit",
    "PagedLion8bit",
    "SGDNesterov8bit",
    "DAdaptation",
    "DAdaptAdamPreprint",
    "DAdaptAdaGrad",
    "DAdaptAdan",
    "DAdaptAdanIP",
    "DAdaptLion",
    "DAdaptSGD",
];

/// The optimizer names sdtune implements.
pub fn names() -> Vec<&'static str> {
    OPTIMIZERS.iter().map(|s| s.name).collect()
}

fn spec(name: &str) -> Result<&'static Spec> {
    let name = if name.is_empty() { "AdamW" } else { name };
    if let Some(s) = OPTIMIZERS.iter().find(|s| s.name.eq_ignore_ascii_case(name)) {
        return Ok(s);
    }
    if NOT_YET.iter().any(|n| n.eq_ignore_ascii_case(name)) {
        bail!("optimizer {name} is not supported yet; available: {}", names().join(", "));
    }
    bail!("unknown optimizer {name:?}; available: {}", names().join(", "))
}

impl Kind {
    /// From sd-scripts' `optimizer_type` (case-insensitive; empty means AdamW) and `optimizer_args`.
    pub fn parse(name: &str, args: &OptimizerArgs) -> Result<Self> {
        let s = spec(name)?;
        if let Some((k, _)) = args.iter().find(|(k, _)| !s.args.contains(&k.as_str())) {
            bail!("optimizer {}: unknown optimizer_args key `{k}`; accepted: {}", s.name, s.args.join(", "));
        }
        (s.build)(&Args(args)).with_context(|| format!("optimizer {}", s.name))
    }
}

/// sd-scripts' `ss_optimizer`: the class and the keyword arguments it was given (`module.Class(k=v,…)`).
pub fn describe(name: &str, args: &OptimizerArgs) -> Result<String> {
    let s = spec(name)?;
    let mut kw: Vec<String> = args.iter().map(|(k, v)| format!("{k}={}", py_literal(v))).collect();
    for (k, v) in s.added {
        if !Args(args).has(k) {
            kw.push(format!("{k}={v}"));
        }
    }
    Ok(if kw.is_empty() { s.class.to_string() } else { format!("{}({})", s.class, kw.join(",")) })
}

/// How Python prints `ast.literal_eval(v)`: numbers, booleans, tuples; anything else as a quoted string.
fn py_literal(v: &str) -> String {
    let v = v.trim();
    if v.contains(',') {
        let parts: Vec<String> = v.trim_matches(|c| c == '(' || c == ')').split(',').map(py_literal).collect();
        return format!("({})", parts.join(", "));
    }
    if ["True", "False", "None"].contains(&v) || v.parse::<i64>().is_ok() {
        return v.to_string();
    }
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() => crate::io::py::py_float(x),
        _ => format!("'{v}'"),
    }
}

/// An optimizer with its per-parameter state.
pub struct Optimizer {
    pub kind: Kind,
    pub groups: Vec<ParamGroup>,
    /// Per group, per parameter: the state tensors of the update rule.
    pub state: Vec<Vec<Vec<Tensor>>>,
    /// Per group, per parameter: the updates it received (a parameter without a gradient in a step is skipped,
    /// as PyTorch's optimizers do, so its bias corrections count its own steps).
    pub param_steps: Vec<Vec<usize>>,
    /// Optimizer-wide numbers (the d estimates of Prodigy and D-Adaptation), saved with the training state.
    pub scalars: Vec<f64>,
}

impl Optimizer {
    pub fn new(kind: Kind, groups: Vec<ParamGroup>) -> Result<Self> {
        let state = groups
            .iter()
            .map(|g| {
                g.params
                    .iter()
                    .map(|p| {
                        let p = p.as_tensor();
                        match &kind {
                            Kind::AdamW(_) => basic::adam_state(p),
                            Kind::AdamW8bit(_) => adam8bit::init_state(p),
                            Kind::Lion(_) | Kind::SgdNesterov(_) => basic::momentum_state(p),
                            Kind::Adafactor(a) => a.init_state(p),
                            Kind::Prodigy(_) => dadapt::prodigy_state(p),
                            Kind::DAdaptAdam(_) => dadapt::dadapt_state(p),
                        }
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let scalars = match &kind {
            Kind::Prodigy(p) => p.init_scalars(),
            Kind::DAdaptAdam(d) => d.init_scalars(),
            _ => Vec::new(),
        };
        if matches!(kind, Kind::Prodigy(_) | Kind::DAdaptAdam(_)) {
            dadapt::one_lr(&groups, 1.0)?;
        }
        let param_steps = groups.iter().map(|g| vec![0; g.params.len()]).collect();
        Ok(Self { kind, groups, state, scalars, param_steps })
    }

    /// One update with each group's lr × `lr_multiplier` (from the LR scheduler). Parameters without a gradient
    /// this step (a layer the loss does not reach, a module dropped by module_dropout) are left as they are, as
    /// PyTorch's optimizers do.
    pub fn step(&mut self, grads: &GradStore, lr_multiplier: f64) -> Result<()> {
        self.step_scaled(grads, lr_multiplier, 1.0)
    }

    /// `step` with every gradient multiplied by `grad_scale` (the clipping factor of `clip_coef`).
    pub fn step_scaled(&mut self, grads: &GradStore, lr_multiplier: f64, grad_scale: f64) -> Result<()> {
        let grads: Vec<Vec<Option<Tensor>>> = self
            .groups
            .iter()
            .map(|group| group.params.iter().map(|p| grads.get(p.as_tensor()).cloned()).collect())
            .collect();
        if grads.iter().flatten().all(Option::is_none) {
            bail!("no parameter received a gradient: nothing the loss depends on is being trained");
        }
        let Self { kind, groups, state, scalars, param_steps, .. } = self;
        // the fused AdamW takes the factor inside its kernel; the other rules get scaled gradients
        let fused_adamw = matches!(kind, Kind::AdamW(_));
        let grads = if grad_scale == 1.0 || fused_adamw {
            grads
        } else {
            grads
                .into_iter()
                .map(|g| g.into_iter().map(|g| g.map(|g| g * grad_scale).transpose()).collect())
                .collect::<candle_core::Result<_>>()?
        };
        match kind {
            Kind::Prodigy(c) => return c.step(groups, state, scalars, &grads, lr_multiplier),
            Kind::DAdaptAdam(c) => return c.step(groups, state, scalars, &grads, lr_multiplier),
            _ => {}
        }
        for (gi, group) in groups.iter().enumerate() {
            let lr = group.lr * lr_multiplier;
            for (pi, p) in group.params.iter().enumerate() {
                let Some(g) = &grads[gi][pi] else { continue };
                param_steps[gi][pi] += 1;
                let t = param_steps[gi][pi];
                let (w, st) = (p.as_tensor(), &mut state[gi][pi]);
                let new = match kind {
                    Kind::AdamW(c) if crate::nn::fused::applies(&[w, g, &st[0], &st[1]])? => {
                        c.step_in_place(w, g, st, lr, t, grad_scale)?;
                        continue;
                    }
                    Kind::AdamW(c) if grad_scale != 1.0 => c.step(w, &(g * grad_scale)?, st, lr, t)?,
                    Kind::AdamW(c) => c.step(w, g, st, lr, t)?,
                    Kind::AdamW8bit(c) => match adam8bit::step(c, w, g, st, lr, t)? {
                        Some(new) => new,
                        None => continue,
                    },
                    Kind::Lion(c) => c.step(w, g, st, lr)?,
                    Kind::SgdNesterov(c) => c.step(w, g, st, lr, t)?,
                    Kind::Adafactor(c) => c.step(w, g, st, lr, t)?,
                    Kind::Prodigy(_) | Kind::DAdaptAdam(_) => unreachable!("handled above"),
                };
                p.set(&new)?;
            }
        }
        Ok(())
    }

    /// Parameter `pi` of group `gi`'s state as saved (AdamW8bit's packed state as its parts).
    pub fn saved_state(&self, gi: usize, pi: usize) -> Result<Vec<Tensor>> {
        let st = &self.state[gi][pi];
        match self.kind {
            Kind::AdamW8bit(_) => adam8bit::saved(self.groups[gi].params[pi].as_tensor(), st),
            _ => Ok(st.clone()),
        }
    }

    /// Sets parameter `pi` of group `gi`'s state from what `saved_state` gave.
    pub fn restore_state(&mut self, gi: usize, pi: usize, saved: Vec<Tensor>) -> Result<()> {
        self.state[gi][pi] = match self.kind {
            Kind::AdamW8bit(_) => adam8bit::restore(self.groups[gi].params[pi].as_tensor(), saved)?,
            _ => saved,
        };
        Ok(())
    }

    /// The learning rate each group uses at `lr_multiplier`: Adafactor's relative step reports the rate of the
    /// group's first parameter (as transformers' `AdafactorSchedule`).
    pub fn group_lrs(&self, lr_multiplier: f64) -> Result<Vec<(String, f64)>> {
        self.groups
            .iter()
            .enumerate()
            .map(|(gi, g)| {
                let base = g.lr * lr_multiplier;
                let lr = match &self.kind {
                    Kind::Adafactor(a) if a.relative_step => match g.params.first() {
                        Some(p) => a.lr(base, self.param_steps[gi][0].max(1), adafactor::rms(p.as_tensor())?),
                        None => 0.0,
                    },
                    _ => base,
                };
                Ok((g.name.clone(), lr))
            })
            .collect()
    }

    /// Prodigy's and D-Adaptation's current step-size estimate d (the effective LR is d·lr).
    pub fn d(&self) -> Option<f64> {
        matches!(self.kind, Kind::Prodigy(_) | Kind::DAdaptAdam(_)).then(|| self.scalars[0])
    }

    /// The factor that clips the global gradient norm to `max_norm` as `clip_grad_norm_` (1 when the norm is
    /// below it), for `step_scaled`; the gradients of `also` count in the norm too. The squares are summed on the
    /// device: one synchronisation.
    pub fn clip_coef(&self, grads: &GradStore, max_norm: f64, also: &[Var]) -> Result<f64> {
        let gs: Vec<&Tensor> =
            self.groups.iter().flat_map(|g| &g.params).chain(also).filter_map(|p| grads.get(p.as_tensor())).collect();
        let Some(first) = gs.first() else { return Ok(1.0) };
        let mut acc = Tensor::zeros(1, candle_core::DType::F32, first.device())?;
        for g in gs {
            if crate::nn::fused::applies(&[g])? {
                crate::nn::fused::add_sum_squares(&acc, g)?;
            } else {
                acc = (acc + g.to_dtype(candle_core::DType::F32)?.sqr()?.sum_all()?.reshape(1)?)?;
            }
        }
        let norm = (acc.to_vec1::<f32>()?[0] as f64).sqrt();
        Ok((max_norm / (norm + 1e-6)).min(1.0))
    }
}

/// A sum over parameters kept on their device in f64, so that a step reads its sums once instead of once per
/// tensor (on a GPU each read waits for all queued work).
#[derive(Default)]
pub(crate) struct DeviceSum(Option<Tensor>);

impl DeviceSum {
    /// Adds `factor·x` for a 0-d `x`.
    pub(crate) fn add(&mut self, x: Tensor, factor: f64) -> Result<()> {
        let x = x.to_dtype(DType::F64)?;
        let x = if factor == 1.0 { x } else { (x * factor)? };
        self.0 = Some(match self.0.take() {
            Some(acc) => (acc + x)?,
            None => x,
        });
        Ok(())
    }

    /// The sum (one read; 0 when nothing was added).
    pub(crate) fn value(self) -> Result<f64> {
        self.0.map_or(Ok(0.0), |t| scalar(&t))
    }
}

/// The values of two sums, read in one transfer (0 for a sum that got nothing).
pub(crate) fn read_both(a: DeviceSum, b: DeviceSum) -> Result<(f64, f64)> {
    match (a.0, b.0) {
        (Some(a), Some(b)) => {
            let v = Tensor::stack(&[a, b], 0)?.to_vec1::<f64>()?;
            Ok((v[0], v[1]))
        }
        (a, b) => Ok((DeviceSum(a).value()?, DeviceSum(b).value()?)),
    }
}

/// A scalar of a 0-d or 1-element tensor as f64.
fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_names_and_descriptions() {
        let a = parse_args(&["weight_decay=0.1".into(), "betas=0.9,0.99".into()]).unwrap();
        assert_eq!(
            Kind::parse("adamw", &a).unwrap(),
            Kind::AdamW(Adam { betas: (0.9, 0.99), eps: 1e-8, weight_decay: 0.1 })
        );
        assert_eq!(describe("AdamW", &a).unwrap(), "torch.optim.adamw.AdamW(weight_decay=0.1,betas=(0.9, 0.99))");
        assert_eq!(describe("", &vec![]).unwrap(), "torch.optim.adamw.AdamW");
        assert_eq!(describe("sgdnesterov", &vec![]).unwrap(), "torch.optim.sgd.SGD(momentum=0.9)");
        let eps = parse_args(&["eps=1e-6".into(), "relative_step=False".into()]).unwrap();
        assert_eq!(
            describe("adafactor", &eps).unwrap(),
            "transformers.optimization.Adafactor(eps=1e-06,relative_step=False)"
        );
        assert!(Kind::parse("Lion8bit", &vec![]).unwrap_err().to_string().contains("not supported yet"));
        assert!(Kind::parse("Adam9", &vec![]).unwrap_err().to_string().contains("unknown optimizer"));
        let bad = parse_args(&["decay=1".into()]).unwrap();
        assert!(Kind::parse("AdamW", &bad).unwrap_err().to_string().contains("`decay`"));
        let bad = parse_args(&["decouple=yes".into()]).unwrap();
        assert!(format!("{:#}", Kind::parse("Prodigy", &bad).unwrap_err()).contains("True or False"));
    }
}
