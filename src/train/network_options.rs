//! A recipe's network options (sd-scripts' `networks.lora` / `networks.lora_fa` arguments and `lycoris.kohya`'s) as
//! a network configuration.

use crate::networks::{module::Dropouts, NetworkConfig};
use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::Value;

/// Network options under sd-scripts' names (`network_dim`, `network_alpha`, `network_args`) or the script
/// contract's (`dim`, `alpha`, `conv_dim`, ...).
#[derive(Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct NetworkOptions {
    #[serde(alias = "network_dim")]
    pub dim: Option<usize>,
    #[serde(alias = "network_alpha")]
    pub alpha: Option<f64>,
    pub conv_dim: Option<usize>,
    pub conv_alpha: Option<f64>,
    #[serde(alias = "network_dropout")]
    pub dropout: Option<f64>,
    pub rank_dropout: Option<f64>,
    pub module_dropout: Option<f64>,
    pub train_unet: Option<bool>,
    pub train_text_encoder: Option<bool>,
    pub seed: Option<u64>,
    pub block_dims: Option<String>,
    pub block_alphas: Option<String>,
    pub conv_block_dims: Option<String>,
    pub conv_block_alphas: Option<String>,
    pub down_lr_weight: Option<String>,
    pub mid_lr_weight: Option<f64>,
    pub up_lr_weight: Option<String>,
    pub block_lr_zero_threshold: Option<f64>,
    /// `networks.lora` (default) or `networks.lora_fa`.
    #[serde(alias = "network_module")]
    pub module: Option<String>,
    /// The trained weights' dtype: f32 (default) or bf16 (`full_bf16`).
    pub dtype: Option<String>,
    /// LoRA+: the up weights' LR ratio (0 or absent: off), and the UNet's and text encoder's own.
    pub loraplus_lr_ratio: Option<f64>,
    pub loraplus_unet_lr_ratio: Option<f64>,
    pub loraplus_text_encoder_lr_ratio: Option<f64>,
    /// LyCORIS (`network_module = lycoris.kohya`; kohya_ss writes Python's `True`/`False` as text): `algo`
    /// (locon, loha, lokr), `preset`, LoKr's `factor` and `decompose_both`, Tucker (`use_tucker`/`use_cp`),
    /// `dora_wd`, `rank_dropout_scale`; the options LyCORIS has beyond these are refused when on.
    pub algo: Option<String>,
    pub preset: Option<String>,
    pub factor: Option<Value>,
    pub decompose_both: Option<Value>,
    pub rank_dropout_scale: Option<Value>,
    pub bypass_mode: Option<Value>,
    pub use_tucker: Option<Value>,
    pub use_cp: Option<Value>,
    pub use_conv_cp: Option<Value>,
    pub disable_conv_cp: Option<Value>,
    pub use_scalar: Option<Value>,
    pub dora_wd: Option<Value>,
    pub train_norm: Option<Value>,
    pub full_matrix: Option<Value>,
    pub rs_lora: Option<Value>,
    pub unbalanced_factorization: Option<Value>,
    /// DoRA's axis: True (default) per output row, False per input column.
    pub wd_on_output: Option<Value>,
    /// Options of other algorithms (DyLoRA, IA3, Diag-OFT), without effect on LoCon, LoHa and LoKr.
    pub block_size: Option<Value>,
    pub train_on_input: Option<Value>,
    pub constraint: Option<Value>,
    pub rescaled: Option<Value>,
}

/// A flag given as a bool, a number or Python's `True`/`False` text.
fn flag(name: &str, v: &Option<Value>) -> Result<bool> {
    Ok(match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "true" | "1" => true,
            "false" | "0" | "none" | "" => false,
            _ => bail!("{name}: expected True or False, got {s:?}"),
        },
        Some(other) => bail!("{name}: expected True or False, got {other}"),
    })
}

/// A `network_args` value as text (what `ss_network_args` records).
fn arg_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        Value::Number(n) if n.is_f64() => crate::io::py::py_float(n.as_f64().unwrap_or(0.0)),
        other => other.to_string(),
    }
}

