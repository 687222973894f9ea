//! Networks (LoRA-LierLa and LoRA-C3Lier, sd-scripts' `networks.lora`; LyCORIS LoHa and LoKr, `lycoris.kohya`):
//! creation with sd-scripts' and LyCORIS' module selection and names, kohya-format files (keys, `alpha`,
//! `ss_*`/`sshs_*`/ModelSpec metadata), apply / remove / merge.

pub mod blocks;
pub mod file;
pub mod lycoris;
pub mod module;

use crate::models::{Family, StableDiffusion};
use crate::nn::adapter::{LayerInfo, LayerKind};
use crate::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use module::{Dropouts, Factors, Module, ModuleAdapter, NetworkState};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Options of a new network (sd-scripts' `networks.lora` arguments).
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkConfig {
    pub dim: usize,
    pub alpha: f64,
    /// C3Lier: rank of 3×3 convs in ResNet/Down/Upsample blocks (None = LierLa).
    pub conv_dim: Option<usize>,
    pub conv_alpha: Option<f64>,
    pub dropouts: Dropouts,
    pub train_unet: bool,
    pub train_text_encoder: bool,
    /// Block-wise dims/alphas and LR weights (SD1/SD2).
    pub blocks: blocks::BlockConfig,
    /// LoRA-FA (sd-scripts' `networks.lora_fa`): down drawn from N(0, 2/(in + rank)) and frozen; only up trains.
    pub lora_fa: bool,
    /// The dtype of the trained weights: f32, or bf16 for sd-scripts' `full_bf16`.
    pub dtype: DType,
    /// LoRA+ learning-rate ratios of the up weights.
    pub loraplus: LoraPlus,
    /// A LyCORIS network (`lycoris.kohya`) instead of sd-scripts' LoRA.
    pub lycoris: Option<lycoris::LycorisConfig>,
}

/// LoRA+ (sd-scripts' `loraplus_lr_ratio`, `loraplus_unet_lr_ratio`, `loraplus_text_encoder_lr_ratio`): the up
/// weights train at the learning rate times a ratio, the UNet's or text encoder's own ratio before the common one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoraPlus {
    pub all: Option<f64>,
    pub unet: Option<f64>,
    pub text_encoder: Option<f64>,
}

impl LoraPlus {
    /// The ratio for `c`'s up weights, if any.
    pub fn ratio(&self, c: Component) -> Option<f64> {
        match c {
            Component::Unet => self.unet.or(self.all),
            Component::TextEncoder => self.text_encoder.or(self.all),
        }
    }

    /// The ratios given, under sd-scripts' names (for `ss_network_args`).
    pub fn args(&self) -> Vec<(String, f64)> {
        [
            ("loraplus_lr_ratio", self.all),
            ("loraplus_unet_lr_ratio", self.unet),
            ("loraplus_text_encoder_lr_ratio", self.text_encoder),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect()
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            dim: 4,
            alpha: 1.0,
            conv_dim: None,
            conv_alpha: None,
            dropouts: Dropouts::default(),
            train_unet: true,
            train_text_encoder: true,
            blocks: blocks::BlockConfig::default(),
            lora_fa: false,
            dtype: DType::F32,
            loraplus: LoraPlus::default(),
            lycoris: None,
        }
    }
}

/// Which component a module lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    TextEncoder,
    Unet,
}

impl Component {
    /// sd-scripts' key prefix (SD1/SD2).
    pub fn prefix(self) -> &'static str {
        match self {
            Component::TextEncoder => "lora_te",
            Component::Unet => "lora_unet",
        }
    }
}

/// sd-scripts' target modules as path fragments: (component, fragment, needs conv_dim to be wrapped).
/// `Transformer2DModel` = `.attentions.`; `CLIPAttention`/`CLIPMLP` = `.self_attn.`/`.mlp.`;
/// C3Lier adds `ResnetBlock2D`, `Downsample2D`, `Upsample2D`.
const TARGETS: &[(Component, &str, bool)] = &[
    (Component::Unet, ".attentions.", false),
    (Component::Unet, ".resnets.", true),
    (Component::Unet, ".downsamplers.", true),
    (Component::Unet, ".upsamplers.", true),
    (Component::TextEncoder, ".self_attn.", false),
    (Component::TextEncoder, ".mlp.", false),
];

/// The kohya name of a layer.
pub fn kohya_name(c: Component, layer: &str) -> String {
    format!("{}_{}", c.prefix(), layer.replace('.', "_"))
}

