//! Dataset configuration: sd-scripts' dataset TOML/JSON (`[general]` → `[[datasets]]` → `[[datasets.subsets]]`),
//! kohya folders (`N_concept`), and the precedence subset > dataset > general > call options > defaults.

use super::buckets::BucketConfig;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// `resolution`: one side or `[width, height]` (also sd-scripts' command-line text, `"512"` or `"512,768"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Resolution {
    Square(usize),
    Pair([usize; 2]),
}

impl<'de> Deserialize<'de> for Resolution {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Square(usize),
            Pair([usize; 2]),
            Text(String),
        }
        let bad = || serde::de::Error::custom("resolution must be a number, [width, height] or \"width,height\"");
        Ok(match Raw::deserialize(d).map_err(|_| bad())? {
            Raw::Square(s) => Resolution::Square(s),
            Raw::Pair(p) => Resolution::Pair(p),
            Raw::Text(t) => {
                let v: Vec<usize> =
                    t.split(',').map(|x| x.trim().parse()).collect::<std::result::Result<_, _>>().map_err(|_| bad())?;
                match v[..] {
                    [s] => Resolution::Square(s),
                    [w, h] => Resolution::Pair([w, h]),
                    _ => return Err(bad()),
                }
            }
        })
    }
}

impl Resolution {
    pub fn wh(self) -> (usize, usize) {
        match self {
            Resolution::Square(s) => (s, s),
            Resolution::Pair([w, h]) => (w, h),
        }
    }
}

/// Declares a config table type: the subset-level options every level accepts, plus the table's own keys.
macro_rules! config_table {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Deserialize, Default, Clone, Debug)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            pub num_repeats: Option<usize>,
            pub shuffle_caption: Option<bool>,
            pub keep_tokens: Option<usize>,
            pub keep_tokens_separator: Option<String>,
            pub secondary_separator: Option<String>,
            pub caption_separator: Option<String>,
            pub enable_wildcard: Option<bool>,
            pub caption_prefix: Option<String>,
            pub caption_suffix: Option<String>,
            pub caption_extension: Option<String>,
            pub color_aug: Option<bool>,
            pub flip_aug: Option<bool>,
            pub random_crop: Option<bool>,
            pub alpha_mask: Option<bool>,
            pub face_crop_aug_range: Option<[f64; 2]>,
            pub token_warmup_min: Option<usize>,
            pub token_warmup_step: Option<f64>,
            pub caption_dropout_rate: Option<f64>,
            pub caption_dropout_every_n_epochs: Option<usize>,
            pub caption_tag_dropout_rate: Option<f64>,
            pub cache_info: Option<bool>,
            $($(#[$fm])* pub $field: $ty,)*
        }
    };
}

config_table!(
    /// `[general]` (and the options of `dataset(...)` calls): dataset- and subset-level keys.
    General {
        batch_size: Option<usize>,
        resolution: Option<Resolution>,
        enable_bucket: Option<bool>,
        min_bucket_reso: Option<usize>,
        max_bucket_reso: Option<usize>,
        bucket_reso_steps: Option<usize>,
        bucket_no_upscale: Option<bool>,
        network_multiplier: Option<f64>,
    }
);

config_table!(
    /// One `[[datasets]]` entry.
    DatasetTable {
        batch_size: Option<usize>,
        resolution: Option<Resolution>,
        enable_bucket: Option<bool>,
        min_bucket_reso: Option<usize>,
        max_bucket_reso: Option<usize>,
        bucket_reso_steps: Option<usize>,
        bucket_no_upscale: Option<bool>,
        network_multiplier: Option<f64>,
        #[serde(default)]
        subsets: Vec<SubsetTable>,
    }
);

config_table!(
    /// One `[[datasets.subsets]]` entry.
    SubsetTable {
        image_dir: Option<String>,
        metadata_file: Option<String>,
        is_reg: Option<bool>,
        class_tokens: Option<String>,
    }
);

/// A whole dataset config file.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub general: General,
    #[serde(default)]
    pub datasets: Vec<DatasetTable>,
}

/// Caption options of a subset, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptionOptions {
    pub shuffle_caption: bool,
    pub keep_tokens: usize,
    pub keep_tokens_separator: String,
    pub secondary_separator: Option<String>,
    pub caption_separator: String,
    pub enable_wildcard: bool,
    pub caption_prefix: Option<String>,
    pub caption_suffix: Option<String>,
    pub token_warmup_min: usize,
    pub token_warmup_step: f64,
    pub caption_dropout_rate: f64,
    pub caption_dropout_every_n_epochs: usize,
    pub caption_tag_dropout_rate: f64,
}

impl Default for CaptionOptions {
    fn default() -> Self {
        Self {
            shuffle_caption: false,
            keep_tokens: 0,
            keep_tokens_separator: String::new(),
            secondary_separator: None,
            caption_separator: ",".into(),
            enable_wildcard: false,
            caption_prefix: None,
            caption_suffix: None,
            token_warmup_min: 1,
            token_warmup_step: 0.0,
            caption_dropout_rate: 0.0,
            caption_dropout_every_n_epochs: 0,
            caption_tag_dropout_rate: 0.0,
        }
    }
}

