//! UNet configuration: sizes read from the weights, the rest from a diffusers config or family defaults.

use crate::nn::Weights;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// How many attention heads each level uses.
#[derive(Clone, Debug, PartialEq)]
pub enum HeadSpec {
    /// Heads per down level (diffusers' `attention_head_dim`, which counts heads).
    Heads(Vec<usize>),
    /// A fixed head width (SD2: 64).
    HeadDim(usize),
}

/// What the weights cannot say: heads, GroupNorm groups, epsilon, and a few flags kept for saving.
#[derive(Clone, Debug)]
pub struct UNetHyper {
    pub heads: HeadSpec,
    pub groups: usize,
    pub eps: f64,
    pub upcast_attention: bool,
    pub sample_size: usize,
    /// SDXL: width of each size/crop number's sinusoidal embedding (diffusers' `addition_time_embed_dim`).
    pub addition_time_embed_dim: Option<usize>,
}

impl UNetHyper {
    /// Reads the non-shape fields from a diffusers `unet/config.json` value.
    pub fn from_diffusers(v: &Value) -> Result<Self> {
        let heads_v = match v.get("num_attention_heads") {
            Some(h) if !h.is_null() => h,
            _ => v
                .get("attention_head_dim")
                .context("unet config has neither num_attention_heads nor attention_head_dim")?,
        };
        let heads = match heads_v {
            Value::Number(n) => {
                HeadSpec::Heads(vec![n.as_u64().context("attention_head_dim must be a positive integer")? as usize])
            }
            Value::Array(a) => HeadSpec::Heads(
                a.iter()
                    .map(|x| x.as_u64().map(|x| x as usize).context("attention_head_dim entries must be integers"))
                    .collect::<Result<_>>()?,
            ),
            other => {
                bail!("unet config: attention_head_dim is {other}, expected an integer or a list")
            }
        };
        Ok(Self {
            heads,
            groups: v.get("norm_num_groups").and_then(Value::as_u64).unwrap_or(32) as usize,
            eps: v.get("norm_eps").and_then(Value::as_f64).unwrap_or(1e-5),
            upcast_attention: v.get("upcast_attention").and_then(Value::as_bool).unwrap_or(false),
            sample_size: v.get("sample_size").and_then(Value::as_u64).unwrap_or(64) as usize,
            addition_time_embed_dim: v.get("addition_time_embed_dim").and_then(Value::as_u64).map(|d| d as usize),
        })
    }
}

/// The UNet's full configuration.
#[derive(Clone, Debug)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    /// Whether each down block has cross-attention (CrossAttnDownBlock2D).
    pub down_attn: Vec<bool>,
    /// Whether each up block has cross-attention (CrossAttnUpBlock2D).
    pub up_attn: Vec<bool>,
    /// Transformer layers per attention, per down level.
    pub transformer_layers: Vec<usize>,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    /// SDXL: width of the added conditioning vector (pooled text embedding + size embeddings), diffusers'
    /// `projection_class_embeddings_input_dim`.
    pub adm_in: Option<usize>,
    pub hyper: UNetHyper,
}

impl UNetConfig {
    /// Reads every size from the diffusers-named UNet weights.
    pub fn infer(w: &Weights, hyper: UNetHyper) -> Result<Self> {
        let levels = w.count("down_blocks");
        if levels == 0 {
            bail!("UNet has no `down_blocks.*` tensors");
        }
        let block_out_channels = (0..levels)
            .map(|i| Ok(w.get(&format!("down_blocks.{i}.resnets.0.conv1.weight"))?.dims()[0]))
            .collect::<Result<Vec<_>>>()?;
        let layers_per_block = w.count("down_blocks.0.resnets");
        let down_attn: Vec<bool> = (0..levels).map(|i| w.has_module(&format!("down_blocks.{i}.attentions"))).collect();
        let up_attn: Vec<bool> = (0..levels).map(|i| w.has_module(&format!("up_blocks.{i}.attentions"))).collect();
        let transformer_layers =
            (0..levels).map(|i| w.count(&format!("down_blocks.{i}.attentions.0.transformer_blocks")).max(1)).collect();
        let first_attn = w.pp("mid_block.attentions.0").pp("transformer_blocks.0.attn2.to_k");
        let cross_attention_dim = first_attn.get("weight")?.dims()[1];
        let use_linear_projection = w.get("mid_block.attentions.0.proj_in.weight")?.rank() == 2;
        let conv_in = w.get("conv_in.weight")?;
        let conv_out = w.get("conv_out.weight")?;
        let adm_in = w.get_opt("add_embedding.linear_1.weight").map(|t| t.dims()[1]);
        if adm_in.is_some() && hyper.addition_time_embed_dim.is_none() {
            bail!("UNet has an added-conditioning embedding (SDXL) but its addition_time_embed_dim is unknown");
        }
        let cfg = Self {
            in_channels: conv_in.dims()[1],
            out_channels: conv_out.dims()[0],
            block_out_channels,
            layers_per_block,
            down_attn,
            up_attn,
            transformer_layers,
            cross_attention_dim,
            use_linear_projection,
            adm_in,
            hyper,
        };
        for &c in &cfg.block_out_channels {
            if c % cfg.hyper.groups != 0 {
                bail!("UNet width {c} is not divisible by norm_num_groups {}", cfg.hyper.groups);
            }
        }
        Ok(cfg)
    }

    /// Heads at down level `i` (the mid block uses the last level, up block `i` the mirrored level).
    pub fn heads(&self, level: usize) -> usize {
        let c = self.block_out_channels[level];
        match &self.hyper.heads {
            HeadSpec::Heads(h) if h.len() == 1 => h[0],
            HeadSpec::Heads(h) => h[level.min(h.len() - 1)],
            HeadSpec::HeadDim(d) => (c / d).max(1),
        }
    }

    /// Heads per level as a list.
    pub fn heads_list(&self) -> Vec<usize> {
        (0..self.block_out_channels.len()).map(|i| self.heads(i)).collect()
    }

    /// The diffusers `config.json` for this UNet.
    pub fn to_diffusers_json(&self) -> Value {
        let heads = self.heads_list();
        let heads_v = if heads.iter().all(|&h| h == heads[0]) { json!(heads[0]) } else { json!(heads) };
        let down: Vec<&str> =
            self.down_attn.iter().map(|&a| if a { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect();
        let up: Vec<&str> = self.up_attn.iter().map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect();
        let tl = &self.transformer_layers;
        let tl_v = if tl.iter().all(|&t| t == tl[0]) { json!(tl[0]) } else { json!(tl) };
        let mut v = json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.39.0",
            "act_fn": "silu",
            "attention_head_dim": heads_v,
            "block_out_channels": self.block_out_channels,
            "center_input_sample": false,
            "cross_attention_dim": self.cross_attention_dim,
            "down_block_types": down,
            "downsample_padding": 1,
            "dual_cross_attention": false,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": self.in_channels,
            "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": 1,
            "norm_eps": self.hyper.eps,
            "norm_num_groups": self.hyper.groups,
            "out_channels": self.out_channels,
            "sample_size": self.hyper.sample_size,
            "transformer_layers_per_block": tl_v,
            "up_block_types": up,
            "upcast_attention": self.hyper.upcast_attention,
            "use_linear_projection": self.use_linear_projection
        });
        if let (Some(adm), Some(d)) = (self.adm_in, self.hyper.addition_time_embed_dim) {
            v["addition_embed_type"] = json!("text_time");
            v["addition_time_embed_dim"] = json!(d);
            v["projection_class_embeddings_input_dim"] = json!(adm);
        }
        v
    }
}
