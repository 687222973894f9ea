//! Batches: the epoch's plan over the datasets, a batch's latents (cached, or encoded from its images), captions,
//! ids, loss weights and SDXL size ids, and its text conditioning.

use super::{seed_for, Trainer};
use crate::data::buckets::size_ids;
use crate::data::captions::{process_caption, Progress};
use crate::models::clip::ClipOutput;
use crate::models::StableDiffusion;
use crate::rng::Rng;
use crate::train::textual_inversion::templated_caption;
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

/// One batch as the step consumes it.
#[derive(Clone)]
pub struct Batch {
    /// Latents already multiplied by the VAE scale, `[B, C, h, w]`.
    pub latents: Tensor,
    /// Token ids `[B, 77]`.
    pub input_ids: Tensor,
    /// Per-sample loss weights (prior_loss_weight for regularisation images) `[B]`.
    pub weights: Tensor,
    /// Fixed noise / timesteps (step_with); drawn when absent.
    pub noise: Option<Tensor>,
    pub timesteps: Option<Tensor>,
    /// SDXL's size conditioning `[B, 6]` (original h, w, crop top, left, target h, w); when absent, the latents'
    /// image size with no crop.
    pub time_ids: Option<Tensor>,
    /// The processed captions (what `weighted_captions` encodes); absent for batches given as ids.
    pub captions: Option<Vec<String>>,
    /// With `alpha_mask`: the images' alpha `[B, 1, H, W]` in [0, 1] (1 for images of subsets without it), which
    /// weights the loss.
    pub masks: Option<Tensor>,
}

/// A `[H, W]` mask mirrored left–right.
fn flip_width(m: &Tensor) -> Result<Tensor> {
    let w = m.dim(1)?;
    let rev: Vec<u32> = (0..w as u32).rev().collect();
    Ok(m.index_select(&Tensor::new(rev.as_slice(), m.device())?, 1)?)
}

/// SDXL's conditioning vector for a batch: the pooled text embedding with the batch's size ids (or, without them,
/// the latents' image size and no crop); `None` for SD 1.x/2.x.
pub(super) fn conditioning_vector(
    model: &StableDiffusion,
    cond: &ClipOutput,
    b: &Batch,
    latents: &Tensor,
) -> Result<Option<Tensor>> {
    let Some(pooled) = cond.pooled.as_ref().filter(|_| model.is_xl()) else { return Ok(None) };
    let ids = match &b.time_ids {
        Some(t) => t.clone(),
        None => {
            let (n, _, h, w) = latents.dims4()?;
            let (h, w) = ((h * 8) as f32, (w * 8) as f32);
            Tensor::new(&[[h, w, 0.0, 0.0, h, w]], &candle_core::Device::Cpu)?.repeat((n, 1))?
        }
    };
    model.sdxl_y(pooled, &ids)
}

impl Trainer {
    /// The batch's text conditioning: weighted captions (A1111 syntax, sd-scripts' lpw), long-caption windows, or
    /// the plain 77-token encoding.
    pub(super) fn text_conditioning(&self, b: &Batch) -> Result<ClipOutput> {
        if self.cfg.weighted_captions {
            let captions = b.captions.as_ref().context("weighted_captions needs the batch's captions, not only ids")?;
            let chunks = self.cfg.max_token_length.map_or(1, |n| n / 75);
            return crate::sample::prompt::encode_prompts(&self.model, captions, chunks, None);
        }
        if b.input_ids.dim(1)? > crate::models::tokenizer::MAX_LEN {
            return self.model.encode_windows(&b.input_ids);
        }
        self.model.encode_ids(&b.input_ids, None, true, false)
    }

