//! Datasets: scanning subsets (DreamBooth folders, fine-tune metadata), captions, regularisation balancing, bucket
//! assignment, per-epoch batches, and the problems found on the way.

use super::buckets::{crop_ltrb, BucketManager, Placement};
use super::captions::{process_caption, Progress};
use super::config::{DatasetConfig, SubsetConfig};
use super::image::{
    color_aug, decode, decode_with_alpha, dimensions, fit_to_bucket, flip_horizontal, is_image, mask_values, Rgb,
};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Something wrong with the data; `skipped` when the image was left out.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub path: PathBuf,
    pub message: String,
    pub skipped: bool,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}{}", self.path.display(), self.message, if self.skipped { " (skipped)" } else { "" })
    }
}

/// One training image.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub path: PathBuf,
    /// The caption as read (before per-sample processing).
    pub caption: String,
    pub size: (usize, usize),
    pub placement: Placement,
    pub subset: usize,
    pub is_reg: bool,
    pub num_repeats: usize,
}

/// One sample as the trainer sees it.
#[derive(Clone, Debug)]
pub struct Sample {
    pub image: Rgb,
    pub caption: String,
    pub bucket: (usize, usize),
    pub original_size: (usize, usize),
    pub crop_ltrb: (f64, f64, f64, f64),
    pub flipped: bool,
    pub is_reg: bool,
    pub path: PathBuf,
    /// With `alpha_mask`: the alpha channel in [0, 1] at the bucket's size, trimmed and flipped as the image.
    pub alpha_mask: Option<Vec<f32>>,
}

/// One dataset of a config (its own resolution, batch size and buckets).
pub struct Dataset {
    pub cfg: DatasetConfig,
    pub images: Vec<ImageInfo>,
    pub problems: Vec<Problem>,
}

fn read_caption(path: &Path, wildcard: bool) -> std::result::Result<Option<String>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("caption file {} cannot be read: {e}", path.display())),
    };
    let text = String::from_utf8(bytes).map_err(|_| format!("caption file {} is not UTF-8 text", path.display()))?;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    if lines.iter().all(|l| l.is_empty()) {
        return Ok(Some(String::new()));
    }
    Ok(Some(if wildcard {
        lines.into_iter().filter(|l| !l.is_empty()).collect::<Vec<_>>().join("\n")
    } else {
        lines[0].to_string()
    }))
}

fn caption_path(image: &Path, ext: &str) -> PathBuf {
    let stem = image.with_extension("");
    PathBuf::from(format!("{}{}", stem.display(), ext))
}

impl Dataset {
    /// Scans every subset; bad images are skipped with a problem each (or fail the build when `strict`).
    pub fn build(cfg: DatasetConfig, strict: bool) -> Result<Self> {
        let buckets = BucketManager::new(&cfg.buckets)?;
        let mut ds = Dataset { cfg, images: Vec::new(), problems: Vec::new() };
        let subsets = ds.cfg.subsets.clone();
        for (si, sub) in subsets.iter().enumerate() {
            let found = match &sub.metadata_file {
                Some(meta) => ds.scan_finetune(si, sub, meta)?,
                None => ds.scan_dreambooth(si, sub)?,
            };
            for (path, caption) in found {
                match dimensions(&path) {
                    Ok(size) => ds.place(path, caption, size, si, sub, &buckets),
                    Err(e) => {
                        ds.problems.push(Problem { path: path.clone(), message: format!("{e:#}"), skipped: true })
                    }
                }
            }
        }
        ds.balance_regularization();
        if strict {
            if let Some(p) = ds.problems.first() {
                bail!("{p} (strict mode: fix or remove it)");
            }
        }
        Ok(ds)
    }

