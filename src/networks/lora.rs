//! A LoRA module (sd-scripts' `LoRAModule`): `up(down(x)) · multiplier · alpha/rank` added to a Linear or Conv2d,
//! with network/rank/module dropout while training.

use crate::nn::adapter::{Adapter, LayerInfo, LayerKind};
use crate::rng::Rng;
use anyhow::Result;
use candle_core::{Tensor, Var};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Dropout settings (training only).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dropouts {
    /// `network_dropout`: dropout on the down projection's output.
    pub neuron: Option<f64>,
    /// `rank_dropout`: drop whole ranks per sample.
    pub rank: Option<f64>,
    /// `module_dropout`: skip the module for a forward.
    pub module: Option<f64>,
}

/// State shared by all modules of a network.
pub struct NetworkState {
    pub id: usize,
    pub multiplier: RwLock<f64>,
    pub training: AtomicBool,
    pub dropouts: Dropouts,
    pub rng: Mutex<Rng>,
}

/// One LoRA module.
pub struct LoraModule {
    /// kohya name (`lora_unet_…`, `lora_te_…`).
    pub name: String,
    pub layer: LayerInfo,
    pub down: Var,
    pub up: Var,
    pub alpha: f64,
    pub state: Arc<NetworkState>,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.as_tensor().dims()[0]
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// `ΔW` of this module in the layer's weight shape, `(up @ down)·scale` (3×3 convs through a convolution).
    pub fn delta_weight(&self) -> Result<Tensor> {
        let (d, u) = (self.down.as_tensor(), self.up.as_tensor());
        let delta = match &self.layer.kind {
            LayerKind::Linear { .. } => u.matmul(d)?,
            LayerKind::Conv { kernel: (1, 1), .. } => {
                u.squeeze(3)?.squeeze(2)?.matmul(&d.squeeze(3)?.squeeze(2)?)?.unsqueeze(2)?.unsqueeze(3)?
            }
            LayerKind::Conv { .. } => {
                d.permute((1, 0, 2, 3))?.contiguous()?.conv2d(u, 0, 1, 1, 1)?.permute((1, 0, 2, 3))?.contiguous()?
            }
        };
        Ok((delta * self.scale())?)
    }

    fn project(&self, x: &Tensor) -> Result<Tensor> {
        let (d, u) = (self.down.as_tensor(), self.up.as_tensor());
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

/// The adapter a module attaches to its layer.
pub struct LoraAdapter {
    pub module: Arc<LoraModule>,
    /// Whether module dropout skipped the last forward.
    skipped: AtomicBool,
}

impl LoraAdapter {
    pub fn new(module: Arc<LoraModule>) -> Self {
        Self { module, skipped: AtomicBool::new(false) }
    }
}

impl Adapter for LoraAdapter {
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
        vec![self.module.down.clone(), self.module.up.clone()]
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
    fn module(r: usize, dropouts: Dropouts) -> (LoraModule, u64) {
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
        });
        let m = LoraModule {
            name: "lora_unet_proj".into(),
            layer,
            down: Var::from_tensor(&down).unwrap(),
            up: Var::from_tensor(&up).unwrap(),
            alpha: 2.0 * r as f64,
            state,
        };
        (m, 99)
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
        let h = x.broadcast_matmul(&m.down.as_tensor().t().unwrap()).unwrap().mul(&keep).unwrap();
        let want = (h.broadcast_matmul(&m.up.as_tensor().t().unwrap()).unwrap() * 2.0).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        // rank_dropout: whole ranks per sample ([B, 1, r] for a Linear on tokens), the scale divided by 1 − p
        let (m, seed) = module(4, Dropouts { rank: Some(0.25), ..Dropouts::default() });
        let got = m.project(&x).unwrap();
        let mut rng = Rng::new(seed);
        let keep: Vec<f32> = (0..2 * 4).map(|_| if rng.uniform() >= 0.25 { 1.0 } else { 0.0 }).collect();
        let keep = Tensor::from_vec(keep, (2, 1, 4), &Device::Cpu).unwrap();
        let h = x.broadcast_matmul(&m.down.as_tensor().t().unwrap()).unwrap().broadcast_mul(&keep).unwrap();
        let want = (h.broadcast_matmul(&m.up.as_tensor().t().unwrap()).unwrap() * (2.0 / 0.75)).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        // not training: no dropout, and the stream does not move
        m.state.training.store(false, Ordering::Relaxed);
        let before = m.state.rng.lock().unwrap().state();
        let plain = m.project(&x).unwrap();
        assert_eq!(m.state.rng.lock().unwrap().state(), before);
        let h = x.broadcast_matmul(&m.down.as_tensor().t().unwrap()).unwrap();
        let want = (h.broadcast_matmul(&m.up.as_tensor().t().unwrap()).unwrap() * 2.0).unwrap();
        assert!(max_diff(&plain, &want) < 1e-5);
    }
}
