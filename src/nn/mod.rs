//! Neural-network building blocks shared by the models: weight views and differentiable layers.

pub mod adapter;
mod layers;
pub mod profile;
mod weights;

pub use layers::{attention, conv2d, quick_gelu, Conv2d, GroupNorm, LayerNorm, Linear};
pub use weights::Weights;
