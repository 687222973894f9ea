//! Reading and writing files: tensor files, whole-model checkpoints and the LDM ↔ diffusers key tables.

pub mod checkpoint;
pub mod embedding;
pub mod keymap;
pub mod modelspec;
pub mod openclip;
pub mod plot;
pub mod png;
pub mod py;
pub mod tensorboard;
pub mod tensors;
pub mod time;
