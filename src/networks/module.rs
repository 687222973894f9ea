//! A network module on one Linear or Conv2d layer and the adapter that attaches it: kohya's LoRA and LyCORIS'
//! LoCon (`up · down`), LoHa (`(w1a·w1b) ⊙ (w2a·w2b)`) and LoKr (`w1 ⊗ w2`, each side whole or a low-rank
//! product), Tucker-decomposed convolutions and DoRA, with sd-scripts' and LyCORIS' dropouts while training.

use crate::nn::adapter::{Adapter, LayerInfo, LayerKind};
use crate::rng::Rng;
use anyhow::Result;
use candle_core::{Tensor, Var};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Dropout settings (training only).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dropouts {
    /// `network_dropout`: dropout on the down projection's output (LoRA only).
    pub neuron: Option<f64>,
    /// `rank_dropout`: drop whole ranks per sample (LoRA), or whole output rows of ΔW (LoHa, LoKr).
    pub rank: Option<f64>,
    /// `module_dropout`: skip the module for a forward.
    pub module: Option<f64>,
    /// LyCORIS' `rank_dropout_scale`: the kept rows of ΔW are divided by the fraction kept.
    pub rank_scale: bool,
}

/// State shared by all modules of a network.
pub struct NetworkState {
    pub id: usize,
    pub multiplier: RwLock<f64>,
    pub training: AtomicBool,
    pub dropouts: Dropouts,
    pub rng: Mutex<Rng>,
    /// LyCORIS' forward for every module: ΔW rebuilt and applied through the layer's op, its rows dropped by rank
    /// dropout, max-norm through the scalar (sd-scripts' LoRA forward `up(down(x))` otherwise).
    pub lycoris: bool,
}

/// One side of a LoKr Kronecker product: a whole matrix, or the product `a · b` of two low-rank factors.
#[derive(Clone)]
pub enum Half {
    Full(Var),
    LowRank(Var, Var),
}

impl Half {
    /// The side as one matrix (`w2`'s kernel dimensions flattened into its columns).
    fn matrix(&self) -> Result<Tensor> {
        Ok(match self {
            Half::Full(w) => {
                let w = w.as_tensor();
                w.reshape((w.dims()[0], ()))?
            }
            Half::LowRank(a, b) => a.as_tensor().matmul(b.as_tensor())?,
        })
    }

    fn vars(&self) -> Vec<&Var> {
        match self {
            Half::Full(w) => vec![w],
            Half::LowRank(a, b) => vec![a, b],
        }
    }
}

/// The trained factors of a module.
#[derive(Clone)]
pub enum Factors {
    /// kohya's LoRA and LyCORIS' LoCon: `ΔW = up · down` (3×3 convs: a conv down, a 1×1 up); with Tucker
    /// decomposition (`mid`, LyCORIS' `use_tucker`) a 1×1 down, the k×k `mid` and a 1×1 up.
    Lora { down: Var, up: Var, mid: Option<Var> },
    /// LyCORIS' LoHa: `ΔW = (w1a · w1b) ⊙ (w2a · w2b)`, kernels flattened into the columns; with Tucker
    /// decomposition (`t` = (t1, t2)) each side is `t ×₁ w_aᵀ ×₂ w_bᵀ`, `w_a` [r, out], `w_b` [r, in].
    Loha { w1a: Var, w1b: Var, w2a: Var, w2b: Var, t: Option<(Var, Var)> },
    /// LyCORIS' LoKr: `ΔW = w1 ⊗ w2`.
    Lokr { w1: Half, w2: Half },
}

