//! 2-D convolution (NCHW) as im2col + one batched GEMM per pass — forward, grad-input and grad-weight — written with
//! candle tensor ops, so on CUDA every pass is a cuBLAS GEMM plus memory-bound copies (candle's own convolution
//! backward runs a naive transposed-convolution kernel). The backward computes only the gradients something needs:
//! a frozen kernel (LoRA training) gets none.
//!
//! Columns are "wide": a stride-1 convolution over a zero-padded input of width `Wq` is a GEMM against the flat
//! input shifted by `i·Wq + j` for tap `(i, j)`, so each tap's columns are one strided block copy; the `Wq − Wo`
//! extra output columns per row are dropped. Stride `s` first regroups the padded input by position mod `s` (one
//! copy), after which every tap is again a shifted read of one phase image.

use super::grad;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

/// Which convolution implementation runs: ours, or candle's (`SDTUNE_CONV=candle`, for comparisons).
fn use_candle() -> Result<bool> {
    candle_chosen(std::env::var("SDTUNE_CONV").ok().as_deref())
}

/// Whether the value of `SDTUNE_CONV` chooses candle's convolution.
fn candle_chosen(value: Option<&str>) -> Result<bool> {
    match value {
        None | Some("") | Some("sdtune") => Ok(false),
        Some("candle") => Ok(true),
        Some(other) => bail!("SDTUNE_CONV={other:?}: expected \"sdtune\" or \"candle\""),
    }
}

/// `x ⋆ w` with `padding` on every side and `stride`; `x`: `[B, C, H, W]`, `w`: `[O, C, kh, kw]`. Computed and
/// returned in the kernel's dtype (`x` is cast inside the op: an f32 adapter on a bf16 model keeps no f32 copy of
/// its input in the graph); `x`'s gradient comes back in `x`'s dtype.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (_, c, h, wd) = x.dims4().context("conv2d input")?;
    let (_, wc, kh, kw) = w.dims4().context("conv2d kernel")?;
    if c != wc {
        bail!("conv2d: input has {c} channels, the kernel expects {wc}");
    }
    if stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
        bail!("conv2d: a {kh}×{kw} kernel (stride {stride}) does not fit a {h}×{wd} input with padding {padding}");
    }
    if use_candle()? {
        return candle_conv(x, w, padding, stride);
    }
    let y = forward(&x.detach().to_dtype(w.dtype())?, &w.detach(), (padding, padding), stride)?;
    let dtype = y.dtype();
    grad::attach("conv2d (+ adapters) backward", &[x, w], y, dtype, move |inp, _, g, need| {
        let (x, w) = (&inp[0], &inp[1]);
        let gx = if need[0] { Some(grad_input(g, w, x.dims(), padding, stride)?) } else { None };
        let gw = if need[1] { Some(grad_weight(&x.to_dtype(w.dtype())?, g, w.dims(), padding, stride)?) } else { None };
        Ok(vec![gx, gw])
    })
}

/// Geometry of one im2col: output size, phase image width.
struct Cols {
    /// `[B, C·kh·kw, Ho·Wq]`
    cols: Tensor,
    ho: usize,
    wo: usize,
    wq: usize,
}