/// The rank and alpha sd-scripts gives a layer, or None when it is not wrapped.
fn rank_for(c: Component, layer: &LayerInfo, cfg: &NetworkConfig) -> Option<(usize, f64)> {
    let target = TARGETS.iter().find(|(tc, frag, _)| *tc == c && layer.name.contains(frag))?;
    let b = &cfg.blocks;
    let conv_enabled = cfg.conv_dim.is_some() || b.conv_dims.is_some();
    if target.2 && !conv_enabled {
        return None;
    }
    let idx = if c == Component::Unet { blocks::block_index(&kohya_name(c, &layer.name)) } else { None };
    if b.lr.as_ref().is_some_and(|lr| lr.weight(idx) == 0.0) {
        return None; // a block with LR weight 0 gets no modules, as in sd-scripts
    }
    let (dim, alpha) = match &layer.kind {
        LayerKind::Linear { .. } | LayerKind::Conv { kernel: (1, 1), .. } => match idx {
            Some(i) => (b.dims.as_ref().map_or(cfg.dim, |d| d[i]), b.alphas.as_ref().map_or(cfg.alpha, |a| a[i])),
            None => (cfg.dim, cfg.alpha),
        },
        LayerKind::Conv { .. } => {
            let d = cfg.conv_dim.unwrap_or(0);
            let a = cfg.conv_alpha.unwrap_or(1.0);
            match idx {
                Some(i) => (b.conv_dims.as_ref().map_or(d, |v| v[i]), b.conv_alphas.as_ref().map_or(a, |v| v[i])),
                None => (d, a),
            }
        }
    };
    (dim > 0).then_some((dim, alpha))
}

/// What a network file records about its base model.
#[derive(Clone, Debug)]
pub struct BaseModel {
    pub v_pred: bool,
    pub clip_skip: usize,
    /// The model file's stem (`ss_sd_model_name`).
    pub name: String,
}

impl BaseModel {
    pub fn of(model: &StableDiffusion) -> Self {
        Self {
            v_pred: model.v_pred,
            clip_skip: model.clip_skip,
            name: model.source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        }
    }
}

/// A LoRA network bound to a model's layers.
pub struct Network {
    pub state: Arc<NetworkState>,
    pub modules: Vec<(Component, Arc<Module>)>,
    pub family: Family,
    pub base: BaseModel,
    pub config: NetworkConfig,
    /// Metadata read from a file (kept when re-saving).
    pub metadata: BTreeMap<String, String>,
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

fn new_state(dropouts: Dropouts, seed: u64, lycoris: bool) -> Arc<NetworkState> {
    Arc::new(NetworkState {
        id: NEXT_ID.fetch_add(1, Ordering::SeqCst),
        multiplier: RwLock::new(1.0),
        training: AtomicBool::new(false),
        dropouts,
        rng: Mutex::new(Rng::new(seed ^ 0x5EED)),
        lycoris,
    })
}

fn layers(model: &StableDiffusion) -> Vec<(Component, LayerInfo)> {
    let te = model.te_layers.layers().into_iter().map(|l| (Component::TextEncoder, l));
    let te2 = model.te2_layers.layers().into_iter().map(|l| (Component::TextEncoder, l));
    let un = model.unet_layers.layers().into_iter().map(|l| (Component::Unet, l));
    te.chain(te2).chain(un).collect()
}

/// Every adaptable layer of `model` with its sd-scripts module name. SD 1.x/2.x: `lora_te_` / `lora_unet_` + the
/// diffusers path. SDXL: `lora_te1_` / `lora_te2_` + the transformers path, `lora_unet_` + the original (SGM) path,
/// as sd-scripts names modules on its own SDXL UNet.
pub fn named_layers(model: &StableDiffusion) -> Vec<(Component, LayerInfo, String)> {
    if model.family != Family::Sdxl {
        return layers(model).into_iter().map(|(c, l)| (c, l.clone(), kohya_name(c, &l.name))).collect();
    }
    let cfg = &model.unet.cfg;
    let table = crate::io::keymap::unet_table(cfg.block_out_channels.len(), cfg.layers_per_block, &cfg.up_attn);
    let sgm = |name: &str| table.rename(name, crate::io::keymap::Side::Diffusers).unwrap_or_else(|| name.to_string());
    let te1 = model.te_layers.layers().into_iter().map(|l| {
        let n = format!("lora_te1_{}", l.name.replace('.', "_"));
        (Component::TextEncoder, l, n)
    });
    let te2 = model.te2_layers.layers().into_iter().map(|l| {
        let n = format!("lora_te2_{}", l.name.replace('.', "_"));
        (Component::TextEncoder, l, n)
    });
    let un = model.unet_layers.layers().into_iter().map(|l| {
        let n = format!("lora_unet_{}", sgm(&l.name).replace('.', "_"));
        (Component::Unet, l, n)
    });
    te1.chain(te2).chain(un).collect()
}

impl Network {
    /// Whether this network's modules sit on `model`'s layers (a network is made for one loaded model).
    pub fn is_for(&self, model: &StableDiffusion) -> bool {
        let Some((_, m)) = self.modules.first() else { return true };
        layers(model).iter().any(|(_, l)| Arc::ptr_eq(&l.slot.0, &m.layer.slot.0))
    }

