//! What a run trains: a LoRA network on the frozen model (sd-scripts' `train_network.py`), the model itself
//! (full fine-tuning: `train_db.py`, `fine_tune.py`), or a new word's vectors (`train_textual_inversion.py`). Each gives the optimizer its parameter groups and saves,
//! restores and describes what it trains; the loop in `trainer.rs` is the same for both.

use super::config::TrainConfig;
use super::optim::ParamGroup;
use super::textual_inversion::TextualInversion;
use crate::models::{SaveFormat, StableDiffusion, Trainables};
use crate::networks::{Component, Network};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The trained part of a run.
pub enum Target {
    /// A LoRA network attached to the frozen model.
    Network(Arc<Network>),
    /// The model's own weights (the trainer's model is the trainable copy these variables belong to).
    Model(FineTune),
    /// A textual-inversion word's vectors, added to the frozen model.
    Embedding(TextualInversion),
}

impl From<Arc<Network>> for Target {
    fn from(n: Arc<Network>) -> Self {
        Target::Network(n)
    }
}

/// Full fine-tuning: the variables of the model copy, and how the model is saved.
pub struct FineTune {
    pub vars: Trainables,
    pub format: SaveFormat,
    /// Two text encoders (their optimizer groups are separate).
    pub sdxl: bool,
    /// `block_lr`: each UNet variable's block (sdxl_train.py's 23) and the blocks' LRs.
    pub blocks: Option<(Vec<usize>, Vec<f64>)>,
    /// The UNet variables of blocks at LR 0: not updated, their gradients still clipped with the rest (as
    /// sdxl_train.py clips every UNet parameter).
    pub frozen: Vec<Var>,
}

/// sdxl_train.py's block of an SDXL UNet parameter by its original (SGM) name: 0 time and label embeddings,
/// 1–9 `input_blocks.N`, 10–12 `middle_block.N`, 13–21 `output_blocks.N`, 22 `out`.
pub fn sdxl_block(sgm: &str) -> Option<usize> {
    let index = |prefix: &str| sgm.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok();
    if sgm.starts_with("time_embed.") || sgm.starts_with("label_emb.") {
        Some(0)
    } else if let Some(i) = index("input_blocks.") {
        Some(1 + i)
    } else if let Some(i) = index("middle_block.") {
        Some(10 + i)
    } else if let Some(i) = index("output_blocks.") {
        Some(13 + i)
    } else {
        sgm.starts_with("out.").then_some(22)
    }
}

/// The 23 LRs of `block_lr`.
fn parse_block_lr(text: &str) -> Result<Vec<f64>> {
    let lrs = text
        .split(',')
        .map(|v| v.trim().parse::<f64>().with_context(|| format!("block_lr: {v:?} is not a number")))
        .collect::<Result<Vec<_>>>()?;
    if lrs.len() != 23 {
        bail!("block_lr must have 23 values (sdxl_train.py's UNet blocks), got {}", lrs.len());
    }
    Ok(lrs)
}

