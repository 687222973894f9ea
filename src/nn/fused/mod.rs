//! sdtune's own fused kernels, each one launch where composed candle ops would take many (each a launch and an
//! allocation on a GPU): the optimizer step's in-place updates (`optim`, `adam8bit`), GroupNorm/LayerNorm (+ SiLU)
//! with their backward pass (`norm`), and on CUDA the attention (`flash`). The CPU code of each is the reference
//! of its CUDA kernel in `src/kernels/` (the attention's: `nn::attention`'s chunked path, and a CPU emulation of
//! the kernel in `tests/kernels/`); they compute in f32 over f32, bf16 or f16 tensors. `SDTUNE_FUSED=off` turns
//! them off (callers then compose candle ops), for comparisons.

/// `$f::<T>(args…)` with `T` the element type of `$dtype` (f32, bf16 or f16); `$what` names the op in the error
/// for other dtypes.
macro_rules! by_dtype {
    ($dtype:expr, $what:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*),
            d => candle_core::bail!("{}: {d:?} tensors are not supported (f32, bf16 or f16)", $what),
        }
    };
}

pub mod adam8bit;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub mod flash;
mod norm;
mod optim;
mod rand;

#[cfg(feature = "cuda")]
pub use cuda::im2col;
pub use norm::{norm_backward, norm_forward, NormRows};
pub use optim::{add_sum_squares, ema_, AdamW};
pub use rand::keep_mask;

use anyhow::{bail, Result};
use candle_core::{CpuStorage, DType, Layout, Tensor};
use half::{bf16, f16};

/// Whether the fused ops are on (`SDTUNE_FUSED` unset, `on` or `off`).
pub(crate) fn enabled() -> Result<bool> {
    match std::env::var("SDTUNE_FUSED").ok().as_deref() {
        None | Some("") | Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => bail!("SDTUNE_FUSED={other:?}: expected \"on\" or \"off\""),
    }
}

/// Whether the fused ops take these tensors: turned on, one float dtype (f32, bf16, f16), one device, one shape,
/// each contiguous. Otherwise callers compose candle ops.
pub fn applies(ts: &[&Tensor]) -> Result<bool> {
    let Some(first) = ts.first() else { return Ok(false) };
    Ok(enabled()?
        && float(first.dtype())
        && ts.iter().all(|t| {
            t.dtype() == first.dtype()
                && t.device().same_device(first.device())
                && t.dims() == first.dims()
                && t.is_contiguous()
        }))
}

/// Whether the fused ops are on and take tensors of `dtype` (made contiguous).
pub fn takes(dtype: DType) -> Result<bool> {
    Ok(enabled()? && float(dtype))
}

/// Whether a tensor of `dtype` can go through the fused ops.
fn float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// A float element read and written through f32.
trait Elem: candle_core::WithDType {
    fn get(self) -> f32;
    fn put(x: f32) -> Self;
    /// The elements of a CPU storage of this type.
    fn cpu_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

/// `impl Elem` for a float type: its conversions through f32 and its `CpuStorage` variant.
macro_rules! elem {
    ($t:ty, $variant:ident, $to_f32:expr, $from_f32:expr) => {
        impl Elem for $t {
            fn get(self) -> f32 {
                ($to_f32)(self)
            }
            fn put(x: f32) -> Self {
                ($from_f32)(x)
            }
            fn cpu_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                if let CpuStorage::$variant(v) = s {
                    Some(v)
                } else {
                    None
                }
            }
        }
    };
}
elem!(f32, F32, |x: f32| x, |x: f32| x);
elem!(bf16, BF16, bf16::to_f32, bf16::from_f32);
elem!(f16, F16, f16::to_f32, f16::from_f32);

/// The contiguous elements of a CPU storage of `T`s.
fn elems<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    part(T::cpu_storage_as_slice(s)?, l)
}

/// The contiguous elements of a CPU storage of `T`s, to update in place.
fn elems_mut<'a, T: Elem>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [T]> {
    match T::cpu_mut(s) {
        Some(v) => part_mut(v, l),
        None => candle_core::bail!("sdtune fused op: the tensors must be of one float dtype"),
    }
}

fn part<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("sdtune fused op: a tensor is not contiguous"),
    }
}

fn part_mut<'a, T>(v: &'a mut [T], l: &Layout) -> candle_core::Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => candle_core::bail!("sdtune fused op: a tensor is not contiguous"),
    }
}

fn same_len(a: usize, b: usize) -> candle_core::Result<()> {
    if a != b {
        candle_core::bail!("sdtune fused op: tensors of {a} and {b} elements");
    }
    Ok(())
}
