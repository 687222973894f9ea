//! kohya_ss GUI configs (the flat JSON its forms save, and its presets) → sd-scripts options, as the GUI turns
//! them into a `train_network.py` command line: legacy keys migrated, numbers given as strings read as numbers,
//! `LoRA_type` → `network_module` and `network_args`, the percentage warmup, the noise-offset type, …
//! Every key is accounted for: taken over, or listed in the report with why not.

use super::Report;
use anyhow::{bail, Result};
use serde_json::{Map, Value};

/// What becomes of one GUI key.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Rule {
    /// The same sd-scripts option.
    Same,
    /// Another sd-scripts option name.
    To(&'static str),
    /// Read together with other keys by [`to_sd_scripts`].
    Special,
    /// Kept out, with why (the report lists it).
    Ignore(&'static str),
    /// Only means something for a model family, trainer or network type sdtune does not train.
    NotApplicable(&'static str),
}

use Rule::*;

const ACCELERATE: Rule = Ignore("accelerate launch setting; sdtune runs in-process on one device");
const NO_EFFECT: Rule = Ignore("no effect in sdtune (attention and data loading are built in)");
const OTHER_MODEL: Rule = NotApplicable("FLUX / SD3 / other model families");
const HUB: Rule = Ignore("Hugging Face upload settings: not supported");
const GUI_ONLY: Rule = Ignore("a kohya_ss GUI field with no sd-scripts option");
const LYCORIS: Rule = NotApplicable("LyCORIS / DyLoRA / native LoHa-LoKr network settings");

/// The `network_args` kohya_ss writes for its LyCORIS types (`lora_gui.py`), in its order: (argument, GUI key,
/// the GUI's default when the key is absent). `algo` is added by type.
const LYCORIS_ARGS: &[(&str, &str, &str, &[&str])] = &[
    ("preset", "LyCORIS_preset", "full", &["LoCon", "LoHa", "LoKr"]),
    ("conv_dim", "conv_dim", "1", &["LoCon", "LoHa", "LoKr"]),
    ("conv_alpha", "conv_alpha", "1", &["LoCon", "LoHa", "LoKr"]),
    ("use_tucker", "use_tucker", "False", &["LoCon", "LoHa", "LoKr"]),
    ("rank_dropout", "rank_dropout", "0", &["LoCon", "LoHa", "LoKr"]),
    ("bypass_mode", "bypass_mode", "False", &["LoCon", "LoHa", "LoKr"]),
    ("dora_wd", "dora_wd", "False", &["LoCon", "LoHa", "LoKr"]),
    ("module_dropout", "module_dropout", "0", &["LoCon", "LoHa", "LoKr"]),
    ("factor", "factor", "-1", &["LoKr"]),
    ("use_cp", "use_cp", "False", &["LoKr"]),
    ("use_scalar", "use_scalar", "False", &["LoCon", "LoHa", "LoKr"]),
    ("decompose_both", "decompose_both", "False", &["LoKr"]),
    ("rank_dropout_scale", "rank_dropout_scale", "False", &["LoCon", "LoHa", "LoKr"]),
    ("train_norm", "train_norm", "False", &["LoCon", "LoHa", "LoKr"]),
];

/// The LyCORIS type of a `LoRA_type` sdtune trains (`LyCORIS/LoHa` → LoHa; the legacy `LoCon` is the GUI's
/// LyCORIS/LoCon), if it is one.
fn lycoris_type(gui: &Map<String, Value>) -> Option<&'static str> {
    match gui.get("LoRA_type").map(text).as_deref() {
        Some("LyCORIS/LoCon" | "LoCon") => Some("LoCon"),
        Some("LyCORIS/LoHa") => Some("LoHa"),
        Some("LyCORIS/LoKr") => Some("LoKr"),
        _ => None,
    }
}

/// A GUI value as Python's f-string writes it (`True`/`False` for booleans).
fn py_text(v: &Value) -> String {
    match v {
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        other => text(other),
    }
}

/// Every GUI key sdtune knows, and its rule. A key not in this table is an error naming it.
const KEYS: &[(&str, Rule)] = &[
    // the model
    ("pretrained_model_name_or_path", Same),
    ("v2", Ignore("the family is detected from the weights")),
    ("v_parameterization", Same),
    ("sdxl", Special),
    ("sdxl_checkbox", Special),
    ("flux1_checkbox", Special),
    ("sd3_checkbox", Special),
    ("clip_skip", Same),
    ("vae", Same),
    ("model_list", GUI_ONLY),
    ("max_token_length", Special),
    ("no_half_vae", NotApplicable("SDXL")),
    ("sdxl_no_half_vae", Ignore("sdtune keeps the SDXL VAE in f32 whenever the model is loaded in f16")),
    ("sdxl_cache_text_encoder_outputs", To("cache_text_encoder_outputs")),
    ("disable_mmap_load_safetensors", Ignore("safetensors are always memory-mapped")),
    // data
    ("train_data_dir", Same),
    ("reg_data_dir", Same),
    ("dataset_config", Same),
    ("max_resolution", To("resolution")),
    ("enable_bucket", Same),
    ("min_bucket_reso", Same),
    ("max_bucket_reso", Same),
    ("bucket_reso_steps", Same),
    ("bucket_no_upscale", Same),
    ("caption_extension", Same),
    ("shuffle_caption", Same),
    ("keep_tokens", Same),
    ("caption_dropout_rate", Same),
    ("caption_dropout_every_n_epochs", Same),
    ("color_aug", Same),
    ("flip_aug", Same),
    ("random_crop", Same),
    ("cache_latents", Same),
    ("cache_latents_to_disk", Same),
    ("vae_batch_size", Same),
    ("skip_cache_check", Ignore("latent caches are always checked")),
    ("weighted_captions", Same),
    ("max_data_loader_n_workers", NO_EFFECT),
    ("persistent_data_loader_workers", NO_EFFECT),
    // the network
    ("LoRA_type", Special),
    ("network_dim", Same),
    ("network_alpha", Same),
    ("conv_dim", Special),
    ("conv_alpha", Special),
    ("network_dropout", Same),
    ("rank_dropout", Special),
    ("module_dropout", Special),
    ("loraplus_lr_ratio", Special),
    ("loraplus_unet_lr_ratio", Special),
    ("loraplus_text_encoder_lr_ratio", Special),
    ("scale_weight_norms", Same),
    ("dim_from_weights", Same),
    ("network_weights", Same),
    ("lora_network_weights", To("network_weights")),
    ("block_dims", Special),
    ("block_alphas", Special),
    ("conv_block_dims", Special),
    ("conv_block_alphas", Special),
    ("down_lr_weight", Special),
    ("mid_lr_weight", Special),
    ("up_lr_weight", Special),
    ("block_lr_zero_threshold", Special),
    ("conv_dims", GUI_ONLY),
    ("conv_alphas", GUI_ONLY),
    ("LyCORIS_preset", Special),
    ("factor", Special),
    ("use_cp", Special),
    ("use_tucker", Special),
    ("use_scalar", Special),
    ("rank_dropout_scale", Special),
    ("constrain", LYCORIS),
    ("rescaled", LYCORIS),
    ("train_norm", Special),
    ("bypass_mode", Special),
    ("dora_wd", Special),
    ("decompose_both", Special),
    ("train_on_input", LYCORIS),
    ("unit", LYCORIS),
    // optimizer and schedule
    ("optimizer", To("optimizer_type")),
    ("use_8bit_adam", Special),
    ("optimizer_args", Special),
    ("learning_rate", Same),
    ("unet_lr", Special),
    ("text_encoder_lr", Special),
    ("lr_scheduler", Same),
    ("lr_scheduler_num_cycles", Same),
    ("lr_scheduler_power", Same),
    ("lr_scheduler_args", Special),
    ("lr_scheduler_type", Special),
    ("lr_warmup", Special),
    ("lr_warmup_steps", Special),
    ("max_grad_norm", Same),
    // the loop
    ("train_batch_size", Same),
    ("epoch", Special),
    ("max_train_epochs", Special),
    ("max_train_steps", Special),
    ("gradient_accumulation_steps", Same),
    ("gradient_checkpointing", Same),
    ("mixed_precision", Same),
    ("full_bf16", Same),
    ("full_fp16", Same),
    ("fp8_base", Same),
    ("seed", Same),
    ("stop_text_encoder_training", Special),
    ("stop_text_encoder_training_pct", Special),
    ("prior_loss_weight", Same),
    ("min_snr_gamma", Same),
    ("noise_offset_type", Special),
    ("noise_offset", Special),
    ("adaptive_noise_scale", Special),
    ("noise_offset_random_strength", Special),
    ("multires_noise_iterations", Special),
    ("multires_noise_discount", Special),
    ("ip_noise_gamma", Same),
    ("ip_noise_gamma_random_strength", Same),
    ("min_timestep", Same),
    ("max_timestep", Same),
    ("scale_v_pred_loss_like_noise_pred", Same),
    ("v_pred_like_loss", Same),
    ("debiased_estimation_loss", Same),
    ("loss_type", Same),
    ("huber_c", Same),
    ("huber_schedule", Same),
    ("huber_scale", Special),
    ("masked_loss", Same),
    ("xformers", NO_EFFECT),
    ("mem_eff_attn", NO_EFFECT),
    // saving, samples, logging
    ("output_dir", Same),
    ("output_name", Same),
    ("save_model_as", Special),
    ("save_precision", Same),
    ("save_every_n_epochs", Same),
    ("save_every_n_steps", Same),
    ("save_last_n_epochs", Same),
    ("save_last_n_steps", Same),
    ("save_last_n_epochs_state", Special),
    ("save_last_n_steps_state", Special),
    ("save_state", Same),
    ("save_state_on_train_end", Special),
    ("save_as_bool", GUI_ONLY),
    ("mem_eff_save", Ignore("saving is always streamed")),
    ("resume", Special),
    ("sample_prompts", Special),
    ("sample_every_n_steps", Same),
    ("sample_every_n_epochs", Same),
    ("sample_sampler", Same),
    ("logging_dir", Same),
    ("log_with", Special),
    ("use_wandb", Special),
    ("log_tracker_name", Ignore("trackers other than TensorBoard are not supported")),
    ("log_tracker_config", Ignore("trackers other than TensorBoard are not supported")),
    ("wandb_api_key", Ignore("trackers other than TensorBoard are not supported")),
    ("wandb_run_name", Ignore("trackers other than TensorBoard are not supported")),
    ("log_config", GUI_ONLY),
    ("training_comment", Same),
    ("metadata_author", Special),
    ("metadata_description", Special),
    ("metadata_license", Special),
    ("metadata_tags", Special),
    ("metadata_title", Special),
    ("additional_parameters", Special),
    // accelerate
    ("num_processes", ACCELERATE),
    ("num_machines", ACCELERATE),
    ("num_cpu_threads_per_process", ACCELERATE),
    ("multi_gpu", ACCELERATE),
    ("gpu_ids", ACCELERATE),
    ("main_process_port", ACCELERATE),
    ("dynamo_backend", ACCELERATE),
    ("dynamo_mode", ACCELERATE),
    ("dynamo_use_dynamic", ACCELERATE),
    ("dynamo_use_fullgraph", ACCELERATE),
    ("extra_accelerate_launch_args", ACCELERATE),
    // Hugging Face
    ("huggingface_repo_id", HUB),
    ("huggingface_token", HUB),
    ("huggingface_repo_type", HUB),
    ("huggingface_repo_visibility", HUB),
    ("huggingface_path_in_repo", HUB),
    ("save_state_to_huggingface", HUB),
    ("resume_from_huggingface", HUB),
    ("async_upload", HUB),
    // other model families and memory schemes for them
    ("flux1_cache_text_encoder_outputs", OTHER_MODEL),
    ("flux1_cache_text_encoder_outputs_to_disk", OTHER_MODEL),
    ("flux1_clip_l", OTHER_MODEL),
    ("flux1_t5xxl", OTHER_MODEL),
    ("flux_fused_backward_pass", OTHER_MODEL),
    ("sd3_cache_text_encoder_outputs", OTHER_MODEL),
    ("sd3_cache_text_encoder_outputs_to_disk", OTHER_MODEL),
    ("sd3_fused_backward_pass", OTHER_MODEL),
    ("sd3_text_encoder_batch_size", OTHER_MODEL),
    ("t5xxl", OTHER_MODEL),
    ("t5xxl_device", OTHER_MODEL),
    ("t5xxl_dtype", OTHER_MODEL),
    ("t5xxl_max_token_length", OTHER_MODEL),
    ("save_t5xxl", OTHER_MODEL),
    ("save_clip", OTHER_MODEL),
    ("clip_g", OTHER_MODEL),
    ("clip_l", OTHER_MODEL),
    ("ae", OTHER_MODEL),
    ("apply_t5_attn_mask", OTHER_MODEL),
    ("guidance_scale", OTHER_MODEL),
    ("discrete_flow_shift", OTHER_MODEL),
    ("model_prediction_type", OTHER_MODEL),
    ("timestep_sampling", OTHER_MODEL),
    ("weighting_scheme", OTHER_MODEL),
    ("logit_mean", OTHER_MODEL),
    ("logit_std", OTHER_MODEL),
    ("mode_scale", OTHER_MODEL),
    ("split_mode", OTHER_MODEL),
    ("train_blocks", OTHER_MODEL),
    ("blocks_to_swap", OTHER_MODEL),
    ("single_blocks_to_swap", OTHER_MODEL),
    ("double_blocks_to_swap", OTHER_MODEL),
    ("cpu_offload_checkpointing", OTHER_MODEL),
    ("blockwise_fused_optimizers", OTHER_MODEL),
    ("fused_backward_pass", OTHER_MODEL),
    ("fused_optimizer_groups", OTHER_MODEL),
    // other trainers' tabs
    ("learning_rate_te", Special),
    ("learning_rate_te1", Special),
    ("learning_rate_te2", Special),
    ("no_token_padding", Special),
    ("token_string", Special),
    ("init_word", Special),
    ("num_vectors_per_token", Special),
    ("template", Special),
    ("weights", Special),
    ("train_dir", Special),
    ("image_folder", Special),
    ("train_text_encoder", Special),
    ("block_lr", Special),
    ("batch_size", Special),
    ("dataset_repeats", Special),
    ("caption_metadata_filename", Special),
    ("latent_metadata_filename", Special),
    ("create_buckets", Special),
    ("create_caption", Special),
    ("full_path", Special),
    ("use_latent_files", Special),
];

/// What the GUI leaves "unset": empty text, false, and a 0 in an optional number field.
fn unset(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.trim().is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        _ => false,
    }
}