impl Factors {
    /// The type's name, as users know it.
    pub fn kind(&self) -> &'static str {
        match self {
            Factors::Lora { .. } => "LoRA",
            Factors::Loha { .. } => "LoHa",
            Factors::Lokr { .. } => "LoKr",
        }
    }

    /// The tensors under their file-key suffixes, in the order LyCORIS and sd-scripts register them.
    pub fn named(&self) -> Vec<(&'static str, &Var)> {
        match self {
            Factors::Lora { down, up, mid } => {
                let mut v = vec![("lora_down.weight", down), ("lora_up.weight", up)];
                v.extend(mid.iter().map(|m| ("lora_mid.weight", m)));
                v
            }
            Factors::Loha { w1a, w1b, w2a, w2b, t } => {
                let mut v = vec![("hada_w1_a", w1a), ("hada_w1_b", w1b), ("hada_w2_a", w2a), ("hada_w2_b", w2b)];
                if let Some((t1, t2)) = t {
                    v.extend([("hada_t1", t1), ("hada_t2", t2)]);
                }
                v
            }
            Factors::Lokr { w1, w2 } => {
                let side = |h: &'_ Half, full: &'static str, a: &'static str, b: &'static str| match h {
                    Half::Full(_) => vec![full],
                    Half::LowRank(..) => vec![a, b],
                };
                let names = side(w1, "lokr_w1", "lokr_w1_a", "lokr_w1_b").into_iter().chain(side(
                    w2,
                    "lokr_w2",
                    "lokr_w2_a",
                    "lokr_w2_b",
                ));
                names.zip(w1.vars().into_iter().chain(w2.vars())).collect()
            }
        }
    }

    /// The rank that `alpha` is divided by; None for a LoKr of two whole matrices (scale 1, as LyCORIS).
    pub fn rank(&self) -> Option<usize> {
        match self {
            Factors::Lora { down, .. } => Some(down.as_tensor().dims()[0]),
            Factors::Loha { w1b, .. } => Some(w1b.as_tensor().dims()[0]),
            Factors::Lokr { w1, w2 } => match (w1, w2) {
                (Half::LowRank(a, _), _) | (_, Half::LowRank(a, _)) => Some(a.as_tensor().dims()[1]),
                _ => None,
            },
        }
    }
}

/// One module: its factors on a layer, with kohya's name and alpha.
pub struct Module {
    /// kohya name (`lora_unet_…`, `lora_te_…`).
    pub name: String,
    pub layer: LayerInfo,
    pub factors: Factors,
    pub alpha: f64,
    /// LyCORIS' scalar of LoHa and LoCon modules (1 until max-norm regularization scales the module; saved
    /// folded into `hada_w1_a` / `lora_up`), shared like the factors' variables by copies of the module.
    pub scalar: Arc<Mutex<f64>>,
    /// DoRA (LyCORIS' `dora_wd`): the learned magnitude `dora_scale` of `W + ΔW` per output row ([out, 1, …]) or,
    /// `wd_on_output=False`, per input column ([1, in, …]).
    pub dora: Option<Var>,
    pub state: Arc<NetworkState>,
}

/// The shape of a layer's weight.
pub fn weight_shape(kind: &LayerKind) -> Vec<usize> {
    match kind {
        LayerKind::Linear { in_features, out_features } => vec![*out_features, *in_features],
        LayerKind::Conv { in_channels, out_channels, kernel, .. } => {
            vec![*out_channels, *in_channels, kernel.0, kernel.1]
        }
    }
}

impl Module {
    pub fn new(name: String, layer: LayerInfo, factors: Factors, alpha: f64, state: Arc<NetworkState>) -> Self {
        Self { name, layer, factors, alpha, scalar: Arc::new(Mutex::new(1.0)), dora: None, state }
    }

    /// The module with a DoRA magnitude.
    pub fn with_dora(mut self, dora: Option<Var>) -> Self {
        self.dora = dora;
        self
    }

    /// The tensors under their file-key suffixes: the factors', then `dora_scale`.
    pub fn named(&self) -> Vec<(&'static str, &Var)> {
        let mut v = self.factors.named();
        v.extend(self.dora.iter().map(|d| ("dora_scale", d)));
        v
    }

