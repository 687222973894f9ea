//! LyCORIS networks as sd-scripts trains them through `network_module = lycoris.kohya` (kohya_ss' LyCORIS/LoCon,
//! LyCORIS/LoHa and LyCORIS/LoKr types): the presets' target layers, the ranks per layer, LoKr's factorization and
//! the initial factors, following LyCORIS 3.2 (`lycoris/kohya.py`, `modules/{locon,loha,lokr}.py`).

use super::module::{Factors, Half};
use super::{Component, NetworkConfig};
use crate::nn::adapter::{LayerInfo, LayerKind};
use crate::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};

/// The LyCORIS algorithm (`algo=` in `network_args`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    Locon,
    Loha,
    Lokr,
}

impl Algo {
    pub fn name(self) -> &'static str {
        match self {
            Algo::Locon => "locon",
            Algo::Loha => "loha",
            Algo::Lokr => "lokr",
        }
    }
}

/// A LyCORIS preset: which layers get modules. UNet module classes and the text encoder's are path fragments of
/// our diffusers-named layers (`Transformer2DModel` = `.attentions.`, `ResnetBlock2D` = `.resnets.`, sd-scripts'
/// `CrossAttention` = `.attn1.`/`.attn2.`, `CLIPAttention` = `.self_attn.`, `CLIPMLP` = `.mlp.`).
#[derive(Debug, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    /// Whether k×k convolutions get modules (at `conv_dim`).
    pub enable_conv: bool,
    pub unet: &'static [&'static str],
    /// Whole layer names (sd-scripts' SD 1.x/2.x UNet only: its SDXL UNet names these layers differently).
    pub unet_names: &'static [&'static str],
    pub text_encoder: &'static [&'static str],
}

const ATTN: &str = ".attentions.";
const RES: &str = ".resnets.";
const DOWN: &str = ".downsamplers.";
const UP: &str = ".upsamplers.";
const TE_ATTN: &str = ".self_attn.";
const TE_MLP: &str = ".mlp.";
const EDGES: &[&str] = &["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"];

/// LyCORIS' built-in presets.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "full",
        enable_conv: true,
        unet: &[ATTN, RES, DOWN, UP],
        unet_names: EDGES,
        text_encoder: &[TE_ATTN, TE_MLP],
    },
    Preset {
        name: "full-lin",
        enable_conv: false,
        unet: &[ATTN, RES],
        unet_names: &["time_embedding.linear_1", "time_embedding.linear_2"],
        text_encoder: &[TE_ATTN, TE_MLP],
    },
    Preset { name: "attn-mlp", enable_conv: false, unet: &[ATTN], unet_names: &[], text_encoder: &[TE_ATTN, TE_MLP] },
    Preset {
        name: "attn-only",
        enable_conv: false,
        unet: &[".attn1.", ".attn2."],
        unet_names: &[],
        text_encoder: &[TE_ATTN],
    },
    Preset { name: "unet-only", enable_conv: true, unet: &[ATTN, RES, DOWN, UP], unet_names: EDGES, text_encoder: &[] },
    Preset { name: "unet-transformer-only", enable_conv: false, unet: &[ATTN], unet_names: &[], text_encoder: &[] },
    Preset {
        name: "unet-convblock-only",
        enable_conv: true,
        unet: &[RES, DOWN, UP],
        unet_names: &["conv_in", "conv_out"],
        text_encoder: &[],
    },
];

/// The LyCORIS options of a network.
#[derive(Clone, Debug, PartialEq)]
pub struct LycorisConfig {
    pub algo: Algo,
    pub preset: &'static Preset,
    /// LoKr's `factor` (-1: the most balanced split).
    pub factor: i64,
    /// LoKr's `decompose_both`: the smaller side low-rank too.
    pub decompose_both: bool,
    /// `use_tucker` (`use_cp`): LoCon's and LoHa's k×k convolutions Tucker-decomposed.
    pub tucker: bool,
    /// DoRA (`dora_wd`): Some(true) decomposes per output row (`wd_on_output`, the default), Some(false) per input.
    pub dora: Option<bool>,
    /// The `network_args` as given, for `ss_network_args`.
    pub args: Vec<(String, String)>,
}

