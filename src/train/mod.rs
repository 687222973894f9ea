//! Training: the LoRA training loop and its parts (noise tricks, losses, optimizers, LR schedules, states).

pub mod build;
pub mod config;
pub mod loss;
pub mod lr;
pub mod network_options;
pub mod noise;
pub mod optim;
pub mod scaler;
pub mod state;
pub mod target;
pub mod textual_inversion;
pub mod trainer;

pub use trainer::{Batch, Event, Trainer};
