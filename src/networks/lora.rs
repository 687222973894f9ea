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
                h = self.dropout_mask(&h, h.dims().to_vec(), p)?;
            }
            if let Some(p) = self.state.dropouts.rank.filter(|&p| p > 0.0) {
                let r = self.rank();
                let b = h.dim(0)?;
                let mut shape = vec![1usize; h.rank()];
                shape[0] = b;
                // the rank axis: last for Linear, 1 for Conv
                let axis = if matches!(self.layer.kind, LayerKind::Linear { .. }) { h.rank() - 1 } else { 1 };
                shape[axis] = r;
                let keep: Vec<f32> = {
                    let mut rng = self.state.rng.lock().expect("rng lock");
                    (0..b * r).map(|_| if rng.uniform() >= p { 1.0 } else { 0.0 }).collect()
                };
                let mask = Tensor::from_vec(keep, shape.as_slice(), h.device())?.to_dtype(h.dtype())?;
                h = h.broadcast_mul(&mask)?;
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

    /// Inverted dropout: zero with probability p, scale the rest by 1/(1−p).
    fn dropout_mask(&self, h: &Tensor, shape: Vec<usize>, p: f64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let keep: Vec<f32> = {
            let mut rng = self.state.rng.lock().expect("rng lock");
            (0..n).map(|_| if rng.uniform() >= p { (1.0 / (1.0 - p)) as f32 } else { 0.0 }).collect()
        };
        let mask = Tensor::from_vec(keep, shape.as_slice(), h.device())?.to_dtype(h.dtype())?;
        Ok(h.mul(&mask)?)
    }
}

/// The adapter a module attaches to its layer.
pub struct LoraAdapter(pub Arc<LoraModule>);

impl Adapter for LoraAdapter {
    fn forward(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let m = &self.0;
        if m.state.training.load(Ordering::Relaxed) {
            if let Some(p) = m.state.dropouts.module.filter(|&p| p > 0.0) {
                if m.state.rng.lock().expect("rng lock").uniform() < p {
                    return Ok(None);
                }
            }
        }
        // x goes in as it is: linear and conv adapters cast it inside their op (the graph keeps no f32 copy of x)
        Ok(Some(m.project(x)?))
    }

    fn owner(&self) -> usize {
        self.0.state.id
    }
}
