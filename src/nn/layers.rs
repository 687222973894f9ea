//! Differentiable building blocks written on candle-core ops (no fused no-backward kernels).

use super::adapter::{LayerInfo, LayerKind, Slot};
use super::Weights;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// The dtype statistics and softmax are computed in: f32, or f64 for f64 inputs.
fn stat_dtype(d: DType) -> DType {
    if d == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

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
            let y = x.broadcast_matmul(&self.weight().t()?)?;
            let y = match &self.bias {
                Some(b) => y.broadcast_add(b)?,
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
            let y = conv2d(x, &self.slot.weight(), self.padding, self.stride)?;
            let y = match &self.bias {
                Some(b) => y.broadcast_add(&b.reshape((1, b.dims1()?, 1, 1))?)?,
                None => y,
            };
            self.slot.add_adapters(x, y)
        })
    }
}

/// `x.conv2d(w, padding, stride)` with a backward pass for any input size. candle's conv2d backward derives the
/// transposed convolution's output padding from the height alone and applies it to the width too, so a strided
/// convolution over a height and width of different remainders (e.g. 4×5 latents) fails in backward. Padding the
/// side with the smaller remainder with zeros at its end evens them out without changing any output value.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if stride > 1 {
        let (_, _, h, wd) = x.dims4()?;
        let (kh, kw) = (w.dim(2)?, w.dim(3)?);
        let rem = |n: usize, k: usize| (n + 2 * padding).saturating_sub(k) % stride;
        let (rh, rw) = (rem(h, kh), rem(wd, kw));
        if rh != rw {
            let x = if rh < rw { x.pad_with_zeros(2, 0, rw - rh)? } else { x.pad_with_zeros(3, 0, rh - rw)? };
            return Ok(x.conv2d(w, padding, stride, 1, 1)?);
        }
    }
    Ok(x.conv2d(w, padding, stride, 1, 1)?)
}

/// Group normalisation over `[B, C, ...]`, statistics in f32.
#[derive(Clone)]
pub struct GroupNorm {
    pub groups: usize,
    pub eps: f64,
    pub weight: Tensor,
    pub bias: Tensor,
}

impl GroupNorm {
    pub fn new(w: &Weights, groups: usize, eps: f64) -> Result<Self> {
        let weight = w.get("weight")?;
        let c = weight.dims1()?;
        if groups == 0 || c % groups != 0 {
            bail!("`{}`: {c} channels cannot be split into {groups} groups", w.key("weight"));
        }
        Ok(Self { groups, eps, weight, bias: w.get("bias")? })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::profile::time("group_norm", x.device(), || self.forward_inner(x))
    }

    fn forward_inner(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        let xg = x.to_dtype(stat_dtype(dtype))?.reshape((b, self.groups, ()))?;
        let mean = xg.mean_keepdim(2)?;
        let xc = xg.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(2)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.reshape(dims.as_slice())?.to_dtype(dtype)?;
        let mut shape = vec![1usize; dims.len()];
        shape[1] = c;
        Ok(xn
            .broadcast_mul(&self.weight.reshape(shape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(shape.as_slice())?)?)
    }
}

/// Layer normalisation over the last dimension, statistics in f32.
#[derive(Clone)]
pub struct LayerNorm {
    pub eps: f64,
    pub weight: Tensor,
    pub bias: Tensor,
}

impl LayerNorm {
    pub fn new(w: &Weights, eps: f64) -> Result<Self> {
        Ok(Self { eps, weight: w.get("weight")?, bias: w.get("bias")? })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::profile::time("layer_norm", x.device(), || self.forward_inner(x))
    }

    fn forward_inner(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(stat_dtype(dtype))?;
        let mean = x32.mean_keepdim(D::Minus1)?;
        let xc = x32.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        Ok(xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// `x · sigmoid(1.702 x)`, CLIP-L's activation.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// Multi-head scaled dot-product attention over `[B, S, C]` inputs, softmax in f32.
/// `causal` masks future positions (CLIP).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    super::profile::time("attention (scores, softmax, values)", q.device(), || attention_inner(q, k, v, heads, causal))
}

fn attention_inner(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    let (b, sq, c) = q.dims3()?;
    let sk = k.dim(1)?;
    if heads == 0 || c % heads != 0 {
        bail!("attention: width {c} is not divisible by {heads} heads");
    }
    let d = c / heads;
    let split =
        |t: &Tensor, s: usize| -> Result<Tensor> { Ok(t.reshape((b, s, heads, d))?.transpose(1, 2)?.contiguous()?) };
    let dtype = q.dtype();
    let (q, k, v) = (split(q, sq)?, split(k, sk)?, split(v, sk)?);
    let scale = 1.0 / (d as f64).sqrt();
    let sd = stat_dtype(dtype);
    let mut scores = (q.to_dtype(sd)?.matmul(&k.to_dtype(sd)?.t()?)? * scale)?;
    if causal {
        let mask: Vec<f32> =
            (0..sq).flat_map(|i| (0..sk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (1, 1, sq, sk), q.device())?.to_dtype(sd)?;
        scores = scores.broadcast_add(&mask)?;
    }
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)?;
    let out = probs.matmul(&v)?;
    Ok(out.transpose(1, 2)?.reshape((b, sq, c))?)
}

#[cfg(test)]
mod conv_tests {
    use candle_core::{Device, Tensor, Var};

    #[test]
    fn strided_conv_over_uneven_sides_has_a_gradient_and_the_same_values() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (1, 2, 4, 5), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1., (3, 2, 3, 3), &dev).unwrap();
        let y = super::conv2d(x.as_tensor(), &w, 1, 2).unwrap();
        let plain = x.as_tensor().conv2d(&w, 1, 2, 1, 1).unwrap();
        assert_eq!(y.dims(), plain.dims());
        let d = (y - &plain).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0);
        assert!(plain.sum_all().unwrap().backward().is_err(), "candle's own backward still fails here");
        let g = super::conv2d(x.as_tensor(), &w, 1, 2).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(x.as_tensor()).unwrap().dims(), &[1, 2, 4, 5]);
    }
}
