//! Text-to-image: text conditioning, classifier-free guidance, the scheduler loop and decoding, as diffusers'
//! StableDiffusionPipeline (and sd-scripts' sampling) do it.

use super::prompt::encode_prompt_pair;
use super::prompt_file::PromptSpec;
use super::schedulers::{self, a1111_label, NoiseSource, Prediction, SchedulerConfig};
use crate::io::png::Image;
use crate::models::StableDiffusion;
use crate::rng::Rng;
use crate::schedule::NoiseSchedule;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde_json::Value;

/// Everything one sample needs.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub prompt: String,
    pub negative: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub cfg: f64,
    pub seed: u64,
    pub sampler: String,
    pub karras: bool,
    pub eta: f64,
    pub clip_skip: Option<usize>,
    /// Initial noise (unit variance; multiplied by the scheduler's `init_noise_sigma`), else drawn from `seed`.
    pub latents: Option<Tensor>,
    /// Longest prompt in 75-token chunks (sd-scripts: 3 = 225 tokens).
    pub max_chunks: usize,
    /// "leading" timestep spacing for the sigma schedulers (diffusers with SDXL base's scheduler config), instead of
    /// their default "linspace" (sd-scripts).
    pub leading: bool,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative: String::new(),
            width: 512,
            height: 512,
            steps: 30,
            cfg: 7.5,
            seed: random_seed(),
            sampler: "ddim".into(),
            karras: false,
            eta: 0.0,
            clip_skip: None,
            latents: None,
            max_chunks: 3,
            leading: false,
        }
    }
}

/// A seed from the clock, for prompts that give none (it is recorded in the PNG).
pub fn random_seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (t as u64 ^ (t >> 64) as u64) % 4_294_967_296
}

impl SampleOptions {
    /// Applies a prompt-file entry over these defaults.
    pub fn with_spec(&self, spec: &PromptSpec) -> Self {
        let mut o = self.clone();
        o.prompt = spec.prompt.clone();
        if let Some(n) = &spec.negative {
            o.negative = n.clone();
        }
        o.width = spec.width.unwrap_or(o.width);
        o.height = spec.height.unwrap_or(o.height);
        o.seed = spec.seed.unwrap_or_else(random_seed);
        o.cfg = spec.cfg.unwrap_or(o.cfg);
        o.steps = spec.steps.unwrap_or(o.steps);
        if let Some(s) = &spec.sampler {
            o.sampler = s.clone();
        }
        o
    }

    /// Width and height floored to multiples of 8, at least 64, as sd-scripts does.
    pub fn size(&self) -> (usize, usize) {
        let fix = |v: usize| (v.max(64) / 8) * 8;
        (fix(self.width), fix(self.height))
    }

    /// A1111's `parameters` text.
    pub fn parameters(&self, model_name: &str) -> String {
        let (w, h) = self.size();
        format!(
            "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {w}x{h}, Model: {model_name}",
            self.prompt,
            self.negative,
            self.steps,
            a1111_label(&self.sampler, self.karras),
            self.cfg,
            self.seed
        )
    }
}

struct SeededNoise(Rng);

impl NoiseSource for SeededNoise {
    fn randn_like(&mut self, t: &Tensor) -> Result<Tensor> {
        self.0.randn(t.dims(), t.device())?.to_dtype(t.dtype()).map_err(Into::into)
    }
}

/// The scheduler configuration of a model: its training betas and prediction type.
pub fn scheduler_config(model: &StableDiffusion, opts: &SampleOptions) -> SchedulerConfig {
    let c = &model.scheduler_config;
    let f = |k: &str, d: f64| c.get(k).and_then(Value::as_f64).unwrap_or(d);
    let n = c.get("num_train_timesteps").and_then(Value::as_u64).unwrap_or(1000) as usize;
    SchedulerConfig {
        schedule: NoiseSchedule::scaled_linear(f("beta_start", 0.00085), f("beta_end", 0.012), n),
        prediction: if model.v_pred { Prediction::VPrediction } else { Prediction::Epsilon },
        karras: opts.karras,
        steps_offset: c.get("steps_offset").and_then(Value::as_u64).unwrap_or(1) as usize,
        eta: opts.eta,
        clip_sample: false,
        leading: opts.leading,
    }
}

