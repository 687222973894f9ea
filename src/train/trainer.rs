//! The training loop (sd-scripts' `train_network.py`, and `train_db.py` for full fine-tuning): data → noise →
//! timesteps → UNet → target → loss weights → backward → clip → optimizer → LR schedule, with saving, resumable
//! state and metrics. What it trains (a network or the model) is `target::Target`.

use super::config::TrainConfig;
use super::loss::{self, element_loss, mean_per_sample, HuberSchedule, LossType};
use super::lr::LrSchedule;
use super::noise::{apply_multires_noise, apply_noise_offset, noisy_latents, zero_terminal_snr};
use super::optim::{self, Optimizer};
use super::scaler::LossScaler;
use super::target::{FineTune, Target};
use crate::data::buckets::size_ids;
use crate::data::cache::{cache_latents, CachedLatents};
use crate::data::captions::{process_caption, Progress};
use crate::data::DatasetGroup;
use crate::models::clip::ClipOutput;
use crate::models::StableDiffusion;
use crate::networks::Network;
use crate::rng::Rng;
use crate::schedule::NoiseSchedule;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// SDXL's conditioning vector for a batch: the pooled text embedding with the batch's size ids (or, without them,
/// the latents' image size and no crop); `None` for SD 1.x/2.x.
fn conditioning_vector(
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
}

/// What a running training reports to its caller.
pub enum Event<'a> {
    /// An optimizer step was made, with this loss.
    Step(f64),
    /// Sample images were written (the prompt file's images, in order).
    Sampled(&'a [PathBuf]),
}

/// A running (or resumable) training.
pub struct Trainer {
    /// The model the run trains on (for full fine-tuning, the trainable copy).
    pub model: Arc<StableDiffusion>,
    /// What the run trains: a network, or the model itself.
    pub target: Target,
    pub data: Option<Arc<DatasetGroup>>,
    pub cfg: TrainConfig,
    optimizer: Optimizer,
    /// sd-scripts' `ss_optimizer` text.
    optimizer_description: String,
    lr: LrSchedule,
    schedule: NoiseSchedule,
    /// SNR of the original schedule (sd-scripts computes it before zero_terminal_snr).
    snr: Vec<f64>,
    v_pred: bool,
    pub step: usize,
    pub epoch: usize,
    pub batch_in_epoch: usize,
    pub losses: Vec<f64>,
    pub total_steps: usize,
    pub epochs: usize,
    caches: Vec<Option<Vec<Option<CachedLatents>>>>,
    /// Set to stop gracefully (Ctrl-C): the loop saves a state and returns.
    pub stop: Arc<AtomicBool>,
    /// Everything needed to rebuild this run (model path, dataset path, options), kept in saved states.
    pub recipe: serde_json::Value,
    accum: Option<GradStore>,
    /// fp16 mixed precision's dynamic loss scale.
    pub scaler: Option<LossScaler>,
    accum_count: usize,
    /// The loss of the last batch (an optimizer step records the loss of its window's last batch).
    last_loss: f64,
    /// Set while a failure would leave weights that must not be saved as a state (inside the optimizer step, or
    /// after a non-finite loss).
    no_state_on_error: bool,
    te_stopped: bool,
    /// Whether the last `run` ended on a stop request.
    pub stopped: bool,
    events: Option<crate::io::tensorboard::EventWriter>,
    epoch_losses: Vec<f64>,
}

fn seed_for(seed: u64, step: usize, salt: u64) -> Rng {
    Rng::new(seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt)
}

impl Trainer {
    /// A run that fine-tunes the model itself (no network): the trainer trains a trainable copy of `model`.
    pub fn fine_tune(
        model: &StableDiffusion,
        data: Option<Arc<DatasetGroup>>,
        cfg: TrainConfig,
        recipe: serde_json::Value,
    ) -> Result<Self> {
        let (copy, ft) = FineTune::prepare(model, &cfg)?;
        if let Some(mp @ ("fp16" | "bf16")) = cfg.mixed_precision.as_deref() {
            eprintln!("note: full fine-tuning computes in f32 (f32 weights); mixed_precision {mp} applies to the frozen VAE only");
        }
        Self::new(Arc::new(copy), Target::Model(ft), data, cfg, recipe)
    }