    /// LyCORIS' `apply_weight_decompose`: `w` (= W + ΔW) rescaled to the DoRA magnitude along its axis (the norm
    /// plus f32 epsilon), the scale blended with the multiplier as `m·(scale − 1) + 1`; `w` itself without DoRA.
    pub fn decompose(&self, w: &Tensor, multiplier: f64) -> Result<Tensor> {
        let Some(dora) = &self.dora else { return Ok(w.clone()) };
        let mag = dora.as_tensor();
        let on_output = mag.dims()[0] == w.dims()[0] && (mag.rank() < 2 || mag.dims()[1] == 1);
        let norm = axis_norms(w, on_output)?.reshape(mag.dims())?;
        let mut scale = mag.to_dtype(w.dtype())?.broadcast_div(&(norm + f32::EPSILON as f64)?)?;
        if multiplier != 1.0 {
            scale = (((scale - 1.0)? * multiplier)? + 1.0)?;
        }
        Ok(w.broadcast_mul(&scale)?)
    }

    /// The layer's weight `w` with the module merged at `multiplier`: `w + m·ΔW`, or with DoRA the decomposed
    /// `W + ΔW`; in `w`'s dtype.
    pub fn merged(&self, w: &Tensor, multiplier: f64) -> Result<Tensor> {
        let delta = self.delta_weight()?.reshape(w.dims())?;
        if self.dora.is_none() {
            return Ok((w + (delta * multiplier)?.to_dtype(w.dtype())?)?);
        }
        let sum = (w.to_dtype(delta.dtype())? + delta)?;
        Ok(self.decompose(&sum, multiplier)?.to_dtype(w.dtype())?)
    }

    /// The rank (for a LoKr of two whole matrices, 1).
    pub fn rank(&self) -> usize {
        self.factors.rank().unwrap_or(1)
    }

    /// `alpha / rank` (1 for a LoKr of two whole matrices).
    pub fn scale(&self) -> f64 {
        match self.factors.rank() {
            Some(r) => self.alpha / r as f64,
            None => 1.0,
        }
    }

    fn scalar(&self) -> f64 {
        *self.scalar.lock().expect("scalar lock")
    }