/// Runs the sampler and returns the final latents (before the VAE); `on_step(i, n, latents)` sees each step.
pub fn sample_latents(
    model: &StableDiffusion,
    opts: &SampleOptions,
    on_step: &mut dyn FnMut(usize, usize, &Tensor),
) -> Result<Tensor> {
    let kind = schedulers::parse_sampler(&opts.sampler)?;
    let mut sched = schedulers::build(kind, &scheduler_config(model, opts), opts.steps)?;
    let (w, h) = opts.size();
    if (w, h) != (opts.width, opts.height) {
        eprintln!("warning: size {}x{} is not a multiple of 8 (min 64); using {w}x{h}", opts.width, opts.height);
    }
    let mut rng = Rng::new(opts.seed);
    let channels = model.unet.cfg.in_channels;
    let latents = match &opts.latents {
        Some(l) => {
            let d = l.dims();
            if d.len() != 4 || d[1] != channels {
                bail!("latents must be [B, {channels}, h, w], got {d:?}");
            }
            l.to_device(&model.device)?.to_dtype(DType::F32)?
        }
        None => rng.randn(&[1, channels, h / 8, w / 8], &model.device)?,
    };
    let mut latents = (latents * sched.init_noise_sigma())?;
    let batch = latents.dim(0)?;
    let (cond, uncond, truncated) =
        encode_prompt_pair(model, &opts.prompt, &opts.negative, opts.max_chunks, opts.clip_skip)?;
    if truncated {
        eprintln!("warning: prompt truncated to {} tokens", 75 * opts.max_chunks);
    }
    let guided = opts.cfg > 1.0;
    let expand = |t: &Tensor| -> Result<Tensor> {
        let mut reps = vec![1; t.rank()];
        reps[0] = batch;
        Ok(t.repeat(reps)?)
    };
    let pair = |c: &Tensor, u: &Tensor| -> Result<Tensor> {
        if guided {
            Ok(Tensor::cat(&[expand(u)?, expand(c)?], 0)?)
        } else {
            expand(c)
        }
    };
    let context = pair(&cond.context, &uncond.context)?;
    let y = match (&cond.pooled, &uncond.pooled) {
        (Some(pc), Some(pu)) if model.is_xl() => {
            // sd-scripts' and diffusers' sampling: original size = target size = the image's, no crop
            let ids = Tensor::from_vec(vec![h as f32, w as f32, 0., 0., h as f32, w as f32], (1, 6), &model.device)?;
            let yc = model.sdxl_y(pc, &ids)?.expect("an SDXL model gives a vector");
            let yu = model.sdxl_y(pu, &ids)?.expect("an SDXL model gives a vector");
            Some(pair(&yc, &yu)?)
        }
        _ => None,
    };
    let mut noise = SeededNoise(rng);
    let timesteps = sched.timesteps().to_vec();
    for (i, &t) in timesteps.iter().enumerate() {
        let x = if guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
        let x = sched.scale_model_input(&x, i)?;
        let ts = Tensor::from_vec(vec![t as f32; x.dim(0)?], x.dim(0)?, &model.device)?;
        let out = model.unet_with(&x, &ts, &context, y.as_ref())?.to_dtype(DType::F32)?;
        let out = if guided {
            let (u, c) = (out.narrow(0, 0, batch)?, out.narrow(0, batch, batch)?);
            (&u + ((c - &u)? * opts.cfg)?)?
        } else {
            out
        };
        latents = sched.step(&out, i, &latents, &mut noise)?;
        on_step(i, timesteps.len(), &latents);
    }
    Ok(latents)
}

/// Samples and decodes one image, with A1111 `parameters` metadata.
pub fn sample_image(
    model: &StableDiffusion,
    opts: &SampleOptions,
    on_step: &mut dyn FnMut(usize, usize, &Tensor),
) -> Result<Image> {
    let latents = sample_latents(model, opts, on_step)?;
    let decoded = model.vae_decode(&(latents.narrow(0, 0, 1)? / model.vae_scale)?)?;
    let mut img = Image::from_tensor(&decoded)?;
    let name = model.source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    img.text.push(("parameters".into(), opts.parameters(&name)));
    Ok(img)
}
