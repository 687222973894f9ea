//! OpenCLIP text encoders as single files store them (SD2's OpenCLIP-H, SDXL's OpenCLIP-bigG) ↔ transformers'
//! `CLIPTextModel` / `CLIPTextModelWithProjection` names. Keys here are without the file's prefix.

use super::keymap::{openclip_table, rename_all, Side, OPENCLIP_POSITIONAL};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;

/// The pooled-output projection: a bare `[hidden, proj]` matrix in OpenCLIP (`x @ text_projection`), a Linear
/// weight `[proj, hidden]` in transformers.
const PROJECTION: (&str, &str) = ("text_projection", "text_projection.weight");

/// The highest numbered entry under `prefix` plus one (0 when none).
pub fn count_numbered(keys: impl Iterator<Item = String>, prefix: &str) -> usize {
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

/// Removes and returns the entries under `prefix`, without it.
pub fn strip(tensors: &mut HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    let keys: Vec<String> = tensors.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
    keys.into_iter().map(|k| (k[prefix.len()..].to_string(), tensors.remove(&k).expect("key listed above"))).collect()
}

/// OpenCLIP keys → transformers names. With `projection` (SDXL) the pooled projection is kept as
/// `text_projection.weight`; without it (SD2) a 24-layer OpenCLIP-H loses its last layer (SD2 uses the penultimate
/// one), as sd-scripts does, and that layer and `text_projection` go to `extras` under `prefix`, with `logit_scale`.
pub fn to_hf(
    mut te: HashMap<String, Tensor>,
    prefix: &str,
    projection: bool,
    extras: &mut HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let layers = count_numbered(te.keys().cloned(), "transformer.resblocks.");
    let mut keep = layers;
    if layers == 24 && !projection {
        keep = 23;
        for (k, t) in strip(&mut te, "transformer.resblocks.23.") {
            extras.insert(format!("{prefix}transformer.resblocks.23.{k}"), t);
        }
    }
    let mut out = HashMap::new();
    if projection {
        let t = te.remove(PROJECTION.0).with_context(|| format!("missing `{prefix}{}`", PROJECTION.0))?;
        out.insert(PROJECTION.1.to_string(), t.t()?.contiguous()?);
    }
    for k in [PROJECTION.0, "logit_scale"] {
        if let Some(t) = te.remove(k) {
            extras.insert(format!("{prefix}{k}"), t);
        }
    }
    if let Some(t) = te.remove(OPENCLIP_POSITIONAL.0) {
        out.insert(OPENCLIP_POSITIONAL.1.to_string(), t);
    }
    for i in 0..keep {
        for (suffix, part) in [("in_proj_weight", "weight"), ("in_proj_bias", "bias")] {
            let key = format!("transformer.resblocks.{i}.attn.{suffix}");
            let t = te.remove(&key).with_context(|| format!("missing `{prefix}{key}`"))?;
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
        bail!("{} text-encoder keys have no transformers equivalent, e.g. `{prefix}{}`", bad.len(), bad[0]);
    }
    out.extend(renamed);
    Ok(out)
}

/// transformers names → OpenCLIP keys (the inverse of `to_hf`, projection included when present).
pub fn from_hf(te: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let layers = count_numbered(te.keys().cloned(), "text_model.encoder.layers.");
    let mut rest = te.clone();
    let mut out = HashMap::new();
    if let Some(t) = rest.remove(OPENCLIP_POSITIONAL.1) {
        out.insert(OPENCLIP_POSITIONAL.0.to_string(), t);
    }
    if let Some(t) = rest.remove(PROJECTION.1) {
        out.insert(PROJECTION.0.to_string(), t.t()?.contiguous()?);
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

/// A 23-layer OpenCLIP-H text encoder without its original 24th layer (a diffusers SD2 model) is written as
/// sd-scripts does, so that loaders expecting OpenCLIP-H's 24 resblocks accept it: layer 22 copied to 23, and
/// placeholder `text_projection` (ones) and `logit_scale` (1). SD2 uses the penultimate layer, so none of them
/// changes the model's output. `out` holds single-file keys with `prefix`.
pub fn pad_openclip_h(out: &mut HashMap<String, Tensor>, prefix: &str) -> Result<()> {
    let layers =
        count_numbered(out.keys().filter_map(|k| k.strip_prefix(prefix).map(str::to_string)), "transformer.resblocks.");
    if layers != 23 {
        return Ok(());
    }
    let src = format!("{prefix}transformer.resblocks.22.");
    let copies: Vec<(String, Tensor)> = out
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix(&src).map(|rest| (format!("{prefix}transformer.resblocks.23.{rest}"), t.clone()))
        })
        .collect();
    out.extend(copies);
    let ln = &out[&format!("{prefix}ln_final.weight")];
    let (d, dtype, dev) = (ln.dim(0)?, ln.dtype(), ln.device().clone());
    out.entry(format!("{prefix}text_projection")).or_insert(Tensor::ones((d, d), dtype, &dev)?);
    out.entry(format!("{prefix}logit_scale")).or_insert(Tensor::ones((), dtype, &dev)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    const SD2: &str = "cond_stage_model.model.";

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
        let hf = to_hf(m, SD2, false, &mut extras).unwrap();
        assert!(hf.contains_key("text_model.encoder.layers.22.self_attn.q_proj.weight"));
        assert!(!hf.keys().any(|k| k.contains("layers.23.")));
        assert!(extras.contains_key("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"));
        assert!(extras.contains_key("cond_stage_model.model.text_projection"));
        // and back: the same 24 resblocks come out (22 from the model, 23 from extras)
        let back = from_hf(&hf).unwrap();
        assert_eq!(count_numbered(back.keys().cloned(), "transformer.resblocks."), 23);
    }

    #[test]
    fn a_projected_encoder_keeps_every_layer_and_the_transposed_projection() {
        let mut m = openclip_layers(24, 4);
        let proj = Tensor::arange(0f32, 12., &Device::Cpu).unwrap().reshape((4, 3)).unwrap();
        m.insert("text_projection".into(), proj.clone());
        let mut extras = HashMap::new();
        let hf = to_hf(m, "conditioner.embedders.1.model.", true, &mut extras).unwrap();
        assert!(hf.contains_key("text_model.encoder.layers.23.self_attn.q_proj.weight"));
        assert_eq!(hf["text_projection.weight"].dims(), &[3, 4]);
        assert!(extras.is_empty());
        let back = from_hf(&hf).unwrap();
        assert_eq!(back["text_projection"].to_vec2::<f32>().unwrap(), proj.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn a_23_layer_text_encoder_is_padded_like_sd_scripts() {
        let mut out: HashMap<String, Tensor> =
            openclip_layers(23, 4).into_iter().map(|(k, t)| (format!("{SD2}{k}"), t)).collect();
        pad_openclip_h(&mut out, SD2).unwrap();
        let l22 = &out["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"];
        let l23 = &out["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"];
        assert_eq!(l22.to_vec2::<f32>().unwrap(), l23.to_vec2::<f32>().unwrap());
        assert_eq!(out["cond_stage_model.model.text_projection"].dims(), &[4, 4]);
        assert!(out.contains_key("cond_stage_model.model.logit_scale"));
        let mut three: HashMap<String, Tensor> =
            openclip_layers(3, 4).into_iter().map(|(k, t)| (format!("{SD2}{k}"), t)).collect();
        let before = three.len();
        pad_openclip_h(&mut three, SD2).unwrap();
        assert_eq!(three.len(), before, "only OpenCLIP-H's 23 layers are padded");
    }
}
