//! A loaded SD1/SD2/SDXL model: components built from a checkpoint, plus its family facts and configs.

use super::clip::{Activation, ClipConfig, ClipOutput, ClipTextModel};
use super::tokenizer::ClipTokenizer;
use super::unet::{sdxl_vector, HeadSpec, UNet, UNetConfig, UNetHyper};
use super::vae::{Posterior, Vae, VaeConfig};
use super::Family;
use crate::io::checkpoint::{self, Checkpoint, Components, DiffusersConfigs};
use crate::nn::adapter::Registry;
use crate::nn::Weights;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Options of `load_model`.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub family: Option<Family>,
    pub v_pred: Option<bool>,
    pub vae: Option<PathBuf>,
    pub dtype: DType,
    pub device: Device,
    pub clip_skip: usize,
    /// A diffusers folder whose configs supply what tensor shapes cannot (heads, groups).
    pub config: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            family: None,
            v_pred: None,
            vae: None,
            dtype: DType::F32,
            device: Device::Cpu,
            clip_skip: 1,
            config: None,
        }
    }
}

/// Output layout of `save`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SaveFormat {
    SingleFile,
    Diffusers,
}

/// A Stable Diffusion 1.x / 2.x / XL model.
pub struct StableDiffusion {
    pub family: Family,
    pub v_pred: bool,
    pub clip_skip: usize,
    pub vae_scale: f64,
    pub dtype: DType,
    /// The VAE's compute dtype: `dtype`, except f32 for a VAE that overflows in f16 (SDXL's, `force_upcast`).
    pub vae_dtype: DType,
    pub device: Device,
    pub source: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    /// SDXL's second text encoder (OpenCLIP-bigG with its pooled projection).
    pub text_encoder_2: Option<ClipTextModel>,
    /// The padding id of SDXL's second tokenizer (`!`, 0).
    pub pad_id_2: u32,
    pub unet: UNet,
    pub vae: Vae,
    /// The weights in diffusers names, kept for saving.
    pub components: Components,
    /// The text encoder's adaptable layers (for networks).
    pub te_layers: Registry,
    /// SDXL's second text encoder's adaptable layers.
    pub te2_layers: Registry,
    /// The UNet's adaptable layers (for networks).
    pub unet_layers: Registry,
    pub scheduler_config: Value,
    pub metadata: HashMap<String, String>,
}

fn warn(msg: &str) {
    eprintln!("warning: {msg}");
}

/// GroupNorm groups when no config says: 32 as in every SD release; for test models too narrow for 32, half the
/// first width (the convention of the project's tiny fixtures). A warning says so.
fn default_groups(first_width: usize, widths: &[usize], what: &str) -> usize {
    if widths.iter().all(|w| w % 32 == 0) {
        32
    } else {
        let g = (first_width / 2).max(1);
        warn(&format!("{what}: widths {widths:?} are not multiples of 32 and no config.json was found; assuming {g} GroupNorm groups"));
        g
    }
}

