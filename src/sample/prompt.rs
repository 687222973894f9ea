//! A1111 prompt weighting as sd-scripts reads it (`parse_prompt_attention`), and long-prompt text conditioning in
//! 75-token chunks with weighted, mean-renormalised embeddings (sd-scripts' `lpw_stable_diffusion`).

use crate::models::clip::ClipOutput;
use crate::models::tokenizer::{chunked_ids, MAX_LEN as CHUNK, USABLE};
use crate::models::StableDiffusion;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// Text pieces with their attention weights, adjacent equal weights merged.
pub type Weighted = Vec<(String, f64)>;

/// One lexical token of the weighting syntax.
enum Lex<'a> {
    Escaped(&'a str),
    OpenRound,
    OpenSquare,
    Weight(&'a str, &'a str),
    CloseRound,
    CloseSquare,
    Text(&'a str),
}

/// Splits like A1111's `re_attention`:
/// `\( \) \[ \] \\ \ ( [ :(number)) ) ] text :`.
fn lex(s: &str) -> Vec<Lex<'_>> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let rest = &s[i..];
        match b[i] {
            b'\\' => {
                let n = if matches!(b.get(i + 1), Some(b'(' | b')' | b'[' | b']' | b'\\')) { 2 } else { 1 };
                out.push(Lex::Escaped(&s[i..i + n]));
                i += n;
            }
            b'(' => {
                out.push(Lex::OpenRound);
                i += 1;
            }
            b'[' => {
                out.push(Lex::OpenSquare);
                i += 1;
            }
            b')' => {
                out.push(Lex::CloseRound);
                i += 1;
            }
            b']' => {
                out.push(Lex::CloseSquare);
                i += 1;
            }
            b':' => {
                // `:([+-]?[.\d]+)\)`
                let num_start = i + 1;
                let mut j = num_start;
                if matches!(b.get(j), Some(b'+' | b'-')) {
                    j += 1;
                }
                let digits = j;
                while matches!(b.get(j), Some(b'.' | b'0'..=b'9')) {
                    j += 1;
                }
                if j > digits && b.get(j) == Some(&b')') {
                    out.push(Lex::Weight(&s[num_start..j], &s[i..=j]));
                    i = j + 1;
                } else {
                    out.push(Lex::Text(&rest[..1]));
                    i += 1;
                }
            }
            _ => {
                let end = rest.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(rest.len());
                out.push(Lex::Text(&rest[..end]));
                i += end;
            }
        }
    }
    out
}