impl FineTune {
    /// Makes the trainable copy of `model` for `cfg`: the UNet always, the text encoder(s) unless
    /// `train_text_encoder` is false (as `train_db.py`, which trains it until `stop_text_encoder_training`).
    /// The weights are f32; with `mixed_precision` the UNet computes in half precision (bf16 stays f32 on the
    /// CPU). The copy is saved as `save_model_as` says, by default in the source's layout (sd-scripts' rule).
    pub fn prepare(model: &StableDiffusion, cfg: &TrainConfig) -> Result<(StableDiffusion, Self)> {
        let format = match cfg.save_model_as.as_deref() {
            None => {
                if model.source.is_dir() {
                    SaveFormat::Diffusers
                } else {
                    SaveFormat::SingleFile
                }
            }
            Some("safetensors") => SaveFormat::SingleFile,
            Some("diffusers" | "diffusers_safetensors") => SaveFormat::Diffusers,
            Some("ckpt") => bail!("save_model_as ckpt: sdtune writes models as safetensors (use \"safetensors\")"),
            Some(other) => {
                bail!(
                    "save_model_as must be safetensors, diffusers or diffusers_safetensors for a model, got {other:?}"
                )
            }
        };
        if !model.is_xl() && (cfg.learning_rate_te1.is_some() || cfg.learning_rate_te2.is_some()) {
            bail!("learning_rate_te1 / learning_rate_te2 are SDXL's (two text encoders); use learning_rate_te");
        }
        // mixed precision: f32 master weights, the UNet computing in half precision (autocast's split)
        let compute = cfg.base_dtype_for(&model.device).unwrap_or(DType::F32);
        let train_te = cfg.train_text_encoder.unwrap_or(true);
        let (lr1, lr2) = te_lrs(cfg);
        let (copy, vars) = model.trainable((train_te && lr1 != 0.0, train_te && lr2 != 0.0), compute)?;
        let (mut blocks, mut frozen) = (None, Vec::new());
        if let Some(text) = &cfg.block_lr {
            if !model.is_xl() {
                bail!("block_lr is sdxl_train.py's per-block LRs of the SDXL UNet; this model is not SDXL");
            }
            let lrs = parse_block_lr(text)?;
            let u = &model.unet.cfg;
            let table = crate::io::keymap::unet_table(u.block_out_channels.len(), u.layers_per_block, &u.up_attn);
            let of = |name: &str| -> Result<usize> {
                let sgm = table.rename(name, crate::io::keymap::Side::Diffusers).unwrap_or_else(|| name.to_string());
                sdxl_block(&sgm).with_context(|| format!("block_lr: no block for the UNet parameter {name} ({sgm})"))
            };
            let index = vars.unet.iter().map(|(n, _)| of(n)).collect::<Result<Vec<_>>>()?;
            frozen =
                vars.unet.iter().zip(&index).filter(|(_, b)| lrs[**b] == 0.0).map(|((_, v), _)| v.clone()).collect();
            blocks = Some((index, lrs));
        }
        Ok((copy, Self { vars, format, sdxl: model.is_xl(), blocks, frozen }))
    }

    /// Every variable with its state name (`unet.`, `text_encoder.`, `text_encoder_2.` + the diffusers name).
    fn named(&self) -> impl Iterator<Item = (String, &Var)> {
        let v = &self.vars;
        [("unet", &v.unet), ("text_encoder", &v.text_encoder), ("text_encoder_2", &v.text_encoder_2)]
            .into_iter()
            .flat_map(|(c, list)| list.iter().map(move |(k, var)| (format!("{c}.{k}"), var)))
    }
}

/// The text encoders' LRs in full fine-tuning: `learning_rate_te1` / `_te2` (SDXL), else `learning_rate_te`, else
/// `learning_rate`, as sdxl_train.py and train_db.py take them.
fn te_lrs(cfg: &TrainConfig) -> (f64, f64) {
    let te = cfg.text_encoder_lr.unwrap_or(cfg.learning_rate);
    (cfg.learning_rate_te1.unwrap_or(te), cfg.learning_rate_te2.unwrap_or(te))
}

/// A LoRA module's trained weights: down (absent for LoRA-FA) and up.
/// A module's trained variables: (those at the group's LR, LoRA's up weight that LoRA+ scales).
type Pair = (Vec<Var>, Option<Var>);

/// A component's optimizer groups: its modules' variables at `lr`, or with LoRA+ the LoRA up weights at
/// `lr · ratio` in a group named "`name` plus" (LoHa and LoKr have none), as sd-scripts' and LyCORIS'
/// `prepare_optimizer_params` make them.
fn lora_groups(name: &str, pairs: Vec<Pair>, lr: f64, loraplus: Option<f64>) -> Vec<ParamGroup> {
    let Some(ratio) = loraplus else {
        let params = pairs.into_iter().flat_map(|(d, u)| d.into_iter().chain(u)).collect();
        return vec![ParamGroup { name: name.to_string(), params, lr }];
    };
    let (downs, ups): (Vec<Vec<Var>>, Vec<Option<Var>>) = pairs.into_iter().unzip();
    let (downs, ups): (Vec<Var>, Vec<Var>) =
        (downs.into_iter().flatten().collect(), ups.into_iter().flatten().collect());
    let mut groups = Vec::new();
    if !downs.is_empty() {
        groups.push(ParamGroup { name: name.to_string(), params: downs, lr });
    }
    if !ups.is_empty() {
        groups.push(ParamGroup { name: format!("{name} plus"), params: ups, lr: lr * ratio });
    }
    groups
}

