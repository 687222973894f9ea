//! GroupNorm / LayerNorm (+ SiLU) over rows, and its backward pass: one op each way (kernels:
//! `src/kernels/norm.cu`). The maths of `nn::norm`'s composed path, with statistics in f32 (f64 sums on the CPU).

use super::{elems, Elem};
use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// A normalisation over the rows of `x`'s `(rows, len)` view: element `i` of row `r` has affine channel
/// `(r % groups)·(len / hw) + i / hw` (GroupNorm over `[B, C, H, W]`: `B·G` rows, `hw = H·W`; LayerNorm: one row
/// per vector, `groups = hw = 1`), then SiLU if `silu`.
#[derive(Clone, Copy, Debug)]
pub struct NormRows {
    pub rows: usize,
    pub hw: usize,
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
}

impl NormRows {
    /// The row length and the number of affine channels, checked against `x` and `wb`.
    fn sizes(&self, x: &Tensor, wb: &Tensor) -> Result<(usize, usize)> {
        let n = x.elem_count();
        if !super::float(x.dtype()) || !x.is_contiguous() {
            bail!("fused norm: x must be a contiguous f32/bf16/f16 tensor ({:?}, {:?})", x.dtype(), x.shape());
        }
        if self.rows == 0 || n % self.rows != 0 || self.hw == 0 || (n / self.rows) % self.hw != 0 || self.groups == 0 {
            bail!(
                "fused norm: {n} elements do not split into {} rows of whole {}-element channels",
                self.rows,
                self.hw
            );
        }
        let len = n / self.rows;
        let channels = self.groups * (len / self.hw);
        if wb.dtype() != DType::F32 || wb.dims() != [2, channels] || !wb.is_contiguous() {
            bail!("fused norm: weight and bias must be a contiguous f32 [2, {channels}], not {:?}", wb.shape());
        }
        Ok((len, channels))
    }
}

/// `silu?((x − mean)·rstd·w + b)` per row, in `x`'s dtype; `wb`: f32 `[2, channels]` (weight, bias).
pub fn norm_forward(x: &Tensor, wb: &Tensor, p: NormRows) -> Result<Tensor> {
    p.sizes(x, wb)?;
    Ok(x.apply_op2_no_bwd(wb, &Forward(p))?)
}

/// The gradient of `norm_forward` with respect to `x`, given the output's gradient `gy` (`x`'s dtype and shape).
pub fn norm_backward(x: &Tensor, wb: &Tensor, gy: &Tensor, p: NormRows) -> Result<Tensor> {
    p.sizes(x, wb)?;
    if gy.dtype() != x.dtype() || gy.dims() != x.dims() || !gy.is_contiguous() {
        bail!("fused norm backward: the gradient must be contiguous, of x's dtype and shape");
    }
    Ok(x.apply_op3_no_bwd(wb, gy, &Backward(p))?)
}

struct Forward(NormRows);
struct Backward(NormRows);

fn sigmoid(y: f32) -> f32 {
    1.0 / (1.0 + (-y).exp())
}

/// A row's mean and `1/√(var + eps)`: two passes, f64 sums.
fn stats<T: Elem>(x: &[T], eps: f32) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = (x.iter().map(|v| v.get() as f64).sum::<f64>() / n) as f32;
    let var = x.iter().map(|v| ((v.get() - mean) as f64).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var as f32 + eps).sqrt())
}

/// The row-independent numbers of one op.
struct Rows<'a> {
    p: NormRows,
    len: usize,
    channels: usize,
    wb: &'a [f32],
}

