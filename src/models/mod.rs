//! The Stable Diffusion model family: text encoder, UNet, VAE, tokenizer, and the assembled pipeline model.

pub mod clip;
pub mod family;
mod stable_diffusion;
pub mod tokenizer;
mod trainable;
pub mod unet;
pub mod vae;

pub use family::Family;
pub use stable_diffusion::{LoadOptions, SaveFormat, StableDiffusion};
pub use trainable::Trainables;
