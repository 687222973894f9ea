//! Whole-model checkpoints: original single files (`.safetensors`, `.ckpt`) and diffusers folders, both ways.
//!
//! In memory every component uses diffusers/transformers names (`unet`, `vae`, `text_encoder` maps); single files
//! are converted through the tables in `keymap.rs`.

use super::keymap::{self, rename_all, unet_table, vae_table, Side};
use super::openclip::{self, count_numbered, strip};
use super::tensors::{read_any, read_safetensors, write_safetensors};
use crate::models::Family;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Single-file prefixes of each component.
const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIX: &str = "first_stage_model.";
const SD1_TE_PREFIX: &str = "cond_stage_model.transformer.";
const SD2_TE_PREFIX: &str = "cond_stage_model.model.";
const SDXL_TE1_PREFIX: &str = "conditioner.embedders.0.transformer.";
const SDXL_TE2_PREFIX: &str = "conditioner.embedders.1.model.";
/// The refiner's only text encoder (OpenCLIP-bigG in the first slot).
const SDXL_REFINER_TE_PREFIX: &str = "conditioner.embedders.0.model.";
/// Keys that mark an SDXL single file.
const SDXL_MARKERS: &[&str] = &["conditioner.embedders.", "model.diffusion_model.label_emb."];

/// The components' tensors in diffusers names, plus single-file keys no component uses.
#[derive(Clone, Default)]
pub struct Components {
    pub unet: HashMap<String, Tensor>,
    pub vae: HashMap<String, Tensor>,
    pub text_encoder: HashMap<String, Tensor>,
    /// SDXL's second text encoder (`CLIPTextModelWithProjection` names); empty for SD1/SD2.
    pub text_encoder_2: HashMap<String, Tensor>,
    /// Unused single-file tensors (EMA, schedule buffers, OpenCLIP's last layer...), written back to single files.
    pub extras: HashMap<String, Tensor>,
}