    /// Whether max-norm regularization scales this module through its scalar (LyCORIS' LoHa and LoCon), and
    /// which saved tensor the scalar is folded into.
    fn scalar_key(&self) -> Option<&'static str> {
        match &self.factors {
            Factors::Loha { .. } => Some("hada_w1_a"),
            Factors::Lora { .. } if self.state.lycoris => Some("lora_up.weight"),
            _ => None,
        }
    }

    /// `ΔW` of this module in the layer's weight shape, scale (and the LyCORIS scalar) included.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let shape = weight_shape(&self.layer.kind);
        let delta = match &self.factors {
            Factors::Lora { down, up, mid: Some(mid) } => {
                let (d, u) = (down.as_tensor(), up.as_tensor());
                let wa = u.reshape((u.dims()[0], ()))?.t()?;
                tucker(mid.as_tensor(), &wa, &d.reshape((d.dims()[0], ()))?)?
            }
            Factors::Lora { down, up, mid: None } => {
                let (d, u) = (down.as_tensor(), up.as_tensor());
                match &self.layer.kind {
                    LayerKind::Linear { .. } => u.matmul(d)?,
                    LayerKind::Conv { kernel: (1, 1), .. } => {
                        u.squeeze(3)?.squeeze(2)?.matmul(&d.squeeze(3)?.squeeze(2)?)?.unsqueeze(2)?.unsqueeze(3)?
                    }
                    LayerKind::Conv { .. } => d
                        .permute((1, 0, 2, 3))?
                        .contiguous()?
                        .conv2d(u, 0, 1, 1, 1)?
                        .permute((1, 0, 2, 3))?
                        .contiguous()?,
                }
            }
            Factors::Loha { w1a, w1b, w2a, w2b, t: None } => {
                let m1 = w1a.as_tensor().matmul(w1b.as_tensor())?;
                let m2 = w2a.as_tensor().matmul(w2b.as_tensor())?;
                (m1 * m2)?.reshape(shape.as_slice())?
            }
            Factors::Loha { w1a, w1b, w2a, w2b, t: Some((t1, t2)) } => {
                let m1 = tucker(t1.as_tensor(), w1a.as_tensor(), w1b.as_tensor())?;
                let m2 = tucker(t2.as_tensor(), w2a.as_tensor(), w2b.as_tensor())?;
                (m1 * m2)?
            }
            Factors::Lokr { w1, w2 } => kron(&w1.matrix()?, &w2.matrix()?)?.reshape(shape.as_slice())?,
        };
        Ok((delta * (self.scale() * self.scalar()))?)
    }

    /// The trainable variables: (those at the group's learning rate, LoRA's up weight which LoRA+ scales).
    /// LoRA-FA (`lora_fa`) trains the up weight only.
    pub fn trainable(&self, lora_fa: bool) -> (Vec<Var>, Option<Var>) {
        match &self.factors {
            Factors::Lora { down, up, mid } => {
                let base = if lora_fa {
                    vec![]
                } else {
                    std::iter::once(down).chain(mid).chain(&self.dora).cloned().collect()
                };
                (base, Some(up.clone()))
            }
            _ => (self.vars(), None),
        }
    }

    /// Every variable, in file order.
    pub fn vars(&self) -> Vec<Var> {
        self.named().into_iter().map(|(_, v)| v.clone()).collect()
    }

    /// The module's tensors as saved: (key suffix, tensor), the scalar folded in as LyCORIS saves it.
    pub fn saved(&self) -> Result<Vec<(&'static str, Tensor)>> {
        let (s, fold) = (self.scalar(), self.scalar_key());
        self.named()
            .into_iter()
            .map(|(k, v)| {
                let t = if Some(k) == fold && s != 1.0 { (v.as_tensor() * s)? } else { v.as_tensor().clone() };
                Ok((k, t))
            })
            .collect()
    }

    /// What a training state keeps of the module: the factors as they are and the LyCORIS scalar (`scalar`, f64), so
    /// that a resumed run continues exactly.
    pub fn state(&self) -> Result<Vec<(&'static str, Tensor)>> {
        let mut out: Vec<(&'static str, Tensor)> =
            self.named().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        if self.scalar_key().is_some() {
            out.push(("scalar", Tensor::new(self.scalar(), &candle_core::Device::Cpu)?));
        }
        Ok(out)
    }

    /// Sets the factors from saved tensors (`get(suffix)`) and the scalar from `scalar` (1 when absent, as
    /// LyCORIS loads a file).
    pub fn restore(&self, get: impl Fn(&str) -> Result<Tensor>, scalar: Option<f64>) -> Result<()> {
        for (k, v) in self.named() {
            v.set(&get(k)?.to_dtype(v.dtype())?.to_device(v.as_tensor().device())?)?;
        }
        *self.scalar.lock().expect("scalar lock") = scalar.unwrap_or(1.0);
        Ok(())
    }

    /// Scales ΔW by `ratio` as sd-scripts and LyCORIS regularize max norms: sd-scripts' LoRA both factors by
    /// √ratio, LyCORIS' LoHa and LoCon their scalar, LoKr each factor by ratio^(1/factors).
    pub fn scale_delta(&self, ratio: f64) -> Result<()> {
        let vars: Vec<Var> = self.factors.named().into_iter().map(|(_, v)| v.clone()).collect();
        match self.scalar_key() {
            Some(_) => *self.scalar.lock().expect("scalar lock") *= ratio,
            None => {
                let s = ratio.powf(1.0 / vars.len() as f64);
                for v in vars {
                    v.set(&(v.as_tensor() * s)?)?;
                }
            }
        }
        Ok(())
    }

    fn project(&self, x: &Tensor) -> Result<Tensor> {
        match &self.factors {
            Factors::Lora { down, up, mid: None } if !self.state.lycoris && self.dora.is_none() => {
                self.project_lora(x, down.as_tensor(), up.as_tensor())
            }
            _ => self.project_delta(x),
        }
    }

    /// LyCORIS' forward: ΔW rebuilt (its rows dropped by rank dropout), times the multiplier, through the layer's op.
    fn project_delta(&self, x: &Tensor) -> Result<Tensor> {
        let mut dw = self.delta_weight()?;
        if self.state.training.load(Ordering::Relaxed) {
            if let Some(p) = self.state.dropouts.rank.filter(|&p| p > 0.0) {
                let mut shape = vec![1usize; dw.rank()];
                shape[0] = dw.dim(0)?;
                let mut mask = self.keep_mask(&shape, p, 1.0, &dw)?;
                if self.state.dropouts.rank_scale {
                    let kept = mask.mean_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                    if kept > 0.0 {
                        mask = (mask / kept)?;
                    }
                }
                dw = dw.broadcast_mul(&mask)?;
            }
        }
        let m = *self.state.multiplier.read().expect("multiplier lock");
        let dw = match &self.dora {
            // DoRA: the layer's weight replaced by decompose(W + ΔW): what is added is that minus W
            Some(_) => {
                let w = self.layer.slot.weight().detach().to_dtype(dw.dtype())?.reshape(dw.dims())?;
                (self.decompose(&(&w + dw)?, m)? - w)?
            }
            None => (dw * m)?,
        };
        Ok(match &self.layer.kind {
            LayerKind::Linear { .. } => crate::nn::grad::matmul_t(x, &dw, dw.dtype())?,
            LayerKind::Conv { stride, padding, .. } => crate::nn::conv2d(x, &dw, *padding, *stride)?,
        })
    }

    /// sd-scripts' LoRA forward: `up(down(x)) · multiplier · scale`, with network and rank dropout.
    fn project_lora(&self, x: &Tensor, d: &Tensor, u: &Tensor) -> Result<Tensor> {
        let training = self.state.training.load(Ordering::Relaxed);
        let mut h = match &self.layer.kind {
            LayerKind::Linear { .. } => crate::nn::grad::matmul_t(x, d, d.dtype())?,
            LayerKind::Conv { stride, padding, .. } => crate::nn::conv2d(x, d, *padding, *stride)?,
        };
        let mut scale = self.scale();
        if training {
            if let Some(p) = self.state.dropouts.neuron.filter(|&p| p > 0.0) {
                // inverted dropout: zero with probability p, scale the rest by 1/(1−p)
                h = h.mul(&self.keep_mask(h.dims(), p, (1.0 / (1.0 - p)) as f32, &h)?)?;
            }
            if let Some(p) = self.state.dropouts.rank.filter(|&p| p > 0.0) {
                let r = self.rank();
                let b = h.dim(0)?;
                let mut shape = vec![1usize; h.rank()];
                shape[0] = b;
                // the rank axis: last for Linear, 1 for Conv
                let axis = if matches!(self.layer.kind, LayerKind::Linear { .. }) { h.rank() - 1 } else { 1 };
                shape[axis] = r;
                h = h.broadcast_mul(&self.keep_mask(&shape, p, 1.0, &h)?)?;
                scale /= 1.0 - p;
            }
        }
        // multiplier · scale on the rank-sized activation, before `up`
        let m = *self.state.multiplier.read().expect("multiplier lock");
        let h = (h * (m * scale))?;
        Ok(match &self.layer.kind {
            LayerKind::Linear { .. } => crate::nn::grad::matmul_t(&h, u, u.dtype())?,
            LayerKind::Conv { .. } => crate::nn::conv2d(&h, u, 0, 1)?,
        })
    }

    /// A mask of `shape` for `h` (its dtype and device): `keep` with probability 1 − p, else 0, from the next
    /// draws of the network's stream.
    fn keep_mask(&self, shape: &[usize], p: f64, keep: f32, h: &Tensor) -> Result<Tensor> {
        let state = self.state.rng.lock().expect("rng lock").reserve(shape.iter().product());
        crate::nn::fused::keep_mask(state, shape, p, keep, h.dtype(), h.device())
    }
}