/// The GUI's numbers-as-strings read back as numbers (integral values as integers); other text stays text.
fn coerce(v: &Value) -> Value {
    let num = |x: f64| if x.fract() == 0.0 && x.abs() < 9e15 { Value::from(x as i64) } else { Value::from(x) };
    match v {
        Value::String(s) => match s.trim().parse::<f64>() {
            Ok(x) if x.is_finite() => num(x),
            _ => v.clone(),
        },
        Value::Number(n) => n.as_f64().map(num).unwrap_or_else(|| v.clone()),
        _ => v.clone(),
    }
}

/// A GUI value as text (for network_args and paths).
fn text(v: &Value) -> String {
    match coerce(v) {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// Which GUI tab a config comes from.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Lora,
    DreamBooth,
    FineTuning,
    TextualInversion,
}

/// The tab a config was saved from: LoRA configs have a network, textual inversion a token string, the
/// Finetuning tab a `train_dir`; the rest is the DreamBooth tab.
fn kind(gui: &Map<String, Value>) -> Kind {
    if gui.contains_key("LoRA_type") || gui.contains_key("network_dim") {
        Kind::Lora
    } else if gui.contains_key("token_string") {
        Kind::TextualInversion
    } else if gui.contains_key("train_dir") {
        Kind::FineTuning
    } else {
        Kind::DreamBooth
    }
}

fn out_kind_note(report: &mut Report) {
    report.note("(config)", "a DreamBooth config: the model itself trains (fine_tune), as train_db.py / sdxl_train.py");
}

/// Whether the config is for SDXL.
fn is_sdxl(gui: &Map<String, Value>) -> bool {
    ["sdxl", "sdxl_checkbox"].iter().any(|k| gui.get(*k).is_some_and(|v| !unset(v)))
}

/// GUI keys passed on as `network_args` (`key=value`) when present.
const NETWORK_ARGS: [&str; 13] = [
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
    "block_lr_zero_threshold",
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
    "rank_dropout",
    "module_dropout",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
];

/// Translates a kohya_ss GUI config to sd-scripts options; the sample prompts the GUI keeps as text come back
/// separately (sd-scripts reads them from a file).
pub fn to_sd_scripts(gui: &Map<String, Value>) -> Result<(Map<String, Value>, Report, Option<String>)> {
    let mut report = Report::default();
    if let Some(k) = gui.keys().find(|k| !KEYS.iter().any(|(n, _)| n == k)) {
        bail!("unknown kohya_ss key `{k}`: not a field of the kohya_ss GUI's LoRA, DreamBooth, fine-tune or textual-inversion tabs");
    }
    let get = |k: &str| gui.get(k).filter(|v| !unset(v));
    // what kind of training this is
    for (k, fam) in [("flux1_checkbox", "FLUX.1"), ("sd3_checkbox", "SD3")] {
        if get(k).is_some() {
            report.unsupported(k, &format!("{fam} is not supported"));
        }
    }
    let lora_type = gui.get("LoRA_type").map(text);
    match kind(gui) {
        Kind::Lora => {}
        Kind::DreamBooth => out_kind_note(&mut report),
        Kind::TextualInversion => report.note(
            "(config)",
            "a textual-inversion config: the word's vectors train (train_textual_inversion.py)",
        ),
        Kind::FineTuning => report.note(
            "(config)",
            "a Finetuning-tab config: the model itself trains (fine_tune), on the images with their metadata file (in_json), as fine_tune.py / sdxl_train.py",
        ),
    }
    let module = match lora_type.as_deref() {
        None | Some("Standard") => "networks.lora",
        Some("Kohya LoCon") => "networks.lora",
        Some("LoRA-FA") => "networks.lora_fa",
        Some("LyCORIS/LoCon" | "LoCon" | "LyCORIS/LoHa" | "LyCORIS/LoKr") => "lycoris.kohya",
        Some(other) => {
            report.unsupported(
                "LoRA_type",
                &format!(
                    "{other} is not supported yet (Standard, Kohya LoCon, LoRA-FA, LyCORIS/LoCon, LyCORIS/LoHa and LyCORIS/LoKr are)"
                ),
            );
            "networks.lora"
        }
    };
    let mut out = Map::new();
    let mut network_args: Vec<String> = Vec::new();
    if lora_type.as_deref() == Some("Kohya LoCon") {
        for k in ["conv_dim", "conv_alpha"] {
            if let Some(v) = get(k) {
                network_args.push(format!("{k}={}", text(v)));
            }
        }
    }
    if let Some(t) = lycoris_type(gui) {
        // the GUI's LyCORIS arguments, every one written (absent keys at the GUI's defaults)
        for (arg, key, default, types) in LYCORIS_ARGS {
            if types.contains(&t) {
                let v =
                    gui.get(*key).map(py_text).filter(|v| !v.trim().is_empty()).unwrap_or_else(|| default.to_string());
                network_args.push(format!("{arg}={v}"));
            }
        }
        // the GUI's order: algo before train_norm, the last
        network_args.insert(network_args.len() - 1, format!("algo={}", t.to_ascii_lowercase()));
    }
    for k in NETWORK_ARGS {
        if lycoris_type(gui).is_some() && matches!(k, "rank_dropout" | "module_dropout") {
            continue; // written with the LyCORIS arguments
        }
        if let Some(v) = get(k) {
            network_args.push(format!("{k}={}", text(v)));
        }
    }
    match kind(gui) {
        Kind::Lora => {
            out.insert("network_module".into(), module.into());
        }
        Kind::DreamBooth | Kind::FineTuning => {
            out.insert("fine_tune".into(), Value::Bool(true));
        }
        Kind::TextualInversion => {}
    }
    let noise_type = gui.get("noise_offset_type").map(text).unwrap_or_else(|| "Original".into());
    for (key, value) in gui {
        let rule = KEYS.iter().find(|(n, _)| n == key).map(|(_, r)| *r).expect("checked above");
        let present = !unset(value);
        match rule {
            Same | To(_) if present => {
                let to = if let To(t) = rule { t } else { key.as_str() };
                out.insert(to.into(), coerce(value));
            }
            Same | To(_) => {}
            Ignore(why) | NotApplicable(why) => {
                if present {
                    report.ignored(key, why);
                }
            }
            Special => special(key, value, present, &noise_type, gui, &mut out, &mut report)?,
        }
    }
    if let Some(extra) = get("additional_parameters") {
        for (k, v) in super::parse_flags(&text(extra).split_whitespace().map(String::from).collect::<Vec<_>>())? {
            report.note("additional_parameters", &format!("--{k} taken over"));
            out.insert(k, v);
        }
    }
    if !network_args.is_empty() {
        out.insert("network_args".into(), Value::Array(network_args.into_iter().map(Value::from).collect()));
    }
    let prompts = get("sample_prompts").map(text);
    Ok((out, report, prompts))
}

/// What a tab's key translation reads (the GUI config) and writes (the options, the report).
struct Tab<'a> {
    gui: &'a Map<String, Value>,
    out: &'a mut Map<String, Value>,
    report: &'a mut Report,
}

