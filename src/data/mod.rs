//! Training data: kohya folders and dataset TOML, aspect-ratio buckets, captions, augmentation, latent cache and
//! background loading.

pub mod buckets;
pub mod cache;
pub mod captions;
pub mod config;
pub mod dataset;
pub mod image;
pub mod loader;
pub mod metadata;
pub mod npz;
pub mod synthetic;

use anyhow::{bail, Result};
use config::{folder_config, read_config_file, General};
use dataset::{Dataset, Problem, Sample};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How to open a dataset.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Options given by the caller (`dataset(path, opts)`, CLI flags): below the config file's values.
    pub call: General,
    /// A regularisation folder of `N_class` sub-folders (folder datasets only).
    pub reg_dir: Option<PathBuf>,
    /// sd-scripts' `in_json`: the folder is one fine-tune subset with this metadata file (captions, sizes).
    pub in_json: Option<PathBuf>,
    /// Fail on the first problem instead of skipping.
    pub strict: bool,
}

/// All datasets of a config (or the one dataset of a folder).
pub struct DatasetGroup {
    pub source: PathBuf,
    pub datasets: Vec<Dataset>,
    /// Notes from reading the folder (ignored sub-folders).
    pub notes: Vec<String>,
    /// The options it was opened with (recorded in training recipes).
    pub options: serde_json::Value,
}

/// Opens a kohya folder (`N_concept` sub-folders) or a dataset config (`.toml` / `.json`).
pub fn open(path: &Path, opts: &OpenOptions) -> Result<DatasetGroup> {
    if !path.exists() {
        bail!(
            "{}: no such file or folder; expected a training folder with `N_concept` sub-folders or a dataset .toml",
            path.display()
        );
    }
    let mut call = opts.call.clone();
    if call.resolution.is_none() {
        call.resolution = Some(config::Resolution::Square(512));
    }
    let (configs, notes) = match &opts.in_json {
        _ if path.is_file() => (read_config_file(path, &opts.call)?, Vec::new()),
        Some(json) => {
            if opts.reg_dir.is_some() {
                bail!(
                    "reg_data_dir: regularisation images are for DreamBooth folders, not an in_json fine-tune dataset"
                );
            }
            (vec![config::metadata_config(path, json, &call)?], Vec::new())
        }
        None => {
            let (c, notes) = folder_config(path, opts.reg_dir.as_deref(), &call)?;
            (vec![c], notes)
        }
    };
    let datasets = configs.into_iter().map(|c| Dataset::build(c, opts.strict)).collect::<Result<Vec<_>>>()?;
    let group = DatasetGroup { source: path.to_path_buf(), datasets, notes, options: serde_json::Value::Null };
    if group.is_empty() {
        let problems: Vec<String> = group.problems().iter().map(|p| p.to_string()).collect();
        bail!(
            "{}: no data found: no usable images{}",
            path.display(),
            if problems.is_empty() { String::new() } else { format!(" ({})", problems.join("; ")) }
        );
    }
    Ok(group)
}

impl DatasetGroup {
    /// Samples per epoch, repeats included.
    pub fn len(&self) -> usize {
        self.datasets.iter().map(Dataset::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples per epoch per bucket over all datasets, sorted by (width, height).
    pub fn buckets(&self) -> BTreeMap<(usize, usize), usize> {
        let mut m = BTreeMap::new();
        for d in &self.datasets {
            for (b, n) in d.buckets() {
                *m.entry(b).or_insert(0) += n;
            }
        }
        m
    }

    /// Batches per epoch (each dataset with its own batch size).
    pub fn batches_per_epoch(&self) -> usize {
        self.datasets.iter().map(Dataset::batches_per_epoch).sum()
    }

    /// Every problem found.
    pub fn problems(&self) -> Vec<&Problem> {
        self.datasets.iter().flat_map(|d| &d.problems).collect()
    }

    /// The i-th sample of an epoch in file order (datasets, then images, each repeated), with epoch-0 processing.
    pub fn get(&self, i: usize, seed: u64) -> Result<Sample> {
        let mut k = i;
        for d in &self.datasets {
            for (j, im) in d.images.iter().enumerate() {
                if k < im.num_repeats {
                    let mut rng = crate::rng::Rng::new(seed ^ i as u64);
                    return d.sample(j, captions::Progress::default(), &mut rng);
                }
                k -= im.num_repeats;
            }
        }
        bail!("sample index {i} is out of range: the dataset has {} samples per epoch", self.len())
    }

    /// A human-readable summary: subsets, repeats, buckets, steps per epoch, problems.
    pub fn report(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        for (di, d) in self.datasets.iter().enumerate() {
            let b = &d.cfg.buckets;
            let _ = writeln!(
                s,
                "dataset {}: resolution {}x{}, batch size {}, {}",
                di + 1,
                b.resolution.0,
                b.resolution.1,
                d.cfg.batch_size,
                if b.enable_bucket {
                    format!(
                        "buckets {}..{} step {}{}",
                        b.min_bucket_reso,
                        b.max_bucket_reso,
                        b.bucket_reso_steps,
                        if b.bucket_no_upscale { ", no upscale" } else { "" }
                    )
                } else {
                    "no bucketing".into()
                }
            );
            for (si, sub) in d.cfg.subsets.iter().enumerate() {
                let imgs: Vec<_> = d.images.iter().filter(|im| im.subset == si).collect();
                let samples: usize = imgs.iter().map(|im| im.num_repeats).sum();
                let name = sub
                    .image_dir
                    .as_ref()
                    .or(sub.metadata_file.as_ref())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "  subset {}{}: {name}: {} images, {} repeats, {} samples per epoch, captions {}{}",
                    si + 1,
                    if sub.is_reg { " (regularisation)" } else { "" },
                    imgs.len(),
                    sub.num_repeats,
                    samples,
                    sub.caption_extension,
                    sub.class_tokens.as_ref().map(|c| format!(", class tokens {c:?}")).unwrap_or_default()
                );
            }
            let _ = writeln!(s, "  buckets (width x height: samples, batches):");
            for ((w, h), n) in d.buckets() {
                let _ = writeln!(s, "    {w}x{h}: {n}, {}", n.div_ceil(d.cfg.batch_size));
            }
            let _ =
                writeln!(s, "  samples per epoch: {}, batches (steps) per epoch: {}", d.len(), d.batches_per_epoch());
        }
        if self.datasets.len() > 1 {
            let _ =
                writeln!(s, "total: {} samples per epoch, {} steps per epoch", self.len(), self.batches_per_epoch());
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        let problems = self.problems();
        if problems.is_empty() {
            let _ = writeln!(s, "problems: none");
        } else {
            let _ = writeln!(s, "problems ({}):", problems.len());
            for p in problems {
                let _ = writeln!(s, "  {p}");
            }
        }
        s
    }
}