    /// Sets up optimizer groups (text encoder / UNet LRs), the LR schedule, step counts and the latent cache.
    pub fn new(
        model: Arc<StableDiffusion>,
        target: Target,
        data: Option<Arc<DatasetGroup>>,
        cfg: TrainConfig,
        recipe: serde_json::Value,
    ) -> Result<Self> {
        target.check(&cfg)?;
        if let Target::Network(network) = &target {
            check_network_precision(&model, network, &cfg)?;
        }
        if cfg.weighted_captions && model.is_xl() {
            bail!("weighted_captions: sd-scripts weights captions for SD 1.x/2.x only, not for SDXL");
        }
        let cfg_mp_fp16 = cfg.mixed_precision.as_deref() == Some("fp16") && target.network().is_some();
        let v_pred = cfg.v_parameterization.unwrap_or(model.v_pred);
        let groups = target.param_groups(&cfg)?;
        let args = optim::parse_args(&cfg.optimizer_args)?;
        let kind = optim::Kind::parse(&cfg.optimizer_type, &args)?;
        let optimizer_description = optim::describe(&cfg.optimizer_type, &args)?;
        let optimizer = Optimizer::new(kind, groups)?;
        let batches_per_epoch = data.as_ref().map(|d| d.batches_per_epoch()).unwrap_or(0);
        let updates_per_epoch = batches_per_epoch.div_ceil(cfg.gradient_accumulation_steps.max(1));
        let (total_steps, epochs) = match (cfg.max_train_epochs, cfg.max_train_steps) {
            (Some(e), _) if updates_per_epoch > 0 => (e * updates_per_epoch, e),
            (_, Some(s)) => (s, if updates_per_epoch > 0 { s.div_ceil(updates_per_epoch) } else { 1 }),
            _ => (1600, if updates_per_epoch > 0 { 1600usize.div_ceil(updates_per_epoch) } else { 1 }),
        };
        let lr = LrSchedule::parse(
            &cfg.lr_scheduler,
            cfg.warmup_steps(total_steps),
            total_steps,
            cfg.lr_scheduler_num_cycles,
            cfg.lr_scheduler_power,
            cfg.learning_rate,
            cfg.step_rules.as_deref(),
        )?;
        let lr = lr.for_optimizer(&kind, cfg.warmup_steps(total_steps))?;
        let base = crate::sample::pipeline::scheduler_config(&model, &Default::default()).schedule;
        let snr: Vec<f64> = base.alphas_cumprod.iter().map(|&a| a as f64 / (1.0 - a as f64)).collect();
        let schedule = if cfg.zero_terminal_snr { zero_terminal_snr(&base) } else { base };
        let mut caches = Vec::new();
        if let Some(d) = &data {
            for ds in &d.datasets {
                caches.push(if cfg.cache_latents || cfg.cache_latents_to_disk {
                    Some(cache_latents(ds, &model, cfg.vae_batch_size, cfg.cache_latents_to_disk, cfg.seed)?.0)
                } else {
                    None
                });
            }
        }
        if let Some(network) = target.network() {
            network.apply(1.0);
        }
        Ok(Self {
            model,
            target,
            data,
            cfg,
            optimizer,
            optimizer_description,
            lr,
            schedule,
            snr,
            v_pred,
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            losses: Vec::new(),
            total_steps,
            epochs,
            caches,
            stop: Arc::new(AtomicBool::new(false)),
            recipe,
            accum: None,
            scaler: (cfg_mp_fp16).then(LossScaler::default),
            accum_count: 0,
            last_loss: 0.0,
            no_state_on_error: false,
            te_stopped: false,
            stopped: false,
            events: None,
            epoch_losses: Vec::new(),
        })
    }

