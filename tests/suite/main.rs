//! The integration suite (one test binary: candle links once). Run with `cargo test --release`.

mod cli;
mod common;
mod contract;
mod cuda_emulated;
mod datasets;
mod embeddings;
mod finetune;
mod gradients;
mod import;
mod kernel;
mod lycoris;
mod networks;
mod optimizers;
mod parity;
mod repl;
mod roundtrip;
mod sampling;
mod schedule;
mod sdxl;
mod tokenizer;
mod training;
