//! `UNet2DConditionModel` for SD1.x, SD2.x and SDXL in diffusers' layout, with per-sample timesteps.

mod blocks;
mod config;

pub use blocks::{Downsample2D, ResnetBlock2D, SpatialTransformer, Upsample2D};
pub use config::{HeadSpec, UNetConfig, UNetHyper};

use crate::nn::checkpoint::Checkpointed;
use crate::nn::{Conv2d, GroupNorm, Linear, Weights};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

/// Sinusoidal timestep embedding as diffusers computes it (`flip_sin_to_cos`, shift 0), in f32: `[cos | sin]`.
pub fn timestep_embedding(timesteps: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let t = timesteps.to_dtype(DType::F32)?;
    let exponent: Vec<f32> = (0..half).map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32).collect();
    let freqs = Tensor::from_vec(exponent, (1, half), t.device())?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Ok(Tensor::cat(&[args.cos()?, args.sin()?], 1)?)
}

/// SDXL's added conditioning vector `[B, pooled + 6·dim]`: the pooled text embedding followed by the sinusoidal
/// embeddings of `time_ids` `[B, 6]` (original height, width, crop top, left, target height, width), as diffusers'
/// `add_time_proj` and sd-scripts' `get_size_embeddings` compute them.
pub fn sdxl_vector(pooled: &Tensor, time_ids: &Tensor, dim: usize) -> Result<Tensor> {
    let (b, n) = time_ids.dims2()?;
    let sizes = timestep_embedding(&time_ids.flatten_all()?, dim)?.reshape((b, n * dim))?;
    Ok(Tensor::cat(&[&pooled.to_dtype(DType::F32)?, &sizes], 1)?)
}

struct Level {
    resnets: Vec<Checkpointed<ResnetBlock2D>>,
    attentions: Vec<Checkpointed<SpatialTransformer>>,
}

impl Level {
    fn new(w: &Weights, n: usize, attn: bool, heads: usize, groups: usize, eps: f64) -> Result<Self> {
        let resnets = (0..n)
            .map(|j| Checkpointed::new(&w.pp("resnets").pp(j), |w| ResnetBlock2D::new(w, groups, eps)))
            .collect::<Result<_>>()?;
        let attentions = if attn {
            (0..n)
                .map(|j| Checkpointed::new(&w.pp("attentions").pp(j), |w| SpatialTransformer::new(w, heads, groups)))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        Ok(Self { resnets, attentions })
    }
}

/// The denoising UNet.
pub struct UNet {
    pub cfg: UNetConfig,
    conv_in: Conv2d,
    time_1: Linear,
    time_2: Linear,
    /// SDXL: the added-conditioning MLP (`add_embedding.linear_1`, `linear_2`).
    add_embedding: Option<(Linear, Linear)>,
    down: Vec<(Level, Option<Downsample2D>)>,
    mid_res0: Checkpointed<ResnetBlock2D>,
    mid_attn: Checkpointed<SpatialTransformer>,
    mid_res1: Checkpointed<ResnetBlock2D>,
    up: Vec<(Level, Option<Upsample2D>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Gradient checkpointing of every resnet and transformer block while training.
    checkpointing: AtomicBool,
}

impl UNet {
    pub fn new(w: &Weights, cfg: UNetConfig) -> Result<Self> {
        let levels = cfg.block_out_channels.len();
        let (g, eps, n) = (cfg.hyper.groups, cfg.hyper.eps, cfg.layers_per_block);
        let mut down = Vec::new();
        for i in 0..levels {
            let bw = w.pp("down_blocks").pp(i);
            let level = Level::new(&bw, n, cfg.down_attn[i], cfg.heads(i), g, eps)?;
            let ds = if i + 1 < levels { Some(Downsample2D::new(&bw.pp("downsamplers.0"), false)?) } else { None };
            down.push((level, ds));
        }
        let mut up = Vec::new();
        for i in 0..levels {
            let bw = w.pp("up_blocks").pp(i);
            let level = Level::new(&bw, n + 1, cfg.up_attn[i], cfg.heads(levels - 1 - i), g, eps)?;
            let us = if i + 1 < levels { Some(Upsample2D::new(&bw.pp("upsamplers.0"))?) } else { None };
            up.push((level, us));
        }
        let mid = w.pp("mid_block");
        Ok(Self {
            conv_in: Conv2d::new(&w.pp("conv_in"), 1, 1)?,
            time_1: Linear::new(&w.pp("time_embedding.linear_1"))?,
            time_2: Linear::new(&w.pp("time_embedding.linear_2"))?,
            add_embedding: match cfg.adm_in {
                Some(_) => {
                    Some((Linear::new(&w.pp("add_embedding.linear_1"))?, Linear::new(&w.pp("add_embedding.linear_2"))?))
                }
                None => None,
            },
            down,
            mid_res0: Checkpointed::new(&mid.pp("resnets.0"), |w| ResnetBlock2D::new(w, g, eps))?,
            mid_attn: Checkpointed::new(&mid.pp("attentions.0"), |w| {
                SpatialTransformer::new(w, cfg.heads(levels - 1), g)
            })?,
            mid_res1: Checkpointed::new(&mid.pp("resnets.1"), |w| ResnetBlock2D::new(w, g, eps))?,
            up,
            norm_out: GroupNorm::new(&w.pp("conv_norm_out"), g, eps)?,
            conv_out: Conv2d::new(&w.pp("conv_out"), 1, 1)?,
            cfg,
            checkpointing: AtomicBool::new(false),
        })
    }

