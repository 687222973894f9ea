//! What training adds to a loaded model: a copy with trainable weights (full fine-tuning) and textual-inversion
//! embeddings (new words standing for added token vectors).

use super::clip::ClipTextModel;
use super::unet::UNet;
use super::vae::Vae;
use super::StableDiffusion;
use crate::nn::adapter::Registry;
use crate::nn::Weights;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// The variables of a model copy made for full fine-tuning, by component (diffusers names, sorted); empty for a
/// component that is not trained.
pub struct Trainables {
    pub unet: Vec<(String, Var)>,
    pub text_encoder: Vec<(String, Var)>,
    pub text_encoder_2: Vec<(String, Var)>,
}

impl StableDiffusion {
    /// A copy for full fine-tuning (DreamBooth, fine-tune): the UNet and the text encoders `text_encoders` says
    /// (first, second) rebuilt on f32 variables; the copy's UNet computes in `compute` (f32, or half precision as under
    /// autocast), trained text encoders in f32; the VAE and the rest shared with `self`, which keeps its own
    /// weights. Returns the copy and its variables by component, in diffusers names.
    pub fn trainable(&self, text_encoders: (bool, bool), compute: DType) -> Result<(Self, Trainables)> {
        let vars = |map: &HashMap<String, Tensor>| -> Result<Vec<(String, Var)>> {
            let mut v: Vec<(String, Var)> = map
                .iter()
                .map(|(k, t)| Ok((k.clone(), Var::from_tensor(&t.to_dtype(DType::F32)?)?)))
                .collect::<Result<_>>()?;
            v.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(v)
        };
        let as_map = |v: &[(String, Var)]| -> HashMap<String, Tensor> {
            v.iter().map(|(k, var)| (k.clone(), var.as_tensor().clone())).collect()
        };
        let src = self.source.display().to_string();
        let mut components = self.components.clone();
        let unet_vars = vars(&components.unet)?;
        components.unet = as_map(&unet_vars);
        let unet_layers = Registry::default();
        let unet_w = Weights::new(components.unet.clone(), &format!("{src} (unet)")).with_registry(unet_layers.clone());
        let unet = UNet::new(&unet_w, self.unet.cfg.clone())?;
        let (te_layers, te2_layers) = (Registry::default(), Registry::default());
        let mut te_vars = Vec::new();
        let mut te2_vars = Vec::new();
        if text_encoders.0 {
            te_vars = vars(&components.text_encoder)?;
            components.text_encoder = as_map(&te_vars);
        }
        if text_encoders.1 && self.text_encoder_2.is_some() {
            te2_vars = vars(&components.text_encoder_2)?;
            components.text_encoder_2 = as_map(&te2_vars);
        }
        let te_w = Weights::new(components.text_encoder.clone(), &format!("{src} (text encoder)"))
            .with_registry(te_layers.clone());
        let text_encoder = ClipTextModel::new(&te_w, self.text_encoder.cfg.clone())?;
        let text_encoder_2 = match &self.text_encoder_2 {
            Some(te2) => {
                let w = Weights::new(components.text_encoder_2.clone(), &format!("{src} (text encoder 2)"))
                    .with_registry(te2_layers.clone());
                Some(ClipTextModel::new(&w, te2.cfg.clone())?)
            }
            None => None,
        };
        // loaded embeddings carry over (the tokenizer's words are shared)
        for (old, new) in std::iter::once((&self.text_encoder, &text_encoder))
            .chain(self.text_encoder_2.as_ref().zip(text_encoder_2.as_ref()))
        {
            if let Some(rows) = old.token_rows()? {
                new.add_token_rows(&rows)?;
            }
        }
        let vae = Vae::new(&Weights::new(components.vae.clone(), &format!("{src} (vae)")), self.vae.cfg.clone())?;
        let model = Self {
            family: self.family,
            v_pred: self.v_pred,
            clip_skip: self.clip_skip,
            vae_scale: self.vae_scale,
            dtype: compute,
            vae_dtype: self.vae_dtype,
            device: self.device.clone(),
            source: self.source.clone(),
            tokenizer: self.tokenizer.clone(),
            text_encoder,
            text_encoder_2,
            pad_id_2: self.pad_id_2,
            unet,
            vae,
            components,
            te_layers,
            te2_layers,
            unet_layers,
            scheduler_config: self.scheduler_config.clone(),
            metadata: self.metadata.clone(),
        };
        Ok((model, Trainables { unet: unet_vars, text_encoder: te_vars, text_encoder_2: te2_vars }))
    }

    /// Loads a textual-inversion embedding file (sd-scripts' / A1111's safetensors, A1111's `.pt`) under `word`
    /// (default: the file's stem), which prompts and captions then use; returns the word.
    pub fn load_embedding(&self, path: &Path, word: Option<&str>) -> Result<String> {
        let encoders = if self.text_encoder_2.is_some() { 2 } else { 1 };
        let file = crate::io::embedding::load(path, encoders)?;
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let word = word.map(str::to_string).unwrap_or(stem);
        self.add_embedding(&word, &file.vectors).with_context(|| format!("{}", path.display()))?;
        Ok(word)
    }

    /// Adds embedding vectors (`[n, width]` per text encoder) as `n` new tokens that `word` stands for.
    pub fn add_embedding(&self, word: &str, vectors: &[Tensor]) -> Result<()> {
        let encoders: Vec<&ClipTextModel> = std::iter::once(&self.text_encoder).chain(&self.text_encoder_2).collect();
        if vectors.len() != encoders.len() {
            bail!(
                "embedding {word:?}: {} vector sets for a model with {} text encoders",
                vectors.len(),
                encoders.len()
            );
        }
        if self.tokenizer.added_words().iter().any(|a| a.word == word.to_lowercase()) {
            bail!("an embedding named {word:?} is already loaded in this model");
        }
        for (v, te) in vectors.iter().zip(&encoders) {
            if v.dim(1)? != te.cfg.hidden {
                bail!(
                    "embedding {word:?} has {}-wide vectors; this model's text encoder takes {}",
                    v.dim(1)?,
                    te.cfg.hidden
                );
            }
        }
        let mut first = None;
        for (v, te) in vectors.iter().zip(&encoders) {
            let id = te.add_token_rows(v)?;
            // both encoders add the same rows in step, so the ids agree
            first.get_or_insert(id);
        }
        let first = first.expect("at least one encoder");
        let n = vectors[0].dim(0)? as u32;
        self.tokenizer.add_word(word, (first..first + n).collect())
    }
}