/// A subset, resolved.
#[derive(Clone, Debug)]
pub struct SubsetConfig {
    pub image_dir: Option<PathBuf>,
    pub metadata_file: Option<PathBuf>,
    pub is_reg: bool,
    pub class_tokens: Option<String>,
    pub caption_extension: String,
    pub num_repeats: usize,
    pub caption: CaptionOptions,
    pub flip_aug: bool,
    pub color_aug: bool,
    pub random_crop: bool,
    /// The image's alpha channel weights the loss (sd-scripts' `alpha_mask`).
    pub alpha_mask: bool,
}

/// A dataset, resolved.
#[derive(Clone, Debug)]
pub struct DatasetConfig {
    pub batch_size: usize,
    pub buckets: BucketConfig,
    pub network_multiplier: f64,
    pub subsets: Vec<SubsetConfig>,
}

/// The first `Some` of subset, dataset, general, call options.
macro_rules! pick {
    ($field:ident, $($src:expr),+) => {
        None$(.or($src.$field.clone()))+
    };
}

fn resolve_subset(s: &SubsetTable, d: &DatasetTable, g: &General, call: &General, base: &Path) -> Result<SubsetConfig> {
    if pick!(face_crop_aug_range, s, d, g, call).is_some() {
        bail!("face_crop_aug_range is not supported yet");
    }
    let dc = CaptionOptions::default();
    let caption = CaptionOptions {
        shuffle_caption: pick!(shuffle_caption, s, d, g, call).unwrap_or(dc.shuffle_caption),
        keep_tokens: pick!(keep_tokens, s, d, g, call).unwrap_or(dc.keep_tokens),
        keep_tokens_separator: pick!(keep_tokens_separator, s, d, g, call).unwrap_or(dc.keep_tokens_separator),
        secondary_separator: pick!(secondary_separator, s, d, g, call),
        caption_separator: pick!(caption_separator, s, d, g, call).unwrap_or(dc.caption_separator),
        enable_wildcard: pick!(enable_wildcard, s, d, g, call).unwrap_or(dc.enable_wildcard),
        caption_prefix: pick!(caption_prefix, s, d, g, call),
        caption_suffix: pick!(caption_suffix, s, d, g, call),
        token_warmup_min: pick!(token_warmup_min, s, d, g, call).unwrap_or(dc.token_warmup_min),
        token_warmup_step: pick!(token_warmup_step, s, d, g, call).unwrap_or(dc.token_warmup_step),
        caption_dropout_rate: pick!(caption_dropout_rate, s, d, g, call).unwrap_or(dc.caption_dropout_rate),
        caption_dropout_every_n_epochs: pick!(caption_dropout_every_n_epochs, s, d, g, call).unwrap_or(0),
        caption_tag_dropout_rate: pick!(caption_tag_dropout_rate, s, d, g, call).unwrap_or(0.0),
    };
    let path = |p: &Option<String>| p.as_ref().map(|p| base.join(p.replace('\\', "/")));
    let sub = SubsetConfig {
        image_dir: path(&s.image_dir),
        metadata_file: path(&s.metadata_file),
        is_reg: s.is_reg.unwrap_or(false),
        class_tokens: s.class_tokens.clone(),
        caption_extension: pick!(caption_extension, s, d, g, call).unwrap_or_else(|| ".caption".into()),
        num_repeats: pick!(num_repeats, s, d, g, call).unwrap_or(1),
        caption,
        flip_aug: pick!(flip_aug, s, d, g, call).unwrap_or(false),
        color_aug: pick!(color_aug, s, d, g, call).unwrap_or(false),
        random_crop: pick!(random_crop, s, d, g, call).unwrap_or(false),
        alpha_mask: pick!(alpha_mask, s, d, g, call).unwrap_or(false),
    };
    if sub.image_dir.is_none() && sub.metadata_file.is_none() {
        bail!("a subset needs `image_dir` (DreamBooth style) or `metadata_file` (fine-tune style)");
    }
    if sub.metadata_file.is_some() && sub.is_reg {
        bail!("`is_reg` is only for DreamBooth subsets (with `image_dir`), not fine-tune subsets with `metadata_file`");
    }
    Ok(sub)
}