/// The norms of `w` per output row ([out, 1, …]) or per input column ([1, in, …]).
pub fn axis_norms(w: &Tensor, on_output: bool) -> Result<Tensor> {
    let dims = w.dims();
    let mut shape = vec![1usize; dims.len()];
    let (axis, t) = if on_output { (0, w.clone()) } else { (1, w.transpose(0, 1)?.contiguous()?) };
    shape[axis] = dims[axis];
    Ok(t.reshape((dims[axis], ()))?.sqr()?.sum_keepdim(1)?.sqrt()?.reshape(shape)?)
}

/// LyCORIS' `rebuild_tucker`: `einsum("i j ..., i p, j r -> p r ...", t, a, b)` for `t` [R1, R2, kh, kw],
/// `a` [R1, P], `b` [R2, Q]: the [P, Q, kh, kw] kernel `aᵀ · t[:, :, s] · b` at each spatial position `s`.
pub fn tucker(t: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (r1, r2, kh, kw) = t.dims4()?;
    let (p, q) = (a.dims()[1], b.dims()[1]);
    let ts = t.reshape((r1, r2, kh * kw))?.permute((2, 0, 1))?.contiguous()?; // [s, R1, R2]
    let left = a.t()?.contiguous()?.unsqueeze(0)?.broadcast_as((kh * kw, p, r1))?.contiguous()?;
    let right = b.unsqueeze(0)?.broadcast_as((kh * kw, r2, q))?.contiguous()?;
    let k = left.matmul(&ts)?.matmul(&right)?; // [s, P, Q]
    Ok(k.permute((1, 2, 0))?.contiguous()?.reshape((p, q, kh, kw))?)
}

