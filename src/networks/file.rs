//! kohya-format network files: reading (type detection, name matching, family checks) and writing (keys, alpha,
//! `ss_*` metadata, `sshs_*` hashes, ModelSpec), atomically.

use super::lycoris::{Algo, LycorisConfig};
use super::module::{Dropouts, Factors, Half, Module};
use super::{new_state, Component, Network, NetworkConfig};
use crate::io::py::{py_float, Py};
use crate::models::{Family, StableDiffusion};
use crate::nn::adapter::LayerKind;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

/// The key that marks a module of each supported type: (key suffix, type).
const MODULE_MARKERS: &[(&str, &str)] =
    &[(".lora_down.weight", "LoRA"), (".hada_w1_a", "LoHa"), (".lokr_w1", "LoKr"), (".lokr_w1_a", "LoKr")];

/// Keys of network types and options not supported: (key fragment, what it is).
const UNSUPPORTED: &[(&str, &str)] = &[
    (".lokr_t2", "Tucker-decomposed LoKr (use_tucker)"),
    (".oft_blocks", "OFT"),
    (".oft_diag", "OFT"),
    (".diff", "full diff"),
    (".dylora_down", "DyLoRA"),
    (".on_input", "(IA)³"),
    (".a1.weight", "GLoRA"),
];

/// Key prefixes of SDXL networks (SGM UNet names, two text encoders).
const SDXL_MARKERS: &[&str] =
    &["lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"];