/// Parses `( )`, `[ ]`, `(text:1.3)`, nesting, escapes and unbalanced brackets into weighted pieces.
pub fn parse_prompt_attention(text: &str) -> Weighted {
    const ROUND: f64 = 1.1;
    const SQUARE: f64 = 1.0 / 1.1;
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64)>, from: usize, m: f64| {
        for r in res.iter_mut().skip(from) {
            r.1 *= m;
        }
    };
    for tok in lex(text) {
        match tok {
            Lex::Escaped(t) => res.push((t[1..].to_string(), 1.0)),
            Lex::OpenRound => round.push(res.len()),
            Lex::OpenSquare => square.push(res.len()),
            Lex::Weight(num, whole) => match (num.parse::<f64>(), round.is_empty()) {
                (Ok(w), false) => {
                    let from = round.pop().expect("checked non-empty");
                    multiply(&mut res, from, w);
                }
                _ => res.push((whole.to_string(), 1.0)),
            },
            Lex::CloseRound if !round.is_empty() => {
                let from = round.pop().expect("checked non-empty");
                multiply(&mut res, from, ROUND);
            }
            Lex::CloseSquare if !square.is_empty() => {
                let from = square.pop().expect("checked non-empty");
                multiply(&mut res, from, SQUARE);
            }
            Lex::CloseRound => res.push((")".into(), 1.0)),
            Lex::CloseSquare => res.push(("]".into(), 1.0)),
            Lex::Text(t) => res.push((t.to_string(), 1.0)),
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in square {
        multiply(&mut res, from, SQUARE);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    let mut merged: Vec<(String, f64)> = Vec::new();
    for (t, w) in res {
        match merged.last_mut() {
            Some(last) if last.1 == w => last.0.push_str(&t),
            _ => merged.push((t, w)),
        }
    }
    merged
}

/// Tokens (no BOS/EOS) and per-token weights of a prompt, each piece tokenized on its own, at most `max` tokens.
pub fn tokens_with_weights(model: &StableDiffusion, prompt: &str, max: usize) -> Result<(Vec<u32>, Vec<f64>, bool)> {
    let mut tokens = Vec::new();
    let mut weights = Vec::new();
    for (piece, w) in parse_prompt_attention(prompt) {
        let ids = model.tokenizer.encode_full(&piece)?;
        let inner = &ids[1..ids.len() - 1];
        tokens.extend_from_slice(inner);
        weights.extend(std::iter::repeat_n(w, inner.len()));
    }
    let truncated = tokens.len() > max;
    tokens.truncate(max);
    weights.truncate(max);
    Ok((tokens, weights, truncated))
}

/// Conditioning for a prompt and its negative, as sd-scripts' sampling computes it: both padded to the same number
/// of 75-token chunks (at most `max_chunks`), each chunk encoded with BOS/EOS, weights applied and the embedding
/// re-normalised to its unweighted mean. Returns `(cond, uncond)`, each `[1, 77·chunks, D]`.
pub fn encode_prompt_pair(
    model: &StableDiffusion,
    prompt: &str,
    negative: &str,
    max_chunks: usize,
    clip_skip: Option<usize>,
) -> Result<(ClipOutput, ClipOutput, bool)> {
    let limit = USABLE * max_chunks;
    let (pt, pw, p_trunc) = tokens_with_weights(model, prompt, limit)?;
    let (nt, nw, n_trunc) = tokens_with_weights(model, negative, limit)?;
    let longest = pt.len().max(nt.len());
    let chunks = (longest.saturating_sub(1) / USABLE + 1).clamp(1, max_chunks.max(1));
    let cond = encode_weighted(model, &pt, &pw, chunks, clip_skip)?;
    let uncond = encode_weighted(model, &nt, &nw, chunks, clip_skip)?;
    Ok((cond, uncond, p_trunc || n_trunc))
}

/// Conditioning for several prompts (A1111 weighting, 75-token chunks up to `max_chunks`, as sampling does),
/// padded to a common number of chunks: `[N, 77·chunks, D]`, and SDXL's pooled embeddings `[N, P]`.
pub fn encode_prompts(
    model: &StableDiffusion,
    prompts: &[String],
    max_chunks: usize,
    clip_skip: Option<usize>,
) -> Result<ClipOutput> {
    let limit = USABLE * max_chunks;
    let toks = prompts.iter().map(|p| tokens_with_weights(model, p, limit)).collect::<Result<Vec<_>>>()?;
    let longest = toks.iter().map(|(t, _, _)| t.len()).max().unwrap_or(0);
    let chunks = (longest.saturating_sub(1) / USABLE + 1).clamp(1, max_chunks.max(1));
    let parts =
        toks.iter().map(|(t, w, _)| encode_weighted(model, t, w, chunks, clip_skip)).collect::<Result<Vec<_>>>()?;
    let contexts: Vec<&Tensor> = parts.iter().map(|p| &p.context).collect();
    let pooled: Option<Vec<&Tensor>> = parts.iter().map(|p| p.pooled.as_ref()).collect();
    Ok(ClipOutput { context: Tensor::cat(&contexts, 0)?, pooled: pooled.map(|p| Tensor::cat(&p, 0)).transpose()? })
}

/// One prompt's context over `chunks` 77-token chunks (sd-scripts' long-prompt layout), with SDXL's pooled
/// embedding taken from the first chunk as sd-scripts does.
fn encode_weighted(
    model: &StableDiffusion,
    tokens: &[u32],
    weights: &[f64],
    chunks: usize,
    clip_skip: Option<usize>,
) -> Result<ClipOutput> {
    let ids = chunked_ids(tokens, model.tokenizer.pad_id, chunks);
    // weights per chunk: 1 for BOS, the tokens' weights, 1 for EOS; ones to the end
    let mut w = Vec::with_capacity(chunks * CHUNK);
    if weights.is_empty() {
        w.resize(chunks * CHUNK, 1.0);
    } else {
        for j in 0..chunks {
            w.push(1.0);
            let (a, b) = ((j * USABLE).min(weights.len()), ((j + 1) * USABLE).min(weights.len()));
            w.extend_from_slice(&weights[a..b]);
            w.push(1.0);
        }
        w.resize(chunks * CHUNK, 1.0);
    }
    let mut parts = Vec::with_capacity(chunks);
    let mut pooled = None;
    for chunk in ids.chunks(CHUNK) {
        // host ids: the encoder reads positions from them without a device sync
        let ids_t = Tensor::from_vec(chunk.iter().map(|&x| x as i64).collect::<Vec<_>>(), (1, CHUNK), &Device::Cpu)?;
        let out = model.encode_ids(&ids_t, clip_skip, true, false)?;
        parts.push(out.context);
        pooled = pooled.or(out.pooled);
    }
    let emb = Tensor::cat(&parts, 1)?;
    if w.iter().all(|&x| x == 1.0) {
        return Ok(ClipOutput { context: emb, pooled });
    }
    // on the device and differentiable, as sd-scripts' lpw computes it: emb·w · mean(emb) / mean(emb·w)
    let emb32 = emb.to_dtype(DType::F32)?;
    let wt = Tensor::from_vec(w.iter().map(|&x| x as f32).collect::<Vec<_>>(), (1, chunks * CHUNK, 1), &model.device)?;
    let weighted = emb32.broadcast_mul(&wt)?;
    let ratio = (emb32.mean_all()? / weighted.mean_all()?)?;
    Ok(ClipOutput { context: weighted.broadcast_mul(&ratio)?.to_dtype(emb.dtype())?, pooled })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<(String, f64)> {
        parse_prompt_attention(s)
    }

    fn close(a: &[(String, f64)], b: &[(&str, f64)]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for ((ta, wa), (tb, wb)) in a.iter().zip(b) {
            assert_eq!(ta, tb);
            assert!((wa - wb).abs() < 1e-12, "{ta}: {wa} vs {wb}");
        }
    }

    /// The examples in A1111's `parse_prompt_attention` docstring.
    #[test]
    fn a1111_docstring_cases() {
        close(&p("normal text"), &[("normal text", 1.0)]);
        close(&p("an (important) word"), &[("an ", 1.0), ("important", 1.1), (" word", 1.0)]);
        close(&p("(unbalanced"), &[("unbalanced", 1.1)]);
        close(&p("\\(literal\\]"), &[("(literal]", 1.0)]);
        close(&p("(unnecessary)(parens)"), &[("unnecessaryparens", 1.1)]);
        close(
            &p("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            &[
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        );
    }

    #[test]
    fn nesting_squares_escapes_and_stray_brackets() {
        close(&p("[[faded]]"), &[("faded", 1.0 / 1.1 / 1.1)]);
        close(&p("((a) b)"), &[("a", 1.1 * 1.1), (" b", 1.1)]);
        close(&p("x) y] z"), &[("x) y] z", 1.0)]);
        close(&p("(a:0.5) (b:1.5)"), &[("a", 0.5), (" ", 1.0), ("b", 1.5)]);
        close(&p("time: 12:30"), &[("time: 12:30", 1.0)]);
        close(&p("a \\\\ b"), &[("a \\ b", 1.0)]);
        close(&p("[unbalanced"), &[("unbalanced", 1.0 / 1.1)]);
        close(&p(""), &[("", 1.0)]);
        close(&p("(a:1.2.3)"), &[("a:1.2.3)", 1.1)]);
        close(&p("BREAK here"), &[("BREAK here", 1.0)]);
    }
}
