//! Whole-model checkpoints: original single files (`.safetensors`, `.ckpt`) and diffusers folders, both ways.
//!
//! In memory every component uses diffusers/transformers names (`unet`, `vae`, `text_encoder` maps); single files
//! are converted through the tables in `keymap.rs`.

use super::keymap::{self, openclip_table, rename_all, unet_table, vae_table, Side, OPENCLIP_POSITIONAL};
use super::tensors::{read_any, read_safetensors, write_safetensors};
use crate::models::Family;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Single-file prefixes of each SD1/SD2 component.
const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIX: &str = "first_stage_model.";
const SD1_TE_PREFIX: &str = "cond_stage_model.transformer.";
const SD2_TE_PREFIX: &str = "cond_stage_model.model.";
/// Keys that mark an SDXL single file.
const SDXL_MARKERS: &[&str] = &["conditioner.embedders.", "model.diffusion_model.label_emb."];

/// The three components' tensors in diffusers names, plus single-file keys no component uses.
#[derive(Clone, Default)]
pub struct Components {
    pub unet: HashMap<String, Tensor>,
    pub vae: HashMap<String, Tensor>,
    pub text_encoder: HashMap<String, Tensor>,
    /// Unused single-file tensors (EMA, schedule buffers, OpenCLIP's last layer...), written back to single files.
    pub extras: HashMap<String, Tensor>,
}

/// Non-shape configuration found beside the weights (diffusers `config.json` files).
#[derive(Clone, Default)]
pub struct SideConfigs {
    pub unet: Option<Value>,
    pub vae: Option<Value>,
    pub text_encoder: Option<Value>,
    pub scheduler: Option<Value>,
    pub pad_id: Option<u32>,
    /// Where they were read from.
    pub dir: Option<PathBuf>,
}

/// How a checkpoint was stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Format {
    SingleFile,
    Diffusers,
}

/// A checkpoint read from disk.
pub struct Checkpoint {
    pub family: Family,
    pub format: Format,
    pub components: Components,
    pub configs: SideConfigs,
    pub metadata: HashMap<String, String>,
}

/// Reads a single file or a diffusers folder; `config_dir` names a diffusers folder whose configs to use.
pub fn load(
    path: &Path,
    family: Option<Family>,
    dtype: DType,
    device: &Device,
    config_dir: Option<&Path>,
) -> Result<Checkpoint> {
    if !path.exists() {
        bail!(
            "{}: no such file or folder; expected a .safetensors/.ckpt checkpoint or a diffusers folder",
            path.display()
        );
    }
    if path.is_dir() {
        return load_diffusers(path, family, dtype, device);
    }
    let file = read_any(path, Some(dtype), device)?;
    let family = match family {
        Some(f) => f,
        None => detect_family(&file.tensors).with_context(|| format!("{}", path.display()))?,
    };
    family.ensure_supported(&path.display().to_string())?;
    let components = split_single_file(file.tensors.clone(), family).with_context(|| format!("{}", path.display()))?;
    let dir = config_dir.map(Path::to_path_buf).or_else(|| sidecar_dir(path));
    let configs = match dir {
        Some(d) => read_side_configs(&d)?,
        None => SideConfigs::default(),
    };
    Ok(Checkpoint { family, format: Format::SingleFile, components, configs, metadata: file.metadata })
}

/// A diffusers folder holding configs for a single file: the file's own folder or `<stem>/` beside it.
fn sidecar_dir(file: &Path) -> Option<PathBuf> {
    let parent = file.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p })?;
    let stem = file.file_stem()?;
    [parent.to_path_buf(), parent.join(stem)].into_iter().find(|d| d.join("unet").join("config.json").is_file())
}