/// Reads a network file for `model` (modules matched by kohya name; shapes checked).
pub fn load(path: &Path, model: &StableDiffusion) -> Result<Network> {
    let name = path.display().to_string();
    let f = crate::io::tensors::read_safetensors(path, None, &model.device)?;
    let keys: Vec<&String> = f.tensors.keys().collect();
    let xl_network = keys.iter().any(|k| SDXL_MARKERS.iter().any(|m| k.starts_with(m)));
    if xl_network != (model.family == Family::Sdxl) {
        let what = if xl_network {
            "an SDXL network (keys like `lora_te1_*` / `lora_unet_input_blocks_*`)"
        } else {
            "an SD 1.x/2.x network"
        };
        bail!(
            "{name}: this is {what}, and the model is {}: a network only fits the model family it was trained for",
            model.family.info().label
        );
    }
    if let Some((frag, what)) = UNSUPPORTED.iter().find(|(frag, _)| keys.iter().any(|k| k.contains(frag))) {
        bail!("{name}: a {what} network (keys `*{frag}*`), which is not supported yet (LoRA, LoCon/C3Lier, LoHa and LoKr are)");
    }
    let mut module_names: Vec<(String, &str)> = keys
        .iter()
        .filter_map(|k| MODULE_MARKERS.iter().find_map(|(m, t)| k.strip_suffix(m).map(|n| (n.to_string(), *t))))
        .collect();
    if module_names.is_empty() {
        bail!("{name}: not a network file: no LoRA/LyCORIS keys (expected e.g. `<module>.lora_down.weight` and `.lora_up.weight`, or LyCORIS' `.hada_w1_a` / `.lokr_w1`)");
    }
    module_names.sort();
    let by_name: HashMap<String, (Component, crate::nn::adapter::LayerInfo)> =
        super::named_layers(model).into_iter().map(|(c, l, n)| (n, (c, l))).collect();
    let unknown: Vec<&String> = module_names.iter().map(|(n, _)| n).filter(|n| !by_name.contains_key(*n)).collect();
    if !unknown.is_empty() {
        bail!(
            "{name}: {} of {} modules do not exist in this {} model (e.g. `{}`): is the network for another model family?",
            unknown.len(),
            module_names.len(),
            model.family.info().label,
            unknown[0]
        );
    }
    // LyCORIS' forward (ΔW rebuilt; the same outputs, other dropouts and max-norm) for its files
    let lycoris_file = f.metadata.get("ss_network_module").is_some_and(|m| m.starts_with("lycoris"))
        || module_names.iter().any(|(_, t)| *t != "LoRA")
        || keys.iter().any(|k| k.ends_with(".lora_mid.weight") || k.ends_with(".dora_scale"));
    let state = new_state(Dropouts::default(), 0, lycoris_file);
    let mut modules = Vec::new();
    let (mut dim, mut alpha0, mut conv, mut algo) = (0, 0.0, None, None);
    for (m, kind) in &module_names {
        let (c, layer) = by_name[m].clone();
        let get = |suffix: &str| -> Result<Tensor> {
            Ok(f.tensors
                .get(&format!("{m}.{suffix}"))
                .with_context(|| format!("{name}: `{m}.{suffix}` is missing"))?
                .to_dtype(DType::F32)?)
        };
        let has = |suffix: &str| f.tensors.contains_key(&format!("{m}.{suffix}"));
        let factors = match *kind {
            "LoRA" => {
                let mid = if has("lora_mid.weight") { Some(get("lora_mid.weight")?) } else { None };
                lora_factors(&name, m, &layer.kind, get("lora_down.weight")?, get("lora_up.weight")?, mid)?
            }
            "LoHa" => {
                let [w1a, w1b, w2a, w2b] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"].map(&get);
                let t = if has("hada_t1") { Some((get("hada_t1")?, get("hada_t2")?)) } else { None };
                loha_factors(&name, m, &layer.kind, [w1a?, w1b?, w2a?, w2b?], t)?
            }
            _ => {
                let half = |full: &str, a: &str, b: &str| -> Result<Half> {
                    match f.tensors.contains_key(&format!("{m}.{full}")) {
                        true => Ok(Half::Full(Var::from_tensor(&get(full)?)?)),
                        false => {
                            let b = get(b)?;
                            let b = b.reshape((b.dims()[0], ()))?;
                            Ok(Half::LowRank(Var::from_tensor(&get(a)?)?, Var::from_tensor(&b)?))
                        }
                    }
                };
                let (w1, w2) = (half("lokr_w1", "lokr_w1_a", "lokr_w1_b")?, half("lokr_w2", "lokr_w2_a", "lokr_w2_b")?);
                check_lokr(&name, m, &layer.kind, &w1, &w2)?;
                Factors::Lokr { w1, w2 }
            }
        };
        if *kind != "LoRA" {
            algo = algo.or(Some(if *kind == "LoHa" { Algo::Loha } else { Algo::Lokr }));
        }
        if lycoris_file && *kind == "LoRA" {
            algo = algo.or(Some(Algo::Locon));
        }
        let r = factors.rank();
        let alpha = match f.tensors.get(&format!("{m}.alpha")) {
            Some(a) => a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?.first().copied(),
            None => None,
        }
        .unwrap_or(r.unwrap_or(1) as f64);
        match &layer.kind {
            LayerKind::Conv { kernel, .. } if *kernel != (1, 1) => conv = Some((r.unwrap_or(1), alpha)),
            _ => {
                dim = r.unwrap_or(1);
                alpha0 = alpha;
            }
        }
        let dora = match f.tensors.get(&format!("{m}.dora_scale")) {
            Some(d) => Some(Var::from_tensor(&dora_shape(&name, m, &layer.kind, d)?)?),
            None => None,
        };
        modules.push((c, Arc::new(Module::new(m.clone(), layer, factors, alpha, state.clone()).with_dora(dora))));
    }
    let metadata: BTreeMap<String, String> = f.metadata.into_iter().collect();
    let lycoris = algo.map(|algo| lycoris_from_metadata(algo, &metadata));
    let config = NetworkConfig {
        dim,
        alpha: alpha0,
        conv_dim: conv.map(|c| c.0),
        conv_alpha: conv.map(|c| c.1),
        train_text_encoder: modules.iter().any(|(c, _)| *c == Component::TextEncoder),
        train_unet: modules.iter().any(|(c, _)| *c == Component::Unet),
        lycoris,
        ..Default::default()
    };
    Ok(Network { state, modules, family: model.family, base: super::BaseModel::of(model), config, metadata })
}

