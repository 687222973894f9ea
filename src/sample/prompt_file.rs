//! sd-scripts prompt files: `.txt` lines with `--n --w --h --d --l --s --ss` options and `#` comments, and the
//! `.toml` (`[prompt]` + `[[prompt.subset]]`) and `.json` (list of objects or lines) forms.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// One prompt and its per-prompt settings (absent ones take the caller's defaults).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PromptSpec {
    pub prompt: String,
    pub negative: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub seed: Option<u64>,
    pub cfg: Option<f64>,
    pub steps: Option<usize>,
    pub sampler: Option<String>,
}

/// The line options, with what their value must be.
const LINE_OPTIONS: &[(&str, &str)] = &[
    ("n", "a negative prompt"),
    ("w", "a width in pixels"),
    ("h", "a height in pixels"),
    ("d", "a seed"),
    ("l", "a CFG scale"),
    ("s", "a step count"),
    ("ss", "a sampler name"),
    ("cn", "a ControlNet image (not supported yet)"),
];

/// Parses one prompt line (`prompt --opt value ...`); `at` names the file and line for errors.
pub fn parse_line(line: &str, at: &str) -> Result<PromptSpec> {
    let mut parts = line.split(" --");
    let mut spec = PromptSpec { prompt: parts.next().unwrap_or("").trim().to_string(), ..Default::default() };
    for part in parts {
        let part = part.trim();
        let (key, value) = part.split_once(char::is_whitespace).map(|(k, v)| (k, v.trim())).unwrap_or((part, ""));
        let key_l = key.to_ascii_lowercase();
        let int = |what: &str| -> Result<u64> {
            value
                .parse::<u64>()
                .map_err(|_| anyhow::anyhow!("{at}: option --{key} expects {what} (an integer), got {value:?}"))
        };
        match key_l.as_str() {
            "n" => spec.negative = Some(value.to_string()),
            "w" => spec.width = Some(int("a width")? as usize),
            "h" => spec.height = Some(int("a height")? as usize),
            "d" => spec.seed = Some(int("a seed")?),
            "s" => spec.steps = Some((int("a step count")? as usize).clamp(1, 1000)),
            "l" => {
                spec.cfg =
                    Some(value.parse::<f64>().map_err(|_| {
                        anyhow::anyhow!("{at}: option --l expects a CFG scale (a number), got {value:?}")
                    })?)
            }
            "ss" if !value.is_empty() => spec.sampler = Some(value.to_string()),
            "cn" => bail!("{at}: option --cn (ControlNet image) is not supported yet"),
            _ => bail!(
                "{at}: unknown or empty option --{key}; prompt-line options are: {}",
                LINE_OPTIONS.iter().map(|(k, d)| format!("--{k} ({d})")).collect::<Vec<_>>().join(", ")
            ),
        }
    }
    Ok(spec)
}

/// The keys of `.toml`/`.json` prompt entries.
const DICT_KEYS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "seed",
    "sample_steps",
    "scale",
    "sample_sampler",
    "controlnet_image",
];

fn from_dict(map: &serde_json::Map<String, Value>, at: &str) -> Result<PromptSpec> {
    for k in map.keys() {
        if !DICT_KEYS.contains(&k.as_str()) {
            bail!("{at}: unknown key `{k}`; accepted keys are: {}", DICT_KEYS.join(", "));
        }
    }
    let uint = |k: &str| -> Result<Option<u64>> {
        match map.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                v.as_u64().map(Some).with_context(|| format!("{at}: `{k}` must be a non-negative integer, got {v}"))
            }
        }
    };
    let string = |k: &str| -> Result<Option<String>> {
        match map.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => bail!("{at}: `{k}` must be a string, got {v}"),
        }
    };
    if map.contains_key("controlnet_image") {
        bail!("{at}: `controlnet_image` is not supported yet");
    }
    Ok(PromptSpec {
        prompt: string("prompt")?.with_context(|| format!("{at}: entry has no `prompt`"))?,
        negative: string("negative_prompt")?,
        width: uint("width")?.map(|v| v as usize),
        height: uint("height")?.map(|v| v as usize),
        seed: uint("seed")?,
        cfg: match map.get("scale") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_f64().with_context(|| format!("{at}: `scale` must be a number, got {v}"))?),
        },
        steps: uint("sample_steps")?.map(|v| (v as usize).clamp(1, 1000)),
        sampler: string("sample_sampler")?,
    })
}

