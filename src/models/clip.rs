//! The CLIP text encoder in transformers' `CLIPTextModel` layout (SD1: CLIP-L, SD2: OpenCLIP-H as converted).

use crate::nn::checkpoint::Checkpointed;
use crate::nn::{attention, quick_gelu, LayerNorm, Linear, Weights};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

/// The MLP activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// `x·sigmoid(1.702x)` (OpenAI CLIP, SD1).
    QuickGelu,
    /// exact (erf) GELU (OpenCLIP, SD2).
    Gelu,
}

impl Activation {
    /// The transformers `hidden_act` name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::QuickGelu => "quick_gelu",
            Activation::Gelu => "gelu",
        }
    }
}

/// Hyper-parameters of the text encoder; all but `heads`, `activation` and `eps` come from tensor shapes.
#[derive(Clone, Debug)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub max_positions: usize,
    pub activation: Activation,
    pub eps: f64,
    /// Width of the pooled-output projection (`CLIPTextModelWithProjection`, SDXL's second encoder).
    pub projection: Option<usize>,
}

impl ClipConfig {
    /// Reads sizes from the weights (`text_model.*` keys); `heads` and `activation` are given.
    pub fn infer(w: &Weights, heads: Option<usize>, activation: Activation) -> Result<Self> {
        let tm = w.pp("text_model");
        let tok = tm.get("embeddings.token_embedding.weight")?;
        let pos = tm.get("embeddings.position_embedding.weight")?;
        let (vocab_size, hidden) = tok.dims2()?;
        let layers = tm.pp("encoder").count("layers");
        if layers == 0 {
            bail!("text encoder has no `text_model.encoder.layers.*` tensors");
        }
        let intermediate = tm.get("encoder.layers.0.mlp.fc1.weight")?.dims()[0];
        let heads = heads.unwrap_or_else(|| default_heads(hidden));
        let projection = w.get_opt("text_projection.weight").map(|t| t.dims()[0]);
        Ok(Self {
            vocab_size,
            hidden,
            intermediate,
            layers,
            heads,
            max_positions: pos.dims()[0],
            activation,
            eps: 1e-5,
            projection,
        })
    }
}

/// Heads when no config says: 64-wide heads as in CLIP-L and OpenCLIP-H; 8-wide for test models too narrow for that.
pub fn default_heads(hidden: usize) -> usize {
    if hidden % 64 == 0 {
        hidden / 64
    } else {
        (hidden / 8).max(1)
    }
}

struct EncoderLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    activation: Activation,
}

