//! AdamW8bit as bitsandbytes keeps it: tensors of 4096 elements or more store both moments block-wise in
//! 8 bits (blocks of 256 values, each scaled by its absolute maximum, coded on the "dynamic" maps), smaller ones
//! in f32. Each step decodes the moments, updates in f32 and codes them again (nearest code), as bitsandbytes'
//! reference kernel does. The 8-bit state of a tensor is one packed u8 tensor on its device, updated in place by
//! `nn::fused::adam8bit` (CUDA kernels with this CPU code as their reference); saved states hold its four parts.

use super::basic::Adam;
use crate::nn::fused::adam8bit::{self as fused, Adam8bit};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::OnceLock;

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

/// Zeroed state: f32 (m, v) for small tensors, else the packed 8-bit state (one u8 tensor).
pub fn init_state(p: &Tensor) -> Result<Vec<Tensor>> {
    let n = p.elem_count();
    if n < MIN_8BIT_SIZE {
        return super::basic::adam_state(p);
    }
    let blocks = n.div_ceil(fused::QBLOCK);
    let (m0, c0) = (vec![0f32; blocks], vec![0u8; n]);
    Ok(vec![packed(&m0, &m0, &c0, &c0, p.device())?])
}

fn packed(mmax: &[f32], vmax: &[f32], mc: &[u8], vc: &[u8], dev: &Device) -> Result<Tensor> {
    let (signed, unsigned) = maps();
    let bytes = fused::pack((signed, unsigned), mmax, vmax, mc, vc);
    let len = bytes.len();
    Ok(Tensor::from_vec(bytes, len, dev)?)
}

/// A parameter's state as saved: the 8-bit state as (m codes, m block maxima, v codes, v block maxima), codes in
/// the parameter's shape; f32 moments as they are.
pub fn saved(p: &Tensor, st: &[Tensor]) -> Result<Vec<Tensor>> {
    if st.len() != 1 {
        return Ok(st.to_vec());
    }
    let bytes = st[0].to_device(&Device::Cpu)?.to_vec1::<u8>()?;
    let fused::Parts { mmax, vmax, mc, vc } = fused::unpack(&bytes, p.elem_count())?;
    let (blocks, cpu) = (mmax.len(), &Device::Cpu);
    Ok(vec![
        Tensor::from_vec(mc, p.shape(), cpu)?,
        Tensor::from_vec(mmax, blocks, cpu)?,
        Tensor::from_vec(vc, p.shape(), cpu)?,
        Tensor::from_vec(vmax, blocks, cpu)?,
    ])
}

/// The state from its saved parts (`saved`), on `p`'s device.
pub fn restore(p: &Tensor, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
    if parts.len() != 4 {
        return Ok(parts);
    }
    let n = p.elem_count();
    let codes = |t: &Tensor| -> Result<Vec<u8>> { Ok(t.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<u8>()?) };
    let maxima = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
    };
    let (mc, mmax, vc, vmax) = (codes(&parts[0])?, maxima(&parts[1])?, codes(&parts[2])?, maxima(&parts[3])?);
    if mc.len() != n || vc.len() != n || mmax.len() != n.div_ceil(fused::QBLOCK) || vmax.len() != mmax.len() {
        bail!(
            "AdamW8bit state: parts of {}, {}, {} and {} values for a tensor of {n}",
            mc.len(),
            mmax.len(),
            vc.len(),
            vmax.len()
        );
    }
    Ok(vec![packed(&mmax, &vmax, &mc, &vc, p.device())?])
}

/// One AdamW8bit step of `w` (returns the new weights when it makes new tensors, None when `w` was updated in
/// place; updates `st`).
pub fn step(c: &Adam, w: &Tensor, g: &Tensor, st: &mut [Tensor], lr: f64, t: usize) -> Result<Option<Tensor>> {
    if st.len() != 1 {
        let (m, v) = c.moments(g, &st[0], &st[1])?;
        let out = c.apply(w, &m, &v, lr, t)?;
        st[0] = m;
        st[1] = v;
        return Ok(Some(out));
    }
    let (b1, b2) = c.betas;
    let a = Adam8bit {
        betas: (b1 as f32, b2 as f32),
        one_minus: ((1.0 - b1) as f32, (1.0 - b2) as f32),
        sqrt_bc2: (1.0 - b2.powi(t as i32)).sqrt() as f32,
        eps: c.eps as f32,
        decay: (c.weight_decay > 0.0).then_some((1.0 - lr * c.weight_decay) as f32),
        step_size: (-lr / (1.0 - b1.powi(t as i32))) as f32,
    };
    let g = g.to_dtype(w.dtype())?.contiguous()?;
    if !w.is_contiguous() {
        bail!("AdamW8bit: the weights must be contiguous");
    }
    a.weights_(w, &g, &st[0])?;
    a.state_(&st[0], &g)?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::nn::fused::adam8bit::{encode, nearest};

    fn decode(codes: &[u8], absmax: &[f32], map: &[f32]) -> Vec<f32> {
        codes.iter().enumerate().map(|(i, &c)| map[c as usize] * absmax[i / fused::QBLOCK]).collect()
    }

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
