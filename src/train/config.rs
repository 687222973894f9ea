//! Training options under sd-scripts' names, typed and checked: unknown keys are errors that list the accepted ones,
//! and sd-scripts options sdtune does not implement yet are refused by name rather than ignored.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

fn one() -> usize {
    1
}
fn lr_default() -> f64 {
    1e-4
}
fn grad_norm_default() -> f64 {
    1.0
}
fn max_t() -> usize {
    1000
}
fn huber_c_default() -> f64 {
    0.1
}
fn discount_default() -> f64 {
    0.3
}
fn constant() -> String {
    "constant".into()
}
fn out_name() -> String {
    "last".into()
}
fn f32s() -> String {
    "float".into()
}
fn l2() -> String {
    "l2".into()
}
fn constant_huber() -> String {
    "constant".into()
}
fn ddim() -> String {
    "ddim".into()
}
fn power_default() -> f64 {
    1.0
}

/// The loop's options (sd-scripts' `train_network.py` names and defaults; `train_db.py`'s for full fine-tuning).
#[derive(Deserialize, Serialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Caption tokens: 75 (one window, the default), 150 or 225 (sd-scripts' long-caption windows).
    pub max_token_length: Option<usize>,
    /// Captions with A1111 weighting (`(word:1.2)`), encoded as sd-scripts' `get_weighted_text_embeddings` (SD 1.x/2.x).
    #[serde(default)]
    pub weighted_captions: bool,
    pub max_train_steps: Option<usize>,
    pub max_train_epochs: Option<usize>,
    #[serde(default = "one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "lr_default")]
    pub learning_rate: f64,
    pub unet_lr: Option<f64>,
    /// The text encoder's LR (sd-scripts' `learning_rate_te` when fine-tuning the model).
    #[serde(alias = "learning_rate_te")]
    pub text_encoder_lr: Option<f64>,
    /// Full fine-tuning: whether the text encoder(s) train too (default true, as `train_db.py`).
    pub train_text_encoder: Option<bool>,
    /// sd-scripts' `masked_loss`: the loss weighted by masks; sdtune takes them from the images' alpha
    /// (`alpha_mask` datasets, which weight the loss anyway, as in sd-scripts).
    #[serde(default)]
    pub masked_loss: bool,
    /// SDXL full fine-tuning: each text encoder's LR (`sdxl_train.py`; default `learning_rate_te`, else
    /// `learning_rate`; 0 leaves that encoder untrained).
    pub learning_rate_te1: Option<f64>,
    pub learning_rate_te2: Option<f64>,
    /// sdxl_train.py's `block_lr`: 23 comma-separated LRs for the SDXL UNet's blocks (time/label embeddings, the 9
    /// input blocks, the 3 middle-block parts, the 9 output blocks, the output layers); 0 leaves a block frozen.
    pub block_lr: Option<String>,
    /// Full fine-tuning: `safetensors` (a single file) or `diffusers` / `diffusers_safetensors` (a folder);
    /// by default the source model's layout.
    pub save_model_as: Option<String>,
    /// Textual inversion: the new word (its vectors train; the model stays frozen).
    pub token_string: Option<String>,
    /// Textual inversion: the word whose token embeddings start the vectors (cycled over them).
    pub init_word: Option<String>,
    /// Textual inversion: how many vectors the word stands for.
    pub num_vectors_per_token: Option<usize>,
    /// Textual inversion: an embedding file whose vectors start training instead of `init_word`'s.
    pub weights: Option<PathBuf>,
    /// Textual inversion: captions replaced by "a photo of a {token}"-style templates (objects) or style ones.
    #[serde(default)]
    pub use_object_template: bool,
    #[serde(default)]
    pub use_style_template: bool,
    /// sd-scripts' name; empty means AdamW.
    #[serde(default)]
    pub optimizer_type: String,
    /// Legacy alias of `optimizer_type = "AdamW8bit"`.
    #[serde(default)]
    pub use_8bit_adam: bool,
    /// Legacy alias of `optimizer_type = "Lion"`.
    #[serde(default)]
    pub use_lion_optimizer: bool,
    #[serde(default)]
    pub optimizer_args: Vec<String>,
    #[serde(default = "constant")]
    pub lr_scheduler: String,
    #[serde(default)]
    /// Warmup in optimizer steps; a value below 1 is a fraction of the training steps (newer sd-scripts).
    pub lr_warmup_steps: f64,
    #[serde(default = "one")]
    pub lr_scheduler_num_cycles: usize,
    #[serde(default = "power_default")]
    pub lr_scheduler_power: f64,
    pub step_rules: Option<String>,
    #[serde(default = "grad_norm_default")]
    pub max_grad_norm: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub min_timestep: usize,
    #[serde(default = "max_t")]
    pub max_timestep: usize,
    pub noise_offset: Option<f64>,
    pub adaptive_noise_scale: Option<f64>,
    #[serde(default)]
    pub noise_offset_random_strength: bool,
    pub multires_noise_iterations: Option<usize>,
    #[serde(default = "discount_default")]
    pub multires_noise_discount: f64,
    pub ip_noise_gamma: Option<f64>,
    #[serde(default)]
    pub ip_noise_gamma_random_strength: bool,
    #[serde(default)]
    pub zero_terminal_snr: bool,
    pub v_parameterization: Option<bool>,
    #[serde(default = "l2")]
    pub loss_type: String,
    #[serde(default = "constant_huber")]
    pub huber_schedule: String,
    #[serde(default = "huber_c_default")]
    pub huber_c: f64,
    #[serde(default = "one_f")]
    pub prior_loss_weight: f64,
    pub min_snr_gamma: Option<f64>,
    #[serde(default)]
    pub scale_v_pred_loss_like_noise_pred: bool,
    pub v_pred_like_loss: Option<f64>,
    #[serde(default)]
    pub debiased_estimation_loss: bool,
    #[serde(default)]
    pub network_train_unet_only: bool,
    #[serde(default)]
    pub network_train_text_encoder_only: bool,
    /// sd-scripts (SDXL) caches the text encoders' outputs; sdtune computes them each step, which gives the same
    /// result, so these only carry sd-scripts' rule that a cached text encoder cannot be trained.
    #[serde(default)]
    pub cache_text_encoder_outputs: bool,
    #[serde(default)]
    pub cache_text_encoder_outputs_to_disk: bool,
    pub stop_text_encoder_training: Option<usize>,
    /// Recompute each UNet block in the backward instead of keeping its intermediate tensors.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    #[serde(default)]
    pub cache_latents: bool,
    #[serde(default)]
    pub cache_latents_to_disk: bool,
    #[serde(default = "one")]
    pub vae_batch_size: usize,
    pub output_dir: Option<PathBuf>,
    #[serde(default = "out_name")]
    pub output_name: String,
    pub save_every_n_epochs: Option<usize>,
    pub save_every_n_steps: Option<usize>,
    pub save_last_n_epochs: Option<usize>,
    pub save_last_n_steps: Option<usize>,
    #[serde(default = "f32s")]
    pub save_precision: String,
    #[serde(default)]
    pub save_state: bool,
    #[serde(default)]
    pub overwrite: bool,
    pub sample_prompts: Option<PathBuf>,
    pub sample_every_n_steps: Option<usize>,
    pub sample_every_n_epochs: Option<usize>,
    #[serde(default)]
    pub sample_at_first: bool,
    #[serde(default = "ddim")]
    pub sample_sampler: String,
    pub logging_dir: Option<PathBuf>,
    /// sd-scripts' `log_prefix`: the TensorBoard run folder is `logging_dir/{log_prefix}{output_name}`.
    pub log_prefix: Option<String>,
    pub mixed_precision: Option<String>,
    pub training_comment: Option<String>,
    /// Max-norm regularisation of each module's ΔW (sd-scripts' `scale_weight_norms`).
    pub scale_weight_norms: Option<f64>,
    /// Train the LoRA weights (and optimizer state) in bf16 too; needs mixed_precision bf16.
    #[serde(default)]
    pub full_bf16: bool,
    /// Print a progress line every N steps (0: never).
    #[serde(default = "ten")]
    pub log_every_n_steps: usize,
}

