//! The latent cache: VAE posterior samples per image, in memory and in sd-scripts' `.npz` files next to the images
//! (`latents`, `original_size`, `crop_ltrb`, `latents_flipped`, `alpha_mask`), validated before reuse and encoded in
//! VAE batches.

use super::buckets::crop_ltrb;
use super::dataset::Dataset;
use super::image::{decode, decode_with_alpha, fit_to_bucket, flip_horizontal, mask_values, Rgb};
use super::npz::{read_npz, write_npz, NpyArray, NpyData};
use crate::models::StableDiffusion;
use crate::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One image's cached latents (unscaled: multiply by the VAE scale at training time).
#[derive(Clone, Debug)]
pub struct CachedLatents {
    /// `[C, H/8, W/8]` f32.
    pub latents: Tensor,
    pub latents_flipped: Option<Tensor>,
    pub original_size: (usize, usize),
    pub crop_ltrb: (f64, f64, f64, f64),
    /// With `alpha_mask`: the alpha channel `[H, W]` in [0, 1] at the bucket's size (unflipped).
    pub alpha_mask: Option<Tensor>,
}

/// What caching did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CacheStats {
    pub encoded: usize,
    pub reused: usize,
    pub skipped: Vec<String>,
}

/// sd-scripts' cache path: the image path with `.npz`.
pub fn npz_path(image: &Path) -> PathBuf {
    image.with_extension("npz")
}

fn arr(t: &Tensor) -> Result<NpyArray> {
    Ok(NpyArray { shape: t.dims().to_vec(), data: NpyData::F32(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) })
}

/// Writes a cache file.
pub fn save_npz(path: &Path, c: &CachedLatents) -> Result<()> {
    let mut m = BTreeMap::new();
    m.insert("latents".into(), arr(&c.latents)?);
    m.insert(
        "original_size".into(),
        NpyArray { shape: vec![2], data: NpyData::I64(vec![c.original_size.0 as i64, c.original_size.1 as i64]) },
    );
    let (l, t, r, b) = c.crop_ltrb;
    m.insert("crop_ltrb".into(), NpyArray { shape: vec![4], data: NpyData::F64(vec![l, t, r, b]) });
    if let Some(f) = &c.latents_flipped {
        m.insert("latents_flipped".into(), arr(f)?);
    }
    if let Some(a) = &c.alpha_mask {
        m.insert("alpha_mask".into(), arr(a)?);
    }
    write_npz(path, &m)
}

/// Reads a cache file if it is valid for `bucket` (latent size bucket/8, flipped latents when `need_flip`, the
/// alpha mask when `need_mask`); `Err` carries why it is not.
pub fn load_npz(
    path: &Path,
    bucket: (usize, usize),
    need_flip: bool,
    need_mask: bool,
) -> std::result::Result<CachedLatents, String> {
    let m = read_npz(path).map_err(|e| format!("{e:#}"))?;
    let lat = m.get("latents").ok_or("no `latents` array (an old cache: regenerate it)")?;
    let want = (bucket.1 / 8, bucket.0 / 8);
    if lat.shape.len() != 3 || (lat.shape[1], lat.shape[2]) != want {
        return Err(format!("latents have shape {:?}, the bucket needs [C, {}, {}]", lat.shape, want.0, want.1));
    }
    let to_t = |a: &NpyArray| -> std::result::Result<Tensor, String> {
        let v: Vec<f32> = a.to_f64().into_iter().map(|x| x as f32).collect();
        Tensor::from_vec(v, a.shape.as_slice(), &Device::Cpu).map_err(|e| e.to_string())
    };
    let flipped = match (m.get("latents_flipped"), need_flip) {
        (Some(f), _) if f.shape == lat.shape => Some(to_t(f)?),
        (_, true) => return Err("no valid `latents_flipped` although flip_aug is on".into()),
        _ => None,
    };
    let alpha_mask = match (m.get("alpha_mask"), need_mask) {
        (Some(a), _) if a.shape == [bucket.1, bucket.0] => Some(to_t(a)?),
        (_, true) => return Err("no valid `alpha_mask` although alpha_mask is on".into()),
        _ => None,
    };
    let os = m.get("original_size").ok_or("no `original_size`")?.to_f64();
    let cl = m.get("crop_ltrb").ok_or("no `crop_ltrb`")?.to_f64();
    if os.len() != 2 || cl.len() != 4 {
        return Err("malformed original_size / crop_ltrb".into());
    }
    Ok(CachedLatents {
        latents: to_t(lat)?,
        latents_flipped: flipped,
        original_size: (os[0] as usize, os[1] as usize),
        crop_ltrb: (cl[0], cl[1], cl[2], cl[3]),
        alpha_mask,
    })
}

fn to_tensor(imgs: &[Rgb], device: &Device) -> Result<Tensor> {
    let (w, h) = (imgs[0].width, imgs[0].height);
    let mut v = Vec::with_capacity(imgs.len() * w * h * 3);
    for im in imgs {
        v.extend(im.data.iter().map(|&b| b as f32 / 127.5 - 1.0));
    }
    Ok(Tensor::from_vec(v, (imgs.len(), h, w, 3), &Device::Cpu)?.permute((0, 3, 1, 2))?.to_device(device)?)
}