/// A LoRA / LoCon module's factors, checked against its layer (a 4-D 1×1 LoRA on a Linear layer, an SD2
/// single-file quirk, is used as 2-D). With `mid` (Tucker): a 1×1 down, the layer's k×k mid, a 1×1 up.
fn lora_factors(
    file: &str,
    m: &str,
    kind: &LayerKind,
    down: Tensor,
    up: Tensor,
    mid: Option<Tensor>,
) -> Result<Factors> {
    let r = down.dims()[0];
    let ok = match (kind, &mid) {
        (LayerKind::Linear { in_features, out_features }, None) => {
            down.dims() == [r, *in_features] && up.dims() == [*out_features, r]
                || down.dims() == [r, *in_features, 1, 1] && up.dims() == [*out_features, r, 1, 1]
        }
        (LayerKind::Conv { in_channels, out_channels, kernel, .. }, None) => {
            down.dims() == [r, *in_channels, kernel.0, kernel.1] && up.dims() == [*out_channels, r, 1, 1]
        }
        (LayerKind::Conv { in_channels, out_channels, kernel, .. }, Some(mid)) => {
            down.dims() == [r, *in_channels, 1, 1]
                && mid.dims() == [r, r, kernel.0, kernel.1]
                && up.dims() == [*out_channels, r, 1, 1]
        }
        (LayerKind::Linear { .. }, Some(_)) => false,
    };
    if !ok {
        let mid = mid.as_ref().map(|t| format!(" / mid {:?}", t.dims())).unwrap_or_default();
        bail!(
            "{file}: module `{m}` has down {:?}{mid} / up {:?}, which do not fit the model's layer {kind:?}: is the network for another model family?",
            down.dims(),
            up.dims(),
        );
    }
    let (down, up) = if matches!(kind, LayerKind::Linear { .. }) && down.rank() == 4 {
        (down.squeeze(3)?.squeeze(2)?, up.squeeze(3)?.squeeze(2)?)
    } else {
        (down, up)
    };
    let mid = mid.map(|t| Var::from_tensor(&t)).transpose()?;
    Ok(Factors::Lora { down: Var::from_tensor(&down)?, up: Var::from_tensor(&up)?, mid })
}

/// A DoRA magnitude checked against its layer: [out, 1, …] (per output row) or [1, in, …] (per input column), in
/// f32 (a 2-D [out, 1] on a layer loaded as 4-D is reshaped).
fn dora_shape(file: &str, m: &str, kind: &LayerKind, d: &Tensor) -> Result<Tensor> {
    let shape = super::module::weight_shape(kind);
    let (mut rows, mut cols) = (vec![1usize; shape.len()], vec![1usize; shape.len()]);
    rows[0] = shape[0];
    cols[1] = shape[1];
    let n = d.elem_count();
    if n == shape[0] && d.dims().first() == Some(&shape[0]) {
        Ok(d.to_dtype(DType::F32)?.reshape(rows)?)
    } else if n == shape[1] && d.dims().first() == Some(&1) {
        Ok(d.to_dtype(DType::F32)?.reshape(cols)?)
    } else {
        bail!("{file}: `{m}.dora_scale` has shape {:?}, which does not fit the model's layer {kind:?} (expected [{}, 1, …] or [1, {}, …])", d.dims(), shape[0], shape[1])
    }
}

/// The layer's weight as a matrix: (rows, columns with the kernel flattened in).
fn matrix_shape(kind: &LayerKind) -> (usize, usize) {
    let s = super::module::weight_shape(kind);
    (s[0], s[1..].iter().product())
}