/// The LoRA options given in `cfg` (they mean nothing without a network: refused rather than ignored).
fn lora_options_given(cfg: &TrainConfig) -> impl Iterator<Item = &'static str> {
    [
        ("network_train_unet_only", cfg.network_train_unet_only),
        ("network_train_text_encoder_only", cfg.network_train_text_encoder_only),
        ("scale_weight_norms", cfg.scale_weight_norms.is_some()),
        ("full_bf16", cfg.full_bf16),
        ("unet_lr", cfg.unet_lr.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
}

impl Target {
    /// Checks that `cfg` asks only what this target can do.
    pub fn check(&self, cfg: &TrainConfig) -> Result<()> {
        if cfg.block_lr.is_some() && !matches!(self, Target::Model(_)) {
            bail!("block_lr is sdxl_train.py's per-block LRs for full fine-tuning of SDXL (no network); networks take down_lr_weight / mid_lr_weight / up_lr_weight (SD 1.x/2.x)");
        }
        match self {
            Target::Network(_) => {
                if cfg.train_text_encoder.is_some() || cfg.save_model_as.is_some() {
                    bail!("train_text_encoder and save_model_as are full fine-tuning options; a network's components are chosen with network_train_unet_only / network_train_text_encoder_only");
                }
                if cfg.token_string.is_some() {
                    bail!("token_string trains a textual-inversion embedding, without a network");
                }
            }
            Target::Embedding(_) => {
                let own = [
                    ("train_text_encoder", cfg.train_text_encoder.is_some()),
                    ("text_encoder_lr / learning_rate_te", cfg.text_encoder_lr.is_some()),
                    ("cache_text_encoder_outputs", cfg.cache_text_encoder_outputs),
                ];
                let mut given = lora_options_given(cfg).chain(own.into_iter().filter_map(|(n, on)| on.then_some(n)));
                if let Some(name) = given.next() {
                    bail!(
                        "{name} does not apply to textual inversion (only the word's vectors train, at learning_rate)"
                    );
                }
                if cfg.save_model_as.as_deref().is_some_and(|s| s != "safetensors") {
                    bail!("save_model_as: textual-inversion embeddings are saved as safetensors");
                }
            }
            Target::Model(_) => {
                if cfg.token_string.is_some() {
                    bail!("token_string trains a textual-inversion embedding, not the model");
                }
                if let Some(name) = lora_options_given(cfg).next() {
                    bail!("{name} is a LoRA option; full fine-tuning (no network) does not take it (the UNet's LR is learning_rate, the text encoder's learning_rate_te)");
                }
            }
        }
        Ok(())
    }

    /// The optimizer's groups: "textencoder" (text_encoder_lr / learning_rate_te, else learning_rate) and "unet"
    /// (for networks also per block LR weight, and LoRA+'s "plus" groups).
    pub fn param_groups(&self, cfg: &TrainConfig) -> Result<Vec<ParamGroup>> {
        let te_lr = cfg.text_encoder_lr.unwrap_or(cfg.learning_rate);
        let unet_lr = cfg.unet_lr.unwrap_or(cfg.learning_rate);
        let mut groups = Vec::new();
        match self {
            Target::Embedding(ti) => {
                groups.push(ParamGroup { name: "embedding".into(), params: ti.vars.clone(), lr: cfg.learning_rate });
            }
            Target::Model(ft) => {
                // SD 1.x/2.x: one "textencoder" group; SDXL: one per encoder (sdxl_train.py's own LRs)
                let (lr1, lr2) = te_lrs(cfg);
                let sdxl = ft.sdxl;
                let v = &ft.vars;
                for (name, vars, lr) in [
                    (if sdxl { "textencoder1" } else { "textencoder" }, &v.text_encoder, lr1),
                    ("textencoder2", &v.text_encoder_2, lr2),
                ] {
                    if !vars.is_empty() {
                        groups.push(ParamGroup {
                            name: name.into(),
                            params: vars.iter().map(|(_, p)| p.clone()).collect(),
                            lr,
                        });
                    }
                }

                match &ft.blocks {
                    None => {
                        let unet = ft.vars.unet.iter().map(|(_, v)| v.clone()).collect();
                        groups.push(ParamGroup { name: "unet".into(), params: unet, lr: unet_lr });
                    }
                    // sdxl_train.py's block_lr: a group per block at its own LR ("block{i}"), none for LR 0
                    Some((index, lrs)) => {
                        for (b, &lr) in lrs.iter().enumerate().filter(|(_, lr)| **lr != 0.0) {
                            let params: Vec<Var> = ft
                                .vars
                                .unet
                                .iter()
                                .zip(index)
                                .filter(|(_, i)| **i == b)
                                .map(|((_, v), _)| v.clone())
                                .collect();
                            if !params.is_empty() {
                                groups.push(ParamGroup { name: format!("block{b}"), params, lr });
                            }
                        }
                    }
                }
            }
            Target::Network(network) => {
                let mut te: Vec<Pair> = Vec::new();
                // UNet parameters grouped by block LR weight (one group without block weights), in first-seen order
                let mut un: Vec<(f64, Vec<Pair>)> = Vec::new();
                for (c, m) in &network.modules {
                    let pair = m.trainable(network.config.lora_fa);
                    match c {
                        Component::TextEncoder if !cfg.network_train_unet_only => te.push(pair),
                        Component::Unet if !cfg.network_train_text_encoder_only => {
                            let w = network.lr_weight(m);
                            match un.iter_mut().find(|(x, _)| *x == w) {
                                Some((_, v)) => v.push(pair),
                                None => un.push((w, vec![pair])),
                            }
                        }
                        _ => {}
                    }
                }
                let plus = network.config.loraplus;
                if !te.is_empty() {
                    groups.extend(lora_groups("textencoder", te, te_lr, plus.ratio(Component::TextEncoder)));
                }
                let single = un.len() == 1;
                for (w, pairs) in un {
                    let name = if single && w == 1.0 { "unet".to_string() } else { format!("unet_block_lr{w}") };
                    groups.extend(lora_groups(&name, pairs, unet_lr * w, plus.ratio(Component::Unet)));
                }
                if groups.is_empty() {
                    bail!("nothing to train: the network has no modules in the components selected for training");
                }
            }
        }
        Ok(groups)
    }

    /// Variables whose gradients count in the clipping norm but are not updated (textual inversion's vocabulary
    /// rows, as sd-scripts clips over the whole table; the UNet blocks `block_lr` leaves at 0).
    pub fn clip_only(&self) -> &[Var] {
        match self {
            Target::Embedding(ti) => &ti.tables,
            Target::Model(ft) => &ft.frozen,
            _ => &[],
        }
    }

    /// The network, if this run trains one.
    pub fn network(&self) -> Option<&Arc<Network>> {
        match self {
            Target::Network(n) => Some(n),
            _ => None,
        }
    }

    /// Training mode (a network's dropouts) on or off, with its dropout stream at `rng`.
    pub fn set_training(&self, on: bool, rng: Option<Rng>) {
        if let Target::Network(n) = self {
            if let Some(r) = rng {
                *n.state.rng.lock().expect("rng lock") = r;
            }
            n.set_training(on);
        }
    }

    /// sd-scripts' `scale_weight_norms` after an optimizer step (networks only: `check` refuses it otherwise).
    pub fn apply_max_norm(&self, max_norm: f64) -> Result<()> {
        if let Target::Network(n) = self {
            n.apply_max_norm(max_norm)?;
        }
        Ok(())
    }

    /// What a saved state holds of the trained weights, in f32 on the CPU.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        match self {
            Target::Network(n) => {
                let mut out = HashMap::new();
                for (_, m) in &n.modules {
                    for (k, t) in m.state()? {
                        let t = if k == "scalar" { t } else { t.to_dtype(DType::F32)? };
                        out.insert(format!("{}.{k}", m.name), t.to_device(&candle_core::Device::Cpu)?);
                    }
                }
                Ok(out)
            }
            Target::Model(ft) => ft
                .named()
                .map(|(k, v)| Ok((k, v.as_tensor().to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?)))
                .collect(),
            Target::Embedding(ti) => ti
                .vars
                .iter()
                .enumerate()
                .map(|(i, v)| Ok((format!("embedding.{i}"), v.as_tensor().to_device(&candle_core::Device::Cpu)?)))
                .collect(),
        }
    }

    /// The file of a saved state that holds `state_tensors`.
    pub fn state_file(&self) -> &'static str {
        match self {
            Target::Network(_) => "network.safetensors",
            Target::Model(_) => "model.safetensors",
            Target::Embedding(_) => "embedding.safetensors",
        }
    }

    /// Sets the trained weights from a saved state's tensors; `dir` names the state in errors.
    pub fn restore(&self, saved: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
        let get = |k: &str| -> Result<&Tensor> {
            saved.get(k).with_context(|| format!("{}: `{k}` missing from the saved weights", dir.display()))
        };
        match self {
            Target::Network(n) => {
                for (_, m) in &n.modules {
                    let scalar = match saved.get(&format!("{}.scalar", m.name)) {
                        Some(s) => Some(s.to_dtype(DType::F64)?.to_scalar::<f64>()?),
                        None => None,
                    };
                    m.restore(|suffix| Ok(get(&format!("{}.{suffix}", m.name))?.clone()), scalar)?;
                }
            }
            Target::Model(ft) => {
                for (k, v) in ft.named() {
                    v.set(&get(&k)?.to_dtype(v.dtype())?.to_device(v.device())?)?;
                }
            }
            Target::Embedding(ti) => {
                for (i, v) in ti.vars.iter().enumerate() {
                    v.set(&get(&format!("embedding.{i}"))?.to_dtype(v.dtype())?.to_device(v.device())?)?;
                }
            }
        }
        Ok(())
    }

    /// Where a save named `name` goes in `dir`: `name.safetensors`, or the folder `name` for a diffusers model.
    pub fn output_path(&self, dir: &Path, name: &str) -> PathBuf {
        match self {
            Target::Model(FineTune { format: SaveFormat::Diffusers, .. }) => dir.join(name),
            _ => dir.join(format!("{name}.safetensors")),
        }
    }

    /// Writes the trained result to `path`: the network (kohya format, sd-scripts' metadata, hashes), the whole
    /// model (single file with ModelSpec metadata, or a diffusers folder), or the embedding (sd-scripts' layout).
    pub fn save(
        &self,
        model: &StableDiffusion,
        path: &Path,
        resolution: (usize, usize),
        training: &BTreeMap<String, String>,
        dtype: DType,
        overwrite: bool,
    ) -> Result<()> {
        let title = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        match self {
            Target::Network(n) => {
                let meta = crate::networks::file::base_metadata(n, &title, resolution, training);
                crate::networks::file::save(n, path, &meta, dtype, overwrite)
            }
            Target::Model(ft) => {
                let spec = crate::io::modelspec::modelspec(
                    model.family,
                    model.v_pred,
                    None,
                    &title,
                    resolution,
                    model.clip_skip,
                );
                model.save_with(path, ft.format, dtype, overwrite, &spec.into_iter().collect())
            }
            Target::Embedding(ti) => {
                if path.exists() && !overwrite {
                    bail!("{}: already exists; pass overwrite to replace it", path.display());
                }
                let mut meta = crate::io::modelspec::modelspec(
                    model.family,
                    model.v_pred,
                    Some("textual-inversion"),
                    &title,
                    resolution,
                    model.clip_skip,
                );
                meta.extend(training.iter().map(|(k, v)| (k.clone(), v.clone())));
                let vectors: Vec<Tensor> = ti.vars.iter().map(|v| v.as_tensor().clone()).collect();
                crate::io::embedding::save(path, &vectors, dtype, &meta.into_iter().collect())
            }
        }
    }

    /// A one-line description for `trainer.options`.
    pub fn describe(&self) -> String {
        match self {
            Target::Network(n) => format!("{:?}", n.config),
            Target::Model(ft) => format!(
                "full fine-tuning: {} UNet tensors, {} text encoder tensors, saved as {:?}",
                ft.vars.unet.len(),
                ft.vars.text_encoder.len() + ft.vars.text_encoder_2.len(),
                ft.format
            ),
            Target::Embedding(ti) => {
                format!("textual inversion: {:?}, {} vectors", ti.word, ti.vars.first().map_or(0, |v| v.dims()[0]))
            }
        }
    }
}