impl EncoderLayer {
    fn new(w: &Weights, cfg: &ClipConfig) -> Result<Self> {
        let a = w.pp("self_attn");
        Ok(Self {
            ln1: LayerNorm::new(&w.pp("layer_norm1"), cfg.eps)?,
            q: Linear::new(&a.pp("q_proj"))?,
            k: Linear::new(&a.pp("k_proj"))?,
            v: Linear::new(&a.pp("v_proj"))?,
            out: Linear::new(&a.pp("out_proj"))?,
            ln2: LayerNorm::new(&w.pp("layer_norm2"), cfg.eps)?,
            fc1: Linear::new(&w.pp("mlp.fc1"))?,
            fc2: Linear::new(&w.pp("mlp.fc2"))?,
            heads: cfg.heads,
            activation: cfg.activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.ln1.forward(x)?;
        let a = attention(&self.q.forward(&h)?, &self.k.forward(&h)?, &self.v.forward(&h)?, self.heads, true)?;
        let x = (x + self.out.forward(&a)?)?;
        let h = self.fc1.forward(&self.ln2.forward(&x)?)?;
        let h = match self.activation {
            Activation::QuickGelu => quick_gelu(&h)?,
            Activation::Gelu => h.gelu_erf()?,
        };
        Ok((x + self.fc2.forward(&h)?)?)
    }
}

/// What the text encoder returns.
pub struct ClipOutput {
    /// The context fed to the UNet (`[B, S, hidden]`).
    pub context: Tensor,
    /// The final-layer-normed state at the first end-of-text token (`[B, hidden]`), projected when the model has
    /// a projection (`[B, projection]`), when asked for.
    pub pooled: Option<Tensor>,
}

/// CLIP text transformer (token + position embeddings, causal encoder layers, final LayerNorm).
pub struct ClipTextModel {
    pub cfg: ClipConfig,
    /// The vocabulary's rows (a variable once `track_token_table` made it one).
    token_embedding: RwLock<Tensor>,
    position_embedding: Tensor,
    layers: Vec<Checkpointed<EncoderLayer>>,
    final_ln: LayerNorm,
    projection: Option<Linear>,
    /// Gradient checkpointing of every encoder layer while training.
    checkpointing: AtomicBool,
    /// Rows of added tokens (textual-inversion embeddings), ids `vocab_size..`, in the order added: `[n, hidden]`
    /// each, kept as given (a trained embedding's variable updates in place) and cast at lookup.
    extra: RwLock<Vec<Tensor>>,
}

impl ClipTextModel {
    pub fn new(w: &Weights, cfg: ClipConfig) -> Result<Self> {
        let tm = w.pp("text_model");
        let emb = tm.pp("embeddings");
        let token_embedding = emb.get_shape("token_embedding.weight", &[cfg.vocab_size, cfg.hidden])?;
        let position_embedding = emb.get_shape("position_embedding.weight", &[cfg.max_positions, cfg.hidden])?;
        let enc = tm.pp("encoder.layers");
        let layers = (0..cfg.layers)
            .map(|i| Checkpointed::new(&enc.pp(i), |w| EncoderLayer::new(w, &cfg)))
            .collect::<Result<Vec<_>>>()?;
        let final_ln = LayerNorm::new(&tm.pp("final_layer_norm"), cfg.eps)?;
        let projection = cfg.projection.map(|_| Linear::new(&w.pp("text_projection"))).transpose()?;
        let checkpointing = AtomicBool::new(false);
        let extra = RwLock::new(Vec::new());
        let token_embedding = RwLock::new(token_embedding);
        Ok(Self { cfg, token_embedding, position_embedding, layers, final_ln, projection, checkpointing, extra })
    }

    /// Appends token rows `[n, hidden]` (moved to the embeddings' device; a variable stays one); returns the first
    /// new id.
    pub fn add_token_rows(&self, rows: &Tensor) -> Result<u32> {
        let (n, d) = rows.dims2()?;
        if d != self.cfg.hidden || n == 0 {
            bail!("embedding vectors have shape [{n}, {d}]; this text encoder takes [n, {}]", self.cfg.hidden);
        }
        let rows = rows.to_device(self.table().device())?;
        let mut extra = self.extra.write().expect("embedding lock");
        let first = self.cfg.vocab_size + extra.iter().map(|e| e.dim(0)).sum::<candle_core::Result<usize>>()?;
        extra.push(rows);
        Ok(first as u32)
    }

    /// The vocabulary's rows.
    fn table(&self) -> Tensor {
        self.token_embedding.read().expect("embedding lock").clone()
    }

    /// Makes the vocabulary's rows a variable (same values) so that a backward gives their gradient: textual
    /// inversion clips its step by the whole table's gradient norm, as sd-scripts does. Returns the variable.
    pub fn track_token_table(&self) -> Result<Var> {
        let mut t = self.token_embedding.write().expect("embedding lock");
        let var = Var::from_tensor(&t)?;
        *t = var.as_tensor().clone();
        Ok(var)
    }

    /// Makes the vocabulary's rows plain (frozen) again.
    pub fn untrack_token_table(&self) {
        let mut t = self.token_embedding.write().expect("embedding lock");
        *t = t.detach();
    }

    /// The vocabulary's token vectors of `ids` (`[n]`, host), `[n, hidden]`.
    pub fn token_vectors(&self, ids: &Tensor) -> Result<Tensor> {
        let table = self.table();
        Ok(table.index_select(&ids.to_device(table.device())?, 0)?)
    }

    /// The added token rows, if any, `[n, hidden]` in the embeddings' dtype.
    pub fn token_rows(&self) -> Result<Option<Tensor>> {
        let extra = self.extra.read().expect("embedding lock");
        if extra.is_empty() {
            return Ok(None);
        }
        let dtype = self.table().dtype();
        let parts = extra.iter().map(|e| e.to_dtype(dtype)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&parts, 0)?))
    }