/// A LoHa module's factors, checked: `w1a` [out, r], `w1b` [r, in·k·k], the same for `w2`; with Tucker
/// decomposition (`t`) `w1a` [r, out], `w1b` [r, in] and `t1` [r, r, k, k].
fn loha_factors(
    file: &str,
    m: &str,
    kind: &LayerKind,
    [w1a, w1b, w2a, w2b]: [Tensor; 4],
    t: Option<(Tensor, Tensor)>,
) -> Result<Factors> {
    let (out, cols) = matrix_shape(kind);
    let shape = super::module::weight_shape(kind);
    let v = |t: &Tensor| Var::from_tensor(t);
    let fits = match &t {
        None => {
            let (w1b, w2b) = (w1b.reshape((w1b.dims()[0], ()))?, w2b.reshape((w2b.dims()[0], ()))?);
            let fits = |a: &Tensor, b: &Tensor| a.dims() == [out, b.dims()[0]] && b.dims()[1] == cols;
            if fits(&w1a, &w1b) && fits(&w2a, &w2b) {
                return Ok(Factors::Loha { w1a: v(&w1a)?, w1b: v(&w1b)?, w2a: v(&w2a)?, w2b: v(&w2b)?, t: None });
            }
            false
        }
        Some((t1, t2)) => {
            let fits = |a: &Tensor, b: &Tensor, t: &Tensor| {
                shape.len() == 4
                    && a.dims() == [a.dims()[0], out]
                    && b.dims() == [b.dims()[0], shape[1]]
                    && t.dims() == [a.dims()[0], b.dims()[0], shape[2], shape[3]]
            };
            fits(&w1a, &w1b, t1) && fits(&w2a, &w2b, t2)
        }
    };
    if !fits {
        bail!(
            "{file}: LoHa module `{m}` has hada_w1_a {:?}, hada_w1_b {:?}, hada_w2_a {:?}, hada_w2_b {:?}{}, which do not fit the model's layer {kind:?}: is the network for another model family?",
            w1a.dims(), w1b.dims(), w2a.dims(), w2b.dims(),
            t.as_ref().map(|(t1, _)| format!(", hada_t1 {:?}", t1.dims())).unwrap_or_default()
        );
    }
    let (t1, t2) = t.expect("checked: Tucker factors");
    Ok(Factors::Loha { w1a: v(&w1a)?, w1b: v(&w1b)?, w2a: v(&w2a)?, w2b: v(&w2b)?, t: Some((v(&t1)?, v(&t2)?)) })
}

/// Checks that `w1 ⊗ w2` has the layer's weight shape.
fn check_lokr(file: &str, m: &str, kind: &LayerKind, w1: &Half, w2: &Half) -> Result<()> {
    let shape = |h: &Half| -> (usize, usize) {
        match h {
            Half::Full(w) => {
                let d = w.as_tensor().dims();
                (d[0], d[1..].iter().product())
            }
            Half::LowRank(a, b) => (a.as_tensor().dims()[0], b.as_tensor().dims()[1]),
        }
    };
    let low_rank_fits = |h: &Half| match h {
        Half::Full(w) => w.as_tensor().rank() >= 2,
        Half::LowRank(a, b) => a.as_tensor().rank() == 2 && a.as_tensor().dims()[1] == b.as_tensor().dims()[0],
    };
    let ((a, c), (b, d)) = (shape(w1), shape(w2));
    if !low_rank_fits(w1) || !low_rank_fits(w2) || (a * b, c * d) != matrix_shape(kind) {
        bail!(
            "{file}: LoKr module `{m}` gives a {}×{} ΔW, which does not fit the model's layer {kind:?}: is the network for another model family?",
            a * b,
            c * d
        );
    }
    Ok(())
}

/// The LyCORIS options recorded in a file's `ss_network_args` (preset, factor, decompose_both), as far as known.
fn lycoris_from_metadata(algo: Algo, metadata: &BTreeMap<String, String>) -> LycorisConfig {
    let args: Vec<(String, String)> = metadata
        .get("ss_network_args")
        .and_then(|s| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(s).ok())
        .map(|m| {
            m.into_iter().map(|(k, v)| (k, v.as_str().map(String::from).unwrap_or_else(|| v.to_string()))).collect()
        })
        .unwrap_or_default();
    let arg = |k: &str| args.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    LycorisConfig {
        algo,
        preset: arg("preset").and_then(|p| LycorisConfig::preset(p).ok()).unwrap_or(&super::lycoris::PRESETS[0]),
        factor: arg("factor").and_then(|f| f.parse().ok()).unwrap_or(-1),
        decompose_both: arg("decompose_both").is_some_and(|v| v.eq_ignore_ascii_case("true")),
        dora: arg("dora_wd")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
            .then(|| !arg("wd_on_output").is_some_and(|v| v.eq_ignore_ascii_case("false"))),
        tucker: ["use_tucker", "use_cp", "use_conv_cp"]
            .iter()
            .any(|k| arg(k).is_some_and(|v| v.eq_ignore_ascii_case("true"))),
        args,
    }
}