/// Detects SD1 / SD2 / SDXL from single-file keys.
pub fn detect_family(tensors: &HashMap<String, Tensor>) -> Result<Family> {
    let has = |p: &str| tensors.keys().any(|k| k.starts_with(p));
    if SDXL_MARKERS.iter().any(|m| has(m)) {
        return Ok(Family::Sdxl);
    }
    if tensors.keys().any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te")) {
        bail!(
            "this is a LoRA/network file, not a model checkpoint (keys like `lora_unet_*`); load it with load_network"
        );
    }
    if !has(UNET_PREFIX) {
        let mut some: Vec<&String> = tensors.keys().collect();
        some.sort();
        let some: Vec<String> = some.iter().take(3).map(|k| format!("`{k}`")).collect();
        bail!(
            "not a Stable Diffusion checkpoint: no `{UNET_PREFIX}*` keys (found {} tensors, e.g. {}); expected an original single-file SD 1.x/2.x/XL model",
            tensors.len(),
            some.join(", ")
        );
    }
    if has(SD2_TE_PREFIX) {
        return Ok(Family::Sd2);
    }
    if has(SD1_TE_PREFIX) {
        return Ok(Family::Sd1);
    }
    bail!("the checkpoint has a UNet but no text encoder (`{SD1_TE_PREFIX}*` or `{SD2_TE_PREFIX}*`); pass `family` explicitly")
}

fn strip(tensors: &mut HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    let keys: Vec<String> = tensors.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
    keys.into_iter().map(|k| (k[prefix.len()..].to_string(), tensors.remove(&k).expect("key listed above"))).collect()
}

fn count_numbered(keys: impl Iterator<Item = String>, prefix: &str) -> usize {
    let mut max = None;
    for k in keys {
        if let Some(rest) = k.strip_prefix(prefix) {
            if let Some(n) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) {
                max = Some(max.map_or(n, |m: usize| m.max(n)));
            }
        }
    }
    max.map_or(0, |m| m + 1)
}

/// The UNet structure read from LDM keys: (levels, layers per block, up levels with attention).
fn ldm_unet_structure(unet: &HashMap<String, Tensor>) -> Result<(usize, usize, Vec<bool>)> {
    let inputs = count_numbered(unet.keys().cloned(), "input_blocks.");
    let downs = unet.keys().filter(|k| k.starts_with("input_blocks.") && k.ends_with(".0.op.weight")).count();
    let levels = downs + 1;
    if inputs < 2 || (inputs - 1 - downs) % levels != 0 {
        bail!("unexpected UNet layout: {inputs} input_blocks with {downs} downsamplers");
    }
    let layers = (inputs - 1 - downs) / levels;
    let up_attn =
        (0..levels).map(|i| unet.contains_key(&format!("output_blocks.{}.1.norm.weight", (layers + 1) * i))).collect();
    Ok((levels, layers, up_attn))
}

/// Splits an SD1/SD2 single file into diffusers-named components.
pub fn split_single_file(mut all: HashMap<String, Tensor>, family: Family) -> Result<Components> {
    family.ensure_supported("single-file checkpoint")?;
    let unet_ldm = strip(&mut all, UNET_PREFIX);
    let (levels, layers, up_attn) = ldm_unet_structure(&unet_ldm)?;
    let (unet, bad) = rename_all(unet_ldm, &unet_table(levels, layers, &up_attn), Side::Ldm);
    if !bad.is_empty() {
        bail!("{} UNet keys have no diffusers equivalent, e.g. `{UNET_PREFIX}{}`", bad.len(), bad[0]);
    }
    let vae_ldm = strip(&mut all, VAE_PREFIX);
    if vae_ldm.is_empty() {
        bail!("no VAE in the checkpoint (`{VAE_PREFIX}*` keys); pass a `vae` path");
    }
    let vl = count_numbered(vae_ldm.keys().cloned(), "encoder.down.");
    let vn = count_numbered(vae_ldm.keys().cloned(), "encoder.down.0.block.");
    let (vae_raw, bad) = rename_all(vae_ldm, &vae_table(vl, vn), Side::Ldm);
    if !bad.is_empty() {
        bail!("{} VAE keys have no diffusers equivalent, e.g. `{VAE_PREFIX}{}`", bad.len(), bad[0]);
    }
    let vae =
        vae_raw.into_iter().map(|(k, t)| Ok((k.clone(), vae_attention_shape(&k, t, false)?))).collect::<Result<_>>()?;
    let text_encoder = match family {
        Family::Sd1 => {
            let te = strip(&mut all, SD1_TE_PREFIX);
            te.into_iter()
                .filter(|(k, _)| !k.ends_with("position_ids"))
                .map(|(k, t)| (if k.starts_with("text_model.") { k } else { format!("text_model.{k}") }, t))
                .collect()
        }
        _ => openclip_to_hf(strip(&mut all, SD2_TE_PREFIX), &mut all)?,
    };
    if text_encoder.is_empty() {
        bail!("no text encoder in the checkpoint");
    }
    Ok(Components { unet, vae, text_encoder, extras: all })
}

