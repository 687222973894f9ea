//! Adaptable layers: each Linear/Conv2d owns a slot holding its weight and the adapters (LoRA modules) attached to
//! it, so networks can be applied, removed and merged without rebuilding the model.

use anyhow::Result;
use candle_core::{Tensor, Var};
use std::sync::{Arc, Mutex, RwLock};

/// Something added to a layer's output: `y = W·x + Σ adapter(x)`.
pub trait Adapter: Send + Sync {
    /// The adapter's contribution for input `x` (`None` when skipped, e.g. by module dropout).
    fn forward(&self, x: &Tensor) -> Result<Option<Tensor>>;
    /// The network this adapter belongs to (for removal).
    fn owner(&self) -> usize;
    /// The trainable variables its last forward used (none when that forward skipped it): gradient
    /// checkpointing hands them their gradients.
    fn params(&self) -> Vec<Var> {
        Vec::new()
    }
    /// The position of the random stream its dropout draws from, if any (saved so that a recomputation draws
    /// the same masks).
    fn stream(&self) -> Option<u64> {
        None
    }
    /// Moves its random stream to `state` (from `stream`).
    fn set_stream(&self, _state: u64) {}
}

/// The mutable part of a layer.
pub struct LayerState {
    pub weight: Tensor,
    pub adapters: Vec<Arc<dyn Adapter>>,
}

/// Shared handle to a layer's state.
#[derive(Clone)]
pub struct Slot(pub Arc<RwLock<LayerState>>);

impl Slot {
    pub fn new(weight: Tensor) -> Self {
        Self(Arc::new(RwLock::new(LayerState { weight, adapters: Vec::new() })))
    }

    pub fn weight(&self) -> Tensor {
        self.0.read().expect("layer lock").weight.clone()
    }

    /// `base + Σ adapters(x)`.
    pub fn add_adapters(&self, x: &Tensor, base: Tensor) -> Result<Tensor> {
        let st = self.0.read().expect("layer lock");
        let mut y = base;
        for a in &st.adapters {
            if let Some(d) = a.forward(x)? {
                let d = d.to_dtype(y.dtype())?;
                y = (y + d)?;
            }
        }
        Ok(y)
    }

    pub fn attach(&self, a: Arc<dyn Adapter>) {
        self.0.write().expect("layer lock").adapters.push(a);
    }

    /// Detaches every adapter of network `owner`; returns how many.
    pub fn detach(&self, owner: usize) -> usize {
        let mut st = self.0.write().expect("layer lock");
        let before = st.adapters.len();
        st.adapters.retain(|a| a.owner() != owner);
        before - st.adapters.len()
    }

    /// The adapters attached now.
    pub fn adapters(&self) -> Vec<Arc<dyn Adapter>> {
        self.0.read().expect("layer lock").adapters.clone()
    }

    pub fn set_weight(&self, w: Tensor) {
        self.0.write().expect("layer lock").weight = w;
    }
}

/// What kind of layer a slot belongs to.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerKind {
    Linear { in_features: usize, out_features: usize },
    Conv { in_channels: usize, out_channels: usize, kernel: (usize, usize), stride: usize, padding: usize },
}

/// A registered adaptable layer: its module path (component naming), kind and slot.
#[derive(Clone)]
pub struct LayerInfo {
    pub name: String,
    pub kind: LayerKind,
    pub slot: Slot,
}

/// The adaptable layers of one model component, in construction order.
#[derive(Clone, Default)]
pub struct Registry(pub Arc<Mutex<Vec<LayerInfo>>>);

impl Registry {
    pub fn push(&self, info: LayerInfo) {
        self.0.lock().expect("registry lock").push(info);
    }

    pub fn layers(&self) -> Vec<LayerInfo> {
        self.0.lock().expect("registry lock").clone()
    }
}
