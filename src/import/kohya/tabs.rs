//! The DreamBooth and Finetuning tabs' own keys.

use super::{coerce, is_sdxl, kind, text, Kind};
use crate::import::Report;
use serde_json::{Map, Value};

/// What a tab's key translation reads (the GUI config) and writes (the options, the report).
pub(super) struct Tab<'a> {
    pub(super) gui: &'a Map<String, Value>,
    pub(super) out: &'a mut Map<String, Value>,
    pub(super) report: &'a mut Report,
}

/// The DreamBooth tab's text-encoder LRs (`learning_rate_te` for SD 1.x/2.x; `learning_rate_te1` / `_te2` for
/// SDXL, where the GUI trains the text encoders when either is above 0) and `no_token_padding`.
pub(super) fn dreambooth_key(key: &str, value: &Value, present: bool, cx: Tab) {
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
pub(super) fn finetune_key(key: &str, value: &Value, present: bool, cx: Tab) {
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
            out.insert(key.into(), Value::from(text(value)));
        }
        "create_caption" | "create_buckets" if present => report.ignored(
            key,
            "a preparation step (sd-scripts' finetune scripts) that sdtune does not run: the metadata file must exist",
        ),
        "batch_size" | "full_path" if present => report.ignored(key, "used by the Finetuning tab's preparation steps"),
        _ => {}
    }
}
