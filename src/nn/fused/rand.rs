//! Dropout masks from a reserved stretch of `Rng`'s stream (`Rng::reserve`): element `i` is `keep` where draw `i`
//! is ≥ `p`, else 0 — the same mask on every device. On CUDA one kernel (`src/kernels/rand.cu`) draws it on the
//! GPU; on the CPU (the kernel's reference) the draws run in parallel.

use crate::rng::uniform_at;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// The mask of `shape` in `dtype` on `device` for the draws from `state` on.
pub fn keep_mask(state: u64, shape: &[usize], p: f64, keep: f32, dtype: DType, device: &Device) -> Result<Tensor> {
    if let Some(mask) = gpu_keep_mask(state, shape, p, keep, dtype, device)? {
        return Ok(mask);
    }
    let n: usize = shape.iter().product();
    let v: Vec<f32> =
        (0..n as u64).into_par_iter().map(|i| if uniform_at(state, i) >= p { keep } else { 0.0 }).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
}

#[cfg(feature = "cuda")]
fn gpu_keep_mask(
    state: u64,
    shape: &[usize],
    p: f64,
    keep: f32,
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>> {
    if !device.is_cuda() || !super::takes(dtype)? {
        return Ok(None);
    }
    Ok(Some(cuda_keep_mask(device.as_cuda_device()?, state, shape, p, keep, dtype)?))
}

#[cfg(feature = "cuda")]
fn cuda_keep_mask(
    dev: &candle_core::CudaDevice,
    state: u64,
    shape: &[usize],
    p: f64,
    keep: f32,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    by_dtype!(dtype, "dropout mask", keep_mask_typed(dev, state, shape, p, keep))
}

#[cfg(feature = "cuda")]
fn keep_mask_typed<T>(
    dev: &candle_core::CudaDevice,
    state: u64,
    shape: &[usize],
    p: f64,
    keep: f32,
) -> candle_core::Result<Tensor>
where
    T: candle_core::cuda_backend::CudaDType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr
        + candle_core::WithDType,
{
    let n = shape.iter().product();
    Ok(super::cuda::wrap(super::cuda::keep_mask::<T>(dev, n, state, p, keep)?, dev, shape))
}

#[cfg(not(feature = "cuda"))]
fn gpu_keep_mask(_: u64, _: &[usize], _: f64, _: f32, _: DType, _: &Device) -> Result<Option<Tensor>> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn the_mask_holds_the_streams_draws_in_order() {
        let mut rng = Rng::new(7);
        let state = rng.reserve(0);
        let mut seq = rng.clone();
        let m = keep_mask(state, &[3, 50, 4], 0.25, 4.0 / 3.0, DType::F32, &Device::Cpu).unwrap();
        let got = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f32> = (0..600).map(|_| if seq.uniform() >= 0.25 { 4.0 / 3.0 } else { 0.0 }).collect();
        assert_eq!(got, want);
        let kept = got.iter().filter(|&&x| x != 0.0).count();
        assert!((400..500).contains(&kept), "{kept} of 600 kept at p = 0.25");
        let half = keep_mask(state, &[600], 0.25, 1.0, DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(half.dtype(), DType::BF16);
        assert_eq!(half.to_dtype(DType::F32).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), kept as f32);
    }
}