    /// The loss of one batch (the training step's forward half), sd-scripts' order of operations.
    pub fn compute_loss(&self, b: &Batch, rng: &mut Rng) -> Result<Tensor> {
        let c = &self.cfg;
        let latents = b.latents.to_dtype(DType::F32)?.to_device(&self.model.device)?;
        let bsz = latents.dim(0)?;
        let noise = match &b.noise {
            Some(n) => n.to_dtype(DType::F32)?.to_device(&self.model.device)?,
            None => {
                let mut n = rng.randn(latents.dims(), latents.device())?;
                if let Some(o) = c.noise_offset {
                    n = apply_noise_offset(
                        &n,
                        &latents,
                        o,
                        c.adaptive_noise_scale,
                        c.noise_offset_random_strength,
                        rng,
                    )?;
                } else if let Some(iters) = c.multires_noise_iterations {
                    n = apply_multires_noise(&n, iters, c.multires_noise_discount, rng)?;
                }
                n
            }
        };
        let loss_type = LossType::parse(&c.loss_type)?;
        let timesteps = match &b.timesteps {
            Some(t) => t.to_dtype(DType::I64)?,
            None => {
                let span = c.max_timestep - c.min_timestep;
                let draw = |rng: &mut Rng| (c.min_timestep + rng.below(span)) as i64;
                // sd-scripts 0.8.7 draws one timestep for the whole batch with huber/smooth_l1
                let ts: Vec<i64> = if loss_type == LossType::L2 {
                    (0..bsz).map(|_| draw(rng)).collect()
                } else {
                    vec![draw(rng); bsz]
                };
                Tensor::new(ts.as_slice(), &candle_core::Device::Cpu)?
            }
        };
        let ts: Vec<i64> = timesteps.to_vec1()?;
        let ip = c.ip_noise_gamma.map(|g| if c.ip_noise_gamma_random_strength { rng.uniform() * g } else { g });
        let noisy = noisy_latents(&self.schedule, &latents, &noise, &timesteps, ip, rng)?;
        let cond = self.text_conditioning(b)?;
        let y = conditioning_vector(&self.model, &cond, b, &latents)?;
        let pred = self
            .model
            .unet_with(&noisy, &timesteps.to_device(&self.model.device)?, &cond.context, y.as_ref())?
            .to_dtype(DType::F32)?;
        let target = if self.v_pred { self.schedule.velocity(&latents, &noise, &timesteps)? } else { noise };
        let huber = if loss_type == LossType::L2 {
            None
        } else {
            let hs = HuberSchedule::parse(&c.huber_schedule)?;
            let cs: Vec<f32> = ts
                .iter()
                .map(|&t| {
                    loss::huber_c(
                        hs,
                        c.huber_c,
                        t as usize,
                        self.schedule.alphas_cumprod[t as usize] as f64,
                        self.schedule.len(),
                    ) as f32
                })
                .collect();
            Some(Tensor::new(cs.as_slice(), pred.device())?)
        };
        let per_sample = mean_per_sample(&element_loss(loss_type, &pred, &target, huber.as_ref())?)?;
        let per_sample = per_sample.mul(&b.weights.to_dtype(DType::F32)?.to_device(pred.device())?)?;
        let factors: Vec<f32> = ts
            .iter()
            .map(|&t| {
                let s = self.snr[t as usize];
                let mut f = 1.0;
                if let Some(g) = c.min_snr_gamma {
                    f *= loss::min_snr_weight(s, g, self.v_pred);
                }
                if c.scale_v_pred_loss_like_noise_pred {
                    f *= loss::scale_v_pred_like_noise_pred(s);
                }
                if let Some(l) = c.v_pred_like_loss {
                    f *= loss::v_pred_like_factor(s, l);
                }
                if c.debiased_estimation_loss {
                    f *= loss::debiased_weight(s);
                }
                f as f32
            })
            .collect();
        let per_sample = per_sample.mul(&Tensor::new(factors.as_slice(), pred.device())?)?;
        Ok(per_sample.mean_all()?)
    }

    /// Accumulates gradients of `b`; every `gradient_accumulation_steps` batches makes an optimizer step.
    /// Returns the batch loss. A non-finite loss stops with an error naming the step (no file is written).
    pub fn train_batch(&mut self, b: &Batch) -> Result<f64> {
        let mut rng =
            seed_for(self.cfg.seed, self.step * self.cfg.gradient_accumulation_steps.max(1) + self.accum_count, 1);
        // training mode (dropout, checkpoints) lasts through the backward, which recomputes checkpointed blocks
        self.target.set_training(true, Some(seed_for(self.cfg.seed, self.step, 2)));
        self.set_gradient_checkpointing(self.cfg.gradient_checkpointing);
        let result = self.loss_and_gradients(b, &mut rng);
        self.set_gradient_checkpointing(false);
        self.target.set_training(false, None);
        let (value, grads) = result?;
        match &mut self.accum {
            None => self.accum = Some(grads),
            Some(acc) => {
                for p in self.optimizer.groups.iter().flat_map(|g| &g.params) {
                    if let Some(g) = grads.get(p.as_tensor()) {
                        let sum = match acc.get(p.as_tensor()) {
                            Some(a) => (a + g)?,
                            None => g.clone(),
                        };
                        acc.insert(p.as_tensor(), sum);
                    }
                }
            }
        }
        self.accum_count += 1;
        self.last_loss = value;
        if self.accum_count == self.cfg.gradient_accumulation_steps.max(1) {
            self.optimizer_step()?;
        }
        Ok(value)
    }

    /// Trains on batch `batch_in_epoch` of this epoch's `plan` and moves past it; the epoch's last batch ends its
    /// accumulation window. Returns the batch's loss.
    pub fn train_planned(&mut self, plan: &[(usize, Vec<usize>)]) -> Result<f64> {
        let Some((di, idx)) = plan.get(self.batch_in_epoch) else {
            bail!("batch {} of an epoch of {} batches", self.batch_in_epoch + 1, plan.len());
        };
        let batch = self.make_batch(*di, idx)?;
        let loss = self.train_batch(&batch)?;
        self.batch_in_epoch += 1;
        if self.batch_in_epoch == plan.len() {
            self.finish_window()?;
        }
        Ok(loss)
    }

