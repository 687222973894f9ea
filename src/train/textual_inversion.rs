//! Textual inversion (sd-scripts' `train_textual_inversion.py`): a new word whose token vectors train while the
//! model stays frozen; its caption templates.

use super::config::TrainConfig;
use crate::models::StableDiffusion;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use std::sync::Arc;

/// sd-scripts' `imagenet_templates_small` (`use_object_template`).
pub const OBJECT_TEMPLATES: &[&str] = &[
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
];

/// sd-scripts' `imagenet_style_templates_small` (`use_style_template`).
pub const STYLE_TEMPLATES: &[&str] = &[
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
];

/// A word being trained: its vectors, one f32 variable `[n, width]` per text encoder.
pub struct TextualInversion {
    pub word: String,
    pub vars: Vec<Var>,
    /// The text encoders' vocabulary rows as variables while training (with `max_grad_norm`): never updated, their
    /// gradient counts in the clipping norm as in sd-scripts, which clips over the whole embedding table.
    pub tables: Vec<Var>,
    model: Arc<StableDiffusion>,
}

impl Drop for TextualInversion {
    /// The vocabulary rows are frozen again when the run ends.
    fn drop(&mut self) {
        if !self.tables.is_empty() {
            for te in std::iter::once(&self.model.text_encoder).chain(&self.model.text_encoder_2) {
                te.untrack_token_table();
            }
        }
    }
}

impl TextualInversion {
    /// Adds `token_string` to `model` as `num_vectors_per_token` new tokens whose vectors start as `weights`' or
    /// as the token embeddings of `init_word` (cycled, as sd-scripts), and are the variables trained.
    pub fn prepare(model: &Arc<StableDiffusion>, cfg: &TrainConfig) -> Result<Self> {
        let word = cfg.token_string.clone().context("textual inversion needs token_string")?;
        let n = cfg.num_vectors_per_token.unwrap_or(1);
        if n == 0 {
            bail!("num_vectors_per_token must be at least 1");
        }
        let encoders: Vec<_> = std::iter::once(&model.text_encoder).chain(&model.text_encoder_2).collect();
        let start: Vec<Tensor> = match (&cfg.weights, &cfg.init_word) {
            (Some(path), _) => {
                let file = crate::io::embedding::load(path, encoders.len())?;
                if file.vectors[0].dim(0)? != n {
                    bail!("{}: {} vectors, but num_vectors_per_token is {n}", path.display(), file.vectors[0].dim(0)?);
                }
                file.vectors
            }
            (None, Some(init)) => {
                let ids = model.tokenizer.encode_full(init)?;
                let ids = &ids[1..ids.len() - 1];
                if ids.is_empty() {
                    bail!("init_word {init:?} has no tokens");
                }
                let rows: Vec<u32> = (0..n).map(|i| ids[i % ids.len()]).collect();
                encoders
                    .iter()
                    .map(|te| {
                        let idx = Tensor::new(rows.as_slice(), &candle_core::Device::Cpu)?;
                        te.token_vectors(&idx)
                    })
                    .collect::<Result<_>>()?
            }
            (None, None) => bail!("textual inversion needs init_word (the word its vectors start from) or weights"),
        };
        let vars = start
            .iter()
            .map(|t| Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(&model.device)?)?))
            .collect::<Result<Vec<_>>>()?;
        let rows: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        model.add_embedding(&word, &rows).with_context(|| format!("token_string {word:?}"))?;
        let tables = if cfg.max_grad_norm > 0.0 {
            encoders.iter().map(|te| te.track_token_table()).collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        Ok(Self { word, vars, tables, model: model.clone() })
    }
}

/// The caption a template run trains on: a random template with the word, or the caption as it is.
pub fn templated_caption(cfg: &TrainConfig, caption: String, rng: &mut Rng) -> String {
    let templates = match (cfg.use_object_template, cfg.use_style_template) {
        (true, _) => OBJECT_TEMPLATES,
        (false, true) => STYLE_TEMPLATES,
        _ => return caption,
    };
    let word = cfg.token_string.as_deref().unwrap_or_default();
    templates[rng.below(templates.len())].replace("{}", word)
}