    /// The token embeddings of `ids` (host or device) `[B·S, hidden]`: the vocabulary's rows, and the added rows for
    /// ids past it (differentiable in both).
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let table = self.table();
        let dev = table.device();
        let flat = ids.flatten_all()?;
        let vocab = self.cfg.vocab_size as u32;
        let extra = self.token_rows()?;
        let host: Vec<u32> = match &extra {
            Some(_) => flat.to_vec1()?,
            None => Vec::new(),
        };
        let Some(extra) = extra.filter(|_| host.iter().any(|&i| i >= vocab)) else {
            return Ok(table.index_select(&flat.to_device(dev)?, 0)?);
        };
        let n_extra = extra.dim(0)? as u32;
        if let Some(bad) = host.iter().find(|&&i| i >= vocab + n_extra) {
            bail!("token id {bad} is past the {} added tokens of this text encoder", n_extra);
        }
        let base: Vec<u32> = host.iter().map(|&i| i.min(vocab - 1)).collect();
        let added: Vec<u32> = host.iter().map(|&i| i.saturating_sub(vocab).min(n_extra - 1)).collect();
        let mask: Vec<f32> = host.iter().map(|&i| if i >= vocab { 1.0 } else { 0.0 }).collect();
        let len = host.len();
        let mask = Tensor::from_vec(mask, (len, 1), dev)?.to_dtype(table.dtype())?;
        let base = table.index_select(&Tensor::from_vec(base, len, dev)?, 0)?;
        let added = extra.index_select(&Tensor::from_vec(added, len, dev)?, 0)?;
        Ok((base.broadcast_mul(&(1.0 - &mask)?)? + added.broadcast_mul(&mask)?)?)
    }

    /// Turns gradient checkpointing of the encoder layers on or off (see `UNet::set_gradient_checkpointing`).
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.checkpointing.store(on, Ordering::Relaxed);
    }

    /// Encodes `ids` (`[B, S]`, integer): the hidden state `clip_skip` layers from the end (1 = last),
    /// through the final LayerNorm when `final_ln`; `pooled` adds the pooled output of the last layer.
    pub fn encode(&self, ids: &Tensor, clip_skip: usize, final_ln: bool, pooled: bool) -> Result<ClipOutput> {
        let (b, s) = ids.dims2()?;
        if s > self.cfg.max_positions {
            bail!("token ids have length {s}, the text encoder takes at most {}", self.cfg.max_positions);
        }
        if clip_skip == 0 || clip_skip > self.cfg.layers {
            bail!("clip_skip must be between 1 and {} (the number of layers), got {clip_skip}", self.cfg.layers);
        }
        // the pooled position is read from the ids as given (on the host, no device read); the lookup runs where
        // the embeddings are
        let ids = ids.to_dtype(DType::U32)?;
        let tok = self.embed(&ids)?.reshape((b, s, self.cfg.hidden))?;
        let pos = self.position_embedding.narrow(0, 0, s)?.unsqueeze(0)?;
        let mut x = tok.broadcast_add(&pos)?;
        let run = if pooled { self.layers.len() } else { self.layers.len() + 1 - clip_skip };
        let mut chosen = None;
        let on = self.checkpointing.load(Ordering::Relaxed);
        for (i, layer) in self.layers.iter().enumerate().take(run) {
            x = layer.run(on, "text encoder layer (recomputed)", &x, None, |l, x, _| l.forward(x))?;
            if i + clip_skip == self.layers.len() {
                chosen = Some(x.clone());
            }
        }
        let chosen = chosen.expect("clip_skip checked above");
        let context = if final_ln { self.final_ln.forward(&chosen)? } else { chosen };
        let pooled = if pooled {
            let last = self.final_ln.forward(&x)?;
            // transformers (eos_token_id 2 in SD configs) takes the first position of the largest id: the first EOS;
            // with added tokens (ids past EOS) the first EOS still, as sd-scripts, A1111 and ComfyUI pool
            let rows = ids
                .to_vec2::<u32>()?
                .iter()
                .enumerate()
                .map(|(bi, row)| {
                    let max = row.iter().copied().max().unwrap_or(0);
                    let p = row
                        .iter()
                        .position(|&v| v == super::tokenizer::EOS)
                        .or_else(|| row.iter().position(|&v| v == max));
                    last.get(bi)?.get(p.unwrap_or(0))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let pooled = Tensor::stack(&rows, 0)?;
            Some(match &self.projection {
                Some(p) => p.forward(&pooled)?,
                None => pooled,
            })
        } else {
            None
        };
        Ok(ClipOutput { context, pooled })
    }
}
