//! The adaptable layers (Linear, Conv2d) and CLIP's activation.

use super::adapter::{LayerInfo, LayerKind, Slot};
use super::Weights;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// A fully connected layer `y = x·Wᵀ + b (+ adapters)`, carrying its module path.
#[derive(Clone)]
pub struct Linear {
    /// Module path in the component's diffusers/transformers naming.
    pub name: String,
    pub slot: Slot,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` (2-D, or a 4-D 1×1 conv kernel) and the optional `bias`.
    pub fn new(w: &Weights) -> Result<Self> {
        let weight = w.get("weight")?;
        let weight = match weight.dims() {
            [_, _] => weight,
            [o, i, 1, 1] => weight.reshape((*o, *i))?,
            d => bail!("`{}` has shape {d:?}, expected a 2-D linear weight", w.key("weight")),
        };
        let (o, i) = weight.dims2()?;
        let slot = Slot::new(weight);
        w.register(LayerInfo {
            name: w.prefix().to_string(),
            kind: LayerKind::Linear { in_features: i, out_features: o },
            slot: slot.clone(),
        });
        Ok(Self { name: w.prefix().to_string(), slot, bias: w.get_opt("bias") })
    }

    /// The current weight.
    pub fn weight(&self) -> Tensor {
        self.slot.weight()
    }

    /// Applies the layer over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::profile::time("linear (+ adapters)", x.device(), || {
            let y = super::grad::matmul_t(x, &self.weight(), x.dtype())?;
            let y = match &self.bias {
                // (a trained f32 bias under half-precision compute is cast, differentiably)
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
                None => y,
            };
            self.slot.add_adapters(x, y)
        })
    }
}

/// A 2-D convolution (NCHW) `(+ adapters)`, carrying its module path.
#[derive(Clone)]
pub struct Conv2d {
    /// Module path in the component's diffusers naming.
    pub name: String,
    pub slot: Slot,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    /// Loads a 4-D `weight` and optional `bias`.
    pub fn new(w: &Weights, stride: usize, padding: usize) -> Result<Self> {
        let weight = w.get("weight")?;
        if weight.rank() != 4 {
            bail!("`{}` has shape {:?}, expected a 4-D conv kernel", w.key("weight"), weight.dims());
        }
        let (o, i, kh, kw) = weight.dims4()?;
        let slot = Slot::new(weight);
        let kind = LayerKind::Conv { in_channels: i, out_channels: o, kernel: (kh, kw), stride, padding };
        w.register(LayerInfo { name: w.prefix().to_string(), kind, slot: slot.clone() });
        Ok(Self { name: w.prefix().to_string(), slot, bias: w.get_opt("bias"), stride, padding })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::profile::time("conv2d (+ adapters)", x.device(), || {
            let w = self.slot.weight();
            // a trained kernel (full fine-tuning: f32 master weights) computes in the input's precision, as under
            // autocast; a frozen one keeps its own (conv2d computes in the kernel's dtype)
            let w = if super::grad::tracked(&w) && w.dtype() != x.dtype() { w.to_dtype(x.dtype())? } else { w };
            let y = super::conv::conv2d(x, &w, self.padding, self.stride)?;
            let y = match &self.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?.reshape((1, b.dims1()?, 1, 1))?)?,
                None => y,
            };
            self.slot.add_adapters(x, y)
        })
    }
}

/// `x · sigmoid(1.702 x)`, CLIP-L's activation.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}