/// The wide columns of `x` for a `kh×kw` kernel, padding `(ph, pw)`, stride `s`.
fn im2col(x: &Tensor, (kh, kw): (usize, usize), (ph, pw): (usize, usize), s: usize) -> Result<Cols> {
    let (b, c, h, w) = x.dims4()?;
    let (ho, wo) = ((h + 2 * ph - kh) / s + 1, (w + 2 * pw - kw) / s + 1);
    if kh == 1 && kw == 1 && s == 1 && ph == 0 && pw == 0 {
        return Ok(Cols { cols: x.reshape((b, c, h * w))?, ho, wo, wq: w });
    }
    // Phase images of `hq × wq`: the last tap's shifted read stays inside, one spare row for the wide overrun.
    let (hq, wq) = (ho + (kh - 1) / s + 1, wo + (kw - 1) / s);
    if let Some(cols) = gpu_im2col(x, (kh, kw), (ph, pw), s, ho, wq)? {
        return Ok(Cols { cols, ho, wo, wq });
    }
    let xp = pad_or_crop(x, 2, ph, hq * s)?;
    let xp = pad_or_crop(&xp, 3, pw, wq * s)?;
    let phases = if s == 1 {
        xp.reshape((b, c, 1, hq * wq))?
    } else {
        xp.reshape((b, c, hq, s, wq, s))?.permute((0, 1, 3, 5, 2, 4))?.contiguous()?.reshape((b, c, s * s, hq * wq))?
    };
    let mut taps = Vec::with_capacity(kh * kw);
    for i in 0..kh {
        for j in 0..kw {
            let phase = (i % s) * s + j % s;
            let offset = (i / s) * wq + j / s;
            // `[B, C, Ho·Wq]` rows of one stride each: candle concatenates such views along the last dimension
            // with one 2-D block copy each, into `[B, C, kh·kw·Ho·Wq]` = the columns
            taps.push(phases.narrow(2, phase, 1)?.squeeze(2)?.narrow(2, offset, ho * wq)?);
        }
    }
    let cols = Tensor::cat(&taps, 2)?.reshape((b, c * kh * kw, ho * wq))?;
    Ok(Cols { cols, ho, wo, wq })
}

/// The same columns in one kernel on a GPU (`nn::fused::im2col`), or None (CPU, `SDTUNE_FUSED=off`).
#[cfg(feature = "cuda")]
fn gpu_im2col(
    x: &Tensor,
    k: (usize, usize),
    p: (usize, usize),
    s: usize,
    ho: usize,
    wq: usize,
) -> Result<Option<Tensor>> {
    if !x.device().is_cuda() || !super::fused::takes(x.dtype())? {
        return Ok(None);
    }
    Ok(Some(super::fused::im2col(x, k, p, s, ho, wq)?))
}

#[cfg(not(feature = "cuda"))]
fn gpu_im2col(
    _: &Tensor,
    _: (usize, usize),
    _: (usize, usize),
    _: usize,
    _: usize,
    _: usize,
) -> Result<Option<Tensor>> {
    Ok(None)
}

/// `x` along `dim` with `before` zeros in front, then zero-padded or cut at the end to `len`.
fn pad_or_crop(x: &Tensor, dim: usize, before: usize, len: usize) -> Result<Tensor> {
    let n = x.dim(dim)? + before;
    let x = x.contiguous()?.pad_with_zeros(dim, before, len.saturating_sub(n))?;
    Ok(if n > len { x.narrow(dim, 0, len)? } else { x })
}

/// The convolution without a graph; a strided view when the wide columns were wider than the output (whoever
/// copies it next — `grad::attach`'s hand-over, a padding — makes it contiguous in the same pass).
fn forward(x: &Tensor, w: &Tensor, pad: (usize, usize), s: usize) -> Result<Tensor> {
    let (o, c, kh, kw) = w.dims4()?;
    let b = x.dim(0)?;
    let Cols { cols, ho, wo, wq } = im2col(x, (kh, kw), pad, s)?;
    let y = w.reshape((o, c * kh * kw))?.broadcast_matmul(&cols)?.reshape((b, o, ho, wq))?;
    Ok(if wq == wo { y } else { y.narrow(3, 0, wo)? })
}

