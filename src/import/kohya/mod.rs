//! kohya_ss GUI configs (the flat JSON its forms save, and its presets) → sd-scripts options, as the GUI turns
//! them into a `train_network.py` command line: legacy keys migrated, numbers given as strings read as numbers,
//! `LoRA_type` → `network_module` and `network_args`, the percentage warmup, the noise-offset type, …
//! Every key is accounted for: taken over, or listed in the report with why not.

mod keys;
mod network;
mod tabs;

use super::Report;
use anyhow::{bail, Result};
use keys::{Rule::*, KEYS, LYCORIS};
use network::{lycoris_type, LYCORIS_ARGS, NETWORK_ARGS};
use serde_json::{Map, Value};
use tabs::{dreambooth_key, finetune_key, Tab};

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
    let (module, network_args) = network::translate(gui, &mut report);
    let mut out = Map::new();
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
