//! A small deterministic random generator (SplitMix64 + Box–Muller): the same numbers for a seed on every platform
//! and device, so a seed reproduces a sample or a noise draw exactly.

use anyhow::Result;
use candle_core::{Device, Tensor};

/// A seeded stream of uniform and Gaussian numbers.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The raw state, for saving and restoring the stream.
    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix(self.state)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        unit(self.next_u64())
    }

    /// Skips the next `n` draws and returns the state before them: draw `i` of those is `uniform_at(state, i)`,
    /// computable in any order and on any device (`src/kernels/rand.cu`).
    pub fn reserve(&mut self, n: usize) -> u64 {
        let start = self.state;
        self.state = self.state.wrapping_add((n as u64).wrapping_mul(GAMMA));
        start
    }

    /// An index in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n - 1)
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }

    /// `n` standard normal samples.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let (u1, u2) = (self.uniform(), self.uniform());
            let r = (-2.0 * u1.ln()).sqrt();
            let th = 2.0 * std::f64::consts::PI * u2;
            out.push((r * th.cos()) as f32);
            out.push((r * th.sin()) as f32);
        }
        out.truncate(n);
        out
    }

    /// A standard normal f32 tensor of `shape` on `device`.
    pub fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(self.normal_vec(n), shape, &Device::Cpu)?.to_device(device)?)
    }
}

/// SplitMix64's increment: the stream's state after `i` draws is `seed + i·GAMMA`.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output for a state.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The top 53 bits of a draw as a uniform in (0, 1).
fn unit(x: u64) -> f64 {
    ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// The uniform draw `i` (from 0) of a stream at `state`, as `Rng::uniform` gives it in turn.
pub fn uniform_at(state: u64, i: u64) -> f64 {
    unit(mix(state.wrapping_add(i.wrapping_add(1).wrapping_mul(GAMMA))))
}

/// `n` standard normal samples for `seed`.
pub fn randn_vec(n: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).normal_vec(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_gives_its_published_first_output() {
        assert_eq!(Rng::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn reserved_draws_are_the_streams_next_draws() {
        for seed in [0, 42, u64::MAX - 3] {
            let mut seq = Rng::new(seed);
            let mut skip = Rng::new(seed);
            seq.uniform();
            skip.uniform();
            let start = skip.reserve(1000);
            for i in 0..1000 {
                assert_eq!(uniform_at(start, i).to_bits(), seq.uniform().to_bits(), "seed {seed}, draw {i}");
            }
            // after the reserved draws both streams continue alike
            assert_eq!(skip.uniform().to_bits(), seq.uniform().to_bits());
        }
    }
}