    /// Turns gradient checkpointing on or off: with it, training keeps only each block's input and output, and
    /// the backward computes the blocks again (less memory, about one more forward of time).
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.checkpointing.store(on, Ordering::Relaxed);
    }

    fn resnet(&self, r: &Checkpointed<ResnetBlock2D>, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let on = self.checkpointing.load(Ordering::Relaxed);
        r.run(on, "resnet block (recomputed)", x, Some(temb), |b, x, t| b.forward(x, t))
    }

    fn transformer(&self, a: &Checkpointed<SpatialTransformer>, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let on = self.checkpointing.load(Ordering::Relaxed);
        a.run(on, "transformer block (recomputed)", x, Some(context), |b, x, c| {
            b.forward(x, c.context("a transformer block takes the text context")?)
        })
    }

    /// Predicts noise (or v) for `sample` `[B, C, H, W]` at `timesteps` (`[B]`, `[1]` or scalar) given `context`
    /// `[B, S, D]` and, for SDXL, the added conditioning vector `y` `[B, adm_in]` (`sdxl_vector`).
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        let (b, c, h, wd) = sample.dims4()?;
        if c != self.cfg.in_channels {
            bail!("unet: sample has {c} channels, the model takes {}", self.cfg.in_channels);
        }
        let (cb, _, cd) = context.dims3()?;
        if cd != self.cfg.cross_attention_dim {
            bail!("unet: context width is {cd}, the model's cross-attention takes {}", self.cfg.cross_attention_dim);
        }
        if cb != b {
            bail!("unet: context batch {cb} does not match sample batch {b}");
        }
        if h % 8 != 0 || wd % 8 != 0 {
            log_once_odd_size(h, wd);
        }
        let t = match timesteps.rank() {
            0 => timesteps.reshape(1)?.broadcast_as(b)?.contiguous()?,
            1 if timesteps.dim(0)? == 1 && b > 1 => timesteps.broadcast_as(b)?.contiguous()?,
            1 if timesteps.dim(0)? == b => timesteps.clone(),
            _ => bail!("unet: timesteps have shape {:?}, expected [{b}] or a scalar", timesteps.dims()),
        };
        let dtype = sample.dtype();
        let temb = timestep_embedding(&t, self.time_1.weight().dims()[1])?.to_dtype(dtype)?;
        let temb = self.time_2.forward(&self.time_1.forward(&temb)?.silu()?)?;
        let temb = match (&self.add_embedding, y) {
            (Some((l1, l2)), Some(y)) => {
                let adm = self.cfg.adm_in.unwrap_or(0);
                if y.dims() != [b, adm] {
                    bail!("unet: the SDXL conditioning vector has shape {:?}, expected [{b}, {adm}]", y.dims());
                }
                (temb + l2.forward(&l1.forward(&y.to_dtype(dtype)?)?.silu()?)?)?
            }
            (Some(_), None) => bail!(
                "unet: this SDXL UNet needs the conditioning vector (pooled text embedding and image sizes) besides the context"
            ),
            (None, Some(_)) => bail!("unet: a conditioning vector was given, but this UNet (SD 1.x/2.x) takes none"),
            (None, None) => temb,
        };

        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        for (level, ds) in &self.down {
            for (j, res) in level.resnets.iter().enumerate() {
                x = self.resnet(res, &x, &temb)?;
                if let Some(attn) = level.attentions.get(j) {
                    x = self.transformer(attn, &x, context)?;
                }
                skips.push(x.clone());
            }
            if let Some(ds) = ds {
                x = ds.forward(&x)?;
                skips.push(x.clone());
            }
        }
        x = self.resnet(&self.mid_res0, &x, &temb)?;
        x = self.transformer(&self.mid_attn, &x, context)?;
        x = self.resnet(&self.mid_res1, &x, &temb)?;
        for (level, us) in &self.up {
            for (j, res) in level.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet");
                x = self.resnet(res, &Tensor::cat(&[&x, &skip], 1)?, &temb)?;
                if let Some(attn) = level.attentions.get(j) {
                    x = self.transformer(attn, &x, context)?;
                }
            }
            if let Some(us) = us {
                let size = skips.last().map(|s| (s.dims()[2], s.dims()[3]));
                x = us.forward(&x, size)?;
            }
        }
        let x = self.norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

fn log_once_odd_size(h: usize, w: usize) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        eprintln!("warning: latent size {h}x{w} is not a multiple of 8; upsampling follows the skip sizes")
    });
}
