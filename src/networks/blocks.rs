//! Block-wise network options of sd-scripts for SD1/SD2 (`block_dims`, `block_alphas`, `conv_block_dims`,
//! `conv_block_alphas`, `down_lr_weight`, `mid_lr_weight`, `up_lr_weight`, `block_lr_zero_threshold`).

use anyhow::{bail, Context, Result};

/// Down/up blocks per side (sd-scripts' `NUM_OF_BLOCKS`); 25 slots = 12 down + mid + 12 up.
pub const NUM_OF_BLOCKS: usize = 12;

/// sd-scripts' `get_block_index` on a kohya module name: down `1 + 3i + j` (samplers `1 + 3i + 2`), mid 12, up
/// `13 + 3i + j`; None for modules outside the UNet's blocks (text encoder, time embedding, conv_in/out).
pub fn block_index(lora_name: &str) -> Option<usize> {
    for (side, base) in [("down_blocks_", 1usize), ("up_blocks_", NUM_OF_BLOCKS + 1)] {
        if let Some(pos) = lora_name.find(side) {
            let rest = &lora_name[pos + side.len()..];
            let mut parts = rest.split('_');
            let i: usize = parts.next()?.parse().ok()?;
            let kind = parts.next()?;
            let j: usize = parts.next()?.parse().ok()?;
            let idx = match kind {
                "resnets" | "attentions" => 3 * i + j,
                "upsamplers" | "downsamplers" => 3 * i + 2,
                _ => return None,
            };
            return Some(base + idx);
        }
    }
    lora_name.contains("mid_block_").then_some(NUM_OF_BLOCKS)
}

/// Block LR weights: 12 down, mid, 12 up.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockLr {
    pub down: Vec<f64>,
    pub mid: f64,
    pub up: Vec<f64>,
}

impl BlockLr {
    /// The weight of block `idx` (None: not a block, weight 1).
    pub fn weight(&self, idx: Option<usize>) -> f64 {
        match idx {
            None => 1.0,
            Some(i) if i < NUM_OF_BLOCKS => self.down[i],
            Some(i) if i == NUM_OF_BLOCKS => self.mid,
            Some(i) => self.up[i - NUM_OF_BLOCKS - 1],
        }
    }
}

/// `down_lr_weight` / `up_lr_weight`: 12 comma values (shorter: padded with 1.0, longer: truncated) or a preset
/// `cosine|sine|linear|reverse_linear|zeros` with optional `+base`.
pub fn parse_lr_weights(s: &str) -> Result<Vec<f64>> {
    let n = NUM_OF_BLOCKS;
    let (name, base) = match s.split_once('+') {
        Some((a, b)) => {
            (a.trim(), b.trim().parse::<f64>().with_context(|| format!("lr weight preset {s:?}: bad +base"))?)
        }
        None => (s.trim(), 0.0),
    };
    let t = |i: usize| i as f64 / (n - 1) as f64;
    let half_pi = std::f64::consts::FRAC_PI_2;
    let v: Vec<f64> = match name {
        "cosine" => (0..n).rev().map(|i| (half_pi * t(i)).sin() + base).collect(),
        "sine" => (0..n).map(|i| (half_pi * t(i)).sin() + base).collect(),
        "linear" => (0..n).map(|i| t(i) + base).collect(),
        "reverse_linear" => (0..n).rev().map(|i| t(i) + base).collect(),
        "zeros" => vec![base; n],
        _ => {
            let mut v: Vec<f64> = s
                .split(',')
                .map(|x| x.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .map_err(|_| anyhow::anyhow!("lr weights {s:?}: expected 12 comma-separated numbers or cosine|sine|linear|reverse_linear|zeros[+base]"))?;
            v.resize(n, 1.0);
            v
        }
    };
    Ok(v)
}

/// 25 comma values (`block_dims` & co.).
pub fn parse_block_values<T: std::str::FromStr>(key: &str, s: &str) -> Result<Vec<T>> {
    let v: Vec<T> = s
        .split(',')
        .map(|x| x.trim().parse::<T>())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("{key}: {s:?} is not a list of numbers"))?;
    if v.len() != 2 * NUM_OF_BLOCKS + 1 {
        bail!("{key}: expected {} comma-separated values, got {}", 2 * NUM_OF_BLOCKS + 1, v.len());
    }
    Ok(v)
}

/// Block-wise settings of a network.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockConfig {
    pub dims: Option<Vec<usize>>,
    pub alphas: Option<Vec<f64>>,
    pub conv_dims: Option<Vec<usize>>,
    pub conv_alphas: Option<Vec<f64>>,
    pub lr: Option<BlockLr>,
    /// The block options as the user wrote them (`block_dims`, ..., `block_lr_zero_threshold`), for
    /// `ss_network_args`.
    pub given: Vec<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_indices_follow_sd_scripts() {
        assert_eq!(block_index("lora_unet_down_blocks_0_attentions_0_proj_in"), Some(1));
        assert_eq!(block_index("lora_unet_down_blocks_1_resnets_1_conv1"), Some(5));
        assert_eq!(block_index("lora_unet_down_blocks_2_downsamplers_0_conv"), Some(9));
        assert_eq!(block_index("lora_unet_mid_block_attentions_0_proj_in"), Some(12));
        assert_eq!(block_index("lora_unet_up_blocks_0_resnets_2_conv1"), Some(15));
        assert_eq!(block_index("lora_unet_up_blocks_3_attentions_2_proj_out"), Some(24));
        assert_eq!(block_index("lora_unet_up_blocks_1_upsamplers_0_conv"), Some(18));
        assert_eq!(block_index("lora_te_text_model_encoder_layers_0_mlp_fc1"), None);
    }

    #[test]
    fn lr_weight_presets() {
        let s = parse_lr_weights("sine").unwrap();
        assert_eq!(s.len(), 12);
        assert!(s[0].abs() < 1e-12 && (s[11] - 1.0).abs() < 1e-12);
        assert!((s[4] - (std::f64::consts::FRAC_PI_2 * 4.0 / 11.0).sin()).abs() < 1e-12);
        let c = parse_lr_weights("cosine").unwrap();
        assert!((c[0] - 1.0).abs() < 1e-12 && c[11].abs() < 1e-12);
        assert_eq!(parse_lr_weights("zeros+0.5").unwrap(), vec![0.5; 12]);
        let l = parse_lr_weights("linear").unwrap();
        assert!((l[11] - 1.0).abs() < 1e-12 && l[0] == 0.0);
        assert_eq!(parse_lr_weights("0.5,0.25").unwrap()[..3], [0.5, 0.25, 1.0]);
        assert!(parse_block_values::<usize>("block_dims", "1,2").is_err());
    }
}
