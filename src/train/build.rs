//! Building a trainer from a recipe: the model, dataset and network descriptions plus the loop options, as JSON
//! (what `train(opts)`, `sdtune train` and saved states share).

use super::config::TrainConfig;
use super::trainer::Trainer;
use crate::data::{config::General, OpenOptions};
use crate::models::{LoadOptions, StableDiffusion};
use crate::networks::{module::Dropouts, Network, NetworkConfig};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;

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
    /// LyCORIS (`network_module = lycoris.kohya`): `algo` (locon, loha, lokr), `preset`, LoKr's `factor` and
    /// `decompose_both`, Tucker (`use_tucker`/`use_cp`), `rank_dropout_scale`; the options LyCORIS has beyond these
    /// are refused when on.
    #[serde(flatten)]
    pub lycoris: LycorisOptions,
}

/// The `network_args` of `lycoris.kohya`, as given (kohya_ss writes Python's `True`/`False` as text).
#[derive(Deserialize, serde::Serialize, Default, Clone, Debug)]
pub struct LycorisOptions {
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

impl LycorisOptions {
    /// The names of the options given.
    fn given(&self) -> Vec<&'static str> {
        let v = serde_json::to_value(self).unwrap_or_default();
        let mut names = Vec::new();
        if let Value::Object(m) = v {
            for (k, x) in m {
                if !x.is_null() {
                    names.push(LYCORIS_KEYS.iter().find(|n| **n == k).copied().unwrap_or("algo"));
                }
            }
        }
        names
    }
}

/// Option names of `lycoris.kohya` (`network_args`).
pub const LYCORIS_KEYS: &[&str] = &[
    "algo",
    "preset",
    "factor",
    "decompose_both",
    "rank_dropout_scale",
    "bypass_mode",
    "use_tucker",
    "use_cp",
    "use_conv_cp",
    "disable_conv_cp",
    "use_scalar",
    "dora_wd",
    "train_norm",
    "full_matrix",
    "rs_lora",
    "unbalanced_factorization",
    "wd_on_output",
    "block_size",
    "train_on_input",
    "constraint",
    "rescaled",
];

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
    /// The LyCORIS configuration when the module is `lycoris.kohya`.
    fn lycoris(&self) -> Result<crate::networks::lycoris::LycorisConfig> {
        use crate::networks::lycoris::{Algo, LycorisConfig};
        let l = &self.lycoris;
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
            if let Some(k) = self.lycoris.given().first() {
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
                rank_scale: flag("rank_dropout_scale", &self.lycoris.rank_dropout_scale)?,
            },
            lycoris,
            train_unet: self.train_unet.unwrap_or(true),
            train_text_encoder: self.train_text_encoder.unwrap_or(true),
        })
    }
}

/// What a recipe names.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: PathBuf,
    #[serde(default)]
    pub model_options: Value,
    pub dataset: Option<PathBuf>,
    #[serde(default)]
    pub dataset_options: Value,
    #[serde(default)]
    pub network: Value,
    pub network_weights: Option<PathBuf>,
    /// Train the model itself (DreamBooth / fine-tuning) instead of a network.
    #[serde(default)]
    pub fine_tune: bool,
    #[serde(default)]
    pub train: Value,
}

fn obj(v: &Value) -> serde_json::Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

/// The device a recipe trains on: its `device` model option, else the default (the first GPU when built with
/// CUDA and one is there, else the CPU).
pub fn device(r: &Recipe) -> Result<candle_core::Device> {
    match r.model_options.get("device").and_then(Value::as_str) {
        Some(d) => crate::device::parse_device(d),
        None => Ok(crate::device::default_device()),
    }
}

/// Loads the model a recipe names.
pub fn load_model(r: &Recipe) -> Result<StableDiffusion> {
    let o = obj(&r.model_options);
    let mut lo = LoadOptions { device: device(r)?, ..Default::default() };
    if let Some(d) = o.get("dtype").and_then(Value::as_str) {
        lo.dtype = crate::device::parse_dtype(d)?;
    }
    lo.v_pred = o.get("v_pred").and_then(Value::as_bool);
    if let Some(c) = o.get("clip_skip").and_then(Value::as_u64) {
        lo.clip_skip = c as usize;
    }
    StableDiffusion::load(&r.model, &lo)
}

