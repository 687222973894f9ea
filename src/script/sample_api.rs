//! Script bindings for sampling: `model.sample`, `model.sample_latents`, `parse_prompt`, images.

use super::errors::{rt, RhaiResult};
use super::model_api::Model;
use super::opts::Opts;
use crate::io::png::Image;
use crate::sample::prompt::parse_prompt_attention;
use crate::sample::prompt_file::parse_line;
use crate::sample::{sample_image, sample_latents, SampleOptions};
use anyhow::{bail, Result};
use candle_core::Tensor;
use rhai::{Array, Dynamic, Engine, Map};
use std::path::Path;

pub(crate) const SAMPLE_KEYS: &[&str] = &[
    "prompt",
    "negative",
    "width",
    "height",
    "steps",
    "cfg",
    "seed",
    "sampler",
    "latents",
    "karras",
    "eta",
    "clip_skip",
    "max_chunks",
    "timestep_spacing",
];

fn options(map: &Map) -> Result<SampleOptions> {
    let o = Opts::new(map, "sample", SAMPLE_KEYS)?;
    let mut s = SampleOptions::default();
    if let Some(p) = o.string("prompt")? {
        s.prompt = p;
    }
    if let Some(n) = o.string("negative")? {
        s.negative = n;
    }
    s.width = o.usize("width")?.unwrap_or(s.width);
    s.height = o.usize("height")?.unwrap_or(s.height);
    s.steps = o.usize("steps")?.unwrap_or(s.steps);
    s.cfg = o.float("cfg")?.unwrap_or(s.cfg);
    if let Some(seed) = o.usize("seed")? {
        s.seed = seed as u64;
    }
    if let Some(name) = o.string("sampler")? {
        s.sampler = name;
    }
    s.karras = o.bool("karras")?.unwrap_or(false);
    s.eta = o.float("eta")?.unwrap_or(0.0);
    s.clip_skip = o.usize("clip_skip")?;
    s.max_chunks = o.usize("max_chunks")?.unwrap_or(s.max_chunks);
    s.latents = o.tensor("latents")?;
    s.leading = match o.string("timestep_spacing")?.as_deref() {
        None | Some("linspace") => false,
        Some("leading") => true,
        Some(other) => {
            bail!("sample: timestep_spacing {other:?} is not supported; expected \"linspace\" or \"leading\"")
        }
    };
    Ok(s)
}

fn from_line(line: &str) -> Result<SampleOptions> {
    Ok(SampleOptions::default().with_spec(&parse_line(line, "sample()")?))
}

fn image(m: &Model, opts: SampleOptions) -> Result<Image> {
    sample_image(m, &opts, &mut |_, _, _| {})
}

/// Registers sampling functions and the Image type.
pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<Image>("Image");
    engine.register_fn("sample", |m: &mut Model, line: &str| rt(from_line(line).and_then(|o| image(m, o))));
    engine.register_fn("sample", |m: &mut Model, opts: Map| rt(options(&opts).and_then(|o| image(m, o))));
    engine.register_fn("sample_latents", |m: &mut Model, opts: Map| -> RhaiResult<Tensor> {
        rt(options(&opts).and_then(|o| sample_latents(m, &o, &mut |_, _, _| {})))
    });
    engine.register_fn("parse_prompt", |text: &str| -> Array {
        parse_prompt_attention(text)
            .into_iter()
            .map(|(t, w)| Dynamic::from_array(vec![Dynamic::from(t), Dynamic::from_float(w)]))
            .collect()
    });
    engine.register_get("width", |i: &mut Image| i.width as i64);
    engine.register_get("height", |i: &mut Image| i.height as i64);
    engine.register_get("parameters", |i: &mut Image| i.text_value("parameters").unwrap_or("").to_string());
    engine.register_fn("save", |i: &mut Image, p: &str| rt(i.save(Path::new(p))));
    engine.register_fn("to_tensor", |i: &mut Image| rt(i.to_tensor(&candle_core::Device::Cpu)));
    engine.register_fn("to_string", |i: &mut Image| format!("Image({}x{})", i.width, i.height));
    engine.register_fn("to_debug", |i: &mut Image| format!("Image({}x{})", i.width, i.height));
    engine.register_fn("load_image", |p: &str| rt(Image::load(Path::new(p))));
}
