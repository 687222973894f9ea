//! What a run writes: the output folder, the trained network or model, sd-scripts' metadata, metrics (JSON lines,
//! TensorBoard), sample images, and pruning of old saves.

use super::{Event, Trainer};
use crate::train::lr::LrSchedule;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

impl Trainer {
    /// The output folder (`output_dir`, default `output`).
    pub(super) fn output_dir(&self) -> PathBuf {
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
        m.insert("ss_masked_loss".into(), if c.masked_loss { "True" } else { "False" }.into());
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
    pub(super) fn resolution(&self) -> (usize, usize) {
        self.data.as_ref().and_then(|d| d.datasets.first()).map(|d| d.cfg.buckets.resolution).unwrap_or((512, 512))
    }

    /// Keeps only the last `save_last_n_epochs` / `save_last_n_steps` intermediate saves (files, or diffusers
    /// folders).
    pub(super) fn prune(&self, steps: bool) -> Result<()> {
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

    pub(super) fn log_metrics(&mut self, loss: f64) -> Result<()> {
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
                let run = format!("{}{}", self.cfg.log_prefix.as_deref().unwrap_or(""), self.cfg.output_name);
                self.events = Some(crate::io::tensorboard::EventWriter::create(&dir.join(run))?);
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

    pub(super) fn sample_images(&self, on_event: &mut dyn FnMut(&Trainer, Event)) -> Result<()> {
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
        crate::train::state::save(self, &self.state_dir())?;
        Ok(self.state_dir())
    }

    /// Where the final network or model goes.
    pub fn final_path(&self) -> PathBuf {
        self.target.output_path(&self.output_dir(), &self.cfg.output_name)
    }
}