/// `a ⊗ b` of two matrices (differentiable: a broadcast product and reshapes).
pub fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (p, q) = a.dims2()?;
    let (r, s) = b.dims2()?;
    let prod = a.reshape((p, 1, q, 1))?.broadcast_mul(&b.reshape((1, r, 1, s))?)?;
    Ok(prod.reshape((p * r, q * s))?)
}

/// The adapter a module attaches to its layer.
pub struct ModuleAdapter {
    pub module: Arc<Module>,
    /// Whether module dropout skipped the last forward.
    skipped: AtomicBool,
}

impl ModuleAdapter {
    pub fn new(module: Arc<Module>) -> Self {
        Self { module, skipped: AtomicBool::new(false) }
    }
}

impl Adapter for ModuleAdapter {
    fn forward(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let m = &self.module;
        let skip = m.state.training.load(Ordering::Relaxed)
            && m.state.dropouts.module.is_some_and(|p| p > 0.0 && m.state.rng.lock().expect("rng lock").uniform() < p);
        self.skipped.store(skip, Ordering::Relaxed);
        if skip {
            return Ok(None);
        }
        // x goes in as it is: linear and conv adapters cast it inside their op (the graph keeps no f32 copy of x)
        Ok(Some(m.project(x)?))
    }

    fn owner(&self) -> usize {
        self.module.state.id
    }

    fn params(&self) -> Vec<Var> {
        if self.skipped.load(Ordering::Relaxed) {
            return Vec::new();
        }
        self.module.vars()
    }

    fn stream(&self) -> Option<u64> {
        Some(self.module.state.rng.lock().expect("rng lock").state())
    }

