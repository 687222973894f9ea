//! SAI ModelSpec metadata (`modelspec.*`) and sd-scripts' base-model labels, per family, as sd-scripts writes them.

use crate::models::Family;
use std::collections::BTreeMap;

/// sd-scripts' `ss_base_model_version`, the ModelSpec architecture and the ModelSpec implementation of a family.
pub fn model_version(family: Family, v_pred: bool) -> (&'static str, &'static str, &'static str) {
    const DIFFUSERS: &str = "diffusers";
    const SGM: &str = "https://github.com/Stability-AI/generative-models";
    match (family, v_pred) {
        (Family::Sd1, false) => ("sd_v1", "stable-diffusion-v1", DIFFUSERS),
        (Family::Sd1, true) => ("sd_v1_v", "stable-diffusion-v1", DIFFUSERS),
        (Family::Sd2, false) => ("sd_v2", "stable-diffusion-v2-512", DIFFUSERS),
        (Family::Sd2, true) => ("sd_v2_v", "stable-diffusion-v2-768-v", DIFFUSERS),
        (Family::Sdxl, _) => ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", SGM),
    }
}

/// The ModelSpec keys of a file trained on a `family` model: `kind` is the architecture's suffix (`"lora"`;
/// none for a whole model).
pub fn modelspec(
    family: Family,
    v_pred: bool,
    kind: Option<&str>,
    title: &str,
    resolution: (usize, usize),
    clip_skip: usize,
) -> BTreeMap<String, String> {
    let (_, arch, implementation) = model_version(family, v_pred);
    let mut m = BTreeMap::new();
    m.insert("modelspec.sai_model_spec".into(), "1.0.1".into());
    m.insert("modelspec.architecture".into(), kind.map_or(arch.to_string(), |k| format!("{arch}/{k}")));
    m.insert("modelspec.implementation".into(), implementation.into());
    m.insert("modelspec.title".into(), title.into());
    m.insert("modelspec.resolution".into(), format!("{}x{}", resolution.0, resolution.1));
    m.insert("modelspec.prediction_type".into(), if v_pred { "v" } else { "epsilon" }.into());
    m.insert("modelspec.date".into(), crate::io::time::iso8601(crate::io::time::now().as_secs() as i64));
    m.insert("modelspec.encoder_layer".into(), clip_skip.to_string());
    m
}