/// The DreamBooth tab's text-encoder LRs (`learning_rate_te` for SD 1.x/2.x; `learning_rate_te1` / `_te2` for
/// SDXL, where the GUI trains the text encoders when either is above 0) and `no_token_padding`.
fn dreambooth_key(key: &str, value: &Value, present: bool, cx: Tab) {
    let Tab { gui, out, report } = cx;
    if !matches!(kind(gui), Kind::DreamBooth | Kind::FineTuning) {
        if present {
            report.ignored(key, "DreamBooth / fine-tune / textual-inversion tabs");
        }
        return;
    }
    let num = |k: &str| gui.get(k).map(coerce).and_then(|v| v.as_f64()).unwrap_or(0.0);
    let sdxl = is_sdxl(gui);
    match key {
        "no_token_padding" if present => {
            report.unsupported(key, "not supported yet (captions are padded to 77 tokens)");
        }
        "learning_rate_te" if !sdxl => {
            if present {
                out.insert("learning_rate_te".into(), coerce(value));
            } else {
                // the GUI passes 0, and train_db.py trains the text encoder at LR 0: it stays as it is
                out.insert("train_text_encoder".into(), Value::Bool(false));
                report.note(key, "0: the text encoder is not trained");
            }
        }
        "learning_rate_te1" if sdxl => {
            let (te1, te2) = (num("learning_rate_te1"), num("learning_rate_te2"));
            if te1 <= 0.0 && te2 <= 0.0 {
                out.insert("train_text_encoder".into(), Value::Bool(false));
            } else {
                // sdxl_train.py: each encoder at its LR, 0 leaving it untrained
                out.insert("learning_rate_te1".into(), Value::from(te1.max(0.0)));
                out.insert("learning_rate_te2".into(), Value::from(te2.max(0.0)));
            }
        }
        // SDXL's learning_rate_te2 is read with te1 above
        "learning_rate_te1" | "learning_rate_te2" | "learning_rate_te"
            if present && !(sdxl && key == "learning_rate_te2") =>
        {
            report.ignored(key, if sdxl { "SDXL takes learning_rate_te1 / _te2" } else { "for SDXL only" });
        }
        _ => {}
    }
}