/// The VAE mid-block attention is 1×1 conv in LDM files and Linear in diffusers.
fn vae_attention_shape(key: &str, t: Tensor, to_ldm: bool) -> Result<Tensor> {
    let is_attn = key.contains("mid_block.attentions.0.") && key.ends_with(".weight") && !key.contains("group_norm");
    Ok(match (is_attn, to_ldm, t.rank()) {
        (true, false, 4) => t.squeeze(3)?.squeeze(2)?,
        (true, true, 2) => t.unsqueeze(2)?.unsqueeze(3)?,
        _ => t,
    })
}

/// OpenCLIP text-encoder keys → transformers names. A 24-layer OpenCLIP-H loses its last layer (SD2 uses the
/// penultimate one), as sd-scripts does; that layer and `text_projection`/`logit_scale` go to `extras`.
fn openclip_to_hf(
    mut te: HashMap<String, Tensor>,
    extras: &mut HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let layers = count_numbered(te.keys().cloned(), "transformer.resblocks.");
    let mut keep = layers;
    if layers == 24 {
        keep = 23;
        for (k, t) in strip(&mut te, "transformer.resblocks.23.") {
            extras.insert(format!("{SD2_TE_PREFIX}transformer.resblocks.23.{k}"), t);
        }
    }
    for k in ["text_projection", "logit_scale"] {
        if let Some(t) = te.remove(k) {
            extras.insert(format!("{SD2_TE_PREFIX}{k}"), t);
        }
    }
    let mut out = HashMap::new();
    if let Some(t) = te.remove(OPENCLIP_POSITIONAL.0) {
        out.insert(OPENCLIP_POSITIONAL.1.to_string(), t);
    }
    for i in 0..keep {
        for (suffix, part) in [("in_proj_weight", "weight"), ("in_proj_bias", "bias")] {
            let key = format!("transformer.resblocks.{i}.attn.{suffix}");
            let t = te.remove(&key).with_context(|| format!("missing `{SD2_TE_PREFIX}{key}`"))?;
            let d = t.dim(0)? / 3;
            for (j, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                out.insert(
                    format!("text_model.encoder.layers.{i}.self_attn.{name}.{part}"),
                    t.narrow(0, j * d, d)?.contiguous()?,
                );
            }
        }
    }
    let (renamed, bad) = rename_all(te, &openclip_table(keep), Side::Ldm);
    if !bad.is_empty() {
        bail!("{} text-encoder keys have no transformers equivalent, e.g. `{SD2_TE_PREFIX}{}`", bad.len(), bad[0]);
    }
    out.extend(renamed);
    Ok(out)
}

