//! UNet building blocks in diffusers' layout: ResnetBlock2D, Transformer2DModel, down/up-samplers.

use crate::nn::{attention, Conv2d, GroupNorm, LayerNorm, Linear, Weights};
use anyhow::Result;
use candle_core::Tensor;

/// `ResnetBlock2D`: two GroupNorm→SiLU→conv stages, an optional time-embedding add and a 1×1 shortcut.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(w: &Weights, groups: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(&w.pp("norm1"), groups, eps)?,
            conv1: Conv2d::new(&w.pp("conv1"), 1, 1)?,
            time_emb_proj: if w.has_module("time_emb_proj") {
                Some(Linear::new(&w.pp("time_emb_proj"))?)
            } else {
                None
            },
            norm2: GroupNorm::new(&w.pp("norm2"), groups, eps)?,
            conv2: Conv2d::new(&w.pp("conv2"), 1, 1)?,
            conv_shortcut: if w.has_module("conv_shortcut") {
                Some(Conv2d::new(&w.pp("conv_shortcut"), 1, 0)?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&t.silu()?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((shortcut + h)?)
    }
}

/// diffusers `Attention` as used in transformer blocks: q/k/v projections (no bias) and `to_out.0`.
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl CrossAttention {
    pub fn new(w: &Weights, heads: usize) -> Result<Self> {
        Ok(Self {
            to_q: Linear::new(&w.pp("to_q"))?,
            to_k: Linear::new(&w.pp("to_k"))?,
            to_v: Linear::new(&w.pp("to_v"))?,
            to_out: Linear::new(&w.pp("to_out.0"))?,
            heads,
        })
    }

    /// Self-attention when `context` is `None`, else cross-attention to it.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let a =
            attention(&self.to_q.forward(x)?, &self.to_k.forward(ctx)?, &self.to_v.forward(ctx)?, self.heads, false)?;
        self.to_out.forward(&a)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention and a GEGLU feed-forward, each pre-normed.
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl BasicTransformerBlock {
    pub fn new(w: &Weights, heads: usize) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(&w.pp("norm1"), 1e-5)?,
            attn1: CrossAttention::new(&w.pp("attn1"), heads)?,
            norm2: LayerNorm::new(&w.pp("norm2"), 1e-5)?,
            attn2: CrossAttention::new(&w.pp("attn2"), heads)?,
            norm3: LayerNorm::new(&w.pp("norm3"), 1e-5)?,
            ff_proj: Linear::new(&w.pp("ff.net.0.proj"))?,
            ff_out: Linear::new(&w.pp("ff.net.2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + &x)?;
        let h = self.ff_proj.forward(&self.norm3.forward(&x)?)?;
        let half = h.dim(2)? / 2;
        let (hidden, gate) = (h.narrow(2, 0, half)?, h.narrow(2, half, half)?);
        let h = self.ff_out.forward(&(hidden * gate.gelu_erf()?)?)?;
        Ok((h + x)?)
    }
}

/// proj_in / proj_out: a 1×1 conv (SD1) or a Linear on tokens (SD2, `use_linear_projection`).
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(w: &Weights) -> Result<Self> {
        Ok(if w.get("weight")?.rank() == 4 {
            Projection::Conv(Conv2d::new(w, 1, 0)?)
        } else {
            Projection::Linear(Linear::new(w)?)
        })
    }
}

/// `Transformer2DModel`: GroupNorm, proj_in, transformer blocks over the H·W tokens, proj_out, residual.
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    pub fn new(w: &Weights, heads: usize, groups: usize) -> Result<Self> {
        let n = w.count("transformer_blocks");
        let blocks = (0..n)
            .map(|i| BasicTransformerBlock::new(&w.pp("transformer_blocks").pp(i), heads))
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: GroupNorm::new(&w.pp("norm"), groups, 1e-6)?,
            proj_in: Projection::new(&w.pp("proj_in"))?,
            blocks,
            proj_out: Projection::new(&w.pp("proj_out"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, wd) = x.dims4()?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(1)?;
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * wd, c))?)
        };
        let hs = self.norm.forward(x)?;
        let mut t = match &self.proj_in {
            Projection::Conv(c) => to_tokens(&c.forward(&hs)?)?,
            Projection::Linear(l) => l.forward(&to_tokens(&hs)?)?,
        };
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let to_map = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(2)?;
            Ok(t.reshape((b, h, wd, c))?.permute((0, 3, 1, 2))?.contiguous()?)
        };
        let out = match &self.proj_out {
            Projection::Conv(c) => c.forward(&to_map(&t)?)?,
            Projection::Linear(l) => to_map(&l.forward(&t)?)?,
        };
        Ok((out + x)?)
    }
}