/// The Finetuning tab: fine_tune.py on `image_folder` with the metadata file in `train_dir` (the latents' one when
/// `use_latent_files` is "Yes", else the captions'), `dataset_repeats`, `train_text_encoder`. The tab's preparation
/// steps (merging captions into the metadata, bucketing and caching latents with sd-scripts' finetune scripts) are
/// not run: the metadata file must exist (a missing one is an error naming it when the run opens its data).
fn finetune_key(key: &str, value: &Value, present: bool, cx: Tab) {
    let Tab { gui, out, report } = cx;
    if kind(gui) != Kind::FineTuning {
        if present {
            report.ignored(key, "the Finetuning tab's");
        }
        return;
    }
    let get = |k: &str| gui.get(k).map(text).unwrap_or_default();
    match key {
        "image_folder" => {
            out.insert("train_data_dir".into(), coerce(value));
        }
        "train_dir" => {
            let file = if get("use_latent_files") == "Yes" {
                get("latent_metadata_filename")
            } else {
                get("caption_metadata_filename")
            };
            let dir = text(value);
            let path = if dir.is_empty() { file } else { format!("{}/{file}", dir.trim_end_matches('/')) };
            out.insert("in_json".into(), Value::from(path));
        }
        "dataset_repeats" if present => {
            out.insert("dataset_repeats".into(), coerce(value));
        }
        "train_text_encoder" => {
            let te_lr = gui
                .get(if is_sdxl(gui) { "learning_rate_te1" } else { "learning_rate_te" })
                .map(coerce)
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0);
            // fine_tune.py trains the text encoder only when asked; the GUI's LR 0 leaves it as it is
            out.insert("train_text_encoder".into(), Value::Bool(present && te_lr > 0.0));
        }
        "block_lr" if present => {
            report.unsupported(key, "per-block LRs (sdxl_train.py's block_lr) are not supported yet")
        }
        "create_caption" | "create_buckets" if present => report.ignored(
            key,
            "a preparation step (sd-scripts' finetune scripts) that sdtune does not run: the metadata file must exist",
        ),
        "batch_size" | "full_path" if present => report.ignored(key, "used by the Finetuning tab's preparation steps"),
        _ => {}
    }
}