fn resolve_dataset(d: &DatasetTable, g: &General, call: &General, base: &Path) -> Result<DatasetConfig> {
    let db = BucketConfig::default();
    let resolution = pick!(resolution, d, g, call)
        .map(Resolution::wh)
        .context("`resolution` is required (e.g. 512 or [768, 512])")?;
    let buckets = BucketConfig {
        resolution,
        enable_bucket: pick!(enable_bucket, d, g, call).unwrap_or(db.enable_bucket),
        min_bucket_reso: pick!(min_bucket_reso, d, g, call).unwrap_or(db.min_bucket_reso),
        max_bucket_reso: pick!(max_bucket_reso, d, g, call).unwrap_or(db.max_bucket_reso),
        bucket_reso_steps: pick!(bucket_reso_steps, d, g, call).unwrap_or(db.bucket_reso_steps),
        bucket_no_upscale: pick!(bucket_no_upscale, d, g, call).unwrap_or(db.bucket_no_upscale),
    };
    if buckets.enable_bucket {
        let (w, h) = resolution;
        if w.min(h) < buckets.min_bucket_reso || w.max(h) > buckets.max_bucket_reso {
            bail!(
                "resolution {w}x{h} must lie within min_bucket_reso {} and max_bucket_reso {}",
                buckets.min_bucket_reso,
                buckets.max_bucket_reso
            );
        }
    }
    let subsets = d
        .subsets
        .iter()
        .enumerate()
        .map(|(i, s)| resolve_subset(s, d, g, call, base).with_context(|| format!("subset {}", i + 1)))
        .collect::<Result<Vec<_>>>()?;
    if subsets.is_empty() {
        bail!("the dataset has no [[datasets.subsets]]");
    }
    let kinds: std::collections::BTreeSet<bool> = subsets.iter().map(|s| s.metadata_file.is_some()).collect();
    if kinds.len() > 1 {
        bail!("a dataset cannot mix DreamBooth subsets (image_dir) and fine-tune subsets (metadata_file)");
    }
    Ok(DatasetConfig {
        batch_size: pick!(batch_size, d, g, call).unwrap_or(1).max(1),
        buckets,
        network_multiplier: pick!(network_multiplier, d, g, call).unwrap_or(1.0),
        subsets,
    })
}

/// Reads a dataset config file (`.toml` or `.json`); unknown keys and type errors name the key and the line.
pub fn read_config_file(path: &Path, call: &General) -> Result<Vec<DatasetConfig>> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("{name}: cannot read the dataset config"))?;
    let file: ConfigFile = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{name}: line {}: {e}", e.line()))?
    } else {
        toml::from_str(&text).map_err(|e| match e.span() {
            Some(span) => {
                let line = text[..span.start].matches('\n').count() + 1;
                let src = text.lines().nth(line - 1).unwrap_or("").trim();
                anyhow::anyhow!("{name}: line {line} (`{src}`): {}", e.message())
            }
            None => anyhow::anyhow!("{name}: {}", e.message()),
        })?
    };
    if file.datasets.is_empty() {
        bail!("{name}: no [[datasets]] in the config");
    }
    let base = path.parent().unwrap_or(Path::new("."));
    file.datasets
        .iter()
        .enumerate()
        .map(|(i, d)| {
            resolve_dataset(d, &file.general, call, base).with_context(|| format!("{name}: dataset {}", i + 1))
        })
        .collect()
}

/// sd-scripts' `--in_json`: `image_dir` as one fine-tune subset whose captions and sizes come from `metadata_file`
/// (`num_repeats` from the caller's options: sd-scripts' `dataset_repeats`).
pub fn metadata_config(image_dir: &Path, metadata_file: &Path, call: &General) -> Result<DatasetConfig> {
    let subset = SubsetTable {
        image_dir: Some(image_dir.to_string_lossy().into_owned()),
        metadata_file: Some(metadata_file.to_string_lossy().into_owned()),
        ..Default::default()
    };
    let d = DatasetTable { subsets: vec![subset], ..Default::default() };
    resolve_dataset(&d, &General::default(), call, Path::new(""))
        .with_context(|| format!("{}", metadata_file.display()))
}

/// A kohya training folder: each `N_concept` sub-folder becomes a subset with N repeats and class tokens "concept";
/// `reg_dir` adds regularisation subsets the same way. The error for a folder without any shows the layout.
pub fn folder_config(train_dir: &Path, reg_dir: Option<&Path>, call: &General) -> Result<(DatasetConfig, Vec<String>)> {
    let mut warnings = Vec::new();
    let mut subsets = Vec::new();
    for (dir, is_reg) in std::iter::once((train_dir, false)).chain(reg_dir.map(|r| (r, true))) {
        if !dir.is_dir() {
            bail!("{}: no such folder", dir.display());
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot list", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        entries.sort();
        let before = subsets.len();
        for sub in entries {
            let name = sub.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let parsed =
                name.split_once('_').and_then(|(n, rest)| n.parse::<usize>().ok().map(|n| (n, rest.to_string())));
            match parsed {
                Some((repeats, concept)) => subsets.push(SubsetTable {
                    image_dir: Some(sub.to_string_lossy().into_owned()),
                    num_repeats: Some(repeats),
                    class_tokens: Some(concept),
                    is_reg: Some(is_reg),
                    ..Default::default()
                }),
                None => warnings.push(format!(
                    "{}: ignored: folder names must be `<repeats>_<concept>`, like `10_mychar woman`",
                    sub.display()
                )),
            }
        }
        if subsets.len() == before && !is_reg {
            bail!(
                "{}: no `N_concept` folders found. Expected the kohya layout:\n  {}/\n    10_mychar woman/   (10 repeats, class tokens \"mychar woman\")\n      image1.png\n      image1.txt       (caption, with caption_extension \".txt\")\n    5_style/\n      ...",
                dir.display(),
                dir.display()
            );
        }
    }
    let d = DatasetTable { subsets, ..Default::default() };
    Ok((resolve_dataset(&d, &General::default(), call, Path::new(""))?, warnings))
}