/// Reads a prompt file by extension: `.txt` (default), `.toml` or `.json`.
pub fn read_prompt_file(path: &Path) -> Result<Vec<PromptSpec>> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("{name}: cannot read the prompt file"))?;
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let specs = match ext.as_deref() {
        Some("toml") => {
            let doc: toml::Table = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{name}: invalid TOML: {e}"))?;
            let prompt = doc
                .get("prompt")
                .and_then(|v| v.as_table())
                .with_context(|| format!("{name}: expected a [prompt] table"))?;
            let mut shared = serde_json::Map::new();
            for (k, v) in prompt {
                if k != "subset" {
                    shared.insert(k.clone(), serde_json::to_value(v)?);
                }
            }
            let subsets = prompt
                .get("subset")
                .and_then(|v| v.as_array())
                .with_context(|| format!("{name}: expected [[prompt.subset]] entries"))?;
            subsets
                .iter()
                .enumerate()
                .map(|(i, sub)| {
                    let at = format!("{name}: [[prompt.subset]] #{}", i + 1);
                    let sub = sub.as_table().with_context(|| format!("{at}: expected a table"))?;
                    let mut merged = shared.clone();
                    for (k, v) in sub {
                        if merged.insert(k.clone(), serde_json::to_value(v)?).is_some() {
                            bail!("{at}: key `{k}` is set in both [prompt] and the subset");
                        }
                    }
                    from_dict(&merged, &at)
                })
                .collect::<Result<Vec<_>>>()?
        }
        Some("json") => {
            let v: Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{name}: invalid JSON: {e}"))?;
            let arr = v.as_array().with_context(|| format!("{name}: expected a JSON list of prompts"))?;
            arr.iter()
                .enumerate()
                .map(|(i, e)| {
                    let at = format!("{name}: entry {}", i + 1);
                    match e {
                        Value::String(s) => parse_line(s, &at),
                        Value::Object(m) => from_dict(m, &at),
                        other => bail!("{at}: expected an object or a string, got {other}"),
                    }
                })
                .collect::<Result<Vec<_>>>()?
        }
        _ => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .map(|(i, l)| parse_line(l.trim(), &format!("{name}:{}", i + 1)))
            .collect::<Result<Vec<_>>>()?,
    };
    if specs.is_empty() {
        bail!("{name}: no prompts found (blank lines and # comments are skipped)");
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_options_parse() {
        let s = parse_line(
            "a cat, (masterpiece:1.2) --n blurry, bad --w 768 --h 512 --d 42 --l 5.5 --s 20 --ss euler_a",
            "f:1",
        )
        .unwrap();
        assert_eq!(s.prompt, "a cat, (masterpiece:1.2)");
        assert_eq!(s.negative.as_deref(), Some("blurry, bad"));
        assert_eq!((s.width, s.height, s.seed, s.steps), (Some(768), Some(512), Some(42), Some(20)));
        assert_eq!(s.cfg, Some(5.5));
        assert_eq!(s.sampler.as_deref(), Some("euler_a"));
        assert_eq!(parse_line("x --s 5000", "f:1").unwrap().steps, Some(1000));
    }

    #[test]
    fn malformed_options_name_file_and_line() {
        let e = parse_line("a cat --w wide", "prompts.txt:3").unwrap_err().to_string();
        assert!(e.starts_with("prompts.txt:3: option --w"), "{e}");
        let e = parse_line("a cat --q 1", "prompts.txt:4").unwrap_err().to_string();
        assert!(e.contains("prompts.txt:4") && e.contains("--ss"), "{e}");
        let e = parse_line("a cat --l high", "p:9").unwrap_err().to_string();
        assert!(e.contains("p:9") && e.contains("--l"), "{e}");
    }
}