/// Encodes a batch of same-size images to posterior samples `mean + std·noise` (`[B, C, h, w]` f32).
fn encode(model: &StableDiffusion, imgs: &[Rgb], rng: &mut Rng) -> Result<Tensor> {
    let post = model.vae_encode(&to_tensor(imgs, &model.device)?)?;
    let mean = post.mean.to_dtype(DType::F32)?;
    let std = (post.logvar.to_dtype(DType::F32)? * 0.5)?.exp()?;
    let noise = rng.randn(mean.dims(), mean.device())?;
    let z = (mean + (std * noise)?)?;
    if z.flatten_all()?.to_vec1::<f32>()?.iter().any(|x| !x.is_finite()) {
        bail!("the VAE produced NaN/inf latents (try dtype f32 or another VAE)");
    }
    Ok(z.to_device(&Device::Cpu)?)
}

/// Caches every image of `ds`: reuses valid `.npz` files when `to_disk`, encodes the rest in batches of
/// `vae_batch_size` images of the same bucket (writing `.npz` files when `to_disk`). Refuses augmentations that
/// change pixels per step (color_aug, random_crop), as sd-scripts does. Unreadable images are skipped.
pub fn cache_latents(
    ds: &Dataset,
    model: &StableDiffusion,
    vae_batch_size: usize,
    to_disk: bool,
    seed: u64,
) -> Result<(Vec<Option<CachedLatents>>, CacheStats)> {
    for (i, s) in ds.cfg.subsets.iter().enumerate() {
        if s.color_aug || s.random_crop {
            bail!(
                "subset {}: latent caching cannot be used with color_aug or random_crop (they change every step)",
                i + 1
            );
        }
    }
    let mut out: Vec<Option<CachedLatents>> = vec![None; ds.images.len()];
    let mut stats = CacheStats::default();
    let mut rng = Rng::new(seed);
    let mut by_bucket: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
    for (i, im) in ds.images.iter().enumerate() {
        by_bucket.entry(im.placement.bucket).or_default().push(i);
    }
    for (bucket, idx) in by_bucket {
        let mut todo = Vec::new();
        for i in idx {
            let im = &ds.images[i];
            let sub = &ds.cfg.subsets[im.subset];
            if to_disk {
                if let Ok(c) = load_npz(&npz_path(&im.path), bucket, sub.flip_aug, sub.alpha_mask) {
                    out[i] = Some(c);
                    stats.reused += 1;
                    continue;
                }
            }
            todo.push(i);
        }
        for chunk in todo.chunks(vae_batch_size.max(1)) {
            let mut imgs = Vec::new();
            let mut masks = Vec::new();
            let mut ok = Vec::new();
            for &i in chunk {
                let im = &ds.images[i];
                let alpha = ds.cfg.subsets[im.subset].alpha_mask;
                let decoded = match alpha {
                    true => decode_with_alpha(&im.path).map(|(img, a)| (img, Some(a))),
                    false => decode(&im.path).map(|img| (img, None)),
                };
                match decoded {
                    Ok((img, mask)) => {
                        imgs.push(fit_to_bucket(&img, im.placement.resized, bucket, false, &mut rng));
                        masks.push(match mask {
                            Some(m) => {
                                let m = fit_to_bucket(&m, im.placement.resized, bucket, false, &mut rng);
                                Some(Tensor::from_vec(mask_values(&m), (bucket.1, bucket.0), &Device::Cpu)?)
                            }
                            None => None,
                        });
                        ok.push(i);
                    }
                    Err(e) => {
                        eprintln!("warning: {e:#} (skipped)");
                        stats.skipped.push(format!("{e:#}"));
                    }
                }
            }
            if imgs.is_empty() {
                continue;
            }
            let z = encode(model, &imgs, &mut rng)?;
            let need_flip: Vec<bool> = ok.iter().map(|&i| ds.cfg.subsets[ds.images[i].subset].flip_aug).collect();
            let zf = if need_flip.iter().any(|&f| f) {
                let flipped: Vec<Rgb> = imgs.iter().map(flip_horizontal).collect();
                Some(encode(model, &flipped, &mut rng)?)
            } else {
                None
            };
            for (k, &i) in ok.iter().enumerate() {
                let im = &ds.images[i];
                let c = CachedLatents {
                    latents: z.get(k)?,
                    latents_flipped: match (&zf, need_flip[k]) {
                        (Some(f), true) => Some(f.get(k)?),
                        _ => None,
                    },
                    original_size: im.size,
                    crop_ltrb: crop_ltrb(bucket, im.size),
                    alpha_mask: masks[k].clone(),
                };
                if to_disk {
                    save_npz(&npz_path(&im.path), &c)?;
                }
                out[i] = Some(c);
                stats.encoded += 1;
            }
        }
    }
    Ok((out, stats))
}
