//! `AutoencoderKL` encoder and decoder in diffusers' layout.

use super::unet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::nn::{attention, Conv2d, GroupNorm, Linear, Weights};
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde_json::{json, Value};

/// VAE configuration: sizes from the weights, `groups` and `scaling_factor` from a config or family defaults.
#[derive(Clone, Debug)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub groups: usize,
    pub scaling_factor: f64,
    pub sample_size: usize,
}

impl VaeConfig {
    /// Reads sizes from diffusers-named VAE weights.
    pub fn infer(w: &Weights, groups: usize, scaling_factor: f64, sample_size: usize) -> Result<Self> {
        let levels = w.count("encoder.down_blocks");
        if levels == 0 {
            bail!("VAE has no `encoder.down_blocks.*` tensors");
        }
        let block_out_channels = (0..levels)
            .map(|i| Ok(w.get(&format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"))?.dims()[0]))
            .collect::<Result<Vec<_>>>()?;
        for &c in &block_out_channels {
            if c % groups != 0 {
                bail!("VAE width {c} is not divisible by norm_num_groups {groups}");
            }
        }
        Ok(Self {
            in_channels: w.get("encoder.conv_in.weight")?.dims()[1],
            latent_channels: w.get("post_quant_conv.weight")?.dims()[0],
            layers_per_block: w.count("encoder.down_blocks.0.resnets"),
            block_out_channels,
            groups,
            scaling_factor,
            sample_size,
        })
    }

    /// The diffusers `config.json` for this VAE.
    pub fn to_diffusers_json(&self) -> Value {
        let n = self.block_out_channels.len();
        json!({
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.39.0",
            "act_fn": "silu",
            "block_out_channels": self.block_out_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "in_channels": self.in_channels,
            "latent_channels": self.latent_channels,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.groups,
            "out_channels": self.in_channels,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "up_block_types": vec!["UpDecoderBlock2D"; n]
        })
    }
}

/// The single-head self-attention in the VAE's mid block.
struct VaeAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl VaeAttention {
    fn new(w: &Weights, groups: usize) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(&w.pp("group_norm"), groups, 1e-6)?,
            q: Linear::new(&w.pp("to_q"))?,
            k: Linear::new(&w.pp("to_k"))?,
            v: Linear::new(&w.pp("to_v"))?,
            out: Linear::new(&w.pp("to_out.0"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, wd) = x.dims4()?;
        let t = self.norm.forward(x)?.reshape((b, c, h * wd))?.transpose(1, 2)?.contiguous()?;
        let a = attention(&self.q.forward(&t)?, &self.k.forward(&t)?, &self.v.forward(&t)?, 1, false)?;
        let o = self.out.forward(&a)?.transpose(1, 2)?.reshape((b, c, h, wd))?;
        Ok((o + x)?)
    }
}

struct MidBlock {
    res0: ResnetBlock2D,
    attn: VaeAttention,
    res1: ResnetBlock2D,
}

impl MidBlock {
    fn new(w: &Weights, groups: usize) -> Result<Self> {
        Ok(Self {
            res0: ResnetBlock2D::new(&w.pp("resnets.0"), groups, 1e-6)?,
            attn: VaeAttention::new(&w.pp("attentions.0"), groups)?,
            res1: ResnetBlock2D::new(&w.pp("resnets.1"), groups, 1e-6)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.res0.forward(x, None)?;
        let x = self.attn.forward(&x)?;
        self.res1.forward(&x, None)
    }
}

/// The posterior of an encoded image: mean and log-variance (clamped to [-30, 20]), plus the raw moments.
pub struct Posterior {
    pub moments: Tensor,
    pub mean: Tensor,
    pub logvar: Tensor,
}

/// Encoder and decoder of `AutoencoderKL`.
pub struct Vae {
    pub cfg: VaeConfig,
    enc_conv_in: Conv2d,
    enc_down: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    enc_mid: MidBlock,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv2d,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    dec_conv_in: Conv2d,
    dec_mid: MidBlock,
    dec_up: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
}

impl Vae {
    pub fn new(w: &Weights, cfg: VaeConfig) -> Result<Self> {
        let (g, n, levels) = (cfg.groups, cfg.layers_per_block, cfg.block_out_channels.len());
        let enc = w.pp("encoder");
        let dec = w.pp("decoder");
        let resnets = |bw: &Weights, count: usize| -> Result<Vec<ResnetBlock2D>> {
            (0..count).map(|j| ResnetBlock2D::new(&bw.pp("resnets").pp(j), g, 1e-6)).collect()
        };
        let mut enc_down = Vec::new();
        for i in 0..levels {
            let bw = enc.pp("down_blocks").pp(i);
            let ds = if i + 1 < levels { Some(Downsample2D::new(&bw.pp("downsamplers.0"), true)?) } else { None };
            enc_down.push((resnets(&bw, n)?, ds));
        }
        let mut dec_up = Vec::new();
        for i in 0..levels {
            let bw = dec.pp("up_blocks").pp(i);
            let us = if i + 1 < levels { Some(Upsample2D::new(&bw.pp("upsamplers.0"))?) } else { None };
            dec_up.push((resnets(&bw, n + 1)?, us));
        }
        Ok(Self {
            enc_conv_in: Conv2d::new(&enc.pp("conv_in"), 1, 1)?,
            enc_down,
            enc_mid: MidBlock::new(&enc.pp("mid_block"), g)?,
            enc_norm_out: GroupNorm::new(&enc.pp("conv_norm_out"), g, 1e-6)?,
            enc_conv_out: Conv2d::new(&enc.pp("conv_out"), 1, 1)?,
            quant_conv: Conv2d::new(&w.pp("quant_conv"), 1, 0)?,
            post_quant_conv: Conv2d::new(&w.pp("post_quant_conv"), 1, 0)?,
            dec_conv_in: Conv2d::new(&dec.pp("conv_in"), 1, 1)?,
            dec_mid: MidBlock::new(&dec.pp("mid_block"), g)?,
            dec_up,
            dec_norm_out: GroupNorm::new(&dec.pp("conv_norm_out"), g, 1e-6)?,
            dec_conv_out: Conv2d::new(&dec.pp("conv_out"), 1, 1)?,
            cfg,
        })
    }

    /// Encodes an image `[B, 3, H, W]` in [-1, 1] to its posterior.
    pub fn encode(&self, image: &Tensor) -> Result<Posterior> {
        let (_, c, _, _) = image.dims4()?;
        if c != self.cfg.in_channels {
            bail!("vae_encode: image has {c} channels, expected {}", self.cfg.in_channels);
        }
        let mut x = self.enc_conv_in.forward(image)?;
        for (res, ds) in &self.enc_down {
            for r in res {
                x = r.forward(&x, None)?;
            }
            if let Some(ds) = ds {
                x = ds.forward(&x)?;
            }
        }
        let x = self.enc_mid.forward(&x)?;
        let x = self.enc_conv_out.forward(&self.enc_norm_out.forward_silu(&x)?)?;
        let moments = self.quant_conv.forward(&x)?;
        let l = self.cfg.latent_channels;
        let mean = moments.narrow(1, 0, l)?;
        let logvar = moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        Ok(Posterior { moments, mean, logvar })
    }

    /// Decodes raw latents `[B, C, h, w]` (no scaling applied) to an image in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = latents.dims4()?;
        if c != self.cfg.latent_channels {
            bail!("vae_decode: latents have {c} channels, expected {}", self.cfg.latent_channels);
        }
        let x = self.post_quant_conv.forward(latents)?;
        let mut x = self.dec_mid.forward(&self.dec_conv_in.forward(&x)?)?;
        for (res, us) in &self.dec_up {
            for r in res {
                x = r.forward(&x, None)?;
            }
            if let Some(us) = us {
                x = us.forward(&x, None)?;
            }
        }
        self.dec_conv_out.forward(&self.dec_norm_out.forward_silu(&x)?)
    }
}
