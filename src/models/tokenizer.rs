//! The CLIP BPE tokenizer (bundled vocabulary), with SD's 77-token BOS/EOS/padding convention.

use anyhow::{anyhow, bail, Result};
use candle_core::{Device, Tensor};
use std::sync::{Arc, OnceLock, RwLock};

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

/// A word standing for added token ids (a textual-inversion embedding's vectors).
#[derive(Clone, Debug)]
pub struct AddedWord {
    /// Lowercase, as the tokenizer reads text.
    pub word: String,
    pub ids: Vec<u32>,
}

/// A CLIP tokenizer with the family's padding token and the words of the embeddings loaded into its model.
#[derive(Clone, Debug)]
pub struct ClipTokenizer {
    /// Id used after EOS to fill 77 positions: 49407 (SD1) or 0 (`!`, SD2).
    pub pad_id: u32,
    added: Arc<RwLock<Vec<AddedWord>>>,
}

/// Whether `c` can continue a word (an added word matches only as a whole word).
fn word_char(c: Option<char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric() || c == '_')
}

impl ClipTokenizer {
    pub fn new(pad_id: u32) -> Self {
        Self { pad_id, added: Arc::default() }
    }

    /// Makes `word` (matched case-insensitively as a whole word) stand for `ids`; an existing word or one that
    /// is not a single token-like word is an error.
    pub fn add_word(&self, word: &str, ids: Vec<u32>) -> Result<()> {
        let w = word.to_lowercase();
        if w.is_empty() || !w.chars().all(|c| word_char(Some(c)) || "-<>".contains(c)) {
            bail!("embedding name {word:?}: use letters, digits, `_`, `-`, `<`, `>` (it is written in prompts)");
        }
        let mut added = self.added.write().expect("tokenizer lock");
        if added.iter().any(|a| a.word == w) {
            bail!("an embedding named {word:?} is already loaded in this model");
        }
        added.push(AddedWord { word: w, ids });
        Ok(())
    }

    /// The words added so far.
    pub fn added_words(&self) -> Vec<AddedWord> {
        self.added.read().expect("tokenizer lock").clone()
    }

    /// All ids of `text` with BOS and EOS, untruncated; added words become their ids (the text around them is
    /// tokenized on its own, as transformers splits on added tokens).
    pub fn encode_full(&self, text: &str) -> Result<Vec<u32>> {
        let added = self.added.read().expect("tokenizer lock");
        let bpe = |t: &str, special: bool| -> Result<Vec<u32>> {
            let enc = shared()?.encode(t, special).map_err(|e| anyhow!("tokenizing {t:?}: {e}"))?;
            Ok(enc.get_ids().to_vec())
        };
        if added.is_empty() {
            return bpe(text, true);
        }
        let lower = text.to_lowercase();
        let mut ids = vec![BOS];
        let mut start = 0;
        let mut at = 0;
        while at < lower.len() {
            let before = lower[..at].chars().next_back();
            let found = (!word_char(before))
                .then(|| {
                    added
                        .iter()
                        .filter(|a| {
                            lower[at..].starts_with(&a.word) && !word_char(lower[at + a.word.len()..].chars().next())
                        })
                        .max_by_key(|a| a.word.len())
                })
                .flatten();
            match found {
                Some(a) => {
                    ids.extend(bpe(&lower[start..at], false)?);
                    ids.extend(&a.ids);
                    at += a.word.len();
                    start = at;
                }
                None => at += lower[at..].chars().next().map_or(1, char::len_utf8),
            }
        }
        ids.extend(bpe(&lower[start..], false)?);
        ids.push(EOS);
        Ok(ids)
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