impl NetworkOptions {
    /// The first LyCORIS option given, if any.
    fn lycoris_given(&self) -> Option<&'static str> {
        let text = [("algo", self.algo.is_some()), ("preset", self.preset.is_some())];
        let values = [
            ("factor", &self.factor),
            ("decompose_both", &self.decompose_both),
            ("rank_dropout_scale", &self.rank_dropout_scale),
            ("bypass_mode", &self.bypass_mode),
            ("use_tucker", &self.use_tucker),
            ("use_cp", &self.use_cp),
            ("use_conv_cp", &self.use_conv_cp),
            ("disable_conv_cp", &self.disable_conv_cp),
            ("use_scalar", &self.use_scalar),
            ("dora_wd", &self.dora_wd),
            ("train_norm", &self.train_norm),
            ("full_matrix", &self.full_matrix),
            ("rs_lora", &self.rs_lora),
            ("unbalanced_factorization", &self.unbalanced_factorization),
            ("wd_on_output", &self.wd_on_output),
            ("block_size", &self.block_size),
            ("train_on_input", &self.train_on_input),
            ("constraint", &self.constraint),
            ("rescaled", &self.rescaled),
        ];
        text.into_iter()
            .find(|(_, given)| *given)
            .map(|(k, _)| k)
            .or_else(|| values.into_iter().find(|(_, v)| v.as_ref().is_some_and(|v| !v.is_null())).map(|(k, _)| k))
    }

    /// The LyCORIS configuration when the module is `lycoris.kohya`.
    fn lycoris(&self) -> Result<crate::networks::lycoris::LycorisConfig> {
        use crate::networks::lycoris::{Algo, LycorisConfig};
        let l = self;
        let algo = match l.algo.as_deref().map(|a| a.trim_matches('"').to_ascii_lowercase()).as_deref() {
            None | Some("lora" | "locon") => Algo::Locon,
            Some("loha") => Algo::Loha,
            Some("lokr") => Algo::Lokr,
            Some(a) => bail!("LyCORIS algo `{a}` is not supported yet (locon, loha and lokr are)"),
        };
        for (name, v, what) in [
            ("use_scalar", &l.use_scalar, "the trained scalar"),
            ("train_norm", &l.train_norm, "training norm layers"),
            ("full_matrix", &l.full_matrix, "LoKr's full-matrix mode"),
            ("rs_lora", &l.rs_lora, "rank-stabilized scaling"),
            ("unbalanced_factorization", &l.unbalanced_factorization, "LoKr's unbalanced factorization"),
        ] {
            if flag(name, v)? {
                bail!("LyCORIS {name}=True ({what}) is not supported yet; set it to False");
            }
        }
        // lycoris.kohya: Tucker when any of these asks for it (disable_conv_cp=False included)
        let tucker = flag("use_tucker", &l.use_tucker)?
            || flag("use_cp", &l.use_cp)?
            || flag("use_conv_cp", &l.use_conv_cp)?
            || (l.disable_conv_cp.is_some() && !flag("disable_conv_cp", &l.disable_conv_cp)?);
        if tucker && algo == Algo::Lokr {
            bail!("LyCORIS LoKr with Tucker decomposition (use_tucker / use_cp) is not supported yet; LoCon and LoHa have it");
        }
        let preset = LycorisConfig::preset(l.preset.as_deref().unwrap_or("full"))?;
        let factor = match &l.factor {
            None | Some(Value::Null) => -1,
            Some(v) => arg_text(v)
                .parse::<f64>()
                .map(|f| f as i64)
                .map_err(|_| anyhow::anyhow!("factor: expected an integer, got {v}"))?,
        };
        let py = crate::io::py::py_float;
        let given: Vec<(&str, Option<String>)> = vec![
            ("preset", l.preset.clone()),
            ("conv_dim", self.conv_dim.map(|d| d.to_string())),
            ("conv_alpha", self.conv_alpha.map(py)),
            ("use_tucker", l.use_tucker.as_ref().map(arg_text)),
            ("rank_dropout", self.rank_dropout.map(py)),
            ("bypass_mode", l.bypass_mode.as_ref().map(arg_text)),
            ("dora_wd", l.dora_wd.as_ref().map(arg_text)),
            ("module_dropout", self.module_dropout.map(py)),
            ("factor", l.factor.as_ref().map(arg_text)),
            ("use_cp", l.use_cp.as_ref().map(arg_text)),
            ("use_scalar", l.use_scalar.as_ref().map(arg_text)),
            ("decompose_both", l.decompose_both.as_ref().map(arg_text)),
            ("rank_dropout_scale", l.rank_dropout_scale.as_ref().map(arg_text)),
            ("algo", l.algo.as_ref().map(|_| algo.name().to_string())),
            ("train_norm", l.train_norm.as_ref().map(arg_text)),
        ];
        Ok(LycorisConfig {
            algo,
            preset,
            factor,
            decompose_both: flag("decompose_both", &l.decompose_both)?,
            tucker,
            dora: flag("dora_wd", &l.dora_wd)?
                .then(|| flag("wd_on_output", &l.wd_on_output).map(|on| on || l.wd_on_output.is_none()))
                .transpose()?,
            args: given.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))).collect(),
        })
    }

    /// The block options given, in sd-scripts' order, as text.
    fn block_args(&self) -> Vec<(String, String)> {
        let py = crate::io::py::py_float;
        [
            ("block_dims", self.block_dims.clone()),
            ("block_alphas", self.block_alphas.clone()),
            ("conv_block_dims", self.conv_block_dims.clone()),
            ("conv_block_alphas", self.conv_block_alphas.clone()),
            ("down_lr_weight", self.down_lr_weight.clone()),
            ("mid_lr_weight", self.mid_lr_weight.map(py)),
            ("up_lr_weight", self.up_lr_weight.clone()),
            ("block_lr_zero_threshold", self.block_lr_zero_threshold.map(py)),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect()
    }

    pub fn config(&self) -> Result<NetworkConfig> {
        use crate::networks::blocks::{parse_block_values, parse_lr_weights, BlockConfig, BlockLr};
        let lr = if self.down_lr_weight.is_some() || self.up_lr_weight.is_some() || self.mid_lr_weight.is_some() {
            let zero = self.block_lr_zero_threshold.unwrap_or(0.0);
            let clip = |v: Vec<f64>| v.into_iter().map(|w| if w <= zero { 0.0 } else { w }).collect::<Vec<_>>();
            let side = |s: &Option<String>| -> Result<Vec<f64>> {
                Ok(clip(match s {
                    Some(s) => parse_lr_weights(s)?,
                    None => vec![1.0; 12],
                }))
            };
            let mid = self.mid_lr_weight.unwrap_or(1.0);
            Some(BlockLr {
                down: side(&self.down_lr_weight)?,
                mid: if mid <= zero { 0.0 } else { mid },
                up: side(&self.up_lr_weight)?,
            })
        } else {
            None
        };
        let blocks = BlockConfig {
            dims: self.block_dims.as_deref().map(|s| parse_block_values("block_dims", s)).transpose()?,
            alphas: self.block_alphas.as_deref().map(|s| parse_block_values("block_alphas", s)).transpose()?,
            conv_dims: self.conv_block_dims.as_deref().map(|s| parse_block_values("conv_block_dims", s)).transpose()?,
            conv_alphas: self
                .conv_block_alphas
                .as_deref()
                .map(|s| parse_block_values("conv_block_alphas", s))
                .transpose()?,
            lr,
            given: self.block_args(),
        };
        let (lora_fa, lycoris) = match self.module.as_deref() {
            None | Some("networks.lora" | "lora") => (false, None),
            Some("networks.lora_fa" | "lora_fa") => (true, None),
            Some("lycoris.kohya" | "lycoris") => (false, Some(self.lycoris()?)),
            Some(m) => bail!("network_module {m} is not supported yet; available: networks.lora, networks.lora_fa, lycoris.kohya (algo loha or lokr)"),
        };
        if lycoris.is_none() {
            if let Some(k) = self.lycoris_given() {
                bail!("network option `{k}` is an option of LyCORIS networks: set network_module lycoris.kohya");
            }
        }
        let dtype = match self.dtype.as_deref() {
            None => candle_core::DType::F32,
            Some(d) => match crate::device::parse_dtype(d)? {
                t @ (candle_core::DType::F32 | candle_core::DType::BF16) => t,
                _ => bail!("network dtype {d}: LoRA weights train in f32 or bf16 (full_bf16)"),
            },
        };
        let ratio = |name: &str, r: Option<f64>| -> Result<Option<f64>> {
            match r {
                Some(r) if r < 0.0 || !r.is_finite() => bail!("{name} must be a positive ratio, got {r}"),
                Some(0.0) => Ok(None), // kohya_ss writes 0 for "off"
                r => Ok(r),
            }
        };
        let loraplus = crate::networks::LoraPlus {
            all: ratio("loraplus_lr_ratio", self.loraplus_lr_ratio)?,
            unet: ratio("loraplus_unet_lr_ratio", self.loraplus_unet_lr_ratio)?,
            text_encoder: ratio("loraplus_text_encoder_lr_ratio", self.loraplus_text_encoder_lr_ratio)?,
        };
        Ok(NetworkConfig {
            dtype,
            lora_fa,
            loraplus,
            blocks,
            dim: self.dim.unwrap_or(4),
            alpha: self.alpha.unwrap_or(1.0),
            conv_dim: self.conv_dim,
            conv_alpha: self.conv_alpha,
            dropouts: Dropouts {
                neuron: self.dropout,
                rank: self.rank_dropout,
                module: self.module_dropout,
                rank_scale: flag("rank_dropout_scale", &self.rank_dropout_scale)?,
            },
            lycoris,
            train_unet: self.train_unet.unwrap_or(true),
            train_text_encoder: self.train_text_encoder.unwrap_or(true),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(v: Value) -> Result<NetworkConfig> {
        serde_json::from_value::<NetworkOptions>(v)?.config()
    }

    #[test]
    fn every_network_option_completes_in_scripts() {
        let keys = crate::script::option_keys_of("lora");
        for k in ["dim", "conv_dim", "conv_block_alphas", "algo", "preset", "dora_wd", "loraplus_lr_ratio"] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn lycoris_options_are_read_and_checked() {
        let c = options(serde_json::json!({
            "network_module": "lycoris.kohya", "network_dim": 8, "algo": "lokr", "factor": 4,
            "decompose_both": "True", "preset": "attn-mlp", "use_tucker": "False", "rank_dropout_scale": true
        }))
        .unwrap();
        let ly = c.lycoris.unwrap();
        assert_eq!(
            (ly.algo, ly.preset.name, ly.factor, ly.decompose_both),
            (crate::networks::lycoris::Algo::Lokr, "attn-mlp", 4, true)
        );
        assert!(c.dropouts.rank_scale);
        assert_eq!(ly.args.iter().find(|(k, _)| k == "use_tucker").unwrap().1, "False");
        // unknown keys are still refused; LyCORIS keys without lycoris.kohya, and LyCORIS options we lack, too
        let e = options(serde_json::json!({ "network_dim": 8, "no_such": 1 })).unwrap_err().to_string();
        assert!(e.contains("no_such"), "{e}");
        let e = options(serde_json::json!({ "algo": "loha" })).unwrap_err().to_string();
        assert!(e.contains("lycoris.kohya"), "{e}");
        let e = options(serde_json::json!({ "network_module": "lycoris.kohya", "algo": "loha", "use_scalar": "True" }))
            .unwrap_err()
            .to_string();
        assert!(e.contains("use_scalar") && e.contains("not supported"), "{e}");
        let c = options(serde_json::json!({ "network_module": "lycoris.kohya", "dora_wd": "True" })).unwrap();
        assert_eq!(c.lycoris.unwrap().dora, Some(true));
        let c =
            options(serde_json::json!({ "network_module": "lycoris.kohya", "dora_wd": true, "wd_on_output": "False" }))
                .unwrap();
        assert_eq!(c.lycoris.unwrap().dora, Some(false));
        let e = options(serde_json::json!({ "network_module": "lycoris.kohya", "algo": "lokr", "use_cp": "True" }))
            .unwrap_err()
            .to_string();
        assert!(e.contains("LoKr") && e.contains("Tucker"), "{e}");
        // LyCORIS' default algo is LoCon; disable_conv_cp=False asks for Tucker
        let c = options(serde_json::json!({ "network_module": "lycoris.kohya", "disable_conv_cp": "False" })).unwrap();
        let ly = c.lycoris.unwrap();
        assert!(ly.algo == crate::networks::lycoris::Algo::Locon && ly.tucker);
        let e =
            options(serde_json::json!({ "network_module": "lycoris.kohya", "algo": "loha", "preset": "mine.toml" }))
                .unwrap_err()
                .to_string();
        assert!(e.contains("mine.toml") && e.contains("attn-mlp"), "{e}");
    }
}
