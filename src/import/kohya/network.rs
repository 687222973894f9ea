//! `LoRA_type` → `network_module` and `network_args`, as the GUI's `lora_gui.py` writes them (Kohya LoCon's conv
//! options, every LyCORIS argument, block and LoRA+ options).

use super::{text, unset};
use crate::import::Report;
use serde_json::{Map, Value};

/// The `network_args` kohya_ss writes for its LyCORIS types (`lora_gui.py`), in its order: (argument, GUI key,
/// the GUI's default when the key is absent). `algo` is added by type.
pub(super) const LYCORIS_ARGS: &[(&str, &str, &str, &[&str])] = &[
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
    // the type itself, lower-cased (no GUI key of its own)
    ("algo", "", "", &["LoCon", "LoHa", "LoKr"]),
    ("train_norm", "train_norm", "False", &["LoCon", "LoHa", "LoKr"]),
];

/// The LyCORIS type of a `LoRA_type` sdtune trains (`LyCORIS/LoHa` → LoHa; the legacy `LoCon` is the GUI's
/// LyCORIS/LoCon), if it is one.
pub(super) fn lycoris_type(gui: &Map<String, Value>) -> Option<&'static str> {
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

/// GUI keys passed on as `network_args` (`key=value`) when present.
pub(super) const NETWORK_ARGS: [&str; 13] = [
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

/// The network module and its arguments for the config's `LoRA_type` (an unsupported type reported).
pub(super) fn translate(gui: &Map<String, Value>, report: &mut Report) -> (&'static str, Vec<String>) {
    let get = |k: &str| gui.get(k).filter(|v| !unset(v));
    let lora_type = gui.get("LoRA_type").map(text);
    let lycoris = lycoris_type(gui);
    let module = match lora_type.as_deref() {
        _ if lycoris.is_some() => "lycoris.kohya",
        None | Some("Standard") => "networks.lora",
        Some("Kohya LoCon") => "networks.lora",
        Some("LoRA-FA") => "networks.lora_fa",
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
    let mut network_args: Vec<String> = Vec::new();
    if lora_type.as_deref() == Some("Kohya LoCon") {
        for k in ["conv_dim", "conv_alpha"] {
            if let Some(v) = get(k) {
                network_args.push(format!("{k}={}", text(v)));
            }
        }
    }
    if let Some(t) = lycoris {
        // the GUI's LyCORIS arguments, every one written (absent keys at the GUI's defaults)
        for (arg, key, default, _) in LYCORIS_ARGS.iter().filter(|(_, _, _, types)| types.contains(&t)) {
            let v = match *arg {
                "algo" => t.to_ascii_lowercase(),
                _ => gui.get(*key).map(py_text).filter(|v| !v.trim().is_empty()).unwrap_or_else(|| default.to_string()),
            };
            network_args.push(format!("{arg}={v}"));
        }
    }
    for k in NETWORK_ARGS {
        if lycoris.is_some() && matches!(k, "rank_dropout" | "module_dropout") {
            continue; // written with the LyCORIS arguments
        }
        if let Some(v) = get(k) {
            network_args.push(format!("{k}={}", text(v)));
        }
    }
    (module, network_args)
}