/// The gradient of the input, one stride phase at a time: the padded input's rows `s·a + r` and columns `s·b + q`
/// receive the output gradient correlated at full padding with the kernel's taps `(r + s·m, q + s·n)`, flipped and
/// transposed — `s²` stride-1 convolutions with `kh·kw` taps in all (spreading the gradient with zeros instead would
/// do `s²` times the work). The phases are interleaved, then cut to the input.
fn grad_input(g: &Tensor, w: &Tensor, x_dims: &[usize], p: usize, s: usize) -> Result<Tensor> {
    let (_, c, kh, kw) = w.dims4()?;
    let (b, h, wd) = (x_dims[0], x_dims[2], x_dims[3]);
    let g = g.to_dtype(w.dtype())?.contiguous()?;
    let (a, bw) = ((h + 2 * p).div_ceil(s), (wd + 2 * p).div_ceil(s));
    // the taps r, r + s, ... of a side of k, last first
    let taps = |r: usize, k: usize| -> Vec<u32> { (r..k).step_by(s).rev().map(|i| i as u32).collect() };
    let mut phases = Vec::with_capacity(s * s);
    for r in 0..s {
        for q in 0..s {
            let (ti, tj) = (taps(r, kh), taps(q, kw));
            if ti.is_empty() || tj.is_empty() {
                phases.push(Tensor::zeros((b, c, a, bw), g.dtype(), g.device())?);
                continue;
            }
            let (mh, mw) = (ti.len(), tj.len());
            let wi = Tensor::from_vec(ti, mh, w.device())?;
            let wj = Tensor::from_vec(tj, mw, w.device())?;
            let sub = w.index_select(&wi, 2)?.index_select(&wj, 3)?.transpose(0, 1)?.contiguous()?;
            let full = forward(&g, &sub, (mh - 1, mw - 1), 1)?;
            phases.push(pad_or_crop(&pad_or_crop(&full, 2, 0, a)?, 3, 0, bw)?);
        }
    }
    let gp = Tensor::stack(&phases, 2)?.reshape((b, c, s, s, a, bw))?.permute((0, 1, 4, 2, 5, 3))?;
    let gp = gp.reshape((b, c, a * s, bw * s))?;
    Ok(gp.narrow(2, p, h)?.narrow(3, p, wd)?.contiguous()?)
}

/// The gradient of the kernel: the output gradient (widened with zero columns) times the columns, summed over the
/// batch.
fn grad_weight(x: &Tensor, g: &Tensor, w_dims: &[usize], p: usize, s: usize) -> Result<Tensor> {
    let (o, c, kh, kw) = (w_dims[0], w_dims[1], w_dims[2], w_dims[3]);
    let Cols { cols, ho, wo, wq } = im2col(x, (kh, kw), (p, p), s)?;
    let g = g.to_dtype(x.dtype())?.contiguous()?;
    let g = if wq == wo { g } else { g.pad_with_zeros(3, 0, wq - wo)? };
    let b = g.dim(0)?;
    let gw = g.reshape((b, o, ho * wq))?.matmul(&cols.t()?)?;
    let gw = if gw.dtype() == DType::F64 { gw.sum(0)? } else { gw.to_dtype(DType::F32)?.sum(0)? };
    Ok(gw.reshape((o, c, kh, kw))?)
}