/// A 23-layer OpenCLIP-H text encoder without its original 24th layer (a diffusers SD2 model) is written as
/// sd-scripts does, so that loaders expecting OpenCLIP-H's 24 resblocks accept it: layer 22 copied to 23, and
/// placeholder `text_projection` (ones) and `logit_scale` (1). SD2 uses the penultimate layer, so none of them
/// changes the model's output.
fn pad_openclip_h(out: &mut HashMap<String, Tensor>) -> Result<()> {
    let layers = count_numbered(
        out.keys().filter_map(|k| k.strip_prefix(SD2_TE_PREFIX).map(str::to_string)),
        "transformer.resblocks.",
    );
    if layers != 23 {
        return Ok(());
    }
    let src = format!("{SD2_TE_PREFIX}transformer.resblocks.22.");
    let copies: Vec<(String, Tensor)> = out
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix(&src).map(|rest| (format!("{SD2_TE_PREFIX}transformer.resblocks.23.{rest}"), t.clone()))
        })
        .collect();
    out.extend(copies);
    let ln = &out[&format!("{SD2_TE_PREFIX}ln_final.weight")];
    let (d, dtype, dev) = (ln.dim(0)?, ln.dtype(), ln.device().clone());
    out.entry(format!("{SD2_TE_PREFIX}text_projection")).or_insert(Tensor::ones((d, d), dtype, &dev)?);
    out.entry(format!("{SD2_TE_PREFIX}logit_scale")).or_insert(Tensor::ones((), dtype, &dev)?);
    Ok(())
}

fn hf_to_openclip(te: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let layers = count_numbered(te.keys().cloned(), "text_model.encoder.layers.");
    let mut rest = te.clone();
    let mut out = HashMap::new();
    if let Some(t) = rest.remove(OPENCLIP_POSITIONAL.1) {
        out.insert(OPENCLIP_POSITIONAL.0.to_string(), t);
    }
    for i in 0..layers {
        for (suffix, part) in [("in_proj_weight", "weight"), ("in_proj_bias", "bias")] {
            let parts = ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|n| {
                    let k = format!("text_model.encoder.layers.{i}.self_attn.{n}.{part}");
                    rest.remove(&k).with_context(|| format!("missing text-encoder tensor `{k}`"))
                })
                .collect::<Result<Vec<_>>>()?;
            out.insert(format!("transformer.resblocks.{i}.attn.{suffix}"), Tensor::cat(&parts, 0)?);
        }
    }
    let (renamed, bad) = rename_all(rest, &openclip_table(layers), Side::Diffusers);
    if !bad.is_empty() {
        bail!("{} text-encoder keys have no OpenCLIP equivalent, e.g. `{}`", bad.len(), bad[0]);
    }
    out.extend(renamed);
    Ok(out)
}

/// The single-file (LDM) state dict of the components.
pub fn to_single_file(c: &Components, family: Family) -> Result<HashMap<String, Tensor>> {
    family.ensure_supported("saving a single file")?;
    let mut out = HashMap::new();
    let levels = count_numbered(c.unet.keys().cloned(), "down_blocks.");
    let layers = count_numbered(c.unet.keys().cloned(), "down_blocks.0.resnets.");
    let up_attn: Vec<bool> =
        (0..levels).map(|i| c.unet.keys().any(|k| k.starts_with(&format!("up_blocks.{i}.attentions.")))).collect();
    let (unet, bad) = rename_all(c.unet.clone(), &unet_table(levels, layers, &up_attn), Side::Diffusers);
    if !bad.is_empty() {
        bail!("{} UNet tensors have no LDM name, e.g. `{}`", bad.len(), bad[0]);
    }
    out.extend(unet.into_iter().map(|(k, t)| (format!("{UNET_PREFIX}{k}"), t)));
    let vl = count_numbered(c.vae.keys().cloned(), "encoder.down_blocks.");
    let vn = count_numbered(c.vae.keys().cloned(), "encoder.down_blocks.0.resnets.");
    let vae: HashMap<String, Tensor> =
        c.vae.iter().map(|(k, t)| Ok((k.clone(), vae_attention_shape(k, t.clone(), true)?))).collect::<Result<_>>()?;
    let (vae, bad) = rename_all(vae, &vae_table(vl, vn), Side::Diffusers);
    if !bad.is_empty() {
        bail!("{} VAE tensors have no LDM name, e.g. `{}`", bad.len(), bad[0]);
    }
    out.extend(vae.into_iter().map(|(k, t)| (format!("{VAE_PREFIX}{k}"), t)));
    match family {
        Family::Sd1 => out.extend(c.text_encoder.iter().map(|(k, t)| (format!("{SD1_TE_PREFIX}{k}"), t.clone()))),
        _ => {
            let te = hf_to_openclip(&c.text_encoder)?;
            out.extend(te.into_iter().map(|(k, t)| (format!("{SD2_TE_PREFIX}{k}"), t)));
        }
    }
    out.extend(c.extras.iter().map(|(k, t)| (k.clone(), t.clone())));
    if family == Family::Sd2 {
        pad_openclip_h(&mut out)?;
    }
    Ok(out)
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let v = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    Ok(Some(v))
}