impl StableDiffusion {
    /// Loads a single-file checkpoint or a diffusers folder.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        if opts.dtype == DType::BF16 && opts.device.is_cpu() {
            bail!(
                "dtype bf16 is not supported on the CPU (candle has no bf16 convolution there); use \"f32\" or \"f16\""
            );
        }
        let ck = checkpoint::load(path, opts.family, opts.dtype, &opts.device, opts.config.as_deref())?;
        Self::from_checkpoint(ck, path, opts)
    }

    fn from_checkpoint(mut ck: Checkpoint, path: &Path, opts: &LoadOptions) -> Result<Self> {
        let family = ck.family;
        if let Some(vae_path) = &opts.vae {
            ck.components.vae = load_vae_only(vae_path, opts)?;
        }
        let cfgs = &ck.configs;
        let src = path.display().to_string();

        // Text encoders.
        let te_layers = Registry::default();
        let te2_layers = Registry::default();
        let unet_layers = Registry::default();
        let te_w = Weights::new(ck.components.text_encoder.clone(), &format!("{src} (text encoder)"))
            .with_registry(te_layers.clone());
        let default_act = if family == Family::Sd2 { Activation::Gelu } else { Activation::QuickGelu };
        let text_encoder = build_text_encoder(&te_w, cfgs.text_encoder.as_ref(), default_act, &src)?;
        let text_encoder_2 = match family {
            Family::Sdxl => {
                let w = Weights::new(ck.components.text_encoder_2.clone(), &format!("{src} (text encoder 2)"))
                    .with_registry(te2_layers.clone());
                let te2 = build_text_encoder(&w, cfgs.text_encoder_2.as_ref(), Activation::Gelu, &src)?;
                if te2.cfg.projection.is_none() {
                    bail!("{src}: SDXL's second text encoder has no `text_projection`");
                }
                Some(te2)
            }
            _ => None,
        };

        // UNet.
        let unet_w =
            Weights::new(ck.components.unet.clone(), &format!("{src} (unet)")).with_registry(unet_layers.clone());
        let hyper = match &cfgs.unet {
            Some(v) => UNetHyper::from_diffusers(v).with_context(|| format!("{src}: unet config"))?,
            None => {
                let widths: Vec<usize> = (0..unet_w.count("down_blocks"))
                    .map(|i| unet_w.get(&format!("down_blocks.{i}.resnets.0.conv1.weight")).map(|t| t.dims()[0]))
                    .collect::<Result<_>>()?;
                let heads = match family {
                    Family::Sd1 => HeadSpec::Heads(vec![8]),
                    _ => HeadSpec::HeadDim(if widths.iter().all(|w| w % 64 == 0) { 64 } else { 8 }),
                };
                UNetHyper {
                    heads,
                    groups: default_groups(widths[0], &widths, "unet"),
                    eps: 1e-5,
                    upcast_attention: family == Family::Sd2,
                    sample_size: 64,
                    addition_time_embed_dim: None,
                }
            }
        };
        let mut hyper = hyper;
        if let (None, Some(adm), Some(te2)) = (
            hyper.addition_time_embed_dim,
            unet_w.get_opt("add_embedding.linear_1.weight").map(|t| t.dims()[1]),
            &text_encoder_2,
        ) {
            // the vector is the pooled embedding followed by 6 size embeddings
            let pooled = te2.cfg.projection.unwrap_or(0);
            if adm <= pooled || (adm - pooled) % 6 != 0 {
                bail!("{src}: the UNet's added-conditioning input ({adm}) is not the pooled width {pooled} plus 6 size embeddings");
            }
            hyper.addition_time_embed_dim = Some((adm - pooled) / 6);
        }
        let unet = UNet::new(&unet_w, UNetConfig::infer(&unet_w, hyper)?)?;

        // VAE.
        let vae_cfg_json = if opts.vae.is_some() { None } else { cfgs.vae.clone() };
        // SDXL's VAE overflows in f16 (diffusers' `force_upcast`, sd-scripts' `--no_half_vae`): it runs in f32
        let force_upcast = vae_cfg_json.as_ref().and_then(|v| v.get("force_upcast")).and_then(Value::as_bool);
        let vae_dtype = if opts.dtype == DType::F16 && force_upcast.unwrap_or(family == Family::Sdxl) {
            ck.components.vae = checkpoint::cast_map(&ck.components.vae, DType::F32)?;
            DType::F32
        } else {
            opts.dtype
        };
        let vae_w = Weights::new(ck.components.vae.clone(), &format!("{src} (vae)"));
        let scale = vae_cfg_json
            .as_ref()
            .and_then(|v| v.get("scaling_factor"))
            .and_then(Value::as_f64)
            .unwrap_or(family.info().vae_scale);
        let groups = match vae_cfg_json.as_ref().and_then(|v| v.get("norm_num_groups")).and_then(Value::as_u64) {
            Some(g) => g as usize,
            None => {
                let widths: Vec<usize> = (0..vae_w.count("encoder.down_blocks"))
                    .map(|i| vae_w.get(&format!("encoder.down_blocks.{i}.resnets.0.conv1.weight")).map(|t| t.dims()[0]))
                    .collect::<Result<_>>()?;
                default_groups(widths.first().copied().unwrap_or(32), &widths, "vae")
            }
        };
        let sample =
            vae_cfg_json.as_ref().and_then(|v| v.get("sample_size")).and_then(Value::as_u64).unwrap_or(512) as usize;
        let vae = Vae::new(&vae_w, VaeConfig::infer(&vae_w, groups, scale, sample)?)?;

        let v_pred = opts.v_pred.unwrap_or_else(|| {
            cfgs.scheduler.as_ref().and_then(|v| v.get("prediction_type")).and_then(Value::as_str)
                == Some("v_prediction")
                || ck.metadata.get("modelspec.prediction_type").map(String::as_str) == Some("v")
        });
        let pad_id = cfgs.pad_id.unwrap_or(family.info().pad_id);
        let scheduler_config = cfgs.scheduler.clone().unwrap_or_else(|| default_scheduler_config(v_pred));
        if opts.clip_skip == 0 || opts.clip_skip > text_encoder.cfg.layers {
            bail!("clip_skip must be between 1 and {}, got {}", text_encoder.cfg.layers, opts.clip_skip);
        }
        Ok(Self {
            family,
            v_pred,
            clip_skip: opts.clip_skip,
            vae_scale: scale,
            dtype: opts.dtype,
            vae_dtype,
            device: opts.device.clone(),
            source: path.to_path_buf(),
            tokenizer: ClipTokenizer::new(pad_id),
            text_encoder,
            text_encoder_2,
            pad_id_2: cfgs.pad_id_2.unwrap_or(0),
            unet,
            vae,
            components: ck.components,
            te_layers,
            te2_layers,
            unet_layers,
            scheduler_config,
            metadata: ck.metadata,
        })
    }

    /// `[1, 77]` token ids of `text` with the family's padding.
    pub fn tokenize(&self, text: &str) -> Result<Tensor> {
        self.tokenizer.tokenize(text, &self.device)
    }

    /// The text-encoder context for ids `[B, 77]`: the hidden state `clip_skip` from the end (default: the
    /// model's), final-layer-normed unless `final_ln` is false; `pooled` adds the pooled output.
    /// SDXL: the penultimate states of both encoders without the final LayerNorm, side by side (`clip_skip` 2
    /// only; `final_ln` does not apply), and always the second encoder's projected pooled output.
    pub fn encode_ids(
        &self,
        ids: &Tensor,
        clip_skip: Option<usize>,
        final_ln: bool,
        pooled: bool,
    ) -> Result<ClipOutput> {
        // ids stay where they are (usually the host): the encoders look them up on their device, and reading the
        // pooled position and the second tokenizer's ids from host ids costs no device sync
        let Some(te2) = &self.text_encoder_2 else {
            return self.text_encoder.encode(ids, clip_skip.unwrap_or(self.clip_skip), final_ln, pooled);
        };
        if let Some(n) = clip_skip.filter(|&n| n != 2) {
            bail!("clip_skip {n}: SDXL always takes the penultimate layer of both text encoders (clip_skip 2)");
        }
        let one = self.text_encoder.encode(ids, 2, false, false)?;
        let two = te2.encode(&self.ids_2(ids)?, 2, false, true)?;
        Ok(ClipOutput { context: Tensor::cat(&[&one.context, &two.context], 2)?, pooled: two.pooled })
    }

    /// Conditioning for captions in sd-scripts' long-caption windows (`[B, 77·n]` ids, `tokenize_chunks`) as its
    /// training encodes them (`get_hidden_states`): every window encoded, then the first window's BOS, the 75
    /// middle positions of each window and the last window's final position: `[B, 75·n + 2, D]`. SDXL's pooled
    /// embedding is the first window's.
    pub fn encode_windows(&self, ids: &Tensor) -> Result<ClipOutput> {
        use super::tokenizer::{MAX_LEN, USABLE};
        let (b, len) = ids.dims2()?;
        if len % MAX_LEN != 0 {
            bail!("caption ids of length {len} are not whole 77-token windows");
        }
        let n = len / MAX_LEN;
        let out = self.encode_ids(&ids.reshape((b * n, MAX_LEN))?, None, true, false)?;
        let d = out.context.dim(2)?;
        let h = out.context.reshape((b, n * MAX_LEN, d))?;
        let mut parts = vec![h.narrow(1, 0, 1)?];
        for j in 0..n {
            parts.push(h.narrow(1, j * MAX_LEN + 1, USABLE)?);
        }
        parts.push(h.narrow(1, n * MAX_LEN - 1, 1)?);
        let pooled = match out.pooled {
            Some(p) => {
                let pd = p.dim(1)?;
                Some(p.reshape((b, n, pd))?.narrow(1, 0, 1)?.squeeze(1)?)
            }
            None => None,
        };
        Ok(ClipOutput { context: Tensor::cat(&parts, 1)?, pooled })
    }

    /// SDXL's second tokenizer's ids from the first's: the same tokens, padded with `pad_id_2` after the first
    /// end-of-text token.
    fn ids_2(&self, ids: &Tensor) -> Result<Tensor> {
        let eos = super::tokenizer::EOS as i64;
        let pad = self.pad_id_2 as i64;
        let rows = ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let mut out = Vec::with_capacity(ids.elem_count());
        for row in &rows {
            let end = row.iter().position(|&x| x == eos).unwrap_or(row.len());
            out.extend(row.iter().enumerate().map(|(i, &x)| if i > end { pad } else { x }));
        }
        Ok(Tensor::from_vec(out, ids.dims(), ids.device())?)
    }

    /// SDXL's added conditioning vector from the pooled text embedding `[B, P]` and `time_ids` `[B, 6]`
    /// (original height, width, crop top, left, target height, width); `None` for SD 1.x/2.x.
    pub fn sdxl_y(&self, pooled: &Tensor, time_ids: &Tensor) -> Result<Option<Tensor>> {
        match self.unet.cfg.hyper.addition_time_embed_dim {
            Some(dim) if self.unet.cfg.adm_in.is_some() => {
                let t = time_ids.to_device(&self.device)?.to_dtype(DType::F32)?;
                Ok(Some(sdxl_vector(&pooled.to_device(&self.device)?, &t, dim)?))
            }
            _ => Ok(None),
        }
    }

    /// Whether the UNet takes SDXL's added conditioning vector.
    pub fn is_xl(&self) -> bool {
        self.unet.cfg.adm_in.is_some()
    }

    /// The UNet prediction (noise, or v for v-prediction models) for SD 1.x/2.x.
    pub fn unet(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.unet_with(sample, timesteps, context, None)
    }

    /// The UNet prediction with SDXL's conditioning vector `y` (`sdxl_y`); `y` is `None` for SD 1.x/2.x.
    pub fn unet_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        y: Option<&Tensor>,
    ) -> Result<Tensor> {
        let s = sample.to_device(&self.device)?.to_dtype(self.dtype)?;
        let c = context.to_device(&self.device)?.to_dtype(self.dtype)?;
        let y = y.map(|y| y.to_device(&self.device)).transpose()?;
        self.unet.forward(&s, &timesteps.to_device(&self.device)?, &c, y.as_ref())
    }

    /// The VAE posterior of an image in [-1, 1].
    pub fn vae_encode(&self, image: &Tensor) -> Result<Posterior> {
        self.vae.encode(&image.to_device(&self.device)?.to_dtype(self.vae_dtype)?)
    }

    /// Decodes raw latents (divide by `vae_scale` first when they come from a sampler).
    pub fn vae_decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.decode(&latents.to_device(&self.device)?.to_dtype(self.vae_dtype)?)
    }

    /// Writes the model as a single file or a diffusers folder in `dtype`; refuses to replace an existing path
    /// unless `overwrite`.
    pub fn save(&self, path: &Path, format: SaveFormat, dtype: DType, overwrite: bool) -> Result<()> {
        self.save_with(path, format, dtype, overwrite, &HashMap::new())
    }

    /// `save`, with `metadata` added to a single file's (given `modelspec.*` keys replace all of the source's).
    pub fn save_with(
        &self,
        path: &Path,
        format: SaveFormat,
        dtype: DType,
        overwrite: bool,
        metadata: &HashMap<String, String>,
    ) -> Result<()> {
        if path.exists() && !overwrite {
            bail!("{}: already exists; pass `overwrite: true` to replace it", path.display());
        }
        match format {
            SaveFormat::SingleFile => {
                let mut meta = self.metadata.clone();
                if metadata.keys().any(|k| k.starts_with("modelspec.")) {
                    meta.retain(|k, _| !k.starts_with("modelspec."));
                }
                meta.extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
                meta.insert("sdtune.family".into(), self.family.name().into());
                checkpoint::save_single_file(path, &self.components, self.family, dtype, &meta)
            }
            SaveFormat::Diffusers => {
                if path.exists() {
                    std::fs::remove_dir_all(path)
                        .or_else(|_| std::fs::remove_file(path))
                        .with_context(|| format!("{}: cannot replace", path.display()))?;
                }
                let te_json = clip_config_json(&self.text_encoder.cfg, dtype);
                let cfgs = DiffusersConfigs {
                    unet: self.unet.cfg.to_diffusers_json(),
                    vae: self.vae.cfg.to_diffusers_json(),
                    text_encoder: te_json,
                    text_encoder_2: self.text_encoder_2.as_ref().map(|t| clip_config_json(&t.cfg, dtype)),
                    scheduler: self.scheduler_config.clone(),
                    pad_token: if self.tokenizer.pad_id == 0 { "!" } else { "<|endoftext|>" },
                };
                checkpoint::save_diffusers(path, &self.components, &cfgs, dtype)
            }
        }
    }
}

