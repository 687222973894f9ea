//! Bringing configurations from kohya_ss and sd-scripts: GUI JSON and sd-scripts TOML / command-line options
//! become sd-scripts options, then a training recipe (JSON for `train`, or a `.rhai` script to edit and share).
//! What does not carry over is reported, never dropped silently.

pub mod kohya;
pub mod rhai;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// How a key fared.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome {
    /// Taken over, with a remark.
    Note,
    /// Left out: it has no effect here or does not apply.
    Ignored,
    /// Asks for something sdtune does not do yet: the config cannot run as given.
    Unsupported,
}

/// What an import did with the keys it did not simply take over.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub entries: Vec<(String, Outcome, String)>,
}

impl Report {
    pub fn note(&mut self, key: &str, why: &str) {
        self.entries.push((key.into(), Outcome::Note, why.into()));
    }

    pub fn ignored(&mut self, key: &str, why: &str) {
        self.entries.push((key.into(), Outcome::Ignored, why.into()));
    }

    pub fn unsupported(&mut self, key: &str, why: &str) {
        self.entries.push((key.into(), Outcome::Unsupported, why.into()));
    }

    /// `(key, why)` of the entries with outcome `want`, in order.
    fn of(&self, want: Outcome) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().filter(move |(_, o, _)| *o == want).map(|(k, _, why)| (k.as_str(), why.as_str()))
    }

    /// One line per entry, unsupported first.
    pub fn lines(&self) -> Vec<String> {
        [(Outcome::Unsupported, "not supported"), (Outcome::Ignored, "not carried over"), (Outcome::Note, "note")]
            .into_iter()
            .flat_map(|(want, label)| self.of(want).map(move |(k, why)| format!("{label}: {k}: {why}")))
            .collect()
    }

    /// An error listing the unsupported keys, if any.
    pub fn check_runnable(&self, source: &Path) -> Result<()> {
        let bad: Vec<String> = self.of(Outcome::Unsupported).map(|(k, why)| format!("  {k}: {why}")).collect();
        if !bad.is_empty() {
            bail!("{}: cannot run as given:\n{}", source.display(), bad.join("\n"));
        }
        Ok(())
    }
}

/// `--name value [value...]` / `--flag` (sd-scripts' command line) → options, numbers and booleans typed.
pub fn parse_flags(args: &[String]) -> Result<Map<String, Value>> {
    let typed = |v: &str| -> Value {
        if let Ok(i) = v.parse::<i64>() {
            Value::from(i)
        } else if let Ok(f) = v.parse::<f64>() {
            Value::from(f)
        } else if v == "true" || v == "True" {
            Value::Bool(true)
        } else if v == "false" || v == "False" {
            Value::Bool(false)
        } else {
            Value::from(v.trim_matches('"'))
        }
    };
    let mut out = Map::new();
    let mut i = 0;
    while i < args.len() {
        let name = args[i]
            .strip_prefix("--")
            .with_context(|| format!("expected an option like --learning_rate, got {:?}", args[i]))?;
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n.replace('-', "_"), Some(v.to_string())),
            None => (name.replace('-', "_"), None),
        };
        let mut vals: Vec<String> = inline.into_iter().collect();
        i += 1;
        while i < args.len() && !args[i].starts_with("--") {
            vals.push(args[i].clone());
            i += 1;
        }
        let v = match (name.as_str(), vals.len()) {
            ("optimizer_args" | "network_args" | "lr_scheduler_args", _) => {
                Value::Array(vals.iter().map(|v| Value::from(v.as_str())).collect())
            }
            (_, 0) => Value::Bool(true),
            (_, 1) => typed(&vals[0]),
            _ => Value::Array(vals.iter().map(|v| typed(v)).collect()),
        };
        out.insert(name, v);
    }
    Ok(out)
}

/// An sd-scripts `--config_file` TOML, flattened (its sections are only grouping).
pub fn read_sd_scripts_toml(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let doc: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: invalid TOML: {}", path.display(), e.message()))?;
    let mut out = Map::new();
    for (k, v) in doc {
        match v {
            toml::Value::Table(t) => {
                for (k2, v2) in t {
                    out.insert(k2, serde_json::to_value(v2)?);
                }
            }
            other => {
                out.insert(k, serde_json::to_value(other)?);
            }
        }
    }
    Ok(out)
}

/// A kohya_ss GUI config file (JSON object).
pub fn read_kohya_json(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    match serde_json::from_str::<Value>(&text).with_context(|| format!("{}: invalid JSON", path.display()))? {
        Value::Object(m) => Ok(m),
        _ => bail!("{}: a kohya_ss config is a JSON object of the GUI's fields", path.display()),
    }
}

