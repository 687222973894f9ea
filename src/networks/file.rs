//! kohya-format network files: reading (type detection, name matching, family checks) and writing (keys, alpha,
//! `ss_*` metadata, `sshs_*` hashes, ModelSpec), atomically.

use super::lora::{Dropouts, LoraModule};
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

/// Network types recognised by their keys: (key fragment, type name, supported).
const NETWORK_TYPES: &[(&str, &str, bool)] = &[
    (".lora_down.weight", "LoRA", true),
    (".hada_w1_a", "LoHa", false),
    (".lokr_w1", "LoKr", false),
    (".oft_blocks", "OFT", false),
    (".diff", "full diff", false),
    (".dylora_down", "DyLoRA", false),
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
    let kind = NETWORK_TYPES.iter().find(|(frag, _, _)| keys.iter().any(|k| k.contains(frag)));
    match kind {
        None => bail!("{name}: not a network file: no LoRA/LyCORIS keys (expected `<module>.lora_down.weight` and `.lora_up.weight`)"),
        Some((_, t, false)) => bail!("{name}: {t} networks are not supported yet (LoRA and LoRA-C3Lier are)"),
        Some(_) => {}
    }
    let by_name: HashMap<String, (Component, crate::nn::adapter::LayerInfo)> =
        super::named_layers(model).into_iter().map(|(c, l, n)| (n, (c, l))).collect();
    let mut module_names: Vec<String> =
        keys.iter().filter_map(|k| k.strip_suffix(".lora_down.weight")).map(String::from).collect();
    module_names.sort();
    let unknown: Vec<&String> = module_names.iter().filter(|n| !by_name.contains_key(*n)).collect();
    if !unknown.is_empty() {
        bail!(
            "{name}: {} of {} modules do not exist in this {} model (e.g. `{}`): is the network for another model family?",
            unknown.len(),
            module_names.len(),
            model.family.info().label,
            unknown[0]
        );
    }
    let state = new_state(Dropouts::default(), 0);
    let mut modules = Vec::new();
    let (mut dim, mut alpha0, mut conv) = (0, 0.0, None);
    for m in &module_names {
        let (c, layer) = by_name[m].clone();
        let down = f.tensors[&format!("{m}.lora_down.weight")].to_dtype(DType::F32)?;
        let up = f
            .tensors
            .get(&format!("{m}.lora_up.weight"))
            .with_context(|| format!("{name}: `{m}.lora_up.weight` is missing"))?
            .to_dtype(DType::F32)?;
        let r = down.dims()[0];
        let ok = match &layer.kind {
            LayerKind::Linear { in_features, out_features } => {
                down.dims() == [r, *in_features] && up.dims() == [*out_features, r]
                    || down.dims() == [r, *in_features, 1, 1] && up.dims() == [*out_features, r, 1, 1]
            }
            LayerKind::Conv { in_channels, out_channels, kernel, .. } => {
                down.dims() == [r, *in_channels, kernel.0, kernel.1] && up.dims() == [*out_channels, r, 1, 1]
            }
        };
        if !ok {
            bail!(
                "{name}: module `{m}` has down {:?} / up {:?}, which do not fit the model's layer {:?}: is the network for another model family?",
                down.dims(),
                up.dims(),
                layer.kind
            );
        }
        // a 4-D 1×1 LoRA on a Linear layer (SD2 single-file quirk) is used as 2-D
        let (down, up) = if matches!(layer.kind, LayerKind::Linear { .. }) && down.rank() == 4 {
            (down.squeeze(3)?.squeeze(2)?, up.squeeze(3)?.squeeze(2)?)
        } else {
            (down, up)
        };
        let alpha = match f.tensors.get(&format!("{m}.alpha")) {
            Some(a) => a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?.first().copied().unwrap_or(r as f64),
            None => r as f64,
        };
        match &layer.kind {
            LayerKind::Conv { kernel, .. } if *kernel != (1, 1) => conv = Some((r, alpha)),
            _ => {
                dim = r;
                alpha0 = alpha;
            }
        }
        modules.push((
            c,
            Arc::new(LoraModule {
                name: m.clone(),
                layer,
                down: Var::from_tensor(&down)?,
                up: Var::from_tensor(&up)?,
                alpha,
                state: state.clone(),
            }),
        ));
    }
    let config = NetworkConfig {
        dim,
        alpha: alpha0,
        conv_dim: conv.map(|c| c.0),
        conv_alpha: conv.map(|c| c.1),
        train_text_encoder: modules.iter().any(|(c, _)| *c == Component::TextEncoder),
        train_unet: modules.iter().any(|(c, _)| *c == Component::Unet),
        ..Default::default()
    };
    Ok(Network {
        state,
        modules,
        family: model.family,
        base: super::BaseModel::of(model),
        config,
        metadata: f.metadata.into_iter().collect(),
    })
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
    m.insert("ss_network_module".into(), if c.lora_fa { "networks.lora_fa" } else { "networks.lora" }.into());
    m.insert("ss_network_dim".into(), c.dim.to_string());
    m.insert("ss_network_alpha".into(), py_float(c.alpha));
    m.insert("ss_network_dropout".into(), c.dropouts.neuron.map(py_float).unwrap_or_else(|| "None".into()));
    // Python's json.dumps of the network_args dict (values are the strings given), in insertion order
    let mut args: Vec<(String, String)> = Vec::new();
    if let Some(d) = c.conv_dim {
        args.push(("conv_dim".into(), d.to_string()));
        args.push(("conv_alpha".into(), py_float(c.conv_alpha.unwrap_or(1.0))));
    }
    if let Some(p) = c.dropouts.rank {
        args.push(("rank_dropout".into(), py_float(p)));
    }
    if let Some(p) = c.dropouts.module {
        args.push(("module_dropout".into(), py_float(p)));
    }
    args.extend(c.blocks.given.iter().cloned());
    args.extend(c.loraplus.args().into_iter().map(|(k, v)| (k, py_float(v))));
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