fn read_side_configs(dir: &Path) -> Result<SideConfigs> {
    let pad_id = read_json(&dir.join("tokenizer").join("special_tokens_map.json"))?.and_then(|v| {
        let pad = v.get("pad_token")?;
        let s = pad.as_str().or_else(|| pad.get("content").and_then(Value::as_str))?;
        match s {
            "!" => Some(0),
            "<|endoftext|>" => Some(crate::models::tokenizer::EOS),
            _ => None,
        }
    });
    Ok(SideConfigs {
        unet: read_json(&dir.join("unet").join("config.json"))?,
        vae: read_json(&dir.join("vae").join("config.json"))?,
        text_encoder: read_json(&dir.join("text_encoder").join("config.json"))?,
        scheduler: read_json(&dir.join("scheduler").join("scheduler_config.json"))?,
        pad_id,
        dir: Some(dir.to_path_buf()),
    })
}

/// Weight file names a diffusers/transformers sub-folder may hold, in order of preference.
const WEIGHT_FILES: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
];

fn component_weights(dir: &Path, sub: &str, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    let d = dir.join(sub);
    let file =
        WEIGHT_FILES.iter().map(|f| d.join(f)).find(|p| p.is_file()).with_context(|| {
            format!("{}: no weights file (expected one of {})", d.display(), WEIGHT_FILES.join(", "))
        })?;
    let f = if file.extension().is_some_and(|e| e == "bin") {
        read_any(&file, Some(dtype), device)?
    } else {
        read_safetensors(&file, Some(dtype), device)?
    };
    Ok(f.tensors)
}

fn load_diffusers(dir: &Path, family: Option<Family>, dtype: DType, device: &Device) -> Result<Checkpoint> {
    let index = read_json(&dir.join("model_index.json"))?;
    let missing: Vec<&str> = ["unet", "vae", "text_encoder"].into_iter().filter(|s| !dir.join(s).is_dir()).collect();
    if index.is_none() || !missing.is_empty() {
        bail!(
            "{}: not a diffusers folder: expected model_index.json and the sub-folders unet/, vae/, text_encoder/ (missing: {})",
            dir.display(),
            if index.is_none() { std::iter::once("model_index.json").chain(missing).collect::<Vec<_>>().join(", ") } else { missing.join(", ") }
        );
    }
    let configs = read_side_configs(dir)?;
    let class = index.as_ref().and_then(|v| v.get("_class_name")).and_then(Value::as_str).unwrap_or("");
    let detected = if class.contains("XL") || dir.join("text_encoder_2").is_dir() {
        Family::Sdxl
    } else if configs.text_encoder.as_ref().and_then(|v| v.get("hidden_act")).and_then(Value::as_str) == Some("gelu")
        || configs.unet.as_ref().and_then(|v| v.get("cross_attention_dim")).and_then(Value::as_u64) == Some(1024)
    {
        Family::Sd2
    } else {
        Family::Sd1
    };
    let family = family.unwrap_or(detected);
    family.ensure_supported(&dir.display().to_string())?;
    let unet = component_weights(dir, "unet", dtype, device)?;
    let mut vae = component_weights(dir, "vae", dtype, device)?;
    let legacy: Vec<String> =
        vae.keys().filter(|k| keymap::LEGACY_VAE_ATTENTION.iter().any(|(o, _)| k.contains(o))).cloned().collect();
    for k in legacy {
        let t = vae.remove(&k).expect("listed above");
        let nk = keymap::LEGACY_VAE_ATTENTION.iter().fold(k.clone(), |acc, (o, n)| acc.replace(o, n));
        vae.insert(nk, t);
    }
    let text_encoder = component_weights(dir, "text_encoder", dtype, device)?
        .into_iter()
        .filter(|(k, _)| !k.ends_with("position_ids"))
        .map(|(k, t)| (if k.starts_with("text_model.") { k } else { format!("text_model.{k}") }, t))
        .collect();
    let components = Components { unet, vae, text_encoder, extras: HashMap::new() };
    Ok(Checkpoint { family, format: Format::Diffusers, components, configs, metadata: HashMap::new() })
}