/// Opens the dataset a recipe names.
pub fn open_dataset(r: &Recipe) -> Result<Option<crate::data::DatasetGroup>> {
    let Some(path) = &r.dataset else { return Ok(None) };
    let mut o = obj(&r.dataset_options);
    let reg = o.remove("reg_data_dir").and_then(|v| v.as_str().map(PathBuf::from));
    let in_json = o.remove("in_json").and_then(|v| v.as_str().map(PathBuf::from));
    let strict = o.remove("strict").and_then(|v| v.as_bool()).unwrap_or(false);
    let call: General =
        serde_json::from_value(Value::Object(o)).map_err(|e| anyhow::anyhow!("dataset options: {e}"))?;
    let mut g = crate::data::open(path, &OpenOptions { call, reg_dir: reg, in_json, strict })?;
    g.options = r.dataset_options.clone();
    Ok(Some(g))
}

/// Builds everything from a recipe (a fresh network, or `network_weights` to continue training a file).
pub fn build(recipe: &Value) -> Result<Trainer> {
    if recipe.get("model").is_none_or(Value::is_null) {
        bail!("no model to train: pretrained_model_name_or_path (a checkpoint file or diffusers folder) is required");
    }
    let r: Recipe = serde_json::from_value(recipe.clone()).map_err(|e| anyhow::anyhow!("recipe: {e}"))?;
    let cfg =
        TrainConfig::from_json(if r.train.is_null() { Value::Object(Default::default()) } else { r.train.clone() })?;
    // mixed_precision loads the frozen model in half precision unless the recipe names a dtype (full fine-tuning
    // starts from the file's own weights)
    let mut r = r;
    if let Some(d) = cfg.base_dtype_for(&device(&r)?).filter(|_| !r.fine_tune) {
        match r.model_options.as_object_mut() {
            Some(o) => {
                o.entry("dtype").or_insert(Value::from(crate::device::dtype_name(d)));
            }
            None => r.model_options = serde_json::json!({ "dtype": crate::device::dtype_name(d) }),
        }
    }
    let model = Arc::new(load_model(&r)?);
    let data = open_dataset(&r)?.map(Arc::new);
    if data.is_none() {
        bail!("recipe: a `dataset` is required to train");
    }
    if r.fine_tune {
        let given = r.network.as_object().is_some_and(|o| !o.is_empty());
        if given || r.network_weights.is_some() {
            bail!("recipe: fine_tune trains the model itself; it takes no network options or network_weights");
        }
        return Trainer::fine_tune(&model, data, cfg, recipe.clone());
    }
    if r.train.get("token_string").is_some_and(|v| !v.is_null()) {
        if r.network.as_object().is_some_and(|o| !o.is_empty()) || r.network_weights.is_some() {
            bail!("recipe: token_string trains a textual-inversion embedding; it takes no network options or network_weights");
        }
        return Trainer::textual_inversion(model, data, cfg, recipe.clone());
    }
    let mut nopts: NetworkOptions =
        serde_json::from_value(if r.network.is_null() { Value::Object(Default::default()) } else { r.network.clone() })
            .map_err(|e| anyhow::anyhow!("network options: {e}"))?;
    if cfg.full_bf16 && nopts.dtype.is_none() {
        nopts.dtype = Some("bf16".into());
    }
    let ncfg = nopts.config()?;
    let seed = nopts.seed.unwrap_or(cfg.seed);
    let network =
        match &r.network_weights {
            // the file gives the modules and weights; the recipe's dropouts and LoRA+ ratios still apply
            Some(p) => crate::networks::file::load(p, &model)
                .with_context(|| "network_weights")?
                .with_training_options(ncfg.dropouts, ncfg.loraplus, seed),
            None => Network::create(&model, &ncfg, seed)?,
        };
    Trainer::new(model, Arc::new(network).into(), data, cfg, recipe.clone())
}

/// Continues a saved state.
/// `device` (`"cpu"`, `"cuda"`, `"cuda:N"`) replaces the one the run was started on.
pub fn resume(dir: &std::path::Path, device: Option<&str>) -> Result<Trainer> {
    let info = super::state::read_info(dir)?;
    let mut recipe = info.get("recipe").cloned().context("state.json has no recipe")?;
    if let Some(d) = device {
        crate::device::parse_device(d)?;
        match recipe.get_mut("model_options").and_then(Value::as_object_mut) {
            Some(o) => {
                o.insert("device".into(), Value::from(d));
            }
            None => recipe["model_options"] = serde_json::json!({ "device": d }),
        }
    }
    let mut tr = build(&recipe).with_context(|| format!("{}: rebuilding the run", dir.display()))?;
    super::state::load_into(&mut tr, dir)?;
    Ok(tr)
}

