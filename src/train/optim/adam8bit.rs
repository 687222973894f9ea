//! AdamW8bit as bitsandbytes keeps it: tensors of 4096 elements or more store both moments block-wise in
//! 8 bits (blocks of 256 values, each scaled by its absolute maximum, coded on the "dynamic" maps), smaller ones
//! in f32. Each step decodes the moments, updates in f32 and codes them again (nearest code), as bitsandbytes'
//! reference kernel does. The update runs on the host.

use super::basic::Adam;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::sync::OnceLock;

/// Values per quantisation block.
const BLOCK: usize = 256;
/// Tensors smaller than this keep f32 moments (bitsandbytes' `min_8bit_size`).
const MIN_8BIT_SIZE: usize = 4096;

/// `n` evenly spaced values from `start` to `end`, in f64.
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    (0..n).map(|i| start + (end - start) * i as f64 / (n - 1) as f64).collect()
}

/// bitsandbytes' `create_dynamic_map(signed)`: 256 sorted codes in [-1, 1] (signed) or [0, 1], dense near zero:
/// for each decade 10⁻⁶…10⁰, the midpoints of an even split of [0.1, 1] scaled into it. Computed in f64 and
/// rounded once (bitsandbytes' f32 `torch.linspace` can differ in the last bit or two).
pub fn dynamic_map(signed: bool) -> Vec<f32> {
    const MAX_EXPONENT_BITS: i32 = 7;
    const NON_SIGN_BITS: i32 = 7;
    let mut data = Vec::with_capacity(256);
    for i in 0..MAX_EXPONENT_BITS {
        let items = 2usize.pow((i + NON_SIGN_BITS - MAX_EXPONENT_BITS + if signed { 0 } else { 1 }) as u32) + 1;
        let b = linspace(0.1, 1.0, items);
        let scale = 10f64.powi(-(MAX_EXPONENT_BITS - 1) + i);
        for w in b.windows(2) {
            let code = (scale * (w[0] + w[1]) / 2.0) as f32;
            data.push(code);
            if signed {
                data.push(-code);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    data
}

fn maps() -> &'static (Vec<f32>, Vec<f32>) {
    static MAPS: OnceLock<(Vec<f32>, Vec<f32>)> = OnceLock::new();
    MAPS.get_or_init(|| (dynamic_map(true), dynamic_map(false)))
}

/// Zeroed state: f32 (m, v) for small tensors, else (m codes, m block maxima, v codes, v block maxima).
pub fn init_state(p: &Tensor) -> Result<Vec<Tensor>> {
    let n = p.elem_count();
    if n < MIN_8BIT_SIZE {
        return super::basic::adam_state(p);
    }
    let blocks = n.div_ceil(BLOCK);
    let dev = p.device();
    let codes = || Tensor::zeros(p.shape(), DType::U8, dev);
    let absmax = || Tensor::zeros(blocks, DType::F32, dev);
    Ok(vec![codes()?, absmax()?, codes()?, absmax()?])
}

fn decode(codes: &[u8], absmax: &[f32], map: &[f32]) -> Vec<f32> {
    codes.iter().enumerate().map(|(i, &c)| map[c as usize] * absmax[i / BLOCK]).collect()
}

/// The index of the code nearest to `x` (the lower one on a tie, as `argmin`).
fn nearest(x: f32, map: &[f32]) -> u8 {
    let hi = map.partition_point(|&c| c < x).min(map.len() - 1);
    let mut best = hi;
    if hi > 0 && (x - map[hi - 1]).abs() <= (x - map[hi]).abs() {
        best = hi - 1;
    }
    while best > 0 && map[best - 1] == map[best] {
        best -= 1;
    }
    best as u8
}

fn encode(x: &[f32], map: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(BLOCK));
    for block in x.chunks(BLOCK) {
        let mut m = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        if m == 0.0 {
            m = 1.0;
        }
        absmax.push(m);
        codes.extend(block.iter().map(|v| nearest(v / m, map)));
    }
    (codes, absmax)
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1()?)
}

/// One AdamW8bit step of `w` (returns the new weights; updates `st`).
pub fn step(c: &Adam, w: &Tensor, g: &Tensor, st: &mut [Tensor], lr: f64, t: usize) -> Result<Tensor> {
    if st[0].dtype() != DType::U8 {
        let (m, v) = c.moments(g, &st[0], &st[1])?;
        let out = c.apply(w, &m, &v, lr, t)?;
        st[0] = m;
        st[1] = v;
        return Ok(out);
    }
    let (signed, unsigned) = maps();
    let mut m = decode(&st[0].flatten_all()?.to_vec1::<u8>()?, &host_f32(&st[1])?, signed);
    let mut v = decode(&st[2].flatten_all()?.to_vec1::<u8>()?, &host_f32(&st[3])?, unsigned);
    let grad = host_f32(g)?;
    let mut p = host_f32(w)?;
    let (b1, b2) = c.betas;
    let (b1f, b2f, a1, a2) = (b1 as f32, b2 as f32, (1.0 - b1) as f32, (1.0 - b2) as f32);
    let bc1 = 1.0 - b1.powi(t as i32);
    let sqrt_bc2 = ((1.0 - b2.powi(t as i32)).sqrt()) as f32;
    let decay = (1.0 - lr * c.weight_decay) as f32;
    let step_size = (-lr / bc1) as f32;
    for i in 0..p.len() {
        m[i] = m[i] * b1f + a1 * grad[i];
        v[i] = v[i] * b2f + a2 * grad[i] * grad[i];
        let denom = v[i].sqrt() / sqrt_bc2 + c.eps as f32;
        if c.weight_decay > 0.0 {
            p[i] *= decay;
        }
        p[i] += step_size * (m[i] / denom);
    }
    let (mc, ma) = encode(&m, signed);
    let (vc, va) = encode(&v, unsigned);
    let dev = w.device();
    st[0] = Tensor::from_vec(mc, st[0].shape(), dev)?;
    st[1] = Tensor::from_vec(ma, st[1].shape(), dev)?;
    st[2] = Tensor::from_vec(vc, st[2].shape(), dev)?;
    st[3] = Tensor::from_vec(va, st[3].shape(), dev)?;
    Ok(Tensor::from_vec(p, w.shape(), dev)?.to_dtype(w.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_to_nearest_and_back() {
        let map = dynamic_map(true);
        assert_eq!(map.len(), 256);
        assert!(map.windows(2).all(|w| w[0] < w[1]), "sorted, distinct");
        assert_eq!(map[255], 1.0);
        // every code decodes to itself
        for (i, &c) in map.iter().enumerate() {
            assert_eq!(nearest(c, &map) as usize, i);
        }
        // halfway between two codes goes to the lower one; just above goes up
        let mid = (map[200] + map[201]) / 2.0;
        assert_eq!(nearest(mid, &map), 200);
        assert_eq!(nearest(mid + 1e-6, &map), 201);
        let x: Vec<f32> = (0..600).map(|i| ((i as f32) * 0.37).sin() * (i as f32 + 1.0)).collect();
        let (codes, absmax) = encode(&x, &map);
        assert_eq!(absmax.len(), 3);
        let back = decode(&codes, &absmax, &map);
        for (a, b) in x.iter().zip(&back) {
            // the coarsest gap of the map is < 0.04 of the block maximum
            assert!((a - b).abs() <= 0.02 * absmax.iter().cloned().fold(0.0, f32::max), "{a} vs {b}");
        }
    }
}