    fn scan_dreambooth(&mut self, si: usize, sub: &SubsetConfig) -> Result<Vec<(PathBuf, String)>> {
        let dir = sub.image_dir.as_ref().expect("DreamBooth subsets have image_dir");
        if !dir.is_dir() {
            bail!("{}: image folder does not exist (subset {})", dir.display(), si + 1);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot list", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_image(p))
            .collect();
        files.sort();
        if files.is_empty() {
            self.problems.push(Problem {
                path: dir.clone(),
                message: "no images (png, jpg, jpeg, webp, bmp) in this folder".into(),
                skipped: false,
            });
        }
        let mut out = Vec::new();
        let mut missing = 0;
        for f in files {
            let cap = caption_path(&f, &sub.caption_extension);
            let fallback = sub.class_tokens.clone().unwrap_or_default();
            match read_caption(&cap, sub.caption.enable_wildcard) {
                Ok(Some(c)) if c.is_empty() => {
                    self.problems.push(Problem {
                        path: cap.clone(),
                        message: format!("empty caption file; using the class tokens {fallback:?}"),
                        skipped: false,
                    });
                    out.push((f, fallback));
                }
                Ok(Some(c)) => out.push((f, c)),
                Ok(None) => {
                    missing += 1;
                    out.push((f, fallback));
                }
                Err(msg) => self.problems.push(Problem { path: f.clone(), message: msg, skipped: true }),
            }
        }
        if missing > 0 && sub.caption_extension == ".caption" {
            let txt = std::fs::read_dir(dir)
                .map(|r| r.filter_map(|e| e.ok()).any(|e| e.path().extension().is_some_and(|x| x == "txt")))
                .unwrap_or(false);
            if txt {
                self.problems.push(Problem {
                    path: dir.clone(),
                    message: format!(
                        "{missing} images have no .caption file but .txt captions exist: set caption_extension = \".txt\" (sd-scripts' default is .caption)"
                    ),
                    skipped: false,
                });
            }
        }
        Ok(out)
    }

    fn scan_finetune(&mut self, _si: usize, sub: &SubsetConfig, meta: &Path) -> Result<Vec<(PathBuf, String)>> {
        let text = std::fs::read_to_string(meta)
            .with_context(|| format!("{}: cannot read the metadata file", meta.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", meta.display()))?;
        let obj = v
            .as_object()
            .with_context(|| format!("{}: expected an object of image_key → {{caption, tags}}", meta.display()))?;
        let mut out = Vec::new();
        for (key, entry) in obj {
            let direct = PathBuf::from(key);
            let path = if direct.is_file() {
                Some(direct)
            } else {
                sub.image_dir.as_ref().and_then(|d| {
                    super::image::IMAGE_EXTENSIONS.iter().map(|e| d.join(format!("{key}.{e}"))).find(|p| p.is_file())
                })
            };
            let Some(path) = path else {
                self.problems.push(Problem {
                    path: PathBuf::from(key),
                    message: format!("listed in {} but no image file found", meta.display()),
                    skipped: true,
                });
                continue;
            };
            let caption = entry.get("caption").and_then(|c| c.as_str()).unwrap_or("");
            let tags = entry.get("tags").and_then(|c| c.as_str()).unwrap_or("");
            let full = match (caption.is_empty(), tags.is_empty()) {
                (_, true) => caption.to_string(),
                (true, false) => tags.to_string(),
                (false, false) => format!("{caption}{}{tags}", sub.caption.caption_separator),
            };
            out.push((path, full));
        }
        Ok(out)
    }

    fn place(
        &mut self,
        path: PathBuf,
        caption: String,
        size: (usize, usize),
        si: usize,
        sub: &SubsetConfig,
        buckets: &BucketManager,
    ) {
        let p = buckets.select(size.0, size.1);
        let b = &self.cfg.buckets;
        if p.bucket.0 == 0 || p.bucket.1 == 0 {
            self.problems.push(Problem {
                path,
                message: format!(
                    "image {}x{} is smaller than the smallest bucket side ({}) with bucket_no_upscale",
                    size.0, size.1, b.bucket_reso_steps
                ),
                skipped: true,
            });
            return;
        }
        if b.enable_bucket && size.0.min(size.1) < b.min_bucket_reso {
            self.problems.push(Problem {
                path: path.clone(),
                message: format!(
                    "image {}x{} is smaller than min_bucket_reso {}; it is upscaled to {}x{}",
                    size.0, size.1, b.min_bucket_reso, p.resized.0, p.resized.1
                ),
                skipped: false,
            });
        }
        self.images.push(ImageInfo {
            path,
            caption,
            size,
            placement: p,
            subset: si,
            is_reg: sub.is_reg,
            num_repeats: sub.num_repeats,
        });
    }

    /// sd-scripts: regularisation images' repeats grow round-robin until they cover the training samples.
    fn balance_regularization(&mut self) {
        let train: usize = self.images.iter().filter(|i| !i.is_reg).map(|i| i.num_repeats).sum();
        let reg: Vec<usize> = (0..self.images.len()).filter(|&i| self.images[i].is_reg).collect();
        if reg.is_empty() || train == 0 {
            return;
        }
        let mut n: usize = 0;
        let mut first = true;
        let mut kept = Vec::new();
        'outer: while n < train {
            for &i in &reg {
                if first {
                    kept.push(i);
                    n += self.images[i].num_repeats;
                } else {
                    self.images[i].num_repeats += 1;
                    n += 1;
                }
                if n >= train {
                    break 'outer;
                }
            }
            first = false;
        }
        // reg images never registered (enough repeats before reaching them) are dropped, as in sd-scripts
        let keep: std::collections::BTreeSet<usize> = kept.into_iter().collect();
        let mut idx = 0;
        self.images.retain(|im| {
            let k = !im.is_reg || keep.contains(&idx);
            idx += 1;
            k
        });
    }

    /// Samples per epoch, repeats included.
    pub fn len(&self) -> usize {
        self.images.iter().map(|i| i.num_repeats).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples per epoch in each bucket, sorted by (width, height).
    pub fn buckets(&self) -> BTreeMap<(usize, usize), usize> {
        let mut m = BTreeMap::new();
        for i in &self.images {
            *m.entry(i.placement.bucket).or_insert(0) += i.num_repeats;
        }
        m
    }

    /// Batches per epoch: each bucket is batched on its own (the last batch of a bucket may be short).
    pub fn batches_per_epoch(&self) -> usize {
        self.buckets().values().map(|&n| n.div_ceil(self.cfg.batch_size)).sum()
    }

    /// The epoch's batches as image indices: each bucket's repeated images shuffled and cut into batches.
    pub fn epoch_batches(&self, epoch: usize, seed: u64) -> Vec<Vec<usize>> {
        let mut rng = Rng::new(seed.wrapping_add(epoch as u64).wrapping_mul(0x9E37_79B9));
        let mut per_bucket: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
        for (i, im) in self.images.iter().enumerate() {
            per_bucket.entry(im.placement.bucket).or_default().extend(std::iter::repeat_n(i, im.num_repeats));
        }
        let mut batches = Vec::new();
        for (_, mut items) in per_bucket {
            rng.shuffle(&mut items);
            batches.extend(items.chunks(self.cfg.batch_size).map(|c| c.to_vec()));
        }
        rng.shuffle(&mut batches);
        batches
    }

    /// Loads image `i` at its bucket size with this sample's augmentation and caption.
    pub fn sample(&self, i: usize, progress: Progress, rng: &mut Rng) -> Result<Sample> {
        let info = &self.images[i];
        let sub = &self.cfg.subsets[info.subset];
        let (img, alpha) = match sub.alpha_mask {
            true => decode_with_alpha(&info.path).map(|(img, a)| (img, Some(a)))?,
            false => (decode(&info.path)?, None),
        };
        // the mask takes the picture's crop: the same draws of the stream
        let mut alpha = alpha.map(|a| {
            fit_to_bucket(&a, info.placement.resized, info.placement.bucket, sub.random_crop, &mut rng.clone())
        });
        let mut img = fit_to_bucket(&img, info.placement.resized, info.placement.bucket, sub.random_crop, rng);
        if sub.color_aug {
            img = color_aug(&img, rng);
        }
        let flipped = sub.flip_aug && rng.uniform() < 0.5;
        if flipped {
            img = flip_horizontal(&img);
            alpha = alpha.map(|a| flip_horizontal(&a));
        }
        let mut crop = crop_ltrb(info.placement.bucket, info.size);
        if flipped {
            let w = info.placement.bucket.0 as f64;
            crop = (w - crop.2, crop.1, w - crop.0, crop.3);
        }
        Ok(Sample {
            image: img,
            caption: process_caption(&info.caption, &sub.caption, progress, rng),
            bucket: info.placement.bucket,
            original_size: info.size,
            crop_ltrb: crop,
            flipped,
            is_reg: info.is_reg,
            path: info.path.clone(),
            alpha_mask: alpha.as_ref().map(mask_values),
        })
    }
}