/// Builds a text encoder from its weights and optional transformers config (heads, activation, epsilon).
fn build_text_encoder(w: &Weights, cfg: Option<&Value>, default_act: Activation, src: &str) -> Result<ClipTextModel> {
    let activation = match cfg.and_then(|v| v.get("hidden_act")).and_then(Value::as_str) {
        Some("gelu") => Activation::Gelu,
        Some("quick_gelu") => Activation::QuickGelu,
        Some(other) => bail!("{src}: text encoder hidden_act {other:?} is not supported (expected quick_gelu or gelu)"),
        None => default_act,
    };
    let heads = cfg.and_then(|v| v.get("num_attention_heads")).and_then(Value::as_u64).map(|h| h as usize);
    let mut te_cfg = ClipConfig::infer(w, heads, activation)?;
    if let Some(eps) = cfg.and_then(|v| v.get("layer_norm_eps")).and_then(Value::as_f64) {
        te_cfg.eps = eps;
    }
    ClipTextModel::new(w, te_cfg)
}

/// The transformers `config.json` of a text encoder (`CLIPTextModelWithProjection` when it has a projection).
fn clip_config_json(te: &ClipConfig, dtype: DType) -> Value {
    json!({
        "architectures": [if te.projection.is_some() { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "hidden_act": te.activation.hf_name(),
        "hidden_size": te.hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": te.intermediate,
        "layer_norm_eps": te.eps,
        "max_position_embeddings": te.max_positions,
        "model_type": "clip_text_model",
        "num_attention_heads": te.heads,
        "num_hidden_layers": te.layers,
        "projection_dim": te.projection.unwrap_or(te.hidden),
        "torch_dtype": dtype_name(dtype),
        "vocab_size": te.vocab_size
    })
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// SD's training schedule as a diffusers scheduler config (used when a single file brings none).
fn default_scheduler_config(v_pred: bool) -> Value {
    json!({
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.39.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": if v_pred { "v_prediction" } else { "epsilon" },
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null
    })
}

/// Reads a replacement VAE: a diffusers `vae/` folder or file, a full single file, or a bare LDM VAE file.
fn load_vae_only(path: &Path, opts: &LoadOptions) -> Result<HashMap<String, Tensor>> {
    let file = if path.is_dir() {
        ["diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
            .iter()
            .map(|f| path.join(f))
            .find(|p| p.is_file())
            .with_context(|| format!("{}: no diffusion_pytorch_model.safetensors in this VAE folder", path.display()))?
    } else {
        path.to_path_buf()
    };
    let t = crate::io::tensors::read_any(&file, Some(opts.dtype), &opts.device)?.tensors;
    if t.keys().any(|k| k.starts_with("encoder.down_blocks.")) {
        return Ok(t);
    }
    let full: HashMap<String, Tensor> = if t.keys().any(|k| k.starts_with("first_stage_model.")) {
        t
    } else {
        t.into_iter().map(|(k, v)| (format!("first_stage_model.{k}"), v)).collect()
    };
    let vl = full
        .keys()
        .filter(|k| k.starts_with("first_stage_model.encoder.down.") && k.ends_with(".block.0.conv1.weight"))
        .count();
    if vl == 0 {
        bail!(
            "{}: not a VAE: expected `encoder.down_blocks.*` (diffusers) or `encoder.down.*` (original) keys",
            file.display()
        );
    }
    // Reuse the single-file splitter on a stand-in with just the VAE.
    let stripped: HashMap<String, Tensor> = full
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("first_stage_model.").map(|s| (s.to_string(), v)))
        .collect();
    let vn = stripped.keys().filter(|k| k.starts_with("encoder.down.0.block.") && k.ends_with(".conv1.weight")).count();
    let (renamed, bad) =
        crate::io::keymap::rename_all(stripped, &crate::io::keymap::vae_table(vl, vn), crate::io::keymap::Side::Ldm);
    if !bad.is_empty() {
        bail!("{}: {} VAE keys not understood, e.g. `{}`", file.display(), bad.len(), bad[0]);
    }
    renamed
        .into_iter()
        .map(|(k, v)| {
            let is_attn = k.contains("mid_block.attentions.0.") && k.ends_with(".weight") && !k.contains("group_norm");
            Ok((k, if is_attn && v.rank() == 4 { v.squeeze(3)?.squeeze(2)? } else { v }))
        })
        .collect()
}
