//! Building a trainer from a recipe: the model, dataset and network descriptions plus the loop options, as JSON
//! (what `train(opts)`, `sdtune train` and saved states share).

use super::config::TrainConfig;
pub use super::network_options::NetworkOptions;
use super::trainer::Trainer;
use crate::data::{config::General, OpenOptions};
use crate::models::{LoadOptions, StableDiffusion};
use crate::networks::Network;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;

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
    "alpha_mask",
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
