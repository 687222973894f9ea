//! Training: the LoRA training loop and its parts (noise tricks, losses, optimizers, LR schedules).

pub mod loss;
pub mod lr;
pub mod noise;
pub mod optim;