/// candle's convolution, with its backward made to work for strided convolutions over sides of different
/// remainders: candle derives the transposed convolution's output padding from the height alone and applies it to
/// the width too, so padding the side with the smaller remainder with zeros at its end evens them out without
/// changing any output value.
fn candle_conv(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if stride > 1 {
        let (_, _, h, wd) = x.dims4()?;
        let (kh, kw) = (w.dim(2)?, w.dim(3)?);
        let rem = |n: usize, k: usize| (n + 2 * padding).saturating_sub(k) % stride;
        let (rh, rw) = (rem(h, kh), rem(wd, kw));
        if rh != rw {
            let x = if rh < rw { x.pad_with_zeros(2, 0, rw - rh)? } else { x.pad_with_zeros(3, 0, rh - rw)? };
            return Ok(x.conv2d(w, padding, stride, 1, 1)?);
        }
    }
    Ok(x.conv2d(w, padding, stride, 1, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        d.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    /// Output and both gradients against candle's convolution (checked against PyTorch on the CPU), f64.
    fn check(x: (usize, usize, usize, usize), w: (usize, usize, usize, usize), p: usize, s: usize) {
        let dev = Device::Cpu;
        let xv = Var::from_tensor(&Tensor::randn(0f64, 1., x, &dev).unwrap()).unwrap();
        let wv = Var::from_tensor(&Tensor::randn(0f64, 1., w, &dev).unwrap()).unwrap();
        let ours = conv2d(xv.as_tensor(), wv.as_tensor(), p, s).unwrap();
        let reference = candle_conv(xv.as_tensor(), wv.as_tensor(), p, s).unwrap();
        assert_eq!(ours.dims(), reference.dims(), "{x:?} {w:?} p{p} s{s}");
        assert!(max_diff(&ours, &reference) < 1e-10, "{x:?} {w:?} p{p} s{s}: forward");
        let r = Tensor::randn(0f64, 1., ours.dims(), &dev).unwrap();
        let go = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (reference * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (v, what) in [(&xv, "grad input"), (&wv, "grad kernel")] {
            let (a, b) = (go.get(v.as_tensor()).unwrap(), gr.get(v.as_tensor()).unwrap());
            assert_eq!(a.dims(), b.dims());
            assert!(max_diff(a, b) < 1e-10, "{x:?} {w:?} p{p} s{s}: {what} differs by {}", max_diff(a, b));
        }
    }

    #[test]
    fn matches_candle_forward_and_backward() {
        check((2, 3, 8, 8), (4, 3, 3, 3), 1, 1); // 3×3 same
        check((2, 3, 8, 8), (4, 3, 3, 3), 1, 2); // SD downsampler, even
        check((1, 2, 9, 7), (3, 2, 3, 3), 1, 2); // odd sides
        check((2, 5, 6, 6), (3, 5, 1, 1), 0, 1); // pointwise
        check((1, 2, 6, 6), (3, 2, 3, 3), 0, 1); // no padding
        check((1, 2, 5, 7), (3, 2, 1, 3), 1, 1); // 1×3 kernel
        check((1, 2, 10, 11), (2, 2, 3, 3), 2, 3); // stride 3, padding 2
        check((1, 2, 9, 9), (3, 2, 3, 3), 0, 2); // the VAE's stride-2 (after its own asymmetric pad)
    }

    #[test]
    fn strided_conv_over_uneven_sides() {
        // candle's own backward fails here; ours and the padded candle path agree.
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1., (1, 2, 4, 5), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f64, 1., (3, 2, 3, 3), &dev).unwrap();
        assert!(x.as_tensor().conv2d(&w, 1, 2, 1, 1).unwrap().sum_all().unwrap().backward().is_err());
        check((1, 2, 4, 5), (3, 2, 3, 3), 1, 2);
    }

    #[test]
    fn frozen_kernel_gets_no_gradient_and_inference_builds_no_graph() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (1, 2, 6, 6), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1., (3, 2, 3, 3), &dev).unwrap();
        let g = conv2d(x.as_tensor(), &w, 1, 1).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&w).is_none());
        assert_eq!(g.get(x.as_tensor()).unwrap().dims(), &[1, 2, 6, 6]);
        assert!(!conv2d(&x.as_tensor().detach(), &w, 1, 1).unwrap().track_op());
    }

    #[test]
    fn sdtune_conv_chooses_the_implementation() {
        assert!(!candle_chosen(None).unwrap() && !candle_chosen(Some("sdtune")).unwrap());
        assert!(candle_chosen(Some("candle")).unwrap());
        let e = candle_chosen(Some("cudnn")).unwrap_err();
        assert_eq!(format!("{e:#}"), r#"SDTUNE_CONV="cudnn": expected "sdtune" or "candle""#);
    }

    #[test]
    fn an_f32_kernel_on_a_half_input_computes_in_f32() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (1, 2, 5, 5), &dev).unwrap().to_dtype(DType::F16).unwrap())
            .unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 2, 3, 3), &dev).unwrap()).unwrap();
        let y = conv2d(x.as_tensor(), w.as_tensor(), 1, 1).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        let x32 = x.as_tensor().to_dtype(DType::F32).unwrap();
        assert!(max_diff(&y, &candle_conv(&x32, w.as_tensor(), 1, 1).unwrap()) < 1e-5);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(x.as_tensor()).unwrap().dtype(), DType::F16);
        let gw = g.get(w.as_tensor()).unwrap();
        assert_eq!(gw.dtype(), DType::F32);
        let want = candle_conv(&x32, w.as_tensor(), 1, 1).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(gw, want.get(w.as_tensor()).unwrap()) < 1e-4);
    }

    #[test]
    fn bad_shapes_are_one_line_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &dev).unwrap();
        let e = conv2d(&x, &Tensor::zeros((3, 4, 3, 3), DType::F32, &dev).unwrap(), 1, 1).unwrap_err();
        assert!(format!("{e:#}").contains("2 channels, the kernel expects 4"), "{e:#}");
        let e = conv2d(&x, &Tensor::zeros((3, 2, 7, 7), DType::F32, &dev).unwrap(), 1, 1).unwrap_err();
        assert!(format!("{e:#}").contains("does not fit"), "{e:#}");
    }
}