impl Rows<'_> {
    fn forward<T: Elem + Send + Sync>(&self, x: &[T]) -> Vec<T> {
        let Self { p, len, channels, wb } = *self;
        let mut y = vec![T::put(0.0); x.len()];
        y.par_chunks_mut(len).zip(x.par_chunks(len)).enumerate().for_each(|(r, (y, x))| {
            let (mean, rstd) = stats(x, p.eps as f32);
            let c0 = (r % p.groups) * (len / p.hw);
            for (i, (y, x)) in y.iter_mut().zip(x).enumerate() {
                let c = c0 + i / p.hw;
                let v = (x.get() - mean) * rstd * wb[c] + wb[channels + c];
                *y = T::put(if p.silu { v * sigmoid(v) } else { v });
            }
        });
        y
    }

    fn backward<T: Elem + Send + Sync>(&self, x: &[T], gy: &[T]) -> Vec<T> {
        let Self { p, len, channels, wb } = *self;
        let mut gx = vec![T::put(0.0); x.len()];
        gx.par_chunks_mut(len).zip(x.par_chunks(len).zip(gy.par_chunks(len))).enumerate().for_each(
            |(r, (gx, (x, gy)))| {
                let (mean, rstd) = stats(x, p.eps as f32);
                let c0 = (r % p.groups) * (len / p.hw);
                // ĝ = gy'·w with gy' = gy, or gy·silu'(y) for y = x̂·w + b; and x̂
                let ghat = |i: usize| {
                    let c = c0 + i / p.hw;
                    let xhat = (x[i].get() - mean) * rstd;
                    let mut g = gy[i].get();
                    if p.silu {
                        let y = xhat * wb[c] + wb[channels + c];
                        let s = sigmoid(y);
                        g *= s * (y * (1.0 - s) + 1.0);
                    }
                    (g * wb[c], xhat)
                };
                let (mut s1, mut s2) = (0f64, 0f64);
                for i in 0..len {
                    let (g, xhat) = ghat(i);
                    s1 += g as f64;
                    s2 += (g * xhat) as f64;
                }
                let (m1, m2) = ((s1 / len as f64) as f32, (s2 / len as f64) as f32);
                for (i, gx) in gx.iter_mut().enumerate() {
                    let (g, xhat) = ghat(i);
                    *gx = T::put((g - m1 - xhat * m2) * rstd);
                }
            },
        );
        gx
    }
}

fn rows_of(p: NormRows, x_len: usize, wb: &[f32]) -> Rows<'_> {
    let len = x_len / p.rows;
    Rows { p, len, channels: p.groups * (len / p.hw), wb }
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "sdtune-norm"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        wb: &CpuStorage,
        wbl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn typed<T: Elem + Send + Sync>(
            p: NormRows,
            x: &CpuStorage,
            xl: &Layout,
            wb: &[f32],
        ) -> candle_core::Result<CpuStorage> {
            let x = elems::<T>(x, xl)?;
            Ok(T::to_cpu_storage_owned(rows_of(p, x.len(), wb).forward(x)))
        }
        let wb = elems::<f32>(wb, wbl)?;
        Ok((by_dtype!(x.dtype(), self.name(), typed(self.0, x, xl, wb))?, xl.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        wb: &candle_core::CudaStorage,
        wbl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::rows;
        let inputs = [(x, xl, false), (wb, wbl, true)];
        let out = by_dtype!(x.dtype(), self.name(), rows("norm", "norm_fwd", &inputs, self.0.rows, &args(self.0, xl)))?;
        Ok((out, xl.shape().clone()))
    }
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "sdtune-norm-backward"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        wb: &CpuStorage,
        wbl: &Layout,
        gy: &CpuStorage,
        gyl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn typed<T: Elem + Send + Sync>(
            p: NormRows,
            x: (&CpuStorage, &Layout),
            gy: (&CpuStorage, &Layout),
            wb: &[f32],
        ) -> candle_core::Result<CpuStorage> {
            let (x, g) = (elems::<T>(x.0, x.1)?, elems::<T>(gy.0, gy.1)?);
            Ok(T::to_cpu_storage_owned(rows_of(p, x.len(), wb).backward(x, g)))
        }
        let wb = elems::<f32>(wb, wbl)?;
        Ok((by_dtype!(x.dtype(), self.name(), typed(self.0, (x, xl), (gy, gyl), wb))?, xl.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        wb: &candle_core::CudaStorage,
        wbl: &Layout,
        gy: &candle_core::CudaStorage,
        gyl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let inputs = [(x, xl, false), (wb, wbl, true), (gy, gyl, false)];
        use super::cuda::rows;
        let out = by_dtype!(x.dtype(), self.name(), rows("norm", "norm_bwd", &inputs, self.0.rows, &args(self.0, xl)))?;
        Ok((out, xl.shape().clone()))
    }
}

/// The kernels' scalar parameters after the pointers: len, hw, groups, channels, eps, silu.
#[cfg(feature = "cuda")]
fn args(p: NormRows, xl: &Layout) -> [super::cuda::Arg; 6] {
    use super::cuda::Arg::{Usize, F32, I32};
    let len = xl.shape().elem_count() / p.rows;
    [Usize(len), Usize(p.hw), Usize(p.groups), Usize(p.groups * (len / p.hw)), F32(p.eps as f32), I32(p.silu as i32)]
}
