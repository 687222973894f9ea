//! The training loop (sd-scripts' `train_network.py`, and `train_db.py` for full fine-tuning): data → noise →
//! timesteps → UNet → target → loss weights → backward → clip → optimizer → LR schedule, with saving, resumable
//! state and metrics. What it trains (a network or the model) is `target::Target`.

mod batch;
mod output;

use batch::conditioning_vector;
pub use batch::Batch;

use crate::data::cache::{cache_latents, CachedLatents};
use crate::data::DatasetGroup;
use crate::models::StableDiffusion;
use crate::networks::Network;
use crate::rng::Rng;
use crate::schedule::NoiseSchedule;
use crate::train::config::TrainConfig;
use crate::train::loss::{self, element_loss, mean_per_sample, HuberSchedule, LossType};
use crate::train::lr::LrSchedule;
use crate::train::noise::{apply_multires_noise, apply_noise_offset, noisy_latents, zero_terminal_snr};
use crate::train::optim::{self, Optimizer};
use crate::train::scaler::LossScaler;
use crate::train::target::{FineTune, Target};
use crate::train::textual_inversion::TextualInversion;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
            eprintln!(
                "note: full fine-tuning keeps f32 weights; mixed_precision {mp}: the UNet computes in {}, trained text encoders in f32",
                crate::device::dtype_name(copy.dtype)
            );
        }
        Self::new(Arc::new(copy), Target::Model(ft), data, cfg, recipe)
    }

    /// A textual-inversion run: `token_string` is added to `model` (which keeps it after training) and its vectors
    /// train while the model stays frozen.
    pub fn textual_inversion(
        model: Arc<StableDiffusion>,
        data: Option<Arc<DatasetGroup>>,
        cfg: TrainConfig,
        recipe: serde_json::Value,
    ) -> Result<Self> {
        check_frozen_precision(&model, &cfg)?;
        let ti = TextualInversion::prepare(&model, &cfg)?;
        Self::new(model, Target::Embedding(ti), data, cfg, recipe)
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
        let alpha_masks =
            data.as_ref().is_some_and(|d| d.datasets.iter().any(|ds| ds.cfg.subsets.iter().any(|s| s.alpha_mask)));
        if cfg.masked_loss && !alpha_masks {
            bail!("masked_loss: no dataset has alpha_mask; masks from conditioning images (conditioning_data_dir) are not supported yet");
        }
        if cfg.weighted_captions && model.is_xl() {
            bail!("weighted_captions: sd-scripts weights captions for SD 1.x/2.x only, not for SDXL");
        }
        let cfg_mp_fp16 = cfg.mixed_precision.as_deref() == Some("fp16");
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
        let mut elements = element_loss(loss_type, &pred, &target, huber.as_ref())?;
        if let Some(m) = &b.masks {
            elements = loss::apply_mask(&elements, m)?;
        }
        let per_sample = mean_per_sample(&elements)?;
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
                for p in self.optimizer.groups.iter().flat_map(|g| &g.params).chain(self.target.clip_only()) {
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
            Some(s) => !s.unscale(
                &mut grads,
                self.optimizer.groups.iter().flat_map(|g| &g.params).chain(self.target.clip_only()),
            )?,
            None => false,
        };
        self.stop_text_encoder_if_due();
        if !overflow {
            let factor = self.lr.factor(self.lr_step());
            crate::nn::profile::time("optimizer (+ clipping)", &device, || {
                let clip = match self.cfg.max_grad_norm {
                    n if n > 0.0 => self.optimizer.clip_coef(&grads, n, self.target.clip_only())?,
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
                // every text-encoder group: "textencoder", LoRA+'s "textencoder plus", SDXL's "textencoder1" / "2"
                while let Some(i) = self.optimizer.groups.iter().position(|g| g.name.starts_with("textencoder")) {
                    self.optimizer.groups.remove(i);
                    self.optimizer.state.remove(i);
                    self.optimizer.param_steps.remove(i);
                }
                self.te_stopped = true;
            }
        }
    }

    /// The current LR of each group.
    pub fn current_lrs(&self) -> Result<Vec<(String, f64)>> {
        self.optimizer.group_lrs(self.lr.factor(self.lr_step()))
    }

    /// The LR schedule's position: optimizer steps taken (fp16 steps skipped for overflow do not count).
    fn lr_step(&self) -> usize {
        self.step - self.scaler.as_ref().map_or(0, |s| s.skipped)
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

    /// The network this run trains; an error when it fine-tunes the model itself.
    pub fn network(&self) -> Result<&Arc<Network>> {
        self.target.network().context("this run fine-tunes the model itself: it has no network")
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
}

/// The frozen model's dtype against `mixed_precision`, with a note where the CPU keeps f32.
fn check_frozen_precision(model: &StableDiffusion, cfg: &TrainConfig) -> Result<()> {
    if cfg.mixed_precision.as_deref() == Some("bf16") && model.device.is_cpu() {
        eprintln!(
            "note: mixed_precision bf16 on the CPU keeps the frozen model in f32 (candle has no CPU bf16 convolution)"
        );
    }
    if let Some(want) = cfg.base_dtype_for(&model.device) {
        if model.dtype != want {
            bail!(
                "mixed_precision {} needs the model loaded in {} (load_model(path, #{{ dtype: \"{}\" }})); the trained weights stay f32",
                cfg.mixed_precision.as_deref().unwrap_or(""),
                crate::device::dtype_name(want),
                crate::device::dtype_name(want)
            );
        }
    }
    Ok(())
}

/// The checks between a network's dtype, the frozen model's and the precision options.
fn check_network_precision(model: &StableDiffusion, network: &Network, cfg: &TrainConfig) -> Result<()> {
    check_frozen_precision(model, cfg)?;
    if cfg.full_bf16 && model.device.is_cpu() {
        bail!("full_bf16 trains the LoRA weights in bf16, which candle's CPU matmul does not support: it needs a GPU");
    }
    let net_dtype = network.modules.first().map(|(_, m)| m.vars()[0].dtype()).unwrap_or(DType::F32);
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