/// Casts every float tensor of a map to `dtype`.
pub fn cast_map(map: &HashMap<String, Tensor>, dtype: DType) -> Result<HashMap<String, Tensor>> {
    map.iter()
        .map(|(k, t)| Ok((k.clone(), if t.dtype().is_float() { t.to_dtype(dtype)? } else { t.clone() })))
        .collect()
}

/// Writes an SD1/SD2 single-file safetensors checkpoint.
pub fn save_single_file(
    path: &Path,
    c: &Components,
    family: Family,
    dtype: DType,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let sd = cast_map(&to_single_file(c, family)?, dtype)?;
    write_safetensors(path, &sd, metadata)
}

/// What a diffusers folder needs besides the weights.
pub struct DiffusersConfigs {
    pub unet: Value,
    pub vae: Value,
    pub text_encoder: Value,
    pub scheduler: Value,
    pub pad_token: &'static str,
}

/// Writes a diffusers folder atomically (built in a temporary sibling, then renamed into place).
pub fn save_diffusers(dir: &Path, c: &Components, configs: &DiffusersConfigs, dtype: DType) -> Result<()> {
    let tmp = super::tensors::temp_sibling(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        let wj = |p: PathBuf, v: &Value| -> Result<()> {
            std::fs::write(&p, serde_json::to_string_pretty(v)? + "\n")
                .with_context(|| format!("{}: cannot write", p.display()))
        };
        let pt = HashMap::from([("format".to_string(), "pt".to_string())]);
        for (sub, file, map, cfg_name, cfg) in [
            ("unet", "diffusion_pytorch_model.safetensors", &c.unet, "config.json", &configs.unet),
            ("vae", "diffusion_pytorch_model.safetensors", &c.vae, "config.json", &configs.vae),
            ("text_encoder", "model.safetensors", &c.text_encoder, "config.json", &configs.text_encoder),
        ] {
            let d = tmp.join(sub);
            std::fs::create_dir_all(&d).with_context(|| format!("{}: cannot create", d.display()))?;
            write_safetensors(&d.join(file), &cast_map(map, dtype)?, &pt)?;
            wj(d.join(cfg_name), cfg)?;
        }
        let sched = tmp.join("scheduler");
        std::fs::create_dir_all(&sched)?;
        wj(sched.join("scheduler_config.json"), &configs.scheduler)?;
        let tok = tmp.join("tokenizer");
        std::fs::create_dir_all(&tok)?;
        std::fs::write(tok.join("vocab.json"), crate::models::tokenizer::VOCAB_JSON)?;
        std::fs::write(tok.join("merges.txt"), crate::models::tokenizer::MERGES_TXT)?;
        let special = serde_json::json!({
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "pad_token": configs.pad_token, "unk_token": "<|endoftext|>"
        });
        wj(tok.join("special_tokens_map.json"), &special)?;
        let tok_cfg = serde_json::json!({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": true,
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "pad_token": configs.pad_token, "unk_token": "<|endoftext|>", "errors": "replace"
        });
        wj(tok.join("tokenizer_config.json"), &tok_cfg)?;
        let index = serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.39.0",
            "feature_extractor": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", configs.scheduler.get("_class_name").and_then(Value::as_str).unwrap_or("PNDMScheduler")],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        });
        wj(tmp.join("model_index.json"), &index)?;
        std::fs::rename(&tmp, dir)
            .with_context(|| format!("{}: cannot move the finished folder into place", dir.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn openclip_layers(n: usize, d: usize) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        for i in 0..n {
            let p = format!("transformer.resblocks.{i}.");
            let v = i as f64;
            m.insert(
                format!("{p}attn.in_proj_weight"),
                (Tensor::ones((3 * d, d), DType::F32, &dev).unwrap() * v).unwrap(),
            );
            m.insert(format!("{p}attn.in_proj_bias"), Tensor::zeros(3 * d, DType::F32, &dev).unwrap());
            for (name, shape) in [("attn.out_proj", (d, d)), ("mlp.c_fc", (4 * d, d)), ("mlp.c_proj", (d, 4 * d))] {
                m.insert(format!("{p}{name}.weight"), Tensor::ones(shape, DType::F32, &dev).unwrap());
                m.insert(format!("{p}{name}.bias"), Tensor::zeros(shape.0, DType::F32, &dev).unwrap());
            }
            for ln in ["ln_1", "ln_2"] {
                m.insert(format!("{p}{ln}.weight"), Tensor::ones(d, DType::F32, &dev).unwrap());
                m.insert(format!("{p}{ln}.bias"), Tensor::zeros(d, DType::F32, &dev).unwrap());
            }
        }
        m.insert("ln_final.weight".into(), Tensor::ones(d, DType::F32, &dev).unwrap());
        m.insert("ln_final.bias".into(), Tensor::zeros(d, DType::F32, &dev).unwrap());
        m.insert("token_embedding.weight".into(), Tensor::ones((10, d), DType::F32, &dev).unwrap());
        m.insert("positional_embedding".into(), Tensor::ones((77, d), DType::F32, &dev).unwrap());
        m
    }

    #[test]
    fn openclip_h_24_layers_load_as_23_and_keep_the_rest_as_extras() {
        let mut m = openclip_layers(24, 4);
        m.insert("text_projection".into(), Tensor::ones((4, 4), DType::F32, &Device::Cpu).unwrap());
        let mut extras = HashMap::new();
        let hf = openclip_to_hf(m, &mut extras).unwrap();
        assert!(hf.contains_key("text_model.encoder.layers.22.self_attn.q_proj.weight"));
        assert!(!hf.keys().any(|k| k.contains("layers.23.")));
        assert!(extras.contains_key("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"));
        assert!(extras.contains_key("cond_stage_model.model.text_projection"));
        // and back: the same 24 resblocks come out (22 from the model, 23 from extras)
        let back = hf_to_openclip(&hf).unwrap();
        assert_eq!(count_numbered(back.keys().cloned(), "transformer.resblocks."), 23);
    }

    #[test]
    fn a_23_layer_text_encoder_is_padded_like_sd_scripts() {
        let mut out: HashMap<String, Tensor> =
            openclip_layers(23, 4).into_iter().map(|(k, t)| (format!("{SD2_TE_PREFIX}{k}"), t)).collect();
        pad_openclip_h(&mut out).unwrap();
        let l22 = &out["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"];
        let l23 = &out["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"];
        assert_eq!(l22.to_vec2::<f32>().unwrap(), l23.to_vec2::<f32>().unwrap());
        assert_eq!(out["cond_stage_model.model.text_projection"].dims(), &[4, 4]);
        assert!(out.contains_key("cond_stage_model.model.logit_scale"));
        let mut three: HashMap<String, Tensor> =
            openclip_layers(3, 4).into_iter().map(|(k, t)| (format!("{SD2_TE_PREFIX}{k}"), t)).collect();
        let before = three.len();
        pad_openclip_h(&mut three).unwrap();
        assert_eq!(three.len(), before, "only OpenCLIP-H's 23 layers are padded");
    }
}