    /// A new network for `model`. LoRA: down Kaiming-uniform (a = √5, i.e. U(±1/√fan_in)) or, for LoRA-FA,
    /// N(0, 2/(in + rank)); up zero. LyCORIS: as `lycoris::init`. In `cfg.dtype`.
    pub fn create(model: &StableDiffusion, cfg: &NetworkConfig, seed: u64) -> Result<Self> {
        if model.family == Family::Sdxl && cfg.blocks != blocks::BlockConfig::default() {
            bail!("block-wise dims, alphas and LR weights are for SD 1.x/2.x UNets; SDXL networks take one dim and alpha (and conv_dim/conv_alpha)");
        }
        if cfg.lycoris.is_some() && (cfg.blocks != blocks::BlockConfig::default() || cfg.lora_fa) {
            bail!("block-wise dims, alphas and LR weights and LoRA-FA are options of sd-scripts' networks.lora, not of LyCORIS networks");
        }
        if cfg.dim == 0 {
            bail!("network dim must be at least 1");
        }
        let state = new_state(cfg.dropouts, seed, cfg.lycoris.is_some());
        let mut rng = Rng::new(seed);
        let dev = model.device.clone();
        let sdxl = model.family == Family::Sdxl;
        let mut modules = Vec::new();
        for (c, layer, name) in named_layers(model) {
            if (c == Component::Unet && !cfg.train_unet) || (c == Component::TextEncoder && !cfg.train_text_encoder) {
                continue;
            }
            if let Some(ly) = &cfg.lycoris {
                let Some((r, alpha)) = lycoris::rank_for(c, &layer, cfg, ly, sdxl) else { continue };
                let (factors, alpha) = lycoris::init(&layer.kind, ly, r, alpha, &mut rng, cfg.dtype, &dev)?;
                let dora = ly
                    .dora
                    .map(|on_output| lycoris::dora_scale(&layer.slot.weight(), on_output, cfg.dtype))
                    .transpose()?;
                modules.push((c, Arc::new(Module::new(name, layer, factors, alpha, state.clone()).with_dora(dora))));
                continue;
            }
            let Some((r, alpha)) = rank_for(c, &layer, cfg) else { continue };
            let (down_shape, up_shape, fan_in, in_dim) = match &layer.kind {
                LayerKind::Linear { in_features, out_features } => {
                    (vec![r, *in_features], vec![*out_features, r], *in_features, *in_features)
                }
                LayerKind::Conv { in_channels, out_channels, kernel, .. } => (
                    vec![r, *in_channels, kernel.0, kernel.1],
                    vec![*out_channels, r, 1, 1],
                    in_channels * kernel.0 * kernel.1,
                    *in_channels,
                ),
            };
            let n: usize = down_shape.iter().product();
            let vals: Vec<f32> = if cfg.lora_fa {
                let std = (2.0 / (in_dim + r) as f64).sqrt() as f32;
                rng.normal_vec(n).into_iter().map(|x| x * std).collect()
            } else {
                let bound = 1.0 / (fan_in as f64).sqrt();
                (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect()
            };
            let down = Var::from_tensor(&Tensor::from_vec(vals, down_shape.as_slice(), &dev)?.to_dtype(cfg.dtype)?)?;
            let up = Var::from_tensor(&Tensor::zeros(up_shape.as_slice(), cfg.dtype, &dev)?)?;
            let alpha = if alpha == 0.0 { r as f64 } else { alpha };
            let factors = Factors::Lora { down, up, mid: None };
            modules.push((c, Arc::new(Module::new(name, layer, factors, alpha, state.clone()))));
        }
        if modules.is_empty() {
            bail!(
                "no layers to train: enable train_unet or train_text_encoder (or choose a preset with layers in them)"
            );
        }
        Ok(Self {
            state,
            modules,
            family: model.family,
            base: BaseModel::of(model),
            config: cfg.clone(),
            metadata: BTreeMap::new(),
        })
    }

    /// The same modules and weights (the Vars are shared) with a network's training options: dropouts (a fresh
    /// state seeded with `seed`) and LoRA+ ratios; what continuing a file's training (`network_weights`) uses.
    pub fn with_training_options(self, dropouts: Dropouts, loraplus: LoraPlus, seed: u64) -> Self {
        let state = new_state(dropouts, seed, self.config.lycoris.is_some());
        let modules = self
            .modules
            .iter()
            .map(|(c, m)| {
                let mut module =
                    Module::new(m.name.clone(), m.layer.clone(), m.factors.clone(), m.alpha, state.clone());
                module.scalar = m.scalar.clone();
                (*c, Arc::new(module))
            })
            .collect();
        let config = NetworkConfig { dropouts, loraplus, ..self.config };
        Self { state, modules, config, ..self }
    }

    /// Attaches every module to its layer: later forwards add `multiplier · ΔW · x` (LoRA: `multiplier · scale ·
    /// up(down(x))`).
    pub fn apply(&self, multiplier: f64) {
        self.set_multiplier(multiplier);
        for (_, m) in &self.modules {
            m.layer.slot.detach(self.state.id);
            m.layer.slot.attach(Arc::new(ModuleAdapter::new(m.clone())));
        }
    }

    /// Detaches the network from the model.
    pub fn remove(&self) {
        for (_, m) in &self.modules {
            m.layer.slot.detach(self.state.id);
        }
    }

    pub fn set_multiplier(&self, m: f64) {
        *self.state.multiplier.write().expect("multiplier lock") = m;
    }

    /// Training mode turns the dropouts on.
    pub fn set_training(&self, on: bool) {
        self.state.training.store(on, Ordering::Relaxed);
    }

    /// Adds `multiplier · ΔW` into each layer's weight (sd-scripts' `merge_to`; DoRA modules rescale `W + ΔW`).
    pub fn merge(&self, multiplier: f64) -> Result<()> {
        for (_, m) in &self.modules {
            m.layer.slot.set_weight(m.merged(&m.layer.slot.weight(), multiplier)?);
        }
        Ok(())
    }

    /// The trained variables with their component, module by module in file order.
    pub fn vars(&self) -> Vec<(Component, Var)> {
        self.modules.iter().flat_map(|(c, m)| m.vars().into_iter().map(move |v| (*c, v))).collect()
    }

    /// The network's tensors under kohya's and LyCORIS' keys, in `dtype` (alpha too, as sd-scripts does).
    pub fn state_dict(&self, dtype: DType) -> Result<std::collections::HashMap<String, Tensor>> {
        let cpu = candle_core::Device::Cpu;
        let mut out = std::collections::HashMap::new();
        for (_, m) in &self.modules {
            for (suffix, t) in m.saved()? {
                out.insert(format!("{}.{suffix}", m.name), t.to_dtype(dtype)?.to_device(&cpu)?);
            }
            out.insert(format!("{}.alpha", m.name), Tensor::new(m.alpha as f32, &cpu)?.to_dtype(dtype)?);
        }
        Ok(out)
    }

    /// sd-scripts' (and LyCORIS') `apply_max_norm_regularization`: per module `n = max(‖ΔW‖_F, max_norm/2)`, and
    /// when `min(n, max_norm)/n < 1` ΔW is scaled by it (`Module::scale_delta`). Returns (modules scaled, mean norm,
    /// max norm) of the norms after scaling.
    pub fn apply_max_norm(&self, max_norm: f64) -> Result<(usize, f64, f64)> {
        if self.modules.is_empty() {
            return Ok((0, 0.0, 0.0));
        }
        // every module's squared norm on the device, read in one transfer
        let squares = self
            .modules
            .iter()
            .map(|(_, m)| Ok(m.delta_weight()?.sqr()?.sum_all()?.to_dtype(DType::F64)?))
            .collect::<Result<Vec<_>>>()?;
        let squares = Tensor::stack(&squares, 0)?.to_vec1::<f64>()?;
        let mut scaled = 0;
        let mut norms = Vec::with_capacity(self.modules.len());
        for ((_, m), square) in self.modules.iter().zip(squares) {
            let norm = square.sqrt();
            let n = norm.max(max_norm / 2.0);
            let ratio = n.min(max_norm) / n;
            if ratio != 1.0 {
                m.scale_delta(ratio)?;
                scaled += 1;
                norms.push(norm * ratio);
            } else {
                norms.push(norm);
            }
        }
        let mean = norms.iter().sum::<f64>() / norms.len().max(1) as f64;
        Ok((scaled, mean, norms.iter().copied().fold(0.0, f64::max)))
    }

    /// The LR weight of a module (block-wise LR; 1 for the text encoder and without block weights).
    pub fn lr_weight(&self, m: &Module) -> f64 {
        match &self.config.blocks.lr {
            Some(lr) => lr.weight(blocks::block_index(&m.name)),
            None => 1.0,
        }
    }

    /// Whether any module wraps a 3×3 conv (C3Lier).
    pub fn is_c3lier(&self) -> bool {
        self.modules.iter().any(|(_, m)| matches!(m.layer.kind, LayerKind::Conv { kernel, .. } if kernel != (1, 1)))
    }
}