    /// Builds the batch for dataset `di`, images `idx`: cached latents or VAE-encoded images, captions → ids.
    pub fn make_batch(&self, di: usize, idx: &[usize]) -> Result<Batch> {
        let data = self.data.as_ref().context("no dataset")?;
        let ds = &data.datasets[di];
        let mut rng = seed_for(self.cfg.seed, self.step * 7919 + self.batch_in_epoch, 3);
        let progress = Progress { epoch: self.epoch + 1, step: self.step, max_train_steps: self.total_steps };
        let mut lats = Vec::new();
        let mut captions = Vec::new();
        let mut weights = Vec::new();
        let mut sizes = Vec::new();
        let mut masks: Vec<Option<Tensor>> = Vec::new();
        match &self.caches[di] {
            Some(cache) => {
                for &i in idx {
                    let im = &ds.images[i];
                    let c = cache[i]
                        .as_ref()
                        .with_context(|| format!("{}: no cached latents (unreadable image)", im.path.display()))?;
                    let sub = &ds.cfg.subsets[im.subset];
                    let flip = sub.flip_aug && rng.uniform() < 0.5;
                    sizes.extend(size_ids(c.original_size, c.crop_ltrb, im.placement.bucket, flip));
                    lats.push(if flip {
                        c.latents_flipped.clone().unwrap_or(c.latents.clone())
                    } else {
                        c.latents.clone()
                    });
                    masks.push(match &c.alpha_mask {
                        Some(m) if flip => Some(flip_width(m)?),
                        m => m.clone(),
                    });
                    let caption = process_caption(&im.caption, &sub.caption, progress, &mut rng);
                    captions.push(templated_caption(&self.cfg, caption, &mut rng));
                    weights.push(if im.is_reg { self.cfg.prior_loss_weight } else { 1.0 } as f32);
                }
            }
            None => {
                let mut imgs = Vec::new();
                for &i in idx {
                    let s = ds.sample(i, progress, &mut rng)?;
                    sizes.extend(size_ids(s.original_size, s.crop_ltrb, s.bucket, s.flipped));
                    imgs.push(s.image.data.iter().map(|&b| b as f32 / 127.5 - 1.0).collect::<Vec<f32>>());
                    let (w, h) = s.bucket;
                    masks.push(
                        s.alpha_mask.map(|m| Tensor::from_vec(m, (h, w), &candle_core::Device::Cpu)).transpose()?,
                    );
                    captions.push(templated_caption(&self.cfg, s.caption, &mut rng));
                    weights.push(if s.is_reg { self.cfg.prior_loss_weight } else { 1.0 } as f32);
                }
                let (w, h) = ds.images[idx[0]].placement.bucket;
                let px = Tensor::from_vec(imgs.concat(), (idx.len(), h, w, 3), &candle_core::Device::Cpu)?
                    .permute((0, 3, 1, 2))?;
                let post = self.model.vae_encode(&px)?;
                let std = (post.logvar.to_dtype(DType::F32)? * 0.5)?.exp()?;
                let z = (post.mean.to_dtype(DType::F32)? + std.mul(&rng.randn(std.dims(), std.device())?)?)?;
                for k in 0..idx.len() {
                    lats.push(z.get(k)?);
                }
            }
        }
        let latents = (Tensor::stack(&lats, 0)? * self.model.vae_scale)?;
        let ids: Vec<Tensor> = captions
            .iter()
            .map(|c| match self.cfg.max_token_length {
                Some(n) => self.model.tokenizer.tokenize_chunks(c, n / 75, &candle_core::Device::Cpu),
                None => self.model.tokenizer.tokenize(c, &candle_core::Device::Cpu),
            })
            .collect::<Result<_>>()?;
        let masks = if masks.iter().any(|m| m.is_some()) {
            let (w, h) = ds.images[idx[0]].placement.bucket;
            let ones = Tensor::ones((h, w), DType::F32, &candle_core::Device::Cpu)?;
            let all: Vec<Tensor> = masks.into_iter().map(|m| m.unwrap_or_else(|| ones.clone())).collect();
            Some(Tensor::stack(&all, 0)?.unsqueeze(1)?)
        } else {
            None
        };
        Ok(Batch {
            masks,
            latents,
            input_ids: Tensor::cat(&ids, 0)?,
            weights: Tensor::new(weights.as_slice(), &candle_core::Device::Cpu)?,
            noise: None,
            timesteps: None,
            time_ids: Some(Tensor::from_vec(sizes, (idx.len(), 6), &candle_core::Device::Cpu)?),
            captions: Some(captions),
        })
    }

    /// The epoch's batches over all datasets as (dataset, images), shuffled together (seeded).
    pub fn epoch_plan(&self, epoch: usize) -> Vec<(usize, Vec<usize>)> {
        let Some(data) = &self.data else { return Vec::new() };
        let mut plan: Vec<(usize, Vec<usize>)> = data
            .datasets
            .iter()
            .enumerate()
            .flat_map(|(di, d)| d.epoch_batches(epoch, self.cfg.seed).into_iter().map(move |b| (di, b)))
            .collect();
        Rng::new(self.cfg.seed ^ 0xE90C ^ epoch as u64).shuffle(&mut plan);
        plan
    }
}