fn one_f() -> f64 {
    1.0
}
fn ten() -> usize {
    10
}

/// sd-scripts options recognised but not implemented yet: an error names them instead of ignoring them.
pub const NOT_YET: &[&str] = &["full_fp16", "fp8_base", "network_weights", "dim_from_weights"];

/// Whether a value leaves an option off: false, null or an empty string.
fn leaves_off(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null => true,
        Value::Bool(on) => !on,
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

impl TrainConfig {
    /// From a JSON object of sd-scripts option names.
    pub fn from_json(mut v: serde_json::Value) -> Result<Self> {
        if let Some(obj) = v.as_object_mut() {
            if let Some((k, value)) = obj.iter().find(|(k, v)| NOT_YET.contains(&k.as_str()) && !leaves_off(v)) {
                bail!("training option `{k}` is not supported yet (given {value}; leave it out or off)");
            }
            // given but off (as sd-scripts configs written in full have them): nothing to do
            obj.retain(|k, _| !NOT_YET.contains(&k.as_str()));
        }
        let mut c: TrainConfig = serde_json::from_value(v).map_err(|e| anyhow::anyhow!("train: {e}"))?;
        for (flag, on, name) in
            [("use_8bit_adam", c.use_8bit_adam, "AdamW8bit"), ("use_lion_optimizer", c.use_lion_optimizer, "Lion")]
        {
            if on {
                if !c.optimizer_type.is_empty() && !c.optimizer_type.eq_ignore_ascii_case(name) {
                    bail!("{flag} and optimizer_type {} are both given; keep one", c.optimizer_type);
                }
                c.optimizer_type = name.into();
            }
        }
        if let Some(mp) = c.mixed_precision.as_deref() {
            if !["no", "fp16", "bf16"].contains(&mp) {
                bail!("mixed_precision must be no, fp16 or bf16, got {mp:?}");
            }
        }
        if c.full_bf16 && c.mixed_precision.as_deref() != Some("bf16") {
            bail!("full_bf16 needs mixed_precision bf16");
        }
        if !(c.lr_warmup_steps >= 0.0 && (c.lr_warmup_steps < 1.0 || c.lr_warmup_steps.fract() == 0.0)) {
            bail!("lr_warmup_steps must be a whole number of steps or a fraction below 1, got {}", c.lr_warmup_steps);
        }
        if c.min_timestep >= c.max_timestep || c.max_timestep > 1000 {
            bail!(
                "timesteps must satisfy 0 ≤ min_timestep < max_timestep ≤ 1000 (got {}..{})",
                c.min_timestep,
                c.max_timestep
            );
        }
        c.max_token_length = match c.max_token_length {
            None | Some(75) => None,
            Some(n @ (150 | 225)) => Some(n),
            Some(n) => bail!("max_token_length must be 75, 150 or 225 (sd-scripts' choices), got {n}"),
        };
        if (c.cache_text_encoder_outputs || c.cache_text_encoder_outputs_to_disk) && !c.network_train_unet_only {
            bail!("cache_text_encoder_outputs: a network for the text encoder cannot be trained with cached text-encoder outputs (sd-scripts' rule); add network_train_unet_only, or leave the cache off");
        }
        if c.network_train_unet_only && c.network_train_text_encoder_only {
            bail!("network_train_unet_only and network_train_text_encoder_only exclude each other");
        }
        Ok(c)
    }

    /// Warmup steps for a run of `total` optimizer steps.
    pub fn warmup_steps(&self, total: usize) -> usize {
        let w = self.lr_warmup_steps;
        if w > 0.0 && w < 1.0 {
            (w * total as f64).round() as usize
        } else {
            w as usize
        }
    }

    /// The frozen model's dtype that `mixed_precision` asks for on `device` (None: f32). bf16 stays f32 on the
    /// CPU, where candle has no bf16 convolution: the run keeps full precision there rather than failing.
    pub fn base_dtype_for(&self, device: &candle_core::Device) -> Option<candle_core::DType> {
        base_dtype_for(self.mixed_precision.as_deref(), device)
    }

    /// The save dtype (`save_precision`: float, fp16, bf16).
    pub fn save_dtype(&self) -> Result<candle_core::DType> {
        Ok(match self.save_precision.as_str() {
            "float" | "fp32" | "f32" => candle_core::DType::F32,
            "fp16" | "f16" => candle_core::DType::F16,
            "bf16" => candle_core::DType::BF16,
            other => bail!("save_precision must be float, fp16 or bf16, got {other:?}"),
        })
    }
}

/// The frozen model's dtype for `mixed_precision` on `device` (see [`TrainConfig::base_dtype_for`]).
pub fn base_dtype_for(mixed_precision: Option<&str>, device: &candle_core::Device) -> Option<candle_core::DType> {
    match mixed_precision {
        Some("fp16") => Some(candle_core::DType::F16),
        Some("bf16") if !device.is_cpu() => Some(candle_core::DType::BF16),
        _ => None,
    }
}