    fn set_stream(&self, state: u64) {
        *self.module.state.rng.lock().expect("rng lock") = Rng::new(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::adapter::Slot;
    use candle_core::{DType, Device};

    /// A rank-`r` module on a 6→5 Linear (alpha 2·r: scale 2) with these dropouts, training, and its stream's seed.
    fn module(r: usize, dropouts: Dropouts) -> (Module, u64) {
        let dev = Device::Cpu;
        let mut init = Rng::new(1);
        let down = Tensor::from_vec(init.normal_vec(r * 6), (r, 6), &dev).unwrap();
        let up = Tensor::from_vec(init.normal_vec(5 * r), (5, r), &dev).unwrap();
        let layer = LayerInfo {
            name: "proj".into(),
            kind: LayerKind::Linear { in_features: 6, out_features: 5 },
            slot: Slot::new(Tensor::zeros((5, 6), DType::F32, &dev).unwrap()),
        };
        let state = Arc::new(NetworkState {
            id: 1,
            multiplier: RwLock::new(1.0),
            training: AtomicBool::new(true),
            dropouts,
            rng: Mutex::new(Rng::new(99)),
            lycoris: false,
        });
        let (down, up) = (Var::from_tensor(&down).unwrap(), Var::from_tensor(&up).unwrap());
        let factors = Factors::Lora { down, up, mid: None };
        let m = Module::new("lora_unet_proj".into(), layer, factors, 2.0 * r as f64, state);
        (m, 99)
    }

    fn lora(m: &Module) -> (Tensor, Tensor) {
        match &m.factors {
            Factors::Lora { down, up, .. } => (down.as_tensor().clone(), up.as_tensor().clone()),
            _ => unreachable!("a LoRA module"),
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn neuron_and_rank_dropout_follow_sd_scripts() {
        let x = Tensor::from_vec(Rng::new(2).normal_vec(2 * 3 * 6), (2, 3, 6), &Device::Cpu).unwrap();
        // network_dropout: F.dropout on down(x), the survivors scaled by 1/(1 − p), from the stream's next draws
        let (m, seed) = module(4, Dropouts { neuron: Some(0.5), ..Dropouts::default() });
        let got = m.project(&x).unwrap();
        let mut rng = Rng::new(seed);
        let keep: Vec<f32> = (0..2 * 3 * 4).map(|_| if rng.uniform() >= 0.5 { 2.0 } else { 0.0 }).collect();
        assert!(keep.contains(&0.0) && keep.contains(&2.0));
        let keep = Tensor::from_vec(keep, (2, 3, 4), &Device::Cpu).unwrap();
        let h = x.broadcast_matmul(&lora(&m).0.t().unwrap()).unwrap().mul(&keep).unwrap();
        let want = (h.broadcast_matmul(&lora(&m).1.t().unwrap()).unwrap() * 2.0).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        // rank_dropout: whole ranks per sample ([B, 1, r] for a Linear on tokens), the scale divided by 1 − p
        let (m, seed) = module(4, Dropouts { rank: Some(0.25), ..Dropouts::default() });
        let got = m.project(&x).unwrap();
        let mut rng = Rng::new(seed);
        let keep: Vec<f32> = (0..2 * 4).map(|_| if rng.uniform() >= 0.25 { 1.0 } else { 0.0 }).collect();
        let keep = Tensor::from_vec(keep, (2, 1, 4), &Device::Cpu).unwrap();
        let h = x.broadcast_matmul(&lora(&m).0.t().unwrap()).unwrap().broadcast_mul(&keep).unwrap();
        let want = (h.broadcast_matmul(&lora(&m).1.t().unwrap()).unwrap() * (2.0 / 0.75)).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        // not training: no dropout, and the stream does not move
        m.state.training.store(false, Ordering::Relaxed);
        let before = m.state.rng.lock().unwrap().state();
        let plain = m.project(&x).unwrap();
        assert_eq!(m.state.rng.lock().unwrap().state(), before);
        let h = x.broadcast_matmul(&lora(&m).0.t().unwrap()).unwrap();
        let want = (h.broadcast_matmul(&lora(&m).1.t().unwrap()).unwrap() * 2.0).unwrap();
        assert!(max_diff(&plain, &want) < 1e-5);
    }
}