/// 3×3 stride-2 convolution; `pad_right_bottom` pads (0,1,0,1) first with no conv padding (the VAE's variant).
pub struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(w: &Weights, pad_right_bottom: bool) -> Result<Self> {
        let padding = if pad_right_bottom { 0 } else { 1 };
        Ok(Self { conv: Conv2d::new(&w.pp("conv"), 2, padding)?, pad_right_bottom })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour upsampling (to `size`, default 2×) followed by a 3×3 conv.
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(w: &Weights) -> Result<Self> {
        Ok(Self { conv: Conv2d::new(&w.pp("conv"), 1, 1)? })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let up = if th % h == 0 && tw % w == 0 { nearest_by(x, th / h, tw / w)? } else { nearest_to(x, th, tw)? };
        self.conv.forward(&up)
    }
}

/// Nearest-neighbour upsampling by integer factors, as one broadcast copy: its backward is a sum over the copies
/// (candle's `upsample_nearest2d` backward is a grouped convolution with one group per channel).
fn nearest_by(x: &Tensor, fh: usize, fw: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?.broadcast_as((b, c, h, fh, w, fw))?.reshape((b, c, h * fh, w * fw))?)
}

/// PyTorch's `interpolate(mode="nearest")` to any size (source index ⌊i·in/out⌋), by gathering rows and columns:
/// unlike candle's upsample for non-integer factors, this has a gradient (for latents whose sides are not
/// multiples of 8, e.g. 512×650 images).
fn nearest_to(x: &Tensor, th: usize, tw: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let idx = |out: usize, inp: usize| -> Result<Tensor> {
        let scale = inp as f32 / out as f32;
        let v: Vec<u32> = (0..out).map(|i| ((i as f32 * scale).floor() as usize).min(inp - 1) as u32).collect();
        Ok(Tensor::from_vec(v, out, x.device())?)
    };
    Ok(x.index_select(&idx(th, h)?, 2)?.index_select(&idx(tw, w)?, 3)?)
}

#[cfg(test)]
mod nearest_tests {
    use super::{nearest_by, nearest_to};
    use candle_core::{Device, Var};

    #[test]
    fn nearest_to_any_size_matches_pytorch_and_has_a_gradient() {
        let x = Var::new(&[[[[1f32, 2., 3.], [4., 5., 6.]]]], &Device::Cpu).unwrap();
        // torch.nn.functional.interpolate(x, size=(3, 5), mode="nearest"): rows [0,0,1], cols [0,0,1,1,2]
        let y = nearest_to(x.as_tensor(), 3, 5).unwrap();
        let want = [[1f32, 1., 2., 2., 3.], [1., 1., 2., 2., 3.], [4., 4., 5., 5., 6.]];
        assert_eq!(y.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap(), want);
        // integer factors agree with candle's upsample, both ways
        let b = x.as_tensor().upsample_nearest2d(4, 6).unwrap();
        for a in [nearest_to(x.as_tensor(), 4, 6).unwrap(), nearest_by(x.as_tensor(), 2, 2).unwrap()] {
            assert_eq!(
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        let g = nearest_by(x.as_tensor(), 2, 3).unwrap().sum_all().unwrap().backward().unwrap();
        let gx: Vec<f32> = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(gx, vec![6.; 6]);
        // each source pixel's gradient counts its copies
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx: Vec<f32> = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(gx, vec![4., 4., 2., 2., 2., 1.]);
    }
}
