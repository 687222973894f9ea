//! Rendering every prompt of a prompt file into a folder (used by `sdtune sample` and, later, training samples).

use super::prompt_file::read_prompt_file;
use super::{sample_image, SampleOptions};
use crate::models::StableDiffusion;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Progress of a batch: `(image index, image count, step, steps)`.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, usize, usize);

/// A path in `dir` named `stem.png` that does not exist yet (`stem-1.png`, ... otherwise): never overwrites.
pub fn fresh_path(dir: &Path, stem: &str) -> PathBuf {
    let first = dir.join(format!("{stem}.png"));
    if !first.exists() {
        return first;
    }
    (1..).map(|i| dir.join(format!("{stem}-{i}.png"))).find(|p| !p.exists()).expect("an unused name exists")
}

/// Samples each prompt of `prompts` (txt/toml/json) with `defaults` for what a prompt leaves out; writes PNGs
/// with A1111 `parameters` into `out_dir` (created if needed) and returns their paths.
pub fn sample_prompt_file(
    model: &StableDiffusion,
    prompts: &Path,
    defaults: &SampleOptions,
    out_dir: &Path,
    progress: Progress,
) -> Result<Vec<PathBuf>> {
    let specs = read_prompt_file(prompts)?;
    let jobs: Vec<SampleOptions> = specs.iter().map(|s| defaults.with_spec(s)).collect();
    for (i, j) in jobs.iter().enumerate() {
        super::schedulers::parse_sampler(&j.sampler)
            .with_context(|| format!("{}: prompt {}", prompts.display(), i + 1))?;
    }
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("{}: cannot create the output folder", out_dir.display()))?;
    let n = jobs.len();
    let mut written = Vec::with_capacity(n);
    for (i, job) in jobs.iter().enumerate() {
        let img = sample_image(model, job, &mut |s, total, _| progress(i, n, s + 1, total))?;
        let path = fresh_path(out_dir, &format!("{i:03}-{}", job.seed));
        img.save(&path)?;
        written.push(path);
    }
    Ok(written)
}
