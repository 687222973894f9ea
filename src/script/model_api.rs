//! Script bindings for models: `load_model`, tokenizing, text encoding, UNet, VAE and saving.

use super::errors::{rt, RhaiResult};
use super::opts::Opts;
use crate::device::{default_device, parse_device, parse_dtype};
use crate::models::{Family, LoadOptions, SaveFormat, StableDiffusion};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rhai::{Dynamic, Engine, Map};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A model as scripts hold it.
pub type Model = Arc<StableDiffusion>;

pub(crate) const LOAD_KEYS: &[&str] = &["family", "v_pred", "vae", "dtype", "device", "clip_skip", "config"];
const ENCODE_KEYS: &[&str] = &["clip_skip", "final_ln", "pooled"];
const SAVE_KEYS: &[&str] = &["format", "dtype", "overwrite"];

fn load_model(path: &str, opts: &Map) -> Result<Model> {
    let o = Opts::new(opts, "load_model", LOAD_KEYS)?;
    let mut lo = LoadOptions { device: default_device(), ..Default::default() };
    if let Some(f) = o.string("family")? {
        lo.family = Some(Family::parse(&f)?);
    }
    lo.v_pred = o.bool("v_pred")?;
    lo.vae = o.string("vae")?.map(PathBuf::from);
    if let Some(d) = o.string("dtype")? {
        lo.dtype = parse_dtype(&d)?;
    }
    if let Some(d) = o.string("device")? {
        lo.device = parse_device(&d)?;
    }
    if let Some(c) = o.usize("clip_skip")? {
        lo.clip_skip = c;
    }
    lo.config = o.string("config")?.map(PathBuf::from);
    Ok(Arc::new(StableDiffusion::load(Path::new(path), &lo)?))
}

fn encode_ids(m: &Model, ids: &Tensor, opts: &Map) -> Result<Dynamic> {
    let o = Opts::new(opts, "encode_ids", ENCODE_KEYS)?;
    let pooled = o.bool("pooled")?.unwrap_or(false);
    let out = m.encode_ids(ids, o.usize("clip_skip")?, o.bool("final_ln")?.unwrap_or(true), pooled)?;
    Ok(clip_output(out))
}

/// A context tensor, or `#{ context, pooled }` when there is a pooled output (asked for, or SDXL's).
fn clip_output(out: crate::models::clip::ClipOutput) -> Dynamic {
    match out.pooled {
        Some(p) => {
            let mut map = Map::new();
            map.insert("context".into(), Dynamic::from(out.context));
            map.insert("pooled".into(), Dynamic::from(p));
            Dynamic::from_map(map)
        }
        None => Dynamic::from(out.context),
    }
}

/// SDXL's conditioning vector from a pooled embedding and `[h, w, crop_top, crop_left, target_h, target_w]` (one
/// row for every sample, or a `[B, 6]` tensor).
fn sdxl_vector(m: &Model, pooled: &Tensor, ids: Dynamic) -> Result<Tensor> {
    let b = pooled.dim(0)?;
    let ids = match ids.clone().try_cast::<Tensor>() {
        Some(t) => t,
        None => {
            let a = ids.try_cast::<rhai::Array>().ok_or_else(|| {
                anyhow::anyhow!("sdxl_vector: size ids must be an array of 6 numbers or a [B, 6] tensor")
            })?;
            let v = a
                .iter()
                .map(|x| x.as_float().or_else(|_| x.as_int().map(|i| i as f64)).map(|f| f as f32))
                .collect::<std::result::Result<Vec<f32>, _>>()
                .map_err(|t| anyhow::anyhow!("sdxl_vector: size ids must be numbers, got {t}"))?;
            if v.len() != 6 {
                bail!(
                    "sdxl_vector: expected 6 size ids [h, w, crop_top, crop_left, target_h, target_w], got {}",
                    v.len()
                );
            }
            Tensor::from_vec(v, (1, 6), &candle_core::Device::Cpu)?.repeat((b, 1))?
        }
    };
    m.sdxl_y(pooled, &ids)?.ok_or_else(|| {
        anyhow::anyhow!("sdxl_vector: this {} model takes no conditioning vector (SDXL only)", m.family.name())
    })
}

fn vae_encode(m: &Model, image: &Tensor) -> Result<Map> {
    let p = m.vae_encode(image)?;
    let std = (&p.logvar * 0.5)?.exp()?;
    let mut map = Map::new();
    map.insert("mean".into(), Dynamic::from(p.mean));
    map.insert("logvar".into(), Dynamic::from(p.logvar));
    map.insert("std".into(), Dynamic::from(std));
    map.insert("moments".into(), Dynamic::from(p.moments));
    Ok(map)
}

fn save(m: &Model, path: &str, opts: &Map) -> Result<()> {
    let o = Opts::new(opts, "save", SAVE_KEYS)?;
    let format = match o.string("format")?.as_deref() {
        None | Some("single") | Some("safetensors") => SaveFormat::SingleFile,
        Some("diffusers") => SaveFormat::Diffusers,
        Some(other) => {
            bail!("save: unknown format {other:?}; expected \"single\" or \"diffusers\"")
        }
    };
    let dtype = match o.string("dtype")? {
        Some(d) => parse_dtype(&d)?,
        None => m.dtype,
    };
    m.save(Path::new(path), format, dtype, o.bool("overwrite")?.unwrap_or(false))
}