/// A config translated to sd-scripts options, with its report and (kohya_ss) the sample prompts' text.
pub struct Imported {
    pub options: Map<String, Value>,
    pub report: Report,
    pub prompts: Option<String>,
}

impl Imported {
    /// Writes the config's sample prompts (if it has any) to `file` and points `sample_prompts` at it. An existing
    /// file with the same text is reused; with other text it is replaced only when `force` is given.
    pub fn write_prompts(&mut self, file: &Path, force: bool) -> Result<()> {
        let Some(text) = &self.prompts else { return Ok(()) };
        if file.exists() && !force && std::fs::read_to_string(file).ok().as_deref() != Some(text.as_str()) {
            bail!("{}: already exists with other prompts; remove it, or choose another output", file.display());
        }
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the folder", dir.display()))?;
        }
        crate::io::tensors::write_atomic(file, |f| Ok(std::io::Write::write_all(f, text.as_bytes())?))?;
        self.options.insert("sample_prompts".into(), file.display().to_string().into());
        Ok(())
    }
}

/// The options that name files or folders.
const PATH_KEYS: &[&str] =
    &["pretrained_model_name_or_path", "train_data_dir", "reg_data_dir", "dataset_config", "network_weights", "vae"];

/// Notes the paths that do not exist here (they are kept as given: the recipe takes replacements as arguments).
fn check_paths(options: &Map<String, Value>, report: &mut Report) {
    for k in PATH_KEYS {
        if let Some(p) = options.get(*k).and_then(Value::as_str) {
            if !Path::new(p).exists() {
                let why =
                    if *k == "pretrained_model_name_or_path" && !p.contains(['.', '\\']) && p.matches('/').count() == 1
                    {
                        format!("{p} is a Hugging Face model id, not a local file: pass a checkpoint path")
                    } else {
                        format!("{p} does not exist here (kept as given)")
                    };
                report.note(k, &why);
            }
        }
    }
}

/// Reads a kohya_ss GUI JSON.
pub fn kohya(path: &Path) -> Result<Imported> {
    let gui = read_kohya_json(path)?;
    let (options, mut report, prompts) = kohya::to_sd_scripts(&gui).with_context(|| format!("{}", path.display()))?;
    check_paths(&options, &mut report);
    Ok(Imported { options, report, prompts })
}

/// Reads an sd-scripts TOML: a `--config_file` (options), or a dataset config (`[[datasets]]`), which becomes a
/// recipe training on it.
pub fn sd_scripts(path: &Path) -> Result<Imported> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let doc: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: invalid TOML: {}", path.display(), e.message()))?;
    let mut report = Report::default();
    let options = if doc.contains_key("datasets") {
        report.note(
            "datasets",
            "a dataset config: the recipe trains on it (dataset_config); give the model as argument 1",
        );
        match crate::data::config::read_config_file(path, &Default::default()) {
            Err(e) => report.note("datasets", &format!("it does not open here: {e:#}")),
            Ok(configs) => {
                for sub in configs.iter().flat_map(|c| &c.subsets) {
                    for p in [&sub.image_dir, &sub.metadata_file].into_iter().flatten() {
                        if !p.exists() {
                            report.note("datasets", &format!("{} does not exist here (kept as given)", p.display()));
                        }
                    }
                }
            }
        }
        let mut m = Map::new();
        m.insert("dataset_config".into(), Value::from(path.display().to_string()));
        m
    } else {
        read_sd_scripts_toml(path)?
    };
    check_paths(&options, &mut report);
    Ok(Imported { options, report, prompts: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_written_once_and_never_replace_other_text_unasked() {
        let dir = std::env::temp_dir().join(format!("sdtune-prompts-{}", std::process::id()));
        let file = dir.join("sub/sample_prompts.txt");
        let mut imp = Imported { options: Map::new(), report: Report::default(), prompts: Some("a cat".into()) };
        imp.write_prompts(&file, false).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "a cat");
        assert_eq!(imp.options["sample_prompts"], file.display().to_string());
        imp.write_prompts(&file, false).unwrap(); // the same text: reused
        std::fs::write(&file, "the user's own prompts").unwrap();
        let err = imp.write_prompts(&file, false).unwrap_err().to_string();
        assert!(err.contains("sample_prompts.txt") && err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "the user's own prompts");
        imp.write_prompts(&file, true).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "a cat");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