/// `sshs_model_hash` and `sshs_legacy_hash` as sd-scripts computes them: over a serialisation carrying only the
/// `ss_*` metadata, the sha256 of the tensor data after the header, and 8 hex of the sha256 of 64 KiB at 1 MiB.
pub fn sshs_hashes(tensors: &HashMap<String, Tensor>, metadata: &BTreeMap<String, String>) -> Result<(String, String)> {
    let ss: HashMap<String, String> =
        metadata.iter().filter(|(k, _)| k.starts_with("ss_")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let bytes = crate::io::tensors::serialize_safetensors(tensors, &ss)?;
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let model_hash = format!("{:x}", Sha256::digest(&bytes[8 + n..]));
    let legacy_slice = if bytes.len() > 0x100000 { &bytes[0x100000..bytes.len().min(0x110000)] } else { &[][..] };
    let legacy = format!("{:x}", Sha256::digest(legacy_slice))[..8].to_string();
    Ok((model_hash, legacy))
}

/// Metadata every network file gets: the network description (`ss_network_*`, `ss_v2`, `ss_base_model_version`)
/// and ModelSpec keys; `extra` (training metadata) is merged over it.
pub fn base_metadata(
    net: &Network,
    title: &str,
    resolution: (usize, usize),
    extra: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let (version, _, _) = crate::io::modelspec::model_version(net.family, net.base.v_pred);
    let mut m = BTreeMap::new();
    let c = &net.config;
    let module = match (&c.lycoris, c.lora_fa) {
        (Some(_), _) => "lycoris.kohya",
        (None, true) => "networks.lora_fa",
        (None, false) => "networks.lora",
    };
    m.insert("ss_network_module".into(), module.into());
    m.insert("ss_network_dim".into(), c.dim.to_string());
    m.insert("ss_network_alpha".into(), py_float(c.alpha));
    m.insert("ss_network_dropout".into(), c.dropouts.neuron.map(py_float).unwrap_or_else(|| "None".into()));
    // Python's json.dumps of the network_args dict (values are the strings given), in insertion order
    let mut args: Vec<(String, String)> = Vec::new();
    if let Some(ly) = &c.lycoris {
        // LyCORIS networks: the network_args as given (sd-scripts records them as strings)
        args.extend(ly.args.iter().cloned());
    } else if let Some(d) = c.conv_dim {
        args.push(("conv_dim".into(), d.to_string()));
        args.push(("conv_alpha".into(), py_float(c.conv_alpha.unwrap_or(1.0))));
    }
    if c.lycoris.is_none() {
        if let Some(p) = c.dropouts.rank {
            args.push(("rank_dropout".into(), py_float(p)));
        }
        if let Some(p) = c.dropouts.module {
            args.push(("module_dropout".into(), py_float(p)));
        }
        args.extend(c.blocks.given.iter().cloned());
        args.extend(c.loraplus.args().into_iter().map(|(k, v)| (k, py_float(v))));
    }
    if !args.is_empty() {
        let dict = Py::Dict(args.into_iter().map(|(k, v)| (k, Py::Str(v))).collect());
        m.insert("ss_network_args".into(), dict.dumps());
    }
    m.insert("ss_v2".into(), if net.family == Family::Sd2 { "True" } else { "False" }.into());
    m.insert("ss_base_model_version".into(), version.into());
    m.insert("ss_sd_model_name".into(), net.base.name.clone());
    m.extend(crate::io::modelspec::modelspec(
        net.family,
        net.base.v_pred,
        Some("lora"),
        title,
        resolution,
        net.base.clip_skip,
    ));
    for (k, v) in extra {
        m.insert(k.clone(), v.clone());
    }
    m
}

/// Writes the network in kohya's format (atomically), adding the `sshs_*` hashes; refuses to replace a file
/// unless `overwrite`.
pub fn save(
    net: &Network,
    path: &Path,
    metadata: &BTreeMap<String, String>,
    dtype: DType,
    overwrite: bool,
) -> Result<()> {
    if path.exists() && !overwrite {
        bail!("{}: already exists; pass overwrite to replace it", path.display());
    }
    let tensors = net.state_dict(dtype)?;
    let mut meta = metadata.clone();
    let (h, l) = sshs_hashes(&tensors, &meta)?;
    meta.insert("sshs_model_hash".into(), h);
    meta.insert("sshs_legacy_hash".into(), l);
    crate::io::tensors::write_safetensors(path, &tensors, &meta.into_iter().collect())
}
