//! The CLIP BPE tokenizer (bundled vocabulary), with SD's 77-token BOS/EOS/padding convention.

use anyhow::{anyhow, Result};
use candle_core::{Device, Tensor};
use std::sync::OnceLock;

/// `<|startoftext|>`.
pub const BOS: u32 = 49406;
/// `<|endoftext|>`.
pub const EOS: u32 = 49407;
/// The context length of SD text encoders.
pub const MAX_LEN: usize = 77;
/// Tokens in one 77-token window (without BOS and EOS).
pub const USABLE: usize = MAX_LEN - 2;

/// sd-scripts' long-prompt windows (`get_input_ids`): `[BOS] + tokens + [EOS]` padded with `pad` to `75·chunks + 2`
/// ids, cut into `chunks` windows of 77 `[BOS] + 75 ids + [last id]`; with a padding other than EOS (SD2, SDXL's
/// second tokenizer), a window whose 76th id is a token ends with EOS, and an empty window starts `[BOS, EOS]`.
/// `tokens` must be at most `75·chunks` long. Returns `chunks · 77` ids.
pub fn chunked_ids(tokens: &[u32], pad: u32, chunks: usize) -> Vec<u32> {
    if chunks <= 1 {
        let mut ids = Vec::with_capacity(MAX_LEN);
        ids.push(BOS);
        ids.extend_from_slice(&tokens[..tokens.len().min(USABLE)]);
        ids.push(EOS);
        ids.resize(MAX_LEN, pad);
        return ids;
    }
    let max_length = USABLE * chunks + 2;
    let mut ids = vec![BOS];
    ids.extend_from_slice(&tokens[..tokens.len().min(USABLE * chunks)]);
    ids.push(EOS);
    ids.resize(max_length, pad);
    let mut out = Vec::with_capacity(chunks * MAX_LEN);
    for j in 0..chunks {
        let mut chunk = ids[j * USABLE..j * USABLE + MAX_LEN].to_vec();
        chunk[0] = ids[0];
        if pad == EOS {
            chunk[MAX_LEN - 1] = ids[max_length - 1];
        } else {
            if chunk[MAX_LEN - 1] != EOS && chunk[MAX_LEN - 1] != pad {
                chunk[MAX_LEN - 1] = EOS;
            }
            if chunk[1] == pad {
                chunk[1] = EOS;
            }
        }
        out.extend(chunk);
    }
    out
}

/// The bundled `tokenizer.json` (transformers' CLIPTokenizerFast conversion of OpenAI's BPE).
pub const TOKENIZER_JSON: &[u8] = include_bytes!("../../assets/clip-tokenizer/tokenizer.json");
/// The bundled `vocab.json`, written into diffusers folders.
pub const VOCAB_JSON: &[u8] = include_bytes!("../../assets/clip-tokenizer/vocab.json");
/// The bundled `merges.txt`, written into diffusers folders.
pub const MERGES_TXT: &[u8] = include_bytes!("../../assets/clip-tokenizer/merges.txt");

fn shared() -> Result<&'static tokenizers::Tokenizer> {
    static TOK: OnceLock<std::result::Result<tokenizers::Tokenizer, String>> = OnceLock::new();
    TOK.get_or_init(|| tokenizers::Tokenizer::from_bytes(TOKENIZER_JSON).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| anyhow!("bundled CLIP tokenizer failed to load: {e}"))
}

/// A CLIP tokenizer with the family's padding token.
#[derive(Clone, Debug)]
pub struct ClipTokenizer {
    /// Id used after EOS to fill 77 positions: 49407 (SD1) or 0 (`!`, SD2).
    pub pad_id: u32,
}

impl ClipTokenizer {
    pub fn new(pad_id: u32) -> Self {
        Self { pad_id }
    }

    /// All ids of `text` with BOS and EOS, untruncated.
    pub fn encode_full(&self, text: &str) -> Result<Vec<u32>> {
        let enc = shared()?.encode(text, true).map_err(|e| anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// 77 ids: BOS, at most 75 tokens, EOS, then padding (transformers' `max_length` + truncation).
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_full(text)?;
        if ids.len() > MAX_LEN {
            ids.truncate(MAX_LEN - 1);
            ids.push(EOS);
        }
        ids.resize(MAX_LEN, self.pad_id);
        Ok(ids)
    }

    /// `[1, 77·chunks]` i64 ids of `text` in sd-scripts' long-prompt windows (`chunked_ids`), truncated to
    /// `75·chunks` tokens as transformers truncates.
    pub fn tokenize_chunks(&self, text: &str, chunks: usize, device: &Device) -> Result<Tensor> {
        let ids = self.encode_full(text)?;
        let tokens = &ids[1..ids.len() - 1];
        let ids: Vec<i64> = chunked_ids(tokens, self.pad_id, chunks).into_iter().map(i64::from).collect();
        Ok(Tensor::from_vec(ids, (1, chunks.max(1) * MAX_LEN), device)?)
    }

    /// `[1, 77]` i64 tensor of `encode_padded`.
    pub fn tokenize(&self, text: &str, device: &Device) -> Result<Tensor> {
        let ids: Vec<i64> = self.encode_padded(text)?.into_iter().map(i64::from).collect();
        Ok(Tensor::from_vec(ids, (1, MAX_LEN), device)?)
    }
}