/// The keys the GUI reads together with others.
fn special(
    key: &str,
    value: &Value,
    present: bool,
    noise_type: &str,
    gui: &Map<String, Value>,
    out: &mut Map<String, Value>,
    report: &mut Report,
) -> Result<()> {
    let num = |k: &str| gui.get(k).map(coerce).and_then(|v| v.as_f64()).unwrap_or(0.0);
    match key {
        // read where the kind of config is decided, or with LoRA_type
        "token_string" | "init_word" | "num_vectors_per_token" | "weights" => {
            if present && kind(gui) == Kind::TextualInversion {
                out.insert(key.into(), coerce(value));
            } else if present {
                report.ignored(key, "the textual-inversion tab's");
            }
        }
        "template" => match (kind(gui), text(value).as_str()) {
            (Kind::TextualInversion, "object template") => {
                out.insert("use_object_template".into(), Value::Bool(true));
            }
            (Kind::TextualInversion, "style template") => {
                out.insert("use_style_template".into(), Value::Bool(true));
            }
            (Kind::TextualInversion, "caption" | "") => {}
            (Kind::TextualInversion, other) => {
                report.unsupported(key, &format!("{other:?} is not a kohya_ss template"))
            }
            _ => {
                if present {
                    report.ignored(key, "the textual-inversion tab's");
                }
            }
        },
        "sdxl" | "sdxl_checkbox" | "flux1_checkbox" | "sd3_checkbox" | "LoRA_type" | "sample_prompts" => {}
        "conv_dim" | "conv_alpha" => {
            if present
                && gui.get("LoRA_type").map(text).as_deref() != Some("Kohya LoCon")
                && lycoris_type(gui).is_none()
            {
                report.ignored(key, "used only by LoRA_type Kohya LoCon and the LyCORIS types");
            }
        }
        k if LYCORIS_ARGS.iter().any(|(_, g, _, _)| *g == k) && !NETWORK_ARGS.contains(&k) => {
            let used =
                lycoris_type(gui).is_some_and(|t| LYCORIS_ARGS.iter().any(|(_, g, _, ts)| *g == k && ts.contains(&t)));
            if present && !used {
                match lycoris_type(gui) {
                    Some(t) => report.ignored(key, &format!("the GUI does not pass it for LyCORIS/{t}")),
                    None => {
                        if let NotApplicable(why) = LYCORIS {
                            report.ignored(key, why);
                        }
                    }
                }
            }
        }
        k if NETWORK_ARGS.contains(&k) => {}
        "max_token_length" => {
            if present && num(key) > 75.0 {
                out.insert(key.into(), Value::from(num(key) as u64));
            }
        }
        "use_8bit_adam" => {
            if present {
                out.insert("optimizer_type".into(), "AdamW8bit".into());
            }
        }
        "optimizer_args" | "lr_scheduler_args" => {
            if present {
                let args: Vec<Value> = text(value).split_whitespace().map(Value::from).collect();
                if key == "lr_scheduler_args" {
                    // sd-scripts passes them to the scheduler; piecewise_constant's step_rules is the one sdtune reads
                    for a in &args {
                        match a.as_str().and_then(|a| a.split_once('=')) {
                            Some(("step_rules", r)) => {
                                out.insert("step_rules".into(), r.trim_matches('"').into());
                            }
                            _ => report.unsupported(key, &format!("{a} is not supported yet")),
                        }
                    }
                } else {
                    out.insert(key.into(), Value::Array(args));
                }
            }
        }
        "unet_lr" | "text_encoder_lr" => {
            if let Some(v) = gui.get(key).filter(|v| !matches!(v, Value::String(s) if s.trim().is_empty())) {
                let lr = coerce(v);
                if lr.as_f64() == Some(0.0) {
                    // the GUI: a zero LR leaves that part untrained
                    let only =
                        if key == "unet_lr" { "network_train_text_encoder_only" } else { "network_train_unet_only" };
                    out.insert(only.into(), true.into());
                } else {
                    out.insert(key.into(), lr);
                }
            }
        }
        "lr_scheduler_type" => {
            if present {
                report.unsupported(key, "custom scheduler classes are not supported");
            }
        }
        "lr_warmup" | "lr_warmup_steps" => {
            // the GUI's lr_warmup is a percentage of the training steps; lr_warmup_steps, when set, wins
            if key == "lr_warmup_steps" && present {
                out.insert(key.into(), coerce(value));
            } else if key == "lr_warmup" && present && unset(gui.get("lr_warmup_steps").unwrap_or(&Value::Null)) {
                out.insert("lr_warmup_steps".into(), Value::from(num(key) / 100.0));
            }
        }
        "epoch" | "max_train_epochs" | "max_train_steps" => {
            // max_train_steps wins, then max_train_epochs, then the GUI's epoch count
            if key == "max_train_steps" && present {
                out.insert(key.into(), coerce(value));
            } else if key != "max_train_steps"
                && num("max_train_steps") == 0.0
                && present
                && (key == "max_train_epochs" || num("max_train_epochs") == 0.0)
            {
                out.insert("max_train_epochs".into(), coerce(value));
                if key == "epoch" {
                    report.note(
                        key,
                        "→ max_train_epochs (kohya_ss turns epochs into max_train_steps from its own image count; \
                         sdtune counts bucketed batches, which can give a few more steps per epoch)",
                    );
                }
            }
        }
        "stop_text_encoder_training" => {
            if present {
                if kind(gui) == Kind::DreamBooth {
                    out.insert(key.into(), coerce(value));
                } else {
                    report.ignored(key, "kohya_ss's LoRA tab ignores it (\"not yet supported\")");
                }
            }
        }
        "learning_rate_te" | "learning_rate_te1" | "learning_rate_te2" | "no_token_padding" => {
            dreambooth_key(key, value, present, Tab { gui, out, report })
        }
        "train_dir"
        | "image_folder"
        | "train_text_encoder"
        | "block_lr"
        | "batch_size"
        | "dataset_repeats"
        | "caption_metadata_filename"
        | "latent_metadata_filename"
        | "create_buckets"
        | "create_caption"
        | "full_path"
        | "use_latent_files" => finetune_key(key, value, present, Tab { gui, out, report }),
        "stop_text_encoder_training_pct" => {
            if present {
                report.unsupported(key, "a percentage stop is not supported yet (stop_text_encoder_training is)");
            }
        }
        "noise_offset" | "adaptive_noise_scale" | "noise_offset_random_strength" => {
            if present {
                if noise_type == "Original" {
                    out.insert(key.into(), coerce(value));
                } else {
                    report.ignored(key, "noise_offset_type is Multires");
                }
            }
        }
        "multires_noise_iterations" | "multires_noise_discount" => {
            if present {
                if noise_type == "Multires" {
                    out.insert(key.into(), coerce(value));
                } else {
                    report.ignored(key, "noise_offset_type is Original");
                }
            }
        }
        "noise_offset_type" => {
            if !["Original", "Multires"].contains(&noise_type) {
                report.unsupported(key, &format!("{noise_type} is not a kohya_ss noise offset type"));
            }
        }
        "huber_scale" => {
            if present && num(key) != 1.0 {
                report.unsupported(key, "huber_scale is not supported yet");
            }
        }
        "save_model_as" => {
            let as_ = text(value);
            if kind(gui) == Kind::DreamBooth {
                match as_.as_str() {
                    "safetensors" | "diffusers" | "diffusers_safetensors" => {
                        out.insert(key.into(), Value::from(as_));
                    }
                    "" => {}
                    other => report.unsupported(key, &format!("{other}: models are saved as safetensors or diffusers")),
                }
            } else if present && as_ != "safetensors" {
                report.unsupported(key, &format!("{as_}: networks are saved as safetensors"));
            }
        }
        "save_last_n_epochs_state" | "save_last_n_steps_state" | "save_state_on_train_end" | "resume" => {
            if present {
                report.unsupported(key, "not supported yet (use save_state, and `sdtune train --resume DIR`)");
            }
        }
        "log_with" | "use_wandb" => {
            let v = if key == "use_wandb" && present { "wandb".to_string() } else { text(value) };
            match v.as_str() {
                "" | "false" => {}
                "tensorboard" => {}
                other => report.ignored(key, &format!("{other}: only TensorBoard logging (logging_dir) is supported")),
            }
        }
        k if k.starts_with("metadata_") => {
            if present {
                report.ignored(k, "ModelSpec author/description/license/tags/title are not written yet");
            }
        }
        "additional_parameters" => {} // after everything else: its flags win, as on the command line
        other => bail!("internal: no translation for kohya_ss key `{other}`"),
    }
    Ok(())
}