/// Non-shape configuration found beside the weights (diffusers `config.json` files).
#[derive(Clone, Default)]
pub struct SideConfigs {
    pub unet: Option<Value>,
    pub vae: Option<Value>,
    pub text_encoder: Option<Value>,
    pub text_encoder_2: Option<Value>,
    pub scheduler: Option<Value>,
    /// The padding ids of `tokenizer/` and (SDXL) `tokenizer_2/`.
    pub pad_id: Option<u32>,
    pub pad_id_2: Option<u32>,
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

/// Splits a single file into diffusers-named components.
pub fn split_single_file(mut all: HashMap<String, Tensor>, family: Family) -> Result<Components> {
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
    let (text_encoder, text_encoder_2) = match family {
        Family::Sd1 => (hf_text_model(strip(&mut all, SD1_TE_PREFIX)), HashMap::new()),
        Family::Sd2 => {
            (openclip::to_hf(strip(&mut all, SD2_TE_PREFIX), SD2_TE_PREFIX, false, &mut all)?, HashMap::new())
        }
        Family::Sdxl => {
            if all.keys().any(|k| k.starts_with(SDXL_REFINER_TE_PREFIX)) {
                bail!("this is an SDXL refiner (one OpenCLIP-bigG text encoder, `{SDXL_REFINER_TE_PREFIX}*`): not supported; SDXL base models are");
            }
            let te1 = hf_text_model(strip(&mut all, SDXL_TE1_PREFIX));
            let te2 = strip(&mut all, SDXL_TE2_PREFIX);
            if te2.is_empty() {
                bail!("no second text encoder in the SDXL checkpoint (`{SDXL_TE2_PREFIX}*` keys)");
            }
            (te1, openclip::to_hf(te2, SDXL_TE2_PREFIX, true, &mut all)?)
        }
    };
    if text_encoder.is_empty() {
        bail!("no text encoder in the checkpoint");
    }
    Ok(Components { unet, vae, text_encoder, text_encoder_2, extras: all })
}

/// transformers-named text-encoder keys with the `text_model.` prefix restored where a file leaves it out, and
/// without the `position_ids` buffer (`text_projection` stays outside `text_model.`, as transformers has it).
fn hf_text_model(te: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let keep = |k: &str| k.starts_with("text_model.") || k.starts_with("text_projection.");
    te.into_iter()
        .filter(|(k, _)| !k.ends_with("position_ids"))
        .map(|(k, t)| (if keep(&k) { k } else { format!("text_model.{k}") }, t))
        .collect()
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

/// The single-file (LDM) state dict of the components.
pub fn to_single_file(c: &Components, family: Family) -> Result<HashMap<String, Tensor>> {
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
    let prefixed =
        |m: HashMap<String, Tensor>, prefix: &'static str| m.into_iter().map(move |(k, t)| (format!("{prefix}{k}"), t));
    match family {
        Family::Sd1 => out.extend(prefixed(c.text_encoder.clone(), SD1_TE_PREFIX)),
        Family::Sd2 => out.extend(prefixed(openclip::from_hf(&c.text_encoder)?, SD2_TE_PREFIX)),
        Family::Sdxl => {
            out.extend(prefixed(c.text_encoder.clone(), SDXL_TE1_PREFIX));
            out.extend(prefixed(openclip::from_hf(&c.text_encoder_2)?, SDXL_TE2_PREFIX));
        }
    }
    out.extend(c.extras.iter().map(|(k, t)| (k.clone(), t.clone())));
    if family == Family::Sd2 {
        openclip::pad_openclip_h(&mut out, SD2_TE_PREFIX)?;
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

/// The padding id a tokenizer folder's `special_tokens_map.json` names (`!` → 0, `<|endoftext|>` → EOS).
fn pad_id(dir: &Path) -> Result<Option<u32>> {
    Ok(read_json(&dir.join("special_tokens_map.json"))?.and_then(|v| {
        let pad = v.get("pad_token")?;
        let s = pad.as_str().or_else(|| pad.get("content").and_then(Value::as_str))?;
        match s {
            "!" => Some(0),
            "<|endoftext|>" => Some(crate::models::tokenizer::EOS),
            _ => None,
        }
    }))
}

fn read_side_configs(dir: &Path) -> Result<SideConfigs> {
    Ok(SideConfigs {
        unet: read_json(&dir.join("unet").join("config.json"))?,
        vae: read_json(&dir.join("vae").join("config.json"))?,
        text_encoder: read_json(&dir.join("text_encoder").join("config.json"))?,
        text_encoder_2: read_json(&dir.join("text_encoder_2").join("config.json"))?,
        scheduler: read_json(&dir.join("scheduler").join("scheduler_config.json"))?,
        pad_id: pad_id(&dir.join("tokenizer"))?,
        pad_id_2: pad_id(&dir.join("tokenizer_2"))?,
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
    if dir.join("text_encoder_2").is_dir() && !dir.join("text_encoder").is_dir() {
        bail!("{}: an SDXL refiner (text_encoder_2/ only): not supported; SDXL base models are", dir.display());
    }
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
    let unet = component_weights(dir, "unet", dtype, device)?;
    let mut vae = component_weights(dir, "vae", dtype, device)?;
    let legacy: Vec<String> =
        vae.keys().filter(|k| keymap::LEGACY_VAE_ATTENTION.iter().any(|(o, _)| k.contains(o))).cloned().collect();
    for k in legacy {
        let t = vae.remove(&k).expect("listed above");
        let nk = keymap::LEGACY_VAE_ATTENTION.iter().fold(k.clone(), |acc, (o, n)| acc.replace(o, n));
        vae.insert(nk, t);
    }
    let text_encoder = hf_text_model(component_weights(dir, "text_encoder", dtype, device)?);
    let text_encoder_2 = match family {
        Family::Sdxl => hf_text_model(component_weights(dir, "text_encoder_2", dtype, device)?),
        _ => HashMap::new(),
    };
    let components = Components { unet, vae, text_encoder, text_encoder_2, extras: HashMap::new() };
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
    /// SDXL's `CLIPTextModelWithProjection` config (its tokenizer pads with `!`).
    pub text_encoder_2: Option<Value>,
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
        let mut parts = vec![
            ("unet", "diffusion_pytorch_model.safetensors", &c.unet, &configs.unet),
            ("vae", "diffusion_pytorch_model.safetensors", &c.vae, &configs.vae),
            ("text_encoder", "model.safetensors", &c.text_encoder, &configs.text_encoder),
        ];
        if let Some(cfg2) = &configs.text_encoder_2 {
            parts.push(("text_encoder_2", "model.safetensors", &c.text_encoder_2, cfg2));
        }
        for (sub, file, map, cfg) in parts {
            let d = tmp.join(sub);
            std::fs::create_dir_all(&d).with_context(|| format!("{}: cannot create", d.display()))?;
            write_safetensors(&d.join(file), &cast_map(map, dtype)?, &pt)?;
            wj(d.join("config.json"), cfg)?;
        }
        let sched = tmp.join("scheduler");
        std::fs::create_dir_all(&sched)?;
        wj(sched.join("scheduler_config.json"), &configs.scheduler)?;
        let write_tokenizer = |sub: &str, pad: &str| -> Result<()> {
            let tok = tmp.join(sub);
            std::fs::create_dir_all(&tok)?;
            std::fs::write(tok.join("vocab.json"), crate::models::tokenizer::VOCAB_JSON)?;
            std::fs::write(tok.join("merges.txt"), crate::models::tokenizer::MERGES_TXT)?;
            let special = serde_json::json!({
                "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "pad_token": pad, "unk_token": "<|endoftext|>"
            });
            wj(tok.join("special_tokens_map.json"), &special)?;
            let tok_cfg = serde_json::json!({
                "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": true,
                "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "pad_token": pad, "unk_token": "<|endoftext|>", "errors": "replace"
            });
            wj(tok.join("tokenizer_config.json"), &tok_cfg)
        };
        write_tokenizer("tokenizer", configs.pad_token)?;
        let scheduler_class =
            configs.scheduler.get("_class_name").and_then(Value::as_str).unwrap_or("PNDMScheduler").to_string();
        let mut index = serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.39.0",
            "feature_extractor": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        });
        if configs.text_encoder_2.is_some() {
            write_tokenizer("tokenizer_2", "!")?;
            let o = index.as_object_mut().expect("a JSON object");
            o.remove("requires_safety_checker");
            o.remove("safety_checker");
            for (k, v) in [
                ("_class_name", serde_json::json!("StableDiffusionXLPipeline")),
                ("force_zeros_for_empty_prompt", serde_json::json!(true)),
                ("image_encoder", serde_json::json!([null, null])),
                ("text_encoder_2", serde_json::json!(["transformers", "CLIPTextModelWithProjection"])),
                ("tokenizer_2", serde_json::json!(["transformers", "CLIPTokenizer"])),
            ] {
                o.insert(k.to_string(), v);
            }
        }
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
