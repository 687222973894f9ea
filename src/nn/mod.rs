//! Neural-network building blocks shared by the models: weight views and differentiable layers.

pub mod adapter;
mod attention;
pub mod checkpoint;
mod conv;
pub mod fused;
pub mod grad;
mod layers;
mod norm;
pub mod profile;
mod weights;

pub use attention::attention;
pub use conv::conv2d;
pub use layers::{quick_gelu, Conv2d, Linear};
pub use norm::{GroupNorm, LayerNorm};
pub use weights::Weights;