/// Where each flat sd-scripts option goes in a recipe (everything else is a loop option).
const DATASET_KEYS: &[&str] = &[
    "resolution",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
    "caption_extension",
    "shuffle_caption",
    "keep_tokens",
    "keep_tokens_separator",
    "secondary_separator",
    "caption_separator",
    "enable_wildcard",
    "caption_prefix",
    "caption_suffix",
    "color_aug",
    "flip_aug",
    "random_crop",
    "token_warmup_min",
    "token_warmup_step",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "reg_data_dir",
    "in_json",
    "num_repeats",
];
const NETWORK_KEYS: &[&str] = &[
    "network_module",
    "network_dim",
    "network_alpha",
    "network_dropout",
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
    "block_lr_zero_threshold",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
];
const MODEL_KEYS: &[(&str, &str)] =
    &[("v_parameterization", "v_pred"), ("clip_skip", "clip_skip"), ("device", "device")];
/// Keys that only make sense in sd-scripts' own launcher and are accepted without effect, each with why.
const IGNORED: &[(&str, &str)] = &[
    ("v2", "the family is detected from the weights"),
    ("max_data_loader_n_workers", "loading threads are chosen automatically"),
    ("persistent_data_loader_workers", "loading threads are chosen automatically"),
    ("xformers", "attention is built in"),
    ("sdpa", "attention is built in"),
    ("mem_eff_attn", "attention is built in"),
];

/// Turns flat sd-scripts options (`--config_file` TOML and command-line flags) into a recipe; returns it and
/// notes on options that have no effect here.
pub fn recipe_from_flat(flat: serde_json::Map<String, Value>) -> Result<(Value, Vec<String>)> {
    let mut model = None;
    let mut dataset = None;
    let mut model_options = serde_json::Map::new();
    let mut dataset_options = serde_json::Map::new();
    let mut network = serde_json::Map::new();
    let mut network_weights = None;
    let mut fine_tune = false;
    let mut train = serde_json::Map::new();
    let mut notes = Vec::new();
    for (k, v) in flat {
        match k.as_str() {
            "pretrained_model_name_or_path" => model = v.as_str().map(PathBuf::from),
            "train_data_dir" | "dataset_config" => dataset = v.as_str().map(PathBuf::from),
            "train_batch_size" => {
                dataset_options.insert("batch_size".into(), v);
            }
            // sd-scripts' repeats of an in_json (fine-tune) dataset
            "dataset_repeats" => {
                dataset_options.insert("num_repeats".into(), v);
            }
            "network_weights" => network_weights = v.as_str().map(PathBuf::from),
            "fine_tune" => fine_tune = v.as_bool().context("fine_tune must be true or false")?,
            "network_args" => {
                let args: Vec<String> = match &v {
                    Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
                    Value::String(s) => s.split_whitespace().map(String::from).collect(),
                    _ => bail!("network_args must be a list of key=value strings"),
                };
                for a in args {
                    let (ak, av) =
                        a.split_once('=').with_context(|| format!("network_args: {a:?} is not key=value"))?;
                    let num: Value = av
                        .parse::<u64>()
                        .map(Value::from)
                        .or_else(|_| av.parse::<i64>().map(Value::from))
                        .or_else(|_| av.parse::<f64>().map(Value::from))
                        .unwrap_or(Value::from(av));
                    network.insert(ak.to_string(), num);
                }
            }
            k if DATASET_KEYS.contains(&k) => {
                dataset_options.insert(k.into(), v);
            }
            k if NETWORK_KEYS.contains(&k) => {
                network.insert(k.into(), v);
            }
            k if MODEL_KEYS.iter().any(|(f, _)| *f == k) => {
                let to = MODEL_KEYS.iter().find(|(f, _)| *f == k).expect("matched").1;
                model_options.insert(to.into(), v.clone());
                if k == "v_parameterization" {
                    train.insert(k.into(), v);
                }
            }
            k if IGNORED.iter().any(|(n, _)| *n == k) => {
                let why = IGNORED.iter().find(|(n, _)| *n == k).expect("matched").1;
                notes.push(format!("{k}: no effect ({why})"));
            }
            _ => {
                train.insert(k, v);
            }
        }
    }
    if !fine_tune {
        if let Some(v) = train.remove("save_model_as") {
            notes.push(format!("save_model_as: no effect ({v} given; networks are saved as safetensors)"));
        }
    }
    let recipe = serde_json::json!({
        "model": model,
        "model_options": Value::Object(model_options),
        "dataset": dataset,
        "dataset_options": Value::Object(dataset_options),
        "network": Value::Object(network),
        "network_weights": network_weights,
        "fine_tune": fine_tune,
        "train": Value::Object(train),
    });
    Ok((recipe, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(v: Value) -> Result<NetworkConfig> {
        serde_json::from_value::<NetworkOptions>(v)?.config()
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