impl LycorisConfig {
    /// A preset by name.
    pub fn preset(name: &str) -> Result<&'static Preset> {
        match PRESETS.iter().find(|p| p.name == name) {
            Some(p) => Ok(p),
            None => bail!(
                "LyCORIS preset `{name}` is not known (custom preset files are not supported); available: {}",
                PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

/// The rank and alpha LyCORIS gives a layer under `cfg`, or None when the preset leaves it alone. Unset
/// `conv_dim`/`conv_alpha` take `network_dim`/`network_alpha`, as `lycoris.kohya` does.
pub fn rank_for(
    c: Component,
    layer: &LayerInfo,
    cfg: &NetworkConfig,
    ly: &LycorisConfig,
    sdxl: bool,
) -> Option<(usize, f64)> {
    let p = ly.preset;
    let n = layer.name.as_str();
    let targeted = match c {
        Component::Unet => p.unet.iter().any(|f| n.contains(f)) || (!sdxl && p.unet_names.contains(&n)),
        Component::TextEncoder => p.text_encoder.iter().any(|f| n.contains(f)),
    };
    if !targeted {
        return None;
    }
    let (dim, alpha) = match &layer.kind {
        LayerKind::Linear { .. } | LayerKind::Conv { kernel: (1, 1), .. } => (cfg.dim, cfg.alpha),
        LayerKind::Conv { .. } if p.enable_conv => {
            let alpha = cfg.conv_alpha.filter(|a| *a != 0.0).unwrap_or(cfg.alpha);
            (cfg.conv_dim.unwrap_or(cfg.dim), alpha)
        }
        LayerKind::Conv { .. } => return None,
    };
    (dim > 0).then_some((dim, alpha))
}

/// DoRA's initial magnitude: the norms of the layer's weight `w` per output row ([out, 1, …]) or per input column
/// ([1, in, …]), in f32, as a trainable variable in `dtype`.
pub fn dora_scale(w: &Tensor, on_output: bool, dtype: DType) -> Result<Var> {
    let norms = super::module::axis_norms(&w.to_dtype(DType::F32)?, on_output)?;
    Ok(Var::from_tensor(&norms.to_dtype(dtype)?)?)
}

/// LyCORIS' `factorization`: `dimension = m · n` with m ≤ n, m the divisor nearest `factor` (−1: nearest √dim).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension % factor as usize == 0 {
        let (m, n) = (factor as usize, dimension / factor as usize);
        return if m > n { (n, m) } else { (m, n) };
    }
    let factor = if factor < 0 { dimension } else { factor as usize };
    let (mut m, mut n) = (1, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while dimension % new_m != 0 {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n {
        (n, m)
    } else {
        (m, n)
    }
}

/// Initial factors for a layer at rank `r` (and the alpha stored: LoKr of two whole matrices uses alpha = r,
/// i.e. scale 1), drawn from `rng`, as LyCORIS initializes them: ΔW starts at zero.
pub fn init(
    kind: &LayerKind,
    ly: &LycorisConfig,
    r: usize,
    alpha: f64,
    rng: &mut Rng,
    dtype: DType,
    dev: &Device,
) -> Result<(Factors, f64)> {
    let (out, inp, k) = match kind {
        LayerKind::Linear { in_features, out_features } => (*out_features, *in_features, None),
        LayerKind::Conv { in_channels, out_channels, kernel, .. } => (*out_channels, *in_channels, Some(*kernel)),
    };
    let kk = k.map_or(1, |(a, b)| a * b);
    let var = |v: Vec<f32>, shape: &[usize]| -> Result<Var> {
        Ok(Var::from_tensor(&Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)?)?)
    };
    let normal = |rng: &mut Rng, shape: &[usize], std: f32| -> Result<Var> {
        var(rng.normal_vec(shape.iter().product()).into_iter().map(|x| x * std).collect(), shape)
    };
    let zeros = |shape: &[usize]| var(vec![0.0; shape.iter().product()], shape);
    // kaiming_uniform_(a=√5) of a [rows, fan_in, ...] tensor: U(±1/√fan_in)
    let kaiming = |rng: &mut Rng, shape: &[usize]| -> Result<Var> {
        let fan_in: usize = shape[1..].iter().product();
        let bound = 1.0 / (fan_in as f64).sqrt();
        var((0..shape.iter().product()).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect(), shape)
    };
    let alpha = if alpha == 0.0 { r as f64 } else { alpha };
    // Tucker decomposition applies to k×k convolutions only
    let tucker = ly.tucker.then_some(k).flatten().filter(|k| *k != (1, 1));
    Ok(match ly.algo {
        Algo::Locon => {
            let factors = match (k, tucker) {
                (None, _) => Factors::Lora { down: kaiming(rng, &[r, inp])?, up: zeros(&[out, r])?, mid: None },
                (Some((kh, kw)), None) => {
                    Factors::Lora { down: kaiming(rng, &[r, inp, kh, kw])?, up: zeros(&[out, r, 1, 1])?, mid: None }
                }
                (Some(_), Some((kh, kw))) => Factors::Lora {
                    down: kaiming(rng, &[r, inp, 1, 1])?,
                    up: zeros(&[out, r, 1, 1])?,
                    mid: Some(kaiming(rng, &[r, r, kh, kw])?),
                },
            };
            (factors, alpha)
        }
        Algo::Loha => match tucker {
            None => {
                let cols = inp * kk;
                let w1b = normal(rng, &[r, cols], 1.0)?;
                let w1a = normal(rng, &[out, r], 0.1)?;
                let w2b = normal(rng, &[r, cols], 1.0)?;
                let w2a = zeros(&[out, r])?;
                (Factors::Loha { w1a, w1b, w2a, w2b, t: None }, alpha)
            }
            Some((kh, kw)) => {
                let t1 = normal(rng, &[r, r, kh, kw], 0.1)?;
                let t2 = normal(rng, &[r, r, kh, kw], 0.1)?;
                let w1b = normal(rng, &[r, inp], 1.0)?;
                let w1a = normal(rng, &[r, out], 0.1)?;
                let w2b = normal(rng, &[r, inp], 1.0)?;
                let w2a = zeros(&[r, out])?;
                (Factors::Loha { w1a, w1b, w2a, w2b, t: Some((t1, t2)) }, alpha)
            }
        },
        Algo::Lokr => {
            let (a, b) = factorization(out, ly.factor);
            let (c, d) = factorization(inp, ly.factor);
            let w2 = if 2 * r >= b.max(d) {
                let mut shape = vec![b, d];
                if let Some((kh, kw)) = k {
                    shape.extend([kh, kw]);
                }
                Half::Full(zeros(&shape)?)
            } else {
                Half::LowRank(kaiming(rng, &[b, r])?, zeros(&[r, d * kk])?)
            };
            let w1 = if ly.decompose_both && 2 * r < a.max(c) {
                Half::LowRank(kaiming(rng, &[a, r])?, kaiming(rng, &[r, c])?)
            } else {
                Half::Full(kaiming(rng, &[a, c])?)
            };
            let alpha = if matches!((&w1, &w2), (Half::Full(_), Half::Full(_))) { r as f64 } else { alpha };
            (Factors::Lokr { w1, w2 }, alpha)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factorization_follows_lycoris_table() {
        // (dimension, factor) → (m, n) as lycoris-lora 3.2.0.post2's `factorization` returns them (its docstring's
        // table is out of date for 360: the code gives (18, 20) and (15, 24))
        for (dim, factor, want) in [
            (127, -1, (1, 127)),
            (128, -1, (8, 16)),
            (128, 2, (2, 64)),
            (128, 4, (4, 32)),
            (250, -1, (10, 25)),
            (250, 4, (2, 125)),
            (250, 8, (5, 50)),
            (360, -1, (18, 20)),
            (360, 16, (15, 24)),
            (512, -1, (16, 32)),
            (1024, -1, (32, 32)),
            (1024, 16, (16, 64)),
        ] {
            assert_eq!(factorization(dim, factor), want, "factorization({dim}, {factor})");
        }
    }
}