    /// Trains on the dataset's next batch (the next epoch's first after an epoch's last), as `train_planned`.
    pub fn train_next_batch(&mut self) -> Result<f64> {
        let mut plan = self.epoch_plan(self.epoch);
        if plan.is_empty() {
            bail!("the trainer has no dataset batches (give batches with step_with)");
        }
        if self.batch_in_epoch >= plan.len() {
            self.epoch += 1;
            self.batch_in_epoch = 0;
            plan = self.epoch_plan(self.epoch);
        }
        self.train_planned(&plan)
    }

    /// Gradient checkpointing of the UNet's blocks and the text encoder's layers, on or off.
    fn set_gradient_checkpointing(&self, on: bool) {
        self.model.unet.set_gradient_checkpointing(on);
        self.model.text_encoder.set_gradient_checkpointing(on);
        if let Some(te2) = &self.model.text_encoder_2 {
            te2.set_gradient_checkpointing(on);
        }
    }

    /// The batch's loss and the gradients of its share of the step (scaled for fp16 and accumulation). A
    /// non-finite loss is an error naming the step.
    fn loss_and_gradients(&mut self, b: &Batch, rng: &mut Rng) -> Result<(f64, GradStore)> {
        let loss = self.compute_loss(b, rng)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            self.no_state_on_error = true;
            bail!(
                "the loss is {value} at step {}: training stopped; saved files were left as they were",
                self.step + 1
            );
        }
        let accum = self.cfg.gradient_accumulation_steps.max(1);
        let scale = self.scaler.as_ref().map_or(1.0, |s| s.scale);
        crate::nn::checkpoint::clear_block_gradients();
        let mut grads = (loss * (scale / accum as f64))?.backward()?;
        // checkpointed blocks hand their own weights' gradients (full fine-tuning) over separately
        crate::nn::checkpoint::add_block_gradients(&mut grads)?;
        Ok((value, grads))
    }

    /// Ends the gradient accumulation window early with an optimizer step on what it holds, as accelerate does at
    /// the end of an epoch (sd-scripts counts `ceil(batches / gradient_accumulation_steps)` steps per epoch); false
    /// when the window is empty.
    pub fn finish_window(&mut self) -> Result<bool> {
        if self.accum_count == 0 {
            return Ok(false);
        }
        self.optimizer_step()?;
        Ok(true)
    }

    /// The optimizer step on the accumulated gradients (skipped on an fp16 overflow): unscaling, clipping, the
    /// update, max-norm; the step counter and the loss record advance.
    fn optimizer_step(&mut self) -> Result<()> {
        let Some(mut grads) = self.accum.take() else { return Ok(()) };
        self.accum_count = 0;
        // an error from here on may leave some weights updated and others not
        self.no_state_on_error = true;
        let device = self.model.device.clone();
        let overflow = match &self.scaler {
            Some(s) => !s.unscale(&mut grads, self.optimizer.groups.iter().flat_map(|g| &g.params))?,
            None => false,
        };
        self.stop_text_encoder_if_due();
        if !overflow {
            let factor = self.lr.factor(self.lr_step());
            crate::nn::profile::time("optimizer (+ clipping)", &device, || {
                let clip = match self.cfg.max_grad_norm {
                    n if n > 0.0 => self.optimizer.clip_coef(&grads, n)?,
                    _ => 1.0,
                };
                self.optimizer.step_scaled(&grads, factor, clip)?;
                if let Some(n) = self.cfg.scale_weight_norms.filter(|&n| n > 0.0) {
                    self.target.apply_max_norm(n)?;
                }
                Ok(())
            })?;
        }
        if let Some(s) = &mut self.scaler {
            s.update(overflow);
        }
        self.step += 1;
        self.losses.push(self.last_loss);
        self.no_state_on_error = false;
        Ok(())
    }

    /// The batch of the current epoch where the unfinished accumulation window began (where a resumed run
    /// continues: the window's gradients are not saved, its batches run again).
    pub fn window_start(&self) -> usize {
        self.batch_in_epoch - self.accum_count.min(self.batch_in_epoch)
    }

    /// `stop_text_encoder_training`: after N steps the text-encoder group keeps its weights.
    fn stop_text_encoder_if_due(&mut self) {
        if let Some(n) = self.cfg.stop_text_encoder_training {
            if self.step >= n && !self.te_stopped {
                if let Some(i) = self.optimizer.groups.iter().position(|g| g.name == "textencoder") {
                    self.optimizer.groups.remove(i);
                    self.optimizer.state.remove(i);
                    self.optimizer.param_steps.remove(i);
                }
                self.te_stopped = true;
            }
        }
    }

    /// The batch's text conditioning: weighted captions (A1111 syntax, sd-scripts' lpw), long-caption windows, or
    /// the plain 77-token encoding.
    fn text_conditioning(&self, b: &Batch) -> Result<ClipOutput> {
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

    /// The current LR of each group.
    pub fn current_lrs(&self) -> Result<Vec<(String, f64)>> {
        self.optimizer.group_lrs(self.lr.factor(self.lr_step()))
    }

    /// The LR schedule's position: optimizer steps taken (fp16 steps skipped for overflow do not count).
    fn lr_step(&self) -> usize {
        self.step - self.scaler.as_ref().map_or(0, |s| s.skipped)
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
                    captions.push(process_caption(&im.caption, &sub.caption, progress, &mut rng));
                    weights.push(if im.is_reg { self.cfg.prior_loss_weight } else { 1.0 } as f32);
                }
            }
            None => {
                let mut imgs = Vec::new();
                for &i in idx {
                    let s = ds.sample(i, progress, &mut rng)?;
                    sizes.extend(size_ids(s.original_size, s.crop_ltrb, s.bucket, s.flipped));
                    imgs.push(s.image.data.iter().map(|&b| b as f32 / 127.5 - 1.0).collect::<Vec<f32>>());
                    captions.push(s.caption);
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
        Ok(Batch {
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

    /// Runs to the end (or until `stop`), saving as configured; `on_event` sees every optimizer step and every
    /// set of sample images.
    pub fn run(&mut self, on_event: &mut dyn FnMut(&Trainer, Event)) -> Result<()> {
        self.stopped = false;
        self.prepare_output()?;
        if self.cfg.sample_at_first && self.step == 0 {
            self.sample_images(on_event)?;
        }
        while self.epoch < self.epochs && self.step < self.total_steps {
            let plan = self.epoch_plan(self.epoch);
            if plan.is_empty() {
                bail!("the dataset has no batches");
            }
            while self.batch_in_epoch < plan.len() && self.step < self.total_steps {
                if self.stop.load(Ordering::SeqCst) || crate::interrupt::take() {
                    self.stopped = true;
                    self.save_state_now()?;
                    return Ok(());
                }
                let before = self.step;
                let loss = match self.train_planned(&plan) {
                    Ok(loss) => loss,
                    Err(e) => return Err(self.save_after_error(e)),
                };
                if self.step > before {
                    self.log_metrics(loss)?;
                    on_event(self, Event::Step(loss));
                    if self.cfg.save_every_n_steps.is_some_and(|n| n > 0 && self.step % n == 0) {
                        self.save_intermediate(&format!("{}-step{:08}", self.cfg.output_name, self.step))?;
                        self.prune(true)?;
                    }
                    if self.cfg.sample_every_n_steps.is_some_and(|n| n > 0 && self.step % n == 0)
                        && self.cfg.sample_every_n_epochs.is_none()
                    {
                        if let Err(e) = self.sample_images(on_event) {
                            return Err(self.save_after_error(e));
                        }
                    }
                }
            }
            self.epoch += 1;
            self.batch_in_epoch = 0;
            if let (Some(ev), false) = (self.events.as_mut(), self.epoch_losses.is_empty()) {
                let mean = self.epoch_losses.iter().sum::<f64>() / self.epoch_losses.len() as f64;
                ev.scalars(self.epoch, &[("loss/epoch", mean as f32)])?;
            }
            self.epoch_losses.clear();
            if self.cfg.save_every_n_epochs.is_some_and(|n| n > 0 && self.epoch % n == 0) && self.epoch < self.epochs {
                self.save_intermediate(&format!("{}-{:06}", self.cfg.output_name, self.epoch))?;
                self.prune(false)?;
            }
            if self.cfg.sample_every_n_epochs.is_some_and(|n| n > 0 && self.epoch % n == 0) {
                if let Err(e) = self.sample_images(on_event) {
                    return Err(self.save_after_error(e));
                }
            }
        }
        self.save_output(&self.cfg.output_name.clone())?;
        if self.cfg.save_state {
            self.save_state_now()?;
        }
        Ok(())
    }

    /// An intermediate save: the network or model as `name`, and with `save_state` the state too (as sd-scripts saves one
    /// with each model), so that a run that crashes later resumes from here.
    fn save_intermediate(&self, name: &str) -> Result<()> {
        self.save_output(name)?;
        if self.cfg.save_state {
            self.save_state_now()?;
        }
        Ok(())
    }

    /// A batch failed (out of GPU memory, an unreadable image, ...): unless the weights may be inconsistent (a
    /// failed optimizer step) or diverged (a non-finite loss), the state as of the last step is saved first, so
    /// the run resumes once the cause is fixed. The error then says where the state went.
    fn save_after_error(&mut self, e: anyhow::Error) -> anyhow::Error {
        if self.no_state_on_error || self.step == 0 {
            return e;
        }
        match self.save_state_now() {
            Ok(dir) => e.context(format!(
                "training stopped at step {} of {}; its state was saved to {dir} (continue with `sdtune train --resume \
                 {dir}` or resume(\"{dir}\") once the cause below is fixed)",
                self.step,
                self.total_steps,
                dir = dir.display()
            )),
            Err(save) => {
                e.context(format!("training stopped at step {}; saving its state failed too: {save:#}", self.step))
            }
        }
    }

    fn output_dir(&self) -> PathBuf {
        self.cfg.output_dir.clone().unwrap_or_else(|| PathBuf::from("output"))
    }

    /// Creates the output folder and proves it writable before any training; refuses an existing final file.
    pub fn prepare_output(&self) -> Result<()> {
        let dir = self.output_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create the output folder", dir.display()))?;
        let probe = dir.join(format!(".sdtune-write-test-{}", std::process::id()));
        std::fs::write(&probe, b"ok")
            .with_context(|| format!("{}: the output folder is not writable", dir.display()))?;
        let _ = std::fs::remove_file(&probe);
        let last = self.final_path();
        if last.exists() && !self.cfg.overwrite && self.step == 0 {
            bail!("{}: already exists; choose another output_name or set overwrite: true", last.display());
        }
        Ok(())
    }

    /// Every option the run uses, defaults resolved: the model's precision and clip skip, the network, the
    /// datasets and the loop.
    pub fn resolved_options(&self) -> Result<serde_json::Value> {
        Ok(serde_json::json!({
            "model": {
                "dtype": crate::device::dtype_name(self.model.dtype), "clip_skip": self.model.clip_skip,
                "v_pred": self.v_pred,
            },
            "network": self.target.describe(),
            "datasets": self.data.as_ref().map(|d| d.datasets.iter().map(|x| format!("{:?}", x.cfg)).collect::<Vec<_>>()),
            "train": serde_json::to_value(&self.cfg)?,
            "total_steps": self.total_steps,
        }))
    }

    /// The training metadata (`ss_*`), as sd-scripts writes it.
    pub fn metadata(&self) -> Result<BTreeMap<String, String>> {
        let c = &self.cfg;
        let mut m = BTreeMap::new();
        let py = crate::io::py::py_float;
        let opt = |v: Option<f64>| v.map(py).unwrap_or_else(|| "None".into());
        m.insert("ss_output_name".into(), c.output_name.clone());
        m.insert("ss_learning_rate".into(), py(c.learning_rate));
        m.insert("ss_text_encoder_lr".into(), opt(c.text_encoder_lr));
        m.insert("ss_unet_lr".into(), opt(c.unet_lr));
        if let Some(d) = &self.data {
            let reg: usize = d.datasets.iter().flat_map(|x| &x.images).filter(|i| i.is_reg).count();
            let all: usize = d.datasets.iter().map(|x| x.images.len()).sum();
            m.insert(
                "ss_num_train_images".into(),
                d.datasets
                    .iter()
                    .flat_map(|x| &x.images)
                    .filter(|i| !i.is_reg)
                    .map(|i| i.num_repeats)
                    .sum::<usize>()
                    .to_string(),
            );
            m.insert("ss_num_reg_images".into(), reg.min(all).to_string());
            m.insert("ss_num_batches_per_epoch".into(), d.batches_per_epoch().to_string());
            m.extend(crate::data::metadata::ss_metadata(d)?);
        }
        m.insert("ss_num_epochs".into(), self.epochs.to_string());
        m.insert("ss_gradient_checkpointing".into(), if c.gradient_checkpointing { "True" } else { "False" }.into());
        m.insert("ss_gradient_accumulation_steps".into(), c.gradient_accumulation_steps.to_string());
        m.insert("ss_max_train_steps".into(), self.total_steps.to_string());
        m.insert("ss_lr_warmup_steps".into(), c.warmup_steps(self.total_steps).to_string());
        let scheduler = match self.lr {
            LrSchedule::Adafactor => format!("adafactor:{}", crate::io::py::py_float(c.learning_rate)),
            _ => c.lr_scheduler.clone(),
        };
        m.insert("ss_lr_scheduler".into(), scheduler);
        m.insert("ss_mixed_precision".into(), c.mixed_precision.clone().unwrap_or_else(|| "no".into()));
        m.insert("ss_full_fp16".into(), "False".into());
        m.insert("ss_clip_skip".into(), self.model.clip_skip.to_string());
        m.insert("ss_max_token_length".into(), self.cfg.max_token_length.map_or("None".to_string(), |n| n.to_string()));
        m.insert(
            "ss_cache_latents".into(),
            if c.cache_latents || c.cache_latents_to_disk { "True" } else { "False" }.into(),
        );
        m.insert("ss_seed".into(), c.seed.to_string());
        m.insert("ss_lowram".into(), "False".into());
        m.insert("ss_noise_offset".into(), opt(c.noise_offset));
        m.insert(
            "ss_multires_noise_iterations".into(),
            c.multires_noise_iterations.map(|v| v.to_string()).unwrap_or_else(|| "None".into()),
        );
        m.insert("ss_multires_noise_discount".into(), py(c.multires_noise_discount));
        m.insert("ss_adaptive_noise_scale".into(), opt(c.adaptive_noise_scale));
        m.insert("ss_zero_terminal_snr".into(), if c.zero_terminal_snr { "True" } else { "False" }.into());
        m.insert("ss_training_comment".into(), c.training_comment.clone().unwrap_or_else(|| "None".into()));
        m.insert("ss_sd_scripts_commit_hash".into(), format!("sdtune {}", env!("CARGO_PKG_VERSION")));
        m.insert("ss_optimizer".into(), self.optimizer_description.clone());
        m.insert("ss_max_grad_norm".into(), py(c.max_grad_norm));
        m.insert("ss_prior_loss_weight".into(), py(c.prior_loss_weight));
        m.insert("ss_min_snr_gamma".into(), opt(c.min_snr_gamma));
        m.insert("ss_ip_noise_gamma".into(), opt(c.ip_noise_gamma));
        m.insert("ss_debiased_estimation".into(), if c.debiased_estimation_loss { "True" } else { "False" }.into());
        m.insert("ss_loss_type".into(), c.loss_type.clone());
        m.insert("ss_huber_schedule".into(), c.huber_schedule.clone());
        m.insert("ss_huber_c".into(), py(c.huber_c));
        m.insert("ss_scale_weight_norms".into(), opt(c.scale_weight_norms));
        m.insert("ss_steps".into(), self.step.to_string());
        m.insert("ss_epoch".into(), self.epoch.to_string());
        Ok(m)
    }

    /// Writes the network (`name.safetensors`, sd-scripts' metadata) or the model (`name.safetensors`, or the
    /// diffusers folder `name`) in the output folder.
    pub fn save_output(&self, name: &str) -> Result<PathBuf> {
        let path = self.target.output_path(&self.output_dir(), name);
        let meta = self.metadata()?;
        self.target.save(&self.model, &path, self.resolution(), &meta, self.cfg.save_dtype()?, true)?;
        Ok(path)
    }

    /// The first dataset's resolution (512² without one).
    fn resolution(&self) -> (usize, usize) {
        self.data.as_ref().and_then(|d| d.datasets.first()).map(|d| d.cfg.buckets.resolution).unwrap_or((512, 512))
    }

    /// The network this run trains; an error when it fine-tunes the model itself.
    pub fn network(&self) -> Result<&Arc<Network>> {
        self.target.network().context("this run fine-tunes the model itself: it has no network")
    }

    /// Keeps only the last `save_last_n_epochs` / `save_last_n_steps` intermediate saves (files, or diffusers
    /// folders).
    fn prune(&self, steps: bool) -> Result<()> {
        let keep = if steps { self.cfg.save_last_n_steps } else { self.cfg.save_last_n_epochs };
        let Some(keep) = keep else { return Ok(()) };
        let prefix =
            if steps { format!("{}-step", self.cfg.output_name) } else { format!("{}-", self.cfg.output_name) };
        let final_name = self.final_path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let suffix = final_name.strip_prefix(self.cfg.output_name.as_str()).unwrap_or(".safetensors").to_string();
        let mut saves: Vec<PathBuf> = std::fs::read_dir(self.output_dir())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                n.strip_prefix(prefix.as_str())
                    .and_then(|rest| rest.strip_suffix(suffix.as_str()))
                    .is_some_and(|num| !num.is_empty() && num.chars().all(|c| c.is_ascii_digit()))
            })
            .collect();
        saves.sort();
        let excess = saves.len().saturating_sub(keep);
        for f in saves.into_iter().take(excess) {
            let removed = if f.is_dir() { std::fs::remove_dir_all(&f) } else { std::fs::remove_file(&f) };
            removed.with_context(|| format!("{}: cannot remove an old save", f.display()))?;
        }
        Ok(())
    }

    fn log_metrics(&mut self, loss: f64) -> Result<()> {
        let dir = self.cfg.logging_dir.clone().unwrap_or_else(|| self.output_dir());
        std::fs::create_dir_all(&dir)?;
        let avg = self.losses.iter().rev().take(100).sum::<f64>() / self.losses.len().clamp(1, 100) as f64;
        self.epoch_losses.push(loss);
        let mut line = serde_json::json!({ "step": self.step, "epoch": self.epoch + 1, "loss/current": loss, "loss/average": avg });
        let mut lrs = self.current_lrs()?;
        if let Some(d) = self.optimizer.d() {
            let dlr: Vec<(String, f64)> = lrs.iter().map(|(n, lr)| (format!("d*lr/{n}"), d * lr)).collect();
            lrs.extend(dlr);
        }
        for (name, lr) in &lrs {
            line[format!("lr/{name}")] = serde_json::json!(lr);
        }
        if self.cfg.logging_dir.is_some() {
            if self.events.is_none() {
                self.events = Some(crate::io::tensorboard::EventWriter::create(&dir.join(&self.cfg.output_name))?);
            }
            let mut scalars: Vec<(String, f32)> =
                vec![("loss/current".into(), loss as f32), ("loss/average".into(), avg as f32)];
            scalars.extend(lrs.iter().map(|(n, lr)| (format!("lr/{n}"), *lr as f32)));
            let refs: Vec<(&str, f32)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            self.events.as_mut().expect("created above").scalars(self.step, &refs)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}-metrics.jsonl", self.cfg.output_name)))?;
        writeln!(f, "{line}")?;
        Ok(())
    }

    fn sample_images(&self, on_event: &mut dyn FnMut(&Trainer, Event)) -> Result<()> {
        let Some(prompts) = &self.cfg.sample_prompts else { return Ok(()) };
        let out = self.output_dir().join("sample");
        let defaults = crate::sample::SampleOptions {
            sampler: self.cfg.sample_sampler.clone(),
            width: 512,
            height: 512,
            ..Default::default()
        };
        let res =
            self.data.as_ref().and_then(|d| d.datasets.first()).map(|d| d.cfg.buckets.resolution).unwrap_or((512, 512));
        let defaults = crate::sample::SampleOptions { width: res.0, height: res.1, ..defaults };
        let written =
            crate::sample::batch::sample_prompt_file(&self.model, prompts, &defaults, &out, &mut |_, _, _, _| {})?;
        on_event(self, Event::Sampled(&written));
        Ok(())
    }

    /// The state folder (`output_dir/{output_name}-state`).
    pub fn state_dir(&self) -> PathBuf {
        self.output_dir().join(format!("{}-state", self.cfg.output_name))
    }

    /// Saves everything needed to continue exactly: network and optimizer tensors, counters and the recipe.
    pub fn save_state_now(&self) -> Result<PathBuf> {
        super::state::save(self, &self.state_dir())?;
        Ok(self.state_dir())
    }

    pub(crate) fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    pub(crate) fn optimizer_mut(&mut self) -> &mut Optimizer {
        &mut self.optimizer
    }

    /// Whether the loop is done.
    pub fn finished(&self) -> bool {
        self.step >= self.total_steps
    }

    /// Where the final network or model goes.
    pub fn final_path(&self) -> PathBuf {
        self.target.output_path(&self.output_dir(), &self.cfg.output_name)
    }
}

/// The checks between a network's dtype, the frozen model's and the precision options.
fn check_network_precision(model: &StableDiffusion, network: &Network, cfg: &TrainConfig) -> Result<()> {
    if cfg.mixed_precision.as_deref() == Some("bf16") && model.device.is_cpu() {
        eprintln!(
            "note: mixed_precision bf16 on the CPU keeps the frozen model in f32 (candle has no CPU bf16 convolution)"
        );
    }
    if let Some(want) = cfg.base_dtype_for(&model.device) {
        if model.dtype != want {
            bail!(
                "mixed_precision {} needs the model loaded in {} (load_model(path, #{{ dtype: \"{}\" }})); the LoRA weights stay f32",
                cfg.mixed_precision.as_deref().unwrap_or(""),
                crate::device::dtype_name(want),
                crate::device::dtype_name(want)
            );
        }
    }
    if cfg.full_bf16 && model.device.is_cpu() {
        bail!("full_bf16 trains the LoRA weights in bf16, which candle's CPU matmul does not support: it needs a GPU");
    }
    let net_dtype = network.modules.first().map(|(_, m)| m.down.dtype()).unwrap_or(DType::F32);
    match (cfg.full_bf16, net_dtype) {
        (true, DType::BF16) | (false, DType::F32) => Ok(()),
        (true, d) => bail!(
            "full_bf16 trains the LoRA weights in bf16, but this network's are {}: create it with dtype bf16",
            crate::device::dtype_name(d)
        ),
        (false, d) => bail!(
            "the network's weights are {}; set full_bf16 (with mixed_precision bf16) to train them in half precision",
            crate::device::dtype_name(d)
        ),
    }
}

/// The paths a recipe refers to, made absolute so a saved state can be resumed from anywhere.
pub fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}
