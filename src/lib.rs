//! sdtune: a Stable Diffusion training studio — models, checkpoints and recipes as Rhai scripts over candle.
//!
//! Module map: see ARCHITECTURE.md.

pub mod data;
pub mod device;
pub mod display;
pub mod import;
pub mod interrupt;
pub mod io;
pub mod kernel;
pub mod models;
pub mod networks;
pub mod nn;
pub mod repl;
pub mod rng;
pub mod sample;
pub mod schedule;
pub mod script;
pub mod train;
