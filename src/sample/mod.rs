//! Sampling: schedulers under kohya's names, prompt weighting and prompt files, and the txt2img pipeline.

pub mod batch;
pub mod pipeline;
pub mod prompt;
pub mod prompt_file;
pub mod schedulers;

pub use pipeline::{sample_image, sample_latents, SampleOptions};