fn timesteps(t: Dynamic) -> Result<Tensor> {
    if let Some(t) = t.clone().try_cast::<Tensor>() {
        return Ok(t);
    }
    if let Ok(i) = t.as_int() {
        return Ok(Tensor::new(&[i], &candle_core::Device::Cpu)?);
    }
    if let Ok(f) = t.as_float() {
        return Ok(Tensor::new(&[f as f32], &candle_core::Device::Cpu)?);
    }
    bail!("unet: timesteps must be a Tensor or a number, got {}", t.type_name())
}

/// Registers the Model type and its functions.
pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<Model>("Model");
    engine.register_fn("load_model", |p: &str| rt(load_model(p, &Map::new())));
    engine.register_fn("load_model", |p: &str, o: Map| rt(load_model(p, &o)));
    // the dtype to load a model in for training with this mixed_precision on the default device
    engine.register_fn("training_dtype", |mixed_precision: &str| -> String {
        let dev = crate::device::default_device();
        let dt = crate::train::config::base_dtype_for(Some(mixed_precision), &dev);
        crate::device::dtype_name(dt.unwrap_or(candle_core::DType::F32)).to_string()
    });
    engine.register_get("family", |m: &mut Model| m.family.name().to_string());
    engine.register_get("v_pred", |m: &mut Model| m.v_pred);
    engine.register_get("vae_scale", |m: &mut Model| m.vae_scale);
    engine.register_get("clip_skip", |m: &mut Model| m.clip_skip as i64);
    engine.register_get("dtype", |m: &mut Model| crate::device::dtype_name(m.dtype).to_string());
    engine.register_get("device", |m: &mut Model| crate::device::device_name(&m.device));
    engine.register_fn("to_string", |m: &mut Model| format!("Model({}, {})", m.family.name(), m.source.display()));
    engine.register_fn("to_debug", |m: &mut Model| format!("Model({}, {})", m.family.name(), m.source.display()));
    // text → conditioning with A1111 weighting and long prompts, as sampling reads prompts (3 chunks at most)
    engine.register_fn("encode_text", |m: &mut Model, p: &str| {
        rt(crate::sample::prompt::encode_prompts(m, &[p.to_string()], 3, None).map(clip_output))
    });
    engine.register_fn("encode_text", |m: &mut Model, ps: rhai::Array| {
        rt((|| {
            let texts = ps
                .into_iter()
                .map(|v| v.into_string().map_err(|t| anyhow::anyhow!("encode_text: expected strings, got {t}")))
                .collect::<Result<Vec<_>>>()?;
            crate::sample::prompt::encode_prompts(m, &texts, 3, None).map(clip_output)
        })())
    });
    engine.register_fn("tokenize", |m: &mut Model, s: &str| rt(m.tokenize(s)));
    engine.register_fn("load_embedding", |m: &mut Model, p: &str| rt(m.load_embedding(Path::new(p), None)));
    engine.register_fn("load_embedding", |m: &mut Model, p: &str, word: &str| {
        rt(m.load_embedding(Path::new(p), Some(word)))
    });
    engine.register_get("embeddings", |m: &mut Model| -> rhai::Array {
        m.tokenizer.added_words().into_iter().map(|a| Dynamic::from(a.word)).collect()
    });
    engine.register_fn("encode_ids", |m: &mut Model, ids: Tensor| rt(encode_ids(m, &ids, &Map::new())));
    engine.register_fn("encode_ids", |m: &mut Model, ids: Tensor, o: Map| rt(encode_ids(m, &ids, &o)));
    engine.register_fn("unet", |m: &mut Model, s: Tensor, t: Dynamic, c: Tensor| -> RhaiResult<Tensor> {
        rt(timesteps(t).and_then(|t| m.unet(&s, &t, &c)).and_then(|x| Ok(x.to_dtype(DType::F32)?)))
    });
    engine.register_fn("unet", |m: &mut Model, s: Tensor, t: Dynamic, c: Tensor, y: Tensor| -> RhaiResult<Tensor> {
        rt(timesteps(t).and_then(|t| m.unet_with(&s, &t, &c, Some(&y))).and_then(|x| Ok(x.to_dtype(DType::F32)?)))
    });
    engine.register_fn("sdxl_vector", |m: &mut Model, p: Tensor, ids: Dynamic| rt(sdxl_vector(m, &p, ids)));
    engine.register_fn("vae_encode", |m: &mut Model, i: Tensor| rt(vae_encode(m, &i)));
    engine.register_fn("vae_decode", |m: &mut Model, l: Tensor| {
        rt(m.vae_decode(&l).and_then(|x| Ok(x.to_dtype(DType::F32)?)))
    });
    engine.register_fn("save", |m: &mut Model, p: &str| rt(save(m, p, &Map::new())));
    engine.register_fn("save", |m: &mut Model, p: &str, o: Map| rt(save(m, p, &o)));
}
